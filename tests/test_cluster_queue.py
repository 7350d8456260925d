"""The queue shared by several daemons on one PostgreSQL database (agentd/postgres/tasks.py).

The first tests drive `PgTasks` directly, one per `PgStore` as each daemon has its own
pool: claims that skip each other's rows, limits counted in the database, keys taken
through the UNIQUE index, leases that lapse, and the notifications that carry the news.
The others run real daemons on one fresh database (several in this process; one killed
with SIGKILL is a child process), with tests/cluster_plugin.py as the plugin `ct`."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from agentd.config import StoreConfig
from agentd.postgres.tasks import PgTasks
from agentd.store.postgres import PgStore
from agentd.taskqueue import ClaimFuture, NameLimits, TaskRecord, TaskRequest
from pg import fresh_database


@pytest.fixture
async def cluster() -> AsyncIterator[Callable[[int], Any]]:
    """`await cluster(n)`: n `PgTasks`, each on a store (a pool) of its own, one database."""
    url = await fresh_database()
    stores: list[PgStore] = []

    async def make(count: int) -> list[PgTasks]:
        made = []
        for _ in range(count):
            store = PgStore(StoreConfig(url=url, pool_size=4))
            await store.open()
            stores.append(store)
            tasks = PgTasks(store)
            await tasks.start_node("test")
            made.append(tasks)
        return made

    yield make
    for store in stores:
        await store.close()


def row(name: str = "noop", queue: str = "default", key: str | None = None,
        run_at: float | None = None, priority: int = 0) -> tuple[Any, ...]:
    now = time.time()
    return (queue, name, "{}", "queued", priority, now if run_at is None else run_at, 3, None, key,
            None, None, now, "", "")


async def claim(tasks: PgTasks, wanted: int, limits: NameLimits | None = None,
                lease: float = 30.0, queue: str = "default") -> tuple[list[TaskRecord], float | None]:
    future: ClaimFuture = asyncio.get_running_loop().create_future()
    tasks.join_claims({queue: future}, lambda _: wanted, dict,
                      lambda: limits or {}, lease)
    return await future


async def ack(tasks: PgTasks, records: list[TaskRecord]) -> None:
    acks = tasks.acks()
    now = time.time()
    futures = [acks.add(("succeeded", "null", None, now, now + 60, record.id)) for record in records]
    if futures:
        await futures[-1]


async def test_claims_on_several_stores_never_take_a_task_twice(cluster: Any) -> None:
    a, b, c = await cluster(3)
    await a.insert([row() for _ in range(300)], [0.0] * 300, time.time(), 60.0, None)
    taken: list[int] = []

    async def drain(tasks: PgTasks) -> int:
        mine = 0
        while True:
            records, _ = await claim(tasks, 7)
            if not records:
                return mine
            mine += len(records)
            taken.extend(record.id for record in records)
            await ack(tasks, records)

    counts = await asyncio.gather(drain(a), drain(b), drain(c))
    assert len(taken) == 300 and len(set(taken)) == 300
    assert all(count > 0 for count in counts)  # each store claimed some


async def test_a_concurrency_limit_holds_across_stores(cluster: Any) -> None:
    stores = await cluster(3)
    await stores[0].insert([row("limited") for _ in range(30)], [0.0] * 30, time.time(), 60.0, None)
    limits: NameLimits = {"limited": (2, None, 1.0)}
    running: set[int] = set()
    most = 0
    finished = 0

    async def work(tasks: PgTasks) -> None:
        nonlocal most, finished
        while finished < 30:
            records, _ = await claim(tasks, 5, limits)
            running.update(record.id for record in records)
            most = max(most, len(running))
            if records:
                await asyncio.sleep(0.01)  # noqa: sleep - hold the places a moment
                for record in records:
                    running.discard(record.id)
                await ack(tasks, records)
                finished += len(records)
            else:
                await asyncio.sleep(0.005)  # noqa: sleep - poll: this test has no claim loop

    await asyncio.wait_for(asyncio.gather(*(work(tasks) for tasks in stores)), 60)
    assert finished == 30
    assert most == 2


async def test_a_concurrency_per_key_holds_across_stores(cluster: Any) -> None:
    """`concurrency_key`: two at once per user on three daemons, six at once in all."""
    stores = await cluster(3)
    rows = [(*row("keyed")[:-2], f"user{n % 3}", "") for n in range(30)]
    await stores[0].insert(rows, [0.0] * 30, time.time(), 60.0, None)
    limits: NameLimits = {"keyed": (2, None, 1.0)}
    running: dict[int, str] = {}
    most: dict[str, int] = {}
    most_in_all = 0
    finished = 0

    async def work(tasks: PgTasks) -> None:
        nonlocal most_in_all, finished
        while finished < 30:
            records, _ = await claim(tasks, 5, limits)
            found = await tasks.engine.read(
                "SELECT id, concurrency_key FROM tasks WHERE id = ANY($1::bigint[])",
                ([record.id for record in records],)) if records else []
            running.update({task_id: key for task_id, key in found})
            for key in set(running.values()):
                most[key] = max(most.get(key, 0), list(running.values()).count(key))
            most_in_all = max(most_in_all, len(running))
            if records:
                await asyncio.sleep(0.01)  # noqa: sleep - hold the places a moment
                for record in records:
                    running.pop(record.id, None)
                await ack(tasks, records)
                finished += len(records)
            else:
                await asyncio.sleep(0.005)  # noqa: sleep - poll: this test has no claim loop

    await asyncio.wait_for(asyncio.gather(*(work(tasks) for tasks in stores)), 60)
    assert finished == 30
    assert most == {"user0": 2, "user1": 2, "user2": 2}
    assert most_in_all > 2  # the users' places are their own


async def test_a_429_hold_keeps_every_store_off_its_rate_key(cluster: Any) -> None:
    """A hold written with one daemon's retry keeps the other's claims off the tasks of
    that name and rate key (not another key's), limited names registered or not."""
    a, b = await cluster(2)
    rows = [(*row("asked")[:-2], "", model) for model in ("m1", "m1", "m2")]
    await a.insert(rows, [0.0] * 3, time.time(), 60.0, None)
    first, _ = await claim(a, 1)
    assert first[0].run_at <= time.time()
    hold_until = time.time() + 30
    assert await a.requeue_attempt(task_id=first[0].id, run_at=hold_until, error="429",
                                   undo_attempt=1, finished_at=time.time(),
                                   expires_at=time.time() + 60, hold="asked:r:m1") == "queued"
    for limits in (None, {"asked": (5, None, 1.0)}):
        records, next_at = await claim(b, 5, limits)
        keys = await b.engine.read("SELECT rate_key FROM tasks WHERE id = ANY($1::bigint[])",
                                   ([record.id for record in records],))
        assert [key for (key,) in keys] == ["m2"]
        assert next_at == pytest.approx(hold_until)  # the claim loop wakes as the hold ends
        await b.unclaim([record.id for record in records])


async def test_a_rate_limit_is_shared_by_the_stores(cluster: Any) -> None:
    a, b = await cluster(2)
    await a.insert([row("rated") for _ in range(10)], [0.0] * 10, time.time(), 60.0, None)
    limits: NameLimits = {"rated": (None, 0.5, 3.0)}  # a burst of 3, then one per 2 s
    first, _ = await claim(a, 10, limits)
    second, next_at = await claim(b, 10, limits)
    assert len(first) == 3 and second == []
    assert next_at is not None and 0 < next_at - time.time() <= 2.0  # when the next token is in


async def test_one_key_enqueued_on_two_stores_at_once_makes_one_task(cluster: Any) -> None:
    a, b = await cluster(2)
    now = time.time()
    results = await asyncio.gather(
        *(tasks.insert([row(key="once")], [60.0], now, 60.0, None) for tasks in (a, b, a, b)))
    ids = {found if isinstance(found, int) else found["id"] for (found,) in results}
    assert len(ids) == 1
    assert sum(isinstance(found, int) for (found,) in results) == 1  # one of them created it


async def test_work_and_final_states_are_announced_to_every_store(cluster: Any) -> None:
    a, b = await cluster(2)
    work: asyncio.Queue[str | None] = asyncio.Queue()
    done: asyncio.Queue[list[int]] = asyncio.Queue()
    b.listen(work=work.put_nowait, done=lambda ids: done.put_nowait(list(ids)),
             cancel=lambda ids: None, reconnect=lambda: None)
    listener = asyncio.create_task(b.store.run_listener())
    try:
        await asyncio.wait_for(b.store.listening.wait(), 10)
        task_id = await a.insert_one(row(queue="reports"))
        assert await asyncio.wait_for(work.get(), 10) == "reports"
        records, _ = await claim(a, 1, queue="reports")
        assert [record.id for record in records] == [task_id]
        await ack(a, records)
        assert await asyncio.wait_for(done.get(), 10) == [task_id]
    finally:
        listener.cancel()


async def test_a_lapsed_lease_is_taken_over_by_another_store(cluster: Any) -> None:
    a, b = await cluster(2)
    await a.insert([row(), row()], [0.0, 0.0], time.time(), 60.0, None)
    records, _ = await claim(a, 2, lease=0.2)
    assert len(records) == 2
    # a keeps one lease alive; the other lapses (its node stopped renewing it).
    kept = records[0].id
    await a.renew_and_reclaim([kept], time.time() + 30, 60.0, True)
    await asyncio.sleep(0.25)  # noqa: sleep - let the unrenewed lease lapse
    reclaimed = await b.renew_and_reclaim([], 0.0, 60.0, False)
    assert [record.id for record in reclaimed] == [records[1].id]
    assert reclaimed[0].status == "queued"
    again, _ = await claim(b, 5)
    assert [record.id for record in again] == [records[1].id]
    assert again[0].attempts == 2
    nodes = await b.live_nodes(10.0)
    assert {node["id"] for node in nodes} == {a.node_id, b.node_id}



async def test_leases_hold_whatever_the_hosts_clocks_say(cluster: Any, monkeypatch: Any) -> None:
    """Leases are written and compared on the database server's clock: a daemon whose clock
    runs an hour ahead takes over no live lease, and one whose clock runs an hour behind
    renews its leases for as long as on time (with the daemons' clocks, the first took
    both tasks over and the second's renewals had lapsed already)."""
    a, b = await cluster(2)
    await a.insert([row(), row()], [0.0, 0.0], time.time(), 60.0, None)
    records, _ = await claim(a, 2, lease=30.0)
    real = time.time

    def skewed(seconds: float) -> None:
        monkeypatch.setattr(time, "time", lambda: real() + seconds)

    skewed(-3600.0)  # a renews with a clock an hour slow
    await a.renew_and_reclaim([r.id for r in records], time.time() + 30, 60.0, True)
    skewed(3600.0)  # b looks for lapsed leases with a clock an hour fast
    assert await b.renew_and_reclaim([], 0.0, 60.0, True) == []
    monkeypatch.setattr(time, "time", real)
    assert await a.taken_over([r.id for r in records]) == []  # a still holds both
    for record in records:
        stored = await b.get(record.id)
        assert stored is not None and (stored.status, stored.attempts) == ("running", 1)


async def test_a_late_ack_after_a_takeover_is_dropped(cluster: Any) -> None:
    """a's lease lapses (a stalled) and b takes the task over: a's late ack, retry or
    interruption writes nothing once b holds the lease, and is reported as dropped."""
    a, b = await cluster(2)
    await a.insert([row(), row()], [0.0, 0.0], time.time(), 60.0, None)
    records, _ = await claim(a, 2, lease=0.2)
    await asyncio.sleep(0.25)  # noqa: sleep - let a's leases lapse
    assert len(await b.renew_and_reclaim([], 0.0, 60.0, True)) == 2
    taken, _ = await claim(b, 2)
    assert sorted(record.id for record in taken) == sorted(record.id for record in records)
    first, second = records
    now = time.time()
    # b still runs `first`: a's late ack and retry are both dropped.
    late = await a.acks().add(("failed", None, "late", now, now + 60, first.id))
    assert late == [first.id]
    assert await a.requeue_attempt(task_id=first.id, run_at=now, error="late", undo_attempt=0,
                                   finished_at=now, expires_at=now + 60) == "lost"
    stored = await b.get(first.id)
    assert stored is not None and stored.status == "running" and stored.error != "late"
    # Usage counted by a's stalled run is not added to b's run; b's is.
    assert await a.add_usage(first.id, {"calls": 1}) == {}
    assert await b.add_usage(first.id, {"calls": 1}) == {"calls": 1}
    # b ends `second`; a's late ack must not flip its outcome.
    assert await b.acks().add(("succeeded", "1", None, now, now + 60, second.id)) == []
    assert await a.acks().add(("failed", None, "late", now, now + 60, second.id)) == [second.id]
    stored = await b.get(second.id)
    assert stored is not None and (stored.status, stored.result) == ("succeeded", 1)
    # b's own ack of `first` applies.
    assert await b.acks().add(("succeeded", "2", None, now, now + 60, first.id)) == []
    stored = await a.get(first.id)
    assert stored is not None and stored.status == "succeeded"


async def test_a_late_unclaim_after_a_takeover_leaves_the_task_to_its_new_holder(
        cluster: Any) -> None:
    """a claimed ahead, stalled past its lease, and stops: its unclaim must not put back in
    the queue the task b took over and runs (it would run twice)."""
    a, b = await cluster(2)
    await a.insert([row()], [0.0], time.time(), 60.0, None)
    records, _ = await claim(a, 1, lease=0.2)
    await asyncio.sleep(0.25)  # noqa: sleep - let a's lease lapse
    assert len(await b.renew_and_reclaim([], 0.0, 60.0, True)) == 1
    taken, _ = await claim(b, 1)
    assert [record.id for record in taken] == [records[0].id]
    # a's next heartbeat learns that b holds it now (and stops running it).
    assert await a.taken_over([records[0].id]) == [records[0].id]
    assert await b.taken_over([records[0].id]) == []
    await a.unclaim([records[0].id])
    stored = await b.get(records[0].id)
    assert stored is not None and (stored.status, stored.attempts) == ("running", 2)
    assert (await claim(a, 1))[0] == []


async def test_the_rows_of_nodes_dead_for_long_are_removed(cluster: Any) -> None:
    (a,) = await cluster(1)

    async def add_nodes(conn: Any) -> None:
        now = time.time()
        await conn.execute("INSERT INTO nodes VALUES ('gone:1:x', $1, $2, 'old'), "
                           "('quiet:2:y', $1, $3, 'old')", now - 7200, now - 3600, now - 30)

    await a.store.write(add_nodes)
    await a.renew_and_reclaim([], 0.0, 60.0, True)  # a heartbeat
    rows = await a.store.read("SELECT id FROM nodes ORDER BY id")
    # An hour without a heartbeat: removed. Half a minute: kept, though not listed as alive.
    assert [row["id"] for row in rows] == sorted([a.node_id, "quiet:2:y"])
    assert [node["id"] for node in await a.live_nodes(10.0)] == [a.node_id]

# -- real daemons ------------------------------------------------------------------------------



@pytest.fixture
async def pg_daemons(tmp_path: Path, copied_plugin: Any) -> AsyncIterator[Any]:
    """`daemon = await pg_daemons.start("a", workers={...}, tasks={...}, **ct_table)`: a real
    daemon on the test's database, with the plugin `ct` (its `node` = the name given);
    `pg_daemons.url` is the database's URL, `pg_daemons.plugin_dir` the plugin's directory.
    Every daemon is stopped at teardown."""
    from agentd.app import Daemon
    from agentd.testing import make_config

    url = await fresh_database()
    plugin_dir = copied_plugin("cluster_plugin.py", "ct")
    shared = sys.modules.pop("agentd_cluster_shared", None)  # a fresh record per test
    del shared
    async with AsyncExitStack() as stack:

        class Cluster:
            def __init__(self) -> None:
                self.url = url
                self.plugin_dir = plugin_dir

            async def start(self, node: str, workers: dict[str, int] | None = None,
                            tasks: dict[str, Any] | None = None, **ct: Any) -> Daemon:
                overrides: dict[str, dict[str, Any]] = {
                    "tasks": {"queues": workers or {"default": 4}, "retry_base": 0.01,
                              "retry_max": 0.02, **(tasks or {})},
                    "plugins": {"ct": {"node": node, **ct}},
                    "store": {"url": url},
                }
                daemon = Daemon(make_config(tmp_path / node, [plugin_dir], overrides))
                await stack.enter_async_context(daemon)
                return daemon

        yield Cluster()


def shared() -> Any:
    return sys.modules["agentd_cluster_shared"]


async def test_three_daemons_share_300_tasks_and_run_each_once(pg_daemons: Any) -> None:
    daemons = [await pg_daemons.start(node) for node in ("a", "b", "c")]
    # Each daemon enqueues a third, all at once: each one's claims race the others'.
    batches = await asyncio.gather(*(
        daemon.queue.enqueue_many([TaskRequest("ct.work", {"n": i}) for i in range(100)])
        for daemon in daemons))
    ids = [outcome.task.id for batch in batches for outcome in batch]
    # Waited for on one daemon: most finish on the others (their final states are told
    # through agentd_done).
    records = await asyncio.wait_for(
        asyncio.gather(*(daemons[0].queue.wait(task_id) for task_id in ids)), 60)
    assert {record.status for record in records} == {"succeeded"}
    assert {record.attempts for record in records} == {1}
    runs = shared().runs
    assert sorted(task_id for task_id, _ in runs) == sorted(ids)  # every task ran once
    by_node = {node: sum(1 for _, ran_on in runs if ran_on == node) for node in ("a", "b", "c")}
    assert all(count > 0 for count in by_node.values()), by_node


async def test_a_concurrency_limit_holds_across_three_daemons(pg_daemons: Any) -> None:
    daemons = [await pg_daemons.start(node) for node in ("a", "b", "c")]
    batches = await asyncio.gather(*(
        daemon.queue.enqueue_many([TaskRequest("ct.limited") for _ in range(10)])
        for daemon in daemons))
    ids = [outcome.task.id for batch in batches for outcome in batch]
    records = await asyncio.wait_for(
        asyncio.gather(*(daemons[1].queue.wait(task_id) for task_id in ids)), 60)
    assert {record.status for record in records} == {"succeeded"}
    counts = shared().limited
    assert counts["done"] == 30
    # Reached, never passed, whichever daemons ran them. (Counted per daemon, the limit let
    # the three run up to 12 at once here: each claims 2 and claims ahead.) Which daemons
    # ran them is not asserted: the one whose task ends claims the freed place first.
    assert counts["max"] == 2


async def test_one_key_enqueued_on_two_daemons_at_once_gives_one_task(pg_daemons: Any) -> None:
    a = await pg_daemons.start("a")
    b = await pg_daemons.start("b")
    for round_ in range(5):
        key = f"once-{round_}"
        records = await asyncio.gather(
            a.queue.enqueue("ct.work", idempotency_key=key, delay=60),
            b.queue.enqueue("ct.work", idempotency_key=key, delay=60))
        assert records[0].id == records[1].id
        stored = [r for r in await a.queue.list(name="ct.work") if r.idempotency_key == key]
        assert len(stored) == 1


async def test_work_enqueued_on_a_busy_daemon_is_started_by_another_at_once(pg_daemons: Any) -> None:
    """Daemon a's one worker is busy: the task it enqueues is b's to run, and b hears of it
    by notification; b's claim loop is idle (nothing due: it waits without a timeout)."""
    a = await pg_daemons.start("a", workers={"default": 1})
    holding = await a.queue.enqueue("ct.block", {"name": "hold"})
    await asyncio.wait_for(shared_started(holding.id).wait(), 10)
    b = await pg_daemons.start("b", workers={"default": 2})
    await asyncio.wait_for(b.storage.postgres.listening.wait(), 10)
    for _ in range(3):
        began = time.monotonic()
        record = await a.queue.enqueue("ct.work")
        await asyncio.wait_for(shared_started(record.id).wait(), 10)
        latency = time.monotonic() - began
        assert latency < 0.5, latency
        assert (record.id, "b") in shared().runs
        # Waited for on a, finished on b.
        done = await asyncio.wait_for(a.queue.wait(record.id), 10)
        assert done.status == "succeeded"
    shared().gates["hold"].set()
    assert (await asyncio.wait_for(b.queue.wait(holding.id), 10)).status == "succeeded"


async def test_a_daemon_claims_while_a_batch_of_its_other_writes_is_in_flight(
    pg_daemons: Any,
) -> None:
    """A claim is a statement of its own, run beside the daemon's other writes: b takes and
    starts the work a enqueued while a transaction of b's acks and events is still open
    (held here by a write that waits). Claims used to ride the next batch, after it."""
    a = await pg_daemons.start("a", workers={"default": 1})
    holding = await a.queue.enqueue("ct.block", {"name": "hold"})
    await asyncio.wait_for(shared_started(holding.id).wait(), 10)
    b = await pg_daemons.start("b", workers={"default": 2})
    await asyncio.wait_for(b.storage.postgres.listening.wait(), 10)
    in_flight, release = asyncio.Event(), asyncio.Event()

    async def held(conn: Any) -> None:
        in_flight.set()
        await release.wait()

    write = b.storage.postgres.write(held)
    await asyncio.wait_for(in_flight.wait(), 10)
    try:
        record = await a.queue.enqueue("ct.work")
        await asyncio.wait_for(shared_started(record.id).wait(), 4)  # under the 5 s write deadline
        assert (record.id, "b") in shared().runs
        assert not write.done()
    finally:
        release.set()
    await write
    shared().gates["hold"].set()
    assert (await asyncio.wait_for(b.queue.wait(record.id), 10)).status == "succeeded"


async def test_a_task_running_on_another_daemon_is_cancelled_there(pg_daemons: Any) -> None:
    a = await pg_daemons.start("a", workers={"default": 1})
    b = await pg_daemons.start("b", workers={"default": 1})
    record = await b.queue.enqueue("ct.block", {"name": "never"})
    await asyncio.wait_for(shared_started(record.id).wait(), 10)
    runner = a if (record.id, "a") in shared().runs else b
    other = b if runner is a else a
    await other.queue.cancel(record.id)
    done = await asyncio.wait_for(other.queue.wait(record.id), 10)
    assert done.status == "cancelled"
    assert record.id not in runner.workers.running


def hold_claims_once_committed(daemon: Any, monkeypatch: pytest.MonkeyPatch,
                               ) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the daemon's claim loop once a claim that took tasks has committed, before it
    has them in hand: the first event is set then, and the loop goes on once the second is.

    The hold is in the loop's check of the cancels heard during the claim, which the loop
    looks up after each claim: a claim already in flight when the test patches (the loop's
    first, at the daemon's start, may take the test's task) passes through it too."""
    committed, go_on = asyncio.Event(), asyncio.Event()
    check = daemon.workers._cancelled_meanwhile

    async def held_once_committed(records: list[TaskRecord], heard: set[int]) -> set[int]:
        if records:
            committed.set()
            await go_on.wait()
        cancelled: set[int] = await check(records, heard)
        return cancelled

    monkeypatch.setattr(daemon.workers, "_cancelled_meanwhile", held_once_committed)
    return committed, go_on


def cancel_heard(daemon: Any, task_id: int) -> asyncio.Event:
    """Set once the daemon has acted on a cancel of the task (its worker listens first)."""
    heard = asyncio.Event()
    daemon.queue.on_cancel(lambda cancelled: heard.set() if cancelled == task_id else None)
    return heard


async def cancel_while_held(canceller: Any, holder: Any, task_id: int,
                            go_on: asyncio.Event) -> TaskRecord:
    """Cancel the running task through `canceller` while `holder` is held with it not yet
    in hand; let `holder` go on once it has acted on the cancel; the task's final record."""
    heard = cancel_heard(holder, task_id)
    marked = await canceller.queue.cancel(task_id)
    assert (marked.status, marked.cancel_requested) == ("running", True)
    await asyncio.wait_for(heard.wait(), 10)
    go_on.set()
    return await asyncio.wait_for(canceller.queue.wait(task_id), 10)


async def test_a_cancel_heard_as_another_daemon_s_claim_of_the_task_commits_is_not_lost(
        pg_daemons: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon b's claim of a task has committed (the row is running, b's) but b has not yet
    taken the claimed rows in hand when a's cancel of the task reaches it: b must not run
    the task. (It found nothing of it to cancel, and ran it to the end.) b's claim loop is
    held between the two: once its claim has committed, until it has heard the cancel."""
    a = await pg_daemons.start("a", workers={"other": 1})  # claims nothing of `default`
    b = await pg_daemons.start("b", workers={"default": 1})
    committed, go_on = hold_claims_once_committed(b, monkeypatch)
    record = await b.queue.enqueue("ct.work", idempotency_key="claimed")  # queued, not assigned
    await asyncio.wait_for(committed.wait(), 10)
    done = await cancel_while_held(a, b, record.id, go_on)
    assert (done.status, done.error) == ("cancelled", "cancelled")
    assert shared().runs == []  # its body never ran
    assert record.id not in b.workers.running


async def test_older_news_of_a_cancel_heard_as_a_claim_commits_leaves_the_task_to_run(
        pg_daemons: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """News of a cancel may come in late, its task ended and requeued since (its cancel
    cleared) and being claimed again: the row decides, and the task runs. The news is sent
    here as a daemon sends it, while b's claim loop is held once its claim has committed."""
    b = await pg_daemons.start("b", workers={"default": 1})
    committed, go_on = hold_claims_once_committed(b, monkeypatch)
    record = await b.queue.enqueue("ct.work", idempotency_key="claimed")  # queued, not assigned
    await asyncio.wait_for(committed.wait(), 10)
    heard = cancel_heard(b, record.id)
    conn = await asyncpg.connect(pg_daemons.url)
    try:
        await conn.execute("SELECT pg_notify('agentd_cancel', $1)", f"elsewhere:1:x {record.id}")
    finally:
        await conn.close()
    await asyncio.wait_for(heard.wait(), 10)
    go_on.set()
    done = await asyncio.wait_for(b.queue.wait(record.id), 10)
    assert done.status == "succeeded"
    assert shared().runs == [(record.id, "b")]


async def test_a_stalled_daemon_s_late_ack_is_dropped_and_not_announced(pg_daemons: Any) -> None:
    """A task's lease lapses on daemon a (as if a stalled; set in the row) and another
    store takes the task over: when a's run ends, its ack is dropped, the row stays the
    other's, and a publishes no final event for it."""
    a = await pg_daemons.start("a", workers={"default": 1})
    seen: list[Any] = []
    a.bus.subscribe("task.*", seen.append, name="test.seen")
    record = await a.queue.enqueue("ct.block", {"name": "late"})
    await asyncio.wait_for(shared_started(record.id).wait(), 10)
    store = PgStore(StoreConfig(url=pg_daemons.url, pool_size=2))
    await store.open()
    try:
        thief = PgTasks(store)
        await thief.start_node("test")

        async def lapse(conn: Any) -> None:
            await conn.execute("UPDATE tasks SET lease_until = 0 WHERE id = $1", record.id)

        await store.write(lapse)
        assert [r.id for r in await thief.renew_and_reclaim([], 0.0, 60.0, True)] == [record.id]
        assert [r.id for r in (await claim(thief, 1))[0]] == [record.id]
        shared_gate("late").set()
        await a.stop()  # waits for the acks in flight
        stored = await thief.get(record.id)
        assert stored is not None and stored.status == "running"
        final = [e.topic for e in seen if e.data.get("task_id") == record.id
                 and e.topic in ("task.succeeded", "task.failed", "task.cancelled", "task.dead")]
        assert final == []
    finally:
        await store.close()


async def test_a_daemon_s_heartbeat_stops_its_run_of_a_task_taken_over(pg_daemons: Any) -> None:
    """Another daemon holds the lease of a task daemon a runs (a stalled past it and the
    task was taken over; set in the row): a's next heartbeat cancels a's run, and a
    publishes no final event for it."""
    a = await pg_daemons.start("a", workers={"default": 1}, tasks={"lease": 0.6})
    seen: list[Any] = []
    a.bus.subscribe("task.*", seen.append, name="test.seen")
    record = await a.queue.enqueue("ct.block", {"name": "never"})
    await asyncio.wait_for(shared_started(record.id).wait(), 10)
    store = PgStore(StoreConfig(url=pg_daemons.url, pool_size=2))
    await store.open()
    try:
        async def take_over(conn: Any) -> None:
            await conn.execute("UPDATE tasks SET lease_node = 'other:1:x', lease_until = $2, "
                               "attempts = attempts + 1 WHERE id = $1", record.id, time.time() + 60)

        await store.write(take_over)
        await asyncio.wait_for(shared_gate(f"cancelled:{record.id}").wait(), 10)
        await a.stop()
        row = await store.read_one("SELECT status, lease_node FROM tasks WHERE id = $1",
                                   (record.id,))
        assert row is not None and (row["status"], row["lease_node"]) == ("running", "other:1:x")
        final = [e.topic for e in seen if e.data.get("task_id") == record.id
                 and e.topic in ("task.succeeded", "task.failed", "task.cancelled", "task.dead")]
        assert final == []
    finally:
        await store.close()


async def test_status_lists_the_daemons_alive(pg_daemons: Any, http: Any) -> None:
    a = await pg_daemons.start("a")
    b = await pg_daemons.start("b")
    async with http(a) as client:
        status = await (await client.get("/v1/status")).json()
        assert {node["id"] for node in status["daemons"]} == {a.queue.tasks.node_id,
                                                               b.queue.tasks.node_id}
        assert status["node"] == a.queue.tasks.node_id
        await b.stop()
        status = await (await client.get("/v1/status")).json()
        assert [node["id"] for node in status["daemons"]] == [a.queue.tasks.node_id]


def shared_started(task_id: int) -> asyncio.Event:
    started: dict[int, asyncio.Event] = shared().started
    return started.setdefault(task_id, asyncio.Event())


def shared_gate(name: str) -> asyncio.Event:
    gates: dict[str, asyncio.Event] = shared().gates
    return gates.setdefault(name, asyncio.Event())


async def test_a_killed_daemon_s_task_is_taken_over_once_its_lease_lapses(
        pg_daemons: Any, tmp_path: Path, agentd_process: Any, process_env: Any, http: Any) -> None:
    """A daemon killed with SIGKILL in the middle of a task: another, running all along,
    takes the task over once its lease lapses, and its memoized step is not run again; the
    dead daemon drops off /v1/status."""
    runs_file = tmp_path / "runs.txt"
    runs_file.touch()
    config = tmp_path / "child.toml"
    config.write_text(textwrap.dedent(f"""
        [daemon]
        data_dir = "child-data"
        stop_timeout = 5.0

        [plugins]
        paths = [{json.dumps(str(pg_daemons.plugin_dir))}]
        entry_points = false

        [plugins.ct]
        node = "child"
        hang = true
        runs_file = {json.dumps(str(runs_file))}

        [tasks]
        lease = 1.0
        queues = {{ default = 4 }}

        [events]
        sweep_interval = 3e9

        [store]
        maintenance_interval = 3e9

        [memory]
        purge_interval = 3e9
        """))
    child = await agentd_process("run", "--config", str(config),
                                 env=process_env(AGENTD_STORE_URL=pg_daemons.url))
    port = await child.started()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as client:
        response = await client.post("/v1/tasks", json={"name": "ct.takeover"})
        assert response.status in (200, 201, 202), await response.text()
        task_id = (await response.json())["id"]
        others = []
        for n in range(5):
            response = await client.post("/v1/tasks", json={"name": "ct.work", "args": {"n": n},
                                                             "delay": 0.5})
            others.append((await response.json())["id"])
    hanging = await child.wait_for_log("ct.hanging")
    assert hanging["task_id"] == task_id
    survivor = await pg_daemons.start("survivor", tasks={"lease": 1.0}, hang=False,
                                      runs_file=str(runs_file))
    async with http(survivor) as client:
        status = await (await client.get("/v1/status")).json()
        assert len(status["daemons"]) == 2
        child.proc.kill()  # SIGKILL: no stop, no unclaim, the lease left to lapse
        assert await child.finish() == -signal.SIGKILL
        record = await asyncio.wait_for(survivor.queue.wait(task_id), 30)
        assert record.status == "succeeded" and record.result == "done"
        assert record.attempts == 2
        assert runs_file.read_text().split("\n")[:2] == [f"one {task_id} child",
                                                         f"two {task_id} survivor"]
        for other in others:  # every committed task ends
            assert (await asyncio.wait_for(survivor.queue.wait(other), 30)).finished
        # The child's heartbeat stopped more than a lease ago: not listed any more.
        status = await (await client.get("/v1/status")).json()
        assert [node["id"] for node in status["daemons"]] == [survivor.queue.tasks.node_id]


# -- assignment: an enqueue hands a due task to a daemon that told of a free slot --------------


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for `condition()` to hold, checking at each loop turn and every 10 ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)  # noqa: sleep (polling a condition with a deadline)


async def busy_and_idle(pg_daemons: Any) -> tuple[Any, Any, Any]:
    """Daemon a with its one worker held by a task, and daemon b with 2 free slots, which a
    has heard of; and the holding task's record."""
    a = await pg_daemons.start("a", workers={"default": 1})
    holding = await a.queue.enqueue("ct.block", {"name": "hold"})
    await asyncio.wait_for(shared_started(holding.id).wait(), 10)
    b = await pg_daemons.start("b", workers={"default": 2})
    await until(lambda: a.queue.tasks.peers_free("default") == {b.queue.tasks.node_id: 2})
    return a, b, holding


async def test_a_task_enqueued_where_no_slot_is_free_is_assigned_to_a_daemon_that_told_of_one(
        pg_daemons: Any) -> None:
    """b starts it from the notification, without a claim: its row was inserted running under
    b's lease. A name with limits is never assigned (its place is counted by claims)."""
    a, b, holding = await busy_and_idle(pg_daemons)
    assigned_out = a.queue.tasks.assigned_out  # the hold itself may have been, to a
    record = await a.queue.enqueue("ct.work", {"n": 7})
    await asyncio.wait_for(shared_started(record.id).wait(), 10)
    assert (record.id, "b") in shared().runs
    assert (a.queue.tasks.assigned_out - assigned_out, b.queue.tasks.assigned_in) == (1, 1)
    done = await asyncio.wait_for(a.queue.wait(record.id), 10)
    assert (done.status, done.result, done.attempts) == ("succeeded", 7, 1)
    # Told again once the task ended: both slots free.
    await until(lambda: a.queue.tasks.peers_free("default") == {b.queue.tasks.node_id: 2})
    limited = await a.queue.enqueue("ct.limited")
    assert (await asyncio.wait_for(a.queue.wait(limited.id), 10)).status == "succeeded"
    assert a.queue.tasks.assigned_out - assigned_out == 1  # claimed by b, not assigned
    assert (limited.id, "b") in shared().runs
    shared_gate("hold").set()
    assert (await asyncio.wait_for(a.queue.wait(holding.id), 10)).status == "succeeded"


async def test_tasks_too_big_for_a_notification_are_assigned_by_id_and_read(pg_daemons: Any) -> None:
    a, b, holding = await busy_and_idle(pg_daemons)
    name = "big-" + "x" * 9000  # the args alone pass PostgreSQL's 8,000-byte payload limit
    record = await a.queue.enqueue("ct.block", {"name": name})
    await asyncio.wait_for(shared_started(record.id).wait(), 10)
    assert (record.id, "b") in shared().runs
    assert b.queue.tasks.assigned_in == 1
    shared_gate(name).set()
    done = await asyncio.wait_for(a.queue.wait(record.id), 10)
    assert (done.status, done.attempts) == ("succeeded", 1)
    shared_gate("hold").set()
    await asyncio.wait_for(a.queue.wait(holding.id), 10)


async def test_a_daemon_assigned_a_task_after_its_slots_filled_puts_it_back(pg_daemons: Any) -> None:
    """News of free slots can be stale: here b's slots are full when a hears (from a
    notification sent by the test, as b would have sent it a moment before) that one is
    free. b puts the task back in the queue, unstarted and its attempt unspent, and it runs
    once a slot frees."""
    a, b, holding = await busy_and_idle(pg_daemons)
    blocking = [await b.queue.enqueue("ct.block", {"name": "b-busy"}) for _ in range(2)]
    for record in blocking:
        await asyncio.wait_for(shared_started(record.id).wait(), 10)
    await until(lambda: not a.queue.tasks.peers_free("default"))  # b told it has none
    conn = await asyncpg.connect(pg_daemons.url)
    try:
        await conn.execute("SELECT pg_notify('agentd_idle', $1)", f"{b.queue.tasks.node_id} default 1")
    finally:
        await conn.close()
    await until(lambda: a.queue.tasks.peers_free("default") == {b.queue.tasks.node_id: 1})
    assigned_in = b.queue.tasks.assigned_in  # its own blocking tasks were, to b
    record = await a.queue.enqueue("ct.work", {"n": 1})
    await until(lambda: b.queue.tasks.assigned_in == assigned_in + 1)
    deadline = time.monotonic() + 10
    while (row := await a.queue.get(record.id)).status != "queued":  # put back by b
        assert time.monotonic() < deadline, row
        await asyncio.sleep(0.01)  # noqa: sleep (polling the row with a deadline)
    assert row.attempts == 0
    assert not shared_started(record.id).is_set()
    shared_gate("b-busy").set()
    done = await asyncio.wait_for(a.queue.wait(record.id), 10)
    assert (done.status, done.attempts) == ("succeeded", 1)
    shared_gate("hold").set()
    await asyncio.wait_for(a.queue.wait(holding.id), 10)


async def test_a_daemon_that_does_not_hear_notifications_is_assigned_nothing(pg_daemons: Any) -> None:
    """A node that told of a free slot but holds no listening lock (dead, or its listening
    connection lost) gets no task: the row is inserted queued instead, and the node is
    forgotten."""
    a = await pg_daemons.start("a", workers={"default": 1})
    holding = await a.queue.enqueue("ct.block", {"name": "hold"})
    await asyncio.wait_for(shared_started(holding.id).wait(), 10)
    conn = await asyncpg.connect(pg_daemons.url)
    try:
        await conn.execute("SELECT pg_notify('agentd_idle', 'ghost default 3')")
    finally:
        await conn.close()
    await until(lambda: a.queue.tasks.peers_free("default") == {"ghost": 3})
    assigned_out = a.queue.tasks.assigned_out  # the hold itself may have been, to a
    record = await a.queue.enqueue("ct.work", {"n": 2})
    stored = await a.queue.get(record.id)
    assert (stored.status, stored.attempts) == ("queued", 0)
    assert a.queue.tasks.assigned_out == assigned_out
    assert a.queue.tasks.peers_free("default") == {}
    shared_gate("hold").set()
    done = await asyncio.wait_for(a.queue.wait(record.id), 10)
    assert (done.status, done.attempts) == ("succeeded", 1)
    assert (record.id, "a") in shared().runs


async def test_a_daemon_with_a_free_slot_assigns_the_task_it_enqueues_to_itself(
        pg_daemons: Any) -> None:
    """Alone on the database too: the notification of the insert starts the task, with no
    claim after the enqueue; the limited name is claimed."""
    a = await pg_daemons.start("a", workers={"default": 2})
    await asyncio.wait_for(a.storage.postgres.listening.wait(), 10)
    for n in range(3):
        # Its claim loop has counted its free slots (at the start, or since the last task
        # ended: the waiter may wake before the loop has).
        await until(lambda: a.queue.tasks._own_free.get("default") == 2)
        record = await a.queue.enqueue("ct.work", {"n": n})
        done = await asyncio.wait_for(a.queue.wait(record.id), 10)
        assert (done.status, done.result, done.attempts) == ("succeeded", n, 1)
    assert (a.queue.tasks.assigned_out, a.queue.tasks.assigned_in) == (3, 3)
    # Started once each: by the insert's result or by its notification, whichever came first.
    assert sorted(node for _, node in shared().runs) == ["a", "a", "a"]
    limited = await a.queue.enqueue("ct.limited")
    assert (await asyncio.wait_for(a.queue.wait(limited.id), 10)).status == "succeeded"
    assert a.queue.tasks.assigned_out == 3


async def test_a_cancel_heard_while_an_assigned_task_is_read_ends_it_unstarted(
        pg_daemons: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """b reads a task assigned to it by id (too big for the notification); a's cancel of it
    commits after b's read and is heard before b has the task in hand: b must not run it.
    The read is held here between its rows and their return."""
    a, b, holding = await busy_and_idle(pg_daemons)
    read, go_on = asyncio.Event(), asyncio.Event()
    reading = b.queue.tasks.store.read

    async def held_read(sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = await reading(sql, params)
        if "lease_node = $2" in sql and sql.startswith("SELECT id, queue"):
            read.set()
            await go_on.wait()
        return rows

    monkeypatch.setattr(b.queue.tasks.store, "read", held_read)
    name = "big-" + "x" * 9000
    record = await a.queue.enqueue("ct.block", {"name": name})
    await asyncio.wait_for(read.wait(), 10)
    done = await cancel_while_held(a, b, record.id, go_on)
    assert (done.status, done.error) == ("cancelled", "cancelled")
    assert record.id not in [task_id for task_id, _ in shared().runs]  # its body never ran
    shared_gate("hold").set()
    await asyncio.wait_for(a.queue.wait(holding.id), 10)
