"""The plugins shipped in the repository's plugins/ directory work end to end.

Everything goes through the real daemon's HTTP API (tasks, schedules, events, streams,
WebSocket, memory, sessions) with real peers on 127.0.0.1: a feed server (RSS, Atom, JSON)
and a webhook receiver written here (aiohttp), an SMTP server (aiosmtpd), and FakeOpenAI
for the LLM. Nothing sleeps: tests wait on task results, bus events, stream frames and the
peers' records, each wait bounded.

Token events are ephemeral (never in the event log), so a task's SSE stream only carries
the tokens of a task that runs after the client connected. Where a test reads tokens from
`/v1/tasks/{id}/stream` of a task submitted over HTTP, the daemon runs one worker and the
test keeps it busy with a webhook delivery its receiver holds, until the stream is open.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

from agentd import TaskFailedError
from agentd.app import Daemon
from agentd.testing import EventCapture, harness
from fake_openai import FakeOpenAI
from sse_client import Sse

REPO_PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
WAIT = 10.0  # seconds any single wait may take before the test fails
ONE_WORKER = {"queues": {"default": 1}}
# The peers here listen on loopback, which webhooks may reach only if allowed.
LOOPBACK_WEBHOOKS = {"allow_networks": ["127.0.0.0/8"]}


# --------------------------------------------------------------------------- helpers


async def call(client: aiohttp.ClientSession, method: str, path: str, body: Any = None, *,
               status: int = 200, params: dict[str, str] | None = None) -> Any:
    """One API call; asserts the status and returns the JSON body."""
    async with client.request(method, path, json=body, params=params) as response:
        text = await response.text()
        assert response.status == status, f"{method} {path}: {response.status} {text}"
        return json.loads(text) if text else None


async def submit(client: aiohttp.ClientSession, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return await call(client, "POST", "/v1/tasks", {"name": name, "args": args}, status=201)


async def finished(client: aiohttp.ClientSession, task_id: int) -> dict[str, Any]:
    """The task once it is finished (with its children); fails if it is not within WAIT."""
    task = await call(client, "GET", f"/v1/tasks/{task_id}", params={"wait": str(WAIT)})
    assert task["status"] in ("succeeded", "failed", "dead", "cancelled"), task
    return task


async def succeeded(client: aiohttp.ClientSession, task_id: int) -> dict[str, Any]:
    task = await finished(client, task_id)
    assert task["status"] == "succeeded", task
    return task


async def run_schedule(client: aiohttp.ClientSession, schedule_id: str) -> dict[str, Any]:
    """POST /v1/schedules/{id}/run and return the task it fired, finished."""
    state = await call(client, "POST", f"/v1/schedules/{schedule_id}/run")
    assert state["last_task_id"] is not None, state
    return await finished(client, state["last_task_id"])


async def messages(client: aiohttp.ClientSession, session: str) -> list[dict[str, Any]]:
    return (await call(client, "GET", f"/v1/sessions/{session}/messages"))["messages"]


async def until(check: Callable[[], Awaitable[bool]], wake: Callable[[], Awaitable[Any]],
                rounds: int = 20) -> None:
    """Check `check()`, awaiting `wake()` (bounded by WAIT) between checks, at most `rounds`
    times: a bounded poll driven by the daemon's own progress, not by the clock."""
    for _ in range(rounds):
        if await check():
            return
        await asyncio.wait_for(wake(), WAIT)
    raise AssertionError(f"the condition did not hold after {rounds} rounds")


@dataclass
class Posted:
    path: str
    headers: dict[str, str]
    raw: bytes


@dataclass
class Peer:
    """An HTTP server on 127.0.0.1: GET serves `documents` ({path: (status, content type,
    body)}); POST records the request and answers 200, after `hold` is set when one is
    given."""

    documents: dict[str, tuple[int, str, bytes]] = field(default_factory=dict)
    posts: list[Posted] = field(default_factory=list)
    hold: asyncio.Event | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    base: str = ""

    def url(self, path: str) -> str:
        return self.base + path

    async def _get(self, request: web.Request) -> web.Response:
        status, content_type, body = self.documents[request.path]
        return web.Response(status=status, body=body, content_type=content_type)

    async def _post(self, request: web.Request) -> web.Response:
        self.posts.append(Posted(request.path, dict(request.headers), await request.read()))
        self.changed.set()
        if self.hold is not None:
            await self.hold.wait()
        return web.Response(text="ok")

    async def wait_posts(self, count: int) -> list[Posted]:
        async with asyncio.timeout(WAIT):
            while len(self.posts) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.posts


@asynccontextmanager
async def serve(peer: Peer) -> AsyncIterator[Peer]:
    app = web.Application()
    app.router.add_get("/{path:.*}", peer._get)
    app.router.add_post("/{path:.*}", peer._post)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    peer.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield peer
    finally:
        if peer.hold is not None:
            peer.hold.set()
        await runner.cleanup()


@asynccontextmanager
async def busy_worker(daemon: Daemon, client: aiohttp.ClientSession) -> AsyncIterator[asyncio.Event]:
    """Occupy the daemon's single worker (`ONE_WORKER`) with a webhook delivery (the
    built-in `agentd.post_webhook`, enqueued inside the daemon as `ctx.webhook` does: the API
    refuses agentd's own tasks) that a receiver holds until the yielded event is set: tasks
    submitted meanwhile stay queued, so a stream can be opened before they run."""
    async with serve(Peer(hold=asyncio.Event())) as blocker:
        assert blocker.hold is not None
        task = await daemon.queue.enqueue("agentd.post_webhook", {"url": blocker.url("/hold"), "body": {}})
        await blocker.wait_posts(1)  # the worker is in the delivery now
        yield blocker.hold
        blocker.hold.set()
        await succeeded(client, task.id)


@dataclass
class Inbox:
    """An aiosmtpd handler recording each accepted message."""

    messages: list[tuple[list[str], EmailMessage]] = field(default_factory=list)

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
            self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.messages.append((list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"


@asynccontextmanager
async def smtp_server() -> AsyncIterator[tuple[Inbox, int]]:
    inbox = Inbox()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(inbox, hostname="smtp.test"), "127.0.0.1", 0)
    try:
        yield inbox, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- hello


async def test_hello_greets_over_http_and_its_handler_reacts(start_daemon: Any, http: Any) -> None:
    daemon, events = await start_daemon(
        plugin_dirs=[REPO_PLUGINS], overrides={"plugins": {"hello": {"greeting": "hi"}}})
    handled = EventCapture(daemon.bus, "task.succeeded")
    client = http(daemon)
    async with client.post("/v1/tasks", json={"name": "hello.greet", "args": {"name": "Ada"}}) as r:
        assert r.status == 201
        task = await r.json()
    async with client.get(f"/v1/tasks/{task['id']}", params={"wait": "5"}) as r:
        done = await r.json()
    assert (done["status"], done["result"]) == ("succeeded", "hi, Ada")
    progress = await events.wait_for("task.progress", task_id=task["id"])
    assert progress.data["data"] == {"to": "Ada"}
    await handled.wait_for("task.succeeded", task_id=task["id"])
    await daemon.spawner.idle()
    assert daemon.spawner.failed == 0
    assert {p["name"]: p["state"] for p in daemon.plugins.states()}["hello"] == "started"


# --------------------------------------------------------------------------- news_watch

ROVER_TITLE = "Mars rover lands in Jezero crater"
ROVER_TEXT = f"{ROVER_TITLE}. The rover touched down safely after a seven month journey."
RSS = f"""<?xml version="1.0"?>
<rss version="2.0"><channel><title>Space and money</title>
<item><title>{ROVER_TITLE}</title><link>https://news.test/rover</link>
<description>The rover touched down safely after a seven month journey.</description></item>
<item><title>Central bank raises interest rates</title><link>https://news.test/rates</link>
<description>Borrowing costs climb for the third time this year.</description></item>
</channel></rss>""".encode()
ATOM = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom"><title>Nature</title>
<entry><title>New species of tree frog discovered in Peru</title>
<link rel="alternate" href="https://news.test/frog"/>
<summary>Biologists found the bright green frog in the cloud forest.</summary></entry>
<entry><title>City council approves protected bike lanes</title>
<link href="https://news.test/bikes"/><content>Work on the first lanes starts in spring.</content></entry>
</feed>"""
JSON_FEED = json.dumps({"version": "https://jsonfeed.org/version/1.1", "title": "Misc", "items": [
    {"id": "1", "title": "Chess prodigy wins the world championship", "url": "https://news.test/chess",
     "content_text": "The eighteen year old won the final game with black."},
    {"id": "2", "title": "Heatwave breaks temperature records across Europe",
     "url": "https://news.test/heat", "summary": "Several countries measured their hottest day."},
]}).encode()
NEWS_TITLES = {
    ROVER_TITLE, "Central bank raises interest rates", "New species of tree frog discovered in Peru",
    "City council approves protected bike lanes", "Chess prodigy wins the world championship",
    "Heatwave breaks temperature records across Europe"}
FEEDS = {
    "/rss.xml": (200, "application/rss+xml", RSS),
    "/broken": (500, "text/plain", b"internal error"),
    "/atom.xml": (200, "application/atom+xml", ATOM),
    "/garbage": (200, "text/html", b"<html><body>not a feed at all"),
    "/feed.json": (200, "application/feed+json", JSON_FEED),
}


async def test_news_watch_fetches_three_formats_once_reports_broken_feeds_and_answers(
    start_daemon: Any, http: Any,
) -> None:
    async with serve(Peer(documents=FEEDS)) as feeds:
        urls = [feeds.url(path) for path in FEEDS]  # rss, broken, atom, garbage, json
        table = {"feeds": urls}
        daemon, events = await start_daemon(plugin_dirs=[REPO_PLUGINS],
                                            overrides={"plugins": {"news_watch": table}})
        client = http(daemon)
        schedule = await call(client, "GET", "/v1/schedules/news_watch.fetch")
        assert (schedule["task"], schedule["every"]) == ("news_watch.fetch", 1800)

        first = await run_schedule(client, "news_watch.fetch")
        assert first["status"] == "succeeded", first
        assert (first["result"]["feeds"], first["result"]["new"]) == (5, 6)
        failed = first["result"]["failed"]
        assert [f["url"] for f in failed] == [urls[1], urls[3]]  # the others were read after them
        assert "500" in failed[0]["error"] and failed[1]["error"]
        announced = [e for e in events.events if e.topic == "news.new"]
        assert sorted(e.data["title"] for e in announced) == sorted(NEWS_TITLES)  # once each
        assert {e.data["source"] for e in announced} == {urls[0], urls[2], urls[4]}
        rover = next(e for e in announced if e.data["title"] == ROVER_TITLE)
        assert rover.data["link"] == "https://news.test/rover"
        remembered = await call(client, "GET", f"/v1/memory/{rover.data['memory_id']}")
        assert (remembered["namespace"], remembered["text"]) == ("news", ROVER_TEXT)
        assert {e.data["link"] for e in announced} >= {"https://news.test/frog", "https://news.test/bikes",
                                                         "https://news.test/chess"}

        again = await run_schedule(client, "news_watch.fetch")
        assert again["status"] == "succeeded", again
        assert (again["result"]["new"], len(again["result"]["failed"])) == (0, 2)
        assert len([e for e in events.events if e.topic == "news.new"]) == 6  # nothing new

        ask = await submit(client, "news_watch.ask", {"question": "What happened to the rover on Mars?"})
        answer = (await succeeded(client, ask["id"]))["result"]
        assert answer["answer"] is None
        assert answer["items"][0]["title"] == ROVER_TITLE
        assert answer["items"][0]["text"] == ROVER_TEXT
        assert len(answer["items"]) == 5
        assert "no LLM is configured" in answer["note"]
        await daemon.stop()

        # The same state, now with an LLM and the schedule retimed in agentd.toml.
        async with FakeOpenAI() as llm:
            llm.reply("The rover landed safely in Jezero crater.")
            retimed = {**table, "schedules": {"fetch": {"every": "10m"}}}
            daemon, _ = await start_daemon(plugin_dirs=[REPO_PLUGINS], overrides={
                "plugins": {"news_watch": retimed}, "llm": {"base_url": llm.url, "model": "m"}})
            client = http(daemon)
            schedule = await call(client, "GET", "/v1/schedules/news_watch.fetch")
            assert (schedule["every"], schedule["catch_up"], schedule["overlap"]) == (600, "once", "skip")
            assert schedule["next_fire"] - time.time() <= 600
            listed = (await call(client, "GET", "/v1/schedules"))["schedules"]
            assert [s["every"] for s in listed if s["id"] == "news_watch.fetch"] == [600]

            ask = await submit(client, "news_watch.ask", {"question": "What happened to the rover on Mars?"})
            answer = (await succeeded(client, ask["id"]))["result"]
            assert answer["answer"] == "The rover landed safely in Jezero crater."
            assert answer["items"][0]["title"] == ROVER_TITLE
            chats = [r for r in llm.requests if "messages" in r]
            assert len(chats) == 1
            sent = chats[0]["messages"]
            assert [m["role"] for m in sent] == ["system", "user"]
            assert ROVER_TEXT in sent[0]["content"] and "https://news.test/rover" in sent[0]["content"]
            assert sent[1]["content"] == "What happened to the rover on Mars?"


async def test_news_watch_an_entry_without_text_does_not_stop_the_other_feeds(
    start_daemon: Any, http: Any,
) -> None:
    """A feed entry with neither title nor summary (seen in the wild: an Atom entry with an
    empty <title/>) is one bad entry, not a reason to lose every feed after it."""
    blank = b"""<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom">
    <entry><title></title><link href="https://news.test/blank"/></entry></feed>"""
    documents = {"/blank.xml": (200, "application/atom+xml", blank), "/rss.xml": FEEDS["/rss.xml"]}
    async with serve(Peer(documents=documents)) as feeds:
        urls = [feeds.url("/blank.xml"), feeds.url("/rss.xml")]
        daemon, events = await start_daemon(
            plugin_dirs=[REPO_PLUGINS],
            overrides={"plugins": {"news_watch": {"feeds": urls}},
                       "tasks": {"retry_base": 0.01, "retry_max": 0.02}})  # its retries fail fast
        client = http(daemon)
        fetched = await run_schedule(client, "news_watch.fetch")
        assert fetched["status"] == "succeeded", fetched["error"]
        assert fetched["result"]["new"] == 2
        assert len([e for e in events.events if e.topic == "news.new"]) == 2


# --------------------------------------------------------------------------- deep_search

ROVER_MEMORIES = [
    "The Mars rover landed in Jezero crater, a great success for the mission team.",
    "Engineers praised the rover for its strong wheels after a record drive across the crater.",
    "Heavy rain caused a delay to the wheat harvest in the valley.",
]


async def test_deep_search_delegates_merges_streams_remembers_and_mails(start_daemon: Any, http: Any) -> None:
    async with smtp_server() as (inbox, port):
        daemon, _ = await start_daemon(plugin_dirs=[REPO_PLUGINS], overrides={
            "mail": {"host": "127.0.0.1", "port": port, "security": "none", "sender": "agentd@test.org"},
            "tasks": ONE_WORKER, "webhooks": LOOPBACK_WEBHOOKS})
        client = http(daemon)
        for text in ROVER_MEMORIES:
            await call(client, "POST", "/v1/memory", {"text": text, "namespace": "news"}, status=201)

        async with busy_worker(daemon, client) as release:
            run = await submit(client, "deep_search.run", {"topic": "Mars rover", "email": "ada@example.com"})
            async with client.get(f"/v1/tasks/{run['id']}/stream") as response:
                assert response.status == 200
                sse = Sse(response)
                await sse.opened()
                assert (await call(client, "GET", f"/v1/tasks/{run['id']}"))["status"] == "queued"
                release.set()
                frames = await sse.until("end")

        done = await succeeded(client, run["id"])
        result = done["result"]
        assert result["topic"] == "Mars rover"
        assert sorted(s["text"] for s in result["sources"][:2]) == sorted(ROVER_MEMORIES[:2])
        assert {s["text"] for s in result["sources"]} == set(ROVER_MEMORIES)
        assert {s["namespace"] for s in result["sources"]} == {"news"}
        # lexicon: landed, great, success, praised, strong, record (+6); delay (-1)
        assert result["sentiment"] == {"label": "positive", "method": "lexicon", "score": 5, "texts": 3}
        assert "sentiment positive" in result["summary"]

        summary = await call(client, "GET", f"/v1/memory/{result['memory_id']}")
        assert summary["namespace"] == "deep_search"
        assert summary["text"] == result["summary"]
        assert summary["metadata"] == {"kind": "summary", "agent": "deep_search", "topic": "Mars rover"}

        # The children, through the task's `children` and through the task list.
        children = {}
        for child_id in done["children"]:
            child = await succeeded(client, child_id)
            assert child["parent_id"] == run["id"]
            children[child["name"]] = child
        assert set(children) == {"deep_search.search", "deep_search.sentiment", "agentd.send_mail"}
        assert children["deep_search.sentiment"]["result"] == result["sentiment"]
        assert children["agentd.send_mail"]["id"] == result["mail_task_id"]
        listed = await call(client, "GET", "/v1/tasks", params={"name": "deep_search.search"})
        assert [(t["id"], t["parent_id"]) for t in listed["tasks"]] == [
            (children["deep_search.search"]["id"], run["id"])]

        # The stream: the children's and its own progress, the summary as tokens, then the end.
        own = [f for f in frames if f.data and f.data.get("data", {}).get("task_id") == run["id"]]
        kinds = [f.data["data"]["kind"] for f in own if f.event == "task.progress"]
        assert kinds == ["delegating", "merging", "done"]
        tokens = [f for f in own if f.event == "task.token"]
        assert tokens and "".join(f.data["data"]["text"] for f in tokens) == result["summary"]
        order = [(f.event, f.data["data"].get("kind")) for f in own]
        assert order.index(("task.progress", "merging")) < order.index(("task.token", None))
        assert order.index(("task.token", None)) < order.index(("task.progress", "done"))
        assert own[-1].event == "task.succeeded" and frames[-1].event == "end"
        child_ids = {c["id"] for c in children.values() if c["name"] != "agentd.send_mail"}
        assert child_ids <= {f.data["data"].get("task_id") for f in frames if f.event == "task.succeeded"}
        assert frames[0].event == "task" and frames[0].data["task"]["status"] == "queued"
        assert all(f.id is not None and f.id > 0 for f in frames[1:-1])

        # Exactly one mail, to the address given, about the topic.
        await succeeded(client, result["mail_task_id"])
        assert len(inbox.messages) == 1
        recipients, message = inbox.messages[0]
        assert recipients == ["ada@example.com"]
        assert message["Subject"] == "deep_search: Mars rover"
        assert message["To"] == "ada@example.com"
        body = message.get_body(("plain",))
        assert body is not None, message
        # quoted-printable over SMTP: the decoded lines end in CRLF
        assert body.get_content().replace("\r\n", "\n").strip() == result["summary"]


async def test_deep_search_with_approve_asks_before_mailing(start_daemon: Any, http: Any) -> None:
    """`[plugins.deep_search] approve = true`: the run waits for a person's answer before it
    mails; a "no" mails nothing. Resumed, it writes its summary and memory once."""
    async with smtp_server() as (inbox, port):
        daemon, events = await start_daemon(plugin_dirs=[REPO_PLUGINS], overrides={
            "mail": {"host": "127.0.0.1", "port": port, "security": "none", "sender": "agentd@test.org"},
            "plugins": {"deep_search": {"approve": True}}})
        client = http(daemon)
        for text in ROVER_MEMORIES:
            await call(client, "POST", "/v1/memory", {"text": text, "namespace": "news"}, status=201)
        approved = await submit(client, "deep_search.run",
                                {"topic": "Mars rover", "email": "ada@example.com"})
        declined = await submit(client, "deep_search.run", {"topic": "harvest", "email": "bo@example.com"})
        for run in (approved, declined):
            await events.wait_for("task.waiting", timeout=WAIT, task_id=run["id"], kind="ask")
        asked = {item["task_id"]: item for item in (await call(client, "GET", "/v1/approvals"))["approvals"]}
        assert asked[approved["id"]]["prompt"] == "Mail the summary on 'Mars rover' to ada@example.com?"
        assert asked[approved["id"]]["data"]["to"] == "ada@example.com"
        assert not inbox.messages  # nothing mailed while it waits
        await call(client, "POST", f"/v1/tasks/{approved['id']}/answer", {"answer": "yes"})
        await call(client, "POST", f"/v1/tasks/{declined['id']}/answer", {"answer": "no"})
        yes = (await succeeded(client, approved["id"]))["result"]
        no = (await succeeded(client, declined["id"]))["result"]
        assert (yes["approved"], no["approved"], no["mail_task_id"]) == (True, False, None)
        await succeeded(client, yes["mail_task_id"])
        assert [recipients for recipients, _ in inbox.messages] == [["ada@example.com"]]
        assert asked[approved["id"]]["data"]["summary"] == yes["summary"]  # written once
        assert (await call(client, "GET", "/v1/memory/stats"))["namespaces"]["deep_search"] == 2


async def test_deep_search_refuses_a_bad_address_before_any_work(tmp_path: Path) -> None:
    """`ctx.mail.check` (mail need not be configured): the run fails at once, naming the
    address, and no agent B or C is started."""
    async with harness(tmp_path, [REPO_PLUGINS]) as agentd:
        with pytest.raises(TaskFailedError) as failed:
            await agentd.run("deep_search.run", {"topic": "rover", "email": "not an address"})
        assert failed.value.status == "failed"
        assert "to: 'not an address' is not a mail address" in (failed.value.error or "")
        started = {e.data["name"] for e in agentd.events.events if e.topic == "task.queued"}
        assert started == {"deep_search.run"}


# --------------------------------------------------------------------------- event_log


async def test_event_log_records_ui_events_and_forwards_the_chosen_ones_signed(
    start_daemon: Any, http: Any,
) -> None:
    secret = "hook-secret"
    async with serve(Peer()) as receiver:
        daemon, _ = await start_daemon(plugin_dirs=[REPO_PLUGINS], overrides={
            "plugins": {"event_log": {"notify_url": receiver.url("/agentd"),
                                      "notify_topics": ["ui.purchase"]}},
            "webhooks": {"secret": secret, **LOOPBACK_WEBHOOKS}})
        client = http(daemon)

        click = await call(client, "POST", "/v1/events",
                           {"topic": "ui.click", "data": {"user": "ada", "button": "buy"}}, status=202)
        assert click["topic"] == "ui.click"

        async def holds(count: int) -> bool:
            return len(await messages(client, "activity-ada")) >= count

        await until(lambda: holds(1), daemon.spawner.idle)
        (recorded,) = await messages(client, "activity-ada")
        assert recorded["role"] == "event"
        assert json.loads(recorded["content"]) == {"topic": "ui.click",
                                                   "data": {"user": "ada", "button": "buy"}}
        assert recorded["meta"] == {"event_id": click["id"], "topic": "ui.click"}
        await daemon.spawner.idle()  # both handlers of the click are done
        assert (await call(client, "GET", "/v1/tasks", params={"name": "agentd.post_webhook"}))["tasks"] == []
        assert daemon.spawner.failed == 0

        purchase = await call(client, "POST", "/v1/events",
                              {"topic": "ui.purchase", "data": {"user": "ada", "item": "book"}}, status=202)
        (posted,) = await receiver.wait_posts(1)
        await until(lambda: holds(2), daemon.spawner.idle)
        deliveries = (await call(client, "GET", "/v1/tasks", params={"name": "agentd.post_webhook"}))["tasks"]
        assert len(deliveries) == 1
        await succeeded(client, deliveries[0]["id"])
        assert len(receiver.posts) == 1  # the click was not forwarded, the purchase once
        body = json.loads(posted.raw)
        assert (body["id"], body["topic"], body["data"]) == (purchase["id"], "ui.purchase",
                                                             {"user": "ada", "item": "book"})
        assert isinstance(body["time"], float)
        expected = "sha256=" + hmac.new(secret.encode(), posted.raw, hashlib.sha256).hexdigest()
        assert posted.headers["X-Agentd-Signature"] == expected
        assert posted.headers["X-Agentd-Delivery"] == str(deliveries[0]["id"])
        assert [json.loads(m["content"])["topic"] for m in await messages(client, "activity-ada")] == [
            "ui.click", "ui.purchase"]
        assert daemon.spawner.failed == 0


# --------------------------------------------------------------------------- chat


async def test_chat_streams_replies_keeps_the_conversation_and_sends_it_to_the_model(
    start_daemon: Any, http: Any,
) -> None:
    # Without an LLM: the reply says what it would do, streamed as tokens on the task's SSE.
    daemon, _ = await start_daemon(plugin_dirs=[REPO_PLUGINS], overrides={
        "tasks": ONE_WORKER, "webhooks": LOOPBACK_WEBHOOKS})
    client = http(daemon)
    async with busy_worker(daemon, client) as release:
        task = await submit(client, "chat.reply", {"session": "ada", "prompt": "Hello there!"})
        async with client.get(f"/v1/tasks/{task['id']}/stream") as response:
            sse = Sse(response)
            await sse.opened()
            assert (await call(client, "GET", f"/v1/tasks/{task['id']}"))["status"] == "queued"
            release.set()
            frames = await sse.until("end")
    first = (await succeeded(client, task["id"]))["result"]
    assert (first["session"], first["messages"]) == ("ada", 2)
    assert "no LLM is configured" in first["answer"] and "'Hello there!'" in first["answer"]
    events = [f.event for f in frames]
    tokens = [f.data["data"]["text"] for f in frames if f.event == "task.token"]
    assert len(tokens) > 1 and "".join(tokens) == first["answer"]
    assert events[-2:] == ["task.succeeded", "end"]
    assert events.index("task.started") < events.index("task.token")
    assert max(i for i, e in enumerate(events) if e == "task.token") < events.index("task.succeeded")
    assert [(m["role"], m["content"]) for m in await messages(client, "ada")] == [
        ("user", "Hello there!"), ("assistant", first["answer"])]
    await daemon.stop()

    # The same session, now with an LLM: the model gets the whole conversation, and its tokens
    # reach a WebSocket client that submitted the task, in order, before the final event.
    async with FakeOpenAI() as llm:
        llm.reply("Paris is the capital of France.")
        daemon, _ = await start_daemon(plugin_dirs=[REPO_PLUGINS],
                                       overrides={"llm": {"base_url": llm.url, "model": "m"}})
        client = http(daemon)
        async with client.ws_connect("/v1/ws") as ws:
            await ws.send_json({"id": 1, "type": "subscribe", "patterns": ["task.**"]})
            assert (await ws.receive_json(timeout=WAIT))["ok"] is True
            await ws.send_json({"id": 2, "type": "submit", "name": "chat.reply",
                                "args": {"session": "ada", "prompt": "What is the capital of France?"}})
            task_id: int | None = None
            seen: list[dict[str, Any]] = []
            while not (seen and seen[-1]["topic"] == "task.succeeded"
                       and seen[-1]["data"]["task_id"] == task_id):
                message = await ws.receive_json(timeout=WAIT)
                if message.get("id") == 2:
                    assert message["ok"] is True, message
                    task_id = message["task"]["id"]
                elif message.get("type") == "event":
                    seen.append(message["event"])
        assert task_id is not None
        mine = [e for e in seen if e["data"].get("task_id") == task_id]
        second = (await succeeded(client, task_id))["result"]
        assert second["answer"] == "Paris is the capital of France."
        topics = [e["topic"] for e in mine]
        assert topics[-1] == "task.succeeded" and "task.token" in topics
        assert "".join(e["data"]["text"] for e in mine if e["topic"] == "task.token") == second["answer"]
        assert topics.index("task.started") < topics.index("task.token")
        assert [e["id"] for e in mine] == sorted(e["id"] for e in mine)
        (chat,) = [r for r in llm.requests if "messages" in r]
        assert [(m["role"], m["content"]) for m in chat["messages"][1:]] == [
            ("user", "Hello there!"), ("assistant", first["answer"]),
            ("user", "What is the capital of France?")]
        assert chat["messages"][0]["role"] == "system" and chat["stream"] is True
        roles = [m["role"] for m in await messages(client, "ada")]
        assert roles == ["user", "assistant", "user", "assistant"]


async def test_chat_sessions_expire_and_the_purge_removes_them(
    start_daemon: Any, http: Any, tmp_path: Path,
) -> None:
    daemon, _ = await start_daemon(plugin_dirs=[REPO_PLUGINS], overrides={"memory": {"session_ttl": 0}},
                                   state_dir=tmp_path / "ttl0")
    client = http(daemon)
    task = await submit(client, "chat.reply", {"session": "brief", "prompt": "Hi"})
    await succeeded(client, task["id"])
    assert (await call(client, "GET", "/v1/memory/stats"))["sessions"] == 1  # kept until purged
    purge = await run_schedule(client, "agentd.purge_memory")
    assert purge["status"] == "succeeded", purge
    assert purge["result"]["sessions"] == 1
    assert await messages(client, "brief") == []
    stats = await call(client, "GET", "/v1/memory/stats")
    assert (stats["sessions"], stats["messages"]) == (0, 0)


def documented_plugin(tmp_path: Path, page: str, module: str) -> Path:
    """A plugin directory holding the `# plugins/<module>.py` example of `page` (README.md,
    docs/plugins.md) as printed."""
    text = (REPO_PLUGINS.parent / page).read_text()
    found = re.search(rf"```python\n# plugins/{re.escape(module)}\.py\n(.*?)```", text, re.S)
    assert found, f"{page} no longer shows plugins/{module}.py"
    directory = tmp_path / "documented_plugins"
    directory.mkdir()
    (directory / f"{module}.py").write_text(found.group(1))
    return directory


async def test_the_readme_one_file_plugin_loads_and_runs(
        start_daemon: Any, http: Any, tmp_path: Path) -> None:
    """The README's "your own plugin, in one file" works as printed."""
    directory = documented_plugin(tmp_path, "README.md", "standup")
    daemon, _ = await start_daemon(plugin_dirs=[directory])
    client = http(daemon)
    schedule = await call(client, "GET", "/v1/schedules/standup.remind")
    assert (schedule["cron"], schedule["timezone"]) == ("0 9 * * 1-5", "Europe/Paris")
    fired = await call(client, "POST", "/v1/schedules/standup.remind/run")
    assert await daemon.queue.result(fired["last_task_id"], timeout=WAIT) == "nothing noted"


async def test_the_documented_hello_plugin_loads_and_runs(tmp_path: Path) -> None:
    """docs/plugins.md's plugins/hello.py works as printed."""
    directory = documented_plugin(tmp_path, "docs/plugins.md", "hello")
    async with harness(tmp_path / "state", [directory]) as agentd:
        assert agentd.plugin_states() == {"hello": "started"}
        assert await agentd.run("hello.greet", {"name": "Ada"}) == "hello, Ada"
        progress = await agentd.events.wait_for("task.progress", name="hello.greet")
        assert (progress.data["kind"], progress.data["data"]) == ("greeting", {"to": "Ada"})
