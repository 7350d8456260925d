-- Mail digests: how far each `[digests.<name>]` has read the event log.
CREATE TABLE digest_cursors (
    name          TEXT PRIMARY KEY,
    last_event_id INTEGER NOT NULL,
    sent_at       REAL    NOT NULL
) WITHOUT ROWID;
