-- Schedules: their definition (JSON) and what the scheduler has done with them.
-- next_fire is the first fire time not yet handled; NULL once a one-off date has fired.
CREATE TABLE schedules (
    id              TEXT    PRIMARY KEY,
    source          TEXT    NOT NULL CHECK (source IN ('plugin', 'config', 'api', 'builtin')),
    spec            TEXT    NOT NULL,
    paused          INTEGER NOT NULL DEFAULT 0,
    next_fire       REAL,
    last_fire       REAL,
    last_task_id    INTEGER,
    last_outcome    TEXT,
    fires           INTEGER NOT NULL DEFAULT 0,
    misses          INTEGER NOT NULL DEFAULT 0,
    failures_in_row INTEGER NOT NULL DEFAULT 0,
    owed_fire       REAL,
    created_at      REAL    NOT NULL,
    updated_at      REAL    NOT NULL
) WITHOUT ROWID;
