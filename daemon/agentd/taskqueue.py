"""The durable queue's records and operations: enqueue, read, list, cancel, requeue, delete,
and waiting for a result. Workers (worker.py) claim and settle tasks through it, with the
ops at the end of this module (claim, acks, requeue, lease renewal): every statement on the
`tasks` table is here (and `task_steps`' in steps.py), none in the parts that call them.

Every operation is one grouped write (see `Store.write`), so it returns only once committed,
and every state change is published on the bus after its commit:

    task.queued      enqueued, retried by hand (requeue) or recovered after a crash
    task.started     an attempt began                      (data: attempt)
    task.progress    the task reported progress            (data: kind, data)
    task.retrying    an attempt failed, another will run   (data: attempt, error, delay)
    task.succeeded   finished with a result
    task.failed      finished with an error, no retry      (Fail raised, unknown task, bad result)
    task.dead        an attempt failed and none is left    (the dead-letter state)
    task.cancelled   cancelled while queued, running or waiting

and, by agentd/waits.py, `task.waiting` (the task's wait was written) and `task.resumed`
(queued again: the wait ended).

Each event's data has `task_id`, `name`, `queue` and `status`; its `correlation_id` is the
root task's id and its `causation_id` the parent task's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, NoReturn, Protocol, cast, get_args

from agentd.bus import Bus
from agentd.config import TasksConfig
from agentd.errors import (
    InvalidTaskError,
    TaskFailedError,
    TaskNotFoundError,
    TaskStateError,
    UnknownTaskError,
)
from agentd.steps import StepStore
from agentd.store import BatchedWrite, Connection, Row, Store, execute_rows
from agentd.taskdef import TaskRegistry, concurrency_group, encode_json, group_name, rate_group

# A task's status: the one definition of what the `status` column holds (its CHECK
# constraint, migration 0002, lists the same, as a test checks), what `?status=` accepts
# and the API document lists. A `Literal`, not an enum: a state read from a row stays the
# plain str the driver made, and mypy still refuses a misspelt one. (A StrEnum costs a
# lookup per row decoded, 0.33 µs, and 0.45 µs more to bind to a statement than a str.)
UnsuccessfulStatus = Literal["failed", "dead", "cancelled"]  # final, and always with an error
FinalStatus = Literal["succeeded", UnsuccessfulStatus]
# In the order a task goes through them; `waiting`: on a durable wait (agentd/waits.py).
TaskStatus = Literal["queued", "running", "waiting", FinalStatus]
STATES: frozenset[TaskStatus] = frozenset(get_args(TaskStatus))
FINAL_STATES: frozenset[TaskStatus] = frozenset(get_args(FinalStatus))
# Listed through the tasks_unsuccessful index.
UNSUCCESSFUL: frozenset[TaskStatus] = frozenset(get_args(UnsuccessfulStatus))
# The event each final state is announced with.
FINAL_TOPIC: dict[TaskStatus, str] = {state: f"task.{state}" for state in get_args(FinalStatus)}


def _sql_list(states: tuple[TaskStatus, ...]) -> str:
    """`states` as an SQL list for `status IN ...`: statements name sets of states through
    this, from the one definition above."""
    return "(" + ", ".join(f"'{state}'" for state in states) + ")"


# The final and the unsuccessful states as SQL lists, for both engines' statements.
FINAL_SQL = _sql_list(get_args(FinalStatus))
UNSUCCESSFUL_SQL = _sql_list(get_args(UnsuccessfulStatus))

# The latest time a task may be due (2100-01-01 UTC): a later run_at, or a delay that reaches
# past it (1e308), is a mistake, and would leave a task that never runs. The HTTP API's
# bounds on run_at and delay come from here.
LATEST_RUN_AT = 4_102_444_800.0

# The columns an enqueue writes, in the order of a prepared row (`TaskQueue._prepare`).
INSERT_COLUMNS = (
    "queue, name, args, status, priority, run_at, max_attempts, timeout, "
    "idempotency_key, parent_id, correlation_id, created_at, concurrency_key, rate_key"
)


@dataclass(slots=True)
class TaskRecord:
    """One row of the tasks table, decoded.

    Not frozen: the worker that claimed a task owns its record and updates it in place as
    the attempt ends (a frozen copy per state change was a measurable share of a no-op
    task's cost). Everyone else treats records as values."""

    id: int
    queue: str
    name: str
    args: dict[str, Any]
    status: TaskStatus
    priority: int
    run_at: float
    attempts: int
    max_attempts: int
    timeout: float | None
    idempotency_key: str | None
    parent_id: int | None
    correlation_id: str
    cancel_requested: bool
    result: Any
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    usage: dict[str, int] | None = None

    @classmethod
    def from_row(cls, row: Row) -> TaskRecord:
        """A record from a row that has the record's columns by name (`SELECT *`)."""
        return cls.from_values([row[column] for column in _RECORD_NAMES])

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> TaskRecord:
        """A record from a plain row of `RECORD_COLUMNS` (positional access: reading 21
        columns of an `sqlite3.Row` by name was a measurable share of a claim)."""
        (task_id, queue, name, args, status, priority, run_at, attempts, max_attempts, timeout,
         key, parent_id, correlation_id, cancel_requested, result, error, created_at,
         started_at, finished_at, expires_at, usage) = values
        # Positional, in field order: binding 21 keywords cost more than the rest of this.
        return cls(
            task_id, queue, name, {} if args == "{}" else json.loads(args), status, priority,
            run_at, attempts, max_attempts, timeout, key, parent_id, correlation_id or str(task_id),
            bool(cancel_requested), None if result is None else json.loads(result), error,
            created_at, started_at, finished_at, expires_at,
            None if usage is None else json.loads(usage),
        )

    @classmethod
    def claimed(cls, values: Sequence[Any], started_at: float) -> TaskRecord:
        """The record of a row a claim has just set running, from its `CLAIMED_COLUMNS`.
        What the claim set (status, start) and what a queued row never holds (a result, an
        end, an expiry) are not read back: each column read costs the driver several calls."""
        (task_id, queue, name, args, priority, run_at, attempts, max_attempts, timeout, key,
         parent_id, correlation_id, cancel_requested, error, created_at, usage) = values
        return cls(
            task_id, queue, name, {} if args == "{}" else json.loads(args), "running", priority,
            run_at, attempts, max_attempts, timeout, key, parent_id, correlation_id or str(task_id),
            bool(cancel_requested), None, error, created_at, started_at, None, None,
            None if usage is None else json.loads(usage),
        )

    @classmethod
    def queued(cls, task_id: int, values: tuple[Any, ...], args: dict[str, Any]) -> TaskRecord:
        """The record of a row just inserted from `values` (in `INSERT_COLUMNS` order)."""
        (queue, name, _, status, priority, run_at, max_attempts, timeout, key, parent_id,
         correlation_id, created_at, _, _) = values
        return cls(
            task_id, queue, name, args, status, priority, run_at, 0, max_attempts, timeout, key,
            parent_id, correlation_id or str(task_id), False, None, None, created_at, None, None,
            None,
        )

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "queue": self.queue, "status": self.status,
            "args": self.args, "priority": self.priority, "run_at": self.run_at,
            "attempts": self.attempts, "max_attempts": self.max_attempts, "timeout": self.timeout,
            "idempotency_key": self.idempotency_key, "parent_id": self.parent_id,
            "correlation_id": self.correlation_id, "cancel_requested": self.cancel_requested,
            "result": self.result, "error": self.error, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "expires_at": self.expires_at, "usage": self.usage,
        }


# The columns `TaskRecord.from_values` reads: the record's fields, in their order.
RECORD_COLUMNS = (
    "id, queue, name, args, status, priority, run_at, attempts, max_attempts, timeout, "
    "idempotency_key, parent_id, correlation_id, cancel_requested, result, error, created_at, "
    "started_at, finished_at, expires_at, usage"
)
_RECORD_NAMES = tuple(RECORD_COLUMNS.split(", "))
# The columns `TaskRecord.claimed` reads.
CLAIMED_COLUMNS = (
    "id, queue, name, args, priority, run_at, attempts, max_attempts, timeout, idempotency_key, "
    "parent_id, correlation_id, cancel_requested, error, created_at, usage"
)


class AckWriter(Protocol):
    """Acknowledgements gathered into the next transaction (`BatchedWrite` on SQLite)."""

    def add(self, value: tuple[Any, ...]) -> asyncio.Future[list[int]]:
        """Add one ack (status, result, error, finished_at, expires_at, id); return the future
        of its batch, resolved once it commits with the ids of the batch's acks dropped: an
        ack applies only while this daemon holds the task's lease (never lost on SQLite, where
        the one daemon's heartbeat never takes back its own tasks; on PostgreSQL a lease that
        lapsed may have been taken over by another daemon)."""


# `TaskStore.join_claims`: the claims of one transaction, each a queue and its future.
ClaimFuture = asyncio.Future[tuple[list[TaskRecord], float | None]]
# A limited name's limits: (concurrency or None, rate per second or None, rate burst).
NameLimits = dict[str, tuple[int | None, float | None, float]]


class TaskStore(Protocol):
    """The `tasks` table as the queue and the workers use it, on one engine: `SqliteTasks`
    (below, with today's statements) or `agentd.postgres.tasks.PgTasks`. Writes resolve
    once committed. Every daemon sharing the store sees the others' work through `listen`."""

    @property
    def engine(self) -> Any:
        """The engine (`Store` or `PgStore`): writes that commit alongside an enqueue use it."""

    @property
    def closed(self) -> bool:
        """Whether the engine is closed."""

    node_id: str
    # `[tasks] claim_ahead` when it is not set: how many times its workers a queue of short
    # tasks claims beyond its free slots (see agentd/worker.py), by what a transaction costs.
    default_claim_ahead: int

    def add_claim_rider(self, rider: Callable[[], None]) -> None:
        """Call `rider()` as each claim round is taken: it joins the claims asked for since
        (`join_claims`). On SQLite a round is the next write batch (`Store.add_rider`); on
        PostgreSQL claims run in rounds of their own, beside the batch in flight."""

    def request_claims(self) -> None:
        """Make sure a claim round is taken soon."""

    def listen(self, *, work: Callable[[str | None], None], done: Callable[[Sequence[int]], None],
               cancel: Callable[[Sequence[int]], None], reconnect: Callable[[], None]) -> None:
        """Tell the queue what any daemon committed: `work(queue)` (None: every queue) may
        have claimable tasks, `done(ids)` reached final states, `cancel(ids)` running tasks
        must be cancelled, and `reconnect()` when such news may have been lost."""

    def on_assigned(self, take: Callable[[list[TaskRecord]], None]) -> None:
        """Call `take(records)` when tasks are assigned to this daemon, by another or by
        itself as it enqueued them: they run under its lease already (one's
        `cancel_requested` may be set)."""

    def slots_free(self, queue: str, free: int) -> None:
        """This daemon's free slots of `queue` as its claim loop goes to wait: other daemons
        may assign it that many tasks."""

    def claiming(self, queue: str) -> None:
        """The claim loop of `queue` is claiming: until it says `slots_free` again, its free
        slots are that claim's, and no task this daemon enqueues is assigned to one. Such a
        task could start ahead of older ones the claim takes (of the same priority or
        higher): they would wait behind it."""

    # -- the queue's --------------------------------------------------------------------------

    def insert_one(self, values: tuple[Any, ...]) -> Awaitable[int]:
        """Insert a row without key or parent (`INSERT_COLUMNS` order), batched; its id."""

    def insert(self, prepared: list[tuple[Any, ...]], windows: list[float], now: float,
               ttl: float, alongside: Callable[[Any], object] | None) -> Awaitable[list[Any]]:
        """Insert rows in one transaction (see `_insert_tasks`): per row, its new id or the
        row already stored (a mapping of the columns)."""

    async def get(self, task_id: int) -> TaskRecord | None: ...

    async def add_usage(self, task_id: int, usage: Mapping[str, int]) -> dict[str, int]: ...

    async def children(self, task_id: int) -> list[int]: ...

    async def descendants(self, task_id: int) -> list[int]: ...

    async def list_tasks(self, status: TaskStatus | None, name: str | None, queue: str | None,
                   before_id: int | None, limit: int) -> list[TaskRecord]: ...

    async def counts(self) -> dict[TaskStatus, int]: ...

    async def by_queue(self, now: float) -> list[QueueFigures]:
        """Per queue, its queued (with those due at `now`), running, failed, dead and
        cancelled tasks, states with none left out: in one query, through the indexes of
        those states. Succeeded tasks, nearly every row and not indexed by state, are not
        counted."""

    async def cancel(self, task_id: int, now: float, ttl: float) -> tuple[list[TaskRecord], list[int]]:
        """Cancel the task and its unfinished descendants: the records ended, and the ids of
        the running ones marked (other daemons are told to cancel those they run)."""

    async def requeue(self, task_id: int, now: float) -> TaskRecord: ...

    async def delete(self, task_id: int) -> None: ...

    async def purge_expired(self, now: float, idle_before: float) -> int:
        """Delete the finished tasks whose result TTL has passed (return how many), and the
        rate buckets unheld and untouched since `idle_before` (full by then: as if absent)."""

    async def cancels_among(self, task_ids: list[int]) -> list[int]:
        """Which of these tasks have a cancel stored."""

    # -- the workers' -------------------------------------------------------------------------

    def acks(self) -> AckWriter:
        """A new writer of acknowledgements."""

    def join_claims(self, claims: dict[str, ClaimFuture], size: Callable[[str], int],
                    running: Callable[[], dict[str, int]],
                    limits: Callable[[], NameLimits], lease: float) -> None:
        """Store rider: put a claim per queue of `claims` (`claim`) into the batch being
        taken, of `size(queue)` tasks, within `limits()` (per limited name; a name's
        limits count per limit group, `agentd.taskdef.concurrency_group`). The rate
        buckets are in the store; what runs is either this daemon's own count (`running()`,
        per concurrency group) or, with daemons sharing the store, counted in the store."""

    def requeue_attempt(self, *, task_id: int, run_at: float, error: str | None,
                        undo_attempt: int, finished_at: float, expires_at: float,
                        hold: str | None = None) -> Awaitable[Literal["queued", "cancelled", "lost"]]:
        """Queue the task again (see `requeue_attempt`, and `hold`); "lost" when this daemon
        no longer holds its lease (another daemon took it over): nothing written."""

    def unclaim(self, task_ids: list[int]) -> Awaitable[None]: ...

    def renew_and_reclaim(self, running: list[int], lease_until: float, ttl: float,
                          expired_only: bool) -> Awaitable[list[TaskRecord]]:
        """Renew this daemon's leases (and its node's heartbeat); requeue or end the tasks
        whose lease lapsed (`expired_only=False`, at start on SQLite: every running one)."""

    async def taken_over(self, task_ids: list[int]) -> list[int]:
        """Which of these tasks another daemon runs now: their lease lapsed here (this daemon
        stalled) and was taken over. None on SQLite: its one daemon keeps its leases."""

    async def start_node(self, version: str) -> None:
        """Register this daemon as a node."""

    async def stop_node(self) -> None:
        """Take this daemon's node off the list."""

    async def live_nodes(self, within: float) -> list[dict[str, Any]]:
        """The daemons whose heartbeat is at most `within` s old (SQLite: this one)."""


_NO_ARGS: Mapping[str, Any] = MappingProxyType({})  # read-only: shared by every request

# Enqueue task `name` with these args under this idempotency key (None: no key): what
# ctx.mail / ctx.webhook are given, so a task's sends are its keyed children and a
# handler's are plain tasks.
Enqueue = Callable[[str, Mapping[str, Any], str | None], Awaitable[TaskRecord]]


class TaskRequest(NamedTuple):
    """What to enqueue. Unset options take the task definition's, then `[tasks]` defaults.

    `dedupe_window`: how many seconds an idempotency key keeps returning the task it made
    (None: `[tasks] idempotency_window`; `float("inf")`: forever). A named tuple: one is
    built per enqueue, and a frozen dataclass's fields are set the slow way.
    """

    name: str
    args: Mapping[str, Any] = _NO_ARGS
    queue: str | None = None
    priority: int | None = None
    delay: float | None = None
    run_at: float | None = None
    idempotency_key: str | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    parent_id: int | None = None
    correlation_id: str | None = None
    dedupe_window: float | None = None


class Enqueued(NamedTuple):
    """An enqueue's outcome: the task, and whether this call created it (False: deduplicated)."""

    task: TaskRecord
    created: bool


class QueueFigures(NamedTuple):
    """One queue's tasks in one state, as `/metrics` shows them (`TaskStore.by_queue`)."""

    queue: str
    status: TaskStatus
    tasks: int
    due: int  # of queued ones, those whose run_at has come (0 in other states)
    oldest_due: float | None  # the earliest run_at among those due (None: none is)


class TaskQueue:
    """The queue's API for everything that is not a worker: HTTP, CLI, plugins, `ctx.call`."""

    def __init__(self, tasks: TaskStore, bus: Bus, registry: TaskRegistry, config: TasksConfig,
                 steps: StepStore) -> None:
        self.tasks = tasks  # the `tasks` table on the daemon's engine
        self.store = tasks.engine  # for writes that must commit with an enqueue (`alongside`)
        self.steps = steps  # memoized steps (`ctx.step`), in the same database as the tasks
        self.bus = bus
        self.registry = registry
        self.config = config
        # Per task, the futures of its `wait` calls: a set, so a waiter that gives up is
        # removed in O(1) however many wait for the same task.
        self._waiters: dict[int, set[asyncio.Future[TaskRecord]]] = {}
        self._work_listeners: list[Callable[[str], None]] = []
        self._cancel_listeners: list[Callable[[int], None]] = []
        self._reconnect_listeners: list[Callable[[], None]] = []
        self._rechecks: set[asyncio.Task[None]] = set()
        # Enqueues and requeues whose rows may be committed but whose `task.queued` is not
        # published yet, each a future done once it is (see `queued_published`).
        self._unpublished: set[asyncio.Future[None]] = set()
        # (topic, task name) → the task events published here, heard or not: the counters
        # /metrics shows (agentd_tasks_enqueued_total, ..._succeeded_total, ...).
        self.published: Counter[tuple[str, str]] = Counter()
        # What other daemons sharing the store do (on SQLite, nothing: there are none).
        tasks.listen(work=self._work_elsewhere, done=self._finished_elsewhere,
                     cancel=self._cancel_elsewhere, reconnect=self._reconnected)

    def on_work(self, listener: Callable[[str], None]) -> None:
        """Call `listener(queue)` whenever a queue may have new claimable work."""
        self._work_listeners.append(listener)

    def on_cancel(self, listener: Callable[[int], None]) -> None:
        """Call `listener(task_id)` when a running task must be cancelled."""
        self._cancel_listeners.append(listener)

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """Call `listener()` when notifications from other daemons may have been lost."""
        self._reconnect_listeners.append(listener)

    def notify_work(self, queue: str) -> None:
        for listener in self._work_listeners:
            listener(queue)

    # -- what other daemons did (notifications; see `TaskStore.listen`) ---------------------

    def _work_elsewhere(self, queue: str | None) -> None:
        """A queue (None: every queue) may have claimable work committed by any daemon."""
        for name in self.config.queues if queue is None else (queue,):
            self.notify_work(name)

    def _finished_elsewhere(self, task_ids: Sequence[int]) -> None:
        """Tasks reached a final state, maybe on another daemon: wake their waiters here from
        the row (the local ones were woken by `announce_final` already)."""
        for task_id in task_ids:
            if task_id in self._waiters:
                self._recheck(task_id)

    def _recheck(self, task_id: int) -> None:
        task = asyncio.get_running_loop().create_task(self._resolve_from_row(task_id))
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    async def _resolve_from_row(self, task_id: int) -> None:
        try:
            record = await self.tasks.get(task_id)
        except Exception:  # the store away: the reconnect (or the waiter's timeout) follows
            return
        if record is None or not record.finished:
            return
        for future in self._waiters.pop(task_id, ()):
            if not future.done():
                future.set_result(record)

    def _cancel_elsewhere(self, task_ids: Sequence[int]) -> None:
        for task_id in task_ids:
            for listener in self._cancel_listeners:
                listener(task_id)

    def _reconnected(self) -> None:
        """Notifications may have been lost: look at every queue, waited task and cancel."""
        self._work_elsewhere(None)
        for task_id in list(self._waiters):
            self._recheck(task_id)
        for listener in self._reconnect_listeners:
            listener()

    # -- enqueue ---------------------------------------------------------------------------

    async def enqueue(
        self, name: str, args: Mapping[str, Any] | None = None, *, queue: str | None = None,
        priority: int | None = None, delay: float | None = None, run_at: float | None = None,
        idempotency_key: str | None = None, max_attempts: int | None = None,
        timeout: float | None = None, parent_id: int | None = None,
        correlation_id: str | None = None, dedupe_window: float | None = None,
    ) -> TaskRecord:
        """Enqueue one task; return it once committed (the existing one for a known key).

        The options are keyword-only, each a field of `TaskRequest`, and None takes the
        task definition's, then the `[tasks]` default:

            queue            the queue that runs it (a configured one)
            priority         higher runs first
            delay            seconds from now before it is due (not with run_at)
            run_at           the Unix time it is due (not with delay; default: now)
            idempotency_key  enqueueing the same key returns the same task
            max_attempts     attempts before it is dead
            timeout          seconds an attempt may run
            parent_id        the task this one is a child of
            correlation_id   shared by a tree of tasks (default: the root task's id)
            dedupe_window    seconds the key keeps returning this task (`inf`: forever)

        Raises:
            UnknownTaskError: no task of that name is registered.
            InvalidTaskError: an argument or option is wrong; the message names it.
        """
        (outcome,) = await self.enqueue_many([TaskRequest(
            name, args or _NO_ARGS, queue, priority, delay, run_at, idempotency_key,
            max_attempts, timeout, parent_id, correlation_id, dedupe_window)])
        return outcome.task

    async def enqueue_many(self, requests: Sequence[TaskRequest], *,
                           alongside: Callable[[Any], object] | None = None) -> list[Enqueued]:
        """Enqueue several tasks in one transaction: all are validated first, then all commit.
        `alongside`, when given, writes in the same transaction, before the tasks: both
        commit or neither does. It is an op of the engine's connection (`self.store`): on
        PostgreSQL a coroutine function, awaited."""
        now = time.time()
        prepared: list[tuple[Any, ...]] = []
        try:
            for request in requests:
                prepared.append(self._prepare(request, now))
        except (InvalidTaskError, UnknownTaskError) as exc:
            if len(requests) == 1:
                raise
            raise type(exc)(f"tasks[{len(prepared)}]: {exc}") from exc  # which one of the batch
        with self.publishing_queued():
            return await self._insert(requests, prepared, now, alongside)

    async def _insert(self, requests: Sequence[TaskRequest], prepared: list[tuple[Any, ...]],
                      now: float, alongside: Callable[[Any], object] | None) -> list[Enqueued]:
        """Insert prepared rows, then publish `task.queued` for those created and wake workers."""
        if alongside is None and len(prepared) == 1 and prepared[0][8] is None and prepared[0][9] is None:
            # One task without an idempotency key or parent (an HTTP POST, a handler's or a
            # plugin's enqueue): the single enqueues of a tick become one multi-row INSERT.
            inserted = [await self.tasks.insert_one(prepared[0])]
        else:
            windows = [
                self.config.idempotency_window if r.dedupe_window is None else r.dedupe_window
                for r in requests
            ]
            inserted = await self.tasks.insert(prepared, windows, now, self.config.result_ttl,
                                               alongside)
        outcomes = [
            Enqueued(TaskRecord.queued(found, values, dict(request.args) if request.args else {}), True)
            if isinstance(found, int) else Enqueued(TaskRecord.from_row(found), False)
            for found, values, request in zip(inserted, prepared, requests, strict=True)
        ]
        queues: set[str] = set()
        for outcome in outcomes:
            if outcome.created:
                self.publish("task.queued", outcome.task)
                queues.add(outcome.task.queue)
        for queue in queues:
            self.notify_work(queue)
        return outcomes

    def _prepare(self, request: TaskRequest, now: float) -> tuple[Any, ...]:
        """The row to insert for `request` (in `INSERT_COLUMNS` order), or InvalidTaskError."""
        # One unpacking instead of a score of attribute reads: this runs for every task.
        (name, args, queue, priority, delay, run_at, key, max_attempts, timeout, parent_id,
         correlation_id, _) = request
        definition = self.registry.get(name)
        # Exact types first: an ABC isinstance check costs 0.45 µs, a tenth of an enqueue
        # (and `TaskRequest`'s default args, a mappingproxy, took it every time).
        if type(args) is not dict and args is not _NO_ARGS and not isinstance(args, Mapping):
            raise InvalidTaskError(f"args must be a JSON object, got {type(args).__name__}")
        definition.check_args(args)
        concurrency_key, rate_key = definition.limit_keys(args)
        if "\x00" in concurrency_key or "\x00" in rate_key or (type(key) is str and "\x00" in key):
            raise InvalidTaskError(_nul_message(key, concurrency_key, rate_key))
        if delay is not None and run_at is not None:
            raise InvalidTaskError("give either delay or run_at, not both")
        if run_at is None:
            run_at = now + (delay or 0.0)
        if not 0.0 <= run_at <= LATEST_RUN_AT:  # NaN too
            raise InvalidTaskError(f"run_at must be a Unix time from 0 to {LATEST_RUN_AT:.0f} "
                                   f"(2100-01-01), got {run_at!r}")
        if max_attempts is None:
            max_attempts = (definition.max_attempts if definition.max_attempts is not None
                            else self.config.max_attempts)
        _check_integer("max_attempts", max_attempts)
        if max_attempts < 1:
            raise InvalidTaskError(f"max_attempts must be at least 1, got {max_attempts}")
        if timeout is None:
            timeout = definition.timeout
        if timeout is not None and not 0.0 < timeout < math.inf:  # NaN too: never a timeout
            raise InvalidTaskError(f"timeout must be a positive number of seconds, got {timeout}")
        queue = queue or definition.queue
        if queue not in self.config.queues:
            raise InvalidTaskError(
                f"queue {queue!r} has no workers; configured queues: {', '.join(self.config.queues)}"
            )
        if priority is None:
            priority = definition.priority
        _check_integer("priority", priority)
        return (
            queue, name, encode_json(dict(args), "args") if args else "{}", "queued", priority,
            run_at, max_attempts, timeout, key, parent_id, correlation_id, now, concurrency_key,
            rate_key,
        )

    # -- reading ---------------------------------------------------------------------------

    async def get(self, task_id: int) -> TaskRecord:
        _check_id(task_id)
        record = await self.tasks.get(task_id)
        if record is None:
            raise TaskNotFoundError(f"no task with id {task_id}")
        return record

    async def add_usage(self, task_id: int, usage: Mapping[str, int]) -> dict[str, int]:
        """Add one LLM call's token counts to the task's usage; return the new totals."""
        return await self.tasks.add_usage(task_id, usage)

    async def children(self, task_id: int) -> list[int]:
        _check_id(task_id)
        return await self.tasks.children(task_id)

    async def descendants(self, task_id: int) -> list[int]:
        """Ids of the task's children, their children, and so on."""
        _check_id(task_id)
        return await self.tasks.descendants(task_id)

    async def list(
        self,
        *,
        status: TaskStatus | None = None,
        name: str | None = None,
        queue: str | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> list[TaskRecord]:
        """Newest first; page with `before_id` = the last id of the previous page."""
        if status is not None and status not in STATES:
            raise InvalidTaskError(f"status must be one of {', '.join(sorted(STATES))}, got {status!r}")
        if "\x00" in (name or "") or "\x00" in (queue or ""):
            return []  # no task has one (`_prepare`), and PostgreSQL takes no NUL to look for
        return await self.tasks.list_tasks(status, name, queue, before_id, limit)

    async def counts(self) -> dict[TaskStatus, int]:
        """Tasks per status (statuses with none left out)."""
        return await self.tasks.counts()

    # -- changing --------------------------------------------------------------------------

    async def cancel(self, task_id: int) -> TaskRecord:
        """Cancel a task and its unfinished descendants. Queued and waiting ones end now
        (a waiting one's open wait with it); running ones are
        marked (so a restart never runs them) and their coroutines cancelled, on whichever
        daemon runs them."""
        _check_id(task_id)
        ended, running = await self.tasks.cancel(task_id, time.time(), self.config.result_ttl)
        for record in ended:
            self.announce_final(record)
        for running_id in running:
            for listener in self._cancel_listeners:
                listener(running_id)
        return await self.get(task_id)

    async def requeue(self, task_id: int) -> TaskRecord:
        """Run a dead, failed or cancelled task again from a fresh attempt count.

        What it did that succeeded is kept: its memoized steps and its children that
        succeeded come back to it as on a retry. Its children that did not succeed give up
        their keys, so its calls run them again instead of getting their failure back."""
        _check_id(task_id)
        with self.publishing_queued():
            record = await self.tasks.requeue(task_id, time.time())
            self.publish("task.queued", record, requeued=True)
        self.notify_work(record.queue)
        return record

    async def delete(self, task_id: int) -> None:
        """Delete a finished task (and its steps)."""
        _check_id(task_id)
        await self.tasks.delete(task_id)

    async def purge_expired(self) -> int:
        """Delete finished tasks whose result TTL has passed; return how many. Rate buckets
        of keys no longer used go too: one untouched for longer than the slowest registered
        rate takes to refill (a day at least) is full, as good as none."""
        now = time.time()
        refills = [definition.rate.capacity / definition.rate.per_second
                   for definition in map(self.registry.get, self.registry.names())
                   if definition.rate is not None]
        return await self.tasks.purge_expired(now, now - max([_BUCKETS_KEPT, *refills]))

    # -- results ---------------------------------------------------------------------------

    async def wait(self, task_id: int, timeout: float | None = None) -> TaskRecord:
        """The task once it is finished. Wakes on completion, no polling.

        Raises:
            TaskNotFoundError: no such task.
            TimeoutError: not finished within `timeout` seconds.
        """
        _check_id(task_id)
        future: asyncio.Future[TaskRecord] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, set()).add(future)
        try:
            record = await self.get(task_id)
            if record.finished:
                return record
            return await asyncio.wait_for(future, timeout)
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None:
                waiters.discard(future)
                if not waiters:
                    del self._waiters[task_id]

    async def result(self, task_id: int, timeout: float | None = None) -> Any:
        """The task's result once it succeeds.

        Raises:
            TaskFailedError: it ended failed, dead or cancelled.
            TimeoutError: not finished within `timeout` seconds.
        """
        record = await self.wait(task_id, timeout)
        if record.status != "succeeded":
            raise TaskFailedError(record.id, record.name, record.status, record.error)
        return record.result

    # -- used by workers -------------------------------------------------------------------

    def announce_final(self, record: TaskRecord, **extra: Any) -> None:
        """Publish the final state of a task whose row holds it (committed), as its event
        (`task.<status>`, with `extra` in its data), and wake everyone waiting for it."""
        self.publish(FINAL_TOPIC[record.status], record, **extra)
        for future in self._waiters.pop(record.id, ()):
            if not future.done():
                future.set_result(record)

    @contextlib.contextmanager
    def publishing_queued(self) -> Iterator[None]:
        """Mark an enqueue in flight from before its rows commit until its `task.queued`
        events are out (or a wait's wake, agentd/waits.py, until its `task.resumed` is);
        `queued_published` waits for it. Skipped while nobody hears
        `task.queued`: then there is no order to keep."""
        if not self.bus.has_subscribers("task.queued"):
            yield
            return
        published = asyncio.get_running_loop().create_future()
        self._unpublished.add(published)
        try:
            yield
        finally:
            self._unpublished.discard(published)
            published.set_result(None)

    async def queued_published(self) -> None:
        """Return once every enqueue and requeue in flight now has published its
        `task.queued`. A worker calls it before `task.started`: a task's row is claimable
        as soon as it commits, and the claim can run before the enqueue that committed it
        resumes to publish, which would put `task.started` ahead of `task.queued` on
        every stream (seen on PostgreSQL, where the commit's reply and the worker's wake-up
        arrive together)."""
        if self._unpublished:
            await asyncio.wait(list(self._unpublished))

    def publish(self, topic: str, record: TaskRecord, **extra: Any) -> None:
        """Publish a task event; not built at all when nobody would receive it (by default
        the event log keeps no `task.queued` or `task.started`; building and delivering an
        unheard `task.queued` was 2.6 % of a no-op task's instructions); counted either way."""
        self.published[topic, record.name] += 1
        if not self.bus.has_subscribers(topic):
            return
        self.bus.publish(
            topic,
            {"task_id": record.id, "name": record.name, "queue": record.queue,
             "status": record.status, **extra},
            correlation_id=record.correlation_id,
            causation_id=None if record.parent_id is None else str(record.parent_id),
        )


# The queue's statements on `tasks` (those built per call, for a list's filters or a
# number of rows, are spelt where they are built; the workers' are at the end).
_TASK = "SELECT * FROM tasks WHERE id = ?"
_EXISTS = "SELECT 1 FROM tasks WHERE id = ?"
_STATUS = "SELECT status FROM tasks WHERE id = ?"
_CHILDREN = "SELECT id FROM tasks WHERE parent_id = ? ORDER BY id"
_USAGE = "SELECT usage FROM tasks WHERE id = ?"
_SET_USAGE = "UPDATE tasks SET usage = ? WHERE id = ?"
_INSERT = f"INSERT INTO tasks ({INSERT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
# A child asked for as its parent's cancel committed: stored cancelled.
_INSERT_CANCELLED = (
    f"INSERT INTO tasks ({INSERT_COLUMNS}, cancel_requested, error, finished_at, expires_at) "
    "VALUES (?,?,?,'cancelled',?,?,?,?,?,?,?,?,?,?, 1, 'cancelled', ?, ?) RETURNING *")
_BY_KEY = "SELECT * FROM tasks WHERE idempotency_key = ?"
_FREE_KEY = "UPDATE tasks SET idempotency_key = NULL WHERE id = ?"
_BEING_CANCELLED = "SELECT 1 FROM tasks WHERE id = ? AND cancel_requested"
_REQUEUE = (
    "UPDATE tasks SET status = 'queued', attempts = 0, run_at = ?, error = NULL, "
    "result = NULL, cancel_requested = 0, finished_at = NULL, expires_at = NULL, "
    f"lease_until = NULL WHERE id = ? AND status IN {UNSUCCESSFUL_SQL} RETURNING *")
_FREE_UNSUCCESSFUL_CHILDREN_KEYS = (
    "UPDATE tasks SET idempotency_key = NULL WHERE parent_id = ? "
    f"AND (status IN {UNSUCCESSFUL_SQL} OR cancel_requested) AND idempotency_key IS NOT NULL")
_DELETE = f"DELETE FROM tasks WHERE id = ? AND status IN {FINAL_SQL} RETURNING id"
_PURGE_EXPIRED = f"DELETE FROM tasks WHERE expires_at < ? AND status IN {FINAL_SQL}"
_PURGE_BUCKETS = "DELETE FROM task_rates WHERE held_until < ? AND updated_at < ?"
# Seconds an unused rate bucket is kept at least (`TaskQueue.purge_expired`).
_BUCKETS_KEPT = 86400.0

_COUNTS = f"""
SELECT 'queued', count(*) FROM tasks INDEXED BY tasks_claim WHERE status = 'queued'
UNION ALL SELECT 'running', count(*) FROM tasks INDEXED BY tasks_running WHERE status = 'running'
UNION ALL SELECT 'waiting', count(*) FROM tasks INDEXED BY tasks_waiting WHERE status = 'waiting'
UNION ALL SELECT status, count(*) FROM tasks INDEXED BY tasks_unsuccessful
    WHERE error IS NOT NULL AND status IN {UNSUCCESSFUL_SQL} GROUP BY status
UNION ALL SELECT 'all', count(*) FROM tasks
"""
_BY_QUEUE = f"""
SELECT queue, 'queued', count(*), sum(run_at <= ?), min(iif(run_at <= ?, run_at, NULL))
    FROM tasks INDEXED BY tasks_due WHERE status = 'queued' GROUP BY queue
UNION ALL SELECT queue, 'running', count(*), 0, NULL FROM tasks INDEXED BY tasks_running
    WHERE status = 'running' GROUP BY queue
UNION ALL SELECT queue, status, count(*), 0, NULL FROM tasks INDEXED BY tasks_unsuccessful
    WHERE error IS NOT NULL AND status IN {UNSUCCESSFUL_SQL} GROUP BY queue, status
"""

_DESCENDANTS = """
WITH RECURSIVE tree(id) AS (
    SELECT ? UNION SELECT tasks.id FROM tasks JOIN tree ON tasks.parent_id = tree.id
) SELECT id FROM tree
"""


def _insert_tasks(
    conn: Connection, prepared: list[tuple[Any, ...]], windows: list[float], now: float, ttl: float
) -> list[int | Row]:
    """Insert each row; return its new id, or the row as stored when it is not a new queued
    task: the existing one its idempotency key names, or a child of a parent being
    cancelled, stored cancelled (a parent's cancel ends the children it has, and this one
    was asked for as the cancel committed)."""
    if len(prepared) > 1 and all(values[8] is None and values[9] is None for values in prepared):
        return _insert_many(conn, prepared)
    out: list[int | Row] = []
    for values, window in zip(prepared, windows, strict=True):
        key, parent_id = values[8], values[9]
        if key is not None:
            existing = conn.execute(_BY_KEY, (key,)).fetchone()
            if existing is not None:
                if existing["created_at"] >= now - window:
                    out.append(existing)
                    continue
                # Past its window the key is free again; the old task keeps its history.
                conn.execute(_FREE_KEY, (existing["id"],))
        if parent_id is not None and conn.execute(_BEING_CANCELLED, (parent_id,)).fetchone():
            out.append(conn.execute(
                _INSERT_CANCELLED, (*values[:3], *values[4:], now, now + ttl)).fetchone())
            continue
        task_id = conn.execute(_INSERT, values).lastrowid
        if task_id is None:
            raise RuntimeError("SQLite returned no id for an inserted task")
        out.append(task_id)
    return out


_ROW = "(?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
_ROWS_PER_INSERT = 500  # 7,000 parameters, well under SQLite's limit of 32,766


def _insert_many(conn: Connection, prepared: list[tuple[Any, ...]]) -> list[int | Row]:
    """Rows without idempotency keys, many per INSERT statement (a statement per row was a
    fifth of an enqueue's cost). AUTOINCREMENT hands out increasing ids in VALUES order, so
    the sorted returned ids are the rows' ids in order."""
    out: list[int | Row] = []
    for start in range(0, len(prepared), _ROWS_PER_INSERT):
        chunk = prepared[start:start + _ROWS_PER_INSERT]
        rows = conn.execute(
            f"INSERT INTO tasks ({INSERT_COLUMNS}) VALUES {','.join([_ROW] * len(chunk))} RETURNING id",
            [value for values in chunk for value in values]).fetchall()
        out.extend(sorted(row[0] for row in rows))
    return out


_SMALLEST, _LARGEST = -(2**63), 2**63 - 1  # what an SQLite INTEGER holds


def _nul_message(key: str | None, concurrency_key: str, rate_key: str) -> str:
    """What InvalidTaskError says of keys that hold U+0000 (NUL): PostgreSQL's text cannot
    hold one, and both stores take the same tasks."""
    what = ("idempotency_key" if type(key) is str and "\x00" in key
            else "concurrency_key" if "\x00" in concurrency_key else "rate_key")
    return f"{what} holds U+0000 (NUL), which the queue cannot keep"


def _check_integer(field: str, value: Any) -> None:
    """InvalidTaskError unless `value` is an integer SQLite can store. Checked before the
    insert: single enqueues share one INSERT, and a value the driver cannot bind would fail
    every enqueue of the tick with it."""
    if type(value) is int and _SMALLEST <= value <= _LARGEST:
        return  # the usual case, in a fraction of the general test's time
    if not isinstance(value, int) or isinstance(value, bool) or not _SMALLEST <= value <= _LARGEST:
        raise InvalidTaskError(f"{field} must be an integer from -2**63 to 2**63-1, got {value!r}")


def _check_id(task_id: int) -> None:
    """An id no task can have (SQLite integers stop at 2**63 - 1) is simply not found."""
    if not 0 < task_id < 2**63:
        raise TaskNotFoundError(f"no task with id {task_id}")


def _raise_state(conn: Connection, task_id: int, action: str, allowed: str) -> NoReturn:
    row = conn.execute(_STATUS, (task_id,)).fetchone()
    if row is None:
        raise TaskNotFoundError(f"no task with id {task_id}")
    raise TaskStateError(f"cannot {action} task {task_id}: it is {row[0]}, not {allowed}")

# -- the workers' statements -----------------------------------------------------------------
# A worker's claims, acks, requeues and lease renewals, each an op of the write connection
# (run by `WorkerPool` through the store): the SQL on `tasks` stays in this module.

# One row per ack: (status, result, error, finished_at, expires_at, id).
ACK_STATEMENT = ("UPDATE tasks SET status = v.column1, result = v.column2, error = v.column3, "
                 "finished_at = v.column4, expires_at = v.column5, lease_until = NULL "
                 "FROM (VALUES {rows}) AS v WHERE tasks.id = v.column6")
ACK_ROW = "(?,?,?,?,?,?)"


def write_acks(conn: Connection, acks: list[tuple[Any, ...]]) -> list[int]:
    """The final states of the attempts that ended since the last transaction, many per
    statement."""
    execute_rows(conn, ACK_STATEMENT, ACK_ROW, acks)
    return []


def limit_budgets(limits: NameLimits, running: Mapping[str, int], buckets: Iterable[Sequence[Any]],
                  now: float) -> tuple[set[str], dict[str, int], dict[str, float], float | None]:
    """What the limits let start now, from the running count of each concurrency group and
    the stored buckets of the rate groups (group, tokens, updated_at, held_until rows): the
    groups that may start nothing (full, out of tokens, held by a 429), how many more of
    each other group counted may start (a group not counted may start its whole limit), the
    buckets' tokens refilled to now, and when the first blocked bucket frees by itself."""
    blocked: set[str] = set()
    budgets: dict[str, int] = {}
    tokens: dict[str, float] = {}
    frees: list[float] = []
    for group, count in running.items():
        concurrency = limits.get(group_name(group), _UNLIMITED)[0]
        if concurrency is not None and count:
            if count >= concurrency:
                blocked.add(group)
            else:
                budgets[group] = concurrency - count
    for group, stored, updated, held_until in buckets:
        _, per_second, capacity = limits.get(group_name(group), _UNLIMITED)
        if held_until > now:
            blocked.add(group)
            frees.append(held_until)
        elif per_second is not None:
            left = tokens[group] = min(capacity, stored + max(0.0, now - updated) * per_second)
            if left < 1:
                blocked.add(group)
                frees.append(now + (1 - left) / per_second)
            else:
                budgets[group] = int(left)
    return blocked, budgets, tokens, min(frees) if frees else None


_UNLIMITED: tuple[int | None, float | None, float] = (None, None, 1.0)


def pick_within_budgets(candidates: Iterable[Sequence[Any]], wanted: int, limits: NameLimits,
                        budgets: dict[str, int], *, spent: dict[str, int],
                        rate_spent: dict[str, int]) -> list[int]:
    """The ids of up to `wanted` of `candidates` (id, name, concurrency key, rate key rows,
    in claim order), skipping those one of whose limit groups has no budget left (a group
    not in `budgets` starts with its whole limit: none running, a full bucket); spends the
    budgets, and counts what it took per concurrency group into `spent`, per rate group
    into `rate_spent`. Both engines' claims with limited names pick so."""
    picked: list[int] = []
    for task_id, name, concurrency_key, rate_key in candidates:
        if len(picked) == wanted:
            break
        limit = limits.get(name)
        if limit is not None:
            concurrency, per_second, capacity = limit
            counted = concurrency_group(name, concurrency_key) if concurrency is not None else None
            rated = rate_group(name, rate_key) if per_second is not None else None
            if counted is not None and budgets.setdefault(counted, concurrency or 0) <= 0:
                continue
            if rated is not None and budgets.setdefault(rated, int(capacity)) <= 0:
                continue
            if counted is not None:
                budgets[counted] -= 1
                spent[counted] = spent.get(counted, 0) + 1
            if rated is not None:
                budgets[rated] -= 1
                rate_spent[rated] = rate_spent.get(rated, 0) + 1
        picked.append(task_id)
    return picked


def spend_tokens(limits: NameLimits, tokens: dict[str, float], rate_spent: Mapping[str, int],
                 now: float) -> float | None:
    """Take what a claim spent from the buckets' `tokens` (a bucket not stored yet was
    full); when the first one left without a whole token refills one."""
    refills: list[float] = []
    for group, count in rate_spent.items():
        _, per_second, capacity = limits[group_name(group)]
        left = tokens[group] = tokens.get(group, capacity) - count
        if left < 1 and per_second:
            refills.append(now + (1 - left) / per_second)
    return min(refills) if refills else None


# A claim leaves out the tasks of the limit groups blocked (the list given twice, once for
# each kind of group: a group's kind is in its string), a 429's holds among them.
_NOT_BLOCKED = ("AND name || ':c:' || concurrency_key NOT IN ({0}) "
                "AND name || ':r:' || rate_key NOT IN ({0}) ")
_HELD = "SELECT name, held_until FROM task_rates WHERE held_until > ?"
_BUCKETS = ("SELECT name, tokens, updated_at, held_until FROM task_rates "
            "WHERE substr(name, 1, instr(name, ':') - 1) IN ({})")
_SET_BUCKETS = ("INSERT INTO task_rates (name, tokens, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET tokens = excluded.tokens, updated_at = excluded.updated_at")
_HOLD = ("INSERT INTO task_rates (name, tokens, updated_at, held_until) VALUES (?, 0, ?, ?) "
         "ON CONFLICT (name) DO UPDATE SET held_until = max(held_until, excluded.held_until)")


def claim(conn: Connection, *, queue: str, wanted: int, limits: NameLimits, running: dict[str, int],
          spent: dict[str, int], lease: float) -> tuple[list[TaskRecord], float | None]:
    """Mark up to `wanted` due tasks of `queue` running; return their records in claim
    order, and when the next queued task comes due (or a limit frees by itself) if not
    every slot was filled.

    `running` (how many of each concurrency group run) is shared by the claims of one
    transaction, which add what they took; the rate buckets are read and spent in the
    transaction (`task_rates`). `spent`, this claim's own empty dict, records what it
    added. A batch rolled back by another op's failure runs each op again alone: the claim
    first takes back what its first run added, or it would find the group full and claim
    nothing, and, the group counted exhausted, not even wait for the task."""
    now = time.time()
    for group, count in spent.items():
        running[group] -= count
    spent.clear()
    cursor = conn.cursor()
    cursor.row_factory = None
    budgets: dict[str, int] = {}
    tokens: dict[str, float] = {}
    # Usually none: one look in the index of holds, and no exclusion at all.
    held = cursor.execute(_HELD, (now,)).fetchall()
    blocked = {group for group, _ in held}
    frees_at = min((until for _, until in held), default=None)
    if limits:
        rated = [name for name, (_, per_second, _) in limits.items() if per_second is not None]
        buckets = (cursor.execute(_BUCKETS.format(",".join("?" * len(rated))), rated).fetchall()
                   if rated else [])
        blocked_by_limits, budgets, tokens, limit_frees_at = limit_budgets(limits, running, buckets, now)
        blocked |= blocked_by_limits
        if limit_frees_at is not None:
            frees_at = limit_frees_at if frees_at is None else min(frees_at, limit_frees_at)
    marks = ",".join("?" * len(blocked))
    exclude = _NOT_BLOCKED.format(marks) if blocked else ""
    excluded = (*blocked, *blocked)
    # INDEXED BY: without ANALYZE statistics SQLite prefers tasks_due and sorts every row.
    due = (f"FROM tasks INDEXED BY tasks_claim WHERE status = 'queued' AND queue = ? "
           f"AND run_at <= ? {exclude} ORDER BY priority DESC, run_at, id LIMIT ?")
    claim = ("UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = ?, "
             "lease_until = ? WHERE id IN ({}) RETURNING " + CLAIMED_COLUMNS)
    if limits:
        # Some groups may start only so many more: pick in Python, then claim what was picked.
        candidates = cursor.execute(
            f"SELECT id, name, concurrency_key, rate_key {due}",
            (queue, now, *excluded, wanted + (len(budgets) + 1) * wanted)).fetchall()
        rate_spent: dict[str, int] = {}
        picked = pick_within_budgets(candidates, wanted, limits, budgets, spent=spent,
                                     rate_spent=rate_spent)
        for group, count in spent.items():
            running[group] = running.get(group, 0) + count
        refill_at = spend_tokens(limits, tokens, rate_spent, now)
        if refill_at is not None:
            frees_at = refill_at if frees_at is None else min(frees_at, refill_at)
        if rate_spent:
            cursor.executemany(_SET_BUCKETS, [(group, tokens[group], now) for group in rate_spent])
        rows = cursor.execute(claim.format(",".join("?" * len(picked))),
                              (now, now + lease, *picked)).fetchall() if picked else []
    else:
        # One statement: the usual case costs one execute and one fetch less.
        rows = cursor.execute(claim.format(f"SELECT id {due}"),
                              (now, now + lease, queue, now, *excluded, wanted)).fetchall()
    records = [TaskRecord.claimed(values, now) for values in rows]
    records.sort(key=_claim_order)  # RETURNING gives no particular order
    if len(records) == wanted:
        return records, None  # every free slot was filled; the loop claims again when one frees
    exhausted = blocked | {group for group, left in budgets.items() if left <= 0}
    marks = ",".join("?" * len(exhausted))
    exclude = _NOT_BLOCKED.format(marks) if exhausted else ""
    next_at = conn.execute(
        f"SELECT min(run_at) FROM tasks INDEXED BY tasks_due WHERE status = 'queued' AND queue = ? "
        f"{exclude}", (queue, *exhausted, *exhausted)).fetchone()[0]
    if frees_at is not None:
        next_at = frees_at if next_at is None else min(next_at, frees_at)
    return records, next_at


def _claim_order(record: TaskRecord) -> tuple[int, float, int]:
    """The order tasks are claimed and started in: priority (highest first), due time, id."""
    return -record.priority, record.run_at, record.id


def requeue_attempt(
    conn: Connection, *, task_id: int, run_at: float, error: str | None, undo_attempt: int,
    finished_at: float, expires_at: float, hold: str | None = None,
) -> Literal["queued", "cancelled"]:
    """Queue a task again after an attempt that did not end it (a retry, or a stop that
    interrupted it, `undo_attempt` 1); return its status. A cancel stored on it meanwhile
    ends it `cancelled` instead: a cancel is never undone by a retry. With `hold` (a rate
    group an LLM endpoint's 429 refused) every task of that group is held back until
    `run_at`."""
    if hold is not None:
        conn.execute(_HOLD, (hold, run_at, run_at))
    status: Literal["queued", "cancelled"] = conn.execute(
        "UPDATE tasks SET status = iif(cancel_requested, 'cancelled', 'queued'), run_at = ?, "
        "error = iif(cancel_requested, 'cancelled', ?), "
        "finished_at = iif(cancel_requested, ?, NULL), expires_at = iif(cancel_requested, ?, NULL), "
        "lease_until = NULL, attempts = attempts - iif(cancel_requested, 0, ?) WHERE id = ? "
        "RETURNING status",
        (run_at, error, finished_at, expires_at, undo_attempt, task_id)).fetchone()[0]
    return status


def unclaim(conn: Connection, *, task_ids: list[int]) -> None:
    """Put tasks claimed ahead but never started back in the queue, their attempt unspent."""
    conn.execute(
        f"UPDATE tasks SET status = 'queued', attempts = attempts - 1, started_at = NULL, "
        f"lease_until = NULL WHERE status = 'running' AND id IN ({','.join('?' * len(task_ids))})",
        task_ids)


def renew_and_reclaim(conn: Connection, *, running: list[int], lease_until: float, ttl: float,
                      expired_only: bool) -> list[Row]:
    """Extend the leases of the tasks listed in `running`; reclaim the rows left in state
    running that nobody runs any more (orphans): requeue them, or end them (cancelled, or
    dead with no attempt left). Return the reclaimed rows.

    At start (`expired_only=False`) every running row was left by a dead process: we hold
    the database lock. Later only rows whose lease has expired are taken back; a row
    claimed after `running` was listed has a fresh lease and is left alone.
    """
    now = time.time()
    marks = ",".join("?" * len(running))
    if running:
        conn.execute(f"UPDATE tasks SET lease_until = ? WHERE id IN ({marks})", (lease_until, *running))
    others = f"AND id NOT IN ({marks})" if running else ""
    expired = "AND lease_until < ?" if expired_only else ""
    params = (*running, now) if expired_only else tuple(running)
    orphans = conn.execute(
        f"SELECT * FROM tasks WHERE status = 'running' {others} {expired}", params).fetchall()
    changed: list[Row] = []
    status: TaskStatus
    for row in orphans:
        if row["cancel_requested"]:
            status, error = "cancelled", "cancelled"
        elif row["attempts"] >= row["max_attempts"]:
            status = "dead"
            error = f"the process died during attempt {row['attempts']} of {row['max_attempts']}"
        else:
            status, error = "queued", f"the process died during attempt {row['attempts']}"
        final = status != "queued"
        changed.append(conn.execute(
            "UPDATE tasks SET status = ?, error = ?, lease_until = NULL, run_at = ?, "
            "finished_at = ?, expires_at = ? WHERE id = ? RETURNING *",
            (status, error, now, now if final else None, now + ttl if final else None,
             row["id"])).fetchone())
    return changed


# -- the SQLite engine ------------------------------------------------------------------------


class SqliteTasks:
    """`TaskStore` on agentd.db's SQLite file: the statements above, each op run by the one
    writer. One daemon per file, so no other daemon's news to listen for."""

    # A transaction costs tens of microseconds: a few workers' worth per claim keeps the
    # queue's share of them small (bench/README.md: 6 measured 1.4 % slower than 3).
    default_claim_ahead = 3

    def __init__(self, store: Store) -> None:
        self.store = store
        self.node_id = node_id()
        self._started_at = time.time()
        self._version = ""
        # The single enqueues of a tick: one multi-row INSERT (`BatchedWrite.submit` itself,
        # not a method around it: this is the hot path).
        self.insert_one = cast("Callable[[tuple[Any, ...]], Awaitable[int]]",
                               BatchedWrite(store, _insert_many).submit)
        # A claim round is the next write batch: claims share it with the acks.
        self.add_claim_rider = store.add_rider
        self.request_claims = store.request_flush

    @property
    def engine(self) -> Store:
        return self.store

    @property
    def closed(self) -> bool:
        return self.store.closed

    def listen(self, *, work: Callable[[str | None], None], done: Callable[[Sequence[int]], None],
               cancel: Callable[[Sequence[int]], None], reconnect: Callable[[], None]) -> None:
        """Nothing to hear: the file has one daemon."""

    def on_assigned(self, take: Callable[[list[TaskRecord]], None]) -> None:
        """Nothing is assigned: the file has one daemon."""

    def slots_free(self, queue: str, free: int) -> None:
        """No other daemon to tell."""

    def claiming(self, queue: str) -> None:
        """Nothing is assigned: the file has one daemon."""

    def insert(self, prepared: list[tuple[Any, ...]], windows: list[float], now: float,
               ttl: float, alongside: Callable[[Any], object] | None) -> Awaitable[list[Any]]:
        def op(conn: Connection) -> list[Any]:
            if alongside is not None:
                alongside(conn)
            return _insert_tasks(conn, prepared, windows, now, ttl)

        return self.store.write(op)

    async def get(self, task_id: int) -> TaskRecord | None:
        row = await self.store.read_one(_TASK, (task_id,))
        return None if row is None else TaskRecord.from_row(row)

    async def add_usage(self, task_id: int, usage: Mapping[str, int]) -> dict[str, int]:
        def op(conn: Connection) -> dict[str, int]:
            row = conn.execute(_USAGE, (task_id,)).fetchone()
            if row is None:
                raise TaskNotFoundError(f"no task with id {task_id}")
            totals: dict[str, int] = {} if row[0] is None else json.loads(row[0])
            for key, count in usage.items():
                totals[key] = totals.get(key, 0) + int(count)
            conn.execute(_SET_USAGE, (json.dumps(totals), task_id))
            return totals

        return await self.store.write(op)

    async def children(self, task_id: int) -> list[int]:
        rows = await self.store.read(_CHILDREN, (task_id,))
        return [row["id"] for row in rows]

    async def descendants(self, task_id: int) -> list[int]:
        rows = await self.store.read(_DESCENDANTS, (task_id,))
        return [row[0] for row in rows if row[0] != task_id]

    async def list_tasks(self, status: TaskStatus | None, name: str | None, queue: str | None,
                   before_id: int | None, limit: int) -> list[TaskRecord]:
        # Each status is found through what it has (migration 0008); the guard terms repeat
        # a partial index's WHERE, which is how SQLite knows it may use that index.
        indexed_by = ""
        clauses: list[str] = []
        params: list[Any] = []
        if status in UNSUCCESSFUL:
            clauses.append("error IS NOT NULL")
        elif status == "running":
            indexed_by = "INDEXED BY tasks_running"
            clauses.append("status = 'running'")
        elif status == "waiting":
            indexed_by = "INDEXED BY tasks_waiting"
            clauses.append("status = 'waiting'")
        for column, value in (("status", status), ("name", name), ("queue", queue)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if before_id is not None:
            clauses.append("id < ?")
            params.append(before_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self.store.read(
            f"SELECT * FROM tasks {indexed_by} {where} ORDER BY id DESC LIMIT ?", (*params, limit)
        )
        return [TaskRecord.from_row(row) for row in rows]

    async def counts(self) -> dict[TaskStatus, int]:
        """Succeeded, nearly every row and not indexed by status, is what the whole table
        holds beyond the others."""
        rows = await self.store.read(_COUNTS)
        counts = {row[0]: row[1] for row in rows if row[1]}
        succeeded = counts.pop("all", 0) - sum(counts.values())
        if succeeded:
            counts["succeeded"] = succeeded
        return counts

    async def by_queue(self, now: float) -> list[QueueFigures]:
        return [QueueFigures(*row) for row in await self.store.read(_BY_QUEUE, (now, now))]

    async def cancel(self, task_id: int, now: float, ttl: float) -> tuple[list[TaskRecord], list[int]]:
        def op(conn: Connection) -> tuple[list[Row], list[int]]:
            if conn.execute(_EXISTS, (task_id,)).fetchone() is None:
                raise TaskNotFoundError(f"no task with id {task_id}")
            tree = [row[0] for row in conn.execute(_DESCENDANTS, (task_id,))]
            marks = ",".join("?" * len(tree))
            ended = conn.execute(
                f"UPDATE tasks SET status = 'cancelled', cancel_requested = 1, finished_at = ?, "
                f"expires_at = ?, error = 'cancelled' WHERE id IN ({marks}) "
                "AND status IN ('queued', 'waiting') RETURNING *", (now, now + ttl, *tree)).fetchall()
            if ended:  # a waiting task's wait ends with it: no timer or event wakes it
                conn.execute(f"DELETE FROM task_waits WHERE resolved_at IS NULL AND task_id IN "
                             f"({','.join('?' * len(ended))})", [row['id'] for row in ended])
            running = conn.execute(
                f"UPDATE tasks SET cancel_requested = 1 WHERE id IN ({marks}) AND status = 'running' "
                "RETURNING id", tree).fetchall()
            return ended, [row[0] for row in running]

        ended, running = await self.store.write(op)
        return [TaskRecord.from_row(row) for row in ended], running

    async def requeue(self, task_id: int, now: float) -> TaskRecord:
        def op(conn: Connection) -> Row:
            row: Row | None = conn.execute(_REQUEUE, (now, task_id)).fetchone()
            if row is None:
                _raise_state(conn, task_id, "requeue", "dead, failed or cancelled")
            conn.execute(_FREE_UNSUCCESSFUL_CHILDREN_KEYS, (task_id,))
            return row

        return TaskRecord.from_row(await self.store.write(op))

    async def delete(self, task_id: int) -> None:
        def op(conn: Connection) -> None:
            deleted = conn.execute(_DELETE, (task_id,)).fetchone()
            if deleted is None:
                _raise_state(conn, task_id, "delete", "finished")

        await self.store.write(op)

    async def purge_expired(self, now: float, idle_before: float) -> int:
        def op(conn: Connection) -> int:
            conn.execute(_PURGE_BUCKETS, (now, idle_before))
            count: int = conn.execute(_PURGE_EXPIRED, (now,)).rowcount
            return count

        return await self.store.write(op)

    async def cancels_among(self, task_ids: list[int]) -> list[int]:
        if not task_ids:
            return []
        rows = await self.store.read(
            f"SELECT id FROM tasks WHERE cancel_requested AND id IN ({','.join('?' * len(task_ids))})",
            tuple(task_ids))
        return [row[0] for row in rows]

    def acks(self) -> AckWriter:
        return BatchedWrite(self.store, write_acks)

    def join_claims(self, claims: dict[str, ClaimFuture], size: Callable[[str], int],
                    running: Callable[[], dict[str, int]],
                    limits: Callable[[], NameLimits], lease: float) -> None:
        # One count for the batch's claims: they run in order and add to it together.
        shared, named = running(), limits()
        for queue, future in claims.items():
            self.store.join_batch(partial(
                claim, queue=queue, wanted=size(queue), limits=named, running=shared,
                spent={}, lease=lease), future)

    def requeue_attempt(self, *, task_id: int, run_at: float, error: str | None,
                        undo_attempt: int, finished_at: float, expires_at: float,
                        hold: str | None = None) -> Awaitable[Literal["queued", "cancelled", "lost"]]:
        return self.store.write(partial(
            requeue_attempt, task_id=task_id, run_at=run_at, error=error,
            undo_attempt=undo_attempt, finished_at=finished_at, expires_at=expires_at, hold=hold))

    def unclaim(self, task_ids: list[int]) -> Awaitable[None]:
        return self.store.write(partial(unclaim, task_ids=task_ids))

    async def renew_and_reclaim(self, running: list[int], lease_until: float, ttl: float,
                                expired_only: bool) -> list[TaskRecord]:
        rows = await self.store.write(partial(
            renew_and_reclaim, running=running, lease_until=lease_until, ttl=ttl,
            expired_only=expired_only))
        return [TaskRecord.from_row(row) for row in rows]

    async def taken_over(self, task_ids: list[int]) -> list[int]:
        return []

    async def start_node(self, version: str) -> None:
        self._started_at, self._version = time.time(), version

    async def stop_node(self) -> None:
        """Nothing stored: the file's one daemon is the node."""

    async def live_nodes(self, within: float) -> list[dict[str, Any]]:
        now = time.time()
        return [{"id": self.node_id, "started_at": self._started_at, "heartbeat_at": now,
                 "version": self._version, "this": True}]


def node_id() -> str:
    """A new daemon's node id: host, process id and a random part (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
