"""Outbound services against the real daemon and real peers: mail through an aiosmtpd SMTP
server, digests mailed from the event log, signed webhooks to an aiohttp receiver, and
the LLM (`ctx.llm`) against the FakeOpenAI server.

The SMTP server and the webhook receiver run on the test's own event loop (127.0.0.1,
OS-chosen ports) and record what they got; tests wait on their records, on task results
and on bus events, never on the clock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import hashlib
import hmac
import ipaddress
import json
import re
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session
from standardwebhooks import Webhook, WebhookVerificationError
from structlog.testing import capture_logs

from agentd.config import load_config
from agentd.errors import ConfigError, StoreFullError
from agentd.events import TopicFilter
from agentd.llm import ToolCallAssembler
from agentd.taskqueue import TaskRequest
from agentd.webhooks import refusal_reason
from fake_openai import FakeOpenAI
from sse_client import Sse

FAST_RETRIES = {"retry_base": 0.01, "retry_max": 0.05}
# The receivers of these tests listen on loopback, which webhooks may reach only if allowed.
LOOPBACK_ALLOWED = {"allow_networks": ["127.0.0.0/8", "::1"]}
SENDER = "agentd@example.org"
WAIT = 5.0


# --------------------------------------------------------------------------- helpers


async def until(predicate: Callable[[], bool], changed: asyncio.Event, timeout: float = WAIT) -> None:
    """Wait until `predicate()` holds, re-checking each time `changed` is set."""
    async with asyncio.timeout(timeout):
        while not predicate():
            changed.clear()
            await changed.wait()


async def call(client: aiohttp.ClientSession, method: str, path: str, body: Any = None, *,
               status: int = 200) -> Any:
    """One API call; asserts the status and returns the JSON body."""
    async with client.request(method, path, json=body) as response:
        text = await response.text()
        assert response.status == status, f"{method} {path}: {response.status} {text}"
        return json.loads(text) if text else None


def merged(*tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for table in tables:
        for section, values in table.items():
            out.setdefault(section, {}).update(values)
    return out


@dataclass
class Delivered:
    """One message the SMTP server accepted."""

    mail_from: str | None
    rcpt_tos: list[str]
    message: EmailMessage

    def part(self, subtype: str) -> str:
        body = self.message.get_body((subtype,))
        assert body is not None, f"no text/{subtype} part"
        return str(body.get_content())


@dataclass
class SmtpServer:
    """A real SMTP server (aiosmtpd) whose handler records envelopes and answers RCPT and
    DATA as scripted (a reply string refuses; None accepts)."""

    port: int = 0
    messages: list[Delivered] = field(default_factory=list)
    rcpt_attempts: list[str] = field(default_factory=list)
    rcpt_replies: deque[str | None] = field(default_factory=deque)
    data_replies: deque[str | None] = field(default_factory=deque)
    hold_data: asyncio.Event | None = None  # DATA waits for it (then clears it) when set
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
            self, server: SMTP, session: Session, envelope: Envelope, address: str,
            rcpt_options: list[str]) -> str:
        self.rcpt_attempts.append(address)
        self.changed.set()
        reply = self.rcpt_replies.popleft() if self.rcpt_replies else None
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
            self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.hold_data is not None:
            hold, self.hold_data = self.hold_data, None
            await hold.wait()
        reply = self.data_replies.popleft() if self.data_replies else None
        if reply is not None:
            return reply
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append(Delivered(envelope.mail_from, list(envelope.rcpt_tos), message))
        self.changed.set()
        return "250 Message accepted for delivery"

    async def wait_messages(self, count: int) -> list[Delivered]:
        await until(lambda: len(self.messages) >= count, self.changed)
        return self.messages

    def overrides(self) -> dict[str, dict[str, Any]]:
        return {"mail": {"host": "127.0.0.1", "port": self.port, "security": "none",
                         "sender": SENDER, "timeout": 5.0}}


@pytest.fixture
async def smtp() -> AsyncIterator[SmtpServer]:
    handler = SmtpServer()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="smtp.test"), "127.0.0.1", 0)
    handler.port = server.sockets[0].getsockname()[1]
    yield handler
    server.close()
    await server.wait_closed()


@dataclass
class Received:
    headers: dict[str, str]
    raw: bytes


@dataclass
class Receiver:
    """A webhook receiver: records each POST, answers with the scripted (status, headers)
    in order, then 200."""

    url: str = ""
    requests: list[Received] = field(default_factory=list)
    script: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received(dict(request.headers), await request.read()))
        self.changed.set()
        status, headers = self.script.popleft() if self.script else (200, {})
        return web.Response(status=status, headers=headers, text=f"answered {status}")

    async def wait_requests(self, count: int) -> list[Received]:
        await until(lambda: len(self.requests) >= count, self.changed)
        return self.requests


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    hook.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield hook
    await runner.cleanup()


@pytest.fixture
def ob_dir(copied_plugin: Any) -> Path:
    return copied_plugin("outbound_plugin.py", "ob")


@pytest.fixture
async def ob(start_daemon: Any, ob_dir: Path) -> Any:
    """`daemon, events, module = await ob(overrides, state_dir=None)`: the ob plugin loaded,
    retries fast."""

    async def start(overrides: dict[str, dict[str, Any]] | None = None,
                    state_dir: Path | None = None) -> tuple[Any, Any, ModuleType]:
        tables = merged({"tasks": FAST_RETRIES, "webhooks": LOOPBACK_ALLOWED}, overrides or {})
        daemon, events = await start_daemon(plugin_dirs=[ob_dir], overrides=tables, state_dir=state_dir)
        return daemon, events, sys.modules["agentd_plugins.ob"]

    return start


async def finished(daemon: Any, task_id: int) -> Any:
    return await daemon.queue.wait(task_id, timeout=WAIT)


async def tasks_named(daemon: Any, name: str) -> list[Any]:
    return list(await daemon.queue.list(name=name))


# --------------------------------------------------------------------------- mail


async def test_a_task_mails_sender_recipient_subject_parts_and_message_id(
        ob: Any, smtp: SmtpServer) -> None:
    daemon, _, _ = await ob(smtp.overrides())
    parent = await daemon.queue.enqueue("ob.mail", {
        "to": "Ann <ann@example.com>", "subject": "Rapport d'été", "text": "Plain body, déjà vu.",
        "html": "<p>HTML <b>body</b></p>"})
    mail_id = await daemon.queue.result(parent.id, timeout=WAIT)
    mail_task = await finished(daemon, mail_id)
    assert (mail_task.name, mail_task.status, mail_task.parent_id) == (
        "agentd.send_mail", "succeeded", parent.id)
    message_id = f"<agentd-task-{mail_id}@example.org>"
    assert mail_task.result == {"message_id": message_id, "to": ["Ann <ann@example.com>"], "refused": [],
                                "try_later": []}

    [delivered] = await smtp.wait_messages(1)
    assert delivered.mail_from == SENDER
    assert delivered.rcpt_tos == ["ann@example.com"]
    message = delivered.message
    assert message["From"] == SENDER
    assert message["To"] == "Ann <ann@example.com>"
    assert message["Subject"] == "Rapport d'été"
    assert message["Message-ID"] == message_id
    assert message.get_content_type() == "multipart/alternative"
    assert delivered.part("plain").strip() == "Plain body, déjà vu."
    assert delivered.part("html").strip() == "<p>HTML <b>body</b></p>"


async def test_a_sender_with_a_display_name_still_gives_a_well_formed_message_id(
        ob: Any, smtp: SmtpServer) -> None:
    daemon, _, _ = await ob(merged(smtp.overrides(), {"mail": {"sender": "Agentd Bot <bot@example.org>"}}))
    parent = await daemon.queue.enqueue("ob.mail", {"to": "ann@example.com", "subject": "s", "text": "t"})
    mail_id = await daemon.queue.result(parent.id, timeout=WAIT)
    [delivered] = await smtp.wait_messages(1)
    assert delivered.mail_from == "bot@example.org"
    assert delivered.message["From"] == "Agentd Bot <bot@example.org>"
    assert delivered.message["Message-ID"] == f"<agentd-task-{mail_id}@example.org>"


async def test_a_task_retried_after_sending_delivers_one_mail(ob: Any, smtp: SmtpServer) -> None:
    daemon, events, _ = await ob(smtp.overrides())
    parent = await daemon.queue.enqueue("ob.mail", {
        "to": ["ann@example.com", "bob@example.com"], "subject": "once", "text": "only once",
        "fail_first": True})
    mail_id = await daemon.queue.result(parent.id, timeout=WAIT)
    assert (await daemon.queue.get(parent.id)).attempts == 2
    await events.wait_for("task.retrying", task_id=parent.id)
    mails = await tasks_named(daemon, "agentd.send_mail")
    assert [t.id for t in mails] == [mail_id]
    assert (await finished(daemon, mail_id)).status == "succeeded"
    [delivered] = await smtp.wait_messages(1)
    assert delivered.rcpt_tos == ["ann@example.com", "bob@example.com"]
    assert delivered.message["Message-ID"] == f"<agentd-task-{mail_id}@example.org>"


async def test_a_bad_address_is_a_value_error_naming_to(ob: Any, smtp: SmtpServer) -> None:
    daemon, _, _ = await ob(smtp.overrides())
    for to in ("not-an-address", ["ann@example.com", "bob"], [], "evil@example.com\r\nBcc: x@y.z"):
        record = await daemon.queue.enqueue("ob.bad_mail", {"to": to})
        error = await daemon.queue.result(record.id, timeout=WAIT)
        assert error.startswith("ValueError: to: "), (to, error)
    assert await tasks_named(daemon, "agentd.send_mail") == []
    assert smtp.rcpt_attempts == []


async def test_without_a_mail_host_the_task_fails_saying_to_set_it(ob: Any) -> None:
    daemon, _, _ = await ob()
    record = await daemon.queue.enqueue("ob.mail", {"to": "ann@example.com", "subject": "s", "text": "t"})
    final = await finished(daemon, record.id)
    assert (final.status, final.attempts) == ("failed", 1)
    assert final.error.startswith("MailUnavailableError: ")
    assert "set [mail] host" in final.error
    assert await tasks_named(daemon, "agentd.send_mail") == []


async def test_a_5xx_refusal_fails_the_mail_task_without_retry(ob: Any, smtp: SmtpServer) -> None:
    daemon, _, _ = await ob(smtp.overrides())
    smtp.rcpt_replies.append("550 no such user")
    parent = await daemon.queue.enqueue("ob.mail", {"to": "nobody@example.com", "subject": "s", "text": "t"})
    mail_id = await daemon.queue.result(parent.id, timeout=WAIT)
    final = await finished(daemon, mail_id)
    assert (final.status, final.attempts) == ("failed", 1)
    assert "550" in final.error and "no such user" in final.error
    assert smtp.rcpt_attempts == ["nobody@example.com"]
    assert smtp.messages == []


async def test_a_4xx_answer_to_data_is_retried_and_delivered_once(ob: Any, smtp: SmtpServer) -> None:
    daemon, events, _ = await ob(smtp.overrides())
    smtp.data_replies.append("451 try later")
    parent = await daemon.queue.enqueue("ob.mail", {"to": "ann@example.com", "subject": "s", "text": "t"})
    mail_id = await daemon.queue.result(parent.id, timeout=WAIT)
    final = await finished(daemon, mail_id)
    assert (final.status, final.attempts) == ("succeeded", 2)
    retry = await events.wait_for("task.retrying", task_id=mail_id)
    assert "451" in retry.data["error"]
    assert len(await smtp.wait_messages(1)) == 1
    assert smtp.rcpt_attempts == ["ann@example.com", "ann@example.com"]


async def test_a_4xx_refusal_of_the_recipient_is_retried_and_delivered_once(
        ob: Any, smtp: SmtpServer) -> None:
    """451 is "try again later" whichever command it answers: RCPT included."""
    daemon, _, _ = await ob(smtp.overrides())
    smtp.rcpt_replies.append("451 try later")
    parent = await daemon.queue.enqueue("ob.mail", {"to": "ann@example.com", "subject": "s", "text": "t"})
    mail_id = await daemon.queue.result(parent.id, timeout=WAIT)
    final = await finished(daemon, mail_id)
    assert (final.status, final.attempts, final.error) == ("succeeded", 2, None), final.error
    assert len(await smtp.wait_messages(1)) == 1


async def test_recipients_refused_for_now_get_the_mail_later_the_others_once(
        ob: Any, smtp: SmtpServer) -> None:
    """Some recipients accepted, one refused with 451: aiosmtplib does not raise, so the mail
    task sends the one that was refused again as a child task; nobody gets it twice."""
    daemon, _, _ = await ob(smtp.overrides())
    smtp.rcpt_replies.extend([None, "451 try later"])  # ann accepted, bob "later"
    parent = await daemon.queue.enqueue(
        "ob.mail", {"to": ["ann@example.com", "bob@example.com"], "subject": "s", "text": "t"})
    mail_id = await daemon.queue.result(parent.id, timeout=WAIT)
    first = await finished(daemon, mail_id)
    assert (first.status, first.result["try_later"], first.result["refused"]) == (
        "succeeded", ["bob@example.com"], [])
    retry = await finished(daemon, first.result["retry_task_id"])
    assert (retry.status, retry.parent_id, retry.args["to"]) == ("succeeded", mail_id, ["bob@example.com"])
    delivered = await smtp.wait_messages(2)
    assert [d.rcpt_tos for d in delivered] == [["ann@example.com"], ["bob@example.com"]]


# --------------------------------------------------------------------------- digests


def digest(**table: Any) -> dict[str, dict[str, Any]]:
    return {"digests": {"news": {"pattern": "news.new", "to": ["me@example.com"],
                                 "subject": "What agentd found", **table}}}


def digest_lines(delivered: Delivered) -> list[dict[str, Any]]:
    """The data of each event a digest mail lists (one line per event, JSON last)."""
    lines = delivered.part("plain").strip().splitlines()
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ  news\.new  \{", line), line
    return [json.loads(line.split("  ", 2)[2]) for line in lines]


async def test_a_count_digest_mails_what_gathered_after_it_started(
        start_daemon: Any, smtp: SmtpServer, tmp_path: Path, http: Any) -> None:
    state = tmp_path / "state"
    before, _ = await start_daemon(state_dir=state, overrides=merged({"tasks": FAST_RETRIES},
                                                                     smtp.overrides()))
    for n in (1, 2):
        before.bus.publish("news.new", {"n": n, "when": "before the digest"})
    await before.stop()

    daemon, events = await start_daemon(state_dir=state, overrides=merged(
        {"tasks": FAST_RETRIES}, smtp.overrides(), digest(count=3)))
    # At start the digest checks the log for events gathered before a restart: none are its.
    started = await events.wait_for("task.succeeded", name="agentd.send_digest")
    assert (await daemon.queue.get(started.data["task_id"])).result == {"sent": 0, "pending": 0}

    client = http(daemon)
    daemon.bus.publish("news.other", {"n": 0})
    ids = [(await call(client, "POST", "/v1/events", {"topic": "news.new", "data": {"n": n}},
                       status=202))["id"] for n in (3, 4, 5)]
    [delivered] = await smtp.wait_messages(1)
    assert delivered.rcpt_tos == ["me@example.com"]
    assert delivered.message["Subject"] == "What agentd found (3 events)"
    assert digest_lines(delivered) == [{"n": 3}, {"n": 4}, {"n": 5}]
    assert delivered.message["Message-ID"] == f"<agentd-digest-news-{ids[0]}-{ids[2]}@example.org>"
    [sent] = [t for t in await tasks_named(daemon, "agentd.send_digest") if t.id != started.data["task_id"]]
    assert (await finished(daemon, sent.id)).result == {
        "sent": 3, "first_event_id": ids[0], "last_event_id": ids[2]}
    # Two more are not yet a digest: the next mail comes with the third, and lists all three.
    for n in (6, 7, 8):
        daemon.bus.publish("news.new", {"n": n})
    assert digest_lines((await smtp.wait_messages(2))[1]) == [{"n": 6}, {"n": 7}, {"n": 8}]
    sends = await tasks_named(daemon, "agentd.send_digest")
    assert len(sends) == 3
    for task in sends:
        await finished(daemon, task.id)
    assert len(smtp.messages) == 2


async def test_a_digest_send_matches_with_the_pattern_parsed_at_load(
        start_daemon: Any, smtp: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: each send parsed the digest's pattern again; the spec carries it
    parsed (a parse now fails, and the send does not notice)."""
    daemon, _ = await start_daemon(overrides=merged(
        {"tasks": FAST_RETRIES}, smtp.overrides(), digest(every="1h", pattern="news.new, alerts.*")))

    def no_parsing(*_: Any) -> Any:
        raise AssertionError("a pattern parsed after the configuration was loaded")

    monkeypatch.setattr(TopicFilter, "parse", no_parsing)
    daemon.bus.publish("news.new", {"n": 1})
    daemon.bus.publish("other.new", {"n": 99})
    spec = daemon.digests.specs["news"]
    assert spec.pattern == "news.new,alerts.*"
    assert (await daemon.digests.send(spec))["sent"] == 1
    [delivered] = await smtp.wait_messages(1)
    assert digest_lines(delivered) == [{"n": 1}]


async def test_a_digest_cut_short_by_a_crash_mails_the_same_range_again(
        start_daemon: Any, smtp: SmtpServer, http: Any) -> None:
    """A send records its range before mailing. Left as a crash after the mail would leave
    it (range recorded, cursor not moved), the next send mails that same range with the
    same Message-ID (so the receiver can drop the repeat), not the events that came since;
    those go in the send after."""
    daemon, _ = await start_daemon(overrides=merged(
        {"tasks": FAST_RETRIES}, smtp.overrides(), digest(every="1h")))
    client = http(daemon)
    early = [daemon.bus.publish("news.new", {"n": n}) for n in (1, 2)]
    await daemon.eventlog.flush()
    await daemon.store.write(lambda conn: conn.execute(
        "UPDATE digest_cursors SET pending_last_id = ? WHERE name = 'news'", (early[-1].id,)))
    late = daemon.bus.publish("news.new", {"n": 3})

    async def run() -> Any:
        fired = await call(client, "POST", "/v1/schedules/agentd.digest.news/run")
        return await daemon.queue.result(fired["last_task_id"], timeout=WAIT)

    assert await run() == {"sent": 2, "first_event_id": early[0].id, "last_event_id": early[-1].id}
    assert await run() == {"sent": 1, "first_event_id": late.id, "last_event_id": late.id}
    first, second = await smtp.wait_messages(2)
    assert digest_lines(first) == [{"n": 1}, {"n": 2}] and digest_lines(second) == [{"n": 3}]
    assert first.message["Message-ID"] == f"<agentd-digest-news-{early[0].id}-{early[-1].id}@example.org>"


async def test_a_digest_recipient_refused_for_now_gets_it_from_a_mail_task(
        start_daemon: Any, smtp: SmtpServer, http: Any) -> None:
    daemon, _ = await start_daemon(overrides=merged(
        {"tasks": FAST_RETRIES}, smtp.overrides(),
        digest(every="1h", to=["me@example.com", "later@example.com"])))
    client = http(daemon)
    daemon.bus.publish("news.new", {"n": 1})
    smtp.rcpt_replies.extend([None, "451 try later"])
    fired = await call(client, "POST", "/v1/schedules/agentd.digest.news/run")
    assert (await daemon.queue.result(fired["last_task_id"], timeout=WAIT))["sent"] == 1
    [retry] = await tasks_named(daemon, "agentd.send_mail")
    assert (await finished(daemon, retry.id)).status == "succeeded"
    first, second = await smtp.wait_messages(2)
    assert (first.rcpt_tos, second.rcpt_tos) == (["me@example.com"], ["later@example.com"])
    assert digest_lines(second) == [{"n": 1}]


async def test_an_every_digest_is_a_schedule_whose_run_mails_pending_events_once(
        start_daemon: Any, smtp: SmtpServer, http: Any) -> None:
    daemon, _ = await start_daemon(overrides=merged(
        {"tasks": FAST_RETRIES}, smtp.overrides(), digest(every="1h", limit=2)))
    client = http(daemon)
    schedules = {s["id"]: s for s in (await call(client, "GET", "/v1/schedules"))["schedules"]}
    schedule = schedules["agentd.digest.news"]
    assert (schedule["task"], schedule["args"], schedule["every"]) == (
        "agentd.send_digest", {"digest": "news"}, 3600.0)

    async def run() -> Any:
        fired = await call(client, "POST", "/v1/schedules/agentd.digest.news/run")
        return await daemon.queue.result(fired["last_task_id"], timeout=WAIT)

    for n in (1, 2, 3):
        daemon.bus.publish("news.new", {"n": n})
    daemon.bus.publish("other.new", {"n": 99})
    first = await run()
    assert first["sent"] == 2  # limit = 2 per mail
    [delivered] = await smtp.wait_messages(1)
    assert digest_lines(delivered) == [{"n": 1}, {"n": 2}]
    assert (await run())["sent"] == 1
    assert digest_lines((await smtp.wait_messages(2))[1]) == [{"n": 3}]
    assert await run() == {"sent": 0, "pending": 0}
    assert len(smtp.messages) == 2
    assert len(smtp.rcpt_attempts) == 2


async def test_digest_sends_that_overlap_mail_each_event_once(
        start_daemon: Any, smtp: SmtpServer) -> None:
    """A burst of events triggers a second send while the first is still in SMTP: the two
    mails must not list the same events (nor carry the same Message-ID for different
    contents, which lets the receiving system drop the second)."""
    daemon, events = await start_daemon(overrides=merged(
        {"tasks": FAST_RETRIES}, smtp.overrides(), digest(count=2)))
    await events.wait_for("task.succeeded", name="agentd.send_digest")  # the check at start
    hold = asyncio.Event()
    smtp.hold_data = hold
    for n in (1, 2):
        daemon.bus.publish("news.new", {"n": n})
    await until(lambda: len(smtp.rcpt_attempts) == 1, smtp.changed)  # the first send is in DATA
    for n in (3, 4):
        daemon.bus.publish("news.new", {"n": n})
    # Release the first DATA when a second send reaches the server, or after 1 s if a
    # correct daemon keeps the second send from starting while the first is out.
    with contextlib.suppress(TimeoutError):
        await until(lambda: len(smtp.rcpt_attempts) == 2, smtp.changed, timeout=1.0)
    hold.set()
    sends = await tasks_named(daemon, "agentd.send_digest")
    for task in sends:
        assert (await finished(daemon, task.id)).status == "succeeded"
    await until(lambda: sum(len(digest_lines(m)) for m in smtp.messages) >= 4, smtp.changed)
    mailed = [line["n"] for m in smtp.messages for line in digest_lines(m)]
    assert sorted(mailed) == [1, 2, 3, 4], f"events mailed: {mailed}"
    message_ids = [m.message["Message-ID"] for m in smtp.messages]
    assert len(set(message_ids)) == len(message_ids), message_ids


async def test_a_digest_of_ephemeral_events_refuses_to_start(start_daemon: Any, smtp: SmtpServer) -> None:
    with pytest.raises(ConfigError, match=r"\[digests\.tokens\] pattern 'x\.token'.*ephemeral"):
        await start_daemon(overrides=merged(smtp.overrides(), {"digests": {"tokens": {
            "pattern": "x.token", "to": "me@example.com", "count": 5}}}))


@pytest.mark.parametrize(("table", "message"), [
    ({"pattern": "news.new", "to": "me@example.com"}, r"give every .* or count"),
    ({"pattern": "news.new", "to": "not an address", "count": 3}, r"to: 'not an address'"),
    ({"pattern": "news.new", "count": 3}, r"to: give at least one address"),
    ({"pattern": "news.new", "to": "me@example.com", "count": 0}, r"count: expected a whole number"),
    ({"pattern": "news.new", "to": "me@example.com", "every": "soon"}, r"every: 'soon' is not a duration"),
    ({"pattern": "news.new", "to": "me@example.com", "count": 3, "cc": "x"}, r"unknown key 'cc'"),
    ({"to": "me@example.com", "count": 3}, r"pattern: expected a topic pattern"),
])
def test_bad_digest_tables_are_config_errors_naming_the_digest_and_key(
        table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=r"\[digests\.news\] " + message):
        load_config(None, env={}, overrides={"digests": {"news": table}})


# --------------------------------------------------------------------------- webhooks


async def test_a_task_posts_a_signed_webhook_with_the_exact_body(ob: Any, receiver: Receiver) -> None:
    daemon, _, _ = await ob({"webhooks": {"secret": "s3cret"}})
    body = {"a": 1, "text": "héllo", "list": [1, 2]}
    parent = await daemon.queue.enqueue("ob.post", {"url": receiver.url, "body": body})
    hook_id = await daemon.queue.result(parent.id, timeout=WAIT)
    final = await finished(daemon, hook_id)
    assert (final.name, final.status, final.parent_id) == ("agentd.post_webhook", "succeeded", parent.id)
    assert final.result == {"status": 200, "url": receiver.url}
    [got] = await receiver.wait_requests(1)
    assert json.loads(got.raw) == body
    assert got.headers["Content-Type"] == "application/json"
    expected = "sha256=" + hmac.new(b"s3cret", got.raw, hashlib.sha256).hexdigest()
    assert got.headers["X-Agentd-Signature"] == expected
    assert got.headers["X-Agentd-Delivery"] == str(hook_id)
    assert got.headers["Idempotency-Key"] == f"agentd-webhook-{hook_id}"
    webhook_id, stamp = got.headers["webhook-id"], got.headers["webhook-timestamp"]
    assert re.fullmatch(r"msg_[0-9a-f]{32}", webhook_id)
    assert abs(int(stamp) - time.time()) < WAIT
    mac = hmac.new(b"s3cret", f"{webhook_id}.{stamp}.".encode() + got.raw, hashlib.sha256).digest()
    assert got.headers["webhook-signature"] == "v1," + base64.b64encode(mac).decode()


async def test_the_reference_library_verifies_a_webhook_signed_with_a_whsec_secret(
    ob: Any, receiver: Receiver,
) -> None:
    secret = "whsec_" + base64.b64encode(b"a key of 24 random bytes").decode()
    daemon, _, _ = await ob({"webhooks": {"secret": secret}})
    parent = await daemon.queue.enqueue("ob.post", {"url": receiver.url, "body": {"é": [1]}})
    await finished(daemon, await daemon.queue.result(parent.id, timeout=WAIT))
    [got] = await receiver.wait_requests(1)
    assert Webhook(secret).verify(got.raw, got.headers) == {"é": [1]}
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"another key").decode()).verify(got.raw, got.headers)


async def test_a_webhook_from_one_daemon_is_taken_by_the_hook_of_another(
    ob: Any, start_daemon: Any, tmp_path: Path,
) -> None:
    peer, peer_events = await start_daemon(overrides={"hooks": {"peer": {"secret": "shared"}}},
                                           state_dir=tmp_path / "peer")
    daemon, _, _ = await ob({"webhooks": {"secret": "shared"}})
    url = f"http://127.0.0.1:{peer.port}/hooks/peer"
    parent = await daemon.queue.enqueue("ob.post", {"url": url, "body": {"n": 1}})
    final = await finished(daemon, await daemon.queue.result(parent.id, timeout=WAIT))
    assert (final.status, final.result) == ("succeeded", {"status": 202, "url": url})
    assert (await peer_events.wait_for("hook.peer")).data["body"] == {"n": 1}


async def test_without_a_secret_a_webhook_is_not_signed(ob: Any, receiver: Receiver) -> None:
    daemon, _, _ = await ob()
    parent = await daemon.queue.enqueue("ob.post", {"url": receiver.url, "body": [1, None]})
    await finished(daemon, await daemon.queue.result(parent.id, timeout=WAIT))
    [got] = await receiver.wait_requests(1)
    assert got.raw == b"[1,null]"
    assert "X-Agentd-Signature" not in got.headers
    assert "webhook-signature" not in got.headers
    assert got.headers["webhook-id"]  # receivers still drop repeats by it


async def test_a_5xx_is_retried_with_the_same_delivery_headers(ob: Any, receiver: Receiver) -> None:
    daemon, events, _ = await ob({"webhooks": {"secret": "s3cret"}})
    receiver.script.append((500, {}))
    parent = await daemon.queue.enqueue("ob.post", {"url": receiver.url, "body": {"a": 1}})
    hook_id = await daemon.queue.result(parent.id, timeout=WAIT)
    final = await finished(daemon, hook_id)
    assert (final.status, final.attempts) == ("succeeded", 2)
    assert "answered 500" in (await events.wait_for("task.retrying", task_id=hook_id)).data["error"]
    first, second = await receiver.wait_requests(2)
    assert len(receiver.requests) == 2
    assert first.raw == second.raw == b'{"a":1}'
    for name in ("X-Agentd-Delivery", "Idempotency-Key", "X-Agentd-Signature", "webhook-id"):
        assert first.headers[name] == second.headers[name], name
    assert first.headers["X-Agentd-Delivery"] == str(hook_id)


async def test_a_429_with_retry_after_is_retried(ob: Any, receiver: Receiver) -> None:
    daemon, events, _ = await ob()
    receiver.script.append((429, {"Retry-After": "0"}))
    parent = await daemon.queue.enqueue("ob.post", {"url": receiver.url, "body": {"a": 1}})
    hook_id = await daemon.queue.result(parent.id, timeout=WAIT)
    final = await finished(daemon, hook_id)
    assert (final.status, final.attempts) == ("succeeded", 2)
    retry = await events.wait_for("task.retrying", task_id=hook_id)
    assert retry.data["delay"] == 0
    assert len(await receiver.wait_requests(2)) == 2


async def test_a_404_fails_the_webhook_without_retry(ob: Any, receiver: Receiver) -> None:
    daemon, _, _ = await ob()
    receiver.script.append((404, {}))
    parent = await daemon.queue.enqueue("ob.post", {"url": receiver.url, "body": {"a": 1}})
    hook_id = await daemon.queue.result(parent.id, timeout=WAIT)
    final = await finished(daemon, hook_id)
    assert (final.status, final.attempts) == ("failed", 1)
    assert final.error == f"Fail: {receiver.url} answered 404: answered 404"
    assert len(receiver.requests) == 1


async def test_a_task_retried_after_posting_posts_once(ob: Any, receiver: Receiver) -> None:
    daemon, _, _ = await ob()
    parent = await daemon.queue.enqueue("ob.post", {"url": receiver.url, "body": {"a": 1},
                                                    "fail_first": True})
    hook_id = await daemon.queue.result(parent.id, timeout=WAIT)
    assert (await daemon.queue.get(parent.id)).attempts == 2
    assert [t.id for t in await tasks_named(daemon, "agentd.post_webhook")] == [hook_id]
    assert (await finished(daemon, hook_id)).status == "succeeded"
    assert len(await receiver.wait_requests(1)) == 1


@pytest.mark.parametrize("url", ["ftp://x", "/relative/path", "http://", "localhost:8080/hook",
                                 "http://[::1/hook", "http://example.test:99999/hook"])
async def test_a_bad_url_is_a_value_error_naming_url(ob: Any, url: str) -> None:
    daemon, _, _ = await ob()
    record = await daemon.queue.enqueue("ob.bad_post", {"url": url})
    error = await daemon.queue.result(record.id, timeout=WAIT)
    assert error == f"ValueError: url: expected an absolute http:// or https:// URL, got {url!r}"
    assert await tasks_named(daemon, "agentd.post_webhook") == []


async def test_a_handler_posts_once_per_event_with_its_key(ob: Any, receiver: Receiver) -> None:
    daemon, _, module = await ob({"plugins": {"ob": {"url": receiver.url}}})
    published = [daemon.bus.publish("ob.ping", {"n": n}).id for n in (1, 2)]
    await until(lambda: len(module.POSTED) == 2, module.CHANGED)
    by_event = {event_id: (first, second) for event_id, first, second in module.POSTED}
    assert sorted(by_event) == sorted(published)
    for first, second in by_event.values():
        assert first == second  # the same key gave the same delivery task
        assert (await finished(daemon, first)).status == "succeeded"
    assert len(await tasks_named(daemon, "agentd.post_webhook")) == 2
    got = await receiver.wait_requests(2)
    assert sorted(json.loads(r.raw)["event_id"] for r in got) == sorted(published)
    assert len(receiver.requests) == 2


@dataclass
class Listener:
    """A TCP listener on loopback that only counts the connections it is offered."""

    port: int = 0
    connections: int = 0


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    counted = Listener()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted.connections += 1
        writer.close()

    server = await asyncio.start_server(connected, "127.0.0.1", 0)
    counted.port = server.sockets[0].getsockname()[1]
    yield counted
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(("host", "refused"), [
    ("127.0.0.1", "127.0.0.1, a loopback address"),
    ("localhost", "localhost resolves to 127.0.0.1, a loopback address"),
    ("0.0.0.0", "0.0.0.0, an unspecified address"),
    ("[::ffff:127.0.0.1]", "::ffff:7f00:1 (that is 127.0.0.1), a loopback address"),
    ("169.254.169.254", "169.254.169.254, a cloud metadata address"),
])
async def test_by_default_a_webhook_to_a_local_address_fails_at_once_without_connecting(
    ob: Any, listener: Listener, host: str, refused: str,
) -> None:
    daemon, _, _ = await ob({"webhooks": {"allow_networks": []}})
    url = f"http://{host}:{listener.port}/hook"
    with capture_logs() as logs:
        parent = await daemon.queue.enqueue("ob.post", {"url": url, "body": {"a": 1}})
        final = await finished(daemon, await daemon.queue.result(parent.id, timeout=WAIT))
    assert (final.status, final.attempts) == ("failed", 1)
    assert refused in final.error
    assert "[webhooks] allow_networks" in final.error
    assert [log["url"] for log in logs if log["event"] == "webhook.refused"] == [url]
    assert listener.connections == 0


async def test_an_allowed_network_lets_a_webhook_through(ob: Any, receiver: Receiver) -> None:
    daemon, _, _ = await ob({"webhooks": {"allow_networks": ["127.0.0.1"]}})
    url = receiver.url.replace("127.0.0.1", "localhost")
    parent = await daemon.queue.enqueue("ob.post", {"url": url, "body": {"a": 1}})
    assert (await finished(daemon, await daemon.queue.result(parent.id, timeout=WAIT))).status == "succeeded"
    assert len(await receiver.wait_requests(1)) == 1


async def test_a_redirect_is_not_followed_and_fails_the_webhook(
    ob: Any, receiver: Receiver, listener: Listener,
) -> None:
    daemon, _, _ = await ob()
    receiver.script.append((307, {"Location": f"http://127.0.0.1:{listener.port}/elsewhere"}))
    parent = await daemon.queue.enqueue("ob.post", {"url": receiver.url, "body": {"a": 1}})
    final = await finished(daemon, await daemon.queue.result(parent.id, timeout=WAIT))
    assert (final.status, final.attempts) == ("failed", 1)
    assert "answered 307" in final.error
    assert listener.connections == 0


@pytest.mark.parametrize("url", ["http://127.1/hook", "http://a..b/hook"])
async def test_a_url_no_connection_can_be_made_to_fails_the_webhook_at_once(ob: Any, url: str) -> None:
    """Found by review: URLs that pass check_url but that aiohttp refuses to connect to (an
    IPv4 address in a short form, a host with an empty label) were retried to the last
    attempt, the same refusal each time."""
    daemon, _, _ = await ob()
    parent = await daemon.queue.enqueue("ob.post", {"url": url, "body": {"a": 1}})
    final = await finished(daemon, await daemon.queue.result(parent.id, timeout=WAIT))
    assert (final.status, final.attempts) == ("failed", 1), final.error
    assert final.error.startswith(f"Fail: {url}: not a URL a webhook can be posted to: ")


async def test_a_refusal_with_an_endless_or_undecodable_body_fails_the_webhook_at_once(
        ob: Any) -> None:
    """Found by review: the whole body of a refusing answer was read, then decoded strictly,
    to keep 300 characters of it. An endless body held the delivery until the timeout (in
    memory all along) and bytes not in the named charset raised UnicodeDecodeError: either
    way a 400 was retried instead of failing the task."""
    released = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=400)
        await response.prepare(request)
        await response.write(b"x" * 65536)
        await released.wait()  # never more, and never the end, until the test is over
        return response

    async def undecodable(request: web.Request) -> web.Response:
        return web.Response(status=400, body=b"\xff\xfe not utf-8", content_type="text/plain",
                            charset="utf-8")

    app = web.Application()
    app.router.add_post("/endless", endless)
    app.router.add_post("/undecodable", undecodable)
    runner = web.AppRunner(app, shutdown_timeout=0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        daemon, _, _ = await ob({"webhooks": {"timeout": 30}})
        for path, start in (("/endless", "x" * 300), ("/undecodable", "\ufffd\ufffd not utf-8")):
            parent = await daemon.queue.enqueue("ob.post", {"url": base + path, "body": {"a": 1}})
            final = await finished(daemon, await daemon.queue.result(parent.id, timeout=WAIT))
            assert (final.status, final.attempts) == ("failed", 1), (path, final.error)
            assert final.error == f"Fail: {base}{path} answered 400: {start}"
    finally:
        released.set()
        await runner.cleanup()


@pytest.mark.parametrize(("address", "reason"), [
    ("10.1.2.3", "private"), ("172.31.255.1", "private"), ("192.168.0.1", "private"),
    ("100.64.0.1", "shared (CGNAT)"), ("100.100.100.200", "cloud metadata"),
    ("169.254.0.9", "link-local"), ("168.63.129.16", "cloud metadata"), ("224.0.0.251", "multicast"),
    ("255.255.255.255", "reserved"), ("0.1.2.3", "unspecified"), ("198.18.0.1", "benchmarking"),
    ("::", "unspecified"), ("::1", "loopback"), ("fd00:ec2::254", "cloud metadata"),
    ("fc00::1", "private (unique local)"), ("fe80::1", "link-local"), ("ff02::1", "multicast"),
    ("::ffff:10.0.0.1", "private"), ("64:ff9b::a9fe:a9fe", "cloud metadata"),
    ("2002:c0a8:1::", "private"), ("::127.0.0.1", "reserved"), ("2001:db8::1", "documentation"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:1.1.1.1", None),
])
def test_addresses_webhooks_may_not_reach_are_named(address: str, reason: str | None) -> None:
    assert refusal_reason(ipaddress.ip_address(address)) == reason


def test_allow_networks_must_be_addresses_or_networks() -> None:
    with pytest.raises(ConfigError, match=r"\[webhooks\] allow_networks: 'intranet' is not an IP"):
        load_config(None, env={}, overrides={"webhooks": {"allow_networks": ["10.0.0.0/8", "intranet"]}})


# --------------------------------------------------------------------------- LLM


def llm_config(llm: FakeOpenAI, **extra: Any) -> dict[str, dict[str, Any]]:
    return {"llm": {"base_url": llm.url, "model": "test-model", **extra}}


async def test_a_chat_streams_its_tokens_to_the_task_stream_and_returns_the_reply(
        ob: Any, http: Any) -> None:
    reply = "Hello brave new world"
    async with FakeOpenAI() as llm:
        daemon, _, module = await ob(llm_config(llm))
        llm.reply(reply)
        record = await daemon.queue.enqueue("ob.chat", {"wait": "go"})
        async with http(daemon).get(f"/v1/tasks/{record.id}/stream") as response:
            assert response.status == 200
            sse = Sse(response)
            assert "connected" in (await sse.opened()).comments
            module.gate("go").set()
            frames = [(f.event, f.data) for f in await sse.until("end")]
        result = await daemon.queue.result(record.id, timeout=WAIT)
        assert result["content"] == reply
        assert result["finish_reason"] == "stop"
        assert result["model"] == "test-model"
        [request] = llm.requests
        assert request["model"] == "test-model"
        assert request["messages"] == [{"role": "user", "content": "hi"}]
        assert request["stream"] is True

    topics = [name for name, _ in frames]
    tokens = [data["data"]["text"] for name, data in frames if name == "task.token"]
    assert "".join(tokens) == reply
    assert all(data["data"]["task_id"] == record.id for name, data in frames if name == "task.token")
    last_token = max(i for i, name in enumerate(topics) if name == "task.token")
    assert topics.index("task.succeeded") > last_token
    assert topics[-2:] == ["task.succeeded", "end"]
    assert frames[-1][1]["task"]["usage"] == {"prompt_tokens": 10, "completion_tokens": 4,
                                              "total_tokens": 14, "calls": 1}


async def test_usage_is_summed_over_the_calls_of_a_task(ob: Any, http: Any) -> None:
    async with FakeOpenAI() as llm:
        daemon, _, _ = await ob(llm_config(llm))
        llm.reply("Hello brave new world")
        llm.reply("ok then", usage={"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})
        record = await daemon.queue.enqueue("ob.chat", {"calls": 2})
        result = await daemon.queue.result(record.id, timeout=WAIT)
        assert result["contents"] == ["Hello brave new world", "ok then"]
        assert len(llm.requests) == 2
    task = await call(http(daemon), "GET", f"/v1/tasks/{record.id}")
    assert task["usage"] == {"prompt_tokens": 17, "completion_tokens": 6, "total_tokens": 23, "calls": 2}


def weather_call(call_id: str, city: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


TOOL_DELTAS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {
    "openai_index_then_fragments": ([
        {"index": 0, "id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 1, "id": "call_b", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '"Paris"}'}},
        {"index": 1, "function": {"arguments": '{"city": "Oslo"}'}},
    ], [weather_call("call_a", "Paris"), weather_call("call_b", "Oslo")]),
    "ollama_whole_calls_without_index_or_id": ([
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
    ], [weather_call("call_0", "Paris"), weather_call("call_1", "Oslo")]),
    "index_0_repeated_with_new_ids": ([
        {"index": 0, "id": "call_a", "function": {"name": "get_weather", "arguments": '{"city"'}},
        {"index": 0, "function": {"arguments": ': "Paris"}'}},
        {"index": 0, "id": "call_b", "function": {"name": "get_weather", "arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Oslo"}'}},
    ], [weather_call("call_a", "Paris"), weather_call("call_b", "Oslo")]),
    "proxy_repeating_the_name": ([
        {"index": 0, "id": "call_a", "function": {"name": "get_weather", "arguments": '{"ci'}},
        {"index": 0, "id": "call_a", "function": {"name": "get_weather", "arguments": 'ty": "Par'}},
        {"index": 0, "id": "call_a", "function": {"name": "get_weather", "arguments": 'is"}'}},
    ], [weather_call("call_a", "Paris")]),
}


@pytest.mark.parametrize("shape", list(TOOL_DELTAS))
def test_tool_call_deltas_are_assembled_however_the_server_numbers_them(shape: str) -> None:
    deltas, expected = TOOL_DELTAS[shape]
    assembler = ToolCallAssembler()
    for delta in deltas:
        assembler.add(delta)
    calls = assembler.result()
    # Arguments are compared as JSON: Ollama's object is re-serialised.
    assert [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in calls] == [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in expected]
    assert all(isinstance(c["function"]["arguments"], str) for c in calls)


async def test_agents_on_the_default_queue_stream_more_chats_at_once_than_a_connection_pool_holds(
        ob: Any) -> None:
    """150 agents, with agentd's default queues and [llm] connection limit: every chat is
    open at the server before any of them ends (8 slots, or aiohttp's pool of 100, held
    the rest back until one ended)."""
    agents = 150
    async with FakeOpenAI() as llm:
        daemon, _, _ = await ob(llm_config(llm))
        assert daemon.config.tasks.queues == {"default": 1000}  # the defaults, not the test's
        release = asyncio.Event()
        for _ in range(agents):
            llm.reply("one two", hold=release)  # streams "one ", then holds until released
        records = await daemon.queue.enqueue_many([TaskRequest("ob.chat")] * agents)
        await llm.wait_requests(agents, timeout=WAIT)
        release.set()
        results = [await daemon.queue.result(r.task.id, timeout=WAIT) for r in records]
    assert [r["content"] for r in results] == ["one two"] * agents


async def test_tool_calls_stream_end_to_end_through_ctx_llm(ob: Any) -> None:
    deltas, expected = TOOL_DELTAS["openai_index_then_fragments"]
    async with FakeOpenAI() as llm:
        daemon, _, _ = await ob(llm_config(llm))
        llm.chunks([{"role": "assistant", "content": None, "tool_calls": [d]} for d in deltas])
        record = await daemon.queue.enqueue("ob.use_tools")
        result = await daemon.queue.result(record.id, timeout=WAIT)
        [request] = llm.requests
        assert request["tools"][0]["function"]["name"] == "get_weather"
    assert result["tool_calls"] == expected
    assert (result["content"], result["finish_reason"]) == ("", "tool_calls")


def chunk_line(delta: dict[str, Any], finish: str | None = None) -> bytes:
    chunk = {"id": "c", "model": "cut-model",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return json.dumps(chunk, ensure_ascii=False).encode()


# A body as servers send them: comments, an event name, CRLF and LF endings, `data:` with
# and without its space, multi-byte UTF-8, a byte that is not UTF-8, and [DONE] as the
# body's last line without a newline.
CUT_BODY = b"".join([
    b": keepalive\r\n", b"event: message\r\n",
    b"data: ", chunk_line({"content": "Hé"}), b"\r\n\r\n",
    b"data:", chunk_line({"content": "llo ✓"}), b"\n\n",
    b"data: ", chunk_line({"content": "a"}).replace(b'"a"', b'"a\xff"'), b"\n\n",
    b"data: ", chunk_line({}, "stop"), b"\n\n",
    b"data: [DONE]",
])


@pytest.mark.parametrize("size", [1, 2, 5, 64, len(CUT_BODY)])
async def test_a_streamed_reply_reads_the_same_however_its_body_is_cut(size: int) -> None:
    """The body is split into lines as it comes: a line (or a character) cut across reads
    of the socket is read whole, as one line."""
    from agentd.config import LlmConfig
    from agentd.llm import LlmClient

    tokens: list[str] = []
    async with FakeOpenAI() as llm:
        llm.pieces([CUT_BODY[i:i + size] for i in range(0, len(CUT_BODY), size)])
        client = LlmClient(LlmConfig(base_url=llm.url, model="test-model"), "")
        try:
            result = await client.chat([{"role": "user", "content": "hi"}], on_token=tokens.append)
        finally:
            await client.close()
    assert tokens == ["Hé", "llo ✓", "a\ufffd"]
    assert (result.content, result.finish_reason, result.model) == ("Héllo ✓a\ufffd", "stop", "cut-model")


async def test_a_stream_that_goes_silent_fails_after_read_timeout() -> None:
    """`[llm] read_timeout` is the longest silence between two reads of a reply: what came
    before it was streamed, then the call fails (an LlmError: retried)."""
    from agentd.config import LlmConfig
    from agentd.llm import LlmClient, LlmError

    tokens: list[str] = []
    release = asyncio.Event()
    async with FakeOpenAI() as llm:
        llm.reply("one two", hold=release)  # streams "one ", then holds until released
        client = LlmClient(LlmConfig(base_url=llm.url, model="test-model", read_timeout=0.2), "")
        try:
            with pytest.raises(LlmError):
                await client.chat([{"role": "user", "content": "hi"}], on_token=tokens.append)
        finally:
            release.set()
            await client.close()
    assert tokens == ["one "]


async def test_a_json_answer_to_a_streamed_request_is_taken_whole(ob: Any) -> None:
    async with FakeOpenAI() as llm:
        daemon, _, _ = await ob(llm_config(llm))
        llm.whole("All in one piece")
        record = await daemon.queue.enqueue("ob.chat")
        result = await daemon.queue.result(record.id, timeout=WAIT)
        assert (result["content"], result["usage"]["total_tokens"]) == ("All in one piece", 5)
        assert (await finished(daemon, record.id)).attempts == 1


async def test_an_error_chunk_or_a_broken_stream_is_retried_and_its_tokens_are_counted(ob: Any) -> None:
    """A 200 stream that carries an error object, or that ends before its last chunk, is an
    error worth another attempt; tokens it already streamed count towards the task's usage."""
    async with FakeOpenAI() as llm:
        daemon, _, _ = await ob(llm_config(llm))
        delta = json.dumps({"choices": [{"index": 0, "delta": {"content": "half "}}]})
        llm.raw([delta, delta])  # two tokens, then the connection ends
        llm.raw([json.dumps({"object": "error", "message": "model overloaded"}), "[DONE]"])
        llm.raw(["{not json"])
        llm.reply("Whole now")
        record = await daemon.queue.enqueue("ob.chat", max_attempts=5)
        assert (await daemon.queue.result(record.id, timeout=WAIT))["content"] == "Whole now"
        final = await finished(daemon, record.id)
        assert final.attempts == 4
        # The broken stream's 2 tokens (estimated, with its prompt) plus the full reply's usage.
        assert final.usage is not None and final.usage["calls"] == 2
        assert final.usage["completion_tokens"] == 2 + 2


async def test_a_429_with_retry_after_retries_the_task_and_a_400_fails_it(ob: Any) -> None:
    async with FakeOpenAI() as llm:
        daemon, events, _ = await ob(llm_config(llm))
        llm.fail(429, retry_after="0")
        llm.reply("second time lucky")
        record = await daemon.queue.enqueue("ob.chat")
        assert (await daemon.queue.result(record.id, timeout=WAIT))["content"] == "second time lucky"
        final = await daemon.queue.get(record.id)
        assert (final.status, final.attempts) == ("succeeded", 2)
        retry = await events.wait_for("task.retrying", task_id=record.id)
        assert retry.data["delay"] == 0 and "429" in retry.data["error"]

        llm.fail(400)
        record = await daemon.queue.enqueue("ob.chat")
        final = await finished(daemon, record.id)
        assert (final.status, final.attempts) == ("failed", 1)
        assert final.error.startswith("Fail: the LLM endpoint answered 400")
        assert len(llm.requests) == 3


async def test_a_task_past_its_token_budget_is_stopped_mid_stream(ob: Any) -> None:
    reply = " ".join(f"word{n}" for n in range(40))
    async with FakeOpenAI() as llm:
        daemon, events, _ = await ob(llm_config(llm))
        llm.reply(reply)
        record = await daemon.queue.enqueue("ob.budgeted")
        final = await finished(daemon, record.id)
        assert (final.status, final.attempts) == ("failed", 1)
        assert "token budget exceeded" in final.error
        assert final.error.startswith("TokenBudgetExceededError: ")
        exceeded = await events.wait_for("task.budget_exceeded", task_id=record.id)
        assert exceeded.data["budget"] == 5 and exceeded.data["used"] > 5
        tokens = [e for e in events.events if e.topic == "task.token" and e.data["task_id"] == record.id]
        assert 0 < len(tokens) < 40
        assert reply.startswith("".join(e.data["text"] for e in tokens))
        assert final.usage is not None and final.usage["total_tokens"] == exceeded.data["used"]
        assert len(llm.requests) == 1


async def test_a_cancel_mid_stream_stays_a_cancel_when_counting_its_tokens_fails(
        ob: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokens a cancelled chat streamed are counted as it unwinds; a store that fails
    that count is logged, and the chat's caller still sees its CancelledError (it saw the
    store's error in its place)."""
    async with FakeOpenAI() as llm:
        daemon, events, module = await ob(llm_config(llm))

        async def store_full(task_id: int, usage: dict[str, int]) -> dict[str, int]:
            raise StoreFullError("database or disk is full")

        monkeypatch.setattr(daemon.queue, "add_usage", store_full)
        hold = asyncio.Event()
        llm.reply("one two three", hold=hold)
        try:
            record = await daemon.queue.enqueue("ob.chat_cut_short", {"cut": "cut"})
            await events.wait_for("task.token", task_id=record.id)
            with capture_logs() as logs:
                module.gate("cut").set()
                seen = await daemon.queue.result(record.id, timeout=WAIT)
        finally:
            hold.set()
    assert seen == "CancelledError"
    [lost] = [entry for entry in logs if entry["event"] == "llm.usage_not_counted"]
    assert lost["task_id"] == record.id
    assert lost["error"] == "StoreFullError: database or disk is full"
    assert lost["usage"]["completion_tokens"] >= 1


async def test_a_count_failing_after_a_second_cancel_is_logged_not_dropped(
        ob: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled again while its streamed tokens are being counted, the task ends cancelled
    at once and the count runs on; when that count fails, nobody awaits it any more, and
    its failure is logged (a shielded task's exception was dropped without a word)."""
    async with FakeOpenAI() as llm:
        daemon, events, _ = await ob(llm_config(llm))
        counting: list[asyncio.Task[Any]] = []
        started, release = asyncio.Event(), asyncio.Event()

        async def slow_then_full(task_id: int, usage: dict[str, int]) -> dict[str, int]:
            task = asyncio.current_task()
            assert task is not None
            counting.append(task)
            started.set()
            await release.wait()
            raise StoreFullError("database or disk is full")

        monkeypatch.setattr(daemon.queue, "add_usage", slow_then_full)
        hold = asyncio.Event()
        llm.reply("one two three", hold=hold)
        try:
            record = await daemon.queue.enqueue("ob.chat")
            await events.wait_for("task.token", task_id=record.id)
            with capture_logs() as logs:
                await daemon.queue.cancel(record.id)
                await asyncio.wait_for(started.wait(), WAIT)
                await daemon.queue.cancel(record.id)  # again, while the count waits
                final = await finished(daemon, record.id)
                assert (final.status, final.error) == ("cancelled", "cancelled")
                assert not [entry for entry in logs if entry["event"] == "llm.usage_not_counted"]
                release.set()
                # Its done-callbacks, the logging one among them, run before wait's.
                await asyncio.wait(counting, timeout=WAIT)
        finally:
            hold.set()
    [lost] = [entry for entry in logs if entry["event"] == "llm.usage_not_counted"]
    assert (lost["task_id"], lost["error"]) == (record.id, "StoreFullError: database or disk is full")


async def test_key_env_puts_the_key_from_the_environment_in_the_authorization_header(
        ob: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OB_TEST_LLM_KEY", "sk-from-env")
    async with FakeOpenAI(key="sk-from-env") as llm:
        daemon, _, _ = await ob(llm_config(llm, key_env="OB_TEST_LLM_KEY"))
        record = await daemon.queue.enqueue("ob.chat")
        assert (await daemon.queue.result(record.id, timeout=WAIT))["content"] == "ok"
        assert llm.headers[0]["Authorization"] == "Bearer sk-from-env"


async def test_a_key_env_naming_an_unset_variable_stops_the_start(
        ob: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OB_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"\[llm\] key_env: the environment variable OB_TEST_UNSET_KEY"):
        await ob({"llm": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "key_env": "OB_TEST_UNSET_KEY"}})


async def test_without_an_llm_the_task_fails_naming_base_url(ob: Any) -> None:
    daemon, _, _ = await ob()
    record = await daemon.queue.enqueue("ob.chat")
    final = await finished(daemon, record.id)
    assert (final.status, final.attempts) == ("failed", 1)
    assert final.error.startswith("LlmUnavailableError: ")
    assert "[llm] base_url" in final.error
