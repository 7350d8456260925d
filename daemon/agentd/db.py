"""The SQLite file: driver choice, pragmas, sqlite-vec, migrations, the lock and the one writer.

Drivers. sqlite-vec is a loadable extension and many Python builds (pyenv, some macOS) ship
a `sqlite3` that cannot load extensions. The driver of a store that needs extensions
(memory.db) is picked once, in this order: `sqlean` (a dependency, wheels everywhere) → the
stdlib when it can load extensions → `pysqlite3`. A store that needs none (the queue's and
the event log's agentd.db) uses the stdlib `sqlite3` when its SQLite has RETURNING (3.35):
its statements cost half of sqlean's in Python overhead (0.7 µs against 1.5 µs to execute
one, measured), a sixth of the instructions a no-op task takes. Catch `Error` from this
module (either driver's errors); rows of both drivers are read the same way.

Writes. Every write is a synchronous function of the write connection, handed to
`Store.write`. Writes submitted in the same event-loop tick share one transaction (group
commit), so the cost of a commit is paid once per batch, not once per task; while every
tick brings more writes, the batch waits up to `_MAX_DEFERRED_TICKS` more ticks for them.
Riders (`add_rider`) add writes sized at the moment a batch is taken: the event log, the
acks (`BatchedWrite`), the workers' claims. With
`synchronous = "normal"` a WAL commit does not fsync, so batches run on the loop itself:
a thread hop costs 0.3 to 0.5 ms on the reference machine, more than the commit. With
`synchronous = "full"` the fsync can take milliseconds, so batches run in a writer thread.

Reads that are not part of a write go through an aiosqlite connection, off the loop.

Failed writes. A write the storage refuses (a full disk or `max_page_count`, an I/O error,
a read-only file, a lock held past busy_timeout) fails with a `StoreWriteError` naming the
cause, and nothing of it is stored; the store keeps running and the same write succeeds
once the cause is gone. `failure` is the last such error until a write check
(`check_writable`, a write that needs room) commits: the store runs one every
`_PROBE_INTERVAL` s while writes fail, and logs when they start failing and recover.

Checkpoints. The writer never checkpoints (`wal_autocheckpoint = 0`): a checkpoint fsyncs
and would stall the loop for milliseconds. `run_checkpoints` copies the WAL back into the
database from the reader connection, in its thread, once the WAL has grown.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import aiosqlite
import sqlite_vec

from agentd.config import StoreConfig
from agentd.errors import (
    StoreBusyError,
    StoreError,
    StoreFullError,
    StoreIOError,
    StoreLockedError,
    StoreReadOnlyError,
    StoreWriteError,
)
from agentd.log import get_logger

T = TypeVar("T")
V = TypeVar("V")
R = TypeVar("R")
Connection = sqlite3.Connection  # the driver's connection class has the same interface
WriteOp = Callable[[Connection], T]

_MAX_OPS_PER_TRANSACTION = 512
# Seconds between the store's own write checks while its writes fail.
_PROBE_INTERVAL = 1.0
# Ticks a flush may wait past the first two while every tick brings more writes.
_MAX_DEFERRED_TICKS = 6


def _pick_driver() -> ModuleType:
    try:
        import sqlean

        module: ModuleType = sqlean
        return module
    except ImportError:
        pass
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import pysqlite3.dbapi2

        fallback: ModuleType = pysqlite3.dbapi2
        return fallback
    except ImportError as exc:
        raise ImportError(
            "agentd needs an SQLite driver that can load extensions: "
            "pip install sqlean.py (or pysqlite3-binary)"
        ) from exc


driver: ModuleType = _pick_driver()
plain_driver: ModuleType = sqlite3 if sqlite3.sqlite_version_info >= (3, 35) else driver


def _bind_null(value: None) -> None:
    return value


# Parameters that are not exactly int, float, str or bytearray take the driver's adaptation
# path: with no adapter registered for their type it builds two AttributeErrors (an
# `__adapt__` and a `__conform__` lookup) before binding the value as it is. A queued task
# binds four Nones (timeout, key, parent, correlation) and its event row one: that was 3 %
# of a no-op task's instructions. Registered adapters are found by one dict lookup and bind
# exactly what the fallback bound: None as NULL, a bool as its integer.
for _module in {sqlite3, driver}:
    _module.register_adapter(type(None), _bind_null)
    _module.register_adapter(bool, int)
if TYPE_CHECKING:
    Row = sqlite3.Row
else:
    Row = driver.Row
Error: tuple[type[Exception], ...] = (driver.Error, sqlite3.Error)
IntegrityError: tuple[type[Exception], ...] = (driver.IntegrityError, sqlite3.IntegrityError)


WAL_SIZE_LIMIT = 64 << 20  # bytes of WAL file kept after a checkpoint resets it

# The storage failures a write can meet, by SQLite's primary result code (the low byte of
# the extended code the driver reports), and what each tells the client.
_WRITE_ERRORS: dict[int, tuple[type[StoreWriteError], str]] = {
    5: (StoreBusyError, "the database stayed locked by another connection past busy_timeout_ms"),
    6: (StoreBusyError, "the database stayed locked by another connection past busy_timeout_ms"),
    8: (StoreReadOnlyError, "the database files cannot be written (permissions, a read-only mount)"),
    10: (StoreIOError, "the disk failed a read or a write of the database files"),
    13: (StoreFullError, "the disk (or the database's max_page_count) is full"),
}
# The same causes by SQLite's message, for errors that come without a code: sqlite-vec
# reports a failed write of its own as an error of its own that quotes SQLite's message.
_WRITE_MESSAGES = {"database is locked": 5, "attempt to write a readonly database": 8,
                   "disk I/O error": 10, "database or disk is full": 13}


def connect(path: Path, config: StoreConfig, extensions: bool = True) -> Connection:
    """Open `path` with WAL, busy_timeout, foreign keys and the configured durability, and
    sqlite-vec unless `extensions` is False (then on `plain_driver`).

    The connection is in autocommit mode: callers write `BEGIN`/`COMMIT` themselves.
    """
    module = driver if extensions else plain_driver
    conn: Connection = module.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.row_factory = module.Row
    if extensions:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    conn.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout_ms)}")
    if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        # Only a new, empty file can take this, and only before WAL mode writes its first
        # page (after, it is silently ignored): it lets maintenance hand free pages back.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {config.synchronous.upper()}")
    conn.execute("PRAGMA foreign_keys = ON")
    # Checkpoints reuse the WAL file from its start but never shrink it: without a limit a
    # burst of writes (bulk remember()) leaves hundreds of MB on disk until the next
    # TRUNCATE. With one, SQLite cuts the file back to 64 MB each time it is reset.
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    return conn


def _migrations(folder: str = "sql") -> list[tuple[int, str, str]]:
    found = []
    for entry in resources.files("agentd").joinpath(folder).iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text()))
    return sorted(found)


MIGRATIONS = _migrations()
SCHEMA_VERSION = MIGRATIONS[-1][0] if MIGRATIONS else 0


def migrate(conn: Connection, path: Path, migrations: list[tuple[int, str, str]] | None = None) -> int:
    """Apply the numbered `sql/NNNN_*.sql` files not yet recorded; return the schema version.

    Raises:
        StoreError: the database was written by a newer agentd.
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


class _FileLock:
    """An exclusive `flock` on `<database>.lock`, holding the owner's pid for the error message."""

    def __init__(self, database: Path, setting: str) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._setting = setting
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"{self.path.with_suffix('')} is in use by another agentd process (pid {holder}); "
                f"stop it or set a different {self._setting}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Store:
    """The daemon's database: one owner process, one writer connection, and `readers`
    reader connections (each its own thread: SQLite runs queries without the GIL, so two
    readers use two cores for slow reads such as vector searches). `setting` is the
    agentd.toml key that names `path`, for error messages."""

    def __init__(self, path: Path, config: StoreConfig, *, migrations: str = "sql",
                 writes_in_thread: bool = False, readers: int = 1, extensions: bool = True,
                 setting: str = "[store] path") -> None:
        self.path = path
        self.config = config
        self.extensions = extensions
        self._migrations = MIGRATIONS if migrations == "sql" else _migrations(migrations)
        # Slow writes (sqlite-vec inserts) go to the writer thread whatever the durability.
        self._writes_in_thread = writes_in_thread
        self.schema_version = 0
        self._log = get_logger("store")
        self._lock = _FileLock(path, setting)
        self._conn: Connection | None = None
        self._reader_count = max(1, readers)
        self._readers: list[aiosqlite.Connection] = []
        self._reads_in_flight: list[int] = []
        self._pending: list[tuple[WriteOp[Any], asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._executor: ThreadPoolExecutor | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._riders: list[Callable[[], None]] = []
        self.transactions = 0  # write transactions committed since open: how well writes group
        # The storage error of the last failed transaction, None once a write check commits
        # (set by the writer, read on the loop). Not any commit: on a full disk the writes
        # that fit in pages the file has commit while the rest fail.
        self.failure: StoreWriteError | None = None
        self._reported: StoreWriteError | None = None  # the failure last logged
        self._prober: asyncio.Task[None] | None = None
        self._submitted = 0  # writes and batched values handed in: tells a quiet tick

    async def open(self) -> None:
        """Take the lock, open the connections and migrate. Raises StoreError."""
        try:
            # Private from the start (0700, 0600), whatever the umask: the database holds
            # task arguments, results and the stream tokens' signing key.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite's -wal/-shm copy its mode
        except OSError as exc:
            raise StoreError(f"cannot create the data directory {self.path.parent}: {exc}") from exc
        self._lock.acquire()
        try:
            self._conn = connect(self.path, self.config, self.extensions)
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self.schema_version = migrate(self._conn, self.path, self._migrations)
            for _ in range(self._reader_count):
                reader = aiosqlite.Connection(lambda: connect(self.path, self.config, self.extensions),
                                              iter_chunk_size=256)
                await reader
                self._readers.append(reader)
                self._reads_in_flight.append(0)
        except BaseException:
            await self.close()
            raise
        if self.config.synchronous == "full" or self._writes_in_thread:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="agentd-writer")
        self._log.info("store.opened", path=str(self.path), schema=self.schema_version,
                       driver=(driver if self.extensions else plain_driver).__name__,
                       synchronous=self.config.synchronous)

    async def close(self) -> None:
        """Finish pending writes, then close the connections and release the lock."""
        if self._flushing is not None:
            await self._flushing
        for rider in self._riders:  # values riders hold join the last batch
            rider()
        if self._executor is not None:
            await self._flush_threaded()
        while self._pending and self._executor is None:
            self._flush_inline()
        if self._prober is not None:  # after the last writes: their failure may start one
            self._prober.cancel()
        readers, self._readers, self._reads_in_flight = self._readers, [], []
        for reader in readers:
            await reader.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._lock.release()

    @property
    def closed(self) -> bool:
        """Whether `close` has run: writes are refused with a StoreError."""
        return self._conn is None

    def write(self, op: WriteOp[T]) -> asyncio.Future[T]:
        """Run `op(connection)` inside a grouped write transaction; resolve to its return value.

        The future resolves after the transaction commits. `op` must act only on the
        connection: if another op of its batch fails, the batch is rolled back and each op
        is run again in a transaction of its own, so only the failing one fails. A write
        the storage refuses fails with a `StoreWriteError` (see the module docstring).
        """
        if self._conn is None:
            raise StoreError(f"{self.path}: the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self.request_flush()
        return future

    def request_flush(self) -> None:
        """Make sure a batch is taken soon, for a rider with writes to add (riders add
        theirs when a batch is taken, so a rider alone would otherwise wait for a write)."""
        self._submitted += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            if self._executor is None:
                # Two ticks at least: writes made by callbacks that this tick's writes wake
                # up (a worker claiming after an ack) still join the same transaction.
                loop = asyncio.get_running_loop()
                loop.call_soon(loop.call_soon, self._flush_when_quiet, _MAX_DEFERRED_TICKS,
                               self._submitted)
            elif self._flushing is None:
                self._flushing = asyncio.get_running_loop().create_task(self._flush_threaded())

    async def read(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Row]:
        """Rows of a read-only query, run off the event loop on the least busy reader."""
        if not self._readers:
            raise StoreError(f"{self.path}: the store is closed")
        index = self._reads_in_flight.index(min(self._reads_in_flight))
        reader = self._readers[index]
        self._reads_in_flight[index] += 1
        try:
            return list(await reader.execute_fetchall(sql, params))
        finally:
            if index < len(self._reads_in_flight) and self._readers[index] is reader:
                self._reads_in_flight[index] -= 1

    async def read_one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Row | None:
        rows = await self.read(sql, params)
        return rows[0] if rows else None

    async def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Run `PRAGMA wal_checkpoint(mode)` off the loop: (busy, WAL pages, pages copied)."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(f"unknown checkpoint mode {mode!r}")
        row = await self.read_one(f"PRAGMA wal_checkpoint({mode})")
        return (row[0], row[1], row[2]) if row is not None else (0, 0, 0)

    async def run_checkpoints(self, interval: float = 1.0, wal_limit: int = 4 << 20) -> None:
        """Forever: every `interval` s, checkpoint once the WAL file is past `wal_limit` bytes.

        PASSIVE never waits, so under writes that never pause it never catches up and the
        WAL only grows (786 MB after 100,000 bulk remember()s). For a store of slow writes
        (`writes_in_thread`: memory.db), past WAL_SIZE_LIMIT it runs a RESTART checkpoint
        instead, which holds the writer thread (up to busy_timeout) and makes the next write
        start the WAL over, cut back to WAL_SIZE_LIMIT. The queue's store stays PASSIVE:
        holding its writer would hold claims and acks (up to a second, measured), so its
        WAL is bounded by `maintain()`'s TRUNCATE.

        A checkpoint that fails (the database file cannot grow on a full disk) is logged
        once and tried again every `interval` s: the WAL keeps its pages meanwhile."""
        wal = self.path.with_name(self.path.name + "-wal")
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                size = wal.stat().st_size
            except FileNotFoundError:
                continue
            if size > WAL_SIZE_LIMIT and self._writes_in_thread:
                mode = "RESTART"
            elif size > wal_limit:
                mode = "PASSIVE"
            else:
                continue
            try:
                await self.checkpoint(mode)
            except Error as exc:
                if not failing:
                    self._log.error("store.checkpoint_failed", path=str(self.path), error=str(exc))
                failing = True
                continue
            if failing:
                self._log.warning("store.checkpoint_recovered", path=str(self.path))
                failing = False

    async def maintain(self) -> dict[str, int]:
        """Fold the WAL into the database and truncate it, and give free pages back to the
        file system; return what it did."""
        busy, wal_pages, copied = await self.checkpoint("TRUNCATE")
        freed = await self.write(_incremental_vacuum)
        return {"checkpoint_busy": busy, "wal_pages": wal_pages, "pages_copied": copied,
                "pages_freed": freed}

    async def stats(self, tables: tuple[str, ...]) -> dict[str, int | str | None]:
        """The database's size on disk, the row count of each table in `tables`, and the
        code of the storage failure writes meet now (None while they commit)."""
        row = await self.read_one(
            "SELECT (SELECT page_count FROM pragma_page_count) AS pages, "
            "(SELECT page_size FROM pragma_page_size) AS page_size, "
            "(SELECT freelist_count FROM pragma_freelist_count) AS free")
        wal = self.path.with_name(self.path.name + "-wal")
        out: dict[str, int | str | None] = {
            "write_failure": None if self.failure is None else self.failure.code,
            "transactions": self.transactions,
            "bytes": row["pages"] * row["page_size"] if row is not None else 0,
            "free_pages": row["free"] if row is not None else 0,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        }
        for table in tables:
            counted = await self.read_one(f"SELECT count(*) AS n FROM {table}")
            out[f"{table}_rows"] = counted["n"] if counted is not None else 0
        return out

    async def check_writable(self) -> None:
        """Raise StoreError (`StoreWriteError` naming the cause) unless a write that needs
        room commits now. The check takes two pages and gives them back in its transaction:
        a write that only rewrites pages the file has commits on a full disk while every
        insert fails."""
        await self.write(_write_check)
        self.failure = None
        self._report()

    def add_rider(self, rider: Callable[[], None]) -> None:
        """Call `rider()` just before each batch is taken, so it can add writes of its own
        with `join_batch` that share the batch's transaction instead of making their own."""
        self._riders.append(rider)

    def join_batch(self, op: WriteOp[T], future: asyncio.Future[T] | None = None) -> asyncio.Future[T]:
        """Like `write`, but only joins the next batch: it never starts one by itself.
        `future`, when given, is the one resolved (a rider that handed it out earlier)."""
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        return future

    def _take_batch(self) -> list[tuple[WriteOp[Any], asyncio.Future[Any]]]:
        for rider in self._riders:
            rider()
        batch = self._pending[:_MAX_OPS_PER_TRANSACTION]
        del self._pending[:_MAX_OPS_PER_TRANSACTION]
        return batch

    def _flush_when_quiet(self, ticks_left: int, submitted: int) -> None:
        """Flush once a tick passes without a new write, or after `ticks_left` more ticks:
        while writes keep coming (tasks handed freed slots finish one tick after another)
        they share the transaction instead of each tick paying for a commit."""
        if self._submitted != submitted and ticks_left > 0:
            asyncio.get_running_loop().call_soon(
                self._flush_when_quiet, ticks_left - 1, self._submitted)
            return
        self._flush_inline()

    def _flush_inline(self) -> None:
        self._flush_scheduled = False
        batch = self._take_batch()
        if self._pending:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_inline)
        _settle(batch, self._run_batch([op for op, _ in batch]))
        self._report()

    async def _flush_threaded(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._flush_scheduled = False
                batch = self._take_batch()  # riders add theirs here: `_pending` may be empty before
                if not batch:
                    break
                outcomes = await loop.run_in_executor(
                    self._executor, self._run_batch, [op for op, _ in batch]
                )
                _settle(batch, outcomes)
                self._report()
                # One turn of the loop before the next batch is taken: those woken by this
                # one act first (a claim loop counts what it claimed before the riders size
                # the next claims against the same limits).
                await asyncio.sleep(0)
        finally:
            self._flush_scheduled = False
            self._flushing = None

    def _run_batch(self, ops: list[WriteOp[Any]]) -> list[tuple[bool, Any]]:
        """Each op's outcome, (True, its result) or (False, its error); never raises: a
        batch's futures are settled whatever happens to it."""
        conn = self._conn
        if not ops:
            return []
        if conn is None:
            return [(False, StoreError(f"{self.path}: the store is closed"))] * len(ops)
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [op(conn) for op in ops]
            conn.execute("COMMIT")
        except Exception as exc:
            error = self._write_error(exc) or exc
            if conn.in_transaction:  # SQLite rolls back by itself after some failures
                # A failing rollback (the disk gone) changes nothing: `exc` is the error.
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
            if isinstance(error, StoreWriteError):
                self.failure = error
            if len(ops) == 1 or isinstance(error, StoreBusyError):
                # Alone, each op would wait out busy_timeout again: they all fail with it.
                return [(False, error)] * len(ops)
        else:
            self.transactions += 1
            return [(True, result) for result in results]
        # One op failed the batch: run each alone so the others still commit (on a full
        # disk, the writes that need no new room).
        return [self._run_batch([op])[0] for op in ops]

    def _write_error(self, exc: Exception) -> StoreWriteError | None:
        """The `StoreWriteError` an SQLite error stands for, or None if it is not one."""
        if not isinstance(exc, Error):
            return None
        code: int | None = getattr(exc, "sqlite_errorcode", None)
        text = str(exc)
        if code is None or code & 0xFF not in _WRITE_ERRORS:
            code = next((c for message, c in _WRITE_MESSAGES.items() if message in text), None)
            if code is None:
                return None
        kind, cause = _WRITE_ERRORS[code & 0xFF]
        error = kind(f"{self.path}: {cause}; nothing of this write was stored (SQLite: {text})")
        error.__cause__ = exc
        return error

    def _report(self) -> None:
        """Log when writes start failing, change cause, and recover: once each, not once
        per write (on a full disk every write fails). Start checking for the recovery."""
        failure, reported = self.failure, self._reported
        if type(failure) is type(reported):
            return
        self._reported = failure
        if failure is None:
            self._log.warning("store.writes_recovered", path=str(self.path))
            return
        self._log.error("store.writes_failing", path=str(self.path), code=failure.code,
                        error=str(failure))
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(
                self._check_until_writable(), name=f"store-check:{self.path.name}")

    async def _check_until_writable(self) -> None:
        """While writes fail, run a write check every `_PROBE_INTERVAL` s: the first that
        commits clears `failure` (nothing else would once writes stop coming)."""
        try:
            while self.failure is not None and not self.closed:
                await asyncio.sleep(_PROBE_INTERVAL)
                with contextlib.suppress(StoreError):  # still failing: check again later
                    await self.check_writable()
        finally:
            self._prober = None


class BatchedWrite(Generic[V, R]):
    """Values added between two transactions, written by one op in the next one.

    For a statement run once per value at a high rate (a task's acknowledgement, a single
    enqueue): one `executemany` or multi-row statement per transaction costs a fraction of
    one `execute` per value. `write_values(conn, values)` returns one result per value (or
    an empty list when there are none to give). `add` returns a future shared by every
    value of the batch, resolved with those results once the batch commits or failed with
    the batch; `submit` awaits one value's own result. The values are taken on the event
    loop when the store takes its batch, so a writer thread never sees the list change."""

    def __init__(self, store: Store,
                 write_values: Callable[[Connection, list[V]], list[R]]) -> None:
        self._store = store
        self._write_values = write_values
        self._values: list[V] = []
        self._future: asyncio.Future[list[R]] | None = None
        store.add_rider(self._ride)

    def add(self, value: V) -> asyncio.Future[list[R]]:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        self._store.request_flush()
        self._values.append(value)
        return self._future

    async def submit(self, value: V) -> R:
        """Write `value` with its batch; return its own result."""
        position = len(self._values)
        return (await self.add(value))[position]

    def _ride(self) -> None:
        if self._future is None:
            return
        values, self._values = self._values, []
        future, self._future = self._future, None
        write_values = self._write_values
        self._store.join_batch(lambda conn: write_values(conn, values), future)


def execute_rows(conn: Connection, template: str, row: str, rows: list[tuple[Any, ...]],
                 most: int = 256) -> None:
    """Run `template` with `{rows}` replaced by `row` (placeholders for one row, e.g.
    "(?,?,?)") once per row: several rows per statement, not a statement per row
    (`executemany` pays a statement run, its setup and a GIL release per row). Statements
    hold a power of two of rows, at most `most`, so a handful of statement texts serve every
    batch size (each compiled once and kept in the driver's statement cache)."""
    start = 0
    while start < len(rows):
        size = min(most, 1 << ((len(rows) - start).bit_length() - 1))
        chunk = rows[start:start + size]
        conn.execute(template.format(rows=",".join([row] * size)),
                     [value for values in chunk for value in values])
        start += size


def _write_check(conn: Connection) -> None:
    """`Store.check_writable`'s write: records the check, and takes two pages' worth of
    room (a row of zeros) that it gives back before it commits."""
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('last_write_check', ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(time.time()),))
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.execute("INSERT INTO meta(key, value) VALUES ('write_check_room', zeroblob(?))",
                 (2 * page_size,))
    conn.execute("DELETE FROM meta WHERE key = 'write_check_room'")


def _incremental_vacuum(conn: Connection) -> int:
    before = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    conn.execute("PRAGMA incremental_vacuum").fetchall()
    return before - int(conn.execute("PRAGMA freelist_count").fetchone()[0])


def _settle(
    batch: list[tuple[WriteOp[Any], asyncio.Future[Any]]], outcomes: list[tuple[bool, Any]]
) -> None:
    for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
