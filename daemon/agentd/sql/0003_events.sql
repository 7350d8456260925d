-- The event log: recent (ring) and retained (durable) bus events, for stream resume and replay.
-- Ids are the bus's ids: unique, increasing, close to the wall clock in microseconds.
CREATE TABLE events (
    id             INTEGER PRIMARY KEY,
    topic          TEXT    NOT NULL,
    time           REAL    NOT NULL,
    data           TEXT    NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    durable        INTEGER NOT NULL
);
CREATE INDEX events_correlation ON events (correlation_id, id) WHERE correlation_id IS NOT NULL;
