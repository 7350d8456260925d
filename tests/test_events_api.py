"""Publishing over HTTP (`POST /v1/events`), durable triggers, inbound webhooks, stream
tokens, the Origin allowlist, the body limit and the OpenAPI entries of the live surface,
against the real daemon."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import sqlite3
import time
import tomllib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from standardwebhooks import Webhook
from structlog.testing import capture_logs

from agentd.web.server import SOCKETS
from sse_client import Sse, bus_id, logged, sql
from test_queue import writer_held
from test_ws import connect

pytestmark = pytest.mark.both_stores


TIMEOUT = 2.0
TOKEN = "t0ken-for-tests"
SECRET = "s3cret"


def assert_error(body: Any, code: str) -> str:
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return str(body["error"]["message"])


def hmac_hex(body: bytes, secret: str = SECRET) -> str:
    """The hex schemes' signature (GitHub's, agentd's before Standard Webhooks)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def post(client: aiohttp.ClientSession, path: str, **kwargs: Any) -> tuple[int, Any]:
    """POST, bounded by TIMEOUT; the status and the JSON body."""

    async def send() -> tuple[int, Any]:
        async with client.post(path, **kwargs) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    return await asyncio.wait_for(send(), TIMEOUT)


async def first_line(response: aiohttp.ClientResponse) -> bytes:
    return await asyncio.wait_for(response.content.readline(), TIMEOUT)


async def trigger_rows(daemon: Any, name: str) -> list[Any]:
    return await daemon.store.read(
        sql(daemon, "SELECT id, args, idempotency_key, status FROM tasks WHERE name = ? ORDER BY id"),
        (name,))


async def reserved(daemon: Any) -> None:
    """Wait until a durable publish has taken its event's id and waits in its write."""

    async def poll() -> None:
        while daemon.bus.delivered_id == daemon.bus.last_id:  # noqa: ASYNC110 - no event marks it
            await asyncio.sleep(0)  # noqa: sleep - a yield: taking an id publishes nothing

    await asyncio.wait_for(poll(), TIMEOUT)


# --------------------------------------------------------------------------- POST /v1/events


async def test_post_event_is_published_and_answered_202_with_its_id(start_daemon: Any, http: Any) -> None:
    daemon, events = await start_daemon()
    client = http(daemon)
    status, body = await post(client, "/v1/events", json={"topic": "user.clicked", "data": {"x": [1, 2]}})
    assert status == 202
    assert set(body) == {"id", "topic"}
    assert body["topic"] == "user.clicked"
    (event,) = await logged(daemon, [await events.wait_for("user.clicked")])
    assert (event.id, dict(event.data)) == (body["id"], {"x": [1, 2]})

    status, body = await post(client, "/v1/events", json={"topic": "user.no_data"})
    assert status == 202
    assert dict((await events.wait_for("user.no_data")).data) == {}
    assert body["id"] > event.id


async def test_fire_and_forget_handlers_do_not_delay_the_answer(st: Any, http: Any) -> None:
    daemon, _, module = await st()
    status, body = await post(http(daemon), "/v1/events", json={"topic": "slow.go"})
    assert status == 202
    # The handler started but is still blocked: the answer did not wait for it.
    await asyncio.wait_for(module.gate("slow.started").wait(), TIMEOUT)
    handled = module.HANDLED
    assert handled == []
    module.gate("slow.release").set()
    await asyncio.wait_for(daemon.spawner.idle(), TIMEOUT)
    assert handled == [await bus_id(daemon, body["id"])]


@pytest.mark.parametrize(("body", "code", "mentions"), [
    (b'{"topic": "a..b"}', "bad_request", "topic: expected a topic: dot-separated names of letters, "
                                          "digits, '_', '-', got 'a..b'"),
    (b'{"topic": "has space"}', "bad_request", "has space"),
    (b'{"topic": 5}', "bad_request", "topic: expected `str`, got `int`"),
    (b'{"data": {}}', "bad_request", "missing required field `topic`"),
    (b'{"topic": "task.done"}', "bad_pattern", "reserved"),
    (b'{"topic": "bad.data", "data": [1]}', "bad_request", "data"),
    (b'{"topic": "bad.data", "data": "text"}', "bad_request", "data"),
    (b'{"topic": "bad.field", "extra": 1}', "bad_request", "extra"),
    (b'{"topic": ', "invalid_json", "JSON"),
    (b"", "bad_request", "empty"),
    (b'["bad.list"]', "bad_request", "object"),
])
async def test_a_bad_event_is_a_400_and_publishes_nothing(
    start_daemon: Any, http: Any, body: bytes, code: str, mentions: str,
) -> None:
    daemon, _ = await start_daemon()
    published = daemon.bus.published
    status, answer = await post(http(daemon), "/v1/events", data=body,
                                headers={"Content-Type": "application/json"})
    assert status == 400
    assert mentions in assert_error(answer, code)
    assert daemon.bus.published == published


async def test_a_body_over_the_limit_is_a_413(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={
        "server": {"max_body_bytes": 1024}, "hooks": {"github": {"secret": SECRET}}})
    published = daemon.bus.published
    client = http(daemon)
    status, body = await post(client, "/v1/events", json={"topic": "big", "data": {"pad": "x" * 2048}})
    assert status == 413
    assert "1024 bytes" in assert_error(body, "request_entity_too_large")
    raw = json.dumps({"pad": "x" * 2048}).encode()
    status, body = await post(client, "/hooks/github", data=raw, headers=signed(raw))
    assert status == 413
    assert_error(body, "request_entity_too_large")
    assert daemon.bus.published == published
    status, _ = await post(client, "/v1/events", json={"topic": "small", "data": {"pad": "x" * 512}})
    assert status == 202


# --------------------------------------------------------------------------- durable triggers


async def test_a_durable_trigger_is_committed_before_the_202(st: Any, http: Any) -> None:
    # One handler slot, held by a blocked fire-and-forget handler: a trigger that went
    # through the handler spawner could not be enqueued before the slot frees.
    daemon, events, module = await st({"daemon": {"handler_concurrency": 1}})
    client = http(daemon)
    assert (await post(client, "/v1/events", json={"topic": "slow.hold"}))[0] == 202
    await asyncio.wait_for(module.gate("slow.started").wait(), TIMEOUT)

    status, body = await post(client, "/v1/events", json={"topic": "order.placed", "data": {"sku": "a1"}})
    assert status == 202
    rows = await trigger_rows(daemon, "st.on_order")
    assert len(rows) == 1
    args = json.loads(rows[0]["args"])
    assert set(args) == {"event"}
    # Handlers see the id the daemon's bus gave it (on PostgreSQL not the one streams show).
    published = await bus_id(daemon, body["id"])
    assert (args["event"]["id"], args["event"]["topic"], args["event"]["data"]) == (
        published, "order.placed", {"sku": "a1"})
    assert rows[0]["idempotency_key"] == f"event:{published}:st.on_order"

    done = await events.wait_for("task.succeeded", name="st.on_order")
    assert done.data["task_id"] == rows[0]["id"]
    triggered = module.TRIGGERED
    assert triggered == [{
        "task_id": rows[0]["id"], "task_name": "st.on_order", "attempt": 1, "event_type": "Event",
        "event_id": published, "topic": "order.placed", "data": {"sku": "a1"},
    }]
    module.gate("slow.release").set()
    await asyncio.wait_for(daemon.spawner.idle(), TIMEOUT)
    assert len(await trigger_rows(daemon, "st.on_order")) == 1  # no second task for the event
    assert "handler.dropped" not in events.topics()


async def test_a_durably_published_event_reaches_live_streams(st: Any, http: Any) -> None:
    """Its id is taken before its handler's task commits; the task's own events (higher ids)
    went out first, and streams skipped it as already sent: live clients never saw it. It now
    goes out first, and every event in the order of its id."""
    daemon, _, _ = await st()
    client = http(daemon)
    ws = await connect(daemon, http)
    assert (await ws.request(type="subscribe", patterns=["order.*", "task.*"]))["ok"]
    async with client.get("/v1/stream", params={"topics": "order.*,task.*"}) as response:
        sse = Sse(response)
        await sse.opened()
        status, body = await post(client, "/v1/events", json={"topic": "order.created", "data": {}})
        assert status == 202
        seen: list[tuple[str, int]] = []
        while "task.succeeded" not in [topic for topic, _ in seen]:
            frame = await sse.next_event()
            seen.append((frame.event, frame.id))
    assert seen[0] == ("order.created", body["id"])
    assert [event_id for _, event_id in seen] == sorted(event_id for _, event_id in seen)
    got: list[tuple[str, int]] = []
    while "task.succeeded" not in [topic for topic, _ in got]:
        event = (await ws.event())["event"]
        got.append((event["topic"], event["id"]))
    assert ("order.created", body["id"]) in got


# An SQLite trigger refuses the write; tests/test_cluster_events.py and the queue's own
# tests cover PostgreSQL.
@pytest.mark.sqlite_only
async def test_a_publish_whose_trigger_cannot_be_stored_stores_no_event_either(
    st: Any, http: Any,
) -> None:
    """Found by review: the event's row and its handlers' tasks were two writes of one batch;
    a failed batch is run again write by write, so the row could commit while the tasks did
    not, and a refused publish was replayed to resuming streams. Now one write: neither."""
    daemon, _, _ = await st()
    with sqlite3.connect(daemon.store.path) as db:  # a refusal inside the transaction
        db.execute("CREATE TRIGGER refuse_on_order BEFORE INSERT ON tasks "
                   "WHEN NEW.name = 'st.on_order' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with capture_logs():  # the refusal's 500 is logged
        status, _ = await post(http(daemon), "/v1/events", json={"topic": "order.placed", "data": {}})
    assert status == 500
    assert await daemon.store.read("SELECT id FROM events WHERE topic = 'order.placed'") == []
    assert await trigger_rows(daemon, "st.on_order") == []


async def test_an_in_process_publish_also_enqueues_the_trigger_once(st: Any) -> None:
    daemon, events, module = await st()
    event = daemon.bus.publish("order.local", {"sku": "b2"})
    done = await events.wait_for("task.succeeded", name="st.on_order")
    await asyncio.wait_for(daemon.spawner.idle(), TIMEOUT)
    (row,) = await trigger_rows(daemon, "st.on_order")
    assert row["id"] == done.data["task_id"]
    assert row["idempotency_key"] == f"event:{event.id}:st.on_order"
    assert [t["event_id"] for t in module.TRIGGERED] == [event.id]
    # Committing the triggers of the same event again finds the same task.
    await daemon.plugins.enqueue_triggers(event)
    assert len(await trigger_rows(daemon, "st.on_order")) == 1
    # Events the pattern does not match enqueue nothing.
    daemon.bus.publish("order.local.nested", {})
    daemon.bus.publish("orders.local", {})
    await asyncio.wait_for(daemon.spawner.idle(), TIMEOUT)
    assert len(await trigger_rows(daemon, "st.on_order")) == 1


async def test_a_failing_durable_handler_is_retried_like_a_task(st: Any, http: Any) -> None:
    daemon, events, module = await st()
    status, body = await post(http(daemon), "/v1/events", json={"topic": "flaky.thing"})
    assert status == 202
    done = await events.wait_for("task.succeeded", name="st.flaky")
    task_id = done.data["task_id"]
    retry = await events.wait_for("task.retrying", task_id=task_id)
    assert "the first attempt of a durable handler fails" in retry.data["error"]
    attempts = module.FLAKY_ATTEMPTS
    assert attempts == [(task_id, 1), (task_id, 2)]
    final = await daemon.queue.get(task_id)
    assert (final.status, final.attempts, final.max_attempts) == ("succeeded", 2, 3)
    assert final.args["event"]["id"] == await bus_id(daemon, body["id"])


# --------------------------------------------------------------------------- inbound webhooks


def signed(body: bytes, secret: str = SECRET, *, webhook_id: str | None = None,
           timestamp: int | None = None) -> dict[str, str]:
    """Standard Webhooks headers for `body`, computed here from the specification."""
    webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode()}


def hooks(**tables: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"hooks": tables or {"github": {"secret": SECRET}}}


async def no_hook_events(daemon: Any, events: Any) -> None:
    """Assert nothing was published as hook.*, once everything published before has been seen."""
    daemon.bus.publish("sentinel", {})
    await events.wait_for("sentinel")
    assert not [e for e in events.events if e.topic.startswith("hook.")]


async def raw_post(daemon: Any, path: str, body: bytes,
                   headers: list[tuple[bytes, bytes]]) -> tuple[int, Any]:
    """A POST written byte for byte (header values aiohttp's client would not send)."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: %d\r\n" % (
            path.encode(), len(body))
        writer.write(head + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body)
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


async def test_a_signed_hook_is_published(start_daemon: Any, http: Any) -> None:
    daemon, events = await start_daemon(overrides=hooks())
    payload = {"action": "opened", "number": 7}
    raw = json.dumps(payload).encode()
    headers = {**signed(raw, webhook_id="msg_1"), "Content-Type": "application/json",
               "X-GitHub-Event": "pull_request", "X-Unrelated": "dropped"}
    status, body = await post(http(daemon), "/hooks/github", data=raw, headers=headers)
    assert status == 202
    assert body["topic"] == "hook.github"
    event = await events.wait_for("hook.github")
    assert event.id == await bus_id(daemon, body["id"])
    assert event.data["body"] == payload
    assert event.data["headers"]["X-GitHub-Event"] == "pull_request"
    assert event.data["headers"]["webhook-id"] == "msg_1"
    assert "X-Unrelated" not in event.data["headers"]


async def test_the_reference_library_signs_what_a_hook_takes(start_daemon: Any, http: Any) -> None:
    """A sender using the Standard Webhooks library, with a whsec_ secret, is understood."""
    secret = "whsec_" + base64.b64encode(b"sixteen byte key").decode()
    daemon, events = await start_daemon(overrides=hooks(deploy={"secret": secret}))
    raw = b'{"env": "prod"}'
    now = datetime.now(tz=UTC)
    headers = {"webhook-id": "msg_lib", "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": "v1,bogus " + Webhook(secret).sign("msg_lib", now, raw.decode())}
    status, _ = await post(http(daemon), "/hooks/deploy", data=raw, headers=headers)
    assert status == 202
    assert (await events.wait_for("hook.deploy")).data["body"] == {"env": "prod"}


BODY = b'{"a": 1}'
# Made when the test runs (a timestamp made at collection could be stale by then).
BAD_SIGNATURES: dict[str, Callable[[], dict[str, str]]] = {
    "none": dict,
    "wrong-secret": lambda: signed(BODY, secret="wrong"),
    "other-body": lambda: signed(b'{"a": 2}'),
    "other-id": lambda: {**signed(BODY), "webhook-id": "msg_other"},
    "other-timestamp": lambda: {**signed(BODY, timestamp=int(time.time()) - 1),
                                "webhook-timestamp": str(int(time.time()))},
    "v2-only": lambda: {**signed(BODY), "webhook-signature": "v2," + signed(BODY)["webhook-signature"][3:]},
    "no-id": lambda: {k: v for k, v in signed(BODY).items() if k != "webhook-id"},
    "id-with-spaces": lambda: signed(BODY, webhook_id="msg with spaces"),
    "timestamp-not-a-number": lambda: {**signed(BODY), "webhook-timestamp": "soon"},
    "empty-v1": lambda: {**signed(BODY), "webhook-signature": "v1,"},
    # The hex schemes, which this hook does not list.
    "agentd-unlisted": lambda: {"X-Agentd-Signature": hmac_hex(BODY), "X-Agentd-Delivery": "1"},
    "github-unlisted": lambda: {"X-Hub-Signature-256": hmac_hex(BODY), "X-GitHub-Delivery": "1"},
}


@pytest.mark.parametrize("case", BAD_SIGNATURES)
async def test_a_badly_signed_hook_is_a_401_and_publishes_nothing(
    start_daemon: Any, http: Any, case: str,
) -> None:
    daemon, events = await start_daemon(overrides=hooks())
    status, body = await post(http(daemon), "/hooks/github", data=BODY, headers=BAD_SIGNATURES[case]())
    assert status == 401
    assert "webhook-" in assert_error(body, "bad_signature")
    await no_hook_events(daemon, events)


@pytest.mark.parametrize("header", [b"webhook-signature", b"X-Hub-Signature-256", b"X-Agentd-Signature"])
async def test_a_signature_header_that_is_not_text_is_a_401(start_daemon: Any, header: bytes) -> None:
    daemon, events = await start_daemon(overrides=hooks(
        github={"secret": SECRET, "schemes": ["standard", "github", "agentd"]}))
    ids = [(b"webhook-id", b"msg_1"), (b"webhook-timestamp", str(int(time.time())).encode()),
           (b"X-GitHub-Delivery", b"1"), (b"X-Agentd-Delivery", b"1")]
    status, body = await raw_post(daemon, "/hooks/github", b"{}", [(header, b"sha256=\xff"), *ids])
    assert status == 401
    assert_error(body, "bad_signature")
    status, body = await raw_post(daemon, "/hooks/github", b"{}", [(header, b"v1,\xff\xfe"), *ids])
    assert status == 401
    await no_hook_events(daemon, events)


async def test_a_forwarded_header_that_is_not_text_arrives_with_replacement_characters(
    start_daemon: Any,
) -> None:
    daemon, events = await start_daemon(overrides=hooks())
    headers = [(k.encode(), v.encode()) for k, v in signed(b"{}").items()]
    status, _ = await raw_post(daemon, "/hooks/github", b"{}", [*headers, (b"User-Agent", b"bot\xff")])
    assert status == 202
    assert (await events.wait_for("hook.github")).data["headers"]["User-Agent"] == "bot\ufffd"


@pytest.mark.parametrize("offset", [-301, 301])
async def test_a_timestamp_outside_the_tolerance_is_a_401_unless_the_hook_allows_more(
    start_daemon: Any, http: Any, offset: int,
) -> None:
    daemon, events = await start_daemon(overrides=hooks(
        github={"secret": SECRET}, patient={"secret": SECRET, "tolerance": 600}))
    raw = b"{}"
    headers = signed(raw, timestamp=int(time.time()) + offset)
    status, body = await post(http(daemon), "/hooks/github", data=raw, headers=headers)
    assert status == 401
    assert "at most 300 s" in assert_error(body, "stale_timestamp")
    await no_hook_events(daemon, events)
    status, _ = await post(http(daemon), "/hooks/patient", data=raw, headers=headers)
    assert status == 202


async def test_a_repeated_delivery_is_a_409_even_after_a_restart(
    start_daemon: Any, http: Any,
) -> None:
    daemon, events = await start_daemon(overrides=hooks())
    raw = b'{"n": 1}'
    headers = signed(raw)
    status, first = await post(http(daemon), "/hooks/github", data=raw, headers=headers)
    assert status == 202
    status, body = await post(http(daemon), "/hooks/github", data=raw, headers=headers)
    assert status == 409
    assert headers["webhook-id"] in assert_error(body, "duplicate_delivery")
    daemon.bus.publish("sentinel", {})
    await events.wait_for("sentinel")
    assert [e.id for e in events.events if e.topic == "hook.github"] == [await bus_id(daemon, first["id"])]
    await daemon.stop()

    daemon, events = await start_daemon(overrides=hooks())
    status, _ = await post(http(daemon), "/hooks/github", data=raw, headers=headers)
    assert status == 409
    await no_hook_events(daemon, events)
    status, _ = await post(http(daemon), "/hooks/github", data=raw, headers=signed(raw))
    assert status == 202  # the same body under a new id is a new delivery


async def test_two_copies_of_a_delivery_at_once_publish_it_once(start_daemon: Any, http: Any) -> None:
    daemon, events = await start_daemon(overrides=hooks())
    raw = b"{}"
    headers = signed(raw)
    client = http(daemon)
    answers = await asyncio.gather(*(post(client, "/hooks/github", data=raw, headers=headers)
                                     for _ in range(2)))
    assert sorted(status for status, _ in answers) == [202, 409]
    daemon.bus.publish("sentinel", {})
    await events.wait_for("sentinel")
    assert len([e for e in events.events if e.topic == "hook.github"]) == 1


@pytest.mark.parametrize("depth", [33, 950, 100_000])
async def test_a_signed_body_nested_too_deep_is_published_as_text_not_a_500(
    start_daemon: Any, http: Any, depth: int,
) -> None:
    """Found by review: a signed JSON body nested near or past Python's recursion limit
    failed to decode or to encode again (RecursionError): a 500 for a well-signed request."""
    daemon, events = await start_daemon(overrides=hooks())
    raw = b"[" * depth + b"]" * depth
    status, body = await post(http(daemon), "/hooks/github", data=raw, headers=signed(raw))
    assert status == 202, body
    assert (await events.wait_for("hook.github")).data["body"] == raw.decode()
    shallow = b'{"a": [[1]]}'
    status, _ = await post(http(daemon), "/hooks/github", data=shallow, headers=signed(shallow))
    assert status == 202
    assert [e.data["body"] for e in events.events if e.topic == "hook.github"][-1] == {"a": [[1]]}


# An SQLite temporary trigger refuses the write.
@pytest.mark.sqlite_only
async def test_a_delivery_published_but_not_recorded_is_answered_202_and_still_refused_as_a_repeat(
    start_daemon: Any, http: Any,
) -> None:
    """Found by review: when the storage refused to record the delivery id after the event
    was published (on a full disk a small event row can still fit while the next insert
    needs a page), the sender got 503 for an event already out, and its retry published it
    again. Here the storage refuses only that insert, with SQLite's own message."""
    daemon, events = await start_daemon(overrides=hooks())
    await daemon.store.write(lambda conn: conn.execute(
        "CREATE TEMP TRIGGER refuse_records BEFORE INSERT ON main.hook_deliveries "
        "BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END"))
    client = http(daemon)
    raw = b'{"n": 1}'
    headers = signed(raw)
    with capture_logs() as logs:
        status, first = await post(client, "/hooks/github", data=raw, headers=headers)
    assert status == 202, first
    assert [log["delivery_id"] for log in logs if log["event"] == "hooks.record_failed"] == [
        headers["webhook-id"]]
    status, body = await post(client, "/hooks/github", data=raw, headers=headers)
    assert status == 409
    assert_error(body, "duplicate_delivery")
    daemon.bus.publish("sentinel", {})
    await events.wait_for("sentinel")
    assert [e.id for e in events.events if e.topic == "hook.github"] == [await bus_id(daemon, first["id"])]
    assert await daemon.store.read("SELECT * FROM hook_deliveries") == []


@pytest.mark.parametrize(("scheme", "signature", "delivery"), [
    ("github", "X-Hub-Signature-256", "X-GitHub-Delivery"),
    ("agentd", "X-Agentd-Signature", "X-Agentd-Delivery"),
])
async def test_a_hex_scheme_the_hook_lists_is_taken_once_per_delivery_id(
    start_daemon: Any, http: Any, scheme: str, signature: str, delivery: str,
) -> None:
    daemon, events = await start_daemon(overrides=hooks(github={"secret": SECRET, "schemes": [scheme]}))
    client = http(daemon)
    raw = b"plain text, not JSON"
    headers = {signature: hmac_hex(raw), delivery: "72d3162e-cc78-11e3-81ab-4c9367dc0958"}
    status, _ = await post(client, "/hooks/github", data=raw, headers=headers)
    assert status == 202
    assert (await events.wait_for("hook.github")).data["body"] == "plain text, not JSON"
    status, body = await post(client, "/hooks/github", data=raw, headers=headers)
    assert status == 409
    assert_error(body, "duplicate_delivery")
    status, body = await post(client, "/hooks/github", data=raw, headers={signature: hmac_hex(raw)})
    assert status == 401
    assert delivery in assert_error(body, "bad_signature")
    status, body = await post(client, "/hooks/github", data=raw, headers=signed(raw))
    assert status == 401  # Standard Webhooks is not listed for this hook
    assert signature in assert_error(body, "bad_signature")


async def test_a_hex_delivery_id_reused_for_another_body_is_a_new_delivery(
    start_daemon: Any, http: Any,
) -> None:
    """Found by review: X-Agentd-Delivery is the sender's task id, which a second agentd
    (or the first after its database was reset) uses again; the hook refused (409, which
    fails the sender's task) every such delivery for seven days. A replay repeats the body
    too, and is still refused."""
    daemon, events = await start_daemon(overrides=hooks(github={"secret": SECRET, "schemes": ["agentd"]}))
    client = http(daemon)

    def delivery(raw: bytes) -> dict[str, str]:
        return {"X-Agentd-Signature": hmac_hex(raw), "X-Agentd-Delivery": "41"}

    first, other = b'{"from": "daemon a"}', b'{"from": "daemon b"}'
    for raw in (first, other):
        status, body = await post(client, "/hooks/github", data=raw, headers=delivery(raw))
        assert status == 202, body
    status, body = await post(client, "/hooks/github", data=first, headers=delivery(first))
    assert status == 409
    assert "'41 (" in assert_error(body, "duplicate_delivery")
    daemon.bus.publish("sentinel", {})
    await events.wait_for("sentinel")
    assert [e.data["body"]["from"] for e in events.events if e.topic == "hook.github"] == [
        "daemon a", "daemon b"]


async def test_a_hook_taking_only_the_agentd_scheme_takes_what_agentd_sends_now(
    start_daemon: Any, http: Any,
) -> None:
    """Found by review: agentd's own webhooks carry a Standard Webhooks signature and
    X-Agentd-Signature; a hook listing only "agentd" (for a peer from before Standard
    Webhooks) judged them by the first and refused them (401) once the peer was upgraded."""
    daemon, events = await start_daemon(overrides=hooks(github={"secret": SECRET, "schemes": ["agentd"]}))
    raw = b'{"n": 1}'
    headers = {**signed(raw), "X-Agentd-Signature": hmac_hex(raw), "X-Agentd-Delivery": "41"}
    status, body = await post(http(daemon), "/hooks/github", data=raw, headers=headers)
    assert status == 202, body
    assert (await events.wait_for("hook.github")).data["body"] == {"n": 1}
    status, body = await post(http(daemon), "/hooks/github", data=raw, headers=signed(raw))
    assert status == 401
    assert "not Standard Webhooks" in assert_error(body, "bad_signature")


async def test_delivery_ids_are_forgotten_past_the_replay_window(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"hooks": {
        "replay_window": 0, "github": {"secret": SECRET, "schemes": ["github"]}}})
    client = http(daemon)
    raw = b"{}"
    for delivery in ("a", "b", "a"):
        status, _ = await post(client, "/hooks/github", data=raw,
                               headers={"X-Hub-Signature-256": hmac_hex(raw), "X-GitHub-Delivery": delivery})
        assert status == 202, delivery
    rows = await daemon.store.read("SELECT delivery_id FROM hook_deliveries")
    # Each taken delivery purges the expired; the id is kept with its body's signature.
    assert [row["delivery_id"] for row in rows] == [f"a ({hmac_hex(raw)[7:23]})"]


async def test_an_unknown_hook_is_a_404(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides=hooks())
    raw = b"{}"
    status, body = await post(http(daemon), "/hooks/gitlab", data=raw, headers=signed(raw))
    assert status == 404
    assert "gitlab" in assert_error(body, "unknown_hook")


async def test_hooks_need_no_bearer_token_and_take_a_secret_file_or_variable(
    start_daemon: Any, http: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret_file = tmp_path / "ci-secret"
    secret_file.write_text("from-a-file\nignored second line\n")
    secret_file.chmod(0o600)
    monkeypatch.setenv("DEPLOY_HOOK_SECRET", "from-the-environment")
    daemon, events = await start_daemon(overrides={
        "server": {"token": TOKEN},
        "hooks": {"github": {"secret": SECRET}, "ci": {"secret_file": str(secret_file)},
                  "deploy": {"secret_env": "DEPLOY_HOOK_SECRET"}},
    })
    client = http(daemon)  # no Authorization header
    raw = b'{"build": 1}'
    status, _ = await post(client, "/hooks/ci", data=raw, headers=signed(raw, "from-a-file"))
    assert status == 202
    assert (await events.wait_for("hook.ci")).data["body"] == {"build": 1}
    status, _ = await post(client, "/hooks/github", data=raw, headers=signed(raw))
    assert status == 202
    status, _ = await post(client, "/hooks/deploy", data=raw, headers=signed(raw, "from-the-environment"))
    assert status == 202
    # The same client is refused everywhere else.
    status, body = await post(client, "/v1/events", json={"topic": "x"})
    assert status == 401
    assert_error(body, "unauthorized")
    # A signature made with the file's whole content (second line included) is wrong.
    status, _ = await post(client, "/hooks/ci", data=raw, headers=signed(raw, secret_file.read_text()))
    assert status == 401


def documented_hook_example() -> tuple[str, str]:
    """docs/streams.md's inbound-hook example: its agentd.toml table and its shell script."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "streams.md").read_text()
    section = page.split("\n## Inbound webhooks\n", 1)[1].split("\n## ", 1)[0]
    table = re.search(r"```toml\n(.*?)```", section, re.S)
    script = re.search(r"```sh\n(.*?)```", section, re.S)
    assert table and script, "docs/streams.md no longer shows the hook's table and its curl"
    return table.group(1), script.group(1)


async def test_the_documented_hook_example_runs_as_written(start_daemon: Any) -> None:
    """docs/streams.md "Inbound webhooks": its agentd.toml table, its secret and its curl,
    run by sh."""
    table, script = documented_hook_example()
    secret = "0123456789abcdef0123456789abcdef"
    hooks_table = tomllib.loads(table)["hooks"]
    env_name = hooks_table["deploy"]["secret_env"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv(env_name, secret)
        daemon, events = await start_daemon(overrides={"hooks": hooks_table})
    commands = script.replace("localhost:8470", f"127.0.0.1:{daemon.port}")
    process = await asyncio.create_subprocess_exec(
        "sh", "-eu", "-c", commands, env={"PATH": os.environ["PATH"], env_name: secret},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(TIMEOUT * 5):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert json.loads(out)["topic"] == "hook.deploy", out
    assert (await events.wait_for("hook.deploy")).data["body"]


# --------------------------------------------------------------------------- stream tokens


async def test_stream_tokens_open_stream_routes_and_only_them(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN}})
    anonymous = http(daemon)
    async with anonymous.get("/v1/stream") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "stream-tokens" in assert_error(await response.json(), "unauthorized")
    assert (await post(anonymous, "/v1/stream-tokens"))[0] == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await anonymous.ws_connect("/v1/ws")
    assert refused.value.status == 401

    before = time.time()
    status, issued = await post(http(daemon, token=TOKEN), "/v1/stream-tokens")
    assert status == 201
    assert set(issued) == {"token", "open_until", "expires_at", "path", "topics"}
    assert before + 299 <= issued["open_until"] <= time.time() + 300
    assert before + 86399 <= issued["expires_at"] <= time.time() + 86400
    assert issued["path"] is None and issued["topics"] is None  # any stream route
    token = issued["token"]

    async with anonymous.get("/v1/stream", params={"token": token}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert (await first_line(response)).startswith(b"id: ")
    async with anonymous.get("/v1/tasks/31337/stream", params={"token": token}) as response:
        assert response.status == 404  # past auth: there is no such task
    ws = await anonymous.ws_connect("/v1/ws", params={"token": token})
    await ws.send_json({"id": 1, "type": "ping"})
    assert await ws.receive_json(timeout=TIMEOUT) == {"id": 1, "ok": True, "type": "pong"}
    await ws.close()

    for path in ("/v1/status", "/v1/tasks"):
        async with anonymous.get(path, params={"token": token}) as response:
            assert response.status == 401, path
            assert_error(await response.json(), "unauthorized")
    status, _ = await post(anonymous, "/v1/events", params={"token": token}, json={"topic": "x"})
    assert status == 401


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _reissued(token: str, change: Any) -> str:
    """`token` with its issue time changed and its signature kept."""
    payload, _, signature = token.partition(".")
    issued, path, topics = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = json.dumps([change(issued), path, topics], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(forged).decode().rstrip("=") + "." + signature


@pytest.mark.parametrize("forge", [
    lambda token: token[:-1] + ("0" if token[-1] != "0" else "1"),  # signature altered
    # The last character's two low bits are padding in base64: flipped, it decodes the same.
    lambda token: token[:-1] + _B64[_B64.index(token[-1]) ^ 1],
    lambda token: _reissued(token, lambda issued: issued + 3600),  # issue time moved
    lambda token: "9999999999." + "0" * 64,
    lambda token: "not-a-token",
    lambda token: TOKEN,  # the bearer token itself is no stream token
], ids=["signature-altered", "signature-respelt", "issue-time-moved", "made-up", "garbage", "bearer-token"])
async def test_a_forged_stream_token_is_a_401(start_daemon: Any, http: Any, forge: Any) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN}})
    _, issued = await post(http(daemon, token=TOKEN), "/v1/stream-tokens")
    async with http(daemon).get("/v1/stream", params={"token": forge(issued["token"])}) as response:
        assert response.status == 401
        assert_error(await response.json(), "unauthorized")


async def test_an_expired_stream_token_is_a_401(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN}, "streams": {"token_ttl": 0}})
    _, issued = await post(http(daemon, token=TOKEN), "/v1/stream-tokens")
    async with http(daemon).get("/v1/stream", params={"token": issued["token"]}) as response:
        assert response.status == 401
        assert_error(await response.json(), "unauthorized")


# Daemons on one PostgreSQL share their stream key, so that a client may be sent to any.
@pytest.mark.sqlite_only
async def test_a_stream_token_of_another_daemon_is_refused(
    start_daemon: Any, http: Any, tmp_path: Path,
) -> None:
    overrides = {"server": {"token": TOKEN}}
    one, _ = await start_daemon(overrides=overrides, state_dir=tmp_path / "one")
    two, _ = await start_daemon(overrides=overrides, state_dir=tmp_path / "two")
    _, issued = await post(http(one, token=TOKEN), "/v1/stream-tokens")
    async with http(two).get("/v1/stream", params={"token": issued["token"]}) as response:
        assert response.status == 401


# --------------------------------------------------------------------------- origins


EVIL = "http://evil.example"


async def test_a_foreign_origin_is_refused_everywhere(start_daemon: Any, http: Any) -> None:
    daemon, events = await start_daemon(overrides={"hooks": {"github": {"secret": SECRET}}})
    client = http(daemon)
    origin = {"Origin": EVIL}
    async with client.get("/v1/stream", headers=origin) as response:
        assert response.status == 403
        assert EVIL in assert_error(await response.json(), "origin_not_allowed")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/v1/ws", origin=EVIL)
    assert refused.value.status == 403
    status, body = await post(client, "/v1/events", headers=origin, json={"topic": "from.evil"})
    assert status == 403
    assert_error(body, "origin_not_allowed")
    raw = b"{}"
    status, _ = await post(client, "/hooks/github", data=raw,
                           headers={**origin, **signed(raw)})
    assert status == 403
    for spoof in ("http://127.0.0.1.evil.example", "http://localhost.evil.example", "null",
                  "http://evil.example/http://127.0.0.1"):
        status, _ = await post(client, "/v1/events", headers={"Origin": spoof}, json={"topic": "from.evil"})
        assert status == 403, spoof
    daemon.bus.publish("sentinel", {})
    await events.wait_for("sentinel")
    assert "from.evil" not in events.topics()
    assert "hook.github" not in events.topics()


async def test_loopback_and_listed_origins_are_allowed(start_daemon: Any, http: Any) -> None:
    allowed = "https://app.example.com"
    daemon, events = await start_daemon(overrides={"server": {"allowed_origins": [allowed]}})
    client = http(daemon)
    for origin in (f"http://127.0.0.1:{daemon.port}", "http://localhost:3000", "http://[::1]:8080",
                   allowed, allowed + "/"):
        status, body = await post(client, "/v1/events", headers={"Origin": origin},
                                  json={"topic": "ok.origin"})
        assert status == 202, (origin, body)
    async with client.get("/v1/stream", headers={"Origin": allowed}) as response:
        assert response.status == 200
        assert (await first_line(response)).startswith(b"retry: ")
    ws = await client.ws_connect("/v1/ws", origin=allowed)
    await ws.send_json({"id": 1, "type": "ping"})
    assert (await ws.receive_json(timeout=TIMEOUT))["type"] == "pong"
    await ws.close()
    for refused in ("http://app.example.com", "https://app.example.com:8443",
                    "https://app.example.com.evil.example"):
        status, _ = await post(client, "/v1/events", headers={"Origin": refused}, json={"topic": "no"})
        assert status == 403, refused
    assert events.topics().count("ok.origin") == 5


# --------------------------------------------------------------------------- OpenAPI


async def test_the_live_routes_are_documented(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN}})
    async with http(daemon).get("/v1/openapi.json") as response:
        assert response.status == 200  # public, even with a token
        document = await response.json()
    paths = document["paths"]
    expected = {
        "/v1/stream": "get", "/v1/tasks/{id}/stream": "get", "/v1/ws": "get",
        "/v1/events": "post", "/v1/stream-tokens": "post", "/hooks/{name}": "post",
    }
    for path, method in expected.items():
        assert path in paths, path
        operation = paths[path][method]
        assert operation["summary"], path
        assert operation["responses"], path
    assert paths["/hooks/{name}"]["post"]["security"] == []
    assert "security" not in paths["/v1/events"]["post"]
    assert "401" in paths["/hooks/{name}"]["post"]["responses"]
    stream_params = {p["name"] for p in paths["/v1/stream"]["get"]["parameters"]}
    assert {"topics", "since", "token"} <= stream_params
    task_params = {p["name"]: p["in"] for p in paths["/v1/tasks/{id}/stream"]["get"]["parameters"]}
    assert task_params["id"] == "path"
    body_schema = paths["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert document["components"]["schemas"][body_schema["$ref"].rsplit("/", 1)[1]]["required"] == ["topic"]


# These hold SQLite's one writer (`writer_held`) while a durable publish waits in its write;
# on PostgreSQL the log is in commit order (tests/test_cluster_events.py).
@pytest.mark.sqlite_only
async def test_a_durable_publish_whose_socket_closes_during_its_write_still_goes_out(
    start_daemon: Any, http: Any,
) -> None:
    """Found by review: a WebSocket's requests are cancelled when it closes, and a durable
    publish cancelled in its write gave its event up, though the store's thread went on to
    commit the row and the handlers' tasks: live subscribers (streams, plugin handlers)
    never got an event that was in the log and whose durable handlers ran."""
    daemon, _ = await start_daemon(overrides={"store": {"synchronous": "full"}})
    client = http(daemon)
    async with client.get("/v1/stream", params={"topics": "probe.*"}) as response:
        sse = Sse(response)
        await sse.opened()
        ws = await connect(daemon, http)
        async with writer_held(daemon):
            await ws.send({"type": "publish", "topic": "probe.durable"})
            async with asyncio.timeout(TIMEOUT):
                while daemon.bus.delivered_id == daemon.bus.last_id:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # noqa: sleep - a bounded poll: the publish reserves its id
            await ws.ws.close()
            sockets = daemon.server._runner.app[SOCKETS]
            async with asyncio.timeout(TIMEOUT):
                while sockets:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # noqa: sleep - a bounded poll: the socket's requests end
        await daemon.store.write(lambda conn: None)  # writes commit in order: the publish's is in
        after = daemon.bus.publish("probe.after", {})
        stored = await daemon.eventlog.replay(0, lambda e: e.topic == "probe.durable")
        assert len(stored) == 1
        first, second = await sse.next_event(timeout=TIMEOUT), await sse.next_event(timeout=TIMEOUT)
        assert [first.id, second.id] == [stored[0].id, after.id]


async def test_a_durable_publish_whose_row_cannot_be_made_holds_nothing_back(start_daemon: Any) -> None:
    """An event whose data cannot be encoded (a value that contains itself) fails its publish
    before the write; its reserved id must be given up, or every event after it is held back
    for good, and every stream with them."""
    daemon, events = await start_daemon()
    data: dict[str, Any] = {}
    data["self"] = data
    with pytest.raises(RecursionError):
        await daemon.publish_durably("probe.loop", data)
    after = daemon.bus.publish("probe.after", {})
    assert (await events.wait_for("probe.after", timeout=TIMEOUT)).id == after.id


@pytest.mark.sqlite_only
async def test_a_stream_opened_while_a_durable_publish_commits_resumes_before_it(
    start_daemon: Any, http: Any,
) -> None:
    """Found by review: a browser's stream opens with the id its reconnect resumes from, which
    was the newest id made: while a durable publish was in its log write, its event's id. A
    stream that opened then and reconnected before the event went out resumed after it, and
    never got it (nor could a WebSocket subscription's or a lagged stream's resume point)."""
    daemon, _ = await start_daemon(overrides={"store": {"synchronous": "full"}})
    client = http(daemon)
    browser = {"Sec-Fetch-Mode": "cors"}
    async with writer_held(daemon):  # the POST's log write waits: its id is taken
        posting = asyncio.ensure_future(post(client, "/v1/events", json={"topic": "probe.durable"}))
        await reserved(daemon)
        async with client.get("/v1/stream", params={"topics": "probe.*"}, headers=browser) as response:
            opening = await Sse(response, browser=True).frame()
            assert opening is not None and opening.comments == ["connected"]
    status, durable = await posting
    assert status == 202
    assert opening.id is not None
    headers = {**browser, "Last-Event-ID": str(opening.id)}
    async with client.get("/v1/stream", params={"topics": "probe.*"}, headers=headers) as response:
        sse = Sse(response, browser=True)
        await sse.frame()  # the opening block
        replayed = await sse.frame(timeout=TIMEOUT)
        assert replayed is not None and replayed.id == durable["id"]


@pytest.mark.sqlite_only
async def test_a_durable_publish_goes_out_before_the_events_made_while_it_commits(
    start_daemon: Any, http: Any,
) -> None:
    """Found by review: a durable publish took its id before its log write and went out after
    it, so events published meanwhile went out first with higher ids, and a stream that
    resumed after one of them never got it. Events now go out in the order of their ids."""
    daemon, _ = await start_daemon(overrides={"store": {"synchronous": "full"}})
    client = http(daemon)
    async with client.get("/v1/stream", params={"topics": "probe.*"}) as response:
        sse = Sse(response)
        assert (await sse.frame()).comments == ["connected"]
        async with writer_held(daemon):  # the POST's log write waits: its id is taken
            posting = asyncio.ensure_future(post(client, "/v1/events", json={"topic": "probe.durable"}))
            await reserved(daemon)
            live = daemon.bus.publish("probe.live", {})
        status, durable = await posting
        assert status == 202 and durable["id"] < live.id
        first, second = await sse.frame(timeout=TIMEOUT), await sse.frame(timeout=TIMEOUT)
        assert first is not None and second is not None
        assert [first.id, second.id] == [durable["id"], live.id]
