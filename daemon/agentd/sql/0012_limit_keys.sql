-- Limits per key (`@plugin.task(concurrency_key=..., rate_key=...)`): each task's keys,
-- formatted from its arguments at enqueue ('' without one), so a claim filters on them.
ALTER TABLE tasks ADD COLUMN concurrency_key TEXT NOT NULL DEFAULT '';
ALTER TABLE tasks ADD COLUMN rate_key TEXT NOT NULL DEFAULT '';
-- The token buckets, one per rate group (`<name>:r:<rate key>`, agentd/taskdef.py), and an
-- LLM endpoint's 429 holding the group back until `held_until`: kept here, not in memory,
-- so a restart neither refills a bucket nor lifts a hold.
CREATE TABLE task_rates (
    name       TEXT PRIMARY KEY,
    tokens     REAL NOT NULL,
    updated_at REAL NOT NULL,
    held_until REAL NOT NULL DEFAULT 0
);
CREATE INDEX task_rates_held ON task_rates (held_until) WHERE held_until > 0;
