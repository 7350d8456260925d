"""`agentd store copy`: an SQLite deployment's agentd.db, and its memory.db, copied into
PostgreSQL, so a user who outgrows one machine keeps their tasks, schedules, event log and
what their agents remembered.

The copy reads the SQLite files at rest: it takes their locks (`lock.py`) for its whole
run, so it refuses while a daemon owns them and no daemon starts on them meanwhile. The
targets are migrated first, then every row goes over in one transaction per database, in
batches of binary `COPY`: a failure anywhere leaves the targets as they were. Columns are
matched by name, the SQLite table's columns into the same-named PostgreSQL ones, so
columns only PostgreSQL has take their defaults. Ids are kept, and each identity is moved
past the largest id copied, so new rows never reuse one (event ids come from a counter row
on PostgreSQL, which each daemon moves past the stored events as it starts:
postgres/events.py).

Memory (memory.db: sessions, their messages, long-term memories and their history) goes
to the database of `[memory] url`, else to the target of agentd.db, into PgMemory's tables
(agentd/postgres/memory.py). The vectors go as they are, nothing is embedded again: the
vector column is typed with the dimension memory.db's `meta` records, and the embedder it
records is PgMemory's record too, so daemons with the same embedder recall the copied
memories at once (another one refuses to start until `agentd memory reembed`). The HNSW
index is built once, after the rows.

A superseded memory has no vector on SQLite (it left the index when its correction came):
its `embedding` stays NULL on PostgreSQL, and should its correction be forgotten, it is to
be embedded as it comes back (as SqliteMemory does; PgMemory otherwise keeps the vector it
has). Where two live memories of a namespace have the same text (SQLite allows it: an
expired memory the purge had not reached, or an update to another memory's text), the
oldest unexpired one keeps the text's key, so PgMemory finds it by its text, and the others
take a key of their own (`<hash>:expired:<id>`, as PgMemory gives an expired memory whose
text is remembered again, or `<hash>:duplicate:<id>`): PostgreSQL holds one live memory
per text and namespace.

With memory in another database than agentd.db's, the two transactions commit one after
the other, memory's first: should agentd.db's commit then fail, the memory target keeps
its copy, and a copy made again needs --force.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import struct
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from agentd.config import MemoryConfig, StoreConfig, redact_url
from agentd.errors import ConfigError, EmbedderError, StoreError, StoreLockedError
from agentd.store import driver
from agentd.store.lock import FileLock
from agentd.store.migrations import SCHEMA_VERSION, load
from agentd.store.postgres import PgStore, unavailable
from agentd.store.text import nul_at, storable_error

if TYPE_CHECKING:
    from agentd.postgres.memory import PgMemory

# agentd.db's tables in copy order (a task before its steps), with the order rows are read.
TABLES: dict[str, str] = {
    "meta": "key", "tasks": "id", "task_steps": "task_id, key",
    "task_waits": "task_id, seq", "schedules": "id",
    "digest_cursors": "name", "hook_deliveries": "hook, delivery_id", "events": "id",
    "task_rates": "name",
}
# The tables whose ids are identities on PostgreSQL.
IDENTITIES = ("tasks", "events")
# memory.db's tables by their names on PostgreSQL, in copy order, with their names in
# memory.db and the order rows are read (`memories` is read by `_MEMORIES_SQL`).
MEMORY_TABLES: dict[str, tuple[str, str]] = {
    "memory_sessions": ("sessions", "id"), "memory_messages": ("messages", "id"),
    "memories": ("memories", "id"), "memory_history": ("memory_history", "id"),
}
MEMORY_IDENTITIES = ("memory_messages", "memories", "memory_history")
MEMORY_SCHEMA_VERSION = load("sql/memory")[-1][0]
BATCH_ROWS = 5000
# Seconds one batch's COPY may take (PgStore's statements get 5 s; a batch is bigger).
_BATCH_TIMEOUT = 120.0
_MEMORY_COLUMNS = ["id", "namespace", "text", "metadata", "metadata_text", "hash", "created_at",
                   "updated_at", "expires_at", "supersedes", "superseded_by", "embedding"]
# memory.db's memories with the text key PgMemory's unique index takes (see the module
# docstring) and each live memory's vector (a float32 blob from {vectors}: memory_embeddings
# in a quantized layout, `[memory] quantization`, else the vec0 table), by id.
_MEMORIES_SQL = """
SELECT id, namespace, text, metadata, metadata AS metadata_text,
       CASE WHEN superseded_by IS NULL AND row_number() OVER live > 1
            THEN hash || CASE WHEN expires_at <= :now THEN ':expired:' ELSE ':duplicate:' END || id
            ELSE hash END AS hash,
       created_at, updated_at, expires_at, supersedes, superseded_by,
       (SELECT embedding FROM {vectors} v WHERE v.id = m.id) AS embedding
FROM memories m
WINDOW live AS (PARTITION BY namespace, hash, superseded_by IS NULL
                ORDER BY expires_at IS NOT NULL AND expires_at <= :now, id)
ORDER BY id
"""


@dataclass
class MemoryCopyReport:
    """What the copy of memory.db did: rows per table (PostgreSQL's names), where from and
    to (the URL without password), and the embedder its vectors were made with."""

    source: Path
    target: str
    embedder: str
    dimension: int
    rows: dict[str, int] = field(default_factory=dict)


@dataclass
class CopyReport:
    """What a copy did: rows per table, and where from and to (the URL without password);
    `memory` is None when there was no memory.db to copy."""

    source: Path
    target: str
    rows: dict[str, int] = field(default_factory=dict)
    replaced: dict[str, int] = field(default_factory=dict)  # rows --force deleted from the targets
    memory: MemoryCopyReport | None = None
    seconds: float = 0.0


class TargetNotEmptyError(StoreError):
    """The target database already holds agentd data (and --force was not given)."""


@dataclass(frozen=True)
class MemorySource:
    """memory.db and where it goes: `path` (`[memory] path`; a missing file is no memory
    to copy), `config` (`[memory]`: its url, the HNSW index's settings) and `engine`,
    PgMemory, whose code types the vector column and builds the index (given by the
    caller: postgres/ is a layer above store/)."""

    path: Path
    config: MemoryConfig
    engine: type[PgMemory]


@dataclass
class _RecordedEmbedder:
    """The embedder memory.db's vectors were made with, as its `meta` table records it:
    what PgMemory needs to type the vector column and record what made the vectors. The
    copy moves the vectors as they are, so nothing is embedded with it."""

    id: str
    dimension: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise EmbedderError(f"{self.id}: agentd store copy moves stored vectors; it embeds nothing")


@dataclass
class _OpenMemory:
    """memory.db, locked and open for reading, with the embedder its `meta` records, and
    the PgMemory of its target (not opened: its store is opened once, to migrate)."""

    path: Path
    conn: sqlite3.Connection
    embedder: _RecordedEmbedder
    target: PgMemory
    url: str


async def copy_to_postgres(source: Path, url: str, *, memory: MemorySource | None = None,
                           force: bool = False, batch_rows: int = BATCH_ROWS) -> CopyReport:
    """Copy agentd.db at `source` into the PostgreSQL database at `url`, and memory.db
    (when `memory` is given and its file exists) into the database of `[memory] url`, else
    into `url`.

    Args:
        source: the SQLite file (a stopped daemon's `[store] path`).
        url: a `postgresql://` URL; the database must exist (it is migrated here).
        memory: the daemon's memory.db and where it goes.
        force: replace the agentd data the targets hold instead of refusing.
        batch_rows: rows per COPY.

    Raises:
        ConfigError: `url` is not a PostgreSQL URL.
        StoreLockedError: a daemon runs on `source` or on memory.db.
        TargetNotEmptyError: a target holds agentd data and `force` is False.
        StoreError: a source or a target cannot be read or written; nothing was copied.
    """
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"--to: expected a postgresql:// URL, got {redact_url(url)!r}")
    sources = _take_sources(source, memory, url)
    try:
        return await _copy(sources, url, force=force, batch_rows=batch_rows)
    finally:
        sources.held.close()


@dataclass
class _Sources:
    """agentd.db and (if there is one) memory.db, locked and open for reading; `held`
    releases them."""

    path: Path
    conn: sqlite3.Connection
    memory: _OpenMemory | None
    held: contextlib.ExitStack


def _take_sources(source: Path, memory: MemorySource | None, url: str) -> _Sources:
    if not source.is_file():
        raise StoreError(f"{source}: no such database file: nothing to copy (is this the "
                         "configuration of the deployment to copy? --config names it)")
    held = contextlib.ExitStack()
    try:
        held.callback(_take_lock(source, "[store] path").release)
        conn = _open_source(source)
        held.callback(conn.close)
        opened = None
        if memory is not None and memory.path.is_file():
            held.callback(_take_lock(memory.path, "[memory] path").release)
            opened = _open_memory(memory, url)
            held.callback(opened.conn.close)
    except BaseException:
        held.close()
        raise
    return _Sources(source, conn, opened, held)


def _take_lock(path: Path, setting: str) -> FileLock:
    """Lock `path` for this process, as a daemon on it would."""
    lock = FileLock(path, setting)
    try:
        lock.acquire()
    except StoreLockedError as exc:
        holder = lock.path.read_text().strip() or "unknown"
        raise StoreLockedError(f"{path} is in use by a running agentd (pid {holder}): stop the "
                               "daemon first; the copy reads the file at rest") from exc
    return lock


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


def _open_memory(memory: MemorySource, store_url: str) -> _OpenMemory:
    """memory.db opened for reading in one snapshot, with sqlite-vec (its vectors are in a
    vec0 table), and the embedder it records."""
    path, config = memory.path, memory.config
    try:
        conn = driver.connect(path, StoreConfig())
    except driver.Error as exc:
        raise StoreError(f"{path}: cannot read it as agentd's memory: {exc}") from exc
    try:
        conn.execute("PRAGMA query_only = ON")
        version = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        meta = {row[0]: row[1] for row in conn.execute("SELECT key, value FROM meta")}
    except driver.Error as exc:
        conn.close()
        raise StoreError(f"{path}: cannot read it as agentd's memory: {exc}") from exc
    if version > MEMORY_SCHEMA_VERSION:
        conn.close()
        raise StoreError(f"{path}: memory schema version {version} is newer than this agentd "
                         f"knows ({MEMORY_SCHEMA_VERSION}); copy it with a newer agentd")
    if "embedder" not in meta or "dimension" not in meta:
        conn.close()
        raise StoreError(f"{path} records no embedder (no daemon finished opening it): start the "
                         "daemon on it once, or move it away to copy agentd.db alone")
    conn.execute("BEGIN")  # one snapshot for the whole copy
    embedder = _RecordedEmbedder(meta["embedder"], int(meta["dimension"]))
    url = config.url or store_url
    setting = "[memory] url" if config.url else "[store] url"  # as the store target's errors say
    # Two connections, as the copy's own target store: the copy writes on one of its own.
    # No RAM index: the copy writes, it does not recall.
    target = memory.engine(replace(config, pool_size=2, ram_index=False), url, embedder, setting=setting)
    return _OpenMemory(path, conn, embedder, target, url)


class _Progress:
    """The table being copied, for a failure's message."""

    table = "(none yet)"


async def _copy(sources: _Sources, url: str, *, force: bool, batch_rows: int) -> CopyReport:
    report = CopyReport(sources.path, redact_url(url))
    started = time.monotonic()
    target = PgStore(StoreConfig(url=url, pool_size=2))
    await target.open()  # migrates; raises StoreError naming the URL
    await target.close()
    memory = sources.memory
    if memory is not None:
        await memory.target.open(check_embedder=False)  # migrates memory's tables
        await memory.target.close()
        report.memory = MemoryCopyReport(memory.path, memory.target.location, memory.embedder.id,
                                         memory.embedder.dimension)
    progress = _Progress()
    async with contextlib.AsyncExitStack() as connections:
        conn = await _connect(url, report.target)
        connections.push_async_callback(_close, conn)
        memory_conn = conn
        if memory is not None and memory.url != url:
            memory_conn = await _connect(memory.url, memory.target.location)
            connections.push_async_callback(_close, memory_conn)
        try:
            async with contextlib.AsyncExitStack() as transactions:
                # Memory's transaction (if its own) commits first: see the module docstring.
                await transactions.enter_async_context(conn.transaction())
                if memory_conn is not conn:
                    await transactions.enter_async_context(memory_conn.transaction())
                report.replaced = await _make_room(conn, memory_conn, report, force)
                for table, order in TABLES.items():
                    progress.table = table
                    report.rows[table] = await _copy_table(sources.conn, conn, table, table,
                                                           order=order, batch_rows=batch_rows)
                for table in IDENTITIES:
                    await _move_identity(sources.conn, table, conn, table)
                if memory is not None and report.memory is not None:
                    await _copy_memory(memory, memory_conn, report.memory, progress, batch_rows)
        except StoreError:
            raise
        except Exception as exc:
            if isinstance(exc, _UnstorableRowsError):
                cause = str(exc)
            elif (away := unavailable(report.target, exc)) is not None:
                cause = str(away)
            else:
                cause = f"{type(exc).__name__}: {exc}"
            where = report.target
            if report.memory is not None and report.memory.target != report.target:
                where += f" and {report.memory.target}"
            raise StoreError(f"the copy failed in table {progress.table} ({cause}); it was rolled "
                             f"back: the target {where} holds nothing of it") from exc
    report.seconds = time.monotonic() - started
    return report


async def _copy_memory(memory: _OpenMemory, conn: asyncpg.Connection, report: MemoryCopyReport,
                       progress: _Progress, batch_rows: int) -> None:
    """memory.db's rows and vectors into memory's target, within the caller's transaction."""
    progress.table = "memory_meta"
    await _type_vectors(conn, memory)
    for table, (name, order) in MEMORY_TABLES.items():
        progress.table = table
        if table == "memories":
            report.rows[table] = await _copy_memories(memory.conn, conn, batch_rows)
        else:
            report.rows[table] = await _copy_table(memory.conn, conn, name, table, order=order,
                                                     batch_rows=batch_rows)
    for table in MEMORY_IDENTITIES:
        await _move_identity(memory.conn, MEMORY_TABLES[table][0], conn, table)
    progress.table = "memories (building its vector index)"
    await memory.target._build_index(conn)


async def _connect(url: str, where: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(url, timeout=10.0)
    except Exception as exc:
        raise StoreError(f"{where}: cannot connect to PostgreSQL: "
                         f"{type(exc).__name__}: {exc}") from None


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=5.0)
    except Exception:
        conn.terminate()


async def _make_room(conn: asyncpg.Connection, memory_conn: asyncpg.Connection,
                     report: CopyReport, force: bool) -> dict[str, int]:
    """Refuse targets that hold agentd data, or with `force` delete that data; agentd.db's
    meta rows are only replaced key by key (in `_copy_table`), memory's record of its
    embedder as the vectors are typed (`_type_vectors`)."""
    places = [(conn, report.target, [table for table in TABLES if table != "meta"])]
    if report.memory is not None:
        places.append((memory_conn, report.memory.target, list(MEMORY_TABLES)))
    held: dict[str, dict[str, int]] = {}
    for place, where, tables in places:
        for table in tables:
            count: int = await place.fetchval(f"SELECT count(*) FROM {table}")
            if count:
                held.setdefault(where, {})[table] = count
    if held and not force:
        listed = "; ".join(f"{where} already holds agentd data (" +
                           ", ".join(f"{count} {table}" for table, count in tables_held.items()) + ")"
                           for where, tables_held in held.items())
        raise TargetNotEmptyError(
            f"{listed}: refusing to mix two deployments. Copy into an empty database, or give "
            "--force to delete that data and replace it")
    for place, where, tables in places:
        if where in held:
            await place.execute(f"TRUNCATE {', '.join(tables)}")
    return {table: count for tables_held in held.values() for table, count in tables_held.items()}


async def _copy_table(sqlite: sqlite3.Connection, conn: asyncpg.Connection, source: str,
                      table: str, *, order: str, batch_rows: int) -> int:
    """Copy the SQLite table `source` into the PostgreSQL table `table`, column by name."""
    columns = [row[1] for row in sqlite.execute(f"PRAGMA table_info({source})")]
    if not columns:
        return 0  # an old file without this table
    types = await _column_types(conn, table, columns)
    coerce = _coercions(table, columns, types)
    read = _Read(f"SELECT {', '.join(columns)} FROM {source} ORDER BY {order}", {}, columns,
                 types, coerce)
    cursor = sqlite.execute(read.select)
    copied = 0
    with _explained(sqlite, source, read):
        while rows := cursor.fetchmany(batch_rows):
            records = [_record(coerce, row) for row in rows]
            if table == "meta":  # the source's keys (the stream key first) win
                await conn.execute("DELETE FROM meta WHERE key = any($1::text[])", [r[0] for r in records])
            await conn.copy_records_to_table(table, records=records, columns=columns,
                                             timeout=_BATCH_TIMEOUT)
            copied += len(records)
    return copied


async def _copy_memories(sqlite: sqlite3.Connection, conn: asyncpg.Connection,
                         batch_rows: int) -> int:
    """Copy memory.db's memories with their vectors, in one COPY: a memory and its
    correction name each other (`supersedes`, `superseded_by`), and PostgreSQL checks such
    references at the end of each statement."""
    count: int = sqlite.execute("SELECT count(*) FROM memories").fetchone()[0]
    types = await _column_types(conn, "memories", _MEMORY_COLUMNS)
    coerce = _coercions("memories", _MEMORY_COLUMNS, types)
    quantized = sqlite.execute("SELECT 1 FROM sqlite_master WHERE name = 'memory_embeddings'").fetchone()
    vectors = "memory_embeddings" if quantized else "memory_vectors"
    read = _Read(_MEMORIES_SQL.format(vectors=vectors), {"now": time.time()}, _MEMORY_COLUMNS,
                 types, coerce)
    cursor = sqlite.execute(read.select, read.params)

    def records() -> Iterator[tuple[Any, ...]]:
        while rows := cursor.fetchmany(batch_rows):
            for row in rows:
                yield _record(coerce, row)

    with _explained(sqlite, "memories", read):
        await conn.copy_records_to_table(
            "memories", records=records(), columns=_MEMORY_COLUMNS,
            timeout=_BATCH_TIMEOUT * max(1, math.ceil(count / batch_rows)))
    return count


async def _type_vectors(conn: asyncpg.Connection, memory: _OpenMemory) -> None:
    """Type the vector column with memory.db's dimension and record its embedder, as
    PgMemory does at a first open. The record is locked first: a daemon opening the target
    meanwhile reads it once the copy commits, and finds it, rather than finding none and
    typing the column again (which would drop the vectors). The index is dropped until the
    rows are in: one build after them costs less than keeping it up row by row. The
    connection then sends the vec0 blobs to the column in pgvector's binary form."""
    await conn.execute("LOCK TABLE memory_meta IN ACCESS EXCLUSIVE MODE")
    await memory.target._create_vectors(conn, {"embedder": memory.embedder.id,
                                               "dimension": str(memory.embedder.dimension)})
    await conn.execute("DROP INDEX memories_embedding")
    schema = await conn.fetchval(
        "SELECT typnamespace::regnamespace::text FROM pg_type WHERE oid = 'vector'::regtype")
    await conn.set_type_codec("vector", schema=schema, encoder=_pgvector_binary, decoder=bytes,
                              format="binary")


def _pgvector_binary(blob: bytes) -> bytes:
    """A vec0 vector (float32s in the machine's byte order) in pgvector's binary form: the
    dimension and a reserved word (16 bits each), then the float32s, all big-endian."""
    values = array("f", blob)
    if sys.byteorder == "little":
        values.byteswap()
    return struct.pack(">HH", len(values), 0) + values.tobytes()


async def _column_types(conn: asyncpg.Connection, table: str, columns: list[str]) -> dict[str, str]:
    """The PostgreSQL type of each of `columns` of `table`, or StoreError naming those the
    target lacks."""
    types = {row["column_name"]: row["data_type"] for row in await conn.fetch(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = $1", table)}
    missing = [column for column in columns if column not in types]
    if missing:
        raise StoreError(f"table {table}: the target has no column {', '.join(missing)}: its "
                         "schema does not match this agentd's")
    return types


def _coercions(table: str, columns: list[str], types: dict[str, str]) -> list[Callable[[Any], Any]]:
    """How each of `columns` of SQLite's is made what its PostgreSQL column takes: its
    type, and the text PostgreSQL's own store would have written there."""
    coerce = []
    for column in columns:
        convert = _COERCE.get(types[column], _same)
        if (table, column) == ("tasks", "error"):
            convert = _stored_error
        coerce.append(convert)
    return coerce


@dataclass(frozen=True)
class _Read:
    """How the copy reads a SQLite table: the query and its parameters, the columns it
    gives (a row's key first), their PostgreSQL types, and how each value is converted."""

    select: str
    params: dict[str, Any]
    columns: list[str]
    types: dict[str, str]
    coerce: list[Callable[[Any], Any]]


class _UnstorableRowsError(Exception):
    """Rows the target refused, named by where they are in the SQLite file."""


@contextlib.contextmanager
def _explained(sqlite: sqlite3.Connection, source: str, read: _Read) -> Iterator[None]:
    """Turn a refused copy of `source` into an `_UnstorableRowsError` naming the rows that
    hold U+0000, which PostgreSQL's text and jsonb cannot: agentd refuses such text now,
    but an older one kept it on SQLite, and asyncpg's error names no row. A failure with
    no such row is left as it is."""
    try:
        yield
    except asyncpg.DataError as exc:  # what PostgreSQL says of a value (class 22), no other
        found = _rows_holding_nul(sqlite, read)
        if not found:
            raise
        more = " and more" if len(found) > _ROWS_NAMED else ""
        raise _UnstorableRowsError(
            f"{source} {', '.join(found[:_ROWS_NAMED])}{more} hold U+0000 (NUL), which "
            "PostgreSQL cannot store: take it out of the SQLite file (with the daemon on it, "
            "correct or forget such memories through the API; this agentd refuses NUL) and "
            "copy again") from exc


_ROWS_NAMED = 3


def _rows_holding_nul(sqlite: sqlite3.Connection, read: _Read) -> list[str]:
    """The rows `read` gives (as `id 12 (text)`, by its first column) with a value the
    target refuses for U+0000: a NUL in text, or in a string or key of jsonb; the first
    `_ROWS_NAMED` and one more, to say whether there are more."""
    found: list[str] = []
    for row in sqlite.execute(read.select, read.params):
        record = _record(read.coerce, row)
        holding = [column for column, value in zip(read.columns, record, strict=True)
                   if isinstance(value, str) and _holds_nul(value, read.types[column] == "jsonb")]
        if holding:
            found.append(f"{read.columns[0]} {record[0]!r} ({', '.join(holding)})")
            if len(found) > _ROWS_NAMED:
                break
    return found


def _holds_nul(text: str, is_json: bool) -> bool:
    if "\x00" in text:
        return True
    # JSON writes a NUL as \u0000; a backslash then "u0000" shows the same six characters.
    if not is_json or "\\u0000" not in text:
        return False
    try:
        return nul_at(json.loads(text)) is not None
    except ValueError:
        return False


def _record(coerce: list[Callable[[Any], Any]], row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(None if value is None else convert(value)
                 for convert, value in zip(coerce, row, strict=True))


async def _move_identity(sqlite: sqlite3.Connection, source: str, conn: asyncpg.Connection,
                         table: str) -> None:
    """Make the next id of `table` larger than any its SQLite table `source` has had: its
    largest row, or AUTOINCREMENT's record of ids handed out (a deleted task's id is never
    reused)."""
    highest = sqlite.execute(f"SELECT coalesce(max(id), 0) FROM {source}").fetchone()[0]
    # sqlite_sequence exists only once an AUTOINCREMENT table has had a row.
    with contextlib.suppress(sqlite3.OperationalError, driver.driver.OperationalError):
        sequence = sqlite.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (source,)).fetchone()
        highest = max(highest, sequence[0] if sequence else 0)
    if highest > 0:
        await conn.execute("SELECT setval(pg_get_serial_sequence($1, 'id'), $2)", table, highest)


def _same(value: Any) -> Any:
    return value


def _stored_error(value: Any) -> str:
    return storable_error(_text(value))


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
