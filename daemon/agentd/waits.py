"""Durable waits: `ctx.sleep`, `ctx.sleep_until`, `ctx.wait_for` and `ctx.ask`, the
`task_waits` table (migrations 0011, 0013), matching events against its open waits, and
the timers.

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
- an event (`ctx.wait_for`): an event on the bus of the daemon where it is published is
  looked up in the table among the open event waits of its topic's patterns, by the
  anchors of its data fields (`wait_anchor`). In memory is only a count of open waits per
  pattern (which topics to hear), counted from the table at start and, on PostgreSQL, told
  of other daemons' new waits by a notification. An event published after the task asked
  but before its `waiting` row committed is not missed: the wait is matched in memory,
  pending, from the moment it is asked (`expect`), and what it caught meanwhile is
  written as the task suspends.
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
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
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


# An open event wait a lookup found: task id, seq, topic pattern, anchor, match (JSON).
Candidate = tuple[int, int, str, str, str | None]


class Woken(NamedTuple):
    """A wait a timer ended (`WaitStore.fire_due`): its task, queued again."""

    record: TaskRecord
    seq: int
    timed_out: bool  # a timeout, not a sleep's end
    topic: str | None  # an event wait's topic pattern


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

    def fire_due(self, now: float) -> Awaitable[list[Woken]]:
        """Resolve the open waits whose time has come (a timer's end, a timeout) and queue
        their tasks."""

    async def next_due(self) -> float | None:
        """The soonest time an open wait comes due."""

    async def event_patterns(self) -> dict[str, int]:
        """How many open event waits each topic pattern has."""

    async def has_event_waits(self, pattern: str) -> bool:
        """Whether some event wait of the topic pattern `pattern` is open."""

    async def matching(self, patterns: Sequence[str], anchors: Sequence[str]) -> list[Candidate]:
        """The open event waits of waiting tasks whose topic pattern is one of `patterns`
        and whose anchor (`wait_anchor`) is one of `anchors` or none: (task id, seq,
        pattern, match as JSON)."""

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


_SCALARS = (str, int, float, type(None))  # bool is an int


def anchor_of(name: str, value: Any) -> str | None:
    """The anchor of data field `name` holding `value`: its name and value as JSON, or None
    when the value is no scalar. JSON keeps `true` apart from `1`, as matching does; a
    whole float is written as the int it equals (`1.0` matches `1`, as in Python)."""
    if not isinstance(value, _SCALARS):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps([name, value], ensure_ascii=False)


def wait_anchor(request: WaitRequest) -> str | None:
    """An event wait's anchor (column `task_waits.anchor`): that of its match's first scalar
    field, or '' without one; None for other waits. An event is looked up by the anchors
    of its own fields (`event_anchors`) and '', so 100,000 waits on one topic, each for its
    own id, cost an event one index lookup, not 100,000 checks."""
    if request.kind != "event":
        return None
    found = (anchor_of(name, value) for name, value in (request.match or {}).items())
    return next((anchor for anchor in found if anchor is not None), "")


def event_anchors(data: Mapping[str, Any]) -> list[str]:
    """The anchors of an event's data fields, with '' (the waits with none)."""
    return ["", *(anchor for name, value in data.items()
                  if (anchor := anchor_of(name, value)) is not None)]


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
    "resolved_at, outcome, anchor) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (task_id, seq) "
    "DO UPDATE SET kind = excluded.kind, topic = excluded.topic, match = excluded.match, "
    "anchor = excluded.anchor, "
    "prompt = excluded.prompt, data = excluded.data, wake_at = excluded.wake_at, "
    "created_at = excluded.created_at, resolved_at = excluded.resolved_at, "
    "outcome = excluded.outcome, timed_out = 0")
_CLOSE = (
    "UPDATE task_waits SET resolved_at = ?, outcome = ?, timed_out = ? "
    "WHERE task_id = ? AND seq = ? AND resolved_at IS NULL "
    "AND EXISTS (SELECT 1 FROM tasks WHERE id = task_id AND status = 'waiting') RETURNING seq")
_WAKE = "UPDATE tasks SET status = 'queued', run_at = ? WHERE id = ? AND status = 'waiting' RETURNING *"
_DUE = ("SELECT task_id, seq, kind, topic FROM task_waits INDEXED BY task_waits_due "
        "WHERE resolved_at IS NULL AND wake_at IS NOT NULL AND wake_at <= ? ORDER BY wake_at LIMIT ?")
_NEXT_DUE = ("SELECT min(wake_at) FROM task_waits INDEXED BY task_waits_due "
             "WHERE resolved_at IS NULL AND wake_at IS NOT NULL")
_EVENT_PATTERNS = ("SELECT topic, count(*) FROM task_waits INDEXED BY task_waits_events "
                   "WHERE resolved_at IS NULL AND kind = 'event' GROUP BY topic")
_HAS_EVENT_WAITS = ("SELECT 1 FROM task_waits INDEXED BY task_waits_events "
                    "WHERE resolved_at IS NULL AND kind = 'event' AND topic = ? LIMIT 1")
_MATCHING = ("SELECT w.task_id, w.seq, w.topic, w.anchor, w.match FROM task_waits w "
             "INDEXED BY task_waits_events JOIN tasks t ON t.id = w.task_id "
             "WHERE w.resolved_at IS NULL AND w.kind = 'event' AND w.topic IN ({}) "
             "AND w.anchor IN ({}) AND t.status = 'waiting'")
# Anchors per lookup: SQLite's bound on a statement's parameters is 32,766.
_ANCHORS_PER_LOOKUP = 500
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
                               None if caught is None else now, caught, wait_anchor(request)))
    return ("waiting" if caught is None else "queued"), task


def _resolve(conn: Connection, task_id: int, seq: int, *, outcome: str | None, timed_out: bool,
             now: float) -> TaskRecord | None:
    if conn.execute(_CLOSE, (now, outcome, int(timed_out), task_id, seq)).fetchone() is None:
        return None
    row = conn.execute(_WAKE, (now, task_id)).fetchone()
    return None if row is None else TaskRecord.from_row(row)


def _fire_due(conn: Connection, now: float) -> list[Woken]:
    woken: list[Woken] = []
    for task_id, seq, kind, topic in conn.execute(_DUE, (now, _FIRE_BATCH)).fetchall():
        timed_out = kind != "sleep"  # a sleep that ends is no timeout: it is what it waited for
        record = _resolve(conn, task_id, seq, outcome=None, timed_out=timed_out, now=now)
        if record is None:  # the task no longer waits: its wait closes with nothing to wake
            conn.execute(_CLOSE_ORPHAN, (now, task_id, seq))
            continue
        woken.append(Woken(record, seq, timed_out, topic))
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

    def fire_due(self, now: float) -> Awaitable[list[Woken]]:
        return self.store.write(lambda conn: _fire_due(conn, now))

    async def next_due(self) -> float | None:
        row = await self.store.read_one(_NEXT_DUE)
        return None if row is None else row[0]

    async def event_patterns(self) -> dict[str, int]:
        return {row[0]: row[1] for row in await self.store.read(_EVENT_PATTERNS)}

    async def has_event_waits(self, pattern: str) -> bool:
        return await self.store.read_one(_HAS_EVENT_WAITS, (pattern,)) is not None

    async def matching(self, patterns: Sequence[str], anchors: Sequence[str]) -> list[Candidate]:
        found: list[Candidate] = []
        for start in range(0, len(anchors), _ANCHORS_PER_LOOKUP):
            some = anchors[start:start + _ANCHORS_PER_LOOKUP]
            statement = _MATCHING.format(",".join("?" * len(patterns)), ",".join("?" * len(some)))
            found.extend(tuple(row) for row in await self.store.read(statement, (*patterns, *some)))
        return found

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


# -- matching events, and the timers ------------------------------------------------------------


_MISSING = object()
WaitKey = tuple[int, int]  # (task id, seq)
# Events looked up in the table together.
_MATCH_BATCH = 256
# Times a lookup the store refused is tried again (after WRITE_RETRY_FIRST.. seconds) before
# its events are given up.
_MATCH_TRIES = 5
# Seconds between two checks that a pattern whose lookups found nothing still has waits.
_RECHECK = 10.0


def _same(wanted: Any, given: Any) -> bool:
    """Whether an event's field `given` has the value `match` asks for, as JSON compares
    them: `true` is not `1` (Python's `True == 1` is)."""
    return wanted == given and isinstance(wanted, bool) == isinstance(given, bool)


def _accepts(match: Mapping[str, Any] | None, data: Mapping[str, Any]) -> bool:
    """Whether event data has every field of a wait's `match`, with its value."""
    return all(_same(value, data.get(key, _MISSING)) for key, value in (match or {}).items())


@functools.lru_cache(maxsize=4096)
def _parsed(pattern: str | None) -> TopicPattern:
    """A wait's topic pattern, compiled once however many waits and events use it."""
    return TopicPattern.parse(pattern)


@dataclass(slots=True, eq=False)
class _PendingWait:
    """An event wait its task asked whose `waiting` row has not committed yet: matched in
    memory, so that an event published meanwhile is caught (and written as it suspends)."""

    task_id: int
    request: WaitRequest
    caught: Event | None = None

    @property
    def key(self) -> WaitKey:
        return self.task_id, self.request.seq

    def catches(self, event: Event) -> bool:
        return (self.caught is None and _parsed(self.request.topic).matches(event.topic)
                and _accepts(self.request.match, event.data))


@dataclass(slots=True, eq=False)
class _Pattern:
    """A topic pattern some open event wait has: what `Waits` keeps of its waits."""

    compiled: TopicPattern
    count: int  # its open waits, as far as this daemon knows (see `Waits._patterns`)
    added: int = 0  # waits counted in since it was: a check finding none meanwhile is void
    checked_at: float = -math.inf  # when the table was last asked whether it has waits
    checking: bool = False


class _Heard(NamedTuple):
    """An event that some open wait's pattern matches, waiting for its lookup."""

    number: int  # in the order the daemon heard them (`Waits._heard`)
    event: Event
    patterns: list[str]  # those of open waits that its topic matches
    anchors: list[str]  # `event_anchors` of its data


def event_outcome(event: Event) -> str:
    """An event as a wait's outcome (JSON)."""
    return json.dumps(event.to_dict(), ensure_ascii=False)


class Waits:
    """The daemon's waits: what `ctx` and the worker call to suspend a task, matching events
    against the open event waits, the timers, and answers.

    A waiting task costs its rows, not memory: the open event waits are matched in the table
    (`WaitStore.matching`, an index on topic pattern and anchor), and the timers are the
    soonest `wake_at` read from it. In memory: per topic pattern, how many of its waits are
    open (what the bus is asked for), and the waits of running attempts not yet written.

    Events are looked up in the order the daemon heard them, one lookup for those heard
    meanwhile, so the first of two events a wait accepts is the one it gets. An event is
    not given to a wait written after it was heard: `_written_at` keeps, while lookups are
    behind, when each wait was written."""

    def __init__(self, store: WaitStore, queue: TaskQueue, bus: Bus) -> None:
        self.store = store
        self.queue = queue
        self.bus = bus
        self._pending: dict[WaitKey, _PendingWait] = {}
        # Open event waits by topic pattern, as far as this daemon knows: a count above the
        # truth (a waiting task cancelled or deleted, a wait another daemon resolved) only
        # costs lookups that find nothing, and is checked then (`_recheck`); a pattern is
        # dropped only once the table says it has no open wait.
        self._patterns: dict[str, _Pattern] = {}
        self._subscribed: frozenset[str] = frozenset()
        self._subscription: Subscription | None = None
        self._heard = 0  # events heard so far
        self._unmatched: deque[_Heard] = deque()
        self._matcher: asyncio.Task[None] | None = None
        self._written_at: dict[WaitKey, int] = {}
        self._resolving: set[WaitKey] = set()
        self._timer_wake = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()  # resolves, index reads: kept referenced
        self._rebuilding: asyncio.Task[None] | None = None
        store.listen(added=self._added_elsewhere, reconnect=self._reconnected)

    async def start(self) -> None:
        """Count the open event waits by pattern from the table."""
        await self._rebuild()

    @property
    def indexed(self) -> int:
        """How many event waits the daemon counts open (see `_patterns`) or pending."""
        return sum(pattern.count for pattern in self._patterns.values()) + len(self._pending)

    # -- asked by ctx ----------------------------------------------------------------------------

    def expect(self, task_id: int, request: WaitRequest) -> None:
        """Match an event wait in memory, pending, before the task suspends: an event
        published from now on is caught. Again for the same wait: its request is replaced,
        what it caught kept."""
        known = self._pending.get((task_id, request.seq))
        if known is not None:
            known.request = request
            return
        self._pending[task_id, request.seq] = _PendingWait(task_id, request)
        self._resubscribe()

    def forget(self, task_id: int, seq: int) -> None:
        """Stop matching the task's pending wait `seq` in memory (it ended, or needs no
        matching)."""
        if self._pending.pop((task_id, seq), None) is not None:
            self._resubscribe()

    def attempt_over(self, task_id: int) -> None:
        """The attempt of `task_id` ended: what it left pending (a wait whose suspend was not
        written: the task was cancelled, or caught `Suspend`) goes."""
        for key in [key for key in self._pending if key[0] == task_id]:
            self.forget(*key)

    # -- the worker's ------------------------------------------------------------------------

    async def suspend(self, record: TaskRecord, request: WaitRequest, now: float,
                      expires_at: float) -> Suspended:
        """Write the task waiting on `request` (see `WaitStore.suspend`), then publish
        `task.waiting` (or `task.resumed`, when its event came meanwhile)."""
        pending = self._pending.get((record.id, request.seq))
        caught = None if pending is None or pending.caught is None else event_outcome(pending.caught)
        with self.queue.publishing_queued():  # queued at once if its event came meanwhile
            status, stored = await self.store.suspend(record, request, caught, now, expires_at)
            self._suspended(record, request, pending, status, stored)
        return status

    def _suspended(self, record: TaskRecord, request: WaitRequest, pending: _PendingWait | None,
                   status: Suspended, stored: TaskRecord | None) -> None:
        """Publish what a suspend wrote; a written event wait is matched in the table from
        now on (an event caught as the write committed resolves it)."""
        if status == "waiting" and stored is not None:
            if request.kind == "event" and request.topic is not None:
                self._written((record.id, request.seq), request.topic)
                if pending is not None:
                    self.forget(record.id, request.seq)
                    if pending.caught is not None:  # caught as the write committed
                        self._resolve_soon(pending.key, request.topic, pending.caught)
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
                        for woken in await self.store.fire_due(time.time()):
                            if woken.topic is not None:
                                self._closed(woken.topic)
                            self._resumed(woken.record, woken.seq, timed_out=woken.timed_out)
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

    # -- the patterns heard ------------------------------------------------------------------

    def _written(self, key: WaitKey, pattern: str) -> None:
        """An event wait of `pattern` was written (here, or by another daemon)."""
        if self._unmatched or self._looking():  # events heard before it may be looked up yet
            self._written_at[key] = self._heard
        known = self._patterns.get(pattern)
        if known is None:
            self._patterns[pattern] = _Pattern(_parsed(pattern), 1, added=1)
            self._resubscribe()
        else:
            known.count += 1
            known.added += 1

    def _closed(self, pattern: str) -> None:
        """This daemon resolved an event wait of `pattern`."""
        known = self._patterns.get(pattern)
        if known is not None:
            known.count = max(0, known.count - 1)
            if not known.count:
                self._spawn(self._recheck(pattern))

    async def _recheck(self, text: str) -> None:
        """Ask the table whether pattern `text` still has open waits: drop it if not (and
        none was written meanwhile); count it open if so."""
        pattern = self._patterns.get(text)
        if pattern is None or pattern.checking:
            return
        pattern.checking, pattern.checked_at, added = True, time.monotonic(), pattern.added
        try:
            found = await self.store.has_event_waits(text)
        except Exception as exc:  # the store away: the pattern stays, costing lookups only
            _LOG.warning("waits.check_failed", pattern=text, error=describe(exc))
            return
        finally:
            pattern.checking = False
        if self._patterns.get(text) is not pattern:  # counted again from the table meanwhile
            return
        if found:
            pattern.count = max(1, pattern.count)
        elif pattern.added == added:
            del self._patterns[text]
            self._resubscribe()

    def _resubscribe(self) -> None:
        """Hear exactly the topics some open or pending wait's pattern matches: a
        subscription to every topic would have the queue build events nobody else hears
        (`TaskQueue.publish`)."""
        wanted = frozenset(self._patterns).union(
            wait.request.topic for wait in self._pending.values() if wait.request.topic)
        if wanted == self._subscribed:
            return
        if self._subscription is not None:
            self._subscription.unsubscribe()
            self._subscription = None
        self._subscribed = wanted
        if wanted:
            self._subscription = self.bus.subscribe(sorted(wanted), self._on_event, name="task-waits")

    # -- matching ----------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        """Bus callback: catch the pending waits `event` satisfies, and queue its lookup
        among the open ones."""
        self._heard += 1
        for wait in self._pending.values():
            if wait.catches(event):
                wait.caught = event  # written as the task suspends
        patterns = [text for text, pattern in self._patterns.items()
                    if pattern.compiled.matches(event.topic)]
        if not patterns:
            return
        self._unmatched.append(_Heard(self._heard, event, patterns, event_anchors(event.data)))
        if not self._looking():
            self._matcher = asyncio.get_running_loop().create_task(self._match())

    def _looking(self) -> bool:
        return self._matcher is not None and not self._matcher.done()

    async def _match(self) -> None:
        """Look up the heard events in the table, in order, those heard meanwhile together."""
        while self._unmatched:
            batch = [self._unmatched.popleft()
                     for _ in range(min(len(self._unmatched), _MATCH_BATCH))]
            rows = await self._lookup(batch)
            if rows is not None:
                self._give(batch, rows)
            # A wait written before the events still to look up were heard may have them.
            done = batch[-1].number
            self._written_at = {key: at for key, at in self._written_at.items() if at > done}

    async def _lookup(self, batch: list[_Heard]) -> list[Candidate] | None:
        """The open waits the batch's events may satisfy; None if the store refused."""
        patterns = sorted({pattern for heard in batch for pattern in heard.patterns})
        anchors = sorted({anchor for heard in batch for anchor in heard.anchors})
        delay = WRITE_RETRY_FIRST
        for attempt in range(1, _MATCH_TRIES + 1):
            try:
                return await self.store.matching(patterns, anchors)
            except Exception as exc:  # the store away: its events' waits are not resolved
                _LOG.error("waits.match_failed", events=len(batch), error=describe(exc),
                           retry_in=delay if attempt < _MATCH_TRIES else None)
                if attempt == _MATCH_TRIES:
                    return None
                await asyncio.sleep(delay)
                delay = min(delay * 2, WRITE_RETRY_MAX)
        return None

    def _give(self, batch: list[_Heard], rows: list[Candidate]) -> None:
        """Resolve each wait found with the first event of the batch it accepts."""
        # By pattern and anchor: an event is checked against the waits anchored on its own
        # fields, not against every wait the batch's other events found.
        found: dict[tuple[str, str], list[tuple[WaitKey, Mapping[str, Any] | None]]] = {}
        for task_id, seq, pattern, anchor, match in rows:
            found.setdefault((pattern, anchor), []).append(
                ((task_id, seq), None if match is None else json.loads(match)))
        now = time.monotonic()
        seen = {pattern for pattern, _ in found}
        for text in {text for heard in batch for text in heard.patterns} - seen:
            # Nothing of it found: its count may run over (its waits cancelled, resolved
            # elsewhere). Asked of the table now and then, not for every such event.
            known = self._patterns.get(text)
            if known is not None and now - known.checked_at >= _RECHECK:
                self._spawn(self._recheck(text))
        for heard in batch:
            for pattern in heard.patterns:
                for anchor in heard.anchors:
                    for key, wanted in found.get((pattern, anchor), ()):
                        if (key in self._resolving or key in self._pending
                                or heard.number <= self._written_at.get(key, 0)
                                or not _accepts(wanted, heard.event.data)):
                            continue
                        self._resolve_soon(key, pattern, heard.event)

    def _resolve_soon(self, key: WaitKey, pattern: str, event: Event) -> None:
        self._resolving.add(key)
        self._spawn(self._resolve(key, pattern, event))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resolve(self, key: WaitKey, pattern: str, event: Event) -> None:
        task_id, seq = key
        outcome = event_outcome(event)
        delay = WRITE_RETRY_FIRST
        try:
            while True:
                try:
                    with self.queue.publishing_queued():
                        record = await self.store.resolve(task_id, seq, outcome, False, time.time())
                        if record is not None:
                            self._closed(pattern)
                            self._resumed(record, seq, timed_out=False)
                    return
                except StoreWriteError as exc:  # the event would be lost: write it again
                    _LOG.error("waits.resolve_failed", task_id=task_id, error=str(exc),
                               retry_in=delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, WRITE_RETRY_MAX)
                except Exception as exc:  # the store closed: the wait stays open in the table
                    _LOG.error("waits.resolve_failed", task_id=task_id, error=describe(exc))
                    return
        finally:
            self._resolving.discard(key)

    async def _rebuild(self) -> None:
        """Count the open event waits by pattern from the table."""
        counts = await self.store.event_patterns()
        self._patterns = {text: _Pattern(_parsed(text), count) for text, count in counts.items()}
        self._resubscribe()

    def _added_elsewhere(self, task_id: int, seq: int) -> None:
        """Another daemon wrote a wait: count it if it is an event wait, and look at the
        timers again."""
        self._timer_wake.set()
        self._spawn(self._count_stored(task_id, seq))

    async def _count_stored(self, task_id: int, seq: int) -> None:
        try:
            stored = await self.store.recorded(task_id, seq)
        except Exception as exc:  # the store away: the reconnect counts again
            _LOG.warning("waits.index_failed", task_id=task_id, error=describe(exc))
            return
        request = None if stored is None or stored.resolved else stored.request
        if request is not None and request.kind == "event" and request.topic is not None:
            self._written((task_id, seq), request.topic)

    def _reconnected(self) -> None:
        """News of other daemons' waits may have been lost: count the waits again."""
        self._timer_wake.set()
        if self._rebuilding is None or self._rebuilding.done():
            self._rebuilding = asyncio.get_running_loop().create_task(self._rebuild_quietly())

    async def _rebuild_quietly(self) -> None:
        try:
            await self._rebuild()
        except Exception as exc:  # the store away again: the next reconnect rebuilds
            _LOG.warning("waits.index_failed", error=describe(exc))
