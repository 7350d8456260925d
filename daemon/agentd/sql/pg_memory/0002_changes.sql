-- What each daemon's RAM index of the binary codes (`[memory] ram_index`,
-- agentd/postgres/memory_index.py) needs to follow the others' writes.
--
-- `changed_xid`: the transaction that last wrote the row. A recall re-ranks, beside the
-- index's candidates, every row whose writer the index's snapshot does not see yet, so what
-- one daemon remembered is recalled through every other at once, whether or not its
-- notification has arrived. Set by default on insert and by a trigger on every update (the
-- foreign keys' ON DELETE SET NULL too: a forgotten correction's original comes back).
-- NULL in the rows written before this migration (adding the column with its default would
-- rewrite the whole table): every index reads those at its load.
ALTER TABLE memories ADD COLUMN changed_xid xid8;
ALTER TABLE memories ALTER COLUMN changed_xid SET DEFAULT pg_current_xact_id();
CREATE INDEX memories_changed ON memories (changed_xid);

CREATE FUNCTION memories_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.changed_xid := pg_current_xact_id();
    RETURN NEW;
END
$$;
CREATE TRIGGER memories_stamp BEFORE UPDATE ON memories
    FOR EACH ROW EXECUTE FUNCTION memories_stamp();

-- Channel `agentd_memory`: 'c' after a statement inserted or updated memories (the indexes
-- then read what changed since their snapshot), 'd:<id>,<id>,...' with the ids a statement
-- deleted (a deleted row leaves nothing to read), 500 a notification to stay well inside
-- NOTIFY's 8,000 bytes. Sent at commit, in commit order.
CREATE FUNCTION memories_notify_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agentd_memory', 'c');
    RETURN NULL;
END
$$;
CREATE TRIGGER memories_inserted AFTER INSERT ON memories
    FOR EACH STATEMENT EXECUTE FUNCTION memories_notify_changed();
CREATE TRIGGER memories_updated AFTER UPDATE ON memories
    FOR EACH STATEMENT EXECUTE FUNCTION memories_notify_changed();

CREATE FUNCTION memories_notify_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ids text;
BEGIN
    FOR ids IN
        SELECT string_agg(id::text, ',') FROM (
            SELECT id, (row_number() OVER ()) / 500 AS part FROM deleted_rows) numbered
        GROUP BY part
    LOOP
        PERFORM pg_notify('agentd_memory', 'd:' || ids);
    END LOOP;
    RETURN NULL;
END
$$;
CREATE TRIGGER memories_deleted AFTER DELETE ON memories
    REFERENCING OLD TABLE AS deleted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION memories_notify_deleted();
