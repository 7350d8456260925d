-- The event log across daemons (agentd/postgres/events.py): event ids come from one counter
-- row, updated by each event-writing transaction, so ids commit in id order (the commit
-- horizon: a reader following the log never passes an id that commits later).
CREATE TABLE event_counter (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    last_id bigint  NOT NULL
);
INSERT INTO event_counter (one, last_id) SELECT true, coalesce(max(id), 0) FROM events;

-- The ring sweep's "the ring_size-th newest ring event".
CREATE INDEX events_ring ON events (id) WHERE durable = 0;
