-- Keyword search scoped to a namespace inside FTS5: the namespace is indexed as one token
-- ('n' + its UTF-8 hex), so a hybrid recall reads the matches of its namespace only
-- instead of every namespace's (50-100 ms at 100,000 memories before).
DROP TABLE memories_fts;
CREATE VIRTUAL TABLE memories_fts USING fts5 (text, namespace);
INSERT INTO memories_fts (rowid, text, namespace)
    SELECT id, text, 'n' || hex(namespace) FROM memories WHERE superseded_by IS NULL;
