"""`WaitStore` (agentd/waits.py) on PostgreSQL: the `task_waits` table shared by daemons.

What differs from SQLite: a suspend applies only while this daemon holds the task's lease
(as an ack); every write that queues a task again notifies `agentd_work`, so any daemon
claims it; and a daemon that writes a wait notifies `agentd_waits` ("<node> <task id>
<seq>"), so the others put an event wait into their index and look at their timers again.
Timers fire on whichever daemon comes first: the write that resolves a wait takes its row
only while it is open.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agentd.errors import TaskNotFoundError, TaskStateError
from agentd.postgres.tasks import DONE, WORK, PgTasks
from agentd.store.postgres import PgConnection, PgStore, notify
from agentd.taskqueue import TaskRecord
from agentd.waits import (
    Candidate,
    StoredWait,
    Suspended,
    WaitRequest,
    Woken,
    decode_request,
    decode_stored,
    question_of,
    request_values,
    wait_anchor,
)

WAITS = "agentd_waits"
_FIRE_BATCH = 500  # timers fired per transaction

_RECORDED = "SELECT * FROM task_waits WHERE task_id = $1 AND seq = $2"
_SUSPEND = (
    "UPDATE tasks SET status = CASE WHEN cancel_requested <> 0 THEN 'cancelled' ELSE $1::text END, "
    "run_at = $2, error = CASE WHEN cancel_requested <> 0 THEN 'cancelled' ELSE error END, "
    "finished_at = CASE WHEN cancel_requested <> 0 THEN $2::float8 END, "
    "expires_at = CASE WHEN cancel_requested <> 0 THEN $3::float8 END, "
    "lease_until = NULL, lease_node = NULL, "
    "attempts = attempts - CASE WHEN cancel_requested <> 0 THEN 0 ELSE 1 END "
    "WHERE id = $4 AND status = 'running' AND lease_node = $5 RETURNING *")
_WRITE_WAIT = (
    "INSERT INTO task_waits (task_id, seq, kind, topic, match, prompt, data, wake_at, created_at, "
    "resolved_at, outcome, anchor) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) "
    "ON CONFLICT (task_id, seq) DO UPDATE SET "
    "kind = excluded.kind, topic = excluded.topic, match = excluded.match, "
    "anchor = excluded.anchor, "
    "prompt = excluded.prompt, data = excluded.data, wake_at = excluded.wake_at, "
    "created_at = excluded.created_at, resolved_at = excluded.resolved_at, "
    "outcome = excluded.outcome, timed_out = 0")
_CLOSE = (
    "UPDATE task_waits SET resolved_at = $1, outcome = $2, timed_out = $3 "
    "WHERE task_id = $4 AND seq = $5 AND resolved_at IS NULL "
    "AND EXISTS (SELECT 1 FROM tasks WHERE id = task_id AND status = 'waiting') RETURNING seq")
_WAKE = ("UPDATE tasks SET status = 'queued', run_at = $1 WHERE id = $2 AND status = 'waiting' "
         "RETURNING *")
_DUE = ("SELECT task_id, seq, kind, topic FROM task_waits WHERE resolved_at IS NULL "
        "AND wake_at IS NOT NULL AND wake_at <= $1 ORDER BY wake_at LIMIT $2 "
        "FOR UPDATE SKIP LOCKED")
_CLOSE_ORPHAN = "UPDATE task_waits SET resolved_at = $1 WHERE task_id = $2 AND seq = $3"
_NEXT_DUE = ("SELECT min(wake_at) FROM task_waits WHERE resolved_at IS NULL "
             "AND wake_at IS NOT NULL")
_EVENT_PATTERNS = ("SELECT topic, count(*) FROM task_waits WHERE resolved_at IS NULL "
                   "AND kind = 'event' GROUP BY topic")
_HAS_EVENT_WAITS = ("SELECT 1 FROM task_waits WHERE resolved_at IS NULL AND kind = 'event' "
                    "AND topic = $1 LIMIT 1")
_MATCHING = ("SELECT w.task_id, w.seq, w.topic, w.anchor, w.match FROM task_waits w "
             "JOIN tasks t ON t.id = w.task_id WHERE w.resolved_at IS NULL AND w.kind = 'event' "
             "AND w.topic = ANY($1::text[]) AND w.anchor = ANY($2::text[]) AND t.status = 'waiting'")
_OPEN_WAITS = "SELECT * FROM task_waits WHERE resolved_at IS NULL AND task_id = ANY($1::bigint[])"
_QUESTIONS = ("SELECT t.*, w.seq, w.kind, w.topic, w.match, w.prompt, w.data, w.wake_at "
              "FROM task_waits w JOIN tasks t ON t.id = w.task_id "
              "WHERE w.resolved_at IS NULL AND w.kind = 'ask' AND t.status = 'waiting' "
              "AND w.task_id < $1 ORDER BY w.task_id DESC LIMIT $2")
_QUESTION_OF = ("SELECT seq FROM task_waits WHERE task_id = $1 AND kind = 'ask' "
                "AND resolved_at IS NULL FOR UPDATE")
_TASK_STATUS = "SELECT status FROM tasks WHERE id = $1"
_NO_ID = 2**63 - 1  # above every task id: `questions` from the newest


async def _resolve(conn: PgConnection, task_id: int, seq: int, *, outcome: str | None,
                   timed_out: bool, now: float) -> TaskRecord | None:
    if await conn.fetchval(_CLOSE, now, outcome, int(timed_out), task_id, seq) is None:
        return None
    row = await conn.fetchrow(_WAKE, now, task_id)
    if row is None:
        return None
    notify(WORK, row["queue"])
    return TaskRecord.from_row(row)


class PgWaits:
    """`WaitStore` on a `PgStore`; see the module docstring."""

    def __init__(self, store: PgStore, tasks: PgTasks) -> None:
        self.store = store
        self.node_id = tasks.node_id

    async def recorded(self, task_id: int, seq: int) -> StoredWait | None:
        row = await self.store.read_one(_RECORDED, (task_id, seq))
        return None if row is None else decode_stored(row)

    def suspend(self, record: TaskRecord, request: WaitRequest, caught: str | None, now: float,
                expires_at: float) -> Awaitable[tuple[Suspended, TaskRecord | None]]:
        node = self.node_id

        async def op(conn: PgConnection) -> tuple[Suspended, TaskRecord | None]:
            row = await conn.fetchrow(_SUSPEND, "waiting" if caught is None else "queued", now,
                                      expires_at, record.id, node)
            if row is None:  # the lease lapsed and another daemon took the task over
                return "lost", None
            task = TaskRecord.from_row(row)
            if task.status == "cancelled":
                notify(DONE, f"{node} {record.id}")
                return "cancelled", task
            await conn.execute(_WRITE_WAIT, record.id, request.seq, *request_values(request), now,
                               None if caught is None else now, caught, wait_anchor(request))
            if caught is not None:
                notify(WORK, task.queue)
                return "queued", task
            notify(WAITS, f"{node} {record.id} {request.seq}")
            return "waiting", task

        return self.store.write(op)

    def resolve(self, task_id: int, seq: int, outcome: str | None, timed_out: bool,
                now: float) -> Awaitable[TaskRecord | None]:
        async def op(conn: PgConnection) -> TaskRecord | None:
            return await _resolve(conn, task_id, seq, outcome=outcome, timed_out=timed_out, now=now)

        return self.store.write(op)

    def fire_due(self, now: float) -> Awaitable[list[Woken]]:
        async def op(conn: PgConnection) -> list[Woken]:
            woken: list[Woken] = []
            for task_id, seq, kind, topic in await conn.fetch(_DUE, now, _FIRE_BATCH):
                timed_out = kind != "sleep"
                record = await _resolve(conn, task_id, seq, outcome=None, timed_out=timed_out, now=now)
                if record is None:  # the task no longer waits: nothing to wake
                    await conn.execute(_CLOSE_ORPHAN, now, task_id, seq)
                    continue
                woken.append(Woken(record, seq, timed_out, topic))
            return woken

        return self.store.write(op)

    async def next_due(self) -> float | None:
        row = await self.store.read_one(_NEXT_DUE)
        return None if row is None else row[0]

    async def event_patterns(self) -> dict[str, int]:
        return {row[0]: row[1] for row in await self.store.read(_EVENT_PATTERNS)}

    async def has_event_waits(self, pattern: str) -> bool:
        return await self.store.read_one(_HAS_EVENT_WAITS, (pattern,)) is not None

    async def matching(self, patterns: Sequence[str], anchors: Sequence[str]) -> list[Candidate]:
        rows = await self.store.read(_MATCHING, (list(patterns), list(anchors)))
        return [(row[0], row[1], row[2], row[3], row[4]) for row in rows]

    async def open_waits(self, task_ids: Sequence[int]) -> dict[int, WaitRequest]:
        if not task_ids:
            return {}
        rows = await self.store.read(_OPEN_WAITS, (list(task_ids),))
        return {row["task_id"]: decode_request(row) for row in rows}

    async def questions(self, before_id: int | None, limit: int) -> list[tuple[TaskRecord, WaitRequest]]:
        rows = await self.store.read(_QUESTIONS, (_NO_ID if before_id is None else before_id, limit))
        return [question_of(row) for row in rows]

    def answer(self, task_id: int, answer: str, now: float) -> Awaitable[tuple[TaskRecord, int]]:
        async def op(conn: PgConnection) -> tuple[TaskRecord, int]:
            seq = await conn.fetchval(_QUESTION_OF, task_id)
            record = None if seq is None else await _resolve(
                conn, task_id, seq, outcome=answer, timed_out=False, now=now)
            if seq is None or record is None:
                status = await conn.fetchval(_TASK_STATUS, task_id)
                if status is None:
                    raise TaskNotFoundError(f"no task with id {task_id}")
                raise TaskStateError(
                    f"task {task_id} asks no question (it is {status}): nothing to answer")
            return record, seq

        return self.store.write(op)

    def listen(self, *, added: Callable[[int, int], None], reconnect: Callable[[], None]) -> None:
        def heard(payload: str) -> None:
            origin, task_id, seq = _parts(payload)
            if origin != self.node_id:
                added(int(task_id), int(seq))

        self.store.listen(WAITS, heard)
        self.store.on_reconnect(reconnect)


def _parts(payload: str) -> tuple[Any, ...]:
    """A `agentd_waits` payload: node, task id, seq."""
    origin, task_id, seq = payload.rsplit(" ", 2)
    return origin, task_id, seq
