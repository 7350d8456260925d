"""Several daemons on one PostgreSQL database: the scheduler fires each fire time once
across them, one of them leads and another takes over when it goes, a schedule changed
through any daemon acts on the leader, and inbound hooks' delivery ids and the stream
tokens' key are shared.

The first tests drive the PostgreSQL storage classes directly (two `PgStore`s standing for
two daemons); the later ones run whole daemons."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from agentd.config import StoreConfig
from agentd.postgres.auth import PgStreamKey
from agentd.postgres.hooks import PgDeliveries
from agentd.postgres.schedules import _LEAD_RETRY, PgSchedules
from agentd.schedule import ScheduleSpec
from agentd.scheduler import ScheduleState
from agentd.store.postgres import PgStore
from pg import fresh_database

WAIT = 10.0


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait for `condition()` to hold, checking at each loop turn and every 10 ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)  # noqa: sleep (polling a condition with a deadline)


@pytest.fixture
async def two_stores() -> AsyncIterator[tuple[PgStore, PgStore]]:
    """Two stores on one fresh database, each listening: two daemons' worth."""
    url = await fresh_database()
    async with AsyncExitStack() as stack:
        stores = []
        for _ in range(2):
            store = PgStore(StoreConfig(url=url, pool_size=2))
            await store.open()
            stack.push_async_callback(store.close)
            listener = asyncio.create_task(store.run_listener())
            stack.callback(listener.cancel)
            stores.append(store)
        yield stores[0], stores[1]


def state(schedule_id: str = "tick", **fields: Any) -> ScheduleState:
    spec = ScheduleSpec.from_mapping({"id": schedule_id, "every": "1m", "task": "t"})
    return ScheduleState(spec, "api", created_at=1.0, **fields)


async def test_pg_schedules_store_load_and_notify_the_other_daemons(
        two_stores: tuple[PgStore, PgStore]) -> None:
    a, b = PgSchedules(two_stores[0]), PgSchedules(two_stores[1])
    seen_by_a: list[str | None] = []
    seen_by_b: list[str | None] = []
    a.watch(seen_by_a.append)
    b.watch(seen_by_b.append)
    await until(lambda: two_stores[0].listening.is_set() and two_stores[1].listening.is_set())
    seen_by_a.clear()
    seen_by_b.clear()
    await a.save(state(next_fire=60.0), 2.0)
    await until(lambda: seen_by_b == ["tick"])
    loaded = await b.load_one("tick")
    assert loaded is not None and loaded.next_fire == 60.0 and loaded.source == "api"
    # A fire's record leaves `paused` alone: a pause made meanwhile through B stays.
    paused = state(paused=True, next_fire=60.0)
    await b.save(paused, 3.0)
    await a.save_record(state(next_fire=120.0, last_fire=60.0, fires=1, last_task_id=7), 4.0)
    (stored,) = await b.load()
    assert (stored.paused, stored.next_fire, stored.fires, stored.last_task_id) == (True, 120.0, 1, 7)
    await b.delete("tick")
    await until(lambda: seen_by_a[-1:] == ["tick"])
    assert await a.load_one("tick") is None
    # A's save and record, not B's own save and delete: a daemon's writes are not
    # announced back to itself.
    assert seen_by_b == ["tick", "tick"]


async def test_one_daemon_leads_and_another_takes_over_when_its_connection_dies(
        two_stores: tuple[PgStore, PgStore]) -> None:
    a, b = PgSchedules(two_stores[0]), PgSchedules(two_stores[1])
    a_lost = asyncio.Event()
    assert await asyncio.wait_for(a.lead(a_lost.set), WAIT) is True
    assert a.leading
    b_leads = asyncio.create_task(b.lead(lambda: None))
    try:
        done, _ = await asyncio.wait({b_leads}, timeout=3 * _LEAD_RETRY)
        assert not done and not b.leading  # the lock is A's
        # The server ends A's lock session (as when A's host dies): B leads within the bound.
        await two_stores[1].read(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND objid = $1::bigint % 4294967296 AND granted", (0x6167656E746473,))
        began = time.monotonic()
        await asyncio.wait_for(a_lost.wait(), WAIT)
        assert not a.leading
        await asyncio.wait_for(b_leads, WAIT)
        assert b.leading and time.monotonic() - began < _LEAD_RETRY + 2.0
        # B resigns (it stops): A leads again.
        b.resign()
        assert await asyncio.wait_for(a.lead(lambda: None), WAIT) is True
    finally:
        b_leads.cancel()
        a.resign()
        b.resign()


async def test_a_delivery_taken_on_one_daemon_is_refused_on_another(
        two_stores: tuple[PgStore, PgStore]) -> None:
    a, b = PgDeliveries(two_stores[0]), PgDeliveries(two_stores[1])
    now = time.time()
    assert not await b.taken("gh", "d1", now)
    await a.take("gh", "d1", now + 60, now)
    assert await b.taken("gh", "d1", now)
    assert not await b.taken("gh", "d1", now + 61)  # past its window
    await b.take("gh", "d2", now + 60, now + 61)  # forgets the expired d1
    assert not await a.taken("gh", "d1", now)


async def test_the_stream_key_is_shared_and_its_replacement_is_announced(
        two_stores: tuple[PgStore, PgStore]) -> None:
    a, b = PgStreamKey(two_stores[0]), PgStreamKey(two_stores[1])
    replaced: list[None] = []
    b.watch(lambda: replaced.append(None))
    await until(two_stores[1].listening.is_set)
    replaced.clear()
    key = await a.load("aa" * 32)
    assert key == "aa" * 32 and await b.load("bb" * 32) == key
    await a.replace("cc" * 32)
    await until(lambda: bool(replaced))
    assert await b.load("dd" * 32) == "cc" * 32


_ = Awaitable  # (used by the daemon-level tests below)
