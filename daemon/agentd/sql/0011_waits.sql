-- Durable waits (`ctx.sleep`, `ctx.wait_for`, `ctx.ask`; agentd/waits.py). A task whose
-- wait is not yet satisfied is `waiting`: no lease, no worker, no coroutine.
--
-- The status CHECK gains 'waiting'. SQLite cannot alter a CHECK, so `tasks` is rebuilt.
-- `task_steps` references it (ON DELETE CASCADE) and foreign keys are on during
-- migrations (they cannot be turned off inside the migration's transaction): dropping
-- the old `tasks` would delete every step. The steps are set aside, their table dropped
-- and made again once the new `tasks` has taken the name.
CREATE TABLE tasks_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    queue            TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    args             TEXT    NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN
                     ('queued', 'running', 'waiting', 'succeeded', 'failed', 'dead', 'cancelled')),
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
    expires_at       REAL,
    usage            TEXT
);
INSERT INTO tasks_new SELECT id, queue, name, args, status, priority, run_at, attempts,
    max_attempts, timeout, lease_until, idempotency_key, parent_id, correlation_id,
    cancel_requested, result, error, created_at, started_at, finished_at, expires_at, usage
    FROM tasks;
-- Ids are never handed out twice, even those of purged tasks: the counter carries over.
DELETE FROM sqlite_sequence WHERE name = 'tasks_new';
INSERT INTO sqlite_sequence (name, seq) SELECT 'tasks_new', seq FROM sqlite_sequence WHERE name = 'tasks';

CREATE TEMP TABLE steps_kept AS SELECT task_id, key, result FROM task_steps;
DROP TABLE task_steps;
DROP TABLE tasks;
ALTER TABLE tasks_new RENAME TO tasks;
CREATE TABLE task_steps (
    task_id INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    key     TEXT    NOT NULL,
    result  TEXT    NOT NULL,
    PRIMARY KEY (task_id, key)
) WITHOUT ROWID;
INSERT INTO task_steps SELECT task_id, key, result FROM steps_kept;
DROP TABLE steps_kept;

-- The indexes `tasks` had (0002, 0008).
CREATE INDEX tasks_claim ON tasks (queue, priority DESC, run_at, id) WHERE status = 'queued';
CREATE INDEX tasks_due ON tasks (queue, run_at) WHERE status = 'queued';
CREATE INDEX tasks_running ON tasks (lease_until) WHERE status = 'running';
CREATE INDEX tasks_parent ON tasks (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX tasks_expires ON tasks (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX tasks_unsuccessful ON tasks (status, name, id) WHERE error IS NOT NULL;
-- Waiting tasks are listed and counted through this one.
CREATE INDEX tasks_waiting ON tasks (id) WHERE status = 'waiting';

-- One row per wait of a task, numbered (`seq`) in the order the task's code makes them, as
-- a replayed attempt makes them again. Open while `resolved_at` is NULL; resolving writes
-- the outcome (JSON: the event, the answer; NULL for a timer) or `timed_out`, and requeues
-- the task, in one transaction.
CREATE TABLE task_waits (
    task_id     INTEGER NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('sleep', 'event', 'ask')),
    topic       TEXT,
    match       TEXT,
    prompt      TEXT,
    data        TEXT,
    wake_at     REAL,
    created_at  REAL    NOT NULL,
    resolved_at REAL,
    outcome     TEXT,
    timed_out   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, seq)
) WITHOUT ROWID;
-- The timers to fire (a sleep's end, a wait's timeout), soonest first.
CREATE INDEX task_waits_due ON task_waits (wake_at) WHERE resolved_at IS NULL AND wake_at IS NOT NULL;
-- The open waits by kind: event waits for the index rebuilt at start, questions to list.
CREATE INDEX task_waits_open ON task_waits (kind, task_id) WHERE resolved_at IS NULL;
