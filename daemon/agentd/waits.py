"""Durable waits: `ctx.sleep`, `ctx.sleep_until`, `ctx.wait_for` and `ctx.ask`, the
`task_waits` table (migration 0011), the index of open event waits and the timers.

Replay. A wait that is not yet satisfied raises `Suspend`: the attempt ends, and the task is
written `waiting` (no lease, no worker slot, no coroutine) with a row of `task_waits`, its
attempt unspent. Waking writes the wait's outcome (the event, the answer, or that the time
came) and queues the task again, in one transaction. The next attempt runs the task from the
top: its waits are numbered in call order (`seq`), like its children (`ctx.call`), and one
that has ended returns its recorded outcome at once; memoized steps return theirs. Code
outside steps and children runs again.

What wakes a task:

- a timer (`Waits.run_timers`): a sleep's end, or a wait's or question's timeout. The next
  due time is read from the table, so timers survive restarts.
- an event (`ctx.wait_for`): the bus of the daemon where it is published is matched against
  an index of the open event waits by topic pattern, rebuilt from the table at start (and,
  on PostgreSQL, told of other daemons' new waits by a notification). An event published
  after the task asked but before its `waiting` row committed is not missed: the wait is in
  the index, pending, from the moment it is asked (`expect`), and what it caught meanwhile
  is written as the task suspends.
- an answer (`ctx.ask`, `POST /v1/tasks/{id}/answer`).

Events published: `task.waiting` once a task's `waiting` row commits (data: `wait`, the
wait's number, `kind`, `wake_at`, and an event wait's `pattern` and `match`, or a
question's `prompt` and `data`), and `task.resumed` once it is queued again (data: `wait`,
`timed_out`).

`WaitStore` is what this needs of the table; `SqliteWaits` is it on SQLite, with the
statements beside it, and `agentd.postgres.waits.PgWaits` on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

from agentd.bus import Bus, Subscription
from agentd.errors import StoreWriteError, TaskNotFoundError, TaskStateError, describe
from agentd.events import Event, TopicPattern
from agentd.log import get_logger
from agentd.store import Connection, Row, Store
from agentd.taskqueue import TaskQueue, TaskRecord

_LOG = get_logger("waits")

WaitKind = Literal["sleep", "event", "ask"]
# How a suspend was written: waiting; queued again at once (its event came meanwhile);
# cancelled (a cancel came in as the attempt ended); or lost (another daemon took the
# task over after this one's lease lapsed: nothing written).
Suspended = Literal["waiting", "queued", "cancelled", "lost"]
# Timers fired per transaction.
_FIRE_BATCH = 500
# Seconds after a failed timer round before the next.
_TIMER_RETRY = 1.0
# Seconds before an event's outcome the storage refused is written again: the first wait,
# doubled after each failure up to the last (as the worker's acks).
WRITE_RETRY_FIRST = 0.05
WRITE_RETRY_MAX = 1.0


@dataclass(frozen=True, slots=True)
class WaitRequest:
    """A wait a task's code made: what its row of `task_waits` holds."""

    seq: int  # its number among the task's waits, in call order
    kind: WaitKind
    wake_at: float | None = None  # a sleep's end, or a timeout's
    topic: str | None = None  # an event wait's topic pattern
    match: Mapping[str, Any] | None = None  # data fields the event must have
    prompt: str | None = None  # a question's
    data: Mapping[str, Any] | None = None  # what a question shows beside its prompt

    def to_dict(self) -> dict[str, Any]:
        """As the API shows it (`waiting_for`, `GET /v1/approvals`)."""
        shown: dict[str, Any] = {"wait": self.seq, "kind": self.kind, "wake_at": self.wake_at}
        if self.kind == "event":
            shown.update(pattern=self.topic, match=dict(self.match or {}))
        elif self.kind == "ask":
            shown.update(prompt=self.prompt, data=dict(self.data or {}))
        return shown


class Suspend(BaseException):
    """Raised by a wait that is not yet satisfied: the attempt ends and the task waits.

    A BaseException: task code that catches `Exception` around a wait must not swallow it."""

    def __init__(self, request: WaitRequest) -> None:
        super().__init__(f"waiting ({request.kind}, wait {request.seq})")
        self.request = request


class StoredWait(NamedTuple):
    """A row of `task_waits`: the request, and its outcome once it ended (`resolved`)."""

    request: WaitRequest
    resolved: bool
    outcome: str | None  # JSON: the event, the answer; None for a timer
    timed_out: bool


class WaitStore(Protocol):
    """The `task_waits` table (and the task rows its writes change), as `Waits` uses it."""

    async def recorded(self, task_id: int, seq: int) -> StoredWait | None:
        """The wait `seq` of the task, or None if it never made it."""

    def suspend(self, record: TaskRecord, request: WaitRequest, caught: str | None, now: float,
                expires_at: float) -> Awaitable[tuple[Suspended, TaskRecord | None]]:
        """In one transaction: write the wait (resolved already with `caught`, an event's JSON,
        when not None) and the running task `waiting` (queued, with `caught`), its attempt
        unspent, or cancelled if a cancel is stored. Returns how, and the row written."""

    def resolve(self, task_id: int, seq: int, outcome: str | None, timed_out: bool,
                now: float) -> Awaitable[TaskRecord | None]:
        """Write the outcome of the task's open wait `seq` and queue the task again, in one
        transaction; the task, or None when the wait is no longer open or the task no
        longer waiting (resolved already, cancelled, deleted)."""

    def fire_due(self, now: float) -> Awaitable[list[tuple[TaskRecord, int, bool]]]:
        """Resolve the open waits whose time has come (a timer's end, a timeout) and queue
        their tasks; each task, its wait's number, and whether it timed out."""

    async def next_due(self) -> float | None:
        """The soonest time an open wait comes due."""

    async def open_event_waits(self) -> list[tuple[int, WaitRequest]]:
        """Every open event wait of a waiting task: (task id, request)."""

    async def open_waits(self, task_ids: Sequence[int]) -> dict[int, WaitRequest]:
        """The open wait of each of these tasks that has one."""

    async def questions(self, before_id: int | None, limit: int) -> list[tuple[TaskRecord, WaitRequest]]:
        """Waiting tasks' open questions, newest task first, below `before_id` if given."""

    def answer(self, task_id: int, answer: str, now: float) -> Awaitable[tuple[TaskRecord, int]]:
        """Answer the task's open question (JSON `answer`) and queue it again; the task and
        its question's number. Raises TaskNotFoundError, or TaskStateError when it asks
        nothing."""

    def listen(self, *, added: Callable[[int, int], None], reconnect: Callable[[], None]) -> None:
        """Tell `added(task_id, seq)` of waits other daemons write, and `reconnect()` when such
        news may have been lost. (SQLite: one daemon, no news.)"""


def decode_request(row: Row | Any) -> WaitRequest:
    """A `WaitRequest` from a row of `task_waits` (`SELECT *`)."""
    return WaitRequest(
        row["seq"], row["kind"], row["wake_at"], row["topic"],
        None if row["match"] is None else json.loads(row["match"]), row["prompt"],
        None if row["data"] is None else json.loads(row["data"]))


def request_values(request: WaitRequest) -> tuple[Any, ...]:
    """The request's columns, in `WAIT_COLUMNS` order from `kind`."""
    return (request.kind, request.topic,
            None if request.match is None else json.dumps(request.match, ensure_ascii=False),
            request.prompt,
            None if request.data is None else json.dumps(request.data, ensure_ascii=False),
            request.wake_at)


def decode_stored(row: Row | Any) -> StoredWait:
    """A `StoredWait` from a row of `task_waits` (`SELECT *`)."""
    return StoredWait(decode_request(row), row["resolved_at"] is not None, row["outcome"],
                      bool(row["timed_out"]))


# -- SQLite ------------------------------------------------------------------------------------

_RECORDED = "SELECT * FROM task_waits WHERE task_id = ? AND seq = ?"
# A cancel stored meanwhile ends the task instead (as `requeue_attempt`).
_SUSPEND = (
    "UPDATE tasks SET status = iif(cancel_requested, 'cancelled', ?), run_at = ?, "
    "error = iif(cancel_requested, 'cancelled', error), "
    "finished_at = iif(cancel_requested, ?, NULL), expires_at = iif(cancel_requested, ?, NULL), "
    "lease_until = NULL, attempts = attempts - iif(cancel_requested, 0, 1) "
    "WHERE id = ? AND status = 'running' RETURNING *")
# A wait asked again (its task requeued by hand) starts over.
_WRITE_WAIT = (
    "INSERT INTO task_waits (task_id, seq, kind, topic, match, prompt, data, wake_at, created_at, "
    "resolved_at, outcome) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (task_id, seq) DO UPDATE SET "
    "kind = excluded.kind, topic = excluded.topic, match = excluded.match, "
    "prompt = excluded.prompt, data = excluded.data, wake_at = excluded.wake_at, "
    "created_at = excluded.created_at, resolved_at = excluded.resolved_at, "
    "outcome = excluded.outcome, timed_out = 0")
_CLOSE = (
    "UPDATE task_waits SET resolved_at = ?, outcome = ?, timed_out = ? "
    "WHERE task_id = ? AND seq = ? AND resolved_at IS NULL "
    "AND EXISTS (SELECT 1 FROM tasks WHERE id = task_id AND status = 'waiting') RETURNING seq")
_WAKE = "UPDATE tasks SET status = 'queued', run_at = ? WHERE id = ? AND status = 'waiting' RETURNING *"
_DUE = ("SELECT task_id, seq, kind FROM task_waits INDEXED BY task_waits_due "
        "WHERE resolved_at IS NULL AND wake_at IS NOT NULL AND wake_at <= ? ORDER BY wake_at LIMIT ?")
_NEXT_DUE = ("SELECT min(wake_at) FROM task_waits INDEXED BY task_waits_due "
             "WHERE resolved_at IS NULL AND wake_at IS NOT NULL")
_OPEN_EVENT_WAITS = ("SELECT w.* FROM task_waits w JOIN tasks t ON t.id = w.task_id "
                     "WHERE w.resolved_at IS NULL AND w.kind = 'event' AND t.status = 'waiting'")
_OPEN_WAITS = "SELECT * FROM task_waits WHERE resolved_at IS NULL AND task_id IN ({})"
_QUESTIONS = ("SELECT t.*, w.seq, w.kind, w.topic, w.match, w.prompt, w.data, w.wake_at "
              "FROM task_waits w JOIN tasks t ON t.id = w.task_id "
              "WHERE w.resolved_at IS NULL AND w.kind = 'ask' AND t.status = 'waiting' {} "
              "ORDER BY w.task_id DESC LIMIT ?")
_QUESTION_OF = ("SELECT seq FROM task_waits WHERE task_id = ? AND kind = 'ask' "
                "AND resolved_at IS NULL")
_CLOSE_ORPHAN = "UPDATE task_waits SET resolved_at = ? WHERE task_id = ? AND seq = ?"
_TASK_STATUS = "SELECT status FROM tasks WHERE id = ?"


def _suspend(conn: Connection, record: TaskRecord, request: WaitRequest, *, caught: str | None,
             now: float, expires_at: float) -> tuple[Suspended, TaskRecord | None]:
    status = "waiting" if caught is None else "queued"
    row = conn.execute(_SUSPEND, (status, now, now, expires_at, record.id)).fetchone()
    if row is None:
        return "lost", None
    task = TaskRecord.from_row(row)
    if task.status == "cancelled":
        return "cancelled", task
    conn.execute(_WRITE_WAIT, (record.id, request.seq, *request_values(request), now,
                               None if caught is None else now, caught))
    return ("waiting" if caught is None else "queued"), task


def _resolve(conn: Connection, task_id: int, seq: int, *, outcome: str | None, timed_out: bool,
             now: float) -> TaskRecord | None:
    if conn.execute(_CLOSE, (now, outcome, int(timed_out), task_id, seq)).fetchone() is None:
        return None
    row = conn.execute(_WAKE, (now, task_id)).fetchone()
    return None if row is None else TaskRecord.from_row(row)


def _fire_due(conn: Connection, now: float) -> list[tuple[TaskRecord, int, bool]]:
    woken: list[tuple[TaskRecord, int, bool]] = []
    for task_id, seq, kind in conn.execute(_DUE, (now, _FIRE_BATCH)).fetchall():
        timed_out = kind != "sleep"  # a sleep that ends is no timeout: it is what it waited for
        record = _resolve(conn, task_id, seq, outcome=None, timed_out=timed_out, now=now)
        if record is None:  # the task no longer waits: its wait closes with nothing to wake
            conn.execute(_CLOSE_ORPHAN, (now, task_id, seq))
            continue
        woken.append((record, seq, timed_out))
    return woken


def _answer(conn: Connection, task_id: int, answer: str, now: float) -> tuple[TaskRecord, int]:
    row = conn.execute(_QUESTION_OF, (task_id,)).fetchone()
    record = None if row is None else _resolve(
        conn, task_id, row[0], outcome=answer, timed_out=False, now=now)
    if row is None or record is None:
        status = conn.execute(_TASK_STATUS, (task_id,)).fetchone()
        if status is None:
            raise TaskNotFoundError(f"no task with id {task_id}")
        raise TaskStateError(f"task {task_id} asks no question (it is {status[0]}): nothing to answer")
    return record, row[0]


def question_of(row: Row | Any) -> tuple[TaskRecord, WaitRequest]:
    """A `_QUESTIONS` row: the task, and its question."""
    return TaskRecord.from_row(row), decode_request(row)


class SqliteWaits:
    """`WaitStore` on agentd.db's SQLite file."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def recorded(self, task_id: int, seq: int) -> StoredWait | None:
        row = await self.store.read_one(_RECORDED, (task_id, seq))
        return None if row is None else decode_stored(row)

    def suspend(self, record: TaskRecord, request: WaitRequest, caught: str | None, now: float,
                expires_at: float) -> Awaitable[tuple[Suspended, TaskRecord | None]]:
        return self.store.write(lambda conn: _suspend(
            conn, record, request, caught=caught, now=now, expires_at=expires_at))

    def resolve(self, task_id: int, seq: int, outcome: str | None, timed_out: bool,
                now: float) -> Awaitable[TaskRecord | None]:
        return self.store.write(lambda conn: _resolve(
            conn, task_id, seq, outcome=outcome, timed_out=timed_out, now=now))

    def fire_due(self, now: float) -> Awaitable[list[tuple[TaskRecord, int, bool]]]:
        return self.store.write(lambda conn: _fire_due(conn, now))

    async def next_due(self) -> float | None:
        row = await self.store.read_one(_NEXT_DUE)
        return None if row is None else row[0]

    async def open_event_waits(self) -> list[tuple[int, WaitRequest]]:
        return [(row["task_id"], decode_request(row)) for row in await self.store.read(_OPEN_EVENT_WAITS)]

    async def open_waits(self, task_ids: Sequence[int]) -> dict[int, WaitRequest]:
        if not task_ids:
            return {}
        rows = await self.store.read(_OPEN_WAITS.format(",".join("?" * len(task_ids))),
                                     tuple(task_ids))
        return {row["task_id"]: decode_request(row) for row in rows}

    async def questions(self, before_id: int | None, limit: int) -> list[tuple[TaskRecord, WaitRequest]]:
        below = "" if before_id is None else "AND w.task_id < ?"
        params = (limit,) if before_id is None else (before_id, limit)
        return [question_of(row) for row in await self.store.read(_QUESTIONS.format(below), params)]

    def answer(self, task_id: int, answer: str, now: float) -> Awaitable[tuple[TaskRecord, int]]:
        return self.store.write(lambda conn: _answer(conn, task_id, answer, now))

    def listen(self, *, added: Callable[[int, int], None], reconnect: Callable[[], None]) -> None:
        """Nothing to hear: the file has one daemon."""


# -- the index and the timers -------------------------------------------------------------------


_MISSING = object()
WaitKey = tuple[int, int]  # (task id, seq)


def _same(wanted: Any, given: Any) -> bool:
    """Whether an event's field `given` has the value `match` asks for, as JSON compares
    them: `true` is not `1` (Python's `True == 1` is)."""
    return wanted == given and isinstance(wanted, bool) == isinstance(given, bool)


# A scalar field of an event's data, as an index key: its name, whether it is a bool (JSON's
# `true` is not `1`) and its value.
Anchor = tuple[str, bool, Any]
_SCALARS = (str, int, float, type(None))  # bool is an int


@functools.lru_cache(maxsize=4096)
def _parsed(pattern: str | None) -> TopicPattern:
    """A wait's topic pattern, compiled once however many waits share it: parsing each
    one's took 0.7 s of rebuilding the index of 100,000 waits at start (measured on the
    reference machine, under load)."""
    return TopicPattern.parse(pattern)


def _anchor(name: str, value: Any) -> Anchor | None:
    """The index key of field `name` holding `value`, or None when it is no scalar."""
    return (name, isinstance(value, bool), value) if isinstance(value, _SCALARS) else None


class _PatternWaits:
    """The waits of one topic pattern, found by an event's data: each wait whose `match`
    has a scalar field is filed under its first such field and value (its anchor), so an
    event is checked against the waits anchored on one of its own fields and the few with
    no anchor, not against every wait of the pattern (100,000 waits for one topic, each for
    its own id, would make every event cost 100,000 checks)."""

    __slots__ = ("anchored", "loose", "pattern", "size")

    def __init__(self, pattern: TopicPattern) -> None:
        self.pattern = pattern
        self.anchored: dict[Anchor, dict[WaitKey, _EventWait]] = {}
        self.loose: dict[WaitKey, _EventWait] = {}
        self.size = 0

    def add(self, wait: _EventWait) -> None:
        bucket = self.loose if wait.anchor is None else self.anchored.setdefault(wait.anchor, {})
        if wait.key not in bucket:
            self.size += 1
        bucket[wait.key] = wait

    def remove(self, wait: _EventWait) -> None:
        if wait.anchor is None:
            bucket = self.loose
        elif (found := self.anchored.get(wait.anchor)) is not None:
            bucket = found
        else:
            return
        if bucket.pop(wait.key, None) is not None:
            self.size -= 1
            if wait.anchor is not None and not bucket:
                del self.anchored[wait.anchor]

    def candidates(self, event: Event) -> list[_EventWait]:
        """The waits `event` may satisfy (its topic matches the pattern): to be checked."""
        found = list(self.loose.values())
        if self.anchored:
            for name, value in event.data.items():
                anchor = _anchor(name, value)
                if anchor is not None and (bucket := self.anchored.get(anchor)) is not None:
                    found.extend(bucket.values())
        return found


@dataclass(slots=True, eq=False)
class _EventWait:
    """An event wait in the index: pending from when it is asked until the task's `waiting`
    row commits, then open until an event matches it."""

    task_id: int
    request: WaitRequest
    pattern: TopicPattern
    committed: bool = False
    caught: Event | None = None  # matched while pending: written as the task suspends
    fields: tuple[tuple[str, Any], ...] = field(default=())
    anchor: Anchor | None = None  # where `_PatternWaits` files it

    @classmethod
    def of(cls, task_id: int, request: WaitRequest, *, committed: bool) -> _EventWait:
        fields = tuple((request.match or {}).items())
        anchor = next((found for name, value in fields if (found := _anchor(name, value))), None)
        return cls(task_id, request, _parsed(request.topic), committed, fields=fields,
                   anchor=anchor)

    @property
    def key(self) -> WaitKey:
        return self.task_id, self.request.seq

    def accepts(self, event: Event) -> bool:
        data = event.data
        return all(_same(value, data.get(key, _MISSING)) for key, value in self.fields)


def event_outcome(event: Event) -> str:
    """An event as a wait's outcome (JSON)."""
    return json.dumps(event.to_dict(), ensure_ascii=False)


class Waits:
    """The daemon's waits: what `ctx` and the worker call to suspend a task, the index of
    open event waits (matched against the bus), the timers, and answers."""

    def __init__(self, store: WaitStore, queue: TaskQueue, bus: Bus) -> None:
        self.store = store
        self.queue = queue
        self.bus = bus
        # The index: every event wait, and the same by topic pattern (what the bus is asked
        # for), and per task the keys of its pending ones (what its attempt's end drops).
        self._waits: dict[WaitKey, _EventWait] = {}
        self._by_pattern: dict[str, _PatternWaits] = {}
        self._pending: dict[int, set[WaitKey]] = {}
        self._subscription: Subscription | None = None
        self._timer_wake = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()  # resolves, index reads: kept referenced
        self._rebuilding: asyncio.Task[None] | None = None
        store.listen(added=self._added_elsewhere, reconnect=self._reconnected)

    async def start(self) -> None:
        """Build the index of open event waits from the table."""
        await self._rebuild()

    @property
    def indexed(self) -> int:
        """How many event waits the index holds (pending and open)."""
        return len(self._waits)

    # -- asked by ctx ----------------------------------------------------------------------------

    def expect(self, task_id: int, request: WaitRequest) -> None:
        """Put an event wait into the index, pending, before the task suspends: an event
        published from now on is caught. Again for the same wait: its request is replaced,
        what it caught kept."""
        known = self._waits.get((task_id, request.seq))
        if known is not None:
            known.request = request
            return
        wait = _EventWait.of(task_id, request, committed=False)
        self._index(wait)
        self._pending.setdefault(task_id, set()).add(wait.key)

    def attempt_over(self, task_id: int) -> None:
        """The attempt of `task_id` ended: what it left pending in the index (a wait whose
        suspend was not written: the task was cancelled, or caught `Suspend`) goes."""
        for key in self._pending.pop(task_id, ()):
            self.forget(*key)

    # -- the worker's ------------------------------------------------------------------------

    async def suspend(self, record: TaskRecord, request: WaitRequest, now: float,
                      expires_at: float) -> Suspended:
        """Write the task waiting on `request` (see `WaitStore.suspend`), then publish
        `task.waiting` (or `task.resumed`, when its event came meanwhile)."""
        pending = self._waits.get((record.id, request.seq))
        caught = None if pending is None or pending.caught is None else event_outcome(pending.caught)
        with self.queue.publishing_queued():  # queued at once if its event came meanwhile
            status, stored = await self.store.suspend(record, request, caught, now, expires_at)
            self._suspended(record, request, pending, status, stored)
        return status

    def _suspended(self, record: TaskRecord, request: WaitRequest, pending: _EventWait | None,
                   status: Suspended, stored: TaskRecord | None) -> None:
        """Publish what a suspend wrote, and put its event wait in the index as open."""
        if status == "waiting" and stored is not None:
            if pending is not None:
                pending.committed = True
                self._pending.get(record.id, set()).discard(pending.key)
                if pending.caught is not None:  # caught as the write committed
                    self._resolve_soon(pending, pending.caught)
            self.queue.publish("task.waiting", stored, attempt=record.attempts, **request.to_dict())
            if request.wake_at is not None:
                self._timer_wake.set()
        elif status == "queued" and stored is not None:
            self.forget(record.id, request.seq)
            self._resumed(stored, request.seq, timed_out=False)

    # -- waking ------------------------------------------------------------------------------

    async def answer(self, task_id: int, answer: Any) -> TaskRecord:
        """Answer the task's open question; the task, queued again."""
        with self.queue.publishing_queued():
            record, seq = await self.store.answer(task_id, json.dumps(answer, ensure_ascii=False),
                                                  time.time())
            self._resumed(record, seq, timed_out=False)
        return record

    async def run_timers(self) -> None:
        """Fire the waits whose time has come, as it comes: a loop for the supervisor."""
        while True:
            self._timer_wake.clear()
            try:
                due = await self.store.next_due()
                if due is not None and due <= time.time():
                    with self.queue.publishing_queued():
                        for record, seq, timed_out in await self.store.fire_due(time.time()):
                            self.forget(record.id, seq)
                            self._resumed(record, seq, timed_out=timed_out)
                    continue
            except Exception as exc:  # the store away, a full disk: try again shortly
                _LOG.error("waits.timers_failed", error=describe(exc))
                due = time.time() + _TIMER_RETRY
            timeout = None if due is None else max(0.0, due - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), timeout)

    def _resumed(self, record: TaskRecord, seq: int, *, timed_out: bool) -> None:
        """Publish `task.resumed` for a task queued again, and wake its queue's workers.
        Called inside `publishing_queued`: a worker that claims it first waits for this."""
        self.queue.publish("task.resumed", record, wait=seq, timed_out=timed_out)
        self.queue.notify_work(record.queue)

    # -- the index -----------------------------------------------------------------------------

    def _index(self, wait: _EventWait) -> None:
        self._waits[wait.key] = wait
        same = self._by_pattern.get(wait.pattern.text)
        if same is None:
            same = self._by_pattern[wait.pattern.text] = _PatternWaits(wait.pattern)
            same.add(wait)
            self._resubscribe()
        else:
            same.add(wait)

    def forget(self, task_id: int, seq: int) -> None:
        """Take the task's wait `seq` out of the index (it ended, or needs no index)."""
        wait = self._waits.pop((task_id, seq), None)
        if wait is None:
            return
        same = self._by_pattern[wait.pattern.text]
        same.remove(wait)
        if not same.size:
            del self._by_pattern[wait.pattern.text]
            self._resubscribe()

    def _resubscribe(self) -> None:
        """Hear exactly the topics some open wait's pattern matches: a subscription to every
        topic would have the queue build events nobody else hears (`TaskQueue.publish`)."""
        if self._subscription is not None:
            self._subscription.unsubscribe()
            self._subscription = None
        if self._by_pattern:
            self._subscription = self.bus.subscribe(list(self._by_pattern), self._on_event,
                                                    name="task-waits")

    def _on_event(self, event: Event) -> None:
        """Bus callback: resolve the open waits `event` satisfies."""
        for same in list(self._by_pattern.values()):
            if not same.pattern.matches(event.topic):
                continue
            for wait in [wait for wait in same.candidates(event) if wait.accepts(event)]:
                if not wait.committed:
                    if wait.caught is None:
                        wait.caught = event  # written as the task suspends
                    continue
                self._resolve_soon(wait, event)

    def _resolve_soon(self, wait: _EventWait, event: Event) -> None:
        self.forget(*wait.key)
        self._spawn(self._resolve(wait, event))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resolve(self, wait: _EventWait, event: Event) -> None:
        outcome = event_outcome(event)
        delay = WRITE_RETRY_FIRST
        while True:
            try:
                with self.queue.publishing_queued():
                    record = await self.store.resolve(wait.task_id, wait.request.seq, outcome,
                                                      False, time.time())
                    if record is not None:
                        self._resumed(record, wait.request.seq, timed_out=False)
                return
            except StoreWriteError as exc:  # the event would be lost: write it again
                _LOG.error("waits.resolve_failed", task_id=wait.task_id, error=str(exc),
                           retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, WRITE_RETRY_MAX)
            except Exception as exc:  # the store closed: the wait stays open in the table
                _LOG.error("waits.resolve_failed", task_id=wait.task_id, error=describe(exc))
                return

    async def _rebuild(self) -> None:
        """The index from the table, keeping the pending waits (not in the table yet)."""
        pending = [wait for wait in self._waits.values() if not wait.committed]
        for key in list(self._waits):
            self.forget(*key)
        for task_id, request in await self.store.open_event_waits():
            self._index(_EventWait.of(task_id, request, committed=True))
        for wait in pending:
            if wait.key not in self._waits:
                self._index(wait)

    def _added_elsewhere(self, task_id: int, seq: int) -> None:
        """Another daemon wrote a wait: index it if it is an event wait, and look at the
        timers again."""
        self._timer_wake.set()
        self._spawn(self._index_stored(task_id, seq))

    async def _index_stored(self, task_id: int, seq: int) -> None:
        try:
            stored = await self.store.recorded(task_id, seq)
        except Exception as exc:  # the store away: the reconnect rebuilds the index
            _LOG.warning("waits.index_failed", task_id=task_id, error=describe(exc))
            return
        if stored is not None and not stored.resolved and stored.request.kind == "event":
            self._index(_EventWait.of(task_id, stored.request, committed=True))

    def _reconnected(self) -> None:
        """News of other daemons' waits may have been lost: rebuild the index."""
        self._timer_wake.set()
        if self._rebuilding is None or self._rebuilding.done():
            self._rebuilding = asyncio.get_running_loop().create_task(self._rebuild_quietly())

    async def _rebuild_quietly(self) -> None:
        try:
            await self._rebuild()
        except Exception as exc:  # the store away again: the next reconnect rebuilds
            _LOG.warning("waits.index_failed", error=describe(exc))
