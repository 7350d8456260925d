"""Reloading agentd.toml in a running daemon (SIGHUP, POST /v1/reload, `agentd reload`) and
one plugin from its file (POST /v1/plugins/{name}/reload, `agentd plugins reload`).

Every daemon here runs on a real agentd.toml in tmp_path, which the test rewrites before
asking for the reload; one is a real `agentd run` process reloaded by SIGHUP under a notify
socket, as systemd runs it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agentd.app import Daemon
from agentd.config import load_config
from agentd.errors import Fail
from agentd.testing import EventCapture, daemon_url
from sse_client import Sse

BASE = """
[daemon]
data_dir = "data"
stop_timeout = 5.0

[server]
port = 0
{server}

[plugins]
paths = [{plugins}]
entry_points = false
{rest}
"""

# A plugin whose task, given a port, connects to the test there and returns only once the
# test writes a line: the test knows it is running, and chooses when it ends.
PLUGIN = '''
import asyncio

from agentd import Plugin

plugin = Plugin("rl")


@plugin.task()
async def work(ctx, port: int = 0) -> dict:
    if port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.close()
    return {{"version": {version}, "greeting": ctx.config.get("greeting")}}


@plugin.on("rl.ping")
async def pong(ctx, event):
    ctx.publish("rl.pong", {{"version": {version}}})


@plugin.on("rl.ping", durable=True)
async def durable_pong(ctx, event):
    await ctx.submit("rl.work", {{}}, idempotency_key=f"durable-pong-{version}")


@plugin.startup
def started(ctx):
    ctx.publish("rl.started", {{"version": {version}}})


@plugin.shutdown
def stopped(ctx):
    ctx.publish("rl.stopped", {{"version": {version}}})
'''


def write_config(path: Path, *, server: str = "", rest: str = "", plugins: Path | None = None) -> Path:
    """Write agentd.toml at `path` (state under its directory; readable by its owner
    alone, as a file holding a token must be) and return it."""
    listed = f"{str(plugins)!r}" if plugins is not None else ""
    path.touch(mode=0o600)
    path.write_text(BASE.format(server=textwrap.dedent(server), plugins=listed,
                                rest=textwrap.dedent(rest)))
    return path


@pytest.fixture
async def daemon_on_file(store_url: str | None,
                         monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Callable[..., Any]]:
    """`daemon = await daemon_on_file(path)`: a real daemon on that agentd.toml, as
    `agentd run` reads it; stopped at teardown. In a `both_stores` test's second run its
    store is PostgreSQL, given as `AGENTD_STORE_URL` (which a reload reads again too)."""
    if store_url is not None:
        monkeypatch.setenv("AGENTD_STORE_URL", store_url)
    async with AsyncExitStack() as stack:

        async def start(path: Path) -> Daemon:
            daemon = Daemon(load_config(path))
            await stack.enter_async_context(daemon)
            return daemon

        yield start


@pytest.fixture
async def client() -> AsyncIterator[Callable[..., aiohttp.ClientSession]]:
    """`client(daemon, token=None)`: an aiohttp session on the daemon's URL."""
    sessions: list[aiohttp.ClientSession] = []

    def open_session(daemon: Daemon, token: str | None = None) -> aiohttp.ClientSession:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        session = aiohttp.ClientSession(daemon_url(daemon), headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=20))
        sessions.append(session)
        return session

    yield open_session
    for session in sessions:
        await session.close()


async def reload(session: aiohttp.ClientSession, expect: int = 200) -> dict[str, Any]:
    async with session.post("/v1/reload") as response:
        body: dict[str, Any] = await response.json()
        assert response.status == expect, body
        return body


# --------------------------------------------------------------------------- SIGHUP, systemd


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.setblocking(False)
        yield sock


async def datagram(sock: socket.socket, prefix: bytes) -> bytes:
    """The next datagram starting with `prefix` (the watchdog's STATUS lines are skipped)."""

    async def scan() -> bytes:
        while True:
            message = await asyncio.get_running_loop().sock_recv(sock, 4096)
            if message.startswith(prefix):
                return message

    return await asyncio.wait_for(scan(), 20)


async def test_sighup_reloads_a_running_agentd_and_tells_systemd(
    tmp_path: Path, agentd_process: Callable[..., Any], process_env: Callable[..., dict[str, str]],
    notify_socket: socket.socket,
) -> None:
    """`systemctl reload` (SIGHUP) to `agentd run`: systemd hears RELOADING=1 with the
    monotonic time, then READY=1; the new token is in force at once, the old one refused."""
    config = write_config(tmp_path / "agentd.toml", server='token = "old-token-0123456789"')
    child = await agentd_process(
        "run", "--config", str(config),
        env=process_env(NOTIFY_SOCKET=str(tmp_path / "notify.sock")))
    port = await child.started()
    await datagram(notify_socket, b"READY=1")
    write_config(config, server='token = "new-token-0123456789"')
    before = time.monotonic_ns() // 1000
    child.proc.send_signal(signal.SIGHUP)
    reloading = await datagram(notify_socket, b"RELOADING=1")
    ready = await datagram(notify_socket, b"READY=1")
    record = await child.wait_for_log("daemon.reloaded")
    assert record["trigger"] == "SIGHUP"
    assert record["applied"] == ["server.token"] and record["restart_required"] == []
    usec = int(re.search(rb"MONOTONIC_USEC=(\d+)", reloading)[1])  # type: ignore[index]
    assert before <= usec <= time.monotonic_ns() // 1000
    assert ready == b"READY=1\nSTATUS=reloaded 1 changed keys"
    url = f"http://127.0.0.1:{port}/v1/status"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        for token, status in (("old-token-0123456789", 401), ("new-token-0123456789", 200)):
            async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == status
        # A file with an error: refused, said in the log and to systemd; the daemon serves on.
        config.write_text(config.read_text() + "\n[server\n")
        child.proc.send_signal(signal.SIGHUP)
        await datagram(notify_socket, b"RELOADING=1")
        refused = await datagram(notify_socket, b"READY=1")
        assert refused.startswith(b"READY=1\nSTATUS=reload refused: ")
        assert b"not valid TOML" in refused
        record = await child.wait_for_log("daemon.reload_refused")
        assert record["level"] == "error" and str(config) in record["error"]
        headers = {"Authorization": "Bearer new-token-0123456789"}
        async with session.get(url, headers=headers) as response:
            assert response.status == 200
    assert await child.finish(signal.SIGTERM) == 0


# --------------------------------------------------------------------------- refused files


async def test_a_file_with_an_error_is_refused_and_the_running_configuration_kept(
    tmp_path: Path, daemon_on_file: Callable[..., Any], client: Callable[..., Any],
) -> None:
    config = write_config(tmp_path / "agentd.toml", rest="""
        [log]
        level = "info"
        [streams]
        keepalive = 15.0
    """)
    daemon = await daemon_on_file(config)
    events = EventCapture(daemon.bus, "daemon.**")
    session = client(daemon)
    running = daemon.config
    # A valid key with an invalid value, and a change that would apply with it.
    write_config(config, rest="""
        [log]
        level = "loud"
        [streams]
        keepalive = 1.0
    """)
    body = await reload(session, expect=422)
    assert body["error"]["code"] == "config_refused"
    assert str(config) in body["error"]["message"] and "level" in body["error"]["message"]
    assert body["error"]["reload"]["ok"] is False
    assert daemon.config is running
    assert daemon.config.streams.keepalive == 15.0
    # Broken TOML is refused the same way.
    config.write_text(config.read_text() + "\n[streams\n")
    body = await reload(session, expect=422)
    assert "not valid TOML" in body["error"]["message"]
    async with session.get("/v1/reload") as response:
        last = (await response.json())["last"]
    assert last["ok"] is False and last["trigger"] == "api" and "not valid TOML" in last["error"]
    assert "daemon.reloaded" not in events.topics()
    async with session.get("/healthz") as response:
        assert response.status == 200


async def test_agentd_reload_exits_non_zero_with_the_daemons_error(
    tmp_path: Path, daemon_on_file: Callable[..., Any], run_cli: Callable[..., Any],
    process_env: Callable[..., dict[str, str]],
) -> None:
    """`agentd reload` finds the daemon as the other commands do (address and token from
    the file): 0 and what was applied; 2 and the daemon's reason for a refused file."""
    config = write_config(tmp_path / "agentd.toml", server='token = "cli-token-0123456789"')
    daemon = await daemon_on_file(config)
    env = process_env(AGENTD_SERVER_PORT=str(daemon.port))
    write_config(config, server='token = "cli-token-0123456789"', rest="""
        [[schedules]]
        id = "ping"
        every = "1h"
        event = "rl.ping"
    """)
    # An admin action: without the token nothing is reloaded.
    async with aiohttp.ClientSession(daemon_url(daemon)) as anonymous, \
            anonymous.post("/v1/reload") as response:
        assert response.status == 401
    assert "ping" not in daemon.scheduler.schedules
    code, out, err = await run_cli("reload", "--config", str(config), env=env)
    assert code == 0, err
    assert '"schedules.ping"' in out and '"ok": true' in out
    write_config(config, server='token = "cli-token-0123456789"', rest="""
        [[schedules]]
        id = "ping"
        every = "1h"
        task = "nobody.has_this_task"
    """)
    code, out, err = await run_cli("reload", "--config", str(config), env=env)
    assert code == 2
    assert "reload refused" in err and "nobody.has_this_task" in err and str(config) in err
    assert daemon.scheduler.schedules["ping"].spec.event == "rl.ping"  # the running one stays


# --------------------------------------------------------------------------- what applies live


async def test_live_keys_apply_and_restart_only_keys_are_named(
    tmp_path: Path, daemon_on_file: Callable[..., Any], client: Callable[..., Any],
    logging_restored: None,
) -> None:
    config = write_config(tmp_path / "agentd.toml", server="max_body_bytes = 100000", rest="""
        [tasks]
        queues = { default = 2 }
    """)
    daemon = await daemon_on_file(config)
    events = EventCapture(daemon.bus, "daemon.reloaded")
    session = client(daemon)
    async with session.post("/hooks/github", data=b"{}") as response:
        assert response.status == 404
    browser = {"Origin": "https://app.example.com"}
    async with session.get("/v1/status", headers=browser) as response:
        assert response.status == 403
    logging.getLogger().setLevel(logging.INFO)  # as `agentd run` set it from the file
    write_config(config, server="""
        max_body_bytes = 200000
        allowed_origins = ["https://app.example.com"]
    """, rest="""
        [tasks]
        queues = { default = 5, extra = 1 }
        [hooks.github]
        secret = "hook-secret-0123456789"
        [streams]
        retry_ms = 4321
        [log]
        level = "debug"
    """)
    outcome = await reload(session)
    assert outcome["ok"] is True
    assert outcome["applied"] == ["hooks.github", "log.level", "server.allowed_origins",
                                  "streams.retry_ms", "tasks.queues.default"]
    assert logging.getLogger().getEffectiveLevel() == logging.DEBUG
    assert outcome["restart_required"] == ["server.max_body_bytes", "tasks.queues.extra"]
    # Restart-only keys keep their running value; live ones are in force.
    assert daemon.config.server.max_body_bytes == 100000
    assert daemon.config.tasks.queues == {"default": 5}
    assert daemon.workers._slots["default"].capacity == 5
    async with session.post("/hooks/github", data=b"{}") as response:
        assert response.status == 401  # the hook exists now: the unsigned delivery is refused
    async with session.get("/v1/status", headers=browser) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    async with session.get("/v1/stream") as response:
        assert (await Sse(response).opened()).retry == 4321
    event = await events.wait_for("daemon.reloaded")
    assert event.data["restart_required"] == ["server.max_body_bytes", "tasks.queues.extra"]
    # Nothing more changed in the file: a second reload applies nothing, and still names
    # what waits for a restart (as PostgreSQL's pending_restart does).
    again = await reload(session)
    assert again["applied"] == []
    assert again["restart_required"] == ["server.max_body_bytes", "tasks.queues.extra"]


@pytest.mark.both_stores
async def test_digests_added_and_removed_by_a_reload_bring_their_schedules(
    tmp_path: Path, daemon_on_file: Callable[..., Any], client: Callable[..., Any],
) -> None:
    config = write_config(tmp_path / "agentd.toml", rest="""
        [mail]
        host = "127.0.0.1"
        [digests.old]
        pattern = "news.*"
        to = "ops@example.com"
        every = "1d"
    """)
    daemon = await daemon_on_file(config)
    queued = EventCapture(daemon.bus, "task.queued")
    session = client(daemon)
    write_config(config, rest="""
        [mail]
        host = "127.0.0.1"
        [digests.fresh]
        pattern = "alerts.*"
        to = "ops@example.com"
        every = "1h"
        count = 3
    """)
    outcome = await reload(session)
    assert outcome["applied"] == ["digests.fresh", "digests.old"]
    assert outcome["schedules_changed"] == ["agentd.digest.fresh", "agentd.digest.old"]
    assert set(daemon.digests.specs) == {"fresh"}
    assert "agentd.digest.old" not in daemon.scheduler.schedules
    assert daemon.scheduler.schedules["agentd.digest.fresh"].spec.every == 3600.0
    # The new digest counts events from now on: three of them ask for a send (the reload
    # asked for one already, to check what the log holds).
    first = await queued.wait_for("task.queued", name="agentd.send_digest")
    for n in range(3):
        daemon.bus.publish("alerts.disk", {"n": n})
    counted = EventCapture(daemon.bus, "task.queued")
    if not any(e.data["name"] == "agentd.send_digest" and e.id != first.id for e in queued.events):
        await counted.wait_for("task.queued", name="agentd.send_digest")


async def test_webhooks_take_new_allow_networks_without_reusing_a_connection(
    tmp_path: Path, daemon_on_file: Callable[..., Any], client: Callable[..., Any],
) -> None:
    """Narrowed `[webhooks] allow_networks` apply to the next delivery, even to a receiver
    whose connection the last one kept alive (checked when it was opened, under the old
    networks)."""
    received: list[Any] = []

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", receive)
    runner = web.AppRunner(receiver)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        config = write_config(tmp_path / "agentd.toml", rest="""
            [webhooks]
            allow_networks = ["127.0.0.0/8"]
        """)
        daemon = await daemon_on_file(config)
        poster = daemon.services.webhooks
        assert (await poster.deliver(url, {"n": 1}, 1, "msg_1"))["status"] == 204
        write_config(config, rest="""
            [webhooks]
            allow_networks = []
        """)
        assert (await reload(client(daemon)))["applied"] == ["webhooks.allow_networks"]
        with pytest.raises(Fail, match="loopback"):
            await poster.deliver(url, {"n": 2}, 2, "msg_2")
        assert received == [{"n": 1}]
    finally:
        await runner.cleanup()


async def test_a_stream_open_across_a_reload_keeps_receiving(
    tmp_path: Path, daemon_on_file: Callable[..., Any], client: Callable[..., Any],
) -> None:
    config = write_config(tmp_path / "agentd.toml", rest="""
        [streams]
        client_buffer = 1000
    """)
    daemon = await daemon_on_file(config)
    session = client(daemon)
    async with session.get("/v1/stream", params={"topics": "demo.*, daemon.reloaded"}) as response:
        sse = Sse(response)
        await sse.opened()
        daemon.bus.publish("demo.before", {"n": 1})
        assert (await sse.next_event()).event == "demo.before"
        write_config(config, rest="""
            [streams]
            client_buffer = 50
            keepalive = 2.0
        """)
        outcome = await reload(session)
        assert outcome["applied"] == ["streams.client_buffer", "streams.keepalive"]
        reloaded = await sse.next_event()
        assert reloaded.event == "daemon.reloaded"
        assert reloaded.data["data"]["applied"] == outcome["applied"]
        daemon.bus.publish("demo.after", {"n": 2})
        after = await sse.next_event()
        assert after.event == "demo.after" and after.data["data"] == {"n": 2}


@pytest.mark.both_stores
async def test_schedules_are_added_and_removed_by_a_reload(
    tmp_path: Path, daemon_on_file: Callable[..., Any], client: Callable[..., Any],
) -> None:
    config = write_config(tmp_path / "agentd.toml", rest="""
        [[schedules]]
        id = "kept"
        every = "1h"
        event = "demo.kept"

        [[schedules]]
        id = "dropped"
        every = "1h"
        event = "demo.dropped"
    """)
    daemon = await daemon_on_file(config)
    session = client(daemon)
    made = await (await session.post("/v1/schedules", json={
        "id": "of-the-api", "every": "1h", "event": "demo.api"})).json()
    assert made["id"] == "of-the-api"
    write_config(config, rest="""
        [[schedules]]
        id = "kept"
        every = "1h"
        event = "demo.kept"

        [[schedules]]
        id = "added"
        cron = "0 3 * * *"
        event = "demo.added"
    """)
    outcome = await reload(session)
    assert outcome["applied"] == ["schedules.added", "schedules.dropped"]
    assert outcome["schedules_changed"] == ["added", "dropped"]
    async with session.get("/v1/schedules") as response:
        listed = {item["id"]: item for item in (await response.json())["schedules"]
                  if not item["id"].startswith("agentd.")}  # the built-in ones
    assert set(listed) == {"kept", "added", "of-the-api"}
    assert listed["added"]["source"] == "config" and listed["added"]["cron"] == "0 3 * * *"
    # What the daemon stored is what a restart starts from.
    stored = {state.spec.id for state in await daemon.scheduler.store.load()
              if not state.spec.id.startswith("agentd.")}
    assert stored == {"kept", "added", "of-the-api"}


# --------------------------------------------------------------------------- plugins


class Gate:
    """A loopback server a task of PLUGIN connects to: `entered` once it is running,
    and it returns once `release()` is called."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self._release = asyncio.Event()

    async def __aenter__(self) -> Gate:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.entered.set()
        await self._release.wait()
        writer.write(b"go\n")
        await writer.drain()
        writer.close()

    def release(self) -> None:
        self._release.set()


async def submit(session: aiohttp.ClientSession, args: dict[str, Any] | None = None) -> int:
    async with session.post("/v1/tasks", json={"name": "rl.work", "args": args or {}}) as response:
        assert response.status == 201, await response.text()
        task_id: int = (await response.json())["id"]
        return task_id


async def result(session: aiohttp.ClientSession, task_id: int) -> Any:
    async with session.get(f"/v1/tasks/{task_id}", params={"wait": "15"}) as response:
        task = await response.json()
    assert task["status"] == "succeeded", task
    return task["result"]


@pytest.mark.both_stores
async def test_a_running_task_finishes_on_the_old_code_and_new_tasks_run_the_new(
    tmp_path: Path, plugin_dir: Callable[..., Path], daemon_on_file: Callable[..., Any],
    client: Callable[..., Any],
) -> None:
    plugins = plugin_dir({"rl.py": PLUGIN.format(version=1)})
    config = write_config(tmp_path / "agentd.toml", plugins=plugins)
    daemon = await daemon_on_file(config)
    events = EventCapture(daemon.bus, "rl.*")
    session = client(daemon)
    async with Gate() as gate:
        running = await submit(session, {"port": gate.port})
        await asyncio.wait_for(gate.entered.wait(), 15)
        (plugins / "rl.py").write_text(PLUGIN.format(version=2))
        async with session.post("/v1/plugins/rl/reload") as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["state"] == "started" and answer["error"] is None
        assert await result(session, await submit(session)) == {"version": 2, "greeting": None}
        assert running in daemon.workers.running  # the old one still runs meanwhile
        gate.release()
        assert await result(session, running) == {"version": 1, "greeting": None}
    # The old code's shutdown hook ran before the new code's startup hook.
    assert [(e.topic, e.data["version"]) for e in events.events] == [
        ("rl.stopped", 1), ("rl.started", 2)]
    # Its handlers are the new code's alone: one pong, and one durable trigger task.
    triggers = EventCapture(daemon.bus, "task.succeeded")
    daemon.bus.publish("rl.ping", {})
    assert (await events.wait_for("rl.pong")).data == {"version": 2}
    await triggers.wait_for("task.succeeded", name="rl.durable_pong")
    async with session.get("/v1/tasks", params={"name": "rl.work"}) as response:
        names = [task["idempotency_key"] for task in (await response.json())["tasks"]]
    assert "durable-pong-2" in names and "durable-pong-1" not in names
    assert [e.topic for e in events.events].count("rl.pong") == 1


async def test_a_package_plugin_is_reloaded_with_its_submodules(
    tmp_path: Path, plugin_dir: Callable[..., Path], daemon_on_file: Callable[..., Any],
    client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each edit is the same length as what it replaces, at once: what Python's bytecode
    cache cannot tell from the file it cached (written here, as a deployment writes it,
    whatever PYTHONDONTWRITEBYTECODE the test run has)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    plugins = plugin_dir({
        "pk/__init__.py": """
            from agentd import Plugin

            from .helper import VERSION

            plugin = Plugin("pk")


            @plugin.task()
            async def version(ctx) -> int:
                return VERSION
        """,
        "pk/helper.py": "VERSION = 1\n",
    })
    config = write_config(tmp_path / "agentd.toml", plugins=plugins)
    daemon = await daemon_on_file(config)
    session = client(daemon)

    async def version() -> Any:
        async with session.post("/v1/tasks", json={"name": "pk.version"}) as response:
            task_id = (await response.json())["id"]
        return await result(session, task_id)

    assert await version() == 1
    for new in (2, 3):
        (plugins / "pk" / "helper.py").write_text(f"VERSION = {new}\n")
        async with session.post("/v1/plugins/pk/reload") as response:
            assert response.status == 200
        assert await version() == new


async def test_a_plugin_file_that_fails_to_import_is_refused_and_the_old_code_runs_on(
    tmp_path: Path, plugin_dir: Callable[..., Path], daemon_on_file: Callable[..., Any],
    client: Callable[..., Any], run_cli: Callable[..., Any], process_env: Callable[..., dict[str, str]],
) -> None:
    plugins = plugin_dir({"rl.py": PLUGIN.format(version=1)})
    config = write_config(tmp_path / "agentd.toml", plugins=plugins)
    daemon = await daemon_on_file(config)
    session = client(daemon)
    (plugins / "rl.py").write_text(PLUGIN.format(version=2) + "\ndef broken(:\n")
    async with session.post("/v1/plugins/rl/reload") as response:
        assert response.status == 422
        error = (await response.json())["error"]
    assert error["code"] == "plugin_refused" and "SyntaxError" in error["message"]
    assert await result(session, await submit(session)) == {"version": 1, "greeting": None}
    async with session.post("/v1/plugins/nobody/reload") as response:
        assert response.status == 404
    # `agentd plugins reload` says the same, and exits non-zero.
    env = process_env(AGENTD_SERVER_PORT=str(daemon.port))
    code, _, err = await run_cli("plugins", "reload", "rl", "--config", str(config), env=env)
    assert code == 1 and "SyntaxError" in err
    (plugins / "rl.py").write_text(PLUGIN.format(version=3))
    code, out, err = await run_cli("plugins", "reload", "rl", "--config", str(config), env=env)
    assert code == 0, err
    assert '"state": "started"' in out
    assert await result(session, await submit(session)) == {"version": 3, "greeting": None}


async def test_a_changed_plugin_table_reloads_that_plugin(
    tmp_path: Path, plugin_dir: Callable[..., Path], daemon_on_file: Callable[..., Any],
    client: Callable[..., Any],
) -> None:
    plugins = plugin_dir({"rl.py": PLUGIN.format(version=1)})
    config = write_config(tmp_path / "agentd.toml", plugins=plugins, rest="""
        [plugins.rl]
        greeting = "hello"
    """)
    daemon = await daemon_on_file(config)
    session = client(daemon)
    assert await result(session, await submit(session)) == {"version": 1, "greeting": "hello"}
    write_config(config, plugins=plugins, rest="""
        [plugins.rl]
        greeting = "bonjour"
    """)
    outcome = await reload(session)
    assert outcome["applied"] == ["plugins.rl"] and outcome["plugins_reloaded"] == ["rl"]
    assert await result(session, await submit(session)) == {"version": 1, "greeting": "bonjour"}


async def test_the_metrics_token_changes_live(
    tmp_path: Path, daemon_on_file: Callable[..., Any], client: Callable[..., Any],
) -> None:
    config = write_config(tmp_path / "agentd.toml", rest='[metrics]\ntoken = "scrape-old-0123456789"\n')
    daemon = await daemon_on_file(config)
    write_config(config, rest='[metrics]\ntoken = "scrape-new-0123456789"\n')
    outcome = await reload(client(daemon))
    assert (outcome["applied"], outcome["restart_required"]) == (["metrics.token"], [])
    for token, status in (("scrape-old-0123456789", 401), ("scrape-new-0123456789", 200)):
        async with client(daemon, token).get("/metrics") as response:
            assert response.status == status
