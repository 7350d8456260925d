-- (status, name) over every row was rewritten three times per task (enqueued, claimed,
-- acknowledged): a fifth of a no-op task's SQLite work. Listing by status now uses what
-- each status has: queued and succeeded rows are found newest first by id (a backlog is
-- the newest rows, and nearly every row is succeeded), running ones through tasks_running,
-- and the ones that need a look (failed, dead, cancelled: they always have an error)
-- through this index. Its condition is `error IS NOT NULL`, not a status list: SQLite
-- evaluates `status IN (...)` for each acknowledged row with a temporary table, which
-- cost as much as the index it replaces.
DROP INDEX tasks_status_name;
CREATE INDEX tasks_unsuccessful ON tasks (status, name, id) WHERE error IS NOT NULL;
