"""One event log and one stream bus across daemons on one PostgreSQL database.

The first tests drive the event log itself: each "node" is what a daemon builds of it (a
PgStore with its listener, a bus, an EventLog on PgEvents) on one fresh database."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from agentd.bus import Bus, Subscription
from agentd.config import EventsConfig, StoreConfig
from agentd.eventlog import EventLog
from agentd.events import Event
from agentd.postgres.events import PgEvents
from agentd.store.postgres import PgStore
from pg import fresh_database

WAIT = 20.0


@dataclass
class Node:
    store: PgStore
    bus: Bus
    log: EventLog
    listener: asyncio.Task[None]

    @property
    def streams(self) -> Bus:
        return self.log.streams


@contextlib.asynccontextmanager
async def nodes(count: int, config: EventsConfig | None = None) -> AsyncIterator[list[Node]]:
    url = await fresh_database()
    made: list[Node] = []
    try:
        for _ in range(count):
            store = PgStore(StoreConfig(url=url, pool_size=4))
            await store.open()
            listener = asyncio.get_running_loop().create_task(store.run_listener())
            await asyncio.wait_for(store.listening.wait(), WAIT)
            bus = Bus()
            log = EventLog(PgEvents(store), bus, config or EventsConfig())
            await log.start()
            made.append(Node(store, bus, log, listener))
        yield made
    finally:
        for node in made:
            await node.log.stop()
            node.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await node.listener
            await node.store.close()


async def take(sub: Subscription, count: int, keep: Callable[[Event], bool] = lambda e: True,
               ) -> list[Event]:
    got: list[Event] = []
    async with asyncio.timeout(WAIT):
        while len(got) < count:
            event = await sub.get()
            if keep(event):
                got.append(event)
    return got


async def test_an_event_published_on_one_daemon_reaches_the_streams_of_every_daemon() -> None:
    async with nodes(2) as (a, b):
        on_a = a.streams.subscribe("user.**", maxsize=100)
        on_b = b.streams.subscribe("user.**", maxsize=100)
        a.bus.publish("user.clicked", {"n": 1})
        b.bus.publish("user.clicked", {"n": 2})
        seen_a, seen_b = await take(on_a, 2), await take(on_b, 2)
        # One order, one set of ids, on every daemon: the log's.
        assert [e.id for e in seen_a] == [e.id for e in seen_b]
        assert sorted(e.data["n"] for e in seen_a) == [1, 2]
        stored = await a.log.replay(0, lambda e: e.topic == "user.clicked")
        assert [e.id for e in stored] == [e.id for e in seen_a]


async def test_tokens_reach_other_daemons_through_notify_and_are_never_stored() -> None:
    async with nodes(2) as (a, b):
        on_a = a.streams.subscribe("**", maxsize=100)
        on_b = b.streams.subscribe("**", maxsize=100)
        a.bus.publish("user.before", {})
        before = (await take(on_b, 1))[0]
        big = "x" * 20_000  # over PostgreSQL's 8,000-byte payload: sent in parts
        for text in ("Hel", "lo", big):
            a.bus.publish("llm.token", {"task_id": 1, "text": text})
        tokens = await take(on_b, 3)
        assert [e.data["text"] for e in tokens] == ["Hel", "lo", big]
        # Each bears the id of the stored event before it: a resume point that misses nothing.
        assert {e.id for e in tokens} == {before.id}
        assert [e.data["text"] for e in await take(on_a, 4) if e.topic == "llm.token"] == ["Hel", "lo", big]
        assert a.store.closed is False and (await a.log.storage.counts())[0] == 1
        # A's own notifications come back to A: not delivered twice.
        a.bus.publish("user.after", {})
        assert (await take(on_a, 1))[0].topic == "user.after"
        assert (await take(on_b, 1))[0].topic == "user.after"


async def test_remote_events_reach_no_subscriber_of_the_daemons_own_bus() -> None:
    async with nodes(2) as (a, b):
        handled: list[Event] = []
        b.bus.subscribe("**", handled.append, name="handler")
        on_b = b.streams.subscribe("**", maxsize=100)
        a.bus.publish("user.clicked", {})
        a.bus.publish("llm.token", {"text": "t"})
        await take(on_b, 2)
        assert handled == []


async def test_a_reader_resuming_on_another_daemon_gets_every_missed_event_once() -> None:
    async with nodes(2) as (a, b):
        on_a = a.streams.subscribe("user.**", maxsize=100)
        for n in range(5):
            a.bus.publish("user.n", {"n": n})
        seen = await take(on_a, 2)
        on_a.unsubscribe()
        for n in range(5, 10):
            b.bus.publish("user.n", {"n": n})
        await a.log.flush()
        await b.log.flush()
        resumed = await b.log.replay(seen[-1].id, lambda e: e.topic == "user.n")
        assert [e.data["n"] for e in seen + resumed] == list(range(10))


async def test_concurrent_publishers_on_every_daemon_no_reader_skips_or_repeats() -> None:
    """Publishers on three daemons, many small transactions each; readers following the
    stream bus on every daemon, and one following the log by polling it. Each sees ids
    only rising, and in the end every stored event: none skipped, none twice."""
    per_node = 300
    async with nodes(3) as cluster:
        readers = [node.streams.subscribe("load.**", maxsize=10 * per_node) for node in cluster]
        polled: list[int] = []
        done = asyncio.Event()

        async def poll(node: Node) -> None:
            cursor = 0
            while True:
                finished = done.is_set()
                for event in await node.log.replay(cursor, lambda e: e.topic.startswith("load.")):
                    polled.append(event.id)
                    cursor = event.id
                if finished:
                    return

        async def publish(node: Node, index: int) -> None:
            rng = random.Random(index)
            for n in range(per_node):
                node.bus.publish(f"load.{index}", {"n": n})
                if rng.random() < 0.5:
                    await node.log.flush()  # a transaction of a few events
                else:
                    await asyncio.sleep(0)

        poller = asyncio.get_running_loop().create_task(poll(cluster[0]))
        await asyncio.gather(*(publish(node, i) for i, node in enumerate(cluster)))
        for node in cluster:
            await node.log.flush()
        total = 3 * per_node
        stored = [e.id for e in await cluster[0].log.replay(0, lambda e: True)]
        assert len(stored) == total
        done.set()
        await asyncio.wait_for(poller, WAIT)
        assert polled == stored
        for reader in readers:
            assert [e.id for e in await take(reader, total)] == stored
