-- Agent memory, in its own file (memory.db) so that slow vector writes never hold the
-- queue's writer. The vector table (vec0) is made at start, sized to the embedder.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Short-term: the messages of a conversation, kept while the session is alive.
CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    updated_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX sessions_expiry ON sessions (expires_at);

CREATE TABLE messages (
    id         INTEGER PRIMARY KEY,
    session_id TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    role       TEXT    NOT NULL,
    content    TEXT    NOT NULL,
    meta       TEXT    NOT NULL DEFAULT '{}',
    created_at REAL    NOT NULL
);
CREATE INDEX messages_session ON messages (session_id, id);

-- Long-term: what an agent learned. A correction supersedes what it replaces.
CREATE TABLE memories (
    id            INTEGER PRIMARY KEY,
    namespace     TEXT    NOT NULL,
    text          TEXT    NOT NULL,
    metadata      TEXT    NOT NULL DEFAULT '{}',
    hash          TEXT    NOT NULL,
    created_at    REAL    NOT NULL,
    updated_at    REAL    NOT NULL,
    expires_at    REAL,
    supersedes    INTEGER REFERENCES memories (id) ON DELETE SET NULL,
    superseded_by INTEGER REFERENCES memories (id) ON DELETE SET NULL
);
CREATE INDEX memories_hash ON memories (namespace, hash) WHERE superseded_by IS NULL;
CREATE INDEX memories_expiry ON memories (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX memories_namespace ON memories (namespace, id);

-- Keywords, for hybrid recall; rowid = memories.id.
CREATE VIRTUAL TABLE memories_fts USING fts5 (text);
