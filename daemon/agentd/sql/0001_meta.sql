-- Small facts the daemon keeps about itself (last start, write checks, recorded settings).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
