-- Limits per key, as SQLite's migration 0012 leaves them: each task's concurrency and rate
-- keys ('' without one); a bucket per rate group (`<name>:r:<rate key>`, the buckets of
-- before keyed by name becoming their name's keyless group), and a 429's hold.
ALTER TABLE tasks ADD COLUMN concurrency_key text NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN rate_key text NOT NULL DEFAULT '';
UPDATE task_rates SET name = name || ':r:';
ALTER TABLE task_rates ADD COLUMN held_until double precision NOT NULL DEFAULT 0;
CREATE INDEX task_rates_held ON task_rates (held_until) WHERE held_until > 0;
