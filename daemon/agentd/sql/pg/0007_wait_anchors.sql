-- Open event waits matched in the table by topic pattern and anchor, as SQLite's migration
-- 0013 leaves them.
ALTER TABLE task_waits ADD COLUMN anchor text;
UPDATE task_waits SET anchor = '' WHERE kind = 'event' AND resolved_at IS NULL;
CREATE INDEX task_waits_events ON task_waits (topic, anchor) WHERE resolved_at IS NULL AND kind = 'event';
