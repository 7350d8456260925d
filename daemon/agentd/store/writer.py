"""The one writer: every write of a store goes through one connection, in grouped
transactions.

Every write is a synchronous function of the write connection, handed to `Writer.write`.
Writes submitted in the same event-loop tick share one transaction (group commit), so the
cost of a commit is paid once per batch, not once per task; while every tick brings more
writes, the batch waits up to `_MAX_DEFERRED_TICKS` more ticks for them. Riders
(`add_rider`) add writes sized at the moment a batch is taken: the event log, the acks
(`BatchedWrite`), the workers' claims. With `synchronous = "normal"` a WAL commit does not
fsync, so batches run on the loop itself: a thread hop costs 0.3 to 0.5 ms on the reference
machine, more than the commit. With `synchronous = "full"` the fsync can take milliseconds,
so batches run in a writer thread (`_flushing`, the task that feeds it).

Failed writes. A write the storage refuses (a full disk or `max_page_count`, an I/O error,
a read-only file, a lock held past busy_timeout) fails with a `StoreWriteError` naming the
cause, and nothing of it is stored; the store keeps running and the same write succeeds
once the cause is gone. `failure` is the last such error until a write check
(`check_writable`, a write that needs room) commits: the writer runs one every
`_PROBE_INTERVAL` s while writes fail (`_prober`), and logs when they start failing and
recover. A flush that breaks by itself (a rider or the writer raising, not the storage)
fails every write it holds with a StoreError and logs `store.flush_failed`: no write is
left waiting for a commit that will not come.

This module is the hot path of the queue (a no-op task's enqueue, claim and ack are three
writes): `bench/queue_instructions.py` counts its instructions.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from agentd.errors import StoreBusyError, StoreError, StoreWriteError
from agentd.log import get_logger
from agentd.store.driver import Connection, write_error

if TYPE_CHECKING:
    from agentd.store import Store

T = TypeVar("T")
V = TypeVar("V")
R = TypeVar("R")
WriteOp = Callable[[Connection], T]
_Batch = list[tuple[WriteOp[Any], asyncio.Future[Any]]]

_MAX_OPS_PER_TRANSACTION = 512
# Seconds between the store's own write checks while its writes fail.
_PROBE_INTERVAL = 1.0
# Ticks a flush may wait past the first two while every tick brings more writes.
_MAX_DEFERRED_TICKS = 6


class Writer:
    """The write side of a store: the batching of writes into transactions on `_conn`, and
    the account of storage failures. The store that owns it sets `_conn` when it opens and
    `_executor` when its batches run in a thread, and calls `finish` before it closes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._log = get_logger("store")
        self._conn: Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: _Batch = []
        self._flush_scheduled = False
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

    @property
    def closed(self) -> bool:
        """Whether the store is closed (or not yet open): writes are refused with a StoreError."""
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
                self._start_flushing()

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

    async def check_writable(self) -> None:
        """Raise StoreError (`StoreWriteError` naming the cause) unless a write that needs
        room commits now. The check takes two pages and gives them back in its transaction:
        a write that only rewrites pages the file has commits on a full disk while every
        insert fails."""
        await self.write(_write_check)
        self.failure = None
        self._report()

    async def finish(self) -> None:
        """Write what is pending (riders' values included) and stop the write checks: the
        last step before the connection closes."""
        if self._executor is not None:
            # The writer thread's task takes every batch (riders' values included) until
            # none is left. Shielded: a close cancelled at its deadline must not cancel the
            # task while a batch is in the thread, or that batch's writes would wait for
            # ever; and one task only, so a write made meanwhile starts no second one.
            if self._flushing is None:
                self._start_flushing()
            while self._flushing is not None:
                await asyncio.shield(self._flushing)
        else:
            for rider in self._riders:  # values riders hold join the last batch
                rider()
            while self._pending:
                self._flush_inline()
        prober, self._prober = self._prober, None  # after the last writes: their failure may start one
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober

    def _start_flushing(self) -> None:
        """Start the task that feeds the writer thread its batches until none is left."""
        self._flushing = asyncio.get_running_loop().create_task(
            self._flush_threaded(), name=f"store-writer:{self.path.name}")

    def _take_batch(self) -> _Batch:
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
        batch: _Batch = []
        try:
            batch = self._take_batch()
            if self._pending:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush_inline)
            _settle(batch, self._run_batch([op for op, _ in batch]))
            self._report()
        except Exception as exc:
            self._flush_failed(exc, batch)

    async def _flush_threaded(self) -> None:
        loop = asyncio.get_running_loop()
        batch: _Batch = []
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
                batch = []
                self._report()
                # One turn of the loop before the next batch is taken: those woken by this
                # one act first (a claim loop counts what it claimed before the riders size
                # the next claims against the same limits).
                await asyncio.sleep(0)
        except Exception as exc:
            self._flush_failed(exc, batch)
        finally:
            self._flush_scheduled = False
            self._flushing = None

    def _flush_failed(self, exc: Exception, batch: _Batch) -> None:
        """A flush broke by itself (not the storage: `_run_batch` turns its errors into
        outcomes): fail the writes it took and those waiting, which no flush would commit
        now, and say so once in the log."""
        self._flush_scheduled = False
        waiting, self._pending = self._pending, []
        self._log.error("store.flush_failed", path=str(self.path), error=repr(exc),
                        writes=len(batch) + len(waiting), exc_info=exc)
        for _, future in (*batch, *waiting):
            if not future.done():
                error = StoreError(f"{self.path}: the write was not stored: the writer failed ({exc!r})")
                error.__cause__ = exc
                future.set_exception(error)

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
            error = write_error(self.path, exc) or exc
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
        commits clears `failure` (nothing else would once writes stop coming). A check that
        breaks otherwise than on the storage is logged once and tried again."""
        logged = False
        try:
            while self.failure is not None and not self.closed:
                await asyncio.sleep(_PROBE_INTERVAL)
                try:
                    await self.check_writable()
                except StoreError:  # still failing: check again later
                    pass
                except Exception as exc:
                    if not logged:
                        self._log.error("store.write_check_failed", path=str(self.path),
                                        error=repr(exc), exc_info=exc)
                    logged = True
        finally:
            if self._prober is asyncio.current_task():
                self._prober = None


class _SharedFuture(asyncio.Future[T]):
    """The future of a whole batch of values, which no waiter can cancel. A task cancelled
    while it awaits a future cancels that future: a shared one would then fail every other
    value's wait with CancelledError (their enqueues stored, yet reported as not), where
    only the cancelled task should see its cancellation (once the batch has committed)."""

    def cancel(self, msg: Any = None) -> bool:
        return False


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
        """Add `value` to the next transaction; return the batch's future, which no waiter
        can cancel (`_SharedFuture`): it ends with the batch's results or its error."""
        if self._future is None:
            self._future = _SharedFuture(loop=asyncio.get_running_loop())
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
    """`Writer.check_writable`'s write: records the check, and takes two pages' worth of
    room (a row of zeros) that it gives back before it commits."""
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('last_write_check', ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(time.time()),))
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    conn.execute("INSERT INTO meta(key, value) VALUES ('write_check_room', zeroblob(?))",
                 (2 * page_size,))
    conn.execute("DELETE FROM meta WHERE key = 'write_check_room'")


def _settle(batch: _Batch, outcomes: list[tuple[bool, Any]]) -> None:
    for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
