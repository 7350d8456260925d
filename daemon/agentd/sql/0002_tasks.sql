-- The durable queue. A task moves queued → running → succeeded | failed | dead | cancelled;
-- a failed attempt with attempts left goes back to queued with a later run_at.
CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    queue            TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    args             TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN
                     ('queued', 'running', 'succeeded', 'failed', 'dead', 'cancelled')),
    priority         INTEGER NOT NULL DEFAULT 0,
    run_at           REAL    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    timeout          REAL,
    lease_until      REAL,
    idempotency_key  TEXT UNIQUE,
    parent_id        INTEGER,
    correlation_id   TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    result           TEXT,
    error            TEXT,
    created_at       REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    expires_at       REAL
);

-- The claim query: the best queued task of one queue whose time has come.
CREATE INDEX tasks_claim ON tasks (queue, priority DESC, run_at, id) WHERE status = 'queued';
-- When the next delayed task of a queue comes due.
CREATE INDEX tasks_due ON tasks (queue, run_at) WHERE status = 'queued';
CREATE INDEX tasks_running ON tasks (lease_until) WHERE status = 'running';
CREATE INDEX tasks_parent ON tasks (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX tasks_status_name ON tasks (status, name);
CREATE INDEX tasks_expires ON tasks (expires_at) WHERE expires_at IS NOT NULL;

-- Memoized steps (`ctx.step`): a retried task does not redo what already succeeded.
CREATE TABLE task_steps (
    task_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    key     TEXT    NOT NULL,
    result  TEXT    NOT NULL,
    PRIMARY KEY (task_id, key)
) WITHOUT ROWID;
