"""`/v1/ws` against the real daemon with a real aiohttp WebSocket client: subscriptions
(live and resumed), publish, submit, cancel, result, ping, errors that leave the socket
usable, and the lagged policy for a client that stops reading."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import aiohttp
import pytest

from agentd.events import Event
from agentd.web.server import SOCKETS, STREAMS
from agentd.web.ws import OVERSIZE_READ_FACTOR
from sse_client import logged, logged_ids

pytestmark = pytest.mark.both_stores


TIMEOUT = 2.0


class Ws:
    """A WebSocket client speaking the daemon's JSON protocol; every wait is bounded."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._next_id = 0
        self.received: list[dict[str, Any]] = []  # every message read, in order

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text message, got {msg}"
        message = msg.json()
        self.received.append(message)
        return message

    async def send(self, message: dict[str, Any]) -> int:
        self._next_id += 1
        await self.ws.send_json({"id": self._next_id, **message})
        return self._next_id

    async def reply(self, request_id: int | None) -> dict[str, Any]:
        """Read until the reply to `request_id`; other messages are kept in `received`."""
        while True:
            message = await self.receive()
            if "ok" in message and message.get("id") == request_id:
                return message

    async def replies(self, request_ids: list[int]) -> list[dict[str, Any]]:
        """The replies to `request_ids`, in that order, whatever order they come in."""
        wanted = set(request_ids)
        for message in self.received:
            if "ok" in message:
                wanted.discard(message.get("id"))
        while wanted:
            message = await self.receive()
            if "ok" in message:
                wanted.discard(message.get("id"))
        by_id = {m.get("id"): m for m in self.received if "ok" in m}
        return [by_id[request_id] for request_id in request_ids]

    async def request(self, **message: Any) -> dict[str, Any]:
        return await self.reply(await self.send(message))

    async def event(self, subscription: str | None = None) -> dict[str, Any]:
        """The next `event` message (of `subscription`, when given)."""
        while True:
            message = await self.receive()
            if message.get("type") == "event" and subscription in (None, message["subscription"]):
                return message


async def connect(daemon: Any, http: Any, **kwargs: Any) -> Ws:
    return Ws(await http(daemon).ws_connect("/v1/ws", **kwargs))


async def test_subscribe_replies_with_an_id_then_sends_matching_events(st: Any, http: Any) -> None:
    daemon, _, _ = await st()
    ws = await connect(daemon, http)
    reply = await ws.request(type="subscribe", patterns=["demo.*", "other.x"])
    assert reply == {"id": 1, "ok": True, "subscription": "s1"}
    second = await ws.request(type="subscribe", patterns="solo")
    assert second == {"id": 2, "ok": True, "subscription": "s2"}

    daemon.bus.publish("demo.deep.no", {})
    daemon.bus.publish("unrelated", {})
    wanted = [daemon.bus.publish("demo.a", {"n": 1}, correlation_id="c"),
              daemon.bus.publish("other.x", {"n": 2})]
    solo = daemon.bus.publish("solo", {"n": 3})
    messages = [await ws.event() for _ in range(3)]
    wanted, (solo,) = await logged(daemon, wanted), await logged(daemon, [solo])
    s1 = [m for m in messages if m["subscription"] == "s1"]
    assert [m["event"] for m in s1] == [e.to_dict() for e in wanted]
    assert [m for m in messages if m["subscription"] == "s2"] == [
        {"type": "event", "subscription": "s2", "event": solo.to_dict()}]
    await ws.ws.close()


async def test_subscribe_with_since_replays_from_the_log_then_goes_live(st: Any, http: Any) -> None:
    daemon, _, _ = await st()
    mark = daemon.bus.publish("hist.mark", {})
    missed = [daemon.bus.publish("hist.n", {"n": n}) for n in range(3)]
    daemon.bus.publish("elsewhere", {})
    mark, *missed = await logged(daemon, [mark, *missed])
    ws = await connect(daemon, http)
    reply = await ws.request(type="subscribe", patterns=["hist.n"], since=mark.id)
    assert reply["ok"] is True
    replayed = [await ws.event(reply["subscription"]) for _ in range(3)]
    live = daemon.bus.publish("hist.n", {"n": 3})
    assert (await ws.event())["event"]["id"] == (await logged(daemon, [live]))[0].id
    assert [m["event"]["id"] for m in replayed] == [e.id for e in missed]
    events = [m for m in ws.received if m.get("type") == "event"]
    assert len(events) == 4  # nothing twice


async def test_a_resumed_subscription_has_no_gap_and_no_duplicate_while_events_keep_coming(
    st: Any, http: Any,
) -> None:
    """Events are published on the daemon's loop on every turn while the subscription is
    made, replays and goes live: each arrives exactly once, in order."""
    daemon, _, _ = await st()
    bus = daemon.bus
    start = bus.publish("seam.start", {})
    published = [bus.publish("seam.n", {"n": n}) for n in range(5)]
    (start,) = await logged(daemon, [start])
    ws = await connect(daemon, http)
    streams = daemon.eventlog.streams  # what streams subscribe to: the bus itself on SQLite
    baseline = streams.stats()["subscriptions"]

    async def read_all() -> list[dict[str, Any]]:
        events = [await ws.event()]
        while events[-1]["event"]["data"]["n"] != "last":
            events.append(await ws.event())
        return events

    await ws.send({"type": "subscribe", "patterns": ["seam.n"], "since": start.id})
    reader = asyncio.ensure_future(read_all())
    after_subscribe = 0
    for n in range(5, 2000):
        published.append(bus.publish("seam.n", {"n": n}))
        await asyncio.sleep(0)
        if streams.stats()["subscriptions"] > baseline:
            after_subscribe += 1
            if after_subscribe == 50:
                break
    assert after_subscribe == 50, "the subscription was never made"
    published.append(bus.publish("seam.n", {"n": "last"}))
    events = await asyncio.wait_for(reader, TIMEOUT)
    assert [m["event"]["id"] for m in events] == await logged_ids(daemon, published)


async def test_subscribe_from_before_the_horizon_says_there_is_a_gap(st: Any, http: Any) -> None:
    daemon, _, _ = await st({"events": {"ring_size": 1}})
    events = await logged(daemon, [daemon.bus.publish("hist.n", {"n": n}) for n in range(3)])
    await daemon.eventlog.sweep()
    ws = await connect(daemon, http)
    reply = await ws.request(type="subscribe", patterns=["hist.n"], since=events[0].id)
    gap = await ws.receive()
    assert gap == {"type": "gap", "subscription": reply["subscription"],
                   "requested_after": events[0].id, "kept_after": events[1].id}
    assert (await ws.event())["event"]["id"] == events[2].id


async def test_unsubscribe_stops_delivery(st: Any, http: Any) -> None:
    daemon, _, _ = await st()
    ws = await connect(daemon, http)
    first = (await ws.request(type="subscribe", patterns=["demo.*"]))["subscription"]
    sentinel = (await ws.request(type="subscribe", patterns=["sentinel"]))["subscription"]
    daemon.bus.publish("demo.before", {})
    assert (await ws.event(first))["event"]["topic"] == "demo.before"

    assert await ws.request(type="unsubscribe", subscription=first) == {"id": 3, "ok": True}
    daemon.bus.publish("demo.after", {})
    daemon.bus.publish("sentinel", {})
    assert (await ws.event())["subscription"] == sentinel
    topics = [m["event"]["topic"] for m in ws.received if m.get("type") == "event"]
    assert topics == ["demo.before", "sentinel"]
    assert len([s for s in daemon.server._runner.app[STREAMS] if s.name.startswith("ws:")]) == 1

    again = await ws.request(type="unsubscribe", subscription=first)
    assert again["ok"] is False
    assert again["error"]["code"] == "bad_request"
    assert first in again["error"]["message"]


async def test_publish_reaches_the_bus_and_other_clients(st: Any, http: Any) -> None:
    daemon, events, _ = await st()
    listener = await connect(daemon, http)
    await listener.request(type="subscribe", patterns=["ws.*"])
    ws = await connect(daemon, http)
    reply = await ws.request(type="publish", topic="ws.said", data={"text": "hi"})
    assert reply["ok"] is True and set(reply) == {"id", "ok", "event_id"}
    captured = await events.wait_for("ws.said")
    (captured,) = await logged(daemon, [captured])  # the bus's event, as streams show it
    assert (captured.id, dict(captured.data)) == (reply["event_id"], {"text": "hi"})
    heard = await listener.event()
    assert heard["event"]["id"] == reply["event_id"]
    assert heard["event"]["data"] == {"text": "hi"}

    bad_topic = await ws.request(type="publish", topic="ws..said", data={})
    assert (bad_topic["ok"], bad_topic["error"]["code"]) == (False, "bad_pattern")
    bad_data = await ws.request(type="publish", topic="ws.said", data=[1])
    assert (bad_data["ok"], bad_data["error"]["code"]) == (False, "bad_request")
    assert [e.topic for e in events.events].count("ws.said") == 1


async def test_publish_checks_its_data_as_post_v1_events_does(start_daemon: Any, http: Any) -> None:
    """Found by review: `publish` took any object as its data, nested as deep as the message
    could be read (~930) or holding NaN, where POST /v1/events refuses what nests past 32;
    data near the recursion limit then failed each SSE stream it went to as it was encoded,
    a 500 ending the stream."""
    from sse_client import Sse

    daemon, _ = await start_daemon()
    client = http(daemon)
    async with client.get("/v1/stream", params={"topics": "ws.*"}) as response:
        sse = Sse(response)
        await sse.opened()
        ws = await connect(daemon, http)
        for data in ('{"a":' * 900 + "1" + "}" * 900, '{"a":' * 40 + "1" + "}" * 40, '{"x": NaN}'):
            await ws.ws.send_str(f'{{"id": 1, "type": "publish", "topic": "ws.deep", "data": {data}}}')
            reply = await ws.reply(1)
            assert (reply["ok"], reply["error"]["code"]) == (False, "bad_request"), reply
        said = await ws.request(type="publish", topic="ws.said", data={"text": "hi"})
        assert (await sse.next_event()).id == said["event_id"]


async def test_a_durable_trigger_is_committed_before_a_ws_publish_is_answered(st: Any, http: Any) -> None:
    daemon, events, module = await st()
    ws = await connect(daemon, http)
    reply = await ws.request(type="publish", topic="order.placed", data={"sku": "a1"})
    rows = await daemon.store.read("SELECT id, args FROM tasks WHERE name = 'st.on_order'")
    assert len(rows) == 1
    done = await events.wait_for("task.succeeded", name="st.on_order")
    assert done.data["task_id"] == rows[0]["id"]
    handled = Event(module.TRIGGERED[0]["event_id"], "order.placed")  # the bus's id
    assert await logged_ids(daemon, [handled]) == [reply["event_id"]]


async def test_submit_then_result(st: Any, http: Any) -> None:
    daemon, _, _ = await st()
    ws = await connect(daemon, http)
    reply = await ws.request(type="submit", name="st.echo", args={"value": {"x": 5}},
                             idempotency_key="ws-1")
    assert reply["ok"] is True and reply["created"] is True
    task = reply["task"]
    assert (task["name"], task["args"], task["idempotency_key"]) == ("st.echo", {"value": {"x": 5}}, "ws-1")
    result = await ws.request(type="result", task_id=task["id"], timeout=TIMEOUT)
    assert result["ok"] is True
    assert (result["task"]["status"], result["task"]["result"]) == ("succeeded", {"x": 5})
    assert (await daemon.queue.get(task["id"])).status == "succeeded"

    again = await ws.request(type="submit", name="st.echo", args={"value": 6}, idempotency_key="ws-1")
    assert (again["created"], again["task"]["id"]) == (False, task["id"])


async def test_a_long_result_wait_does_not_hold_up_other_requests(st: Any, http: Any) -> None:
    daemon, _, module = await st()
    ws = await connect(daemon, http)
    task = (await ws.request(type="submit", name="st.wait_gate", args={"name": "ws", "result": 7}))["task"]
    waiting = await ws.send({"type": "result", "task_id": task["id"], "timeout": TIMEOUT})
    assert (await ws.request(type="ping"))["type"] == "pong"
    module.gate("ws").set()
    result = await ws.reply(waiting)
    assert (result["task"]["status"], result["task"]["result"]) == ("succeeded", 7)


async def test_a_result_that_does_not_come_in_time_is_a_timeout_error(st: Any, http: Any) -> None:
    daemon, _, module = await st()
    ws = await connect(daemon, http)
    task = (await ws.request(type="submit", name="st.wait_gate", args={"name": "late"}))["task"]
    reply = await ws.request(type="result", task_id=task["id"], timeout=0.05)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "timeout"
    module.gate("late").set()
    assert (await ws.request(type="result", task_id=task["id"], timeout=TIMEOUT))["ok"] is True


async def test_cancel(st: Any, http: Any) -> None:
    daemon, events, _ = await st()
    ws = await connect(daemon, http)
    task = (await ws.request(type="submit", name="st.echo", args={"value": 1}, delay=60))["task"]
    assert task["status"] == "queued"
    reply = await ws.request(type="cancel", task_id=task["id"])
    assert reply["ok"] is True
    assert (reply["task"]["id"], reply["task"]["status"]) == (task["id"], "cancelled")
    await events.wait_for("task.cancelled", task_id=task["id"])
    result = await ws.request(type="result", task_id=task["id"], timeout=TIMEOUT)
    assert result["task"]["status"] == "cancelled"
    conflict = await ws.request(type="cancel", task_id=task["id"] + 1000)
    assert (conflict["ok"], conflict["error"]["code"]) == (False, "task_not_found")


@pytest.mark.parametrize(("message", "code", "mentions"), [
    ({"type": "nope"}, "bad_request", "nope"),
    ({}, "bad_request", "unknown type"),
    ({"type": "cancel", "task_id": "7"}, "bad_request", "task_id"),
    ({"type": "cancel", "task_id": True}, "bad_request", "task_id"),
    ({"type": "result"}, "bad_request", "task_id"),
    ({"type": "result", "task_id": 1, "timeout": 10_000}, "bad_request", "timeout"),
    ({"type": "subscribe", "patterns": ["a..b"]}, "bad_pattern", "a..b"),
    ({"type": "subscribe", "patterns": 5}, "bad_pattern", "5"),
    ({"type": "subscribe", "since": "12"}, "bad_request", "since"),
    # An id beyond SQLite's INTEGER range is no event id: refused, not a dead subscription.
    ({"type": "subscribe", "since": 2**63}, "bad_request", "since"),
    ({"type": "submit", "name": "st.missing"}, "unknown_task", "st.missing"),
    ({"type": "submit", "name": "st.echo", "args": {"nope": 1}}, "invalid_task", "nope"),
    ({"type": "submit", "name": "st.echo", "bogus": 1}, "bad_request", "bogus"),
])
async def test_a_bad_request_is_answered_with_an_error_and_the_socket_stays_usable(
    st: Any, http: Any, message: dict[str, Any], code: str, mentions: str,
) -> None:
    daemon, _, _ = await st()
    ws = await connect(daemon, http)
    reply = await ws.request(**message)
    assert reply["ok"] is False, reply
    assert set(reply) == {"id", "ok", "error"}
    assert reply["error"]["code"] == code
    assert mentions in reply["error"]["message"]
    assert await ws.request(type="ping") == {"id": 2, "ok": True, "type": "pong"}


async def test_bad_json_non_objects_and_binary_messages_are_answered_and_the_socket_stays_usable(
    st: Any, http: Any,
) -> None:
    daemon, _, _ = await st()
    ws = await connect(daemon, http)
    await ws.ws.send_str("{not json")
    reply = await ws.receive()
    assert (reply["id"], reply["ok"], reply["error"]["code"]) == (None, False, "invalid_json")
    assert reply["error"]["message"].startswith("not valid JSON: ")
    await ws.ws.send_str('{"id": "a-1", "type": "ping",}')  # the id it starts with is kept
    reply = await ws.receive()
    assert (reply["id"], reply["error"]["code"]) == ("a-1", "invalid_json")
    await ws.ws.send_str("[1, 2]")
    reply = await ws.receive()
    assert (reply["id"], reply["ok"], reply["error"]["code"]) == (None, False, "bad_request")
    await ws.ws.send_bytes(b'{"id": 1, "type": "ping"}')
    reply = await ws.receive()
    assert (reply["id"], reply["ok"], reply["error"]["code"]) == (None, False, "bad_request")
    assert "binary" in reply["error"]["message"]
    assert await ws.request(type="ping") == {"id": 1, "ok": True, "type": "pong"}
    assert len(ws.received) == 5


async def test_a_lone_surrogate_is_answered_with_an_error(st: Any, http: Any) -> None:
    """JSON's escapes can spell "\\ud800", which no UTF-8 text can hold: SQLite could not
    store it (an idempotency key holding one got no reply at all)."""
    daemon, _, _ = await st()
    ws = await connect(daemon, http)
    for n, fields in enumerate([
        '"type": "submit", "name": "st.echo", "args": {"value": "\\ud800"}',
        '"type": "submit", "name": "st.echo", "idempotency_key": "k\\udfff"',
        '"type": "publish", "topic": "a.b", "data": {"\\ud800": 1}',
    ]):
        await ws.ws.send_str(f'{{"id": {n}, {fields}}}')
        reply = await ws.reply(n)
        assert (reply["ok"], reply["error"]["code"]) == (False, "bad_request"), reply
        assert "surrogate" in reply["error"]["message"]
    # A pair of escapes is one character, and fine.
    pair = '"\\ud83d\\ude00"'
    await ws.ws.send_str(f'{{"id": 9, "type": "submit", "name": "st.echo", "args": {{"value": {pair}}}}}')
    reply = await ws.reply(9)
    assert reply["ok"] is True and reply["task"]["args"] == {"value": "\U0001f600"}
    assert len(await daemon.store.read("SELECT id FROM tasks")) == 1


async def test_a_message_nested_too_deeply_fails_only_itself(st: Any, http: Any) -> None:
    daemon, _, _ = await st()
    ws = await connect(daemon, http)
    deep = "[" * 100_000 + "]" * 100_000
    await ws.ws.send_str(f'{{"id": 7, "type": "publish", "topic": "a.b", "data": {{"x": {deep}}}}}')
    reply = await ws.reply(7)
    assert (reply["ok"], reply["error"]["code"]) == (False, "bad_request")
    assert "nested too deeply" in reply["error"]["message"]
    assert await ws.request(type="ping") == {"id": 1, "ok": True, "type": "pong"}


async def test_a_message_over_the_size_limit_fails_only_itself(st: Any, http: Any) -> None:
    """Up to OVERSIZE_READ_FACTOR times `max_body_bytes`, a message is read and refused and
    the socket stays open; past that aiohttp refuses it unread and closes the socket (1009)."""
    daemon, _, _ = await st({"server": {"max_body_bytes": 1000}})
    ws = await connect(daemon, http)
    fits = '{"id": 1, "type": "publish", "topic": "a.b", "data": {"pad": "%s"}}'
    await ws.ws.send_str(fits % ("x" * (1000 - len(fits) + 2)))
    assert (await ws.reply(1))["ok"] is True
    await ws.ws.send_str(fits.replace('"id": 1', '"id": 2') % ("é" * 600))  # 1,200 bytes
    reply = await ws.reply(2)
    assert (reply["ok"], reply["error"]["code"]) == (False, "message_too_large")
    assert "1000" in reply["error"]["message"]
    await ws.ws.send_str(fits.replace('"id": 1', '"id": 3') % ("x" * (OVERSIZE_READ_FACTOR * 1000 - 100)))
    assert (await ws.reply(3))["error"]["code"] == "message_too_large"
    assert await ws.request(type="ping") == {"id": 1, "ok": True, "type": "pong"}

    await ws.ws.send_str("x" * (OVERSIZE_READ_FACTOR * 1000 + 1))
    closing = await ws.ws.receive(timeout=TIMEOUT)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_requests_in_flight_on_one_socket_are_bounded(st: Any, http: Any) -> None:
    """Past `ws_max_requests` waiting requests, each further one is refused at once (with a
    reply) until some finish; none of them holds anything once answered."""
    daemon, _, module = await st({"streams": {"ws_max_requests": 3}})
    ws = await connect(daemon, http)
    task = (await ws.request(type="submit", name="st.wait_gate", args={"name": "many"}))["task"]
    waiting = [await ws.send({"type": "result", "task_id": task["id"], "timeout": TIMEOUT})
               for _ in range(3)]
    refused = [await ws.send({"type": "result", "task_id": task["id"]}) for _ in range(50)]
    refused.append(await ws.send({"type": "ping"}))
    for request_id in refused:
        reply = await ws.reply(request_id)
        assert (reply["ok"], reply["error"]["code"]) == (False, "too_many_requests"), reply
        assert "ws_max_requests" in reply["error"]["message"]
    assert len(daemon.queue._waiters[task["id"]]) == 3
    module.gate("many").set()
    assert [r["task"]["status"] for r in await ws.replies(waiting)] == ["succeeded"] * 3
    assert (await ws.request(type="ping"))["ok"] is True
    assert not daemon.queue._waiters


async def test_result_waits_that_time_out_leave_no_waiter_behind(st: Any, http: Any) -> None:
    daemon, _, module = await st()
    ws = await connect(daemon, http)
    task = (await ws.request(type="submit", name="st.wait_gate", args={"name": "w"}))["task"]
    sent = [await ws.send({"type": "result", "task_id": task["id"], "timeout": 0.05 * (n % 2)})
            for n in range(100)]
    assert {r["error"]["code"] for r in await ws.replies(sent)} == {"timeout"}
    assert not daemon.queue._waiters
    module.gate("w").set()
    assert (await ws.request(type="result", task_id=task["id"], timeout=TIMEOUT))["ok"] is True


async def test_subscriptions_on_one_socket_are_bounded(st: Any, http: Any) -> None:
    daemon, _, _ = await st({"streams": {"ws_max_subscriptions": 2}})
    ws = await connect(daemon, http)
    first = (await ws.request(type="subscribe", patterns=["a.*"]))["subscription"]
    await ws.request(type="subscribe", patterns=["b.*"])
    reply = await ws.request(type="subscribe", patterns=["c.*"])
    assert (reply["ok"], reply["error"]["code"]) == (False, "too_many_subscriptions")
    assert len([s for s in daemon.server._runner.app[STREAMS] if s.name.startswith("ws:")]) == 2
    await ws.request(type="unsubscribe", subscription=first)
    assert (await ws.request(type="subscribe", patterns=["c.*"]))["ok"] is True


async def test_a_client_that_stops_reading_gets_lagged_then_close_4000(st: Any, http: Any) -> None:
    daemon, _, _ = await st({"streams": {"client_buffer": 8}})
    ws = await connect(daemon, http)
    name = (await ws.request(type="subscribe", patterns=["flood.*"]))["subscription"]
    (first,) = await logged(daemon, [daemon.bus.publish("flood.x", {"n": -1})])
    assert (await ws.event())["event"]["id"] == first.id
    (sub,) = [s for s in daemon.server._runner.app[STREAMS] if s.name == f"ws:{name}"]
    # Published on the daemon's loop without yielding: the pump cannot send any of them
    # (on PostgreSQL they reach the stream bus together too, as the feed reads them).
    for n in range(100):
        daemon.bus.publish("flood.x", {"n": n})
    await daemon.eventlog.settle()
    assert len(sub) == 8
    assert daemon.eventlog.streams.stats()["dropped"] == 92
    lagged = await ws.receive()
    assert lagged == {"type": "lagged", "subscription": name, "resume_after": first.id}
    closing = await ws.ws.receive(timeout=TIMEOUT)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert ws.ws.close_code == 4000
    assert ws.ws.closed
    # The server ends its side once it has the client's close frame.
    async with asyncio.timeout(5):
        while daemon.server._runner.app[SOCKETS]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: no event marks the end
    assert not [s for s in daemon.server._runner.app[STREAMS] if s.name.startswith("ws:")]


async def test_a_published_bus_lagged_event_does_not_close_other_sockets(st: Any, http: Any) -> None:
    """`bus.lagged` is the name of the bus's overflow marker, but a client may publish an event
    with that topic: it must not pass for the marker and close the sockets that match it."""
    daemon, _, _ = await st()
    listener = await connect(daemon, http)
    name = (await listener.request(type="subscribe", patterns=["**"]))["subscription"]
    ws = await connect(daemon, http)
    reply = await ws.request(type="publish", topic="bus.lagged", data={})
    after = daemon.bus.publish("after.it", {})
    message = await listener.receive()
    if reply["ok"]:  # refusing the reserved topic would do as well
        assert (message["type"], message["subscription"]) == ("event", name), message
        assert (message["event"]["topic"], message["event"]["id"]) == ("bus.lagged", reply["event_id"])
        message = await listener.receive()
    assert (message["type"], message["subscription"]) == ("event", name), message
    assert message["event"]["id"] == (await logged(daemon, [after]))[0].id
    assert not listener.ws.closed


async def test_tokens_are_folded_for_a_slow_ws_client(st: Any, http: Any) -> None:
    daemon, _, _ = await st({"streams": {"client_buffer": 8}})
    ws = await connect(daemon, http)
    await ws.request(type="subscribe", patterns=["llm.token", "done"])
    texts = [str(n % 10) for n in range(50)]
    for text in texts:
        daemon.bus.publish("llm.token", {"task_id": 9, "text": text})
    daemon.bus.publish("done", {})
    messages = [await ws.event()]
    while messages[-1]["event"]["topic"] != "done":
        messages.append(await ws.event())
    tokens = [m["event"]["data"] for m in messages[:-1]]
    assert len(tokens) < 8
    assert "".join(t["text"] for t in tokens) == "".join(texts)
    assert sum(t.get("merged", 1) for t in tokens) == 50
    assert daemon.bus.stats()["dropped"] == 0


async def _raw_ws_subscribe(port: int, pattern: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client on a bare socket with a small receive buffer, subscribed to
    `pattern`, that will never read again (aiohttp's client would keep reading)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = json.dumps({"id": 1, "type": "subscribe", "patterns": [pattern]}).encode()
    mask = os.urandom(4)
    writer.write(bytes([0x81, 0x80 | len(payload)]) + mask
                 + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    await writer.drain()
    reply = await asyncio.wait_for(reader.readexactly(2), TIMEOUT)  # the reply frame's header
    body = await asyncio.wait_for(reader.readexactly(reply[1] & 0x7F), TIMEOUT)
    assert json.loads(body)["ok"] is True
    return reader, writer


async def test_a_client_that_takes_nothing_is_dropped_after_send_timeout(st: Any, http: Any) -> None:
    """A client that stops reading altogether (its socket buffers full, so no lagged message
    or close frame could reach it) is disconnected once a send waits `send_timeout`: its
    subscription, task and buffer are gone and the server holds nothing for it."""
    daemon, _, _ = await st({"streams": {"send_timeout": 0.2, "client_buffer": 5000}})
    app = daemon.server._runner.app
    _, writer = await _raw_ws_subscribe(daemon.port, "bulk.*")
    assert len(app[SOCKETS]) == 1
    big = "x" * 65536
    async with asyncio.timeout(10):
        for n in range(2000):  # at most 128 MB; the socket buffers fill within a few MB
            daemon.bus.publish("bulk.x", {"n": n, "pad": big})
            # On PostgreSQL events reach the stream once committed: a publisher running ahead
            # of the commits wrote all 128 MB to the log (10 s, and 7 s more to flush at the stop).
            if daemon.storage.postgres is not None:
                await daemon.eventlog.settle()
            else:
                await asyncio.sleep(0)  # noqa: sleep - let the pump write (a yield, not a wait)
            if not app[SOCKETS]:
                break
        # No event marks the drop: poll the condition itself, bounded by the timeout above.
        while app[SOCKETS]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: no event marks the drop
    assert not [s for s in app[STREAMS] if s.name.startswith("ws:")]
    writer.close()
    await writer.wait_closed()


def _masked_text_frame(message: dict[str, Any]) -> bytes:
    """One client WebSocket text frame (masked, as a client's must be) carrying `message`."""
    payload = json.dumps(message).encode()
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x81, 0x80 | 127]) + size.to_bytes(8, "big") if size > 0xFFFF else (
        bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big") if size > 125 else bytes([0x81, 0x80 | size]))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_client_that_takes_no_replies_is_dropped(st: Any, http: Any) -> None:
    """Its requests are answered, but it reads nothing: once a reply has waited
    `send_timeout` the socket is dropped, and it holds no task, waiter or buffer."""
    daemon, _, _ = await st({"streams": {"send_timeout": 0.2, "send_buffer": 4096}})
    app = daemon.server._runner.app
    async with http(daemon).post("/v1/tasks", json={"name": "st.echo",
                                                    "args": {"value": "x" * 100_000}}) as response:
        task_id = (await response.json())["id"]
    await daemon.queue.wait(task_id, TIMEOUT)
    _, writer = await _raw_ws_subscribe(daemon.port, "quiet.*")
    for n in range(2, 102):  # 100 replies of 100 KB each: more than the socket's buffers hold
        writer.write(_masked_text_frame({"id": n, "type": "result", "task_id": task_id}))
    async with asyncio.timeout(5):
        while app[SOCKETS]:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: no event marks the drop
    assert not [s for s in app[STREAMS] if s.name.startswith("ws:")]
    assert not daemon.queue._waiters
    writer.transport.abort()
