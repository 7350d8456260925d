"""`PgStore`: agentd.db's data on a PostgreSQL database that several daemons share.

What it gives the parts that store, as `SqliteStore` does on one file:

- `write(op)`: `op` is a coroutine function of an asyncpg connection. The writes of a loop
  tick share one transaction (group commit, as on SQLite), and each write's future
  resolves once that transaction commits. One batch is in flight at a time, so a write
  submitted after another commits with it or after it. If one op of a batch raises, the
  batch is rolled back and each op runs again in a transaction of its own, so only the
  failing one fails: ops must act only on the connection (no side effect outside it).
- `join_batch`/`add_rider`/`request_flush`: writes sized when a batch is taken (acks,
  claims, the event log), as on SQLite.
- `last=`: a part of a write that runs at the end of its transaction, after every write's
  op (the `last` parts in their writes' order). For a statement that takes a row lock all
  daemons' transactions contend for (the event counter, agentd/postgres/events.py): it is
  then held only from that statement to the commit, and taken after every other lock of
  the transaction, so two transactions never take it and another row lock in opposite
  orders (a deadlock PostgreSQL breaks after `deadlock_timeout`, 1 s, and the batch then
  runs again one write at a time).
- `read(sql, params)`: a query on a pooled connection. Statements use asyncpg's `$1`
  placeholders; each part keeps its PostgreSQL statements beside its SQLite ones.
- `listen(channel, callback)`: notifications, on one connection outside the pool that is
  re-opened whenever it breaks (`run_listener`, a loop the daemon supervises);
  `on_reconnect` callbacks run after each re-open, since notifications sent meanwhile are
  lost and whoever relies on them must catch up from the tables.

Failures. A server that cannot be reached, refuses connections or does not answer fails
the write or read with `StoreUnavailableError` (HTTP 503) within `_COMMAND_TIMEOUT`, one
deadline for a checkout and all that is done with it, instead of hanging (a frozen server
keeps its sockets open: only the deadline tells). A connection that met the server away is
closed, not given back to the pool (giving it back would wait on the server); one found
dead at once (the server restarted while it sat in the pool) is replaced and the statement
tried once more, since nothing was committed on it. A COMMIT that got no answer is
reported as such: the write may have been stored. Once a write failed so, `failure` holds
the error and the server counts as away: writes fail at once (the writes waiting behind the
failed batch, and the riders' too) rather than each waiting out the deadline, while only
the write checks try the server (the writer's once a second, `/readyz`'s); the first that
commits clears `failure`. So the daemon reports not ready while the database is away,
answers 503 at once, and recovers by itself.

The schema is `agentd/sql/pg/NNNN_*.sql`, applied once each under a transaction-level
advisory lock, so daemons started together migrate once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from importlib import resources
from typing import Any, TypeAlias, TypeVar

import asyncpg

from agentd.config import StoreConfig, redact_url
from agentd.errors import StoreError, StoreUnavailableError, StoreWriteError, describe
from agentd.log import get_logger

T = TypeVar("T")
PgConnection: TypeAlias = asyncpg.Connection
PgOp = Callable[[PgConnection], Awaitable[T]]
# A write: its op, its future, and its part run last in its transaction (or None).
_Batch = list[tuple[PgOp[Any], asyncio.Future[Any], PgOp[Any] | None]]

# Seconds a statement, a connection or a pool checkout may take before the server counts
# as away: HTTP requests answer 503 within it rather than hang while PostgreSQL is frozen.
_COMMAND_TIMEOUT = 5.0
_CONNECT_TIMEOUT = 5.0
_PROBE_INTERVAL = 1.0
# A connection that fails this soon after its checkout was dead in the pool: the statement
# is tried once more on a fresh one (nothing was committed on the dead one).
_STALE_WITHIN = 1.0
# Seconds between attempts to re-open the listening connection, doubling up to the last.
_LISTEN_BACKOFF = (0.1, 5.0)
_MAX_OPS_PER_TRANSACTION = 512
# Any transaction-level advisory lock key agentd's migrations take: "agentd" in ASCII.
_MIGRATION_LOCK = 0x6167656E7464
# The errors that mean the server is away rather than that a statement was wrong.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncio.TimeoutError, asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
    asyncpg.InsufficientResourcesError, asyncpg.OperatorInterventionError,
    asyncpg.ReadOnlySQLTransactionError,
    # A pooled connection the server ended (a fast shutdown's message arriving while it was
    # idle) can be left mid-protocol: asyncpg refuses the next statement with this.
    asyncpg.InternalClientError,
)

Migration = tuple[int, str, str]


def load_migrations() -> list[Migration]:
    """agentd.db's PostgreSQL migrations (`agentd/sql/pg/NNNN_*.sql`), by version."""
    found = []
    for entry in resources.files("agentd").joinpath("sql/pg").iterdir():
        if entry.name.endswith(".sql") and entry.name[:4].isdigit():
            found.append((int(entry.name[:4]), entry.name, entry.read_text()))
    return sorted(found)


def unavailable(where: str, exc: BaseException, *, committing: bool = False) -> StoreUnavailableError | None:
    """The `StoreUnavailableError` `exc` stands for, or None if it is not the server being
    away (a constraint, a bug in a statement). `committing`: `exc` came while the COMMIT was
    in flight, so whether the write was stored is not known."""
    if not isinstance(exc, _UNAVAILABLE):
        return None
    cause = "did not answer in time" if isinstance(exc, TimeoutError) else "cannot be reached"
    stored = ("the COMMIT got no answer: the write may have been stored" if committing
              else "nothing of this write was stored")
    error = StoreUnavailableError(f"{where}: the PostgreSQL server {cause}; {stored} "
                                  f"({type(exc).__name__}: {exc})")
    error.__cause__ = exc
    return error


class PgStore:
    """agentd.db on PostgreSQL: a bounded asyncpg pool, grouped write transactions, reads,
    and one listening connection. `location` (the URL without its password) names it in
    logs and errors."""

    def __init__(self, config: StoreConfig, *, migrations: list[Migration] | None = None) -> None:
        self.config = config
        self.location = redact_url(config.url)
        self.schema_version = 0
        self.transactions = 0  # write transactions committed since open
        self.failure: StoreWriteError | None = None
        self._migrations = load_migrations() if migrations is None else migrations
        self._pool: asyncpg.Pool | None = None
        self._pending: _Batch = []
        self._riders: list[Callable[[], None]] = []
        self._flush_scheduled = False
        self._riders_called = False
        self._flushing: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._reported: StoreWriteError | None = None
        self._channels: dict[str, list[Callable[[str], None]]] = {}
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._listener: PgConnection | None = None
        self._adding: set[asyncio.Task[None]] = set()  # LISTENs added to the open connection
        self.listening = asyncio.Event()  # set while the listening connection is open
        self._log = get_logger("store")

    @property
    def closed(self) -> bool:
        return self._pool is None

    @property
    def name(self) -> str:
        return "postgresql"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the pool and migrate. Raises StoreError (naming the URL, not its password)."""
        try:
            self._pool = await asyncpg.create_pool(
                # min_size 0: no background reconnects (and their warnings) while the server is away.
                self.config.url, min_size=0, max_size=self.config.pool_size,
                command_timeout=_COMMAND_TIMEOUT, timeout=_CONNECT_TIMEOUT,
                server_settings=_SESSION_SETTINGS, reset=_keep_session,
                max_inactive_connection_lifetime=300.0)
            await self._pool.release(await self._pool.acquire())  # min_size 0 connects nothing
        except Exception as exc:
            if self._pool is not None:
                self._pool.terminate()
                self._pool = None
            raise StoreError(f"[store] url {self.location}: cannot connect to PostgreSQL: "
                             f"{type(exc).__name__}: {exc}") from None
        try:
            self.schema_version = await self._migrate()
        except BaseException:
            await self.close()
            raise
        self._log.info("store.opened", url=self.location, schema=self.schema_version,
                       driver="asyncpg", pool_size=self.config.pool_size)

    async def close(self) -> None:
        """Commit what is pending, then close the listener and the pool."""
        if self._pool is None:
            return
        await self.finish()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), _COMMAND_TIMEOUT)
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), _COMMAND_TIMEOUT)
        except _UNAVAILABLE:
            pool.terminate()

    async def finish(self) -> None:
        """Write what is pending (riders' values included) and stop the write checks."""
        while self._flushing is not None or self._pending or self._flush_scheduled:
            if self._flushing is None:
                self._flush_scheduled = False
                self._start_flushing()
            assert self._flushing is not None
            await asyncio.shield(self._flushing)
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober

    async def _migrate(self) -> int:
        assert self._pool is not None
        latest = self._migrations[-1][0] if self._migrations else 0
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at double precision NOT NULL)")
            current: int = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            if current > latest:
                raise StoreError(f"[store] url {self.location}: database schema version {current} is "
                                 f"newer than this agentd knows ({latest}); run a newer agentd")
            for version, name, script in self._migrations:
                if version <= current:
                    continue
                try:
                    await conn.execute(script)
                except asyncpg.PostgresError as exc:
                    raise StoreError(f"[store] url {self.location}: migration {name} failed: "
                                     f"{exc}") from exc
                await conn.execute("INSERT INTO schema_version VALUES ($1, $2, $3)",
                                   version, name, time.time())
        return max(current, latest)

    # -- writes ------------------------------------------------------------------------------

    def write(self, op: PgOp[T], *, last: PgOp[Any] | None = None) -> asyncio.Future[T]:
        """Run `await op(connection)` in the next grouped transaction, and `await
        last(connection)` (if given) at the end of that transaction, after every write's op;
        resolve to op's result once committed. A write the server refuses or cannot take
        fails with a `StoreWriteError`; see the module docstring for the rest of the contract."""
        if self._pool is None:
            raise StoreError(f"{self.location}: the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._refuses(op, future):
            return future
        self._pending.append((op, future, last))
        self.request_flush()
        return future

    def join_batch(self, op: PgOp[T], future: asyncio.Future[T] | None = None, *,
                   last: PgOp[Any] | None = None) -> asyncio.Future[T]:
        """Like `write`, but only joins the next batch: it never starts one by itself."""
        if future is None:
            future = asyncio.get_running_loop().create_future()
        if self._refuses(op, future):
            return future
        self._pending.append((op, future, last))
        return future

    def add_rider(self, rider: Callable[[], None]) -> None:
        """Call `rider()` just before each batch is taken, to `join_batch` writes of its own."""
        self._riders.append(rider)

    def request_flush(self) -> None:
        """Make sure a batch is taken soon. Two ticks later at the earliest: writes made by
        callbacks that this tick's writes wake up still join the same transaction."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop = asyncio.get_running_loop()
            loop.call_soon(loop.call_soon, self._flush_soon)
        if isinstance(self.failure, StoreUnavailableError) and not self._riders_called:
            # Known away: the riders' writes are refused now (see `_refuses`), not when the
            # batch in flight (a write check waiting out the deadline) has ended. Called
            # soon, not here: a caller may add its write to its rider after asking.
            self._riders_called = True
            asyncio.get_running_loop().call_soon(self._call_riders)

    def _call_riders(self) -> None:
        self._riders_called = False
        if isinstance(self.failure, StoreUnavailableError):
            for rider in self._riders:
                rider()

    def _flush_soon(self) -> None:
        if self._flushing is None:
            self._flush_scheduled = False
            self._start_flushing()
        # else: the running flush takes the next batch when its own commits.

    def _start_flushing(self) -> None:
        self._flushing = asyncio.get_running_loop().create_task(self._flush_all(), name="agentd-pg-writer")

    def _take_batch(self) -> _Batch:
        for rider in self._riders:
            rider()
        batch = self._pending[:_MAX_OPS_PER_TRANSACTION]
        del self._pending[:_MAX_OPS_PER_TRANSACTION]
        return batch

    async def _flush_all(self) -> None:
        """Take batches until none is left: one transaction at a time."""
        try:
            while True:
                self._flush_scheduled = False
                batch = self._take_batch()
                if not batch:
                    return
                try:
                    await self._run_batch(batch)
                except BaseException as exc:
                    error = exc if isinstance(exc, StoreError) else StoreError(
                        f"{self.location}: the write failed: {type(exc).__name__}: {exc}")
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    self._log.error("store.flush_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._flushing = None
            if self._pending and self._pool is not None:
                self.request_flush()

    async def _run_batch(self, batch: _Batch) -> None:
        live = [write for write in batch if not write[1].cancelled()]
        if not live:
            return
        live = self._checks_only_while_away(live)
        if not live:
            return
        try:
            results = await self._transaction([(op, last) for op, _, last in live])
        except _OpFailedError:
            # One op raised: run each in its own transaction, so only the failing ones fail.
            for index, (op, future, last) in enumerate(live):
                try:
                    (result,) = await self._transaction([(op, last)])
                except _OpFailedError as failed:
                    _settle(future, failed.error, None)
                except StoreWriteError as exc:
                    _settle(future, exc, None)
                    self._server_away(exc, live[index + 1:])
                    return
                else:
                    _settle(future, None, result)
            return
        except StoreWriteError as exc:
            for _, future, _ in live:
                _settle(future, exc, None)
            self._server_away(exc, [])
            return
        for (_, future, _), result in zip(live, results, strict=True):
            _settle(future, None, result)

    def _refuses(self, op: PgOp[Any], future: asyncio.Future[Any]) -> bool:
        """While the server is known away (a write failed and no write check has passed
        since), fail a write at once, not after the batch in flight (a write check waiting
        out the deadline, most of the time): a request answers 503 at once. Only the write
        checks (the prober's each second, /readyz's) try the server, and end this once one
        commits."""
        if op is _write_check or not isinstance(self.failure, StoreUnavailableError):
            return False
        future.set_exception(self._away())
        return True

    def _away(self) -> StoreUnavailableError:
        return StoreUnavailableError(f"{self.location}: the PostgreSQL server is away (a write "
                                     "failed and no write check has passed since); nothing of "
                                     "this write was stored")

    def _checks_only_while_away(self, live: _Batch) -> _Batch:
        """`live` without the writes `_refuses` would refuse now (they are failed)."""
        if not isinstance(self.failure, StoreUnavailableError):
            return live
        away = self._away()
        for op, future, _ in live:
            if op is not _write_check:
                _settle(future, away, None)
        return [write for write in live if write[0] is _write_check]

    async def _transaction(self, ops: list[tuple[PgOp[Any], PgOp[Any] | None]]) -> list[Any]:
        """Run `ops` in one transaction, each write's op and then, at the end, their `last`
        parts; return the ops' results. Raise `_OpFailedError` if one raised (nothing stored)
        or the StoreWriteError of the server being away."""
        steps = [op for op, _ in ops] + [last for _, last in ops if last is not None]
        for attempt in (1, 2):
            started = time.monotonic()
            results: list[Any] = []
            committing = False
            try:
                async with self._checkout() as conn:
                    transaction = conn.transaction()
                    await transaction.start()
                    try:
                        for step in steps:
                            try:
                                results.append(await step(conn))
                            except Exception as exc:
                                if unavailable(self.location, exc) is not None:
                                    raise
                                raise _OpFailedError(exc) from exc
                    except _OpFailedError:
                        await transaction.rollback()
                        raise
                    committing = True
                    await transaction.commit()
            except _OpFailedError:
                raise
            except Exception as exc:
                if attempt == 1 and not committing and _stale(exc, started):
                    continue  # nothing was committed on it: once more, on a fresh connection
                error = unavailable(self.location, exc, committing=committing)
                if error is None:
                    raise
                raise error from exc
            self.transactions += 1
            return results[:len(ops)]
        raise AssertionError("not reached")

    @contextlib.asynccontextmanager
    async def _checkout(self) -> AsyncIterator[PgConnection]:
        """A pooled connection for one read or one write transaction: the checkout and all
        that is done with it within `_COMMAND_TIMEOUT`, or TimeoutError. A connection that
        met the server away (or the deadline) is closed, not given back: its state is
        unknown, and giving it back would wait on the server (a reset, a cancel request)."""
        if self._pool is None:
            raise StoreError(f"{self.location}: the store is closed")
        pool = self._pool
        async with asyncio.timeout(_COMMAND_TIMEOUT):
            conn = await pool.acquire()
            try:
                yield conn
            except BaseException as exc:
                if isinstance(exc, (*_UNAVAILABLE, asyncio.CancelledError)):
                    # (A connection the server closed asyncpg has already given back.)
                    with contextlib.suppress(asyncpg.InterfaceError):
                        conn.terminate()
                raise
            finally:
                await pool.release(conn)

    def _server_away(self, error: StoreWriteError, unsent: _Batch) -> None:
        """A transaction failed for the server: record it, and fail `unsent` and the writes
        waiting for the next batch at once (nothing of them was sent) rather than let each
        wait out another deadline, so a request answers within one `_COMMAND_TIMEOUT` while
        the server is away."""
        self._failed(error)
        waiting, self._pending = self._pending, []
        fresh = unavailable(self.location, error.__cause__) if error.__cause__ is not None else None
        for _, future, _ in unsent + waiting:
            _settle(future, fresh or error, None)

    def _failed(self, error: StoreWriteError) -> None:
        self.failure = error
        if self._reported is None:
            self._reported = error
            self._log.error("store.writes_failing", url=self.location, error=str(error),
                            code=error.code)
        if self._prober is None and self._pool is not None:
            self._prober = asyncio.get_running_loop().create_task(self._check_until_writable())

    async def check_writable(self) -> None:
        """Raise StoreWriteError unless a write commits now; clear `failure` when one does."""
        await self.write(_write_check)
        self.failure = None
        if self._reported is not None:
            self._reported = None
            self._log.info("store.writes_recovered", url=self.location)

    async def _check_until_writable(self) -> None:
        try:
            while self.failure is not None and self._pool is not None:
                await asyncio.sleep(_PROBE_INTERVAL)
                with contextlib.suppress(StoreError):
                    await self.check_writable()
        finally:
            self._prober = None

    # -- reads -------------------------------------------------------------------------------

    async def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[asyncpg.Record]:
        """Rows of a query (`$1`-style placeholders) on a pooled connection."""
        started = time.monotonic()
        try:
            try:
                async with self._checkout() as conn:
                    rows: list[asyncpg.Record] = await conn.fetch(sql, *params)
                    return rows
            except Exception as exc:
                if not _stale(exc, started):
                    raise
            async with self._checkout() as conn:  # once more, on a fresh connection
                rows = await conn.fetch(sql, *params)
                return rows
        except Exception as exc:
            error = unavailable(self.location, exc)
            if error is None:
                raise
            raise error from exc

    async def read_one(self, sql: str, params: tuple[Any, ...] = ()) -> asyncpg.Record | None:
        """The first row of `read(sql, params)`, or None."""
        rows = await self.read(sql, params)
        return rows[0] if rows else None

    # -- notifications -----------------------------------------------------------------------

    def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call `callback(payload)` for each notification on `channel` (from any daemon,
        this one included), once `run_listener` has the connection open."""
        self._channels.setdefault(channel, []).append(callback)
        if self._listener is not None and len(self._channels[channel]) == 1:
            adding = asyncio.get_running_loop().create_task(
                self._listener.add_listener(channel, self._dispatch))
            self._adding.add(adding)
            adding.add_done_callback(self._added)

    def _added(self, adding: asyncio.Task[None]) -> None:
        self._adding.discard(adding)
        error = None if adding.cancelled() else adding.exception()
        if error is not None:
            # The connection broke: its replacement listens to every channel asked for.
            self._log.warning("store.listen_failed", url=self.location, error=describe(error))

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call `callback()` each time the listening connection is (re-)opened: notifications
        sent while it was away are lost, so the caller catches up from its table."""
        self._reconnect_callbacks.append(callback)

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        for callback in self._channels.get(channel, ()):
            try:
                callback(payload)
            except Exception as exc:
                self._log.error("store.listener_failed", channel=channel,
                                error=f"{type(exc).__name__}: {exc}")

    async def run_listener(self) -> None:
        """Forever: keep one connection LISTENing on every channel asked for, re-opened with
        backoff whenever it breaks (a loop the daemon supervises)."""
        delay = _LISTEN_BACKOFF[0]
        while True:
            try:
                conn = await asyncpg.connect(self.config.url, timeout=_CONNECT_TIMEOUT,
                                             command_timeout=_COMMAND_TIMEOUT)
            except Exception as exc:
                if unavailable(self.location, exc) is None and not isinstance(exc, asyncpg.PostgresError):
                    raise
                self._log.warning("store.listen_failed", url=self.location,
                                  error=f"{type(exc).__name__}: {exc}", retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LISTEN_BACKOFF[1])
                continue
            lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            conn.add_termination_listener(partial(_mark_lost, lost))
            try:
                # Channels asked for while these awaits run are listened to as well.
                listened: set[str] = set()
                while unheard := self._channels.keys() - listened:
                    for channel in unheard:
                        await conn.add_listener(channel, self._dispatch)
                        listened.add(channel)
                self._listener = conn
                self.listening.set()
                delay = _LISTEN_BACKOFF[0]
                for callback in self._reconnect_callbacks:
                    callback()
                # A frozen server keeps the socket open: a periodic query tells it apart.
                while not lost.done():
                    await asyncio.wait([lost], timeout=_COMMAND_TIMEOUT)
                    if not lost.done():
                        await conn.fetchval("SELECT 1", timeout=_COMMAND_TIMEOUT)
            except Exception as exc:
                if unavailable(self.location, exc) is None:
                    raise
            finally:
                self.listening.clear()
                self._listener = None
                conn.terminate()
            self._log.warning("store.listen_lost", url=self.location)

    # -- maintenance and figures -------------------------------------------------------------

    async def maintain(self) -> dict[str, int]:
        """Nothing to do: PostgreSQL's autovacuum reclaims space."""
        return {}

    async def stats(self, tables: tuple[str, ...]) -> dict[str, int | str | None]:
        """The database's size, the row count of each of `tables`, and the current write
        failure's code (None while writes commit)."""
        size = await self.read_one("SELECT pg_database_size(current_database()) AS bytes")
        out: dict[str, int | str | None] = {
            "write_failure": None if self.failure is None else self.failure.code,
            "transactions": self.transactions,
            "bytes": size["bytes"] if size is not None else 0,
        }
        for table in tables:
            counted = await self.read_one(f"SELECT count(*) AS n FROM {table}")
            out[f"{table}_rows"] = counted["n"] if counted is not None else 0
        return out

    def describe(self) -> dict[str, Any]:
        """What `/v1/status` shows of the store."""
        return {"engine": "postgresql", "url": self.location, "schema_version": self.schema_version,
                "pool_size": self.config.pool_size, "listening": self.listening.is_set()}


class _OpFailedError(Exception):
    """An op of a batch raised `error`; the transaction was rolled back."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _stale(exc: BaseException, started: float) -> bool:
    """Whether `exc` is a pooled connection found dead at once (the server restarted or ended
    its session while it sat in the pool), worth one more try on a fresh connection."""
    return (isinstance(exc, (asyncpg.ConnectionDoesNotExistError, asyncpg.InternalClientError))
            and time.monotonic() - started < _STALE_WITHIN)


def _mark_lost(lost: asyncio.Future[None], _conn: object) -> None:
    if not lost.done():
        lost.set_result(None)


def _settle(future: asyncio.Future[Any], error: BaseException | None, result: Any) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def _write_check(conn: PgConnection) -> None:
    await conn.execute("INSERT INTO meta (key, value) VALUES ('last_write_check', $1) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", str(time.time()))


# Set when a connection opens (no round trip of its own). JIT compiling one of agentd's
# short statements costs more than running it. A generic plan is made for a prepared
# statement after five runs, and asyncpg keeps statements prepared per connection: one made
# while `tasks` was nearly empty seq-scanned it for good (pg_bench's auto_explain saw each
# ack read 20,000-40,000 rows); a custom plan per run costs tens of microseconds.
_SESSION_SETTINGS = {"jit": "off", "plan_cache_mode": "force_custom_plan",
                     "application_name": f"agentd-{os.getpid()}"}


async def _keep_session(conn: PgConnection) -> None:
    """A pooled connection needs no reset when it goes back: agentd leaves no session state
    on one (its locks are transaction-level; LISTEN and the scheduler's session lock have
    connections of their own). asyncpg's default reset was a round trip per transaction."""
