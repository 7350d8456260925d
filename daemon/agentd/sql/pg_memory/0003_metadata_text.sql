-- A memory's metadata as it was given, beside the jsonb its filters read: jsonb gives back
-- its own spelling (keys reordered, 1e300 as 301 digits, -0.0 as 0.0), which a client on
-- SQLite does not see, and which made an update with the same metadata look changed.
--
-- NULL where it is not known, and then the jsonb's spelling is read: in rows from before
-- (not rewritten: what was given is gone anyway), and in rows an agentd from before this
-- migration writes during a rolling upgrade. Such an agentd changes `metadata` alone: the
-- trigger drops the text it would leave stale.
ALTER TABLE memories ADD COLUMN metadata_text text;

CREATE FUNCTION memories_metadata_text() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.metadata IS DISTINCT FROM OLD.metadata
            AND NEW.metadata_text IS NOT DISTINCT FROM OLD.metadata_text THEN
        NEW.metadata_text := NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER memories_metadata_text BEFORE UPDATE OF metadata ON memories
    FOR EACH ROW EXECUTE FUNCTION memories_metadata_text();
