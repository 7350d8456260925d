"""`agentd store copy`: an SQLite deployment's agentd.db copied into a PostgreSQL database,
so a user who outgrows one machine keeps their tasks, schedules and event log.

The copy reads the SQLite file at rest: it takes the file's lock (`lock.py`) for its whole
run, so it refuses while a daemon owns the file and no daemon starts on it meanwhile. The
target is migrated first (`PgStore.open`), then every row of agentd.db's tables goes over
in one transaction, in batches of binary `COPY`: a failure anywhere leaves the target as
it was. Columns are matched by name, the SQLite table's columns into the same-named
PostgreSQL ones, so columns only PostgreSQL has take their defaults. Ids are kept, and
each identity is moved past the largest id copied, so new rows never reuse one.

memory.db (sessions, long-term memory) is not copied.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from agentd.config import StoreConfig, redact_url
from agentd.errors import ConfigError, StoreError, StoreLockedError
from agentd.store.lock import FileLock
from agentd.store.migrations import SCHEMA_VERSION
from agentd.store.postgres import PgStore, unavailable

# agentd.db's tables in copy order (a task before its steps), with the order rows are read.
TABLES: dict[str, str] = {
    "meta": "key", "tasks": "id", "task_steps": "task_id, key", "schedules": "id",
    "digest_cursors": "name", "hook_deliveries": "hook, delivery_id", "events": "id",
}
# The tables whose ids are identities on PostgreSQL.
IDENTITIES = ("tasks", "events")
BATCH_ROWS = 5000
# Seconds one batch's COPY may take (PgStore's statements get 5 s; a batch is bigger).
_BATCH_TIMEOUT = 120.0


@dataclass
class CopyReport:
    """What a copy did: rows per table, and where from and to (the URL without password)."""

    source: Path
    target: str
    rows: dict[str, int] = field(default_factory=dict)
    replaced: dict[str, int] = field(default_factory=dict)  # rows --force deleted from the target
    seconds: float = 0.0


class TargetNotEmptyError(StoreError):
    """The target database already holds agentd data (and --force was not given)."""


async def copy_to_postgres(source: Path, url: str, *, force: bool = False,
                           batch_rows: int = BATCH_ROWS) -> CopyReport:
    """Copy agentd.db at `source` into the PostgreSQL database at `url`.

    Args:
        source: the SQLite file (a stopped daemon's `[store] path`).
        url: a `postgresql://` URL; the database must exist (it is migrated here).
        force: replace the agentd data the target holds instead of refusing.
        batch_rows: rows per COPY.

    Raises:
        ConfigError: `url` is not a PostgreSQL URL.
        StoreLockedError: a daemon runs on `source`.
        TargetNotEmptyError: the target holds agentd data and `force` is False.
        StoreError: the source or the target cannot be read or written; nothing was copied.
    """
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"--to: expected a postgresql:// URL, got {redact_url(url)!r}")
    lock, sqlite = _take_source(source)
    try:
        return await _copy(sqlite, source, url, force, batch_rows)
    finally:
        sqlite.close()
        lock.release()


def _take_source(source: Path) -> tuple[FileLock, sqlite3.Connection]:
    """Lock `source` for this process and open it for reading, in one snapshot."""
    if not source.is_file():
        raise StoreError(f"{source}: no such database file: nothing to copy (is this the "
                         "configuration of the deployment to copy? --config names it)")
    lock = FileLock(source, "[store] path")
    try:
        lock.acquire()
    except StoreLockedError as exc:
        holder = lock.path.read_text().strip() or "unknown"
        raise StoreLockedError(f"{source} is in use by a running agentd (pid {holder}): stop the "
                               "daemon first; the copy reads the file at rest") from exc
    try:
        return lock, _open_source(source)
    except BaseException:
        lock.release()
        raise


def _open_source(source: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(source, isolation_level=None)
        conn.execute("PRAGMA query_only = ON")
        version = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise StoreError(f"{source}: cannot read it as agentd's database: {exc}") from exc
    if version > SCHEMA_VERSION:
        conn.close()
        raise StoreError(f"{source}: database schema version {version} is newer than this agentd "
                         f"knows ({SCHEMA_VERSION}); copy it with a newer agentd")
    conn.execute("BEGIN")  # one snapshot for the whole copy
    return conn


async def _copy(sqlite: sqlite3.Connection, source: Path, url: str, force: bool,
                batch_rows: int) -> CopyReport:
    report = CopyReport(source, redact_url(url))
    started = time.monotonic()
    target = PgStore(StoreConfig(url=url, pool_size=2))
    await target.open()  # migrates; raises StoreError naming the URL
    await target.close()
    try:
        conn = await asyncpg.connect(url, timeout=10.0)
    except Exception as exc:
        raise StoreError(f"{report.target}: cannot connect to PostgreSQL: "
                         f"{type(exc).__name__}: {exc}") from None
    table = "(none yet)"
    try:
        async with conn.transaction():
            report.replaced = await _make_room(conn, report.target, force)
            for table, order in TABLES.items():
                report.rows[table] = await _copy_table(sqlite, conn, table, order, batch_rows)
            for table in IDENTITIES:
                await _move_identity(sqlite, conn, table)
    except StoreError:
        raise
    except Exception as exc:
        away = unavailable(report.target, exc)
        cause = f"{type(exc).__name__}: {exc}" if away is None else str(away)
        raise StoreError(f"the copy failed in table {table} ({cause}); it was rolled back: the "
                         f"target {report.target} holds nothing of it") from exc
    finally:
        try:
            await conn.close(timeout=5.0)
        except Exception:
            conn.terminate()
    report.seconds = time.monotonic() - started
    return report


async def _make_room(conn: asyncpg.Connection, where: str, force: bool) -> dict[str, int]:
    """Refuse a target that holds agentd data, or with `force` delete that data; meta rows
    are only replaced key by key (in `_copy_table`)."""
    held: dict[str, int] = {}
    for table in TABLES:
        if table != "meta":
            count: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
            if count:
                held[table] = count
    if held and not force:
        listed = ", ".join(f"{count} {table}" for table, count in held.items())
        raise TargetNotEmptyError(
            f"{where} already holds agentd data ({listed}): refusing to mix two deployments. "
            "Copy into an empty database, or give --force to delete that data and replace it")
    if held:
        tables = ", ".join(table for table in TABLES if table != "meta")
        await conn.execute(f"TRUNCATE {tables}")
    return held


async def _copy_table(sqlite: sqlite3.Connection, conn: asyncpg.Connection, table: str,
                      order: str, batch_rows: int) -> int:
    columns = [row[1] for row in sqlite.execute(f"PRAGMA table_info({table})")]
    if not columns:
        return 0  # an old file without this table
    types = {row["column_name"]: row["data_type"] for row in await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = $1", table)}
    missing = [column for column in columns if column not in types]
    if missing:
        raise StoreError(f"table {table}: the target has no column {', '.join(missing)}: its "
                         "schema does not match this agentd's")
    coerce = [_COERCE.get(types[column], _same) for column in columns]
    listed = ", ".join(columns)
    cursor = sqlite.execute(f"SELECT {listed} FROM {table} ORDER BY {order}")
    copied = 0
    while rows := cursor.fetchmany(batch_rows):
        records = [tuple(None if value is None else convert(value)
                         for convert, value in zip(coerce, row, strict=True)) for row in rows]
        if table == "meta":  # the source's keys (the stream key first) win
            await conn.execute("DELETE FROM meta WHERE key = any($1::text[])", [r[0] for r in records])
        await conn.copy_records_to_table(table, records=records, columns=columns,
                                         timeout=_BATCH_TIMEOUT)
        copied += len(records)
    return copied


async def _move_identity(sqlite: sqlite3.Connection, conn: asyncpg.Connection, table: str) -> None:
    """Make the next id of `table` larger than any it has had on SQLite: its largest row,
    or AUTOINCREMENT's record of ids handed out (a deleted task's id is never reused)."""
    highest = sqlite.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0]
    # sqlite_sequence exists only once an AUTOINCREMENT table has had a row.
    with contextlib.suppress(sqlite3.OperationalError):
        sequence = sqlite.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
        highest = max(highest, sequence[0] if sequence else 0)
    if highest > 0:
        await conn.execute("SELECT setval(pg_get_serial_sequence($1, 'id'), $2)", table, highest)


def _same(value: Any) -> Any:
    return value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _integer(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return int(value)


_COERCE: dict[str, Callable[[Any], Any]] = {
    # SQLite keeps what it is given: a REAL column may hold 5, an INTEGER one 5.0.
    "double precision": float, "real": float, "bigint": _integer, "integer": _integer,
    "smallint": _integer, "text": _text, "boolean": bool,
}
