"""`agentd run` as a real process: start, serve, signals, readiness notification, exit codes,
all-or-nothing start; and the same guarantees of `Daemon` in process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agentd import __version__
from agentd.app import Daemon
from agentd.errors import ConfigError, StoreLockedError
from agentd.testing import EventCapture, make_config

TIMEOUT = 15.0


async def get_json(port: int, path: str) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
        f"http://127.0.0.1:{port}{path}"
    ) as response:
        return response.status, await response.json()


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port with a listening socket on it: nobody else can bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A bound but not listening port: connecting to it is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    assert len(path) < 100, "AF_UNIX paths are limited to 108 bytes"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()


async def receive(sock: socket.socket) -> str:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), TIMEOUT)
    return data.decode()


# --------------------------------------------------------------------------- run, serve, stop


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_run_serves_then_stops_on_signal(
    agentd_process: Callable[..., Any], config_file: Callable[..., Path], sig: signal.Signals
) -> None:
    config = config_file()
    child = await agentd_process("run", "--config", str(config))
    port = await child.started()
    assert port > 0

    status, health = await get_json(port, "/healthz")
    assert status == 200
    assert health["status"] == "ok"
    status, body = await get_json(port, "/v1/status")
    assert status == 200
    assert body["pid"] == child.pid
    assert body["config"] == str(config)
    assert body["store"]["path"] == str(config.parent / "data" / "agentd.db")

    assert await child.finish(sig) == 0
    events = [record["event"] for record in child.records()]
    assert events.index("daemon.started") < events.index("daemon.stopping") < events.index("daemon.stopped")
    assert events[-1] == "daemon.stopped"
    assert child.stderr == ""


async def test_every_stdout_line_is_json_with_a_component(
    agentd_process: Callable[..., Any], config_file: Callable[..., Path], plugin_dir: Callable[..., Path]
) -> None:
    # A plugin that logs through its own logger and through the stdlib, and fails once.
    plugins = plugin_dir({"chatty.py": """
        import logging
        from agentd import Plugin

        plugin = Plugin("chatty")

        @plugin.startup
        def start(ctx):
            ctx.log.info("chatty.hello", n=1)
            logging.getLogger("some.library").warning("stdlib says %s", "hi")

        @plugin.on("daemon.started")
        async def fail(ctx, event):
            raise RuntimeError("handler failure with a traceback")
    """})
    config = config_file('\n[plugins.chatty]\nx = 1\n[log]\nlevel = "debug"\n', name="c.toml")
    config.write_text(config.read_text().replace("paths = []", f"paths = [{str(plugins)!r}]"))
    child = await agentd_process("run", "--config", str(config))
    port = await child.started()
    await get_json(port, "/v1/status")  # an access log line
    await child.wait_for_log("handler.failed")
    assert await child.finish(signal.SIGTERM) == 0
    records = child.records()  # json.loads of every line: raises on a non-JSON line
    assert len(records) == len(child.lines) > 5
    assert all(isinstance(r, dict) and r.get("component") for r in records), [
        line for line, r in zip(child.lines, records, strict=True) if not r.get("component")
    ]
    by_event = {r["event"]: r for r in records}
    assert by_event["chatty.hello"]["component"] == "plugin"
    assert by_event["chatty.hello"]["plugin"] == "chatty"
    assert by_event["stdlib says hi"]["component"] == "some.library"
    assert by_event["handler.failed"]["handler"] == "chatty.fail"
    assert by_event["handler.failed"]["exception"][0]["exc_type"] == "RuntimeError"
    assert any(r["event"] == "http.request" and r["component"] == "http" for r in records)


async def test_sd_notify_ready_and_stopping(
    agentd_process: Callable[..., Any],
    config_file: Callable[..., Path],
    process_env: Callable[..., dict[str, str]],
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    child = await agentd_process("run", "--config", str(config_file()), env=process_env(NOTIFY_SOCKET=path))
    ready = await receive(sock)
    port = await child.started()
    assert ready.splitlines() == ["READY=1", f"STATUS=serving on 127.0.0.1:{port}"]
    # READY means serving: the API answers now.
    assert (await get_json(port, "/readyz"))[0] == 200
    # What it is doing, every few seconds; the first line at once.
    assert re.fullmatch(r"STATUS=0 running, 0 queued, 0 streams, lag \d+ ms", await receive(sock))
    child.proc.send_signal(signal.SIGTERM)
    # stop_timeout = 5: 12 stages of 5 s at most, 5 s more before agentd ends itself.
    assert (await receive(sock)).splitlines() == [
        "STOPPING=1", "STATUS=stopping (within 60 s)", "EXTEND_TIMEOUT_USEC=65000000"]
    assert await child.finish() == 0


async def test_a_signal_during_start_stops_the_daemon_once_started(
    agentd_process: Callable[..., Any],
    config_file: Callable[..., Path],
    plugin_dir: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """systemd may send SIGTERM at any time, also while agentd is starting: the start then
    completes (all-or-nothing) and the staged stop follows; the process is not just killed."""
    plugins = plugin_dir({"gate.py": """
        import asyncio
        from agentd import Plugin

        plugin = Plugin("gate")

        @plugin.startup
        async def wait_for_release(ctx):
            reader, writer = await asyncio.open_unix_connection(ctx.config["socket"])
            await reader.read(1)
            writer.close()
            await writer.wait_closed()
    """})
    gate_path = str(tmp_path / "gate.sock")
    connections: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
    server = await asyncio.start_unix_server(
        lambda _reader, writer: connections.put_nowait(writer), gate_path
    )
    config = config_file(f"\n[plugins.gate]\nsocket = {gate_path!r}\n")
    config.write_text(config.read_text().replace("paths = []", f"paths = [{str(plugins)!r}]"))
    try:
        child = await agentd_process("run", "--config", str(config))
        writer = await asyncio.wait_for(connections.get(), TIMEOUT)  # inside Daemon.start now
        child.proc.send_signal(signal.SIGTERM)
        writer.write(b"x")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        code = await child.finish()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert code == 0, child.stderr
    events = [record["event"] for record in child.records()]
    assert events.index("daemon.started") < events.index("daemon.stopping")
    assert events[-1] == "daemon.stopped"


# --------------------------------------------------------------------------- refusing to start


async def test_run_with_a_bad_config_exits_2(
    run_cli: Callable[..., Any], config_file: Callable[..., Path]
) -> None:
    config = config_file("\n[server]\nprot = 8000\n")
    code, out, err = await run_cli("run", "--config", str(config))
    assert code == 2
    assert out == ""
    assert err.startswith(f"agentd: configuration error: {config}: [server] unknown key 'prot'")


async def test_run_with_a_bad_env_override_exits_2(
    run_cli: Callable[..., Any], config_file: Callable[..., Path], process_env: Callable[..., Any]
) -> None:
    env = process_env(AGENTD_STORE_SYNCHRONOUS="sometimes")
    code, _, err = await run_cli("run", "--config", str(config_file()), env=env)
    assert code == 2
    assert "environment AGENTD_STORE_SYNCHRONOUS" in err


@pytest.mark.parametrize("command", ["run", "check-config"])
async def test_non_loopback_without_token_exits_2(
    run_cli: Callable[..., Any], config_file: Callable[..., Path], command: str
) -> None:
    config = config_file('\n[server]\nhost = "0.0.0.0"\n')
    code, _, err = await run_cli(command, "--config", str(config))
    assert code == 2
    assert str(config) in err
    assert "[server] host = '0.0.0.0' is not a loopback address" in err
    assert not (config.parent / "data").exists()  # refused before touching any state


async def test_check_config_as_a_process(
    run_cli: Callable[..., Any], config_file: Callable[..., Path]
) -> None:
    config = config_file()
    code, out, err = await run_cli("check-config", "--config", str(config))
    assert (code, err) == (0, "")
    assert out.startswith(f"{config}: ok (database {config.parent / 'data' / 'agentd.db'}")
    code, _, err = await run_cli("check-config", "--config", str(config.parent / "missing.toml"))
    assert code == 2
    assert f"{config.parent / 'missing.toml'}: configuration file not found" in err


async def test_port_in_use_fails_the_start_and_releases_the_lock(
    agentd_process: Callable[..., Any],
    run_cli: Callable[..., Any],
    config_file: Callable[..., Path],
    process_env: Callable[..., Any],
    taken_port: int,
) -> None:
    config = config_file()
    code, out, err = await run_cli("run", "--config", str(config),
                                   env=process_env(AGENTD_SERVER_PORT=str(taken_port)))
    assert code == 1
    assert err.startswith("agentd: cannot start: ")
    assert f"('127.0.0.1', {taken_port})" in err
    assert "address already in use" in err
    assert "daemon.started" not in out
    # The same data dir starts fine right after.
    child = await agentd_process("run", "--config", str(config))
    await child.started()
    assert await child.finish(signal.SIGTERM) == 0


async def test_second_process_on_the_same_data_dir_is_refused(
    agentd_process: Callable[..., Any], run_cli: Callable[..., Any], config_file: Callable[..., Path]
) -> None:
    config = config_file()
    first = await agentd_process("run", "--config", str(config))
    await first.started()
    code, out, err = await run_cli("run", "--config", str(config))
    assert code != 0
    assert f"pid {first.pid}" in err
    assert "daemon.started" not in out
    assert (await get_json(int(first.records()[-1]["port"]), "/healthz"))[0] == 200  # unharmed
    assert await first.finish(signal.SIGTERM) == 0


# --------------------------------------------------------------------------- agentd status


async def test_status_prints_the_running_daemons_json(
    agentd_process: Callable[..., Any],
    run_cli: Callable[..., Any],
    config_file: Callable[..., Path],
    process_env: Callable[..., Any],
) -> None:
    config = config_file()
    child = await agentd_process("run", "--config", str(config))
    port = await child.started()
    code, out, err = await run_cli("status", "--config", str(config),
                                   env=process_env(AGENTD_SERVER_PORT=str(port)))
    assert (code, err) == (0, "")
    status = json.loads(out)
    assert status["pid"] == child.pid
    assert status["version"] == __version__
    assert status["stopping"] is False
    assert await child.finish(signal.SIGTERM) == 0


async def test_status_sends_the_token(
    agentd_process: Callable[..., Any],
    run_cli: Callable[..., Any],
    config_file: Callable[..., Path],
    process_env: Callable[..., Any],
) -> None:
    config = config_file('\n[server]\ntoken = "tok"\n')
    config.chmod(0o600)  # a file giving a secret inline must not be open to others
    child = await agentd_process("run", "--config", str(config))
    port = await child.started()
    assert (await get_json(port, "/v1/status"))[0] == 401
    env = process_env(AGENTD_SERVER_PORT=str(port))
    code, _, _ = await run_cli("status", "--config", str(config), env=env)
    assert code == 0
    assert await child.finish(signal.SIGTERM) == 0


async def test_status_without_a_daemon_exits_1(
    run_cli: Callable[..., Any], config_file: Callable[..., Path], process_env: Callable[..., Any],
    closed_port: int,
) -> None:
    code, out, err = await run_cli("status", "--config", str(config_file()),
                                   env=process_env(AGENTD_SERVER_PORT=str(closed_port)))
    assert code == 1
    assert out == ""
    assert err.startswith("agentd: no daemon answers ")
    assert f"127.0.0.1:{closed_port}" in err


# --------------------------------------------------------------------------- in process


async def test_daemon_start_is_all_or_nothing(
    tmp_path: Path, plugin_dir: Callable[..., Path], taken_port: int
) -> None:
    plugins = plugin_dir({"hooks.py": """
        from agentd import Plugin
        plugin = Plugin("hooks")

        @plugin.shutdown
        def stop(ctx):
            ctx.publish("test.hooks.stopped")
    """})
    failing = Daemon(make_config(tmp_path, [plugins], {"server": {"port": taken_port}}))
    events = EventCapture(failing.bus)
    with pytest.raises(OSError, match="address already in use"):
        await failing.start()
    # What had started was stopped again: the plugin's shutdown hook ran ...
    assert "test.hooks.stopped" in events.topics()
    assert "daemon.started" not in events.topics()
    # ... and the store's lock was released: the same data dir starts now.
    async with Daemon(make_config(tmp_path, [plugins])) as daemon:
        assert daemon.port > 0
        assert daemon.port != taken_port


async def test_second_daemon_in_process_is_locked_out(tmp_path: Path) -> None:
    async with Daemon(make_config(tmp_path)) as first:
        second = Daemon(make_config(tmp_path))
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            await second.start()
        status, _ = await get_json(first.port, "/healthz")
        assert status == 200


def test_daemon_refuses_non_loopback_without_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a loopback address"):
        Daemon(make_config(tmp_path, overrides={"server": {"host": "0.0.0.0"}}))


async def test_stop_is_idempotent_and_request_stop_wakes_waiters(tmp_path: Path) -> None:
    daemon = Daemon(make_config(tmp_path))
    events = EventCapture(daemon.bus)
    async with daemon:
        waiter = asyncio.create_task(daemon.wait_stopped())
        daemon.request_stop()
        await asyncio.wait_for(waiter, 5)
        assert not daemon.stopping  # request_stop only sets the flag
    await daemon.stop()
    assert events.topics().count("daemon.stopping") == 1


async def test_starting_and_stopping_raises_no_warnings(tmp_path: Path) -> None:
    """filterwarnings=error turns a warning into an exception where it is raised, which may
    be inside a callback whose exception is only logged; recording them all is certain."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with Daemon(make_config(tmp_path)) as daemon:
            await get_json(daemon.port, "/healthz")
    assert [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught] == []
