"""The schema: numbered `NNNN_*.sql` scripts in a package folder, applied in order once.

`agentd/sql/` holds agentd.db's scripts, `agentd/sql/memory/` memory.db's. Each script runs
in its own transaction with the row that records it in `schema_version`, so a failed
migration leaves the file at the version before it. A file written by a newer agentd (a
version past the last script) is refused rather than read with the wrong schema.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from agentd.errors import StoreError
from agentd.store.driver import Connection, Error

Migration = tuple[int, str, str]  # (version, file name, script)


def load(folder: str = "sql") -> list[Migration]:
    """The migrations in the package folder `folder`, by version."""
    found = []
    for entry in resources.files("agentd").joinpath(folder).iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text()))
    return sorted(found)


MIGRATIONS = load()
SCHEMA_VERSION = MIGRATIONS[-1][0] if MIGRATIONS else 0


def migrate(conn: Connection, path: Path, migrations: list[Migration] | None = None) -> int:
    """Apply the numbered `sql/NNNN_*.sql` files not yet recorded; return the schema version.

    Raises:
        StoreError: the database was written by a newer agentd, or a migration failed.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    migrations = MIGRATIONS if migrations is None else migrations
    latest = migrations[-1][0] if migrations else 0
    current: int = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    if current > latest:
        raise StoreError(
            f"{path}: database schema version {current} is newer than this agentd knows "
            f"({latest}); run a newer agentd or restore a backup"
        )
    for version, name, script in migrations:
        if version <= current:
            continue
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\n;"
                f"INSERT INTO schema_version VALUES ({version}, '{name}', {time.time()});\nCOMMIT;"
            )
        except Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"{path}: migration {name} failed: {exc}") from exc
    return max(current, latest)
