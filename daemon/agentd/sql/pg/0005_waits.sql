-- Durable waits (agentd/waits.py), as SQLite's migration 0011 leaves them: the `waiting`
-- status, and one row per wait of a task.
ALTER TABLE tasks DROP CONSTRAINT tasks_status_check;
ALTER TABLE tasks ADD CONSTRAINT tasks_status_check CHECK (status IN
    ('queued', 'running', 'waiting', 'succeeded', 'failed', 'dead', 'cancelled'));
CREATE INDEX tasks_waiting ON tasks (id) WHERE status = 'waiting';

CREATE TABLE task_waits (
    task_id     bigint  NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq         integer NOT NULL,
    kind        text    NOT NULL CHECK (kind IN ('sleep', 'event', 'ask')),
    topic       text,
    match       text,
    prompt      text,
    data        text,
    wake_at     double precision,
    created_at  double precision NOT NULL,
    resolved_at double precision,
    outcome     text,
    timed_out   integer NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, seq)
);
CREATE INDEX task_waits_due ON task_waits (wake_at) WHERE resolved_at IS NULL AND wake_at IS NOT NULL;
CREATE INDEX task_waits_open ON task_waits (kind, task_id) WHERE resolved_at IS NULL;
