-- What a memory was before each change (mem0's history): goes with the memory. The
-- memories from before this migration start with their present text as 'created'.
CREATE TABLE memory_history (
    id            INTEGER PRIMARY KEY,
    memory_id     INTEGER NOT NULL REFERENCES memories (id) ON DELETE CASCADE,
    event         TEXT    NOT NULL CHECK (event IN ('created', 'updated', 'superseded')),
    text          TEXT    NOT NULL,
    old_text      TEXT,
    metadata      TEXT    NOT NULL,
    old_metadata  TEXT,
    superseded_by INTEGER,
    at            REAL    NOT NULL
);
CREATE INDEX memory_history_memory ON memory_history (memory_id, id);
INSERT INTO memory_history (memory_id, event, text, metadata, at)
    SELECT id, 'created', text, metadata, created_at FROM memories;
