"""What a browser sees: Chromium (Debian's, driven by Playwright) loads pages from a second
real aiohttp server on loopback under names Chromium maps to 127.0.0.1, `app.test` (a
listed origin) and `evil.test` (a foreign one, or a name rebound to 127.0.0.1), and talks
to a real daemon the way pages do: EventSource, fetch, WebSocket."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import async_playwright

from agentd.app import Daemon
from agentd.testing import daemon_url, make_config

CHROMIUM = "/usr/bin/chromium"
TOKEN = "t0ken-for-browsers"
WAIT_MS = 20_000  # the longest a page condition may take to hold (2 shared cores)

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"no Chromium at {CHROMIUM}"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    """One headless Chromium for the module; `*.test` names resolve to 127.0.0.1."""
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP *.test 127.0.0.1"])
        yield chromium
        await chromium.close()


@pytest_asyncio.fixture(loop_scope="module")
async def pages(browser: Any) -> AsyncIterator[Any]:
    """`page = await pages("app.test")`: a blank page of that origin, served by a real
    aiohttp server on loopback (another port than the daemon's: another origin)."""
    app = web.Application()

    async def blank(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>page</title>", content_type="text/html")

    app.router.add_get("/", blank)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    context = await browser.new_context()

    async def open_page(name: str) -> Any:
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        await page.goto(f"http://{name}:{port}/")
        return page

    yield open_page
    await context.close()
    await runner.cleanup()


@asynccontextmanager
async def running(tmp_path: Path, origin: str, **overrides: dict[str, Any]) -> AsyncIterator[Daemon]:
    """A real daemon with a token, its state in tmp_path/data, `origin` listed in
    allowed_origins, telling browsers to reconnect after 0.2 s."""
    tables: dict[str, dict[str, Any]] = {
        "server": {"token": TOKEN, "allowed_origins": [origin]},
        "streams": {"retry_ms": 200},
    }
    for section, table in overrides.items():
        tables[section] = {**tables.get(section, {}), **table}
    async with Daemon(make_config(tmp_path, overrides=tables)) as daemon:
        yield daemon


async def stream_token(daemon: Daemon, **scope: str) -> str:
    async with aiohttp.ClientSession(daemon_url(daemon)) as client, client.post(
        "/v1/stream-tokens", json=scope, headers={"Authorization": f"Bearer {TOKEN}"},
    ) as response:
        assert response.status == 201
        return str((await response.json())["token"])


OPEN_STREAM = """([url, name]) => {
    const state = window[name] = {opens: 0, received: []};
    state.source = new EventSource(url);
    state.source.onopen = () => { state.opens += 1; };
    state.source.addEventListener("page.news", (e) => state.received.push(JSON.parse(e.data).data));
}"""


async def test_a_page_keeps_its_event_stream_across_a_restart_and_past_token_ttl(
    pages: Any, tmp_path: Path,
) -> None:
    page = await pages("app.test")
    origin = await page.evaluate("location.origin")
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(running(tmp_path, origin))
        token = await stream_token(first, path="/v1/stream", topics="page.*")
        url = f"{daemon_url(first)}/v1/stream?topics=page.*&token={token}"
        await page.evaluate(OPEN_STREAM, [url, "stream"])
        await page.wait_for_function("window.stream.opens === 1")
        await first.publish_durably("page.news", {"n": 1})
        await page.wait_for_function("window.stream.received.length === 1")
        await first.stop()
        # Back on the same port and data, where the token can no longer open a stream
        # (token_ttl 0): the page's EventSource reconnects on its own and resumes.
        second = await stack.enter_async_context(
            running(tmp_path, origin, server={"port": first.port}, streams={"token_ttl": 0}))
        await page.wait_for_function("window.stream.opens === 2")
        await second.publish_durably("page.news", {"n": 2})
        await page.wait_for_function("window.stream.received.length === 2")
        assert await page.evaluate("window.stream.received") == [{"n": 1}, {"n": 2}]
        # A new EventSource with the same token is refused: it may only resume now.
        await page.evaluate(OPEN_STREAM, [url, "fresh"])
        await page.wait_for_function("window.fresh.source.readyState === EventSource.CLOSED")
        assert await page.evaluate("window.fresh.opens") == 0


FETCH = """async ([url, init]) => {
    try {
        const response = await fetch(url, init);
        return {status: response.status, body: await response.json()};
    } catch (error) {
        return {blocked: String(error)};
    }
}"""

SOCKET = """([url, requests]) => new Promise((resolve) => {
    const socket = new WebSocket(url);
    const replies = [];
    socket.onopen = () => requests.forEach((r) => socket.send(JSON.stringify(r)));
    socket.onmessage = (m) => {
        replies.push(JSON.parse(m.data));
        if (replies.length === requests.length) { socket.close(); resolve(replies); }
    };
    socket.onerror = () => resolve("refused");
})"""


async def test_an_allowed_origin_fetches_and_a_foreign_or_rebound_one_cannot(
    pages: Any, browser: Any, tmp_path: Path,
) -> None:
    app_page = await pages("app.test")
    evil_page = await pages("evil.test")
    async with running(tmp_path, await app_page.evaluate("location.origin")) as daemon:
        base = daemon_url(daemon)
        bearer = {"headers": {"Authorization": f"Bearer {TOKEN}"}}
        post = {"method": "POST", "headers": {"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json"},
                "body": '{"topic": "from.page"}'}
        # The listed origin: its preflighted requests go through, and it reads the answers.
        status = await app_page.evaluate(FETCH, [f"{base}/v1/status", bearer])
        assert status["status"] == 200 and status["body"]["version"]
        assert (await app_page.evaluate(FETCH, [f"{base}/v1/events", post]))["status"] == 202
        unauthorized = await app_page.evaluate(FETCH, [f"{base}/v1/status", {}])
        assert unauthorized["status"] == 401 and unauthorized["body"]["error"]["code"] == "unauthorized"
        # Its WebSocket with a stream token reads, and cannot write.
        ws_token = await stream_token(daemon, path="/v1/ws")
        replies = await app_page.evaluate(SOCKET, [
            f"ws://127.0.0.1:{daemon.port}/v1/ws?token={ws_token}",
            [{"id": 1, "type": "subscribe", "patterns": ["x.*"]},
             {"id": 2, "type": "publish", "topic": "x.written"},
             {"id": 3, "type": "submit", "name": "agentd.maintain_store"},
             {"id": 4, "type": "cancel", "task_id": 1}]])
        by_id = {reply["id"]: reply for reply in replies}
        assert by_id[1]["ok"] is True
        assert [by_id[n]["error"]["code"] for n in (2, 3, 4)] == ["read_only"] * 3

        # A foreign origin: blocked, the EventSource with a valid token too.
        for request in ([f"{base}/v1/status", bearer], [f"{base}/v1/events", post]):
            assert "blocked" in await evil_page.evaluate(FETCH, request)
        url = f"{base}/v1/stream?token={await stream_token(daemon)}"
        await evil_page.evaluate(OPEN_STREAM, [url, "stream"])
        await evil_page.wait_for_function("window.stream.source.readyState === EventSource.CLOSED")
        assert await evil_page.evaluate("window.stream.opens") == 0

        # A name rebound to 127.0.0.1 reaching the daemon's port: same-origin, so no Origin
        # header to refuse; its Host is refused.
        rebound = await browser.new_page()
        response = await rebound.goto(f"http://evil.test:{daemon.port}/v1/status")
        assert response.status == 421
        same_origin = await rebound.evaluate(FETCH, ["/v1/tasks", bearer])
        assert same_origin["status"] == 421
        assert same_origin["body"]["error"]["code"] == "host_not_allowed"
        await rebound.close()
