"""The queue shared by several daemons on one PostgreSQL database (agentd/postgres/tasks.py).

The first tests drive `PgTasks` directly, one per `PgStore` as each daemon has its own
pool: claims that skip each other's rows, limits counted in the database, keys taken
through the UNIQUE index, leases that lapse, and the notifications that carry the news."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from agentd.config import StoreConfig
from agentd.postgres.tasks import PgTasks
from agentd.store.postgres import PgStore
from agentd.taskqueue import ClaimFuture, NameLimits, TaskRecord
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
            None, None, now)


async def claim(tasks: PgTasks, wanted: int, limits: NameLimits | None = None,
                lease: float = 30.0, queue: str = "default") -> tuple[list[TaskRecord], float | None]:
    future: ClaimFuture = asyncio.get_running_loop().create_future()
    tasks.join_claims({queue: future}, lambda _: wanted, lambda: (set(), {}),
                      lambda: limits or {}, lease)
    tasks.request_flush()
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
