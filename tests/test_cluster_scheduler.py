"""Several daemons on one PostgreSQL database: the scheduler fires each fire time once
across them, one of them leads and another takes over when it goes, a schedule changed
through any daemon acts on the leader, and inbound hooks' delivery ids and the stream
tokens' key are shared.

The first tests drive the PostgreSQL storage classes directly (two `PgStore`s standing for
two daemons); the later ones run whole daemons."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from agentd.app import Daemon
from agentd.config import StoreConfig
from agentd.events import Event
from agentd.hooks import ReplayedDeliveryError
from agentd.postgres.hooks import PgDeliveries
from agentd.postgres.schedules import _LEAD_CHECK, _LEAD_LOCK, _LEAD_RETRY, PgSchedules
from agentd.postgres.streamkey import PgStreamKey
from agentd.schedule import ScheduleSpec
from agentd.scheduler import ScheduleState
from agentd.store.postgres import PgStore
from agentd.testing import EventCapture, ManualClock, daemon_url, make_config
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
    assert await a.insert(state(next_fire=60.0), 2.0) is True
    await until(lambda: seen_by_b == ["tick"])
    # One id, one schedule: B's API, not yet told of A's, cannot make another.
    assert await b.insert(state(next_fire=30.0), 2.5) is False
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
    # A's insert and record, not B's own save and delete: a daemon's writes are not
    # announced back to itself. PostgreSQL delivers notifications in commit order, so once
    # B has heard of a marker A wrote last, B has heard everything it ever will of the rest.
    assert await a.insert(state("marker", next_fire=60.0), 5.0) is True
    await until(lambda: seen_by_b[-1:] == ["marker"])
    assert seen_by_b == ["tick", "tick", "marker"]


async def test_writes_from_an_older_copy_undo_nothing_another_daemon_changed(
        two_stores: tuple[PgStore, PgStore]) -> None:
    """The race a cluster test once lost: the leader, its copy still paused, recorded a
    fire's outcome just after a resume through another daemon committed, and wrote its old
    `next_fire` back, so the times passed while paused were fired after all."""
    a, b = PgSchedules(two_stores[0]), PgSchedules(two_stores[1])  # neither leads
    assert await a.insert(state(paused=True, next_fire=60.0, last_fire=0.0, fires=1), 1.0)
    await b.save(state(next_fire=180.0, last_fire=0.0, fires=1), 2.0)  # resumed at 180
    await a.save_record(state(paused=True, next_fire=60.0, last_fire=0.0, fires=1,
                              last_outcome="failed", failures_in_row=1), 3.0)
    stored = await b.load_one("tick")
    assert stored is not None
    assert (stored.paused, stored.next_fire, stored.failures_in_row, stored.last_outcome) == \
        (False, 180.0, 0, "failed")
    # A retime through B, then A's record of a fire by the old timing.
    retimed = ScheduleSpec.from_mapping({"id": "tick", "every": "5m", "task": "t"})
    await b.save(ScheduleState(retimed, "api", next_fire=300.0, last_fire=0.0, fires=1,
                               created_at=1.0), 4.0)
    await a.save_record(state(next_fire=240.0, last_fire=180.0, fires=2, last_task_id=9), 5.0)
    stored = await b.load_one("tick")
    assert stored is not None
    assert (stored.next_fire, stored.last_fire, stored.fires, stored.last_task_id) == \
        (300.0, 180.0, 2, 9)
    # B pauses from its copy, which predates that fire: the record of the fire stays.
    await b.save(ScheduleState(retimed, "api", paused=True, next_fire=300.0, last_fire=0.0,
                               fires=1, created_at=1.0), 6.0)
    stored = await b.load_one("tick")
    assert stored is not None
    assert (stored.paused, stored.last_fire, stored.fires, stored.last_task_id) == (True, 180.0, 2, 9)


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

    def op(deliveries: PgDeliveries, delivery_id: str, refuse_until: float,
           now: float) -> Callable[[Any], Any]:
        within = deliveries.take("gh", delivery_id, refuse_until, now).within
        assert within is not None  # taken in the transaction of what the delivery does
        return within

    now = time.time()
    assert not await b.taken("gh", "d1", now)
    await a.store.write(op(a, "d1", now + 60, now))
    assert await b.taken("gh", "d1", now)
    with pytest.raises(ReplayedDeliveryError):  # its write refuses it too
        await b.store.write(op(b, "d1", now + 60, now))
    assert not await b.taken("gh", "d1", now + 61)  # past its window
    await b.store.write(op(b, "d2", now + 60, now + 61))  # forgets the expired d1
    assert not await a.taken("gh", "d1", now)
    # A copy being taken in a transaction not yet committed is refused, without waiting.
    took, release = asyncio.Event(), asyncio.Event()
    taking = op(a, "d3", now + 60, now)

    async def take_and_hold(conn: Any) -> None:
        await taking(conn)
        took.set()
        await release.wait()

    held = a.store.write(take_and_hold)
    try:
        await asyncio.wait_for(took.wait(), WAIT)
        with pytest.raises(ReplayedDeliveryError):
            await asyncio.wait_for(b.store.write(op(b, "d3", now + 60, now)), WAIT)
    finally:
        release.set()
        await held
    assert await b.taken("gh", "d3", now)


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


# --------------------------------------------------------------------------- whole daemons

CLUSTER_PLUGIN = textwrap.dedent("""
    from agentd import Plugin

    plugin = Plugin("cl")


    @plugin.task()
    async def work(ctx, label="work"):
        return label


    @plugin.task(max_attempts=1)
    async def fail(ctx):
        raise RuntimeError("failing on purpose")
""")
SECRET = "cluster-hook-secret"
TOKEN = "cluster-t0ken"
START = 1_800_864_600.0  # 2027-01-25 08:10 UTC: a multiple of 10 minutes
MINUTE = 60.0
QUIET = {
    "tasks": {"queues": {"default": 4}},
    "server": {"token": TOKEN},
    "hooks": {"gh": {"secret": SECRET}},
}


@dataclass
class Node:
    """One daemon of the cluster, its captured bus and an HTTP client on it."""

    daemon: Daemon
    events: EventCapture
    http: aiohttp.ClientSession

    @property
    def leading(self) -> bool:
        return self.daemon.scheduler.store.leading

    async def call(self, method: str, path: str, body: Any = None, status: int = 200,
                   **kwargs: Any) -> Any:
        async with self.http.request(method, path, json=body, **kwargs) as response:
            payload = await response.json() if response.content_type == "application/json" else None
            assert response.status == status, payload
        return payload


Cluster = Callable[..., Awaitable[list[Node]]]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[str, Cluster]]:
    """(url, start): `nodes = await start(clock, n=3)` starts n daemons (together) on the
    database at `url`, each with a data directory of its own (memory.db stays per daemon)
    and the `cl` plugin; stopped at teardown unless a test stopped one."""
    url = await fresh_database()
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "cl.py").write_text(CLUSTER_PLUGIN)
    started = itertools.count()
    async with AsyncExitStack() as stack:

        async def start(clock: ManualClock, n: int = 3) -> list[Node]:
            daemons = []
            for _ in range(n):
                sys.modules.pop("agentd_plugins.cl", None)
                config = make_config(tmp_path / f"node{next(started)}", [plugins],
                                     {**QUIET, "store": {"url": url}})
                daemons.append(Daemon(config, clock=clock))
            captures = [EventCapture(daemon.bus) for daemon in daemons]
            await asyncio.gather(*(daemon.start() for daemon in daemons))
            nodes = []
            for daemon, events in zip(daemons, captures, strict=True):
                stack.push_async_callback(daemon.stop)
                session = await stack.enter_async_context(aiohttp.ClientSession(
                    daemon_url(daemon), headers={"Authorization": f"Bearer {TOKEN}"},
                    timeout=aiohttp.ClientTimeout(total=10)))
                nodes.append(Node(daemon, events, session))
            return nodes

        yield url, start


async def one_leader(nodes: list[Node]) -> Node:
    """The one node that leads, once one does (never two at once)."""
    await until(lambda: sum(node.leading for node in nodes) == 1)
    (leader,) = [node for node in nodes if node.leading]
    return leader


async def keys(url: str, schedule_id: str) -> list[str]:
    """The idempotency keys of the tasks fired for `schedule_id`, in order (repeats kept)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT idempotency_key FROM tasks WHERE idempotency_key LIKE $1 "
                                "ORDER BY idempotency_key", f"schedule:{schedule_id}:%")
    finally:
        await conn.close()
    return [row[0] for row in rows]


def key(schedule_id: str, fire_time: float) -> str:
    return f"schedule:{schedule_id}:{fire_time:.6f}"


def shown(node: Node, schedule_id: str, field: str) -> Any:
    """A field of the node's copy of a schedule (None while it knows of no such schedule)."""
    state = node.daemon.scheduler.schedules.get(schedule_id)
    return None if state is None else getattr(state, field)


def fired(nodes: list[Node], schedule_id: str) -> list[Event]:
    """Every `schedule.fired` of `schedule_id` that any node's bus saw."""
    return [e for node in nodes for e in node.events.events
            if e.topic == "schedule.fired" and e.data.get("schedule_id") == schedule_id]


async def test_each_fire_time_is_enqueued_once_across_three_daemons(
        cluster: tuple[str, Cluster]) -> None:
    url, start = cluster
    clock = ManualClock(START)
    nodes = await start(clock)
    leader = await one_leader(nodes)
    other = next(node for node in nodes if node is not leader)
    await other.call("POST", "/v1/schedules", {"id": "tick", "every": "1m", "task": "cl.work"},
                     status=201)
    times = [START + i * MINUTE for i in range(5)]
    for fire_time in times:
        clock.set(fire_time)
        await until_async(lambda t=fire_time: _has_key(url, "tick", t))
    assert await keys(url, "tick") == [key("tick", t) for t in times]
    # Fired by the leader alone: no daemon made a fire that found its task already there.
    events = fired(nodes, "tick")
    assert {e.data["fire_time"] for e in events} == set(times)
    assert all(e.data["created"] for e in events)
    await until(lambda: all(shown(node, "tick", "fires") == 5 for node in nodes))
    for node in nodes:  # every daemon's API shows the leader's record
        view = await node.call("GET", "/v1/schedules/tick")
        assert (view["fires"], view["last_fire"], view["next_fire"]) == (5, times[-1], times[-1] + MINUTE)


async def test_fires_missed_while_all_were_down_follow_catch_up_once(
        cluster: tuple[str, Cluster]) -> None:
    url, start = cluster
    first = await start(ManualClock(START))
    await first[0].call("POST", "/v1/schedules",
                        {"id": "late", "every": "10m", "task": "cl.work", "catch_up": "once"}, status=201)
    await until_async(lambda: _has_key(url, "late", START))
    await until(lambda: all(shown(node, "late", "fires") == 1 for node in first))
    for node in first:
        await node.daemon.stop()
    # All down from 08:10 to 08:45: the fires of 08:20, 08:30 and 08:40 are late.
    again = await start(ManualClock(START + 35 * MINUTE))
    await one_leader(again)
    await until_async(lambda: _has_key(url, "late", START + 30 * MINUTE))
    await until(lambda: all(shown(node, "late", "misses") == 2 for node in again))
    assert await keys(url, "late") == [key("late", START), key("late", START + 30 * MINUTE)]
    events = fired(again, "late")
    assert [e.data["fire_time"] for e in events if e.data["created"]] == [START + 30 * MINUTE]
    assert not [e for e in events if not e.data["created"]]
    missed = {e.data["fire_time"] for node in again for e in node.events.events
              if e.topic == "schedule.missed" and e.data.get("schedule_id") == "late"}
    assert missed == {START + 10 * MINUTE, START + 20 * MINUTE}
    view = await again[2].call("GET", "/v1/schedules/late")
    assert (view["fires"], view["misses"], view["next_fire"]) == (2, 2, START + 40 * MINUTE)


async def test_when_the_leader_stops_another_leads_within_the_bound_and_no_fire_is_lost_or_doubled(
        cluster: tuple[str, Cluster]) -> None:
    url, start = cluster
    clock = ManualClock(START)
    nodes = await start(clock)
    leader = await one_leader(nodes)
    await leader.call("POST", "/v1/schedules", {"id": "tick", "every": "1m", "task": "cl.work"},
                      status=201)
    await until_async(lambda: _has_key(url, "tick", START))
    clock.set(START + MINUTE)  # due now: the leader may or may not fire it before it stops
    await leader.daemon.stop()
    stopped = time.monotonic()
    rest = [node for node in nodes if node is not leader]
    successor = await one_leader(rest)
    took = time.monotonic() - stopped
    assert took < _LEAD_RETRY + 1.0, took  # the bound PgSchedules states
    for minutes in (1, 2, 3):
        clock.set(START + minutes * MINUTE)
        await until_async(lambda m=minutes: _has_key(url, "tick", START + m * MINUTE))
    assert await keys(url, "tick") == [key("tick", START + m * MINUTE) for m in range(4)]
    await until(lambda: (shown(successor, "tick", "fires") or 0) >= 3)
    # The successor's own fires made their tasks (a fire the stopped leader had made may
    # be fired again by the successor: its key finds the task, `created` False).
    later = [e for e in fired(rest, "tick") if e.data["fire_time"] > START + MINUTE]
    assert sorted(e.data["fire_time"] for e in later) == [START + 2 * MINUTE, START + 3 * MINUTE]
    assert all(e.data["created"] for e in later)


async def test_when_the_leader_s_session_dies_one_daemon_leads_within_the_bound(
        cluster: tuple[str, Cluster]) -> None:
    """As PostgreSQL sees a leader whose process died: its lock session ends (here by
    pg_terminate_backend). The leader stops firing once it finds its session gone, one
    daemon leads again within the bound (the old one may win the retry too), and each fire
    time is still enqueued once."""
    url, start = cluster
    clock = ManualClock(START)
    nodes = await start(clock)
    leader = await one_leader(nodes)
    await leader.call("POST", "/v1/schedules", {"id": "tick", "every": "1m", "task": "cl.work"},
                      status=201)
    await until_async(lambda: _has_key(url, "tick", START))
    conn = await asyncpg.connect(url)
    with capture_logs() as logs:
        try:
            ended = await conn.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND objid = $1::bigint % 4294967296 AND granted", _LEAD_LOCK)
        finally:
            await conn.close()
        assert [row[0] for row in ended] == [True]
        began = time.monotonic()
        # The old leader may lead again at once (it retries too): its log says it lost.
        await until(lambda: any(log["event"] == "scheduler.lead_lost" for log in logs))
    await one_leader(nodes)
    took = time.monotonic() - began
    assert took < _LEAD_RETRY + _LEAD_CHECK + 1.0, took
    for minutes in (1, 2, 3):
        clock.set(START + minutes * MINUTE)
        await until_async(lambda m=minutes: _has_key(url, "tick", START + m * MINUTE))
    assert await keys(url, "tick") == [key("tick", START + m * MINUTE) for m in range(4)]
    assert all(e.data["created"] for e in fired(nodes, "tick"))


async def test_a_schedule_made_paused_and_deleted_through_another_daemon_acts_on_the_leader(
        cluster: tuple[str, Cluster]) -> None:
    url, start = cluster
    clock = ManualClock(START)
    nodes = await start(clock)
    leader = await one_leader(nodes)
    b, c = [node for node in nodes if node is not leader]
    # A control schedule on the leader marks each minute's pass as done.
    await leader.call("POST", "/v1/schedules", {"id": "ctl", "every": "1m", "task": "cl.work"},
                      status=201)
    await b.call("POST", "/v1/schedules", {"id": "d", "every": "1m", "task": "cl.work"}, status=201)
    # Read your writes on any daemon, at once: the others' API reads the table first.
    assert (await c.call("GET", "/v1/schedules/d"))["every"] == 60.0
    assert (await leader.call("GET", "/v1/schedules/d"))["every"] == 60.0
    await c.call("POST", "/v1/schedules", {"id": "d", "every": "1h", "task": "cl.work"}, status=409)
    await until(lambda: "d" in leader.daemon.scheduler.schedules)
    await until_async(lambda: _has_key(url, "d", START))  # the leader fires B's schedule

    await b.call("POST", "/v1/schedules/d/pause")
    assert (await c.call("GET", "/v1/schedules/d"))["paused"] is True
    assert any(s["id"] == "d" and s["paused"] for s in (await c.call("GET", "/v1/schedules"))["schedules"])
    await until(lambda: shown(leader, "d", "paused"))
    for minutes in (1, 2):  # the second minute's fire of ctl: the first minute's pass is over
        clock.set(START + minutes * MINUTE)
        await until_async(lambda m=minutes: _has_key(url, "ctl", START + m * MINUTE))
    assert await keys(url, "d") == [key("d", START)]

    await c.call("POST", "/v1/schedules/d/resume")  # at 08:12: it goes on from then
    await until(lambda: shown(leader, "d", "paused") is False)
    await until_async(lambda: _has_key(url, "d", START + 2 * MINUTE))
    clock.set(START + 3 * MINUTE)
    await until_async(lambda: _has_key(url, "d", START + 3 * MINUTE))

    await b.call("DELETE", "/v1/schedules/d", status=204)
    await c.call("GET", "/v1/schedules/d", status=404)
    await until(lambda: "d" not in leader.daemon.scheduler.schedules)
    await leader.call("GET", "/v1/schedules/d", status=404)
    for minutes in (4, 5):
        clock.set(START + minutes * MINUTE)
        await until_async(lambda m=minutes: _has_key(url, "ctl", START + m * MINUTE))
    assert await keys(url, "d") == [key("d", START + m * MINUTE) for m in (0, 2, 3)]


async def test_the_leader_records_the_outcome_of_a_fire_another_daemon_ran(
        cluster: tuple[str, Cluster]) -> None:
    """pause_after_failures across daemons: the task fails on another daemon than the
    leader (whose workers are stopped), and the leader still hears of it and pauses."""
    url, start = cluster
    clock = ManualClock(START)
    nodes = await start(clock)
    leader = await one_leader(nodes)
    await leader.daemon.workers.stop(0.0)  # its tasks run on the others
    b = next(node for node in nodes if node is not leader)
    await b.call("POST", "/v1/schedules", {"id": "flaky", "every": "1m", "task": "cl.fail",
                                           "pause_after_failures": 1}, status=201)
    await until_async(lambda: _has_key(url, "flaky", START))
    await until(lambda: all(shown(node, "flaky", "paused") for node in nodes))
    view = await b.call("GET", "/v1/schedules/flaky")
    assert (view["paused"], view["failures_in_row"], view["fires"]) == (True, 1, 1)
    assert view["last_outcome"] in ("failed", "dead")
    # The leader's own bus never told of it: the task ran elsewhere.
    assert not [e for e in leader.events.events if e.topic in ("task.failed", "task.dead")]


def signed(body: bytes, webhook_id: str) -> dict[str, str]:
    """Standard Webhooks headers for `body`, from the specification."""
    stamp = int(time.time())
    mac = hmac.new(SECRET.encode(), f"{webhook_id}.{stamp}.".encode() + body, hashlib.sha256)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(stamp),
            "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode()}


async def test_a_replayed_delivery_and_stream_tokens_hold_across_daemons(
        cluster: tuple[str, Cluster]) -> None:
    _, start = cluster
    a, b = await start(ManualClock(START), n=2)
    body = b'{"n": 1}'
    headers = signed(body, "msg_cluster_1")
    async with a.http.post("/hooks/gh", data=body, headers=headers) as response:
        assert response.status == 202
    async with b.http.post("/hooks/gh", data=body, headers=headers) as response:
        assert response.status == 409
        assert "msg_cluster_1" in (await response.json())["error"]["message"]

    token = (await a.call("POST", "/v1/stream-tokens", status=201))["token"]

    async def opens(node: Node, stream_token: str) -> int:
        async with aiohttp.ClientSession(daemon_url(node.daemon)) as anonymous, anonymous.get(
                "/v1/stream", params={"token": stream_token}) as response:
            return response.status

    assert await opens(b, token) == 200
    await a.call("DELETE", "/v1/stream-tokens", status=204)
    assert await opens(a, token) == 401

    async def refused_on_b() -> bool:  # B re-reads the key once told of the rotation
        return await opens(b, token) == 401

    await until_async(refused_on_b)
    fresh = (await a.call("POST", "/v1/stream-tokens", status=201))["token"]
    assert await opens(b, fresh) == 200


async def _has_key(url: str, schedule_id: str, fire_time: float) -> bool:
    return key(schedule_id, fire_time) in await keys(url, schedule_id)


async def until_async(condition: Callable[[], Awaitable[bool]], timeout: float = WAIT) -> None:
    """Wait for `await condition()` to hold, checking every 20 ms."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)  # noqa: sleep (polling a condition with a deadline)
