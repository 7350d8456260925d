"""Live streams against the real daemon: the event log (persistence classes, sweeping, ids
across restarts) and SSE (`/v1/stream`, `/v1/tasks/{id}/stream`): framing, filtering,
keepalives, resume without gap or duplicate, gaps past the horizon, slow clients."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import pytest
from structlog.testing import capture_logs

from agentd.errors import ConfigError
from agentd.testing import make_config
from agentd.web.server import STREAMS
from sse_client import FRAME_TIMEOUT, Frame, Sse, logged, logged_ids, sql

pytestmark = pytest.mark.both_stores

# --------------------------------------------------------------------------- helpers




async def stored_events(daemon: Any) -> dict[int, tuple[str, int]]:
    """id → (topic, durable) of every row of the events table, after a flush."""
    await daemon.eventlog.flush()
    rows = await daemon.store.read("SELECT id, topic, durable FROM events ORDER BY id")
    return {row["id"]: (row["topic"], row["durable"]) for row in rows}


def stream_subscriptions(daemon: Any) -> list[Any]:
    """The bus subscriptions of the open SSE/WebSocket streams (the app's STREAMS set)."""
    assert daemon.server is not None
    return list(daemon.server._runner.app[STREAMS])


def assert_error(body: Any, code: str) -> str:
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return str(body["error"]["message"])


# --------------------------------------------------------------------------- the event log


async def test_default_rules_keep_tokens_out_and_task_events_durable(start_daemon: Any) -> None:
    daemon, _ = await start_daemon()
    bus = daemon.bus
    live = bus.subscribe("task.**", name="test.live")
    # A task's queued and started events reach live subscribers but are not stored: its row
    # holds the same facts. Its end is stored.
    record = await daemon.queue.enqueue("agentd.purge_tasks")
    final = await daemon.queue.wait(record.id, timeout=10)
    assert final.status == "succeeded"
    seen = [(await live.get()).topic for _ in range(3)]
    assert seen == ["task.queued", "task.started", "task.succeeded"]
    await daemon.eventlog.flush()
    kept = await daemon.store.read(
        sql(daemon, "SELECT topic FROM events WHERE correlation_id = ? ORDER BY id"), (str(record.id),))
    assert [row["topic"] for row in kept] == ["task.succeeded"]
    token = bus.publish("x.token", {"task_id": 1, "text": "a"})
    llm_token = bus.publish("llm.token", {"task_id": 1, "text": "b"})
    progress = bus.publish("task.progress", {"task_id": 1})
    finished = bus.publish("task.succeeded", {"task_id": 1})
    nested = bus.publish("task.child.queued", {"task_id": 2})
    other = bus.publish("news.new", {"title": "t"})
    progress, finished, nested, other = await logged(daemon, [progress, finished, nested, other])
    stored = await stored_events(daemon)
    assert token.id not in stored
    assert llm_token.id not in stored
    assert stored[progress.id] == ("task.progress", 0)
    assert stored[finished.id] == ("task.succeeded", 1)
    assert stored[nested.id] == ("task.child.queued", 1)
    assert stored[other.id] == ("news.new", 0)
    assert [daemon.eventlog.persistence(t) for t in (
        "a.token", "task.queued", "task.started", "task.progress", "task.x", "zzz")] == [
        "ephemeral", "ephemeral", "ephemeral", "ring", "durable", "ring"]
    row = await daemon.store.read_one(sql(daemon, "SELECT * FROM events WHERE id = ?"), (finished.id,))
    assert row is not None
    assert json.loads(row["data"]) == {"task_id": 1}
    assert row["time"] == finished.time


async def test_a_task_claimed_before_its_enqueue_returns_is_still_queued_before_started(
        start_daemon: Any) -> None:
    """A task's row is claimable once it commits, before the enqueue that committed it
    resumes to publish `task.queued`. Here every enqueue is held after its commit until a
    worker has claimed its task: the worker must still publish `task.started` second."""
    daemon, _ = await start_daemon()
    live = daemon.bus.subscribe("task.**", name="test.live")
    tasks = daemon.queue.tasks
    insert_one = tasks.insert_one

    async def insert_then_wait_for_the_claim(values: tuple[Any, ...]) -> int:
        task_id = await insert_one(values)
        for queue in daemon.config.tasks.queues:
            daemon.workers.wake(queue)
        deadline = time.monotonic() + FRAME_TIMEOUT
        while (await daemon.queue.get(task_id)).status == "queued":
            assert time.monotonic() < deadline, "no worker claimed the task"
            await asyncio.sleep(0.005)  # noqa: sleep - polls the row, bounded by the deadline
        return task_id

    tasks.insert_one = insert_then_wait_for_the_claim
    record = await daemon.queue.enqueue("agentd.purge_tasks")
    final = await daemon.queue.wait(record.id, timeout=10)
    assert final.status == "succeeded"
    seen = [(await live.get()).topic for _ in range(3)]
    assert seen == ["task.queued", "task.started", "task.succeeded"]


async def test_custom_persistence_rules_replace_the_defaults(start_daemon: Any) -> None:
    daemon, _ = await start_daemon(overrides={"events": {"persistence": [
        "audit.**=durable", "noise.*=ephemeral", "**=ring"]}})
    bus = daemon.bus
    audit = bus.publish("audit.login.ok", {"user": "ann"})
    noise = bus.publish("noise.tick")
    task_event = bus.publish("task.succeeded", {"task_id": 1})
    token = bus.publish("llm.token", {"text": "x"})
    audit, task_event, token = await logged(daemon, [audit, task_event, token])
    stored = await stored_events(daemon)
    assert stored[audit.id] == ("audit.login.ok", 1)
    assert noise.id not in stored
    assert stored[task_event.id] == ("task.succeeded", 0)  # no task.** rule any more: ring
    assert stored[token.id] == ("llm.token", 0)  # nor *.token: kept as ring


@pytest.mark.parametrize(("rules", "says"), [
    (["task.*"], "pattern=class"), (["task.*=forever"], "pattern=class"), (["task..x=ring"], "segment ''"),
    (["=ring"], "non-empty"), (["news.*=ring retention=5"], "ring_size=N, ring_seconds=N"),
    (["news.*=durable ring_size=5"], "retention=N"), (["x=ephemeral ring_size=3"], "none"),
    (["x=ring ring_size=0"], "positive"), (["x=ring ring_size=2.5"], "whole number"),
    (["x=durable retention=inf"], "finite"), (["x=ring ring_size"], "ring_size=N"),
    (["x=ring ring_size=2 ring_size=3"], "twice"),
])
def test_a_bad_persistence_rule_is_a_config_error(tmp_path: Path, rules: list[str], says: str) -> None:
    with pytest.raises(ConfigError, match=r"\[events\] persistence") as caught:
        make_config(tmp_path, overrides={"events": {"persistence": rules}})
    assert repr(rules[0]) in str(caught.value)
    assert says in str(caught.value)


async def test_a_rule_with_its_own_ring_size_is_not_pushed_out_by_busier_topics(
        start_daemon: Any) -> None:
    """A daily digest's news must outlive a burst of progress events: a rule with limits of
    its own keeps its events counted apart from the default ring, both ways."""
    daemon, _ = await start_daemon(overrides={"events": {
        "persistence": ["news.new=ring ring_size=2", "task.**=durable", "**=ring"], "ring_size": 3}})
    news = [daemon.bus.publish("news.new", {"n": n}) for n in range(3)]
    busy = [daemon.bus.publish("task.progress.x", {"n": n}) for n in range(3)]
    busy += [daemon.bus.publish("demo.ring", {"n": n}) for n in range(5)]
    news, busy = await logged(daemon, news), await logged(daemon, busy)
    await daemon.eventlog.sweep()
    stored = await stored_events(daemon)
    assert [i for i, (topic, _) in stored.items() if topic == "news.new"] == [e.id for e in news[1:]]
    ring = sorted(i for i, (topic, kind) in stored.items() if kind == 0)
    assert ring == [e.id for e in busy[-3:]]
    assert daemon.eventlog.horizon == max(busy[-4].id, news[0].id)
    stats = await daemon.eventlog.stats()
    assert (stats["ring"], stats["durable"]) == (5, len(stored) - 5)  # own ring buckets count as ring


async def test_a_rule_with_its_own_retention_outlives_the_default(start_daemon: Any) -> None:
    daemon, _ = await start_daemon(overrides={"events": {
        "persistence": ["audit.**=durable retention=86400", "**=durable"], "retention": 0}})
    audit = daemon.bus.publish("audit.login", {"user": "ann"})
    other = daemon.bus.publish("task.demo", {})
    (audit,), (other,) = await logged(daemon, [audit]), await logged(daemon, [other])
    await daemon.eventlog.sweep()
    stored = await stored_events(daemon)
    assert audit.id in stored and other.id not in stored
    assert stored[audit.id][1] % 2 == 1  # a durable bucket of its own
    assert (await daemon.eventlog.stats())["durable"] == len(stored)


async def test_events_of_a_rule_that_is_gone_follow_their_class_limits(start_daemon: Any) -> None:
    daemon, _ = await start_daemon(overrides={"events": {
        "persistence": ["news.new=ring ring_size=100 ring_seconds=86400", "**=ring"]}})
    (news,) = await logged(daemon, [daemon.bus.publish("news.new", {})])
    assert (await stored_events(daemon))[news.id][1] >= 2
    await daemon.stop()
    # The rule is gone: its events are aged by the [events] ring limits, here at once.
    daemon, _ = await start_daemon(overrides={"events": {"persistence": ["**=ring"], "ring_seconds": 0}})
    await daemon.eventlog.sweep()
    assert news.id not in await stored_events(daemon)


async def test_sweep_keeps_the_newest_ring_size_ring_events_and_raises_the_horizon(
    start_daemon: Any,
) -> None:
    daemon, _ = await start_daemon(overrides={"events": {"ring_size": 3}})
    before = await stored_events(daemon)
    assert before  # daemon.started at least
    ring = [daemon.bus.publish("demo.ring", {"n": n}) for n in range(6)]
    durable = [daemon.bus.publish("task.demo", {"n": n}) for n in range(2)]
    assert daemon.eventlog.horizon == 0
    ring, durable = await logged(daemon, ring), await logged(daemon, durable)

    deleted = await daemon.eventlog.sweep()

    stored = await stored_events(daemon)
    assert sorted(i for i, (_, kind) in stored.items() if kind == 0) == [e.id for e in ring[3:]]
    assert sorted(i for i, (_, kind) in stored.items() if kind == 1) == [e.id for e in durable]
    assert deleted == len(before) + 3
    assert daemon.eventlog.horizon == ring[2].id
    meta = await daemon.store.read_one("SELECT value FROM meta WHERE key = 'events_horizon'")
    assert meta is not None and int(meta["value"]) == ring[2].id
    stats = await daemon.eventlog.stats()
    assert (stats["ring"], stats["durable"], stats["horizon"]) == (3, 2, ring[2].id)
    # A second sweep has nothing to do and never lowers the horizon.
    assert await daemon.eventlog.sweep() == 0
    assert daemon.eventlog.horizon == ring[2].id


async def test_sweep_drops_ring_events_older_than_ring_seconds(start_daemon: Any) -> None:
    daemon, _ = await start_daemon(overrides={"events": {"ring_seconds": 0}})
    ring = [daemon.bus.publish("demo.ring", {"n": n}) for n in range(3)]
    durable = daemon.bus.publish("task.demo", {})
    ring, (durable,) = await logged(daemon, ring), await logged(daemon, [durable])
    assert await daemon.eventlog.sweep() >= 3
    stored = await stored_events(daemon)
    assert list(stored) == [durable.id]
    assert daemon.eventlog.horizon == ring[-1].id


async def test_sweep_drops_durable_events_past_retention(start_daemon: Any) -> None:
    daemon, _ = await start_daemon(overrides={"events": {"retention": 0}})
    durable = [daemon.bus.publish("task.demo", {"n": n}) for n in range(2)]
    ring = daemon.bus.publish("demo.ring", {})
    durable, (ring,) = await logged(daemon, durable), await logged(daemon, [ring])
    assert await daemon.eventlog.sweep() == 2
    stored = await stored_events(daemon)
    assert ring.id in stored
    assert not {e.id for e in durable} & set(stored)
    assert daemon.eventlog.horizon == durable[-1].id


async def test_ids_and_the_horizon_continue_after_a_restart(start_daemon: Any) -> None:
    daemon, _ = await start_daemon(overrides={"events": {"ring_size": 1}})
    # Move the id sequence far past the wall clock: only the stored ids can carry it on.
    daemon.bus.advance_to((time.time_ns() // 1000) + 10**10)
    first = daemon.bus.publish("demo.before", {})
    last = daemon.bus.publish("demo.before", {})
    first, last = await logged(daemon, [first, last])
    await daemon.eventlog.sweep()
    assert daemon.eventlog.horizon == first.id
    await daemon.stop()

    daemon, events = await start_daemon(overrides={"events": {"ring_size": 1}})
    assert daemon.eventlog.horizon == first.id
    assert events.events, "the restarted daemon published nothing"
    assert (await logged(daemon, events.events[:1]))[0].id > last.id
    after = daemon.bus.publish("demo.after", {})
    (after,) = await logged(daemon, [after])
    assert after.id > last.id
    stored = await stored_events(daemon)
    assert last.id in stored and after.id in stored


# --------------------------------------------------------------------------- /v1/stream


async def test_sse_headers_and_the_first_bytes_come_at_once(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"streams": {"retry_ms": 1234}})
    published_before = daemon.bus.published
    async with http(daemon).get("/v1/stream", headers={"Accept-Encoding": "gzip"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache, no-transform"
        assert response.headers["X-Accel-Buffering"] == "no"
        assert "Content-Encoding" not in response.headers
        first = await Sse(response).opened()
        assert daemon.bus.published == published_before  # nothing was published to prompt it
    assert first.retry == 1234
    assert first.comments == ["connected"]


async def test_events_carry_id_topic_and_json_data_filtered_by_topics(
    start_daemon: Any, http: Any,
) -> None:
    daemon, _ = await start_daemon()
    client = http(daemon)
    async with client.get("/v1/stream", params={"topics": "demo.a, other.*"}) as response:
        sse = Sse(response)
        await sse.opened()
        bus = daemon.bus
        wanted = [bus.publish("demo.a", {"n": 1})]
        bus.publish("demo.b", {"n": 2})
        bus.publish("other.x.y", {"n": 3})
        async with client.post("/v1/events", json={"topic": "other.x", "data": {"n": 4}}) as posted:
            assert posted.status == 202
            via_http = (await posted.json())["id"]
        bus.publish("demo", {"n": 5})
        wanted.append(bus.publish("demo.a", {"n": 6}, correlation_id="c1", causation_id="7"))
        frames = await sse.events(3)
    wanted = await logged(daemon, wanted)
    assert [f.event for f in frames] == ["demo.a", "other.x", "demo.a"]
    assert [f.id for f in frames] == [wanted[0].id, via_http, wanted[1].id]
    for frame in frames:
        assert frame.data["id"] == frame.id
        assert frame.data["topic"] == frame.event
    assert [f.data["data"]["n"] for f in frames] == [1, 4, 6]
    assert frames[2].data == wanted[1].to_dict()
    assert (frames[2].data["correlation_id"], frames[2].data["causation_id"]) == ("c1", "7")


@pytest.mark.parametrize("topics", ["demo..a", "demo.a*", "demo,", "demo.a/b"])
async def test_a_bad_topic_pattern_is_a_400_before_streaming(
    start_daemon: Any, http: Any, topics: str,
) -> None:
    daemon, _ = await start_daemon()
    async with http(daemon).get("/v1/stream", params={"topics": topics}) as response:
        assert response.status == 400
        assert response.content_type == "application/json"
        assert_error(await response.json(), "bad_pattern")
    assert not stream_subscriptions(daemon)


async def test_an_idle_stream_gets_keepalive_comments(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"streams": {"keepalive": 0.2}})
    async with http(daemon).get("/v1/stream", params={"topics": "nothing.here"}) as response:
        sse = Sse(response)
        await sse.opened()
        for _ in range(2):
            frame = await sse.frame(timeout=1.0)
            assert frame == Frame(comments=["keepalive"])
        daemon.bus.publish("nothing.here", {"still": "live"})
        assert (await sse.next_event()).data["data"] == {"still": "live"}


class _Tap(httpx.AsyncBaseTransport):
    """An httpx transport that keeps a copy of the response bytes its client has read."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen = bytearray()
        self.changed = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        inner, tap = response.stream, self
        assert isinstance(inner, httpx.AsyncByteStream)

        class Copied(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in inner:
                    tap.seen += chunk
                    tap.changed.set()
                    yield chunk

            async def aclose(self) -> None:
                await inner.aclose()

        return httpx.Response(response.status_code, headers=response.headers, stream=Copied(),
                              extensions=response.extensions)

    async def until(self, wanted: bytes, after: int = 0) -> int:
        """Wait until the client read `wanted` past offset `after`; return where it ends."""
        async with asyncio.timeout(FRAME_TIMEOUT):
            while (at := self.seen.find(wanted, after)) < 0:
                self.changed.clear()
                await self.changed.wait()
        return at + len(wanted)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_httpx_sse_sees_no_event_for_the_opening_or_keepalives(start_daemon: Any) -> None:
    """httpx-sse reports a blank line after lines without `data` as an empty `message` event
    (after an `id`, even a lone comment): the stream's opening and keepalives must be none."""
    daemon, _ = await start_daemon(overrides={"streams": {"keepalive": 0.05}})
    tap = _Tap()
    events: list[httpx_sse.ServerSentEvent] = []
    client = httpx.AsyncClient(transport=tap, base_url=f"http://127.0.0.1:{daemon.port}")
    async with client, httpx_sse.aconnect_sse(client, "GET", "/v1/stream?topics=demo.*") as source:

        async def read() -> None:
            async for sse in source.aiter_sse():
                events.append(sse)
                if sse.event == "demo.b":
                    return

        reader = asyncio.ensure_future(read())
        try:
            end = await tap.until(b": connected\n")
            await tap.until(b": keepalive\n", end)
            (first,) = await logged(daemon, [daemon.bus.publish("demo.a", {"n": 1})])
            end = await tap.until(f"id: {first.id}\n".encode(), end)
            end = await tap.until(b": keepalive\n", end)
            end = await tap.until(b": keepalive\n", end)
            second = daemon.bus.publish("demo.b", {"n": 2})
            await asyncio.wait_for(reader, FRAME_TIMEOUT)
        finally:
            reader.cancel()
    (second,) = await logged(daemon, [second])
    assert [(e.event, e.id) for e in events] == [("demo.a", str(first.id)), ("demo.b", str(second.id))]
    assert [json.loads(e.data)["data"] for e in events] == [{"n": 1}, {"n": 2}]
    assert events[0].retry == 3000  # the opening's reconnect delay, read with the first event


async def test_resume_with_last_event_id_gets_exactly_the_missed_events_then_live_ones(
    start_daemon: Any, http: Any,
) -> None:
    daemon, _ = await start_daemon()
    client = http(daemon)
    bus = daemon.bus
    async with client.get("/v1/stream", params={"topics": "demo.**"}) as response:
        sse = Sse(response)
        await sse.opened()
        seen = [bus.publish("demo.n", {"n": n}) for n in range(3)]
        received = await sse.events(3)
    assert [f.id for f in received] == await logged_ids(daemon, seen)

    bus.publish("unrelated.topic", {})
    missed = [bus.publish("demo.n", {"n": n}) for n in range(3, 6)]
    headers = {"Last-Event-ID": str(received[-1].id)}
    async with client.get("/v1/stream", params={"topics": "demo.**"}, headers=headers) as response:
        sse = Sse(response)
        await sse.opened()
        replayed = await sse.events(3)
        live = [bus.publish("demo.n", {"n": 6}), bus.publish("demo.deep.n", {"n": 7})]
        after = await sse.events(2)
    assert [f.id for f in replayed] == await logged_ids(daemon, missed)
    assert [f.data["data"]["n"] for f in replayed] == [3, 4, 5]
    assert [f.id for f in after] == await logged_ids(daemon, live)


async def test_resume_with_since_reads_from_the_committed_log(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon()
    marker = daemon.bus.publish("demo.mark", {})
    missed = [daemon.bus.publish("demo.n", {"n": n}) for n in range(4)]
    marker, *missed = await logged(daemon, [marker, *missed])  # committed: replayed from the log
    params = {"topics": "demo.n", "since": str(marker.id)}
    async with http(daemon).get("/v1/stream", params=params) as response:
        sse = Sse(response)
        await sse.opened()
        replayed = await sse.events(4)
        live = daemon.bus.publish("demo.n", {"n": 4})
        assert (await sse.next_event()).id == (await logged(daemon, [live]))[0].id
    assert [f.id for f in replayed] == [e.id for e in missed]


async def test_the_log_keeps_every_event_of_a_large_batch_in_order(start_daemon: Any) -> None:
    # 301 events in one batch: written as statements of 256, 32, 8, 4 and 1 rows.
    daemon, _ = await start_daemon()
    marker = daemon.bus.publish("bulk.mark", {})
    published = [daemon.bus.publish("bulk.n", {"n": n, "text": f"é {n}"}) for n in range(300)]
    marker, *published = await logged(daemon, [marker, *published])
    stored = await daemon.eventlog.replay(marker.id, lambda event: event.topic == "bulk.n")
    assert [(e.id, e.data) for e in stored] == [(e.id, e.data) for e in published]


async def test_a_replay_from_far_back_is_read_a_page_at_a_time(start_daemon: Any) -> None:
    """Found by review: a stream resuming from far back read the whole log into memory
    before sending any of it, one copy per stream, however slowly its client read (64
    WebSocket subscriptions from 0 on a 50,000-event log held 600 MB). Streams read it a
    page at a time; the events not yet committed go out among the page their ids fall in,
    once, in order."""
    daemon, _ = await start_daemon()
    marker = daemon.bus.publish("bulk.mark", {})
    committed = [daemon.bus.publish("bulk.n", {"n": n}) for n in range(2500)]
    marker, *committed = await logged(daemon, [marker, *committed])
    # On PostgreSQL an event has its log id once committed, so events published now would
    # be in the replay or not as the log's writer commits them during it (on a loaded machine
    # it did): only SQLite's replay has events not yet committed to place.
    unflushed = ([] if daemon.storage.postgres is not None
                 else [daemon.bus.publish("bulk.n", {"n": n}) for n in range(2500, 2510)])
    pages = [page async for page in daemon.eventlog.replay_pages(marker.id, lambda e: e.topic == "bulk.n")]
    assert [len(page) for page in pages] == [1000, 1000, 500 + len(unflushed)]
    assert [e.id for page in pages for e in page] == [e.id for e in committed + unflushed]


async def test_a_sweep_between_two_pages_of_a_replay_is_a_gap(start_daemon: Any) -> None:
    """A replay read a page at a time spans the sweeps of a slow client's time: the events
    one of them deleted before their page was read are announced as a gap, not skipped."""
    from agentd.eventlog import ReplayGap

    daemon, _ = await start_daemon(overrides={"events": {"ring_size": 100}})
    marker = daemon.bus.publish("bulk.mark", {})
    published = [daemon.bus.publish("bulk.n", {"n": n}) for n in range(2500)]
    marker, *published = await logged(daemon, [marker, *published])
    pages = daemon.eventlog.replay_pages(marker.id, lambda e: e.topic == "bulk.n")
    first = await anext(pages)
    assert isinstance(first, list) and [e.id for e in first] == [e.id for e in published[:1000]]
    await daemon.eventlog.sweep()  # keeps the last 100
    rest = [page async for page in pages]
    assert rest[0] == ReplayGap(published[999].id, published[2399].id)
    assert [e.id for page in rest[1:] for e in page] == [e.id for e in published[2400:]]


async def test_a_pattern_of_many_double_stars_costs_its_length_not_more(
    start_daemon: Any, http: Any,
) -> None:
    """Found by review: a pattern was matched by backtracking, one recursion per segment and
    a branch per way `**` could split the topic. A stream of ~1,100 `**` segments (3 KB of
    query, a read-only stream token is enough) made every publish of a topic the bus had not
    cached yet raise RecursionError, for every publisher of the daemon; a dozen took seconds
    of the event loop per topic, growing combinatorially with more."""
    daemon, _ = await start_daemon()
    client = http(daemon)
    deep = ".".join(["**"] * 1100) + ",**." + ".".join(["**", "*"] * 20) + ".never"
    async with client.get("/v1/stream", params={"topics": deep}) as response:
        sse = Sse(response)
        await sse.opened()
        async with client.post("/v1/events", json={"topic": "probe.after"}) as posted:
            assert posted.status == 202, await posted.text()
        assert (await sse.next_event()).event == "probe.after"
        topic = ".".join(["a"] * 100)
        daemon.bus.publish(topic, {})
        assert (await sse.next_event()).event == topic


async def test_resume_has_no_gap_and_no_duplicate_while_events_keep_coming(
    start_daemon: Any, http: Any,
) -> None:
    """Events are published on the daemon's loop on every turn while the stream subscribes,
    replays and goes live: each arrives exactly once, in order, whichever side carried it."""
    daemon, _ = await start_daemon()
    client = http(daemon)
    bus = daemon.bus
    start = bus.publish("seam.start", {})
    published = [bus.publish("seam.n", {"n": n}) for n in range(5)]
    (start,) = await logged(daemon, [start])
    streams = daemon.eventlog.streams  # what streams subscribe to: the bus itself on SQLite
    baseline = streams.stats()["subscriptions"]

    async def connect() -> list[Frame]:
        headers = {"Last-Event-ID": str(start.id)}
        async with client.get("/v1/stream", params={"topics": "seam.n"}, headers=headers) as response:
            sse = Sse(response)
            await sse.opened()
            frames = await sse.until("seam.n")  # at least one
            while frames[-1].data["data"]["n"] != "last":
                frames.append(await sse.next_event())
            return frames

    reader = asyncio.ensure_future(connect())
    after_subscribe = 0
    for n in range(5, 2000):
        published.append(bus.publish("seam.n", {"n": n}))
        await asyncio.sleep(0)
        if streams.stats()["subscriptions"] > baseline:
            after_subscribe += 1
            if after_subscribe == 50:
                break
    assert after_subscribe == 50, "the stream never subscribed"
    published.append(bus.publish("seam.n", {"n": "last"}))
    frames = await asyncio.wait_for(reader, FRAME_TIMEOUT)
    assert [f.id for f in frames] == await logged_ids(daemon, published)


async def test_resuming_from_before_the_horizon_starts_with_a_gap(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"events": {"ring_size": 2}})
    events = await logged(daemon, [daemon.bus.publish("demo.n", {"n": n}) for n in range(5)])
    await daemon.eventlog.sweep()
    assert daemon.eventlog.horizon == events[2].id
    client = http(daemon)

    headers = {"Last-Event-ID": str(events[0].id)}
    async with client.get("/v1/stream", params={"topics": "demo.n"}, headers=headers) as response:
        sse = Sse(response)
        await sse.opened()
        gap = await sse.next_event()
        kept = await sse.events(2)
    assert gap.event == "gap"
    assert gap.id is None  # a control event never moves the client's resume point
    assert gap.data == {"requested_after": events[0].id, "kept_after": events[2].id}
    assert [f.id for f in kept] == [events[3].id, events[4].id]

    # From the horizon itself nothing was lost: no gap.
    headers = {"Last-Event-ID": str(events[2].id)}
    async with client.get("/v1/stream", params={"topics": "demo.n"}, headers=headers) as response:
        sse = Sse(response)
        await sse.opened()
        assert [f.id for f in await sse.events(2)] == [events[3].id, events[4].id]


@pytest.mark.parametrize(("header", "since"), [
    ("abc", None), ("-5", None), ("12x", None), (None, "1.5"), (None, "\u00b2"),
    (None, str(2**63)),
])
async def test_a_bad_resume_id_is_a_400(st: Any, http: Any, header: str | None, since: str | None) -> None:
    daemon, _, _ = await st()
    record = await daemon.queue.enqueue("st.echo", {"value": 1})
    headers = {"Last-Event-ID": header} if header is not None else {}
    params = {"since": since} if since is not None else {}
    for path in ("/v1/stream", f"/v1/tasks/{record.id}/stream"):
        async with http(daemon).get(path, headers=headers, params=params) as response:
            # An id beyond SQLite's INTEGER range is no event id either: refused up front,
            # not a 200 stream whose replay then fails.
            assert response.status == 400, f"{path}: {response.status}"
            assert_error(await response.json(), "bad_request")


# --------------------------------------------------------------------------- slow clients


async def test_a_client_that_stops_reading_gets_lagged_and_its_stream_ends(
    start_daemon: Any, http: Any,
) -> None:
    daemon, _ = await start_daemon(overrides={"streams": {"client_buffer": 8}})
    client = http(daemon)
    async with client.get("/v1/stream", params={"topics": "flood.*"}) as response:
        sse = Sse(response)
        await sse.opened()
        (first,) = await logged(daemon, [daemon.bus.publish("flood.x", {"n": -1})])
        assert (await sse.next_event()).id == first.id
        (sub,) = stream_subscriptions(daemon)
        # Published on the daemon's loop without yielding: the stream cannot send any of them
        # (on PostgreSQL they reach the stream bus together too, as the feed reads them).
        flood = [daemon.bus.publish("flood.x", {"n": n, "pad": "x" * 1000}) for n in range(200)]
        flood = await logged(daemon, flood)
        await daemon.eventlog.settle()
        assert len(sub) == 8
        assert sub.dropped == 192
        assert daemon.eventlog.streams.stats()["dropped"] == 192
        lagged = await sse.next_event()
        assert lagged.event == "lagged"
        assert lagged.id is None
        assert lagged.data == {"resume_after": first.id, "dropped": 192}
        assert await sse.frame() is None  # the stream ended
    assert not stream_subscriptions(daemon)

    # The client resumes where it was told and gets everything from the log.
    headers = {"Last-Event-ID": str(lagged.data["resume_after"])}
    async with client.get("/v1/stream", params={"topics": "flood.*"}, headers=headers) as response:
        sse = Sse(response)
        await sse.opened()
        assert [f.id for f in await sse.events(200)] == [e.id for e in flood]


async def test_a_slow_client_gets_token_events_folded_before_anything_is_dropped(
    start_daemon: Any, http: Any,
) -> None:
    daemon, _ = await start_daemon(overrides={"streams": {"client_buffer": 8}})
    async with http(daemon).get("/v1/stream", params={"topics": "llm.token,done"}) as response:
        sse = Sse(response)
        await sse.opened()
        texts = [chr(ord("a") + n % 26) for n in range(100)]
        tokens = [daemon.bus.publish("llm.token", {"task_id": 1, "text": t}) for t in texts]
        done = daemon.bus.publish("done", {})
        assert daemon.eventlog.streams.stats()["dropped"] == 0
        frames = await sse.until("done")
        (done,) = await logged(daemon, [done])
    token_frames = frames[:-1]
    assert all(f.event == "llm.token" for f in token_frames)
    assert len(token_frames) < 8
    assert "".join(f.data["data"]["text"] for f in token_frames) == "".join(texts)
    merged = [f.data["data"].get("merged", 1) for f in token_frames]
    assert sum(merged) == 100
    assert max(merged) > 1
    if daemon.storage.postgres is None:
        assert token_frames[-1].id == tokens[-1].id
    else:  # a token bears the id of the stored event before it
        assert token_frames[-1].id < done.id
    assert frames[-1].id == done.id


async def test_tokens_of_different_tasks_are_not_folded_together(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"streams": {"client_buffer": 8}})
    async with http(daemon).get("/v1/stream", params={"topics": "llm.token"}) as response:
        sse = Sse(response)
        await sse.opened()
        for n in range(3):
            daemon.bus.publish("llm.token", {"task_id": 1, "text": f"a{n}"})
        for n in range(30):  # alternate tasks: nothing folds, so the buffer overflows
            daemon.bus.publish("llm.token", {"task_id": 1 + n % 2, "text": f"b{n}"})
        frames = await sse.until("lagged")
        assert await sse.frame() is None
    assert [f.event for f in frames] == ["lagged"]
    assert frames[0].data["dropped"] > 0


# --------------------------------------------------------------------------- task streams


# Stores every task event, queued and started too (the default does not): what the replay
# tests below replay.
LOG_ALL_TASK_EVENTS = {"events": {"persistence": ["task.progress=ring", "task.**=durable", "**=ring"]}}


async def test_a_run_does_not_depend_on_its_stream_connection(st: Any, http: Any) -> None:
    daemon, events, module = await st(LOG_ALL_TASK_EVENTS)
    record = await daemon.queue.enqueue("st.wait_gate", {"name": "conn", "result": "finished"})
    async with http(daemon).get(f"/v1/tasks/{record.id}/stream") as response:
        sse = Sse(response)
        await sse.opened()
        await asyncio.wait_for(module.gate("started:conn").wait(), FRAME_TIMEOUT)
        frames = await sse.until("task.started")
        assert [f.event for f in frames] == ["task", "task.queued", "task.started"]
        assert frames[0].data["task"]["id"] == record.id
    # The client is gone; the task is not.
    module.gate("conn").set()
    final = await daemon.queue.wait(record.id, timeout=FRAME_TIMEOUT)
    assert (final.status, final.result) == ("succeeded", "finished")
    await events.wait_for("task.succeeded", task_id=record.id)


async def test_a_task_stream_opened_late_starts_with_where_the_task_stands(st: Any, http: Any) -> None:
    """By default the event log keeps no task.queued or task.started: a client that joins a
    running task learns it is running, and since when, from the `task` event it gets first."""
    daemon, _, module = await st()
    record = await daemon.queue.enqueue("st.wait_gate", {"name": "late", "result": "done"})
    await asyncio.wait_for(module.gate("started:late").wait(), FRAME_TIMEOUT)
    async with http(daemon).get(f"/v1/tasks/{record.id}/stream") as response:
        sse = Sse(response)
        await sse.opened()
        first = await sse.next_event()
        assert (first.event, first.id) == ("task", None)  # no id: it moves no resume point
        task = first.data["task"]
        assert (task["id"], task["status"], task["attempts"], task["children"]) == (
            record.id, "running", 1, [])
        assert task["started_at"] is not None
        module.gate("late").set()
        rest = await sse.until("end")
    assert [f.event for f in rest] == ["task.succeeded", "end"]


async def test_a_task_stream_has_its_children_and_ends_after_its_final_event(st: Any, http: Any) -> None:
    daemon, _, module = await st(LOG_ALL_TASK_EVENTS)
    client = http(daemon)
    record = await daemon.queue.enqueue("st.parent", {"name": "kid"})
    async with client.get(f"/v1/tasks/{record.id}/stream") as response:
        sse = Sse(response)
        await sse.opened()
        await asyncio.wait_for(module.gate("started:kid").wait(), FRAME_TIMEOUT)
        # Another task's events pass by while the stream is open: they are not its.
        other = await daemon.queue.enqueue("st.echo", {"value": 1})
        await daemon.queue.wait(other.id, timeout=FRAME_TIMEOUT)
        daemon.bus.publish("task.progress", {"task_id": other.id}, correlation_id=str(record.id))
        module.gate("kid").set()
        frames = await sse.until("end")
        assert await sse.frame() is None
    (child_id,) = await daemon.queue.children(record.id)
    snapshot, events, end = frames[0], frames[1:-1], frames[-1]
    assert (snapshot.event, snapshot.id) == ("task", None)
    assert snapshot.data["task"]["id"] == record.id
    ids = [f.id for f in events]
    assert ids == sorted(set(ids))
    assert {f.data["data"]["task_id"] for f in events} == {record.id, child_id}
    by_task = {
        task_id: [(f.event, f.data["data"].get("kind")) for f in events
                  if f.data["data"]["task_id"] == task_id]
        for task_id in (record.id, child_id)
    }
    assert by_task[record.id] == [("task.queued", None), ("task.started", None),
                                  ("task.progress", "parent.before"), ("task.succeeded", None)]
    assert by_task[child_id] == [("task.queued", None), ("task.started", None),
                                 ("task.progress", "child.working"), ("task.succeeded", None)]
    assert all(f.data["correlation_id"] == str(record.id) for f in events)
    assert all(f.data["causation_id"] == str(record.id) for f in events
               if f.data["data"]["task_id"] == child_id)
    assert (events[-1].event, events[-1].data["data"]["task_id"]) == ("task.succeeded", record.id)
    assert end.id is None
    assert end.data["task"]["id"] == record.id
    assert end.data["task"]["status"] == "succeeded"
    assert end.data["task"]["result"] == {"child": "child kid done"}
    assert end.data["task"]["children"] == [child_id]  # as GET /v1/tasks/{id} has it

    # A finished task's stream replays what the log kept, then ends at once.
    async with client.get(f"/v1/tasks/{record.id}/stream") as response:
        sse = Sse(response)
        await sse.opened()
        replay = await sse.until("end")
        assert await sse.frame() is None
    assert replay[0].data == end.data  # the snapshot of a finished task is its end
    assert [f.id for f in replay[1:-1]] == ids
    assert replay[-1].data == end.data

    # Resumed part-way, it sends only the rest.
    headers = {"Last-Event-ID": str(ids[3])}
    async with client.get(f"/v1/tasks/{record.id}/stream", headers=headers) as response:
        sse = Sse(response)
        await sse.opened()
        rest = await sse.until("end")
    assert [f.id for f in rest[1:-1]] == ids[4:]


@pytest.mark.parametrize("task_id", ["424242", str(2**63)])
async def test_a_task_stream_of_an_unknown_task_is_a_404(start_daemon: Any, http: Any, task_id: str) -> None:
    daemon, _ = await start_daemon()
    async with http(daemon).get(f"/v1/tasks/{task_id}/stream") as response:
        assert response.status == 404
        assert response.content_type == "application/json"
        assert task_id in assert_error(await response.json(), "task_not_found")
    assert not stream_subscriptions(daemon)


async def test_a_task_stream_resumed_from_before_the_horizon_starts_with_a_gap(st: Any, http: Any) -> None:
    daemon, _, _ = await st({"events": {**LOG_ALL_TASK_EVENTS["events"], "retention": 0}})
    record = await daemon.queue.enqueue("st.echo", {"value": 1})
    await daemon.queue.wait(record.id, timeout=FRAME_TIMEOUT)
    client = http(daemon)
    async with client.get(f"/v1/tasks/{record.id}/stream") as response:
        sse = Sse(response)
        await sse.opened()
        frames = await sse.until("end")
    queued = frames[1]
    assert queued.event == "task.queued"
    await daemon.eventlog.flush()
    await daemon.eventlog.sweep()  # retention 0: the task's events are gone
    assert daemon.eventlog.horizon >= frames[-2].id

    headers = {"Last-Event-ID": str(queued.id)}
    async with client.get(f"/v1/tasks/{record.id}/stream", headers=headers) as response:
        sse = Sse(response)
        await sse.opened()
        resumed = await sse.until("end")
    assert [f.event for f in resumed] == ["task", "gap", "end"]
    assert resumed[1].data == {"requested_after": queued.id, "kept_after": daemon.eventlog.horizon}
    assert resumed[2].data["task"]["status"] == "succeeded"


async def test_a_published_bus_lagged_event_does_not_end_other_streams(start_daemon: Any, http: Any) -> None:
    """`bus.lagged` is the name of the bus's overflow marker, but anyone may publish an event
    with that topic: it must not pass for the marker and end the streams that match it."""
    daemon, _ = await start_daemon()
    client = http(daemon)
    async with client.get("/v1/stream") as response:  # every topic
        sse = Sse(response)
        await sse.opened()
        async with client.post("/v1/events", json={"topic": "bus.lagged", "data": {}}) as posted:
            accepted = posted.status == 202  # refusing the reserved topic would do as well
        after = daemon.bus.publish("after.it", {})
        names: list[str | None] = []
        while not names or names[-1] not in ("after.it", "lagged"):
            frame = await sse.frame()
            assert frame is not None, f"the stream ended after {names}"
            if frame.event is not None:
                names.append(frame.event)
                last = frame
    assert names == (["bus.lagged", "after.it"] if accepted else ["after.it"])
    assert last.id == (await logged(daemon, [after]))[0].id


async def test_a_client_that_takes_nothing_is_dropped_after_send_timeout(st: Any) -> None:
    """An SSE client that stops reading altogether is disconnected once a write waits
    `send_timeout`; the server keeps no subscription or buffer for it."""
    daemon, _, _ = await st({"streams": {"send_timeout": 0.2, "client_buffer": 5000}})
    streams = daemon.server._runner.app[STREAMS]
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(b"GET /v1/stream?topics=bulk.* HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b": connected\n"), FRAME_TIMEOUT)  # never read again
    assert [s.name for s in streams] == ["sse:bulk.*"]
    big = "x" * 65536
    async with asyncio.timeout(10):
        for n in range(2000):  # at most 128 MB; the socket buffers fill within a few MB
            daemon.bus.publish("bulk.x", {"n": n, "pad": big})
            # On PostgreSQL events reach the stream once committed: a publisher running ahead
            # of the commits wrote far more to the log than the buffers take.
            if daemon.storage.postgres is not None:
                await daemon.eventlog.settle()
            else:
                await asyncio.sleep(0)  # noqa: sleep - let the stream write (a yield, not a wait)
            if not streams:
                break
        # No event marks the drop: poll the condition itself, bounded by the timeout above.
        while streams:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: no event marks the drop
        # The server lets go of the connection too, though the client still reads nothing
        # (a close would wait for its full buffer to drain: the socket would stay open).
        server = daemon.server._runner.server
        while server.connections:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: no event marks the release
    writer.close()
    await writer.wait_closed()


async def test_connections_that_never_finish_a_request_head_are_closed(start_daemon: Any) -> None:
    """Half a request line, a request line with half its headers, an idle keep-alive
    connection: each is closed `[server] header_timeout` after it opened (or after its last
    response), and the server holds none of them."""
    # Long enough that all 31 are still open when counted, on a loaded machine too (at 0.3 s
    # a busy CI machine had closed ten of them before the count).
    header_timeout = 2.0
    daemon, _ = await start_daemon(overrides={"server": {"header_timeout": header_timeout}})
    server = daemon.server._runner.server
    partial = [b"", b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "]
    clients = [await asyncio.open_connection("127.0.0.1", daemon.port) for _ in range(30)]
    try:
        for n, (_, writer) in enumerate(clients):
            writer.write(partial[n % len(partial)])
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        clients.append((reader, writer))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), FRAME_TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert len(server.connections) == 31
        async with asyncio.timeout(header_timeout + 5):
            for reader, _ in clients:
                while await reader.read(65536):  # the rest of a response, then the server's EOF
                    pass
    finally:
        for _, writer in clients:
            writer.close()
    async with asyncio.timeout(FRAME_TIMEOUT):
        while server.connections:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: no event marks the release


@pytest.mark.parametrize("path", ["/v1/events", "/v1/tasks", "/hooks/gh"])
async def test_a_body_that_never_arrives_whole_is_answered_408(start_daemon: Any, path: str) -> None:
    """A head whose Content-Length the body never reaches: `[server] header_timeout` after the
    head the request is answered 408 (aiohttp would wait for the rest as long as the client
    liked, holding the connection and its handler)."""
    daemon, _ = await start_daemon(overrides={"server": {"header_timeout": 0.3},
                                              "hooks": {"gh": {"secret": "s" * 32}}})
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{\"topic\":".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), FRAME_TIMEOUT)
        assert head.startswith(b"HTTP/1.1 408"), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), FRAME_TIMEOUT))
        assert body["error"]["code"] == "body_timeout"
        assert "header_timeout" in body["error"]["message"]
    finally:
        writer.close()


async def test_a_client_gone_before_its_body_arrived_is_no_server_failure(start_daemon: Any) -> None:
    """A client that closes its connection halfway through a body: the read fails with
    ConnectionResetError, which was logged as http.handler_failed with its traceback (at
    error level, once for each such client) and answered 500."""
    daemon, _ = await start_daemon()
    with capture_logs() as logs:
        _, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"topic\":")
        await writer.drain()
        server = daemon.server._runner.server
        async with asyncio.timeout(FRAME_TIMEOUT):
            while not server.connections:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: no event marks the accept
        writer.close()
        await writer.wait_closed()
        async with asyncio.timeout(FRAME_TIMEOUT):
            while server.connections:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: no event marks the release
    assert [log for log in logs if log["log_level"] == "error"] == []


@pytest.mark.parametrize("task_stream", [False, True])
async def test_a_stream_its_client_closes_is_released_at_once(st: Any, http: Any, task_stream: bool) -> None:
    """Not at the next keepalive (15 s by default): the moment the connection is lost."""
    daemon, _, _ = await st()
    client = http(daemon)
    if task_stream:
        async with client.post("/v1/tasks", json={"name": "st.echo", "delay": 60}) as r:
            path = f"/v1/tasks/{(await r.json())['id']}/stream"
    else:
        path = "/v1/stream?topics=demo.*"
    streams = daemon.eventlog.streams  # what streams subscribe to: the bus itself on SQLite
    subscriptions = streams.stats()["subscriptions"]
    response = await client.get(path)
    sse = Sse(response)
    await sse.opened()
    assert len(stream_subscriptions(daemon)) == 1
    assert streams.stats()["subscriptions"] == subscriptions + 1
    response.close()
    async with asyncio.timeout(FRAME_TIMEOUT):
        while stream_subscriptions(daemon):  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: no event marks the release
    assert streams.stats()["subscriptions"] == subscriptions
    async with asyncio.timeout(FRAME_TIMEOUT):
        while daemon.server._runner.server.connections:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: no event marks the release


async def test_a_client_that_reads_nothing_holds_a_bounded_kernel_buffer(start_daemon: Any) -> None:
    """Left to itself the kernel keeps taking a non-reading client's data into a send buffer
    it grows to megabytes (tcp_wmem), so the stream keeps writing, and 200 such clients cost
    as much as readers and a gigabyte of TCP memory. `[streams] send_buffer` bounds it: the
    stream's writes wait (and `send_timeout` can act) after a few hundred KiB."""
    from agentd.web.streams import event_json, sse_frame

    daemon, _ = await start_daemon(overrides={"streams": {"send_buffer": 32768, "send_timeout": 60}})
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    writer.write(b"GET /v1/stream?topics=bulk.* HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b": connected\n"), FRAME_TIMEOUT)
    writer.transport.pause_reading()  # from here on the client reads nothing
    (connection,) = daemon.server._runner.server.connections
    written = 0
    try:
        async with asyncio.timeout(10):
            for n in range(4000):  # 16 MB at most
                event = daemon.bus.publish("bulk.x", {"n": n, "pad": "x" * 4096})
                written += len(sse_frame(event, event_json(event)))
                if daemon.storage.postgres is not None:
                    await daemon.eventlog.settle()  # on the stream bus once committed
                else:
                    await asyncio.sleep(0)  # noqa: sleep - let the stream write (a yield, not a wait)
                if connection.writing_paused:
                    break
        assert connection.writing_paused
        taken_by_the_kernel = written - connection.transport.get_write_buffer_size()
        assert taken_by_the_kernel < 1_000_000, taken_by_the_kernel
    finally:
        writer.close()


def test_the_shared_encodings_are_bounded_and_serve_only_their_own_event() -> None:
    """The cache of encoded events (one encoding for every stream sending an event) keeps
    at most `max_entries` and about `max_bytes`, oldest out first; an event with the id of
    a cached one (a folded token event) gets its own encoding, never the other's."""
    from agentd.events import Event
    from agentd.web.streams import EncodedEvents, event_json, sse_frame

    cache = EncodedEvents(max_entries=3, max_bytes=10_000)
    events = [Event(n, "task.token", {"text": str(n)}) for n in range(1, 6)]
    for event in events:
        assert cache.sse_frame(event) == sse_frame(event, event_json(event))
        assert cache.body(event) == event_json(event)
    assert list(cache._entries) == [3, 4, 5]
    assert cache.sse_frame(events[-1]) is cache.sse_frame(events[-1])  # built once

    folded = Event(5, "task.token", {"text": "45", "merged": 2})
    assert cache.body(folded) == event_json(folded)
    assert cache.sse_frame(folded) == sse_frame(folded, event_json(folded))
    assert cache.sse_frame(events[-1]) == sse_frame(events[-1], event_json(events[-1]))

    big = Event(6, "bulk.x", {"pad": "x" * 20_000})
    assert cache.sse_frame(big) == sse_frame(big, event_json(big))  # kept alone past the bound
    assert list(cache._entries) == [6]
    assert cache._bytes == len(event_json(big)) + len(cache.sse_frame(big))
