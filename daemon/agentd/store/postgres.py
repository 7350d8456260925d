"""`PgStore`: agentd.db's data on a PostgreSQL database that several daemons share.

What it gives the parts that store, as `SqliteStore` does on one file:

- `write(op)`: `op` is a coroutine function of an asyncpg connection. The writes of a loop
  tick share one transaction (group commit, as on SQLite), and each write's future
  resolves once that transaction commits. One batch is in flight at a time, so a write
  submitted after another commits with it or after it. If one op of a batch raises, the
  batch is rolled back and each op runs again in a transaction of its own, so only the
  failing one fails: ops must act only on the connection (no side effect outside it).
- `join_batch`/`add_rider`/`request_flush`: writes sized when a batch is taken (acks,
  the event log), as on SQLite.
- `write_alone(op)`: a write run at once, in a transaction of its own, beside the batch in
  flight: for a write that no other write of the daemon needs before or after it (a claim
  takes committed rows; what depends on it waits for its result). One statement
  (`one_statement=True`) runs on a connection of its own that keeps PostgreSQL's generic
  plans and does not wait for the WAL flush (see `_ALONE_SETTINGS`).
- `last=`: a part of a write that runs at the end of its transaction, after every write's
  op (the `last` parts in their writes' order). For a statement that takes a row lock all
  daemons' transactions contend for (the event counter, agentd/postgres/events.py): it is
  then held only from that statement to the commit, and taken after every other lock of
  the transaction, so two transactions never take it and another row lock in opposite
  orders (a deadlock PostgreSQL breaks after `deadlock_timeout`, 1 s, and the batch then
  runs again one write at a time).
- `notify(channel, *payloads)`: within an op, notifications sent when its transaction
  commits, in the order given (PostgreSQL sends a repeated one once). They travel with the
  COMMIT in one round trip, so an op that notifies costs no round trip of its own.
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
from contextvars import ContextVar
from functools import partial
from typing import Any, NamedTuple, TypeAlias, TypeVar

import asyncpg

from agentd.config import StoreConfig, redact_url
from agentd.errors import StoreError, StoreUnavailableError, StoreWriteError, describe
from agentd.log import get_logger
from agentd.store.migrations import Migration, load

T = TypeVar("T")
PgConnection: TypeAlias = asyncpg.Connection
PgOp = Callable[[PgConnection], Awaitable[T]]


class _Write(NamedTuple):
    """A write waiting for its batch: its op, its future, its part run last in its
    transaction (or None), and its one-statement form (or None; see `PgStore.write`)."""

    op: PgOp[Any]
    future: asyncio.Future[Any]
    last: PgOp[Any] | None
    lone: PgOp[Any] | None


_Batch = list[_Write]

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


# The notifications (channel, payload) of the write transaction the current task is running.
_notices: ContextVar[list[tuple[str, str]] | None] = ContextVar("agentd_pg_notices", default=None)


def notify(channel: str, *payloads: str) -> None:
    """Send `payloads` on `channel` when the write transaction this op runs in commits
    (nothing if it rolls back). Only for ops run by `PgStore.write`/`join_batch`; `channel`
    is one of agentd's own names (a plain identifier), a payload any text without NUL
    under PostgreSQL's 8,000-byte limit."""
    pending = _notices.get()
    if pending is None:
        raise RuntimeError("notify() outside a PgStore write transaction")
    pending.extend((channel, payload) for payload in payloads)


def notify_sql(notices: list[tuple[str, str]]) -> str:
    """NOTIFY statements for `notices`, for one simple query (one round trip; alone, one
    transaction). A payload is a string literal; with `standard_conforming_strings` on (set
    for every session, see `_SESSION_SETTINGS`) doubling its quotes is all the quoting it
    needs."""
    return "; ".join(f"NOTIFY {channel}, '{payload.replace(chr(39), chr(39) * 2)}'"
                     for channel, payload in notices)


def _commit_sql(notices: list[tuple[str, str]]) -> str:
    """The transaction's notifications and its COMMIT, in one round trip."""
    return f"{notify_sql(notices)}; COMMIT" if notices else "COMMIT"


def load_migrations(folder: str = "sql/pg") -> list[Migration]:
    """PostgreSQL migrations (`agentd/<folder>/NNNN_*.sql`), by version: agentd.db's by
    default, memory's in `sql/pg_memory`."""
    return load(folder)


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

    def __init__(self, config: StoreConfig, *, migrations: list[Migration] | None = None,
                 version_table: str = "schema_version", setting: str = "[store] url",
                 settings: dict[str, str] | None = None, component: str = "store") -> None:
        """`migrations` are recorded in `version_table`, so two sets (the store's, memory's)
        may share a database; `setting` names the URL's configuration key in errors;
        `settings` are session settings of every connection, beside agentd's own;
        `component` tags its log lines, so memory's store is told from the task store."""
        self.config = config
        self.location = redact_url(config.url)
        self.schema_version = 0
        self._version_table = version_table
        self._setting = setting
        self._settings = {**_SESSION_SETTINGS, **(settings or {})}
        self.transactions = 0  # write transactions committed since open
        self.failure: StoreWriteError | None = None
        self._migrations = load_migrations() if migrations is None else migrations
        self._pool: asyncpg.Pool | None = None
        self._alone_pool: asyncpg.Pool | None = None  # one of `pool_size`, for `write_alone`
        self._pending: _Batch = []
        self._riders: list[Callable[[], None]] = []
        self._flush_scheduled = False
        self._riders_called = False
        self._flushing: asyncio.Task[None] | None = None
        self._alone: set[asyncio.Task[None]] = set()  # `write_alone`s in flight
        self._prober: asyncio.Task[None] | None = None
        self._reported: StoreWriteError | None = None
        self._channels: dict[str, list[Callable[[str], None]]] = {}
        self._reconnect_callbacks: list[Callable[[], None]] = []
        self._listener_session: list[tuple[str, tuple[Any, ...]]] = []  # see `on_listener_open`
        self._listener: PgConnection | None = None
        self._adding: set[asyncio.Task[None]] = set()  # LISTENs added to the open connection
        self._listener_busy = asyncio.Lock()  # held by each statement on that connection
        self.listening = asyncio.Event()  # set while the listening connection is open
        self._log = get_logger(component)

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
            self._pool = await self._create_pool(self.config.pool_size - 1, self._settings)
            await self._pool.release(await self._pool.acquire())  # min_size 0 connects nothing
            self._alone_pool = await self._create_pool(1, {**self._settings, **_ALONE_SETTINGS})
        except Exception as exc:
            for pool in (self._pool, self._alone_pool):
                if pool is not None:
                    pool.terminate()
            self._pool = self._alone_pool = None
            raise StoreError(f"{self._setting} {self.location}: cannot connect to PostgreSQL: "
                             f"{type(exc).__name__}: {exc}") from None
        try:
            self.schema_version = await self._migrate()
        except BaseException:
            await self.close()
            raise
        self._log.info("store.opened", url=self.location, schema=self.schema_version,
                       driver="asyncpg", pool_size=self.config.pool_size)

    async def _create_pool(self, size: int, settings: dict[str, str]) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            # min_size 0: no background reconnects (and their warnings) while the server is away.
            self.config.url, min_size=0, max_size=size,
            command_timeout=_COMMAND_TIMEOUT, timeout=_CONNECT_TIMEOUT,
            server_settings=settings, reset=_keep_session, max_inactive_connection_lifetime=300.0)

    async def close(self) -> None:
        """Commit what is pending, then close the listener and the pools."""
        if self._pool is None:
            return
        await self.finish()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), _COMMAND_TIMEOUT)
        pools = (self._pool, self._alone_pool)
        self._pool = self._alone_pool = None
        for pool in pools:
            if pool is None:
                continue
            try:
                await asyncio.wait_for(pool.close(), _COMMAND_TIMEOUT)
            except _UNAVAILABLE:
                pool.terminate()

    async def finish(self) -> None:
        """Write what is pending (riders' values included) and stop the write checks."""
        while self._alone:
            await asyncio.shield(asyncio.gather(*self._alone))
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
            table = self._version_table
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {table} ("
                " version integer PRIMARY KEY, name text NOT NULL, applied_at double precision NOT NULL)")
            current: int = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}")
            if current > latest:
                raise StoreError(f"{self._setting} {self.location}: database schema version {current} is "
                                 f"newer than this agentd knows ({latest}); run a newer agentd")
            for version, name, script in self._migrations:
                if version <= current:
                    continue
                try:
                    await conn.execute(script)
                except asyncpg.PostgresError as exc:
                    raise StoreError(f"{self._setting} {self.location}: migration {name} failed: "
                                     f"{exc}") from exc
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2, $3)",
                                   version, name, time.time())
        return max(current, latest)

    # -- writes ------------------------------------------------------------------------------

    def write(self, op: PgOp[T], *, last: PgOp[Any] | None = None,
              lone: PgOp[T] | None = None) -> asyncio.Future[T]:
        """Run `await op(connection)` in the next grouped transaction, and `await
        last(connection)` (if given) at the end of that transaction, after every write's op;
        resolve to op's result once committed. A write the server refuses or cannot take
        fails with a `StoreWriteError`; see the module docstring for the rest of the contract.

        `lone`: the same write as one statement (its notifications in it too), run instead
        of `op` when the write is alone in its batch, as a transaction of its own without
        BEGIN and COMMIT: one round trip where `op` in a transaction costs three. That is
        the path of a lone enqueue or claim on an idle daemon: its dispatch latency."""
        if self._pool is None:
            raise StoreError(f"{self.location}: the store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        if self._refuses(op, future):
            return future
        self._pending.append(_Write(op, future, last, lone))
        self.request_flush()
        return future

    def join_batch(self, op: PgOp[T], future: asyncio.Future[T] | None = None, *,
                   last: PgOp[Any] | None = None, lone: PgOp[T] | None = None) -> asyncio.Future[T]:
        """Like `write`, but only joins the next batch: it never starts one by itself."""
        if future is None:
            future = asyncio.get_running_loop().create_future()
        if self._refuses(op, future):
            return future
        self._pending.append(_Write(op, future, last, lone))
        return future

    def write_alone(self, op: PgOp[T], future: asyncio.Future[T] | None = None, *,
                    one_statement: bool) -> asyncio.Future[T]:
        """Run `op` now in a transaction of its own, beside the batch in flight rather than
        after it; resolve to its result. Only for a write whose effect no other write of this
        daemon must precede or follow (see the module docstring). `one_statement`: `op` runs
        one statement, which is then its own transaction, on the connection kept for those
        (generic plans, no wait for the WAL flush); else a pooled connection takes BEGIN,
        `op` and COMMIT. Failures as `write`'s."""
        if self._pool is None:
            raise StoreError(f"{self.location}: the store is closed")
        if future is None:
            future = asyncio.get_running_loop().create_future()
        if self._refuses(op, future):
            return future
        write = _Write(op, future, None, op)
        running = asyncio.get_running_loop().create_task(
            self._run_lone(write, alone=True) if one_statement else self._run_in_own_transaction(write),
            name="agentd-pg-alone")
        self._alone.add(running)
        running.add_done_callback(self._alone.discard)
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
                    for write in batch:
                        if not write.future.done():
                            write.future.set_exception(error)
                    if not isinstance(exc, Exception):
                        raise
                    self._log.error("store.flush_failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._flushing = None
            if self._pending and self._pool is not None:
                self.request_flush()

    async def _run_batch(self, batch: _Batch) -> None:
        live = [write for write in batch if not write.future.cancelled()]
        if not live:
            return
        live = self._checks_only_while_away(live)
        if not live:
            return
        if len(live) == 1 and live[0].lone is not None and live[0].last is None:
            await self._run_lone(live[0])
            return
        try:
            results = await self._transaction([(write.op, write.last) for write in live])
        except _OpFailedError:
            # One op raised: run each in its own transaction, so only the failing ones fail.
            for index, (op, future, last, _) in enumerate(live):
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
            for write in live:
                _settle(write.future, exc, None)
            self._server_away(exc, [])
            return
        for write, result in zip(live, results, strict=True):
            _settle(write.future, None, result)

    async def _run_in_own_transaction(self, write: _Write) -> None:
        try:
            (result,) = await self._transaction([(write.op, None)])
        except _OpFailedError as failed:
            _settle(write.future, failed.error, None)
        except StoreWriteError as exc:
            _settle(write.future, exc, None)
            self._server_away(exc, [])
        else:
            _settle(write.future, None, result)

    async def _run_lone(self, write: _Write, *, alone: bool = False) -> None:
        """Run a write's one-statement form on its own (see `write`): the statement is its
        own transaction (on the `write_alone` connection if `alone`). An error on the way
        back may follow its commit."""
        assert write.lone is not None
        for attempt in (1, 2):
            started = time.monotonic()
            try:
                async with self._checkout(alone=alone) as conn:
                    result = await write.lone(conn)
            except Exception as exc:
                if attempt == 1 and _stale(exc, started):
                    continue  # refused before it ran: once more, on a fresh connection
                error = unavailable(self.location, exc, committing=True)
                if error is None:
                    _settle(write.future, exc, None)
                    return
                _settle(write.future, error, None)
                self._server_away(error, [])
                return
            self.transactions += 1
            _settle(write.future, None, result)
            return

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
        for write in live:
            if write.op is not _write_check:
                _settle(write.future, away, None)
        return [write for write in live if write.op is _write_check]

    async def _transaction(self, ops: list[tuple[PgOp[Any], PgOp[Any] | None]]) -> list[Any]:
        """Run `ops` in one transaction, each write's op and then, at the end, their `last`
        parts; return the ops' results. Raise `_OpFailedError` if one raised (nothing stored)
        or the StoreWriteError of the server being away."""
        steps = [op for op, _ in ops] + [last for _, last in ops if last is not None]
        for attempt in (1, 2):
            started = time.monotonic()
            results: list[Any] = []
            notices: list[tuple[str, str]] = []
            committing = False
            try:
                async with self._checkout() as conn:
                    await conn.execute("BEGIN")
                    token = _notices.set(notices)
                    try:
                        for step in steps:
                            try:
                                results.append(await step(conn))
                            except Exception as exc:
                                if unavailable(self.location, exc) is not None:
                                    raise
                                raise _OpFailedError(exc) from exc
                    except _OpFailedError:
                        await conn.execute("ROLLBACK")
                        raise
                    finally:
                        _notices.reset(token)
                    committing = True
                    try:
                        await conn.execute(_commit_sql(notices))
                    except asyncpg.PostgresError:
                        # A statement of the COMMIT's query was refused: the rest did not
                        # run, and the transaction is left open and aborted.
                        await conn.execute("ROLLBACK")
                        raise
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
    async def _checkout(self, *, alone: bool = False) -> AsyncIterator[PgConnection]:
        """A pooled connection for one read or one write transaction (`write_alone`'s if
        `alone`): the checkout and all that is done with it within `_COMMAND_TIMEOUT`, or
        TimeoutError. A connection that met the server away (or the deadline) is closed, not
        given back: its state is unknown, and giving it back would wait on the server (a
        reset, a cancel request)."""
        pool = self._alone_pool if alone else self._pool
        if pool is None:
            raise StoreError(f"{self.location}: the store is closed")
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
        for write in unsent + waiting:
            _settle(write.future, fresh or error, None)

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
        """Rows of a query (`$1`-style placeholders) on a pooled connection. While the server
        is known away (see `_refuses`), StoreUnavailableError at once: a request answers 503
        at once rather than after the checkout's deadline."""
        if isinstance(self.failure, StoreUnavailableError):
            raise StoreUnavailableError(f"{self.location}: the PostgreSQL server is away (a write "
                                        "failed and no write check has passed since)")
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
            adding = asyncio.get_running_loop().create_task(self._add_listener(self._listener, channel))
            self._adding.add(adding)
            adding.add_done_callback(self._added)

    async def _add_listener(self, conn: PgConnection, channel: str) -> None:
        # One statement at a time on the listening connection: a LISTEN sent while another
        # (or the liveness check) is in flight is refused ("another operation is in
        # progress"), and the channel would go unheard until the next reconnect.
        async with self._listener_busy:
            await conn.add_listener(channel, self._dispatch)

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

    def on_listener_open(self, sql: str, *args: Any) -> None:
        """Run `sql` on the listening connection each time it opens, before the reconnect
        callbacks: session state that lives exactly as long as this daemon can hear
        notifications (an advisory lock that tells the other daemons so)."""
        self._listener_session.append((sql, args))

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        for callback in self._channels.get(channel, ()):
            try:
                callback(payload)
            except Exception as exc:
                self._log.error("store.listener_failed", channel=channel,
                                error=f"{type(exc).__name__}: {exc}")

    async def _until_writable(self, lost: asyncio.Future[None]) -> None:
        """Return once a write check passes (this one's or the prober's), at once if no
        write failed; ConnectionResetError if the listening connection is `lost` first."""
        while isinstance(self.failure, StoreUnavailableError) and not lost.done():
            with contextlib.suppress(StoreError):
                await self.check_writable()
            if isinstance(self.failure, StoreUnavailableError):
                await asyncio.wait([lost], timeout=_PROBE_INTERVAL)
        if lost.done():
            raise ConnectionResetError("the listening connection closed")

    async def _listen_to_all(self, conn: PgConnection, listened: set[str]) -> None:
        """LISTEN on `conn` to every channel asked for and not in `listened` (which it
        updates), those asked for while it awaits included."""
        while unheard := self._channels.keys() - listened:
            for channel in unheard:
                await conn.add_listener(channel, self._dispatch)
                listened.add(channel)

    async def run_listener(self) -> None:
        """Forever: keep one connection LISTENing on every channel asked for, re-opened with
        backoff whenever it breaks (a loop the daemon supervises)."""
        delay = _LISTEN_BACKOFF[0]
        while True:
            try:
                conn = await asyncpg.connect(self.config.url, timeout=_CONNECT_TIMEOUT,
                                             command_timeout=_COMMAND_TIMEOUT,
                                             server_settings=KEEPALIVE)
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
                listened: set[str] = set()
                await self._listen_to_all(conn, listened)
                # The callbacks below read to catch up, and reads fail at once while the
                # server is known away.
                await self._until_writable(lost)
                # After the LISTENs: the session state says this daemon hears notifications.
                for sql, args in self._listener_session:
                    await conn.execute(sql, *args)
                # `listen` adds a channel itself only once `_listener` is set: the channels
                # asked for during the awaits above are listened to here, with no await
                # between the last check and setting it.
                await self._listen_to_all(conn, listened)
                self._listener = conn
                self.listening.set()
                delay = _LISTEN_BACKOFF[0]
                for callback in self._reconnect_callbacks:
                    callback()
                # A frozen server keeps the socket open: a periodic query tells it apart.
                while not lost.done():
                    await asyncio.wait([lost], timeout=_COMMAND_TIMEOUT)
                    if not lost.done():
                        async with self._listener_busy:
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


# The server's TCP keepalives on a connection whose session state tells the other daemons
# this one lives (an advisory lock): a host that vanishes without closing its sockets loses
# the session within about 10 s (idle 5 s, then 5 probes 1 s apart), not the kernel's 2 h.
KEEPALIVE = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "1", "tcp_keepalives_count": "5"}
# Set when a connection opens (no round trip of its own). JIT compiling one of agentd's
# short statements costs more than running it. A plan per run (`force_custom_plan`): a
# prepared statement's generic plan (PostgreSQL's after five runs; asyncpg keeps statements
# prepared per connection) made while `tasks` was nearly empty seq-scanned it for good
# (pg_bench's auto_explain saw each ack read 20,000-40,000 rows).
_SESSION_SETTINGS = {"jit": "off", "plan_cache_mode": "force_custom_plan",
                     "standard_conforming_strings": "on",
                     "application_name": f"agentd-{os.getpid()}"}
# `write_alone`'s connection keeps generic plans: the claim's is right whatever the table
# held when it was made (its index matches its order and limit), and planning it each time
# is what is costly: its `run_at <= $2` made the planner probe the queue index's end through
# every entry the last claims left dead. On a queue of 60,000 a claim took 37 ms planned per
# run against 1 ms with its generic plan, and pg_bench's server CPU per task grew with the
# table (228 us at 40,000 tasks, 81 us with generic plans).
# Its commits do not wait for the WAL to reach the disk: a claim lost with the server's
# crash leaves its tasks queued, to run again (at least once, as after a daemon's crash; the
# late acknowledgement of a run is then dropped), and a claim is no write anyone was told
# had been stored. Waiting for the flush was the claims' largest wait in pg_bench.
_ALONE_SETTINGS = {**_SESSION_SETTINGS, "plan_cache_mode": "auto", "synchronous_commit": "off"}


async def _keep_session(conn: PgConnection) -> None:
    """A pooled connection needs no reset when it goes back: agentd leaves no session state
    on one (its locks are transaction-level; LISTEN and the scheduler's session lock have
    connections of their own). asyncpg's default reset was a round trip per transaction."""
