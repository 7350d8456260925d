"""The durable queue against the real daemon: semantics, retries, limits, cancellation,
results, the task context and the events every state change publishes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agentd.config import StoreConfig
from agentd.errors import (
    InvalidTaskError,
    StoreBusyError,
    TaskFailedError,
    TaskNotFoundError,
    UnknownTaskError,
)
from agentd.store import Connection
from agentd.store.sqlite import SqliteStore
from agentd.taskqueue import TaskRecord, TaskRequest, claim

pytestmark = pytest.mark.both_stores

FAST_RETRIES = {"retry_base": 0.01, "retry_max": 0.02}


# -- the daemon's store, on either engine: statements written with `?` placeholders --------


def _dialect(daemon: Any, sql: str) -> str:
    """`sql` for the daemon's engine: `?` placeholders become `$1`, `$2`... on PostgreSQL."""
    if daemon.storage.postgres is None:
        return sql
    numbers = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(numbers)}", sql)


async def execute(daemon: Any, sql: str, *params: Any) -> None:
    """Run one statement in a write transaction of the daemon's store."""
    statement = _dialect(daemon, sql)
    if daemon.storage.postgres is None:
        await daemon.store.write(lambda conn: conn.execute(statement, params))
        return

    async def op(conn: Any) -> None:
        await conn.execute(statement, *params)

    await daemon.store.write(op)


async def rows(daemon: Any, sql: str, *params: Any) -> list[dict[str, Any]]:
    """The rows of a query on the daemon's store (not its write connection), as dicts."""
    return [dict(zip(row.keys(), row, strict=True)) if hasattr(row, "keys") and not hasattr(row, "items")
            else dict(row) for row in await daemon.store.read(_dialect(daemon, sql), params)]


async def outside(daemon: Any, sql: str, *params: Any) -> list[dict[str, Any]]:
    """Run one statement on a connection of its own, outside the daemon (which may be
    stopped), committed; its rows as dicts."""
    statement = _dialect(daemon, sql)
    if daemon.storage.postgres is None:
        with sqlite3.connect(daemon.store.path) as conn:
            cursor = conn.execute(statement, params)
            names = [d[0] for d in cursor.description or ()]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    import asyncpg

    conn = await asyncpg.connect(daemon.config.store.url)
    try:
        return [dict(row) for row in await conn.fetch(statement, *params)]
    finally:
        await conn.close()


async def committed(daemon: Any) -> None:
    """A write transaction through the daemon's store: the writes asked for before it,
    and what their commits woke, are done (writes commit in order)."""
    if daemon.storage.postgres is None:
        await daemon.store.write(lambda conn: None)
        return

    async def op(conn: Any) -> None:
        return None

    await daemon.store.write(op)


@pytest.fixture
def qt_dir(copied_plugin: Any) -> Path:
    return copied_plugin("queue_plugin.py", "qt")


@pytest.fixture
async def qt(start_daemon: Any, qt_dir: Path) -> Any:
    """`daemon, events, module = await qt(workers={"default": 4}, sections={...}, **tasks_options)`:
    `sections` are other agentd.toml tables."""

    async def start(workers: dict[str, int] | None = None, plugin_table: dict[str, Any] | None = None,
                    state_dir: Path | None = None, stop_timeout: float = 5.0,
                    sections: dict[str, dict[str, Any]] | None = None,
                    **tasks: Any) -> tuple[Any, Any, ModuleType]:
        overrides: dict[str, dict[str, Any]] = {
            **(sections or {}),
            "tasks": {"queues": workers or {"default": 4}, **FAST_RETRIES, **tasks},
            "daemon": {"stop_timeout": stop_timeout}}
        if plugin_table is not None:
            overrides["plugins"] = {"qt": plugin_table}
        daemon, events = await start_daemon(plugin_dirs=[qt_dir], overrides=overrides,
                                            state_dir=state_dir)
        if daemon.storage.postgres is not None:
            # Started: the first LISTEN wakes every claim loop (news may have been missed);
            # tests that count transactions begin once those claims are in.
            await asyncio.wait_for(daemon.storage.postgres.listening.wait(), 10)
            await committed(daemon)
            await committed(daemon)
        return daemon, events, sys.modules["agentd_plugins.qt"]

    return start


async def test_enqueue_returns_after_the_row_is_committed(qt: Any) -> None:
    daemon, _, _ = await qt()
    record = await daemon.queue.enqueue("qt.echo", {"value": 1}, delay=60)
    # A reading connection sees the row as soon as enqueue returns: it was committed.
    (row,) = await rows(daemon, "SELECT name, status, args FROM tasks WHERE id = ?", record.id)
    assert row == {"name": "qt.echo", "status": "queued", "args": '{"value":1}'}


async def test_a_cancelled_enqueue_does_not_fail_the_others_of_its_tick(qt: Any) -> None:
    """Single enqueues of a tick share one INSERT and one future: a caller cancelled while
    it waited (its HTTP client gone) made the others raise CancelledError, their tasks
    stored all the same. Now the others get their tasks."""
    daemon, _, _ = await qt()
    gone = asyncio.ensure_future(daemon.queue.enqueue("qt.echo", {"value": 1}, delay=60))
    kept = asyncio.ensure_future(daemon.queue.enqueue("qt.echo", {"value": 2}, delay=60))
    await asyncio.sleep(0)  # noqa: sleep - a yield: both start and wait on their tick's INSERT
    gone.cancel()
    record = await asyncio.wait_for(kept, 10)
    assert record.args == {"value": 2} and record.status == "queued"


async def test_a_limited_claim_rolled_back_with_its_batch_claims_again(tmp_path: Path) -> None:
    """A claim shares its transaction with other writes; when one of them fails, every op
    is run again alone. The claim of a concurrency-limited task had counted the task running
    on its first run: run again it claimed nothing and, the group counted full, its
    queue would not even wait for the task's due time (a stall until something woke it)."""
    store = SqliteStore(tmp_path / "agentd.db", StoreConfig(), extensions=False)
    await store.open()
    try:
        now = time.time()
        await store.write(lambda conn: conn.execute(
            "INSERT INTO tasks (queue, name, args, status, priority, run_at, max_attempts, "
            "created_at) VALUES ('default', 'qt.limited', '{}', 'queued', 0, ?, 3, ?)", (now, now)))
        claimed = store.join_batch(partial(claim, queue="default", wanted=1,
                                           limits={"qt.limited": (1, None, 1.0)}, running={},
                                           spent={}, lease=30.0))

        def refused(conn: Connection) -> None:
            raise TaskNotFoundError("no task with id 99")  # a cancel of an unknown task

        with pytest.raises(TaskNotFoundError):
            await store.write(refused)  # joins the claim's batch, and fails it
        records, _ = await asyncio.wait_for(claimed, 10)
        assert [record.name for record in records] == ["qt.limited"]
    finally:
        await store.close()


async def test_bad_enqueues_are_refused_with_the_reason(qt: Any) -> None:
    daemon, _, _ = await qt()
    with pytest.raises(UnknownTaskError, match=r"qt\.missing"):
        await daemon.queue.enqueue("qt.missing")
    with pytest.raises(InvalidTaskError, match="args must be JSON-serialisable"):
        await daemon.queue.enqueue("qt.echo", {"value": {1, 2}})
    contains_itself: list[Any] = []
    contains_itself.append(contains_itself)
    with pytest.raises(InvalidTaskError, match="args must be JSON-serialisable: it contains itself"):
        await daemon.queue.enqueue("qt.echo", {"value": contains_itself})
    # Refused before the insert they would share: their neighbours are still enqueued.
    good, too_big, not_int = await asyncio.gather(
        daemon.queue.enqueue("qt.echo", {"value": "good"}, delay=3600),
        daemon.queue.enqueue("qt.echo", priority=2**63, delay=3600),
        daemon.queue.enqueue("qt.echo", max_attempts="3", delay=3600), return_exceptions=True)
    assert isinstance(too_big, InvalidTaskError) and "priority must be an integer" in str(too_big)
    assert isinstance(not_int, InvalidTaskError) and "max_attempts must be an integer" in str(not_int)
    assert isinstance(good, TaskRecord)
    await daemon.queue.cancel(good.id)
    with pytest.raises(InvalidTaskError, match="unexpected keyword argument 'nope'"):
        await daemon.queue.enqueue("qt.echo", {"nope": 1})
    # Any keyword goes, except the context's own name.
    with pytest.raises(InvalidTaskError, match="multiple values for argument 'ctx'"):
        await daemon.queue.enqueue("qt.any_keywords", {"ctx": 1})
    with pytest.raises(InvalidTaskError, match="queue 'elsewhere' has no workers"):
        await daemon.queue.enqueue("qt.echo", queue="elsewhere")
    with pytest.raises(InvalidTaskError, match="either delay or run_at"):
        await daemon.queue.enqueue("qt.echo", delay=1, run_at=time.time())
    assert await daemon.queue.counts() == {"cancelled": 1}


async def test_a_task_runs_and_its_result_wakes_the_waiter(qt: Any) -> None:
    daemon, events, _ = await qt()
    record = await daemon.queue.enqueue("qt.echo", {"value": {"answer": 42}})
    assert await daemon.queue.result(record.id, timeout=5) == {"answer": 42}
    final = await daemon.queue.get(record.id)
    assert (final.status, final.attempts, final.result) == ("succeeded", 1, {"answer": 42})
    assert final.expires_at == pytest.approx(final.finished_at + daemon.config.tasks.result_ttl)
    topics = [e.topic for e in events.events if e.data.get("task_id") == record.id]
    assert topics == ["task.queued", "task.started", "task.succeeded"]
    for event in events.events:
        if event.topic.startswith("task."):
            assert event.data["name"] and event.data["task_id"]


@pytest.mark.sqlite_only  # on PostgreSQL the event log's relay to other daemons takes task.queued
async def test_task_events_nobody_takes_are_not_built(qt: Any) -> None:
    daemon, events, _ = await qt()
    events.close()  # the test's own capture takes every topic
    # By default the event log keeps no task.queued: with no other subscriber, none is made.
    published = daemon.bus.published
    await daemon.queue.enqueue("qt.echo", {"value": 1}, delay=60)
    assert daemon.bus.published == published
    seen: list[Any] = []
    with daemon.bus.subscribe("task.queued", seen.append):
        record = await daemon.queue.enqueue("qt.echo", {"value": 2}, delay=60)
    assert [(e.topic, e.data["task_id"]) for e in seen] == [("task.queued", record.id)]
    assert daemon.bus.published == published + 1


async def test_every_record_field_holds_its_own_column(qt: Any) -> None:
    """Records are built positionally; a field read from the wrong column fails here."""
    daemon, _, _ = await qt()
    parent = await daemon.queue.enqueue("qt.echo", {"value": 0})
    await daemon.queue.result(parent.id, timeout=5)
    queued = await daemon.queue.enqueue(
        "qt.echo", {"value": [7]}, priority=3, max_attempts=5, timeout=9.5, idempotency_key="k-1",
        parent_id=parent.id, correlation_id="corr-1")
    await daemon.queue.result(queued.id, timeout=5)
    await daemon.queue.add_usage(queued.id, {"total_tokens": 11})
    finished = await daemon.queue.get(queued.id)
    (row,) = await rows(daemon, "SELECT * FROM tasks WHERE id = ?", queued.id)
    decoded = {"args": {"value": [7]}, "result": [7], "usage": {"total_tokens": 11},
               "cancel_requested": False}
    for column, value in row.items():
        # Not record fields: the worker's business, and the claims' (the limit keys).
        if column not in ("lease_until", "lease_node", "concurrency_key", "rate_key"):
            assert getattr(finished, column) == decoded.get(column, value), column
    assert len({row["created_at"], row["started_at"], row["finished_at"], row["expires_at"]}) == 4
    # The record enqueue returns is built from the inserted values, not read back.
    for column in ("id", "queue", "name", "priority", "max_attempts", "timeout", "idempotency_key",
                   "parent_id", "correlation_id", "created_at", "run_at"):
        assert getattr(queued, column) == row[column], column
    assert (queued.status, queued.attempts, queued.args) == ("queued", 0, {"value": [7]})


async def test_the_record_a_worker_builds_from_its_claim_holds_each_column(qt: Any) -> None:
    """The worker reads a claimed row positionally and fills in what the claim set; its
    record is what waiters receive. A field read from the wrong column fails here."""
    daemon, _, module = await qt()
    parent = await daemon.queue.enqueue("qt.echo", {"value": 0})
    await daemon.queue.result(parent.id, timeout=5)
    record = await daemon.queue.enqueue(
        "qt.wait_gate", {"name": "columns", "result": [7]}, priority=3, max_attempts=5, timeout=9.5,
        idempotency_key="k-2", parent_id=parent.id, correlation_id="corr-2")
    await asyncio.wait_for(module.gate("started:columns").wait(), 5)
    waiting = asyncio.create_task(daemon.queue.wait(record.id, timeout=5))
    # agentd.db has one reader, which answers in order: once this read is back, the wait's
    # own read has found the task running, and the wait is for the worker's record.
    assert (await daemon.queue.get(record.id)).status == "running"
    module.gate("columns").set()
    settled = await waiting
    (row,) = await rows(daemon, "SELECT * FROM tasks WHERE id = ?", record.id)
    decoded = {"args": {"name": "columns", "result": [7]}, "result": [7], "cancel_requested": False}
    for column, value in row.items():
        # Not record fields: the worker's business, and the claims' (the limit keys).
        if column not in ("lease_until", "lease_node", "concurrency_key", "rate_key"):
            assert getattr(settled, column) == decoded.get(column, value), column
    assert len({row["created_at"], row["started_at"], row["finished_at"], row["expires_at"]}) == 4


async def test_failing_attempts_back_off_then_go_dead_and_can_be_requeued(qt: Any) -> None:
    daemon, events, _ = await qt()
    record = await daemon.queue.enqueue("qt.always_fails")
    final = await daemon.queue.wait(record.id, timeout=5)
    assert (final.status, final.attempts) == ("dead", 3)
    assert final.error == "RuntimeError: attempt 3 failed"
    retries = [e for e in events.events if e.topic == "task.retrying" and e.data["task_id"] == record.id]
    assert [e.data["attempt"] for e in retries] == [1, 2]
    assert all(0 <= e.data["delay"] <= FAST_RETRIES["retry_max"] for e in retries)
    await events.wait_for("task.dead", task_id=record.id)
    with pytest.raises(TaskFailedError, match="ended dead: RuntimeError: attempt 3 failed"):
        await daemon.queue.result(record.id)
    dead = await daemon.queue.list(status="dead")
    assert [t.id for t in dead] == [record.id]

    requeued = await daemon.queue.requeue(record.id)
    assert (requeued.status, requeued.attempts, requeued.error) == ("queued", 0, None)
    assert (await daemon.queue.wait(record.id, timeout=5)).attempts == 3


async def test_every_status_is_listed_and_counted_through_an_index(qt: Any) -> None:
    daemon, _, module = await qt()
    ok = await daemon.queue.enqueue("qt.echo", {"value": 1})
    failed = await daemon.queue.enqueue("qt.fail_now")
    dead = await daemon.queue.enqueue("qt.always_fails")
    running = await daemon.queue.enqueue("qt.wait_gate", {"name": "listed"})
    queued = await daemon.queue.enqueue("qt.echo", delay=3600)
    cancelled = await daemon.queue.enqueue("qt.echo", delay=3600)
    await daemon.queue.cancel(cancelled.id)
    for record in (ok, failed, dead):
        await daemon.queue.wait(record.id, timeout=5)
    await asyncio.wait_for(module.gate("started:listed").wait(), 5)
    expected = {"succeeded": ok, "failed": failed, "dead": dead, "running": running,
                "queued": queued, "cancelled": cancelled}
    for status, record in expected.items():
        assert [t.id for t in await daemon.queue.list(status=status)] == [record.id], status
        assert [t.id for t in await daemon.queue.list(status=status, name=record.name)] == [record.id]
        assert await daemon.queue.list(status=status, before_id=record.id) == []
    assert await daemon.queue.counts() == dict.fromkeys(expected, 1)
    # The rare statuses are found through an index, not by reading every task.
    for sql in () if daemon.storage.sqlite is None else (  # SQLite's plans
                "SELECT id FROM tasks WHERE error IS NOT NULL AND status = ? ORDER BY id DESC",
                "SELECT id FROM tasks INDEXED BY tasks_running "
                "WHERE status = 'running' AND status = ? ORDER BY id DESC"):
        plan = " ".join(row[3] for row in await daemon.store.read(f"EXPLAIN QUERY PLAN {sql}", ("dead",)))
        assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
    module.gate("listed").set()
    await daemon.queue.wait(running.id, timeout=5)


async def test_retry_raised_by_the_task_waits_its_delay(qt: Any) -> None:
    daemon, events, _ = await qt()
    record = await daemon.queue.enqueue("qt.retry_later", {"delay": 0.3})
    assert await daemon.queue.result(record.id, timeout=5) == 2
    retry = await events.wait_for("task.retrying", task_id=record.id)
    await events.wait_for("task.started", task_id=record.id, attempt=2)
    assert retry.data["delay"] == 0.3
    # Due 0.3 s after the first attempt ended, and not started before: read from the row, as
    # the retrying event is published after the retry commits (later on PostgreSQL).
    final = await daemon.queue.get(record.id)
    assert final.started_at is not None and final.started_at >= final.run_at >= record.created_at + 0.3


async def test_fail_and_a_non_json_result_end_the_task_without_retry(qt: Any) -> None:
    daemon, _, _ = await qt()
    failed = await daemon.queue.wait((await daemon.queue.enqueue("qt.fail_now")).id, timeout=5)
    assert (failed.status, failed.attempts, failed.error) == ("failed", 1, "Fail: no point retrying")
    odd = await daemon.queue.wait((await daemon.queue.enqueue("qt.not_json")).id, timeout=5)
    assert odd.status == "failed"
    assert "the result of qt.not_json must be JSON-serialisable" in (odd.error or "")


async def test_a_timed_out_attempt_is_a_failed_attempt(qt: Any) -> None:
    daemon, _, _ = await qt()
    final = await daemon.queue.wait((await daemon.queue.enqueue("qt.too_slow")).id, timeout=5)
    assert final.status == "dead"
    assert final.error == "TimeoutError: no result after 0.2 s"
    # A TimeoutError of the task's own (a client's) is told as it is, not as the task's.
    own = await daemon.queue.wait((await daemon.queue.enqueue("qt.upstream_timeout")).id, timeout=5)
    assert own.error == "TimeoutError: the upstream API took too long"


async def test_delayed_tasks_start_when_due_and_not_before(qt: Any) -> None:
    daemon, _, _ = await qt()
    record = await daemon.queue.enqueue("qt.echo", {"value": "late"}, delay=0.4)
    final = await daemon.queue.wait(record.id, timeout=5)
    assert final.started_at is not None
    assert final.started_at - record.created_at >= 0.4
    # Woken by its own timer, not a poll interval: it starts promptly once due.
    assert final.started_at - record.run_at < 0.25


async def test_higher_priority_runs_first(qt: Any) -> None:
    daemon, _, module = await qt(workers={"default": 1})
    await daemon.queue.enqueue("qt.wait_gate", {"name": "hold"})
    low = await daemon.queue.enqueue("qt.echo", {"value": "low"}, priority=0)
    high = await daemon.queue.enqueue("qt.echo", {"value": "high"}, priority=10)
    await asyncio.wait_for(module.gate("started:hold").wait(), 5)
    module.gate("hold").set()
    await daemon.queue.wait(low.id, timeout=5)
    order = [task_id for kind, task_id in module.STARTED if kind == "echo"]
    assert order == [high.id, low.id]


async def test_a_task_enqueued_while_its_queue_claims_waits_behind_what_the_claim_takes(
    qt: Any,
) -> None:
    """On PostgreSQL a task enqueued one at a time goes straight to a free slot of its own
    daemon (assigned), but not while that queue's claim is in flight: the claim may take an
    older task for the slot, which would then wait behind the newer one. (Seen: a task of
    priority 0 ran before an older one, and so before one of priority 10 enqueued next.)
    Nothing is claimed ahead: a claim in flight could otherwise take `low` ahead, and start
    it as `hold` ends if the claim that takes `high` has not come back yet."""
    daemon, _, module = await qt(workers={"default": 1}, claim_ahead=0)
    tasks = daemon.queue.tasks
    assigned = getattr(tasks, "assigned_out", 0)
    # A task with a key is queued, never assigned: the claim loop wakes and claims it.
    hold = await daemon.queue.enqueue("qt.wait_gate", {"name": "hold"}, idempotency_key="hold")

    async def claiming() -> bool:
        return "default" in daemon.workers._claiming

    await until(claiming)
    low = await daemon.queue.enqueue("qt.echo", {"value": "low"})
    assert getattr(tasks, "assigned_out", 0) == assigned  # queued, for the claims to take in order
    high = await daemon.queue.enqueue("qt.echo", {"value": "high"}, priority=10)
    await asyncio.wait_for(module.gate("started:hold").wait(), 5)
    module.gate("hold").set()
    await daemon.queue.wait(low.id, timeout=5)
    order = [task_id for kind, task_id in module.STARTED if kind in ("echo", "hold")]
    assert order == [hold.id, high.id, low.id]


async def test_each_named_queue_has_its_own_workers(qt: Any) -> None:
    daemon, _, module = await qt(workers={"default": 1, "reports": 1})
    await daemon.queue.enqueue("qt.wait_gate", {"name": "busy"})
    report = await daemon.queue.enqueue("qt.report")
    assert report.queue == "reports"
    # The default queue's only worker is busy; the reports queue runs anyway.
    assert await daemon.queue.result(report.id, timeout=5) == "report done"
    module.gate("busy").set()


async def test_concurrency_limit_per_task_name(qt: Any) -> None:
    daemon, _, module = await qt(workers={"default": 8})
    ids = [(await daemon.queue.enqueue("qt.limited", {"name": "lim"})).id for _ in range(5)]
    await asyncio.wait_for(module.gate("running:2").wait(), 5)
    running = await daemon.queue.list(status="running")
    assert len(running) == 2
    module.gate("lim").set()
    for task_id in ids:
        await daemon.queue.wait(task_id, timeout=5)
    assert module.RUNNING["max"] == 2


async def test_a_limited_name_waiting_on_another_queue_starts_when_one_ends(qt: Any) -> None:
    """The limit is per name, across queues: a task of the name waiting on another queue
    must be woken when one of the name ends (only the ending task's queue was)."""
    daemon, events, module = await qt(workers={"default": 2, "reports": 1})
    await daemon.queue.enqueue("qt.limited", {"name": "first"})
    await daemon.queue.enqueue("qt.limited", {"name": "second"})
    await asyncio.wait_for(module.gate("running:2").wait(), 5)
    waiting = await daemon.queue.enqueue("qt.limited", {"name": "third"}, queue="reports")
    # A barrier: the reports queue has tried its claim by the time two more commits are done.
    await committed(daemon)
    await committed(daemon)
    assert (await daemon.queue.get(waiting.id)).status == "queued"
    module.gate("first").set()
    await events.wait_for("task.started", task_id=waiting.id)
    module.gate("second").set()
    module.gate("third").set()
    assert (await daemon.queue.wait(waiting.id, timeout=5)).status == "succeeded"
    assert module.RUNNING["max"] == 2


async def test_a_parent_waiting_for_its_child_ends_at_once_when_cancelled(qt: Any) -> None:
    """Its slot, given back while it waited, went to another task: cancelled, the parent
    used to wait for a slot before it could end, until that other task finished."""
    daemon, _, module = await qt(workers={"default": 1})
    parent = await daemon.queue.enqueue("qt.gate_then_call", {"name": "parent"})
    await asyncio.wait_for(module.gate("started:parent").wait(), 5)
    await daemon.queue.enqueue("qt.wait_gate", {"name": "urgent"}, priority=10)
    module.gate("parent").set()  # it calls its child and gives its slot back...
    await asyncio.wait_for(module.gate("started:urgent").wait(), 5)  # ...to the urgent task
    await daemon.queue.cancel(parent.id)
    final = await daemon.queue.wait(parent.id, timeout=5)
    assert final.status == "cancelled"
    module.gate("urgent").set()


async def test_a_requeued_parent_runs_its_failed_children_again_and_keeps_its_steps(qt: Any) -> None:
    daemon, _, module = await qt()
    parent = await daemon.queue.enqueue("qt.parent_of_flaky")
    assert (await daemon.queue.wait(parent.id, timeout=5)).status == "dead"
    (failed_child,) = await daemon.queue.children(parent.id)
    await daemon.queue.requeue(parent.id)
    # The child's failure used to come back through its key: the parent could never succeed.
    assert await daemon.queue.result(parent.id, timeout=5) == "second time lucky"
    children = await daemon.queue.children(parent.id)
    assert len(children) == 2 and failed_child in children
    assert (await daemon.queue.get(failed_child)).status == "failed"  # its history is kept
    assert module.STEP_RUNS["before"] == 1  # the step it had done is not done again


async def test_a_step_gives_every_attempt_the_same_value(qt: Any) -> None:
    daemon, _, module = await qt()
    record = await daemon.queue.enqueue("qt.step_then_retry")
    expected = {"1": "one", "pair": [1, 2]}  # as JSON keeps it, from the first attempt on
    assert await daemon.queue.result(record.id, timeout=5) == expected
    assert [expected, expected] == module.STEP_VALUES


async def test_a_step_key_holding_a_nul_fails_the_task_naming_it(qt: Any) -> None:
    """PostgreSQL's text holds no U+0000: there the step's read failed with the driver's
    error; now both stores fail the attempt with one that names the key."""
    daemon, _, _ = await qt()
    record = await daemon.queue.enqueue("qt.step_named", {"key": "a\u0000b"}, max_attempts=1)
    final = await daemon.queue.wait(record.id, timeout=5)
    assert (final.status, final.error) == (
        "dead", "ValueError: step key 'a\\x00b' holds U+0000 (NUL), which the store cannot keep")
    fine = await daemon.queue.enqueue("qt.step_named", {"key": "a b"})
    assert await daemon.queue.result(fine.id, timeout=5) == "a b"


async def test_an_error_holding_a_nul_reads_the_same_in_the_event_and_the_row(qt: Any) -> None:
    """An exception's message may hold U+0000, which PostgreSQL's text cannot: the error is
    kept with `\\x00` in its place on both stores, and the task's event carries the same
    text (on PostgreSQL the event and `wait` had the NUL the row could not keep)."""
    daemon, events, module = await qt()
    name = "a\x00b"
    module.gate(name).set()
    record = await daemon.queue.enqueue("qt.fail_after_gate", {"name": name}, max_attempts=1)
    final = await daemon.queue.wait(record.id, timeout=5)
    dead = await events.wait_for("task.dead", 5, task_id=record.id)
    stored = await daemon.queue.get(record.id)
    assert final.error == stored.error == dead.data["error"] == "RuntimeError: a\\x00b failed"


async def test_a_parent_that_goes_on_after_a_failed_gather_waits_for_its_slot(qt: Any) -> None:
    daemon, _, module = await qt(workers={"default": 1})
    # Short tasks first: the two children are then claimed together, and the sibling takes
    # the slot the failed child frees before the parent hears of the failure. (Claimed
    # apart, the parent may take it first, rightly: it goes before new claims.)
    await run_short_tasks(daemon, 10)
    parent = await daemon.queue.enqueue("qt.gather_with_a_failure")
    await asyncio.wait_for(module.gate("started:sibling").wait(), 5)
    # A barrier: the parent, told its first child failed, has gone as far as it can.
    await committed(daemon)
    await committed(daemon)
    # One worker, held by the sibling: the parent used to go on without a slot.
    assert not module.gate("after the gather").is_set()
    module.gate("sibling").set()
    assert await daemon.queue.result(parent.id, timeout=5) == "went on"


async def test_a_key_given_to_ctx_submit_lasts_the_configured_window(qt: Any) -> None:
    daemon, _, _ = await qt(idempotency_window=0)
    first = await daemon.queue.result((await daemon.queue.enqueue("qt.submit_keyed", {"key": "daily"})).id,
                                      timeout=5)
    second = await daemon.queue.result((await daemon.queue.enqueue("qt.submit_keyed", {"key": "daily"})).id,
                                       timeout=5)
    assert first != second  # past the window (0 s), the key makes a new child


async def test_a_requeued_parent_does_not_get_back_a_child_still_being_cancelled(qt: Any) -> None:
    daemon, _, module = await qt(workers={"default": 2})
    parent = await daemon.queue.enqueue("qt.parent_of_slow")
    await asyncio.wait_for(module.gate("started:slow child").wait(), 5)
    await daemon.queue.cancel(parent.id)
    assert (await daemon.queue.wait(parent.id, timeout=5)).status == "cancelled"
    (cancelling,) = await daemon.queue.children(parent.id)
    assert (await daemon.queue.get(cancelling)).status == "running"  # its cleanup waits
    await daemon.queue.requeue(parent.id)
    module.gate("slow child").set()  # the new child's wait
    module.gate("cleanup:slow child").set()
    assert await daemon.queue.result(parent.id, timeout=5) == "slow child done"
    assert (await daemon.queue.wait(cancelling, timeout=5)).status == "cancelled"


async def test_rate_limit_is_a_token_bucket(qt: Any) -> None:
    daemon, _, _ = await qt(workers={"default": 8})
    ids = [(await daemon.queue.enqueue("qt.rated")).id for _ in range(6)]
    finals = [await daemon.queue.wait(task_id, timeout=5) for task_id in ids]
    starts = sorted(f.started_at for f in finals if f.started_at is not None)
    # 4 tokens at once (the burst), then one every 0.25 s.
    assert starts[3] - starts[0] < 0.2
    assert starts[4] - starts[0] >= 0.2
    assert starts[5] - starts[0] >= 0.45


async def test_idempotency_key_returns_the_existing_task_within_the_window(qt: Any) -> None:
    daemon, _, _ = await qt()
    first = await daemon.queue.enqueue_many([TaskRequest("qt.echo", {"value": 1}, idempotency_key="k1")])
    again = await daemon.queue.enqueue_many([TaskRequest("qt.echo", {"value": 2}, idempotency_key="k1")])
    assert first[0].created and not again[0].created
    assert again[0].task.id == first[0].task.id
    assert again[0].task.args == {"value": 1}
    # Past the window the key makes a new task.
    late = await daemon.queue.enqueue_many(
        [TaskRequest("qt.echo", {"value": 3}, idempotency_key="k1", dedupe_window=0.0)])
    assert late[0].created and late[0].task.id != first[0].task.id


async def test_a_large_batch_gets_each_row_its_own_id_with_or_without_keys(qt: Any) -> None:
    """Batches without idempotency keys are inserted many rows per statement: every returned
    task's id must still name the row holding its own arguments."""
    daemon, _, _ = await qt()
    plain = await daemon.queue.enqueue_many(
        [TaskRequest("qt.echo", {"value": i}, delay=60) for i in range(1201)])  # > 2 statements
    keyed = await daemon.queue.enqueue_many(
        [TaskRequest("qt.echo", {"value": -i}, delay=60, idempotency_key=f"b{i}") for i in range(3)])
    for outcome in (*plain, *keyed):
        stored = await daemon.queue.get(outcome.task.id)
        assert (stored.args, outcome.created) == (outcome.task.args, True)
    ids = [o.task.id for o in (*plain, *keyed)]
    assert ids == sorted(set(ids))


async def test_cancel_a_queued_task_and_it_never_runs_even_after_a_restart(
    qt: Any, tmp_path: Path
) -> None:
    daemon, events, module = await qt(state_dir=tmp_path / "one")
    record = await daemon.queue.enqueue("qt.echo", {"value": 1}, delay=0.3)
    cancelled = await daemon.queue.cancel(record.id)
    assert (cancelled.status, cancelled.cancel_requested) == ("cancelled", True)
    await events.wait_for("task.cancelled", task_id=record.id)
    await daemon.stop()
    daemon, _, module = await qt(state_dir=tmp_path / "one")
    later = await daemon.queue.enqueue("qt.echo", {"value": 2}, delay=0.35)
    await daemon.queue.wait(later.id, timeout=5)
    assert (await daemon.queue.get(record.id)).status == "cancelled"
    assert ("echo", record.id) not in module.STARTED


async def test_cancel_a_running_task_cancels_its_coroutine_and_its_children(qt: Any) -> None:
    daemon, events, module = await qt()
    parent = await daemon.queue.enqueue("qt.parent_of_waiter", {"name": "child-gate"})
    await asyncio.wait_for(module.gate("started:child-gate").wait(), 5)
    (child_id,) = await daemon.queue.children(parent.id)
    await daemon.queue.cancel(parent.id)
    assert (await daemon.queue.wait(parent.id, timeout=5)).status == "cancelled"
    assert (await daemon.queue.wait(child_id, timeout=5)).status == "cancelled"
    assert child_id in module.CANCELLED
    await events.wait_for("task.cancelled", task_id=child_id)


async def test_a_restart_requeues_what_a_dead_process_left_running(qt: Any, tmp_path: Path) -> None:
    daemon, _, _ = await qt(state_dir=tmp_path / "s")
    fresh = await daemon.queue.enqueue("qt.echo", {"value": "again"}, delay=3600)
    last_try = await daemon.queue.enqueue("qt.echo", {"value": "x"}, delay=3600, max_attempts=2)
    doomed = await daemon.queue.enqueue("qt.echo", {"value": "y"}, delay=3600)
    await daemon.stop()
    # What a process killed mid-attempt leaves behind: rows still `running`.
    # (Leases long lapsed: on PostgreSQL, rows leased by others are theirs until they lapse.)
    await outside(daemon, "UPDATE tasks SET status = 'running', attempts = 1, run_at = 0, "
                  "lease_until = 1 WHERE id = ?", fresh.id)
    await outside(daemon, "UPDATE tasks SET status = 'running', attempts = 2, lease_until = 1 "
                  "WHERE id = ?", last_try.id)
    await outside(daemon, "UPDATE tasks SET status = 'running', attempts = 1, cancel_requested = 1, "
                  "lease_until = 1 WHERE id = ?", doomed.id)
    daemon, _, _ = await qt(state_dir=tmp_path / "s")
    assert await daemon.queue.result(fresh.id, timeout=5) == "again"
    assert (await daemon.queue.get(fresh.id)).attempts == 2  # the interrupted attempt counts
    dead = await daemon.queue.get(last_try.id)
    assert dead.status == "dead" and "died during attempt 2 of 2" in (dead.error or "")
    assert (await daemon.queue.get(doomed.id)).status == "cancelled"


async def test_results_expire_after_their_ttl(qt: Any) -> None:
    daemon, _, _ = await qt(result_ttl=0.0)
    record = await daemon.queue.enqueue("qt.echo", {"value": 1})
    await daemon.queue.wait(record.id, timeout=5)
    assert await daemon.queue.purge_expired() == 1
    with pytest.raises(TaskNotFoundError):
        await daemon.queue.get(record.id)


async def test_wait_times_out_and_unknown_ids_are_named(qt: Any) -> None:
    daemon, _, module = await qt()
    record = await daemon.queue.enqueue("qt.wait_gate", {"name": "slow"})
    with pytest.raises(TimeoutError):
        await daemon.queue.wait(record.id, timeout=0.05)
    module.gate("slow").set()
    with pytest.raises(TaskNotFoundError, match="no task with id 999999"):
        await daemon.queue.wait(999999, timeout=1)


async def test_context_identity_config_and_progress_events(qt: Any) -> None:
    daemon, events, _ = await qt(plugin_table={"greeting": "hi"})
    record = await daemon.queue.enqueue("qt.info")
    info = await daemon.queue.result(record.id, timeout=5)
    assert info == {"id": record.id, "name": "qt.info", "attempt": 1, "parent": None,
                    "config": {"greeting": "hi"}}
    progress = await events.wait_for("task.progress", task_id=record.id)
    assert progress.data["kind"] == "looked" and progress.data["data"] == {"at": "myself"}
    assert progress.correlation_id == str(record.id)


async def test_sync_tasks_run_in_a_thread_and_report_progress(qt: Any) -> None:
    daemon, events, module = await qt()
    record = await daemon.queue.enqueue("qt.blocking", {"x": 21})
    assert await daemon.queue.result(record.id, timeout=5) == 42
    assert module.THREADS and module.THREADS[0] != __import__("threading").get_ident()
    progress = await events.wait_for("task.progress", task_id=record.id)
    assert progress.data["data"] == {"x": 21}


async def test_sync_tasks_beyond_threads_wait_in_their_slots_for_a_thread(qt: Any) -> None:
    daemon, events, module = await qt(workers={"default": 8}, threads=2)
    records = [await daemon.queue.enqueue("qt.held_in_thread") for _ in range(5)]
    try:
        for record in records:
            # A task's thread starts in the same step as its task.started goes out.
            await events.wait_for("task.started", task_id=record.id)
        assert daemon.workers.describe_running().startswith("5 running tasks")
        assert ", 2 of them in threads;" in daemon.workers.describe_running()
    finally:
        module.THREAD_GATE.set()
    assert [await daemon.queue.result(r.id, timeout=5) for r in records] == ["held"] * 5


async def test_children_are_durable_linked_and_fan_in(qt: Any) -> None:
    daemon, events, _ = await qt()
    parent = await daemon.queue.enqueue("qt.parent", {"values": [1, 2, 3]})
    assert await daemon.queue.result(parent.id, timeout=5) == 6
    children = [await daemon.queue.get(i) for i in await daemon.queue.children(parent.id)]
    assert [c.idempotency_key for c in children] == [f"{parent.id}:{n}" for n in (1, 2, 3)]
    assert all(c.parent_id == parent.id and c.correlation_id == str(parent.id) for c in children)
    child_events = [e for e in events.events if e.data.get("task_id") == children[0].id]
    assert child_events and all(e.causation_id == str(parent.id) for e in child_events)


async def test_one_worker_is_enough_for_a_parent_and_its_children(qt: Any) -> None:
    daemon, _, _ = await qt(workers={"default": 1})
    parent = await daemon.queue.enqueue("qt.serial_parent")
    assert await daemon.queue.result(parent.id, timeout=5) == [1, 2]
    fan = await daemon.queue.enqueue("qt.parent", {"values": [5, 6]})
    assert await daemon.queue.result(fan.id, timeout=5) == 11


async def test_a_failed_child_raises_in_the_parent(qt: Any) -> None:
    daemon, _, _ = await qt()
    parent = await daemon.queue.enqueue("qt.parent_of_failure")
    final = await daemon.queue.wait(parent.id, timeout=5)
    assert final.status == "dead"
    assert "ended failed: Fail: no point retrying" in (final.error or "")


async def test_steps_are_not_redone_by_a_retried_attempt(qt: Any) -> None:
    daemon, _, module = await qt()
    record = await daemon.queue.enqueue("qt.steps_then_fail_once")
    assert await daemon.queue.result(record.id, timeout=5) == [{"ran": "first"}, {"ran": "second"}]
    assert (await daemon.queue.get(record.id)).attempts == 2
    assert module.STEP_RUNS == {"first": 1, "second": 1}


async def test_a_task_whose_plugin_is_gone_fails_clearly(qt: Any) -> None:
    daemon, _, _ = await qt()
    record = await daemon.queue.enqueue("qt.echo", {"value": 1}, delay=0.2)
    daemon.plugins.unload("qt")
    final = await daemon.queue.wait(record.id, timeout=5)
    assert final.status == "failed"
    assert final.error == "Fail: no task named 'qt.echo' is registered"


async def test_stopping_requeues_running_tasks_without_spending_an_attempt(qt: Any, tmp_path: Path) -> None:
    daemon, _, module = await qt(state_dir=tmp_path / "stop", stop_timeout=0.2)
    record = await daemon.queue.enqueue("qt.wait_gate", {"name": "forever"})
    await asyncio.wait_for(module.gate("started:forever").wait(), 5)
    await daemon.stop()
    assert await outside(daemon, "SELECT status, attempts FROM tasks WHERE id = ?", record.id) == [
        {"status": "queued", "attempts": 0}]


async def test_a_running_task_s_lease_is_renewed_by_the_heartbeat(qt: Any) -> None:
    daemon, _, module = await qt(lease=0.3)
    record = await daemon.queue.enqueue("qt.wait_gate", {"name": "long"})
    await asyncio.wait_for(module.gate("started:long").wait(), 5)
    first = (await daemon.queue.get(record.id)).started_at
    assert first is not None

    async def renewed_past(limit: float) -> None:
        while True:
            (row,) = await rows(daemon, "SELECT lease_until FROM tasks WHERE id = ?", record.id)
            if row["lease_until"] > limit:
                return
            await asyncio.sleep(0)  # yield; the heartbeat (every lease/3) advances it

    # The claim leased it until first + 0.3; only a renewal can push the lease beyond that.
    await asyncio.wait_for(renewed_past(first + 0.35), 5)
    module.gate("long").set()
    assert (await daemon.queue.wait(record.id, timeout=5)).status == "succeeded"


async def test_an_expired_lease_nobody_renews_is_taken_back(qt: Any) -> None:
    daemon, events, _ = await qt(lease=0.3)
    record = await daemon.queue.enqueue("qt.echo", {"value": "orphan"}, delay=3600)
    # A row claimed by nobody in this process, its lease long gone (as after a stalled worker).
    await execute(daemon, "UPDATE tasks SET status = 'running', attempts = 1, lease_until = 1, "
                  "run_at = 0 WHERE id = ?", record.id)
    recovered = await events.wait_for("task.queued", task_id=record.id, recovered=True)
    assert recovered.data["status"] == "queued"
    assert await daemon.queue.result(record.id, timeout=5) == "orphan"


# --------------------------------------------------------------------------- claiming ahead


async def until(condition: Any, timeout: float = 5.0) -> None:
    """Wait for `await condition()` to be true: a claim ahead publishes no event."""

    async def poll() -> None:
        while not await condition():  # noqa: ASYNC110 - a claim publishes no event to wait on
            await asyncio.sleep(0)  # yield to the claim loop and the store's flush

    await asyncio.wait_for(poll(), timeout)


async def run_short_tasks(daemon: Any, count: int) -> None:
    """Run `count` no-op tasks to the end: the queue has then proven its tasks short, which
    turns claiming ahead on."""
    warm = await daemon.queue.enqueue_many([TaskRequest("qt.echo", {"value": i}) for i in range(count)])
    for outcome in warm:
        await daemon.queue.wait(outcome.task.id, timeout=5)


async def hold_one_worker_with_quick_tasks_waiting(
    qt: Any, **options: Any
) -> tuple[Any, Any, Any, list[int]]:
    """One worker, made to see short tasks, then held by a gated task while five quick
    tasks are queued; returns the daemon, its events, the plugin and the quick tasks' ids."""
    daemon, events, module = await qt(workers={"default": 1}, **options)
    await run_short_tasks(daemon, 10)
    await daemon.queue.enqueue("qt.wait_gate", {"name": "hold"})
    await asyncio.wait_for(module.gate("started:hold").wait(), 5)
    quick = await daemon.queue.enqueue_many([TaskRequest("qt.echo", {"value": i}) for i in range(5)])
    return daemon, events, module, [outcome.task.id for outcome in quick]


async def all_true(condition: Any, also: bool) -> bool:
    return await condition and also


async def running_ids(daemon: Any, ids: list[int]) -> set[int]:
    return {t.id for t in await daemon.queue.list(status="running", limit=100) if t.id in ids}


async def test_short_tasks_are_claimed_ahead_of_free_slots_and_run_in_order(qt: Any) -> None:
    daemon, events, module, quick = await hold_one_worker_with_quick_tasks_waiting(qt, claim_ahead=3)

    async def three_claimed() -> bool:
        # The rows are seen committed maybe before the claim loop has them in hand.
        return await running_ids(daemon, quick) == set(quick[:3]) and daemon.workers.claimed_ahead == 3

    # One worker, claim_ahead 3: three more are claimed (leased, running) though none started.
    await until(three_claimed)
    assert not [e for e in events.events if e.topic == "task.started" and e.data["task_id"] in quick]
    module.gate("hold").set()
    for task_id in quick:
        assert (await daemon.queue.wait(task_id, timeout=5)).attempts == 1
    started = [e.data["task_id"] for e in events.events
               if e.topic == "task.started" and e.data["task_id"] in quick]
    assert started == quick  # claim order is kept


async def test_unset_claim_ahead_is_the_stores_own(qt: Any) -> None:
    """A transaction costs tens of microseconds on SQLite and round trips on PostgreSQL:
    unset, a queue of short tasks claims 3 times its workers ahead on the one, 16 on the
    other (what pg_bench measured)."""
    daemon, _, module = await qt(workers={"default": 1})
    await run_short_tasks(daemon, 10)
    await daemon.queue.enqueue("qt.wait_gate", {"name": "hold"})
    await asyncio.wait_for(module.gate("started:hold").wait(), 5)
    quick = await daemon.queue.enqueue_many([TaskRequest("qt.echo", {"value": i}) for i in range(20)])
    ahead = 16 if daemon.store.name == "postgresql" else 3
    await until(lambda: all_true(running_ids(daemon, [o.task.id for o in quick]),
                                 daemon.workers.claimed_ahead == ahead))
    assert len(await running_ids(daemon, [o.task.id for o in quick])) == ahead
    module.gate("hold").set()
    for outcome in quick:
        await daemon.queue.wait(outcome.task.id, timeout=5)


async def test_a_queue_of_many_workers_claims_ahead_as_one_of_eight(qt: Any) -> None:
    """claim_ahead counts at most 8 workers: the default queue's 1,000 would otherwise hold
    3,000 short tasks (16,000 on PostgreSQL) away from other daemons."""
    daemon, _, module = await qt(workers={"default": 10}, claim_ahead=2)
    await run_short_tasks(daemon, 20)
    held = await daemon.queue.enqueue_many([TaskRequest("qt.wait_gate", {"name": "hold"})] * 10)
    held_ids = [outcome.task.id for outcome in held]

    async def all_held() -> bool:
        return await running_ids(daemon, held_ids) == set(held_ids)

    await until(all_held)
    quick = await daemon.queue.enqueue_many([TaskRequest("qt.echo", {"value": i}) for i in range(30)])
    quick_ids = [outcome.task.id for outcome in quick]
    await until(lambda: all_true(running_ids(daemon, quick_ids), daemon.workers.claimed_ahead == 16))
    assert len(await running_ids(daemon, quick_ids)) == 16  # 2 x 8, not 2 x 10
    module.gate("hold").set()
    for task_id in held_ids + quick_ids:
        await daemon.queue.wait(task_id, timeout=5)


async def test_tasks_claimed_together_start_by_priority_then_due_time(qt: Any) -> None:
    daemon, _, module = await qt(workers={"default": 1}, claim_ahead=3)
    await run_short_tasks(daemon, 10)
    await daemon.queue.enqueue("qt.wait_gate", {"name": "hold"})
    await asyncio.wait_for(module.gate("started:hold").wait(), 5)
    now = time.time()
    # One claim takes all three: the later rows were due earlier, or are more urgent.
    batch = await daemon.queue.enqueue_many([
        TaskRequest("qt.echo", {"value": "due last"}, run_at=now - 1),
        TaskRequest("qt.echo", {"value": "due first"}, run_at=now - 5),
        TaskRequest("qt.echo", {"value": "urgent"}, run_at=now, priority=1)])
    ids = [outcome.task.id for outcome in batch]

    async def all_claimed() -> bool:
        return await running_ids(daemon, ids) == set(ids)

    await until(all_claimed)
    module.gate("hold").set()
    for task_id in ids:
        await daemon.queue.wait(task_id, timeout=5)
    assert [task_id for kind, task_id in module.STARTED if task_id in ids] == [ids[2], ids[1], ids[0]]


async def test_long_tasks_are_never_claimed_ahead(qt: Any) -> None:
    daemon, _, module = await qt(workers={"default": 1}, claim_ahead=3)

    async def nothing_claimed_ahead(ids: list[int]) -> None:
        # A barrier: the claim loop, woken by the enqueue, has claimed by the time two more
        # transactions have committed; the tasks must still be queued.
        await committed(daemon)
        await committed(daemon)
        assert await running_ids(daemon, ids) == set()
        assert daemon.workers.claimed_ahead == 0

    async def held_while_queued(name: str) -> list[int]:
        await daemon.queue.enqueue("qt.wait_gate", {"name": name})
        await asyncio.wait_for(module.gate(f"started:{name}").wait(), 5)
        waiting = await daemon.queue.enqueue_many([TaskRequest("qt.echo", {"value": i}) for i in range(3)])
        ids = [outcome.task.id for outcome in waiting]
        await nothing_claimed_ahead(ids)
        module.gate(name).set()
        for task_id in ids:
            await daemon.queue.wait(task_id, timeout=5)
        return ids

    # A queue that has not yet run a task does not know its tasks are short.
    await held_while_queued("unproven")
    # Short tasks turn claiming ahead on (the tests above); one run of 0.4 s turns it off.
    await run_short_tasks(daemon, 10)
    slow = await daemon.queue.enqueue("qt.too_slow", timeout=0.4)
    assert (await daemon.queue.wait(slow.id, timeout=5)).status == "dead"
    await held_while_queued("after-a-long-one")


async def test_a_more_urgent_task_claimed_later_starts_before_those_waiting_ahead(qt: Any) -> None:
    daemon, events, module = await qt(workers={"default": 1}, claim_ahead=3)
    await run_short_tasks(daemon, 10)
    batch = await daemon.queue.enqueue_many(
        [TaskRequest("qt.wait_gate", {"name": "first"})]
        + [TaskRequest("qt.echo", {"value": i}) for i in range(3)])
    low = [outcome.task.id for outcome in batch][1:]  # after the gated one, which runs

    async def claimed(ids: list[int]) -> bool:
        return await running_ids(daemon, ids) == set(ids)

    await asyncio.wait_for(module.gate("started:first").wait(), 5)
    # One running, three waiting ahead (the claim loop has them): no room left.
    await until(lambda: all_true(claimed(low), daemon.workers.claimed_ahead == 3))
    urgent = await daemon.queue.enqueue("qt.echo", {"value": "urgent"}, priority=9)
    # Cancelling one that waits ahead leaves room: the next claim takes the urgent task.
    await daemon.queue.cancel(low[-1])
    await until(lambda: all_true(claimed([urgent.id]), daemon.workers.claimed_ahead == 3))
    module.gate("first").set()
    for task_id in (urgent.id, *low[:-1]):
        await daemon.queue.wait(task_id, timeout=5)
    started = [e.data["task_id"] for e in events.events if e.topic == "task.started"
               and e.data["task_id"] in (urgent.id, *low)]
    assert started == [urgent.id, *low[:-1]]


async def test_each_task_starts_in_a_fresh_context_of_its_own(qt: Any) -> None:
    # A task binding context variables (structlog's bind_contextvars, a request id) must
    # not hand them to the next task, least of all the one that takes over its slot.
    daemon, _, module = await qt(workers={"default": 1}, claim_ahead=3)
    await run_short_tasks(daemon, 10)  # claiming ahead on: tasks start in freed slots
    outcomes = await daemon.queue.enqueue_many(
        [TaskRequest("qt.tag_context", {"tag": f"task {i}"}) for i in range(6)])
    for outcome in outcomes:
        await daemon.queue.wait(outcome.task.id, timeout=5)
    assert module.TAGS_SEEN == ["untouched"] * 6


async def test_a_task_claimed_ahead_can_be_cancelled_and_never_runs(qt: Any) -> None:
    daemon, events, module, quick = await hold_one_worker_with_quick_tasks_waiting(qt, claim_ahead=3)

    async def claimed() -> bool:
        return quick[1] in await running_ids(daemon, quick)

    await until(claimed)
    await daemon.queue.cancel(quick[1])
    final = await daemon.queue.wait(quick[1], timeout=5)
    assert (final.status, final.error) == ("cancelled", "cancelled")
    module.gate("hold").set()
    for task_id in quick:
        await daemon.queue.wait(task_id, timeout=5)
    assert ("echo", quick[1]) not in module.STARTED
    assert daemon.workers.claimed_ahead == 0
    await events.wait_for("task.cancelled", task_id=quick[1])


async def test_stopping_puts_tasks_claimed_ahead_back_with_their_attempt_unspent(
    qt: Any, tmp_path: Path
) -> None:
    daemon, _, _, quick = await hold_one_worker_with_quick_tasks_waiting(
        qt, claim_ahead=3, state_dir=tmp_path / "ahead", stop_timeout=0.2)

    async def three_claimed() -> bool:
        return len(await running_ids(daemon, quick)) == 3

    await until(three_claimed)
    await daemon.stop()
    found = await outside(
        daemon, f"SELECT status, attempts, lease_until FROM tasks WHERE id IN ({','.join('?' * len(quick))})",
        *quick)
    assert found == [{"status": "queued", "attempts": 0, "lease_until": None}] * len(quick)


async def test_the_heartbeat_renews_the_leases_of_tasks_claimed_ahead(qt: Any) -> None:
    daemon, _, module, quick = await hold_one_worker_with_quick_tasks_waiting(qt, claim_ahead=3, lease=0.3)

    async def three_claimed() -> bool:
        return len(await running_ids(daemon, quick)) == 3

    await until(three_claimed)
    first = (await daemon.queue.get(quick[0])).started_at
    assert first is not None

    async def renewed() -> bool:
        (row,) = await rows(daemon, "SELECT lease_until FROM tasks WHERE id = ?", quick[0])
        return bool(row["lease_until"] > first + 0.35)

    # Renewed, not taken back as an orphan: it runs once, in its first attempt.
    await until(renewed)
    module.gate("hold").set()
    assert (await daemon.queue.wait(quick[0], timeout=5)).attempts == 1


@pytest.fixture
async def held_writer_daemon(start_daemon: Any, qt_dir: Path) -> Any:
    """`daemon, events, module = await held_writer_daemon(workers, **tasks_options)`: the
    store at `synchronous = "full"`, whose writes run in a thread `writer_held` can hold."""

    async def start(workers: int, **tasks: Any) -> tuple[Any, Any, ModuleType]:
        daemon, events = await start_daemon(plugin_dirs=[qt_dir], overrides={
            "store": {"synchronous": "full"}, "tasks": {"queues": {"default": workers}, **tasks}})
        return daemon, events, sys.modules["agentd_plugins.qt"]

    return start


@contextlib.asynccontextmanager
async def writer_held(daemon: Any) -> AsyncIterator[None]:
    """Hold the store's writer thread until the block ends: writes submitted meanwhile
    (claims, acks, cancels) queue behind it and commit together once it lets go. (On
    PostgreSQL: a transaction in flight, which the next batch waits for.)"""
    if daemon.storage.postgres is not None:
        held_pg, release_pg = asyncio.Event(), asyncio.Event()

        async def hold(conn: Any) -> None:
            held_pg.set()
            await asyncio.wait_for(release_pg.wait(), 5)

        holding_pg = daemon.store.write(hold)
        await asyncio.wait_for(held_pg.wait(), 5)
        try:
            yield
        finally:
            release_pg.set()
            await holding_pg
        return
    held, release = threading.Event(), threading.Event()

    def hold_the_writer(conn: Any) -> None:
        held.set()
        release.wait(5)

    holding = daemon.store.write(hold_the_writer)
    await asyncio.get_running_loop().run_in_executor(None, held.wait, 5)
    try:
        yield
    finally:
        release.set()
        await holding


async def cancel_as_the_attempt_ends(daemon: Any, module: Any, task_id: int, name: str) -> None:
    """Commit a cancel of a running task in one transaction with what its attempt writes as
    it ends (its ack, or its retry), the cancel first. The task waits for gate `name`, then
    opens `done:<name>`."""
    async with writer_held(daemon):
        cancelling = asyncio.create_task(daemon.queue.cancel(task_id))  # queued behind the hold
        for _ in range(20):  # yields, no time: the cancel submits its write
            await asyncio.sleep(0)
        module.gate(name).set()
        await asyncio.wait_for(module.gate(f"done:{name}").wait(), 5)  # its write waits behind
    await cancelling


@pytest.mark.sqlite_only  # a trigger records the row's states
async def test_a_claim_committing_as_the_workers_stop_is_put_back(held_writer_daemon: Any) -> None:
    """Stop used to cancel a claim loop waiting for its claim to commit: the claim committed
    anyway and its rows stayed `running`, with an attempt spent, until the next start."""
    daemon, _, _ = await held_writer_daemon(1, claim_ahead=0)
    record = await daemon.queue.enqueue("qt.echo", {"value": 1}, delay=3600)
    # A trigger records every status the row takes, so the claim is seen to have happened.
    await daemon.store.write(lambda conn: conn.execute("CREATE TABLE seen (status TEXT)"))
    await daemon.store.write(lambda conn: conn.execute(
        "CREATE TRIGGER seen_status AFTER UPDATE OF status ON tasks "
        "BEGIN INSERT INTO seen VALUES (new.status); END"))
    async with writer_held(daemon):
        # Queued behind the held transaction: the task comes due, and the woken claim loop's claim.
        due = daemon.store.write(lambda conn: conn.execute(
            "UPDATE tasks SET run_at = 0 WHERE id = ?", (record.id,)))
        daemon.queue.notify_work("default")
        for _ in range(20):  # yields, no time: the claim loop wakes and submits its claim
            await asyncio.sleep(0)
        stopping = asyncio.create_task(daemon.workers.stop(1.0))
    await asyncio.gather(due, stopping)
    row = await daemon.store.read_one("SELECT status, attempts, lease_until FROM tasks WHERE id = ?",
                                      (record.id,))
    assert row is not None
    assert (row["status"], row["attempts"], row["lease_until"]) == ("queued", 0, None)
    seen = [r["status"] for r in await daemon.store.read("SELECT status FROM seen ORDER BY rowid")]
    assert seen == ["running", "queued"]  # it was claimed, then put back


async def test_a_cancel_racing_a_finished_task_s_ack_does_not_lose_its_announcement(
    held_writer_daemon: Any
) -> None:
    """A task finished; its ack and a cancel of it commit in one transaction, the cancel
    first. The task must still be announced as succeeded (its waiters woken, its final event
    published): it used to be cancelled while waiting to be told its ack had committed."""
    daemon, events, module = await held_writer_daemon(2)
    record = await daemon.queue.enqueue("qt.wait_gate", {"name": "a", "result": "A"})
    await asyncio.wait_for(module.gate("started:a").wait(), 5)
    await cancel_as_the_attempt_ends(daemon, module, record.id, "a")
    event = await events.wait_for("task.succeeded", task_id=record.id)
    assert event.data["attempt"] == 1
    final = await daemon.queue.get(record.id)
    assert (final.status, final.result) == ("succeeded", "A")


async def test_a_cancel_racing_a_failed_attempt_s_retry_ends_the_task(held_writer_daemon: Any) -> None:
    """An attempt failed; its retry and a cancel of the task commit in one transaction, the
    cancel first. The task must end cancelled, be announced so, and never run again: the
    retry used to queue it with the cancel stored on it, and it ran on until dead."""
    daemon, events, module = await held_writer_daemon(1, **FAST_RETRIES)
    record = await daemon.queue.enqueue("qt.fail_after_gate", {"name": "f"})
    await asyncio.wait_for(module.gate("started:f").wait(), 5)
    await cancel_as_the_attempt_ends(daemon, module, record.id, "f")
    final = await daemon.queue.wait(record.id, timeout=5)
    assert (final.status, final.error, final.attempts) == ("cancelled", "cancelled", 1)
    event = await events.wait_for("task.cancelled", task_id=record.id)
    assert event.data["error"] == "cancelled"
    assert not [e for e in events.events if e.topic == "task.retrying"]
    assert [task_id for name, task_id in module.STARTED if name == "f"] == [record.id]


async def test_a_queued_task_with_a_stored_cancel_is_ended_not_run(qt: Any) -> None:
    """What a cancel racing a stop leaves behind (the stop puts the tasks it had claimed
    ahead back in the queue, the cancel marked one of them): the claim ends it cancelled."""
    daemon, events, module = await qt(workers={"default": 1})
    record = await daemon.queue.enqueue("qt.echo", {"value": 1}, delay=3600)
    await execute(daemon, "UPDATE tasks SET cancel_requested = 1, run_at = 0 WHERE id = ?", record.id)
    daemon.queue.notify_work("default")
    final = await daemon.queue.wait(record.id, timeout=5)
    assert (final.status, final.error) == ("cancelled", "cancelled")
    await events.wait_for("task.cancelled", task_id=record.id)
    assert ("echo", record.id) not in module.STARTED


async def test_a_task_cancelled_as_it_is_handed_a_slot_ends_and_the_queue_goes_on(
    held_writer_daemon: Any
) -> None:
    """A task claimed ahead is handed the slot of one that finishes, and cancelled in the
    same tick, before its first step: cancelling its asyncio task then skipped `_run`
    whole, so it stayed running forever, holding the slot, and the queue stopped."""
    daemon, _, module = await held_writer_daemon(1, claim_ahead=3)
    await run_short_tasks(daemon, 10)
    first = await daemon.queue.enqueue("qt.gate_then_step", {"name": "first"})
    await asyncio.wait_for(module.gate("started:first").wait(), 5)
    ahead = await daemon.queue.enqueue("qt.echo", {"value": "ahead"})

    async def claimed_ahead() -> bool:
        return daemon.workers.claimed_ahead == 1

    await until(claimed_ahead)
    async with writer_held(daemon):
        module.gate("first").set()  # its step's write waits behind the hold
        for _ in range(50):  # yields, no time: the step is submitted
            await asyncio.sleep(0)
        # Queued behind the step: it commits with it, and is told in the same tick in
        # which the step's end hands the slot to the task waiting ahead.
        cancelling = asyncio.create_task(daemon.queue.cancel(ahead.id))
        for _ in range(20):
            await asyncio.sleep(0)
    await cancelling
    assert (await daemon.queue.wait(first.id, timeout=5)).status == "succeeded"
    final = await daemon.queue.wait(ahead.id, timeout=5)
    assert (final.status, final.error) == ("cancelled", "cancelled")
    assert ("echo", ahead.id) not in module.STARTED
    later = await daemon.queue.enqueue("qt.echo", {"value": "later"})
    assert await daemon.queue.result(later.id, timeout=5) == "later"


@pytest.mark.sqlite_only  # the file's write lock
async def test_a_claim_whose_transaction_fails_is_tried_again(start_daemon: Any, qt_dir: Path) -> None:
    """Another program holding the file's write lock past busy_timeout (a backup, the sqlite3
    shell) fails a claim's transaction: the queue's claim loop used to die of it, and nothing
    on that queue ran again until a restart."""
    daemon, _ = await start_daemon(plugin_dirs=[qt_dir], overrides={
        "store": {"busy_timeout_ms": 50}, "tasks": {"queues": {"default": 1}}})
    record = await daemon.queue.enqueue("qt.echo", {"value": "early"}, delay=3600)
    other = sqlite3.connect(daemon.store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        daemon.queue.notify_work("default")  # the claim loop asks for a claim
        # Joins the claim's transaction, and fails with it.
        with pytest.raises(StoreBusyError, match="locked"):
            await daemon.store.write(lambda conn: conn.execute(
                "UPDATE tasks SET run_at = 0 WHERE id = ?", (record.id,)))
    finally:
        other.close()
    later = await daemon.queue.enqueue("qt.echo", {"value": "later"})
    assert await daemon.queue.result(later.id, timeout=5) == "later"


async def test_a_child_asked_for_as_its_parent_is_cancelled_is_cancelled_too(
    held_writer_daemon: Any
) -> None:
    """The cancel of a running parent and its `ctx.call` of a child commit in one
    transaction, the cancel first: the cancel found no children, and the child used to run."""
    daemon, _, module = await held_writer_daemon(2)
    parent = await daemon.queue.enqueue("qt.gate_then_call", {"name": "parent"})
    await asyncio.wait_for(module.gate("started:parent").wait(), 5)
    async with writer_held(daemon):
        cancelling = asyncio.create_task(daemon.queue.cancel(parent.id))  # queued behind the hold
        for _ in range(20):  # yields, no time: the cancel submits its write
            await asyncio.sleep(0)
        module.gate("parent").set()  # the parent's call: its insert queued after the cancel
        for _ in range(20):
            await asyncio.sleep(0)
    await cancelling
    assert (await daemon.queue.wait(parent.id, timeout=5)).status == "cancelled"
    (child_id,) = await daemon.queue.children(parent.id)
    child = await daemon.queue.wait(child_id, timeout=5)
    assert (child.status, child.error, child.attempts) == ("cancelled", "cancelled", 0)
    assert ("echo", child_id) not in module.STARTED


@pytest.mark.sqlite_only  # the writer thread; on PostgreSQL the claim counts in the database
async def test_claims_of_two_queues_in_successive_transactions_keep_a_name_s_limit(
    held_writer_daemon: Any
) -> None:
    """With the writer thread, the next transaction's claims were sized before the claim
    just committed had been counted: a name limited to one ran on two queues at once."""
    daemon, _, module = await held_writer_daemon(2, queues={"default": 2, "other": 2})
    first = await daemon.queue.enqueue("qt.solo", {"name": "first"}, delay=3600)
    second = await daemon.queue.enqueue("qt.solo", {"name": "second"}, delay=3600, queue="other")
    in_thread, release = threading.Event(), threading.Event()

    def hold(conn: Any) -> None:
        in_thread.set()
        release.wait(5)

    async with writer_held(daemon):
        due = daemon.store.write(lambda conn: conn.execute("UPDATE tasks SET run_at = 0"))
        holding = daemon.store.write(hold)  # in the same transaction as the claim below
        daemon.queue.notify_work("default")
        for _ in range(20):  # yields, no time: the default queue's claim joins them
            await asyncio.sleep(0)
    await asyncio.get_running_loop().run_in_executor(None, in_thread.wait, 5)
    daemon.queue.notify_work("other")  # its claim waits for the next transaction
    for _ in range(20):
        await asyncio.sleep(0)
    release.set()
    await asyncio.gather(due, holding)
    started = {name: asyncio.ensure_future(module.gate(f"started:{name}").wait())
               for name in ("first", "second")}
    done, _ = await asyncio.wait(started.values(), timeout=5, return_when=asyncio.FIRST_COMPLETED)
    (running,) = [name for name, waiter in started.items() if waiter in done]
    # A barrier: both queues have claimed (and committed) by the time two more writes have.
    await committed(daemon)
    await committed(daemon)
    assert module.SOLO["now"] == 1
    module.gate(running).set()
    waiting = "second" if running == "first" else "first"
    await asyncio.wait_for(started[waiting], 5)
    module.gate(waiting).set()
    for task in (first, second):
        assert (await daemon.queue.wait(task.id, timeout=5)).status == "succeeded"
    assert module.SOLO["max"] == 1


async def test_a_finished_task_keeps_its_lease_until_its_ack_commits(held_writer_daemon: Any) -> None:
    """Its row stays `running` until the ack commits: were its lease left to run out
    meanwhile (the writer slow or held), the heartbeat would take it back as an orphan, and
    a task that succeeded could be announced dead."""
    daemon, events, module = await held_writer_daemon(1)
    record = await daemon.queue.enqueue("qt.wait_gate", {"name": "a", "result": "A"})
    await asyncio.wait_for(module.gate("started:a").wait(), 5)
    assert record.id in daemon.workers.leased
    async with writer_held(daemon):
        module.gate("a").set()
        await asyncio.wait_for(module.gate("done:a").wait(), 5)
        for _ in range(5):  # yields, no time: the attempt ends, its ack waits behind the hold
            await asyncio.sleep(0)
        assert record.id not in daemon.workers.running
        assert record.id in daemon.workers.leased  # the heartbeat renews it still
    await events.wait_for("task.succeeded", task_id=record.id)
    assert record.id not in daemon.workers.leased


async def test_stopping_returns_once_the_tasks_that_finished_are_announced(held_writer_daemon: Any) -> None:
    daemon, events, module = await held_writer_daemon(1)
    record = await daemon.queue.enqueue("qt.wait_gate", {"name": "last", "result": 1})
    await asyncio.wait_for(module.gate("started:last").wait(), 5)
    async with writer_held(daemon):
        stopping = asyncio.create_task(daemon.workers.stop(5.0))
        module.gate("last").set()
        await asyncio.wait_for(module.gate("done:last").wait(), 5)  # its ack waits behind the hold
        for _ in range(20):  # yields, no time: a stop that did not wait for the ack returns now
            await asyncio.sleep(0)
        assert not stopping.done()
    await stopping
    # Announced before stop returned: whatever stops listening after the workers hears it.
    assert [e.data["task_id"] for e in events.events if e.topic == "task.succeeded"] == [record.id]


async def test_short_tasks_share_write_transactions_by_the_dozen(qt: Any, store_url: str | None) -> None:
    # On PostgreSQL with its own claim_ahead (16): its claims are transactions of their own.
    daemon, _, _ = await qt(workers={"default": 8},
                            **({} if store_url else {"claim_ahead": 3}))
    await run_short_tasks(daemon, 20)
    backlog = await daemon.queue.enqueue_many(
        [TaskRequest("qt.echo", {"value": i}, delay=3600) for i in range(1000)])
    ids = [outcome.task.id for outcome in backlog]
    done = asyncio.Event()
    finished: set[int] = set()

    def count(event: Any) -> None:
        if event.data["task_id"] in ids:
            finished.add(event.data["task_id"])
            if len(finished) == len(ids):
                done.set()

    with daemon.bus.subscribe("task.succeeded", count, name="test.count"):
        before = daemon.store.transactions
        await execute(daemon, "UPDATE tasks SET run_at = 0 WHERE status = 'queued'")
        daemon.queue.notify_work("default")
        await asyncio.wait_for(done.wait(), 30)
    spent = daemon.store.transactions - before
    # 8 slots and 24 claimed ahead: a claim sized when its transaction is taken fills all
    # 32, and the acks of the tasks run meanwhile share it (a claim sized when asked for
    # filled only what was free then: 16 tasks per transaction). On PostgreSQL a claim of
    # up to 136 is a transaction of its own, and a batch of acks waits for the round trips
    # of the one in flight: fewer tasks share each transaction, still many.
    per_transaction = 24 if daemon.storage.postgres is None else 12
    assert spent <= len(ids) / per_transaction, f"{spent} transactions for {len(ids)} tasks"


async def test_single_enqueues_of_one_tick_share_a_transaction_and_keep_their_rows(qt: Any) -> None:
    daemon, _, _ = await qt()
    before = daemon.store.transactions
    records = await asyncio.gather(*(
        daemon.queue.enqueue("qt.echo", {"value": i}, delay=3600) for i in range(50)))
    if daemon.storage.postgres is None:
        assert daemon.store.transactions - before == 1
    else:  # a daemon's heartbeat may commit beside them: the rows' own transaction id tells
        ids = [r.id for r in records]
        assert len(await outside(daemon, "SELECT DISTINCT xmin::text FROM tasks WHERE id = ANY($1)",
                                 ids)) == 1
    # Each caller got the row made from its own arguments.
    assert [r.args for r in records] == [{"value": i} for i in range(50)]
    assert len({r.id for r in records}) == 50
    for record in records:
        stored = await daemon.queue.get(record.id)
        assert (stored.args, stored.status) == (record.args, "queued")
