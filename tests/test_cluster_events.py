"""One event log and one stream bus across daemons on one PostgreSQL database.

The first tests drive the event log itself: each "node" is what a daemon builds of it (a
PgStore with its listener, a bus, an EventLog on PgEvents) on one fresh database. The
others run real daemons on one database, with real SSE and WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from agentd.bus import Bus, Subscription
from agentd.config import EventsConfig, StoreConfig
from agentd.eventlog import EventLog
from agentd.events import Event
from agentd.postgres import events as events_module
from agentd.postgres.events import PgEvents
from agentd.store.postgres import PgStore
from agentd.testing import daemon_url
from pg import fresh_database
from sse_client import Sse
from test_cluster_scheduler import until
from test_events_api import SECRET, signed
from test_ws import Ws

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
            log = EventLog(PgEvents(store, lambda: True), bus, config or EventsConfig())
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
                    await asyncio.sleep(0)  # noqa: sleep -- a yield, so the publishers interleave

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


async def test_every_daemons_streams_see_a_daemons_events_in_the_order_it_published_them() -> None:
    """A token published after a stored event waits for it: the stored one reaches the
    stream bus only once committed, the token would otherwise overtake it."""
    async with nodes(2) as (a, b):
        on_a = a.streams.subscribe("**", maxsize=100)
        on_b = b.streams.subscribe("**", maxsize=100)
        for n in range(3):
            a.bus.publish("user.said", {"n": n})
            a.bus.publish("llm.token", {"text": str(n)})
        expected = ["user.said", "llm.token"] * 3
        assert [e.topic for e in await take(on_a, 6)] == expected
        assert [e.topic for e in await take(on_b, 6)] == expected



async def test_after_its_listener_reconnects_a_daemon_catches_up_from_the_log() -> None:
    """Notifications sent while a daemon's listening connection is away are lost: the
    stored events committed meanwhile reach its streams from the table once it is back
    (the ephemeral ones are lost, as for a client that was disconnected). Here the row is
    written with no notification at all: only the catch-up can bring it."""
    async with nodes(1) as (b,):
        on_b = b.streams.subscribe("user.**", maxsize=100)
        reconnected = asyncio.Event()
        b.store.on_reconnect(reconnected.set)
        conn = await asyncpg.connect(b.store.config.url)
        try:
            async with conn.transaction():
                await conn.fetchval(events_module._INSERT, 1, ["user.unannounced"], [0.0], ["{}"],
                                    [None], [None], [0], "elsewhere", [1])
            listener = b.store._listener
            assert listener is not None
            await conn.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
        finally:
            await conn.close()
        await asyncio.wait_for(reconnected.wait(), WAIT)
        assert [e.topic for e in await take(on_b, 1)] == ["user.unannounced"]


async def test_digest_cursors_on_postgresql_are_shared_by_every_daemon() -> None:
    """`PgDigests`: one cursor per digest for all daemons; a daemon starting later keeps it."""
    from agentd.postgres.digests import PgDigests

    async with nodes(2) as (a, b):
        on_a, on_b = PgDigests(a.store), PgDigests(b.store)
        await on_a.start(["daily"], 10, 1.0)
        assert await on_b.cursor("daily") == (10, None)
        await on_b.mark_pending("daily", 25)
        assert await on_a.cursor("daily") == (10, 25)
        await on_a.start(["daily", "hourly"], 99, 2.0)  # a later start moves no cursor
        await on_a.mark_sent("daily", 25, 3.0)
        assert await on_b.cursor("daily") == (25, None)
        assert await on_b.cursor("hourly") == (99, None)
        assert await on_b.cursor("none") == (0, None)


# --------------------------------------------------------------------------- real daemons

PLUGIN = '''
from agentd import Plugin

plugin = Plugin("cl")
SEEN = []


@plugin.on("x.*")
async def seen(ctx, event):
    SEEN.append(event.topic)


@plugin.on("hook.*", durable=True)
async def hooked(ctx, event):
    pass


@plugin.task()
async def noop(ctx):
    return None
'''


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`a, b, c = await daemons(3)`: real daemons on one fresh PostgreSQL database; `plugins`
    names those (by index) that load the test plugin `cl`; `overrides`, configuration
    tables every one of them gets."""
    from agentd.app import Daemon
    from agentd.testing import make_config

    url = await fresh_database()
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "cl.py").write_text(PLUGIN)
    started = 0  # daemons of this test: each call's take the next directories
    async with contextlib.AsyncExitStack() as stack:

        async def start(count: int, plugins: tuple[int, ...] = (),
                        overrides: dict[str, Any] | None = None) -> list[Daemon]:
            nonlocal started
            made = []
            for n in range(count):
                config = make_config(tmp_path / f"d{started + n}", [plugin_dir] if n in plugins else [],
                                     {**(overrides or {}), "store": {"url": url}})
                made.append(await stack.enter_async_context(Daemon(config)))
            started += count
            return made

        yield start


class PatientSse(Sse):
    """Waits longer for a frame: the other daemon's events come through PostgreSQL, on 2
    busy cores."""

    async def frame(self, timeout: float = WAIT) -> Any:
        return await super().frame(max(timeout, WAIT))


class PatientWs(Ws):
    async def receive(self, timeout: float = WAIT) -> dict[str, Any]:
        return await super().receive(max(timeout, WAIT))


@contextlib.asynccontextmanager
async def sse(daemon: Any, last_event_id: int | None = None) -> AsyncIterator[Sse]:
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    async with aiohttp.ClientSession(daemon_url(daemon), timeout=aiohttp.ClientTimeout(total=60)) as http, \
            http.get("/v1/stream", params={"topics": "x.**,load.**,llm.**"}, headers=headers) as response:
        assert response.status == 200
        stream = PatientSse(response)
        await stream.opened()
        yield stream


@contextlib.asynccontextmanager
async def ws(daemon: Any) -> AsyncIterator[Ws]:
    async with aiohttp.ClientSession(daemon_url(daemon)) as http:
        socket = PatientWs(await http.ws_connect("/v1/ws"))
        assert (await socket.request(type="subscribe", patterns=["x.**", "load.**", "llm.**"]))["ok"]
        yield socket
        await socket.ws.close()


async def post(daemon: Any, topic: str, data: dict[str, Any]) -> int:
    async with aiohttp.ClientSession(daemon_url(daemon)) as http, \
            http.post("/v1/events", json={"topic": topic, "data": data}) as response:
        assert response.status == 202
        return int((await response.json())["id"])


async def test_an_event_posted_on_one_daemon_reaches_sse_and_websocket_clients_of_another(
    daemons: Any,
) -> None:
    a, b = await daemons(2)
    async with sse(b) as stream, ws(b) as socket:
        posted = await post(a, "x.posted", {"n": 1})
        frame = await stream.next_event()
        assert (frame.id, frame.event, frame.data["data"]) == (posted, "x.posted", {"n": 1})
        message = await socket.event()
        assert message["event"]["id"] == posted and message["event"]["topic"] == "x.posted"
        # Tokens are ephemeral: through NOTIFY, never stored, with the id of the last stored
        # event before them (a resume point that misses nothing).
        a.bus.publish("llm.token", {"task_id": 1, "text": "Hel"})
        a.bus.publish("llm.token", {"task_id": 1, "text": "lo"})
        frames = [await stream.next_event(), await stream.next_event()]
        assert [(f.event, f.data["data"]["text"]) for f in frames] == [
            ("llm.token", "Hel"), ("llm.token", "lo")]
        # Each bears the id of the newest stored event B's streams carried before it (of
        # any topic: the daemons' own events too), a resume point that misses nothing.
        assert frames[0].id is not None and frames[1].id is not None
        assert posted <= frames[0].id <= frames[1].id
        tokens = [await socket.event(), await socket.event()]
        assert [m["event"]["data"]["text"] for m in tokens] == ["Hel", "lo"]
    rows = await b.store.read("SELECT topic FROM events WHERE topic LIKE 'llm.%'")
    assert rows == []


async def test_a_client_resumes_on_another_daemon_and_gets_every_missed_event_once_in_order(
    daemons: Any,
) -> None:
    a, b = await daemons(2)
    async with sse(a) as stream:
        for n in range(3):
            await post(a, "x.n", {"n": n})
        seen = await stream.events(3)
    last = seen[-1].id
    assert last is not None
    # Missed while away: events published on both daemons, some still being written.
    for n in range(3, 9):
        await post(b if n % 2 else a, "x.n", {"n": n})
    a.bus.publish("x.n", {"n": 9})
    b.bus.publish("x.n", {"n": 10})
    async with sse(b, last_event_id=last) as resumed:
        frames = await resumed.events(8)
        assert [f.data["data"]["n"] for f in seen + frames] == [*range(9), *[9, 10]] or \
            [f.data["data"]["n"] for f in seen + frames] == [*range(9), *[10, 9]]
        ids = [f.id for f in seen + frames]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        await post(a, "x.after", {})
        after = await resumed.next_event()
        assert after.event == "x.after" and after.id is not None and after.id > ids[-1]


async def test_concurrent_publishers_on_three_daemons_no_stream_skips_or_repeats_an_event(
    daemons: Any,
) -> None:
    """Many small transactions on every daemon (each POST commits its own; in-process
    publishes are grouped), read by an SSE and a WebSocket client on every daemon: each
    sees the ids only rising, and in the end every stored event, none twice."""
    cluster = await daemons(3)
    per_daemon = 60
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(sse(d)) for d in cluster]
        sockets = [await stack.enter_async_context(ws(d)) for d in cluster]

        async def publish(index: int) -> None:
            daemon = cluster[index]
            for n in range(per_daemon):
                if n % 3:
                    await post(daemon, f"load.{index}", {"n": n})
                else:
                    daemon.bus.publish(f"load.{index}", {"n": n})

        await asyncio.gather(*(publish(i) for i in range(3)))
        total = 3 * per_daemon
        for daemon in cluster:
            await daemon.eventlog.flush()
        rows = await cluster[0].store.read("SELECT id FROM events WHERE topic LIKE 'load.%' ORDER BY id")
        stored = [row["id"] for row in rows]
        assert len(stored) == total
        for stream in streams:
            assert [f.id for f in await stream.events(total)] == stored
        for socket in sockets:
            assert [(await socket.event())["event"]["id"] for _ in range(total)] == stored


async def test_a_plugin_handler_runs_only_for_events_published_on_its_own_daemon(
    daemons: Any,
) -> None:
    """Remote events reach streams, never handlers: a webhook handler on every daemon
    would otherwise be sent once per daemon."""
    a, b = await daemons(2, plugins=(1,))
    seen = sys.modules["agentd_plugins.cl"].SEEN
    async with sse(b) as stream:
        a.bus.publish("x.remote", {})
        assert (await stream.next_event()).event == "x.remote"  # it did reach daemon B
        b.bus.publish("x.local", {})
        assert (await stream.next_event()).event == "x.local"
        await b.spawner.drain(WAIT)  # the handlers spawned so far have run
    assert seen == ["x.local"]


async def test_a_daemon_alone_sends_its_tokens_to_no_one_until_another_daemon_starts(
    daemons: Any,
) -> None:
    """Ephemeral events go to the other daemons through NOTIFY: a daemon with none beside it
    sends none (nobody would hear them: their JSON and the server's work for nothing), and
    one that starts later gets them from then on."""
    (a,) = await daemons(1)
    feed: PgEvents = a.storage.events
    # Alone, once it knows: its listening connection may open after the start's read of
    # the nodes, and then it reads them again.
    await until(lambda: a.store.listening.is_set() and not a.storage.tasks.peers_alive())
    heard = a.eventlog.streams.subscribe("llm.**", lambda event: None, name="test")
    a.bus.publish("llm.token", {"task_id": 1, "text": "alone"})
    await a.store.finish()  # whatever that publish would send is sent by now
    assert feed.sent_parts == 0
    heard.unsubscribe()
    # Asked while alone and unheard: no. The answer is remembered, until the peers change.
    assert not a.bus.has_subscribers("llm.token")

    (b,) = await daemons(1)
    async with sse(b) as stream:
        await until(a.storage.tasks.peers_alive)
        assert a.bus.has_subscribers("llm.token")
        a.bus.publish("llm.token", {"task_id": 1, "text": "Hel"})
        frame = await stream.next_event()
        assert (frame.event, frame.data["data"]["text"]) == ("llm.token", "Hel")
    assert feed.sent_parts >= 1
    await b.stop()
    await until(lambda: not a.storage.tasks.peers_alive())


async def test_a_daemon_alone_builds_no_ephemeral_event_until_a_stream_may_hear_it(
    daemons: Any,
) -> None:
    """Alone on the database, a daemon's ephemeral events (`task.started`, tokens) are heard
    only by its own streams: with none, the event feed takes none, so publishers do not
    build them at all, as on SQLite (each no-op task built, held and released a
    `task.started` for nobody). A stream client coming, and going, changes that at once."""
    (a,) = await daemons(1, plugins=(0,))
    await until(lambda: a.store.listening.is_set() and not a.storage.tasks.peers_alive())
    assert not a.bus.has_subscribers("task.started") and not a.bus.has_subscribers("llm.token")
    assert a.bus.has_subscribers("task.succeeded")  # stored: the log takes it
    async with aiohttp.ClientSession(daemon_url(a), timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.get("/v1/stream", params={"topics": "task.**"}) as response:
            assert response.status == 200
            stream = PatientSse(response)
            await stream.opened()
            assert a.bus.has_subscribers("task.started")
            assert not a.bus.has_subscribers("llm.token")  # not what this client asked for
            task = await a.queue.enqueue("cl.noop")
            frames = await stream.events(3)
            assert [(f.event, f.data["data"]["task_id"]) for f in frames] == [
                ("task.queued", task.id), ("task.started", task.id), ("task.succeeded", task.id)]
        await until(lambda: not a.bus.has_subscribers("task.started"))


async def test_a_daemon_whose_listener_reconnects_reads_its_peers_again_at_once(
    daemons: Any,
) -> None:
    """News of daemons coming and going is lost while the listening connection is away, so
    they are unknown (taken as alive) after it re-opens: read again then, not a heartbeat
    (lease / 3 s) later."""
    (a,) = await daemons(1, overrides={"tasks": {"lease": 600}})
    await until(lambda: a.store.listening.is_set() and not a.storage.tasks.peers_alive())
    listener = a.store._listener
    assert listener is not None
    conn = await asyncpg.connect(a.config.store.url)
    try:
        await conn.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
    finally:
        await conn.close()
    await until(lambda: a.store._listener not in (None, listener))
    await until(lambda: not a.storage.tasks.peers_alive(), timeout=5.0)


@pytest.mark.parametrize("handled", [False, True], ids=["event", "event and trigger"])
async def test_one_delivery_sent_to_two_daemons_at_once_is_taken_once(
    daemons: Any, handled: bool,
) -> None:
    """The same signed webhook delivery POSTed to two daemons at the same instant: one takes
    it, the other refuses it as a replay, and one event is stored (and one task of a durable
    handler of it). Each daemon refused the ids recorded before its read, and those its own
    process held: both took it. The table of delivery ids is locked until both requests
    wait on it: both have read it by then."""
    a, b = await daemons(2, plugins=(0, 1) if handled else (),
                         overrides={"hooks": {"gh": {"secret": SECRET}}})
    body = b'{"n": 1}'
    headers = signed(body, webhook_id="msg_twice")

    async def deliver(daemon: Any) -> int:
        async with aiohttp.ClientSession(daemon_url(daemon)) as http, \
                http.post("/hooks/gh", data=body, headers=headers) as response:
            return response.status

    locker = await asyncpg.connect(a.config.store.url)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE hook_deliveries IN EXCLUSIVE MODE")  # reads pass
            answers = asyncio.gather(deliver(a), deliver(b))

            async def waiting() -> int:
                return int(await locker.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = "
                    "'hook_deliveries'::regclass AND database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())"))

            async def both_waiting() -> None:
                while await waiting() < 2:  # noqa: ASYNC110 - a lock wait signals nothing
                    await asyncio.sleep(0.01)  # noqa: sleep - polling pg_locks

            await asyncio.wait_for(both_waiting(), WAIT)
        statuses = await asyncio.wait_for(answers, WAIT)
        assert sorted(statuses) == [202, 409]
        stored = await locker.fetchval("SELECT count(*) FROM events WHERE topic = 'hook.gh'")
        assert stored == 1
        triggered = await locker.fetchval("SELECT count(*) FROM tasks WHERE name = 'cl.hooked'")
        assert triggered == (1 if handled else 0)
    finally:
        await locker.close()
