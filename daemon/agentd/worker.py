"""Running tasks: one claim loop per named queue, a coroutine per claimed task, leases
renewed by a heartbeat, retries with full-jitter backoff, recovery after a crash.

Slots. A queue has `workers` slots. A claim takes as many queued tasks as there are free
slots in one transaction. A task waiting for its children (`ctx.call`) gives its slot back
and takes one again, ahead of new claims, once they are done: one worker is enough for a
parent and its children.

Claiming ahead. A claim, an acknowledgement and a commit cost per transaction, and a
transaction holds what is in flight: with 8 slots, 8 tasks. While a queue's tasks run
shorter than `SHORT_TASK` on average, a claim also takes up to `claim_ahead` x workers
(at most `AHEAD_WORKERS` of them) tasks beyond its free slots (unset: the store's default,
by what its transactions cost); they wait in memory (leased, `running` in the table, no
`task.started` yet), in priority order, and start as slots free, without waiting for a
claim. Long tasks are never claimed ahead: a claimed task would show as running while it
waits behind them, and would wait long (Celery's prefetch problem).

Writes the storage refuses. A task's outcome is not lost to a full disk: an acknowledgement
or a retry that fails with a `StoreWriteError` is written again, after `WRITE_RETRY_FIRST`
s doubling up to `WRITE_RETRY_MAX`, until it commits. Meanwhile the row stays `running`
under this process's lease, so the task does not run again, and its waiters and final
event wait for the commit. (A stop that cannot write it leaves the row to the next start,
which runs the task again, as after a crash.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import json
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from functools import partial
from typing import Any, Literal, NamedTuple

from agentd import __version__
from agentd.config import TasksConfig
from agentd.context import Context
from agentd.errors import Fail, InvalidTaskError, RateLimited, Retry, StoreWriteError, describe
from agentd.log import get_logger
from agentd.metrics import DISPATCH_BUCKETS, RUN_BUCKETS, Histograms
from agentd.services import Services
from agentd.store.text import storable_error
from agentd.supervise import Loop, Supervisor
from agentd.taskdef import TaskDef, TaskRegistry, concurrency_group, encode_json, rate_group
from agentd.taskqueue import (
    LATEST_RUN_AT,
    ClaimFuture,
    FinalStatus,
    NameLimits,
    TaskQueue,
    TaskRecord,
    TaskStore,
)
from agentd.waits import Suspend, WaitRequest, Waits

_LOG = get_logger("worker")

# A queue claims ahead while its tasks' average run (an exponential moving average,
# weight `_RUN_WEIGHT` on the newest) is below this many seconds.
SHORT_TASK = 0.05
_RUN_WEIGHT = 0.2
# The most workers of a queue that claiming ahead counts: claim_ahead was tuned with 8, and
# a queue of 1,000 slots (the default) claiming 3,000 or (PostgreSQL) 16,000 tasks ahead
# would hold them from other daemons while its free slots fill each claim anyway.
AHEAD_WORKERS = 8
# Seconds before a queue claims again after a claim's transaction failed (unless woken).
CLAIM_RETRY = 1.0
# Seconds before an outcome the storage refused is written again: the first wait, doubled
# after each failure up to the last.
WRITE_RETRY_FIRST = 0.05
WRITE_RETRY_MAX = 1.0


class Slots:
    """A queue's worker slots; waiters to re-take a slot go before new claims."""

    def __init__(self, capacity: int, wake: asyncio.Event,
                 reuse_freed_slot: Callable[[Slots], bool]) -> None:
        self.capacity = capacity
        self.used = 0
        self._retakers: deque[asyncio.Future[None]] = deque()
        self._wake = wake
        # Starts a task claimed ahead in a freed slot, which stays used; False if none.
        self._reuse_freed_slot = reuse_freed_slot

    @property
    def free(self) -> int:
        return 0 if self._retakers else max(0, self.capacity - self.used)

    def release(self) -> None:
        while self._retakers:
            retaker = self._retakers.popleft()
            if not retaker.done():
                retaker.set_result(None)  # the slot passes straight to a waiting parent
                return
        if self._reuse_freed_slot(self):
            return  # a task claimed ahead took the slot over
        self.used -= 1
        self._wake.set()

    def take_if_free(self) -> bool:
        """Take a slot if one is free now, without waiting; whether one was taken."""
        if self.used < self.capacity and not self._retakers:
            self.used += 1
            return True
        return False

    async def retake(self) -> None:
        if self.take_if_free():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._retakers.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted just as we were cancelled: give it back
            raise


class WorkerPool:
    """Claims and runs tasks for every configured queue; see the module docstring."""

    def __init__(self, tasks: TaskStore, queue: TaskQueue, registry: TaskRegistry, config: TasksConfig,
                 plugin_configs: Mapping[str, Mapping[str, Any]], *, services: Services,
                 waits: Waits) -> None:
        self.tasks = tasks
        self.queue = queue
        self.waits = waits
        self.registry = registry
        self.config = config
        self._claim_ahead = tasks.default_claim_ahead if config.claim_ahead is None else config.claim_ahead
        self._plugin_configs = plugin_configs
        self._wakes = {name: asyncio.Event() for name in config.queues}
        self._slots = {name: Slots(n, self._wakes[name], partial(self._reuse_freed_slot, name))
                       for name, n in config.queues.items()}
        self._ahead: dict[str, deque[TaskRecord]] = {name: deque() for name in config.queues}
        self._mean_run = dict.fromkeys(config.queues, SHORT_TASK * 2)  # unproven: not short
        # By task name, for /metrics: how long a due task waited for its attempt to start
        # (claim and slot), and how long its attempts' code ran.
        self.dispatch_seconds = Histograms(DISPATCH_BUCKETS)
        self.run_seconds = Histograms(RUN_BUCKETS)
        self.services = services
        self.running: dict[int, asyncio.Task[None]] = {}  # attempts whose code has not ended
        # How many of each concurrency group run here (`agentd.taskdef.concurrency_group`),
        # and the group each attempt counts in, to count it off the same one.
        self._running_by_group: dict[str, int] = {}
        self._counted_in: dict[int, str] = {}
        self._cancelling: set[int] = set()
        # Attempts that have ended, their outcome being written: a cancel no longer
        # interrupts them (the retry's write turns into the cancel itself, `requeue_attempt`).
        self._ended: set[int] = set()
        self._claim_loops: list[Loop] = []
        self._heartbeat_loop: Loop | None = None
        self._stopping = False
        self._interrupted = 0  # attempts a stop interrupted, their tasks put back
        self._threads: set[threading.Thread] = set()  # running sync tasks' threads
        # A thread each for at most `threads` sync tasks: with a thousand slots, a thousand
        # CPU-bound threads would leave the event loop's thread a thousandth of the GIL.
        self._thread_slots = asyncio.Semaphore(config.threads)
        # What each task's context variables start as: the daemon's, as it was built. Not
        # the context of the task whose slot it takes over (its `structlog` bindings...).
        self._task_context = contextvars.copy_context()
        self._acks = tasks.acks()
        # The acks of the transaction being gathered (`_end_attempt`), announced when it commits.
        self._acks_batch: asyncio.Future[list[int]] | None = None
        self._acked: list[TaskRecord] = []
        self._acks_in_flight: dict[asyncio.Future[list[int]], list[TaskRecord]] = {}
        # Acks whose transaction the storage refused, to be written again (`_owe`); while
        # there are some, `_owed_done` stands for them among the acks in flight.
        self._owed: list[TaskRecord] = []
        self._owed_done: asyncio.Future[list[int]] | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._ack_retry = WRITE_RETRY_FIRST
        self._claims: dict[str, ClaimFuture] = {}
        # Per queue whose claim is in flight, the tasks whose cancel was heard meanwhile
        # though they were neither running nor claimed ahead here (`_cancel_running`).
        self._cancels_heard: dict[str, set[int]] = {}
        # Queues whose claim loop is claiming now: their free slots are that claim's.
        self._claiming: set[str] = set()
        self._checking_cancels: asyncio.Task[None] | None = None
        # Tasks assigned here (PostgreSQL) that found no free slot, being put back in the
        # queue.
        self._assigned_back: set[asyncio.Task[None]] = set()
        tasks.add_claim_rider(self._add_claims_to_batch)
        tasks.on_assigned(self._take_assigned)
        queue.on_work(self.wake)
        queue.on_cancel(self._cancel_running)
        queue.on_reconnect(self._check_cancels)

    async def start(self, supervisor: Supervisor) -> None:
        """Recover what a dead process left running, then start claiming: a claim loop per
        queue and the lease heartbeat, under `supervisor` (restarted if one fails)."""
        await self.tasks.start_node(__version__)
        await self._recover()
        for name in self.config.queues:
            self._claim_loops.append(supervisor.start(f"claim:{name}", partial(self._claim_loop, name)))
        self._heartbeat_loop = supervisor.start("task-heartbeat", self._heartbeat)

    def reconfigure(self, queues: Mapping[str, int], plugin_configs: Mapping[str, Mapping[str, Any]]) -> None:
        """Take new worker counts for the configured queues and new `[plugins.<name>]`
        tables (a reload). A queue given more workers claims at once; one given fewer lets
        its running tasks finish and claims again once fewer run than it now has. Tasks
        started from now on get the new tables.

        Raises:
            ValueError: `queues` names other queues than the running ones (that needs a
                restart: each queue has its claim loop).
        """
        if set(queues) != set(self._slots):
            raise ValueError(f"the queues are {sorted(self._slots)}; adding or removing one "
                             "needs a restart")
        for name, count in queues.items():
            self._slots[name].capacity = count
            self._wakes[name].set()
        self.config = dataclasses.replace(self.config, queues=dict(queues))
        self._plugin_configs = plugin_configs

    async def stop(self, deadline: float, hurry: asyncio.Event | None = None) -> int:
        """Stop claiming; let running tasks finish for `deadline` s (less once `hurry` is
        set), then put the rest back in the queue, their attempt unspent, as well as the
        tasks claimed ahead. Return how many tasks went back.

        A sync task's thread cannot be stopped: it is left to run on (it does not hold the
        process, `_in_thread`) while its task goes back like the others, to run again at
        the next start.
        """
        self._stopping = True
        for name in self._slots:
            self.tasks.slots_free(name, 0)  # assign nothing more here
        # Claim loops are woken to end rather than cancelled: a claim already submitted
        # commits whatever happens to its caller, and its rows must not be left running.
        for wake in self._wakes.values():
            wake.set()
        ending = [loop.stop(cancel=False) for loop in self._claim_loops]
        if self._heartbeat_loop is not None:
            ending.append(self._heartbeat_loop.stop())
        self._claim_loops.clear()
        await asyncio.gather(*ending, *self._assigned_back)
        interrupted_before = self._interrupted
        if self.running:
            pending = await self._let_running_finish(deadline, hurry)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._acks_in_flight:
            # Finished tasks are announced when their acks commit: before anything stops
            # listening. `wait`, not `gather`: cancelling a gather would cancel the batches.
            await asyncio.wait(set(self._acks_in_flight))
        unstarted = [record.id for ahead in self._ahead.values() for record in ahead]
        for ahead in self._ahead.values():
            ahead.clear()
        if unstarted:
            await self.tasks.unclaim(unstarted)
        with contextlib.suppress(Exception):  # a node left listed shows as dead soon anyway
            await self.tasks.stop_node()
        interrupted = self._interrupted - interrupted_before
        left = sorted(thread.name for thread in self._threads if thread.is_alive())
        (_LOG.warning if left else _LOG.info)(
            "tasks.stopped", put_back=interrupted + len(unstarted), interrupted=interrupted,
            unclaimed=len(unstarted), threads_left=left)
        return interrupted + len(unstarted)

    async def _let_running_finish(self, deadline: float,
                                  hurry: asyncio.Event | None) -> set[asyncio.Task[None]]:
        """Wait until the running tasks have ended, `deadline` s pass or `hurry` is set;
        return the tasks still running."""
        loop = asyncio.get_running_loop()
        until = loop.time() + deadline
        hurried = loop.create_task((hurry or asyncio.Event()).wait(), name="tasks-hurry")
        try:
            while self.running and not hurried.done() and (left := until - loop.time()) > 0:
                await asyncio.wait({*self.running.values(), hurried}, timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
        return set(self.running.values())

    def describe_running(self) -> str:
        """What a stop waits for, in words: the running tasks and those claimed ahead."""
        ids = ", ".join(map(str, sorted(self.running)[:20])) + (", ..." if len(self.running) > 20 else "")
        threads = sum(thread.is_alive() for thread in self._threads)
        return (f"{len(self.running)} running tasks{f' (ids {ids})' if ids else ''}, "
                f"{threads} of them in threads; {self.claimed_ahead} claimed ahead")

    @property
    def leased(self) -> list[int]:
        """Ids of the tasks whose leases the heartbeat renews: running, claimed ahead, and
        finished but not yet acknowledged (their rows stay `running` until the ack commits,
        and a lease run out meanwhile would have them taken back as orphans)."""
        return [*self.running, *(record.id for ahead in self._ahead.values() for record in ahead),
                *(record.id for acked in self._acks_in_flight.values() for record in acked)]

    @property
    def claimed_ahead(self) -> int:
        """Tasks claimed and waiting in memory for a slot."""
        return sum(map(len, self._ahead.values()))

    def wake(self, queue: str) -> None:
        wake = self._wakes.get(queue)
        if wake is not None:
            wake.set()

    def _cancel_running(self, task_id: int) -> None:
        task = self.running.get(task_id)
        if task is not None:
            if task_id in self._ended:
                return
            self._cancelling.add(task_id)
            # One handed a slot this very tick has not taken its first step: cancelled now,
            # its `_run` would never run, nor its bookkeeping. It sees `_cancelling` instead.
            coro = task.get_coro()
            if not isinstance(coro, Coroutine) or inspect.getcoroutinestate(coro) != inspect.CORO_CREATED:
                task.cancel()
            return
        for ahead in self._ahead.values():
            record = next((r for r in ahead if r.id == task_id), None)
            if record is not None:
                ahead.remove(record)
                self._release_concurrency(record)
                self.wake(record.queue)  # it leaves room ahead: claim again
                self._cancel_unstarted(record)
                return
        # Maybe claimed by a claim that has committed but not come back yet: it checks.
        for heard in self._cancels_heard.values():
            heard.add(task_id)

    def _cancel_unstarted(self, record: TaskRecord) -> None:
        """End a claimed task that never started as cancelled; its ack joins the next
        transaction."""
        putting_back = self._end_attempt(record, _CANCELLED)
        assert putting_back is None  # a final state: nothing to await

    # -- claiming --------------------------------------------------------------------------

    async def _claim_loop(self, queue: str) -> None:
        wake, slots, ahead = self._wakes[queue], self._slots[queue], self._ahead[queue]
        while not self._stopping:
            wake.clear()
            next_at: float | None = None
            if self._claim_size(queue):
                heard = self._cancels_heard[queue] = set()
                self._claiming.add(queue)
                self.tasks.claiming(queue)
                try:
                    records, next_at = await self._claim(queue)
                    cancelled = await self._cancelled_meanwhile(records, heard)
                finally:
                    del self._cancels_heard[queue]
                    self._claiming.discard(queue)
                # No await from here until the records are ahead or running: a cancel
                # heard after this finds them there.
                for record in records:
                    if record.cancel_requested or record.id in cancelled:
                        # Cancelled as it went back to the queue (a stop putting back what it
                        # had claimed ahead), or as this claim committed: a stored cancel is
                        # never run.
                        self._cancel_unstarted(record)
                        continue
                    self._charge_limits(record)
                    _insert_by_priority(ahead, record)
                if self._stopping:
                    return  # what this claim took goes back to the queue with the rest of `ahead`
                while slots.free and ahead:  # in claim order, after any claimed earlier
                    slots.used += 1
                    self._start_next_ahead(queue, slots)
                if records and slots.free:
                    continue  # there may be more claimable work right now
            if not self._stopping and not wake.is_set():
                # Woken meanwhile, it claims again at once: its free slots are for that
                # claim (a task enqueued as it ran may be waiting in the queue).
                self.tasks.slots_free(queue, slots.free)
            timeout = None if next_at is None else max(0.0, next_at - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)

    async def _claim(self, queue: str) -> tuple[list[TaskRecord], float | None]:
        """What a claim for `queue` took, and when to claim again at the latest."""
        try:
            return await self._claim_in_next_batch(queue)
        except Exception as exc:  # the loop must outlive any failed write
            # Its transaction failed (the file locked by another program past busy_timeout,
            # a full disk): nothing was claimed. Try again later.
            _LOG.error("tasks.claim_failed", queue=queue, error=describe(exc))
            return [], time.time() + CLAIM_RETRY

    async def _cancelled_meanwhile(self, records: list[TaskRecord], heard: set[int]) -> set[int]:
        """Which of the tasks a claim took had their cancel stored after the claim read their
        rows: those of the cancels `heard` while it was in flight (a cancel of a running
        task is told to every daemon, and the claim's commit and the news race), as the
        store has them now. (A cancel heard may also be an earlier one's, of a task ended
        and requeued since: the row tells.) While the store is away, the news stands."""
        cancelled: set[int] = set()
        while doubtful := [record.id for record in records if record.id in heard]:
            heard.difference_update(doubtful)  # heard again during the read: read again
            try:
                cancelled.update(await self.tasks.cancels_among(doubtful))
            except Exception as exc:
                _LOG.warning("tasks.cancel_check_failed", error=describe(exc))
                cancelled.update(doubtful)
        return cancelled

    def _claim_size(self, queue: str) -> int:
        """How many tasks a claim for `queue` would take now: its free slots, and the room
        left ahead of them while its tasks are short."""
        slots, room = self._slots[queue], 0
        if self._mean_run[queue] < SHORT_TASK:
            ahead = self._claim_ahead * min(slots.capacity, AHEAD_WORKERS)
            room = max(0, ahead - len(self._ahead[queue]))
        return slots.free + room

    def _claim_in_next_batch(self, queue: str) -> ClaimFuture:
        """A claim for `queue` in the next claim round (on SQLite the next write batch),
        sized when that round is taken (`_add_claims_to_batch`): tasks handed freed slots
        meanwhile leave room that it then fills."""
        future: ClaimFuture = asyncio.get_running_loop().create_future()
        self._claims[queue] = future
        self.tasks.request_claims()
        return future

    def _add_claims_to_batch(self) -> None:
        """Claim rider: put the claims asked for into the round being taken."""
        if not self._claims:
            return
        self.tasks.join_claims(self._claims, self._claim_size, self._running, self._limits,
                               self.config.lease)
        self._claims.clear()

    def _running(self) -> dict[str, int]:
        """How many of each concurrency group run here now (a copy the claims add to)."""
        return dict(self._running_by_group)

    def _limits(self) -> NameLimits:
        """Every registered name's limits, for claims counted in a store that daemons share."""
        limits: NameLimits = {}
        for name in self.registry.names():
            definition = self.registry.get(name)
            rate = definition.rate
            if definition.concurrency is not None or rate is not None:
                limits[name] = (definition.concurrency, None if rate is None else rate.per_second,
                                1.0 if rate is None else rate.capacity)
        return limits

    # -- running ---------------------------------------------------------------------------

    def _charge_limits(self, record: TaskRecord) -> None:
        """Count a claimed task of a concurrency-limited name running in its concurrency
        group until `_release_concurrency` (its rate token the claim spent in the store)."""
        definition = self.registry.find(record.name)
        if definition is None or definition.concurrency is None:
            return
        group = concurrency_group(record.name, _limit_keys(definition, record)[0])
        self._counted_in[record.id] = group
        self._running_by_group[group] = self._running_by_group.get(group, 0) + 1

    def _release_concurrency(self, record: TaskRecord) -> None:
        """A charged task no longer runs (it ended, or was cancelled before it started):
        count it off its group, and wake the claim loops: that frees a concurrency place."""
        group = self._counted_in.pop(record.id, None)
        if group is None:
            return
        left = self._running_by_group[group] - 1
        if left:
            self._running_by_group[group] = left
        else:
            del self._running_by_group[group]
        # Every queue: one of the group may wait on another queue than this task's.
        for wake in self._wakes.values():
            wake.set()

    def _reuse_freed_slot(self, queue: str, slots: Slots) -> bool:
        """`Slots.release` hook: start the next task claimed ahead in the slot being freed,
        which then stays used; False, the slot to be freed, when none waits (or the pool
        is stopping)."""
        if self._stopping or not self._ahead[queue]:
            return False
        self._start_next_ahead(queue, slots)
        return True

    def _start_next_ahead(self, queue: str, slots: Slots) -> None:
        """Start the first task waiting ahead of `queue` in a slot already counted as used."""
        self._start(self._ahead[queue].popleft(), slots)
        self._wakes[queue].set()  # claim again: what was ahead is shrinking

    def _start(self, record: TaskRecord, slots: Slots) -> None:
        """Start a claimed task in a slot already counted as used."""
        self.running[record.id] = asyncio.get_running_loop().create_task(
            self._run(record, self.registry.find(record.name), slots),
            name=f"task:{record.name}:{record.id}", context=self._task_context.copy())

    def _take_assigned(self, records: list[TaskRecord]) -> None:
        """`TaskStore.on_assigned` hook: start each task assigned here in a free slot of its
        queue, and put back in the queue those that find none (the slots filled since they
        were counted, or the pool is stopping). One cancelled before it started ends
        unstarted, as after a claim."""
        back: list[int] = []
        started: set[str] = set()
        for record in records:
            if record.cancel_requested:
                self._cancel_unstarted(record)
                continue
            slots = self._slots.get(record.queue)
            if self._stopping or slots is None or not slots.take_if_free():
                back.append(record.id)
                continue
            self._charge_limits(record)
            self._start(record, slots)
            started.add(record.queue)
        for queue in started:  # told once, whatever the number started
            if queue not in self._claiming:  # else its loop tells once the claim is in
                self.tasks.slots_free(queue, self._slots[queue].free)
        if back:
            putting_back = asyncio.get_running_loop().create_task(self._put_back_assigned(back))
            self._assigned_back.add(putting_back)
            putting_back.add_done_callback(self._assigned_back.discard)

    async def _put_back_assigned(self, task_ids: list[int]) -> None:
        try:
            await self.tasks.unclaim(task_ids)
        except Exception as exc:  # their leases lapse, and another daemon takes them over
            _LOG.warning("tasks.assigned_not_put_back", task_ids=task_ids, error=describe(exc))

    async def _run(self, record: TaskRecord, definition: TaskDef | None, slots: Slots) -> None:
        ctx: Context | None = None
        try:
            plugin_config = self._plugin_configs.get(definition.plugin or "", {}) if definition else {}
            budget = (definition.token_budget
                      if definition is not None and definition.token_budget is not None
                      else self.services.llm.config.token_budget)
            ctx = Context(record, self.queue, slots, plugin_config, self.services,
                          waits=self.waits, token_budget=budget)
            if record.id not in self._cancelling:
                await self.queue.queued_published()
                self.queue.publish("task.started", record, attempt=record.attempts)
            began = time.monotonic()
            self.dispatch_seconds.observe((record.name,), max(0.0, time.time() - record.run_at))
            outcome = await self._execute(record, definition, ctx)
            self._ended.add(record.id)
            ran = time.monotonic() - began
            self.run_seconds.observe((record.name,), ran)
            mean = self._mean_run[record.queue]
            self._mean_run[record.queue] = mean + _RUN_WEIGHT * (ran - mean)
            # Free the slot before the acknowledgement commits, so the next claim shares
            # its transaction. The row stays `running` until then: nothing can be lost, and
            # the task's waiters and final event follow the commit (`_announce_acks`).
            ctx._close()
            if ctx._holds_slot:
                ctx._holds_slot = False
                slots.release()
            putting_back = self._end_attempt(record, outcome)
            if putting_back is not None:
                await putting_back
        except Exception as exc:
            # Not the task's failure (that is an outcome, `_execute`) but one of starting it or
            # recording it (the store closed under a requeue, a bug): this task is its only
            # observer. The row stays `running`, and the heartbeat takes it back once its
            # lease runs out.
            _LOG.exception("tasks.run_failed", task_id=record.id, task=record.name,
                           error=describe(exc))
        finally:
            if ctx is None:
                slots.release()  # the slot it was started in
            else:
                ctx._close()
                if ctx._holds_slot:
                    slots.release()
            self.running.pop(record.id, None)
            self._cancelling.discard(record.id)
            self._ended.discard(record.id)
            self._release_concurrency(record)
            self.waits.attempt_over(record.id)

    async def _execute(self, record: TaskRecord, definition: TaskDef | None, ctx: Context) -> _Outcome:
        try:
            if record.id in self._cancelling:  # cancelled before it started (`_cancel_running`)
                return _CANCELLED
            if definition is None:
                raise Fail(f"no task named {record.name!r} is registered")
            call = _task_call(definition, record, ctx, self._threads, self._thread_slots)
            if record.timeout is None:
                value = await call
            else:
                async with asyncio.timeout(record.timeout):
                    value = await call
            if definition.remember and value is not None:
                await self._remember(definition, record, value)
            encoded = "null" if value is None else encode_json(value, f"the result of {record.name}")
            # Waiters get what a later reader of the row gets: the JSON round trip
            # (a tuple becomes a list, int keys become strings). Scalars survive it as they are.
            if not isinstance(value, str | int | bool | None):
                value = json.loads(encoded)
            return _Outcome("succeeded", result=encoded, value=value)
        except Suspend as suspend:  # a durable wait: the task waits, its attempt unspent
            return _Outcome("waiting", wait=suspend.request)
        except asyncio.CancelledError:
            if record.id in self._cancelling:
                return _CANCELLED
            if self._stopping:
                self._interrupted += 1
                return _Outcome("interrupted", error="interrupted by daemon stop")
            raise
        except Exception as exc:
            return _failure(exc, record, ctx)

    def _end_attempt(self, record: TaskRecord, outcome: _Outcome) -> Coroutine[Any, Any, None] | None:
        """Record how the attempt ended. A final state joins the next transaction's acks and
        is announced when that commits. A retry or an interruption is to be written first:
        the coroutine returned writes it, and the caller awaits it."""
        now = time.time()
        ttl_until = now + self.config.result_ttl
        status: FinalStatus
        if outcome.status == "retry":
            if outcome.delay is not None and not outcome.delay <= LATEST_RUN_AT - now:
                # NaN, inf, 1e308: the row cannot hold it (NaN), or the task would never run.
                status, outcome = "failed", outcome._replace(
                    status="failed", error=f"{outcome.error} (its delay {outcome.delay!r} is no "
                    "number of seconds before 2100-01-01: the task would never run)")
            elif outcome.hold and outcome.delay:
                # Refused for its rate with a time to come back: not the task's failure. (A
                # Retry-After of 0 is an ordinary retry: a hold then would loop unspent.)
                definition = self.registry.find(record.name)
                key = _limit_keys(definition, record)[1] if definition is not None else ""
                return self._put_back(record, outcome.error, interrupted=False, delay=outcome.delay,
                                      now=now, ttl_until=ttl_until, hold=rate_group(record.name, key))
            elif record.attempts < record.max_attempts:
                delay = outcome.delay if outcome.delay is not None else self._backoff(record.attempts)
                return self._put_back(record, outcome.error, interrupted=False, delay=delay,
                                      now=now, ttl_until=ttl_until)
            else:
                status = "dead"
        elif outcome.status == "waiting":
            assert outcome.wait is not None
            return self._suspend(record, outcome.wait, now=now, ttl_until=ttl_until)
        elif outcome.status == "interrupted":
            return self._put_back(record, outcome.error, interrupted=True, delay=0.0, now=now,
                                  ttl_until=ttl_until)
        else:
            status = outcome.status
        batch = self._acks.add((status, outcome.result, outcome.error, now, ttl_until, record.id))
        if batch is not self._acks_batch:
            self._gather_acks(batch)
        record.status, record.result, record.error = status, outcome.value, outcome.error
        record.finished_at, record.expires_at = now, ttl_until
        self._acked.append(record)
        return None

    def _gather_acks(self, batch: asyncio.Future[list[int]]) -> None:
        """Start gathering the acks of a new transaction: its commit announces them all."""
        self._acks_batch, self._acked = batch, []
        self._acks_in_flight[batch] = self._acked
        batch.add_done_callback(partial(self._announce_acks, self._acked))

    async def _put_back(self, record: TaskRecord, error: str | None, *, interrupted: bool,
                        delay: float, now: float, ttl_until: float, hold: str | None = None) -> None:
        """Queue the task again after an attempt that did not end it: a retry in `delay` s,
        or, `interrupted` by a stop, at once with its attempt unspent; with `hold` (a rate
        group a 429 refused) after `delay` with its attempt unspent, the whole group held
        back as long. Written again until it commits while the storage refuses it (a
        stop's deadline cancels that wait: the row stays `running` and the next start
        requeues it)."""
        run_at = now + delay
        requeue = partial(self.tasks.requeue_attempt, task_id=record.id, run_at=run_at, error=error,
                          undo_attempt=1 if interrupted or hold is not None else 0, finished_at=now,
                          expires_at=ttl_until, hold=hold)
        wait = WRITE_RETRY_FIRST
        while True:
            try:
                stored = await requeue()
                break
            except StoreWriteError as exc:
                _LOG.error("tasks.requeue_failed", task_id=record.id, error=str(exc), retry_in=wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, WRITE_RETRY_MAX)
        if stored == "lost":  # the lease lapsed: another daemon took the task over
            _LOG.warning("task.lease_lost", task_id=record.id, attempt=record.attempts)
            return
        if stored == "cancelled":  # a cancel came in as the attempt ended
            record.status, record.error = "cancelled", "cancelled"
            record.finished_at, record.expires_at = now, ttl_until
            self.queue.announce_final(record, attempt=record.attempts, error="cancelled")
            return
        if not interrupted:
            record.status, record.run_at, record.error = "queued", run_at, error
            self.queue.publish("task.retrying", record, attempt=record.attempts,
                               error=error, delay=round(delay, 3))
        self.wake(record.queue)

    async def _suspend(self, record: TaskRecord, request: WaitRequest, *, now: float,
                       ttl_until: float) -> None:
        """Write the task waiting on `request` (see agentd/waits.py); written again until it
        commits while the storage refuses it, as a retry is."""
        wait = WRITE_RETRY_FIRST
        while True:
            try:
                stored = await self.waits.suspend(record, request, now, ttl_until)
                break
            except StoreWriteError as exc:
                _LOG.error("tasks.suspend_failed", task_id=record.id, error=str(exc), retry_in=wait)
                await asyncio.sleep(wait)
                wait = min(wait * 2, WRITE_RETRY_MAX)
        if stored == "lost":  # the lease lapsed: another daemon took the task over
            _LOG.warning("task.lease_lost", task_id=record.id, attempt=record.attempts)
        elif stored == "cancelled":  # a cancel came in as the attempt ended
            record.status, record.error = "cancelled", "cancelled"
            record.finished_at, record.expires_at = now, ttl_until
            self.queue.announce_final(record, attempt=record.attempts, error="cancelled")

    def _announce_acks(self, records: list[TaskRecord], batch: asyncio.Future[list[int]]) -> None:
        """Once a transaction's acks commit, publish each task's final state and wake its
        waiters. A callback rather than each task awaiting the commit: no task wakes up
        only to publish, and no cancelled task can cancel the future its batch shares."""
        del self._acks_in_flight[batch]
        # A batch's future is never cancelled (BatchedWrite.add): it has results or an error.
        if (error := batch.exception()) is not None:
            self._ack_failed(records, error)
            return
        self._announce_committed(_held(records, batch.result()))

    def _ack_failed(self, records: list[TaskRecord], error: BaseException) -> None:
        """Acks whose transaction failed: owed when the storage refused it, else (the store
        closed, a bug) given up: the rows stay `running` until the next start requeues them."""
        if isinstance(error, StoreWriteError) and not self.tasks.closed:
            self._owe(records, error)
            return
        _LOG.error("tasks.ack_failed", tasks=len(records), error=describe(error))
        self._take_off_owed({record.id for record in records})

    def _owe(self, records: list[TaskRecord], error: StoreWriteError) -> None:
        """Write these acks again after a wait (see the module docstring). They stay among
        the acks in flight: listed as leased, and waited for by a stop."""
        owed = {record.id for record in self._owed}
        self._owed.extend(record for record in records if record.id not in owed)
        if self._owed_done is None:
            self._owed_done = asyncio.get_running_loop().create_future()
            self._acks_in_flight[self._owed_done] = self._owed
        if self._ack_timer is None:
            wait, self._ack_retry = self._ack_retry, min(self._ack_retry * 2, WRITE_RETRY_MAX)
            _LOG.error("tasks.ack_failed", tasks=len(self._owed), error=str(error), retry_in=wait)
            self._ack_timer = asyncio.get_running_loop().call_later(wait, self._ack_again)

    def _ack_again(self) -> None:
        """Timer: put every owed ack into the next transaction."""
        self._ack_timer = None
        retrying = list(self._owed)
        if not retrying:
            return
        for record in retrying:
            batch = self._acks.add(_ack_row(record))
        batch.add_done_callback(partial(self._acked_again, retrying))

    def _acked_again(self, records: list[TaskRecord], batch: asyncio.Future[list[int]]) -> None:
        """Done callback of a transaction carrying owed acks."""
        if (error := batch.exception()) is not None:
            self._ack_failed(records, error)
            return
        self._ack_retry = WRITE_RETRY_FIRST
        _LOG.warning("tasks.acks_committed", tasks=len(records))
        # Announced once: an ack retried twice (its first retry's commit on its way as the
        # timer fired again) is announced by the commit that finds it still owed.
        self._announce_committed(
            _held(self._take_off_owed({record.id for record in records}), batch.result()))

    def _take_off_owed(self, ids: set[int]) -> list[TaskRecord]:
        """Take these tasks out of the owed acks; return the ones that were owed."""
        paid = [record for record in self._owed if record.id in ids]
        self._owed[:] = [record for record in self._owed if record.id not in ids]
        if not self._owed and self._owed_done is not None:
            del self._acks_in_flight[self._owed_done]
            self._owed_done.set_result([])
            self._owed_done = None
        return paid

    def _announce_committed(self, records: list[TaskRecord]) -> None:
        """Publish each task's final state and wake its waiters: its ack has committed."""
        announce = self.queue.announce_final
        for record in records:
            if record.error:
                announce(record, attempt=record.attempts, error=record.error)
            else:
                announce(record, attempt=record.attempts)

    async def _remember(self, definition: TaskDef, record: TaskRecord, value: Any) -> None:
        """`@plugin.task(remember=...)`: keep the result in long-term memory."""
        memory = self.services.memory
        if memory is None:
            raise Fail("remember= needs memory, which is not available")
        namespace = definition.remember if isinstance(definition.remember, str) else (
            definition.plugin or "default")
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if not text.strip():  # nothing to remember is not a failed task
            return
        await memory.remember(text, namespace=namespace,
                                   metadata={"task": record.name, "task_id": record.id})

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^(attempt-1))]."""
        ceiling = min(self.config.retry_max, self.config.retry_base * 2 ** (attempt - 1))
        return random.uniform(0, ceiling)

    # -- leases and recovery ---------------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.config.lease / 3
        while True:
            await asyncio.sleep(interval)
            try:
                recovered = await self.tasks.renew_and_reclaim(
                    self.leased, time.time() + self.config.lease, self.config.result_ttl, True)
            except Exception as exc:  # as a claim's: renew at the next beat
                _LOG.error("tasks.renew_failed", error=describe(exc))
                continue
            self._publish_recovered(recovered)
            try:
                # This daemon stalled past a lease and another took the task over: stop
                # running it here (its late ack is dropped, `_held`).
                lost = await self.tasks.taken_over(self.leased)
            except Exception as exc:  # asked again at the next beat
                _LOG.error("tasks.renew_failed", error=describe(exc))
                continue
            for task_id in lost:
                _LOG.warning("task.lease_lost", task_id=task_id, taken_over=True)
                self._cancel_running(task_id)

    def _check_cancels(self) -> None:
        """News from other daemons may have been lost: cancel the tasks here whose cancel was
        stored meanwhile."""
        if self._checking_cancels is None and self.leased:
            self._checking_cancels = asyncio.get_running_loop().create_task(self._cancel_stored())

    async def _cancel_stored(self) -> None:
        try:
            for task_id in await self.tasks.cancels_among(self.leased):
                self._cancel_running(task_id)
        except Exception as exc:  # the store away again: the next reconnect checks again
            _LOG.warning("tasks.cancel_check_failed", error=describe(exc))
        finally:
            self._checking_cancels = None

    async def _recover(self) -> None:
        recovered = await self.tasks.renew_and_reclaim([], 0.0, self.config.result_ttl, False)
        self._publish_recovered(recovered)
        if recovered:
            _LOG.warning("tasks.recovered", count=len(recovered))

    def _publish_recovered(self, records: list[TaskRecord]) -> None:
        for record in records:
            if record.finished:
                self.queue.announce_final(record, error=record.error)
            else:
                self.queue.publish("task.queued", record, recovered=True)
                self.wake(record.queue)


def _held(records: list[TaskRecord], lost: list[int]) -> list[TaskRecord]:
    """The records of a committed batch of acks whose ack was written: those in `lost` were
    dropped, their lease having lapsed and passed to another daemon, which runs the task and
    announces its end (logged here; nothing published)."""
    if not lost:
        return records
    dropped = set(lost)
    for record in records:
        if record.id in dropped:
            _LOG.warning("task.lease_lost", task_id=record.id, attempt=record.attempts)
    return [record for record in records if record.id not in dropped]


def _insert_by_priority(ahead: deque[TaskRecord], record: TaskRecord) -> None:
    """Queue a claimed task to start: after those waiting of its priority or higher, before
    any of lower. A claim's rows come in priority order; a later claim may hold a more
    urgent task than the ones an earlier claim left waiting."""
    if not ahead or ahead[-1].priority >= record.priority:
        ahead.append(record)
        return
    position = next(i for i, waiting in enumerate(ahead) if waiting.priority < record.priority)
    ahead.insert(position, record)


def _task_call(definition: TaskDef, record: TaskRecord, ctx: Context,
               threads: set[threading.Thread], thread_slots: asyncio.Semaphore) -> Awaitable[Any]:
    """The task's function called with its arguments; a sync one runs in a thread of its
    own once `thread_slots` has room, added to `threads` while it runs."""
    if definition.is_async:
        call: Awaitable[Any] = definition.fn(ctx, **record.args)
        return call
    return _in_thread(partial(definition.fn, ctx, **record.args), f"task:{record.name}:{record.id}",
                      threads, thread_slots)


async def _in_thread(call: Callable[[], Any], name: str, threads: set[threading.Thread],
                     thread_slots: asyncio.Semaphore) -> Any:
    """`call()` in a new daemon thread, with the caller's context variables (as
    `asyncio.to_thread`), once `thread_slots` lets one more thread run; the slot is given
    back when the thread ends, not when the wait does: cancelling the wait leaves the
    thread to end on its own, still counted.

    Not `to_thread`: the loop's default executor's threads are joined at exit (by
    `asyncio.run`, then by concurrent.futures' atexit hook), so one sync task stuck in a
    call held the process 27 to 37 s after its stop had put the task back. A daemon
    thread is not waited for. A thread per call costs about 0.1 ms more than a pooled one
    (124 against 31 µs a call, measured), small beside the blocking work sync tasks are
    for; and stuck ones cannot starve the others, as they could the default executor's
    few threads (cores + 4), shared with the embedder.
    """
    await thread_slots.acquire()
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            outcome = partial(_set_result, done, context.run(call))
        except BaseException as exc:  # delivered to the awaiting task, like to_thread's
            outcome = partial(_set_exception, done, exc)
        with contextlib.suppress(RuntimeError):  # the loop has closed: the task was put back
            loop.call_soon_threadsafe(_finish_thread, thread, threads, thread_slots, outcome)

    thread = threading.Thread(target=run, name=name, daemon=True)
    threads.add(thread)
    thread.start()
    return await done


def _finish_thread(thread: threading.Thread, threads: set[threading.Thread],
                   thread_slots: asyncio.Semaphore, outcome: Callable[[], None]) -> None:
    threads.discard(thread)
    thread_slots.release()
    outcome()


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():  # cancelled (a timeout, a cancel, a stop) while the thread ran
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _failure(exc: Exception, record: TaskRecord, ctx: Context) -> _Outcome:
    """How an attempt that raised `exc` ended: `Retry` and any other exception retry (a
    timeout too), `Fail` and refused arguments or results fail the task at once. Its
    error is the text the store keeps (`storable_error`), which its events carry too."""
    status: AttemptOutcome
    delay: float | None
    if isinstance(exc, RateLimited):
        status, error, delay, hold = "retry", f"RateLimited: {exc}", exc.delay, True
    elif isinstance(exc, Retry):
        status, error, delay, hold = "retry", f"Retry: {exc}", exc.delay, False
    elif isinstance(exc, Fail | InvalidTaskError):
        status, error, delay, hold = "failed", describe(exc), None, False
    elif isinstance(exc, TimeoutError) and record.timeout is not None and not str(exc):
        status, error, delay, hold = "retry", f"TimeoutError: no result after {record.timeout} s", None, False
    else:
        ctx.log.warning("task.attempt_failed", error=describe(exc), exc_info=exc)
        status, error, delay, hold = "retry", describe(exc), None, False
    return _Outcome(status, error=storable_error(error), delay=delay, hold=hold)


# How an attempt ended: a final state of the task, or one that queues it again: `retry`
# (with attempts left; none left, it is dead) or `interrupted` by a stop; or `waiting` on a
# durable wait.
AttemptOutcome = Literal["succeeded", "failed", "cancelled", "retry", "interrupted", "waiting"]


class _Outcome(NamedTuple):
    """How an attempt ended, and what it leaves: a result, an error, a retry's delay."""

    status: AttemptOutcome
    result: str | None = None
    error: str | None = None
    delay: float | None = None
    value: Any = None
    wait: WaitRequest | None = None  # what a `waiting` attempt waits on
    hold: bool = False  # a `retry` refused for its rate: its rate group waits out `delay`


_CANCELLED = _Outcome("cancelled", error="cancelled")


def _limit_keys(definition: TaskDef, record: TaskRecord) -> tuple[str, str]:
    """The task's concurrency and rate keys, as its enqueue stored them; when the arguments
    no longer fit the key (a plugin reloaded with another key), its name's keyless group."""
    try:
        return definition.limit_keys(record.args)
    except InvalidTaskError:
        return "", ""


def _ack_row(record: TaskRecord) -> tuple[Any, ...]:
    """The ack of a settled record, as `_end_attempt` first wrote it."""
    result = None
    if record.status == "succeeded":
        result = "null" if record.result is None else encode_json(record.result, "the result")
    return record.status, result, record.error, record.finished_at, record.expires_at, record.id
