"""Safe mode: a real `agentd run`, whose plugin kills it as it starts, serves its third start
without plugins, workers or scheduler, says why in its log, /healthz, /readyz, /v1/status and
`agentd status`, and stays so until an operator clears it. Stops asked for and starts that
lasted never count. Every wait is on the daemon's output or its HTTP answers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import socket
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from agentd.app import Daemon
from agentd.config import load_config
from agentd.errors import ConfigError
from agentd.safemode import JOURNAL_NAME, SafeMode, StartJournal, StartRecord
from agentd.testing import daemon_url, make_config
from conftest import PROCESS_TIMEOUT, AgentdProcess, with_store

# Killed at import, as a plugin with a fatal bug (a crashing C extension, os._exit) would be.
KILLER = """
import os
import signal

os.kill(os.getpid(), signal.SIGKILL)
"""

# The killer, fixed.
FIXED = """
from agentd import Plugin

plugin = Plugin("boom")


@plugin.task()
async def ping(ctx):
    return "pong"
"""

# Kills the daemon at import only while the file `kill` is next to agentd.toml.
KILL_WHILE_FILE = """
import os
import signal
from pathlib import Path

from agentd import Plugin

if (Path.cwd() / "kill").exists():
    os.kill(os.getpid(), signal.SIGKILL)

plugin = Plugin("boom")
"""


def write_setup(root: Path, plugin: str, safe_mode_after: float = 30.0) -> Path:
    """agentd.toml with all state under `root` and the plugin `boom` in root/plugins."""
    (root / "plugins").mkdir(exist_ok=True)
    (root / "plugins" / "boom.py").write_text(textwrap.dedent(plugin).lstrip())
    config = root / "agentd.toml"
    config.write_text(textwrap.dedent(f"""
        [daemon]
        data_dir = "data"
        stop_timeout = 5.0
        safe_mode_after = {safe_mode_after}

        [plugins]
        paths = ["plugins"]
        entry_points = false
        """))
    return config


async def get(port: int, path: str) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
            f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.json()


async def post(port: int, path: str) -> tuple[int, Any]:
    timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
            f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.json()


async def crash(agentd_process: Callable[..., Any], config: Path) -> None:
    """One start that the plugin kills."""
    child: AgentdProcess = await agentd_process("run", "--config", str(config))
    assert await child.finish() == -signal.SIGKILL, child.stderr
    assert not any(record["event"] == "daemon.started" for record in child.records())


async def serve(agentd_process: Callable[..., Any], config: Path, *args: str,
                env: dict[str, str] | None = None) -> tuple[AgentdProcess, int]:
    child: AgentdProcess = await agentd_process("run", "--config", str(config), *args, env=env)
    return child, await child.started()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: (socket, path)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()


async def receive(sock: socket.socket) -> str:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), PROCESS_TIMEOUT)
    return data.decode()


def plugin_names(health: dict[str, Any]) -> list[str]:
    return [plugin["name"] for plugin in health["plugins"]]


async def test_the_third_start_after_two_crashes_serves_in_safe_mode_until_cleared_by_the_api(
    tmp_path: Path, agentd_process: Callable[..., Any], run_cli: Callable[..., Any],
    process_env: Callable[..., Any],
) -> None:
    config = write_setup(tmp_path, KILLER)
    await crash(agentd_process, config)
    await crash(agentd_process, config)

    child, port = await serve(agentd_process, config)
    logged = next(r for r in child.records() if r["event"] == "daemon.safe_mode")
    assert logged["level"] == "warning"
    assert "the last 2 starts ended" in logged["reason"]
    assert len(logged["crashes"]) == 2
    assert "--no-safe-mode" in logged["clear"]
    assert not any(r["event"] == "plugin.loaded" for r in child.records())
    assert next(r for r in child.records() if r["event"] == "daemon.started")["safe_mode"] is True

    status, health = await get(port, "/healthz")
    assert (status, health["status"], plugin_names(health)) == (200, "degraded", [])
    assert health["safe_mode"]["reason"] == logged["reason"]
    assert health["safe_mode"]["cleared"] is False
    assert [crash["pid"] for crash in health["safe_mode"]["crashes"]] == [
        crash["pid"] for crash in logged["crashes"]]
    status, ready = await get(port, "/readyz")
    assert (status, ready["checks"]["safe_mode"]["ok"]) == (503, False)
    _, daemon_status = await get(port, "/v1/status")
    assert daemon_status["safe_mode"]["reason"] == logged["reason"]
    loops = {loop["name"] for loop in daemon_status["loops"]}
    assert "scheduler" not in loops and not any(name.startswith("claim:") for name in loops)

    code, out, err = await run_cli("status", "--config", str(config),
                                   env=process_env(AGENTD_SERVER_PORT=str(port)))
    assert code == 0
    assert json.loads(out)["safe_mode"]["reason"] == logged["reason"]
    assert "serves in safe mode" in err and "--no-safe-mode" in err

    status, cleared = await post(port, "/v1/safe-mode/clear")
    assert (status, cleared) == (200, {"was_recorded": True, "safe_mode": True,
                                       "next_start": "normal"})
    # This process stays in safe mode: its plugins were never loaded.
    _, health = await get(port, "/healthz")
    assert health["safe_mode"]["cleared"] is True and plugin_names(health) == []
    assert await child.finish(signal.SIGTERM) == 0

    (tmp_path / "plugins" / "boom.py").write_text(FIXED)  # the operator's fix
    child, port = await serve(agentd_process, config)
    _, health = await get(port, "/healthz")
    assert (health["status"], health["safe_mode"], plugin_names(health)) == ("ok", None, ["boom"])
    assert (await get(port, "/readyz"))[0] == 200
    assert await child.finish(signal.SIGTERM) == 0


async def test_safe_mode_outlasts_clean_restarts_until_run_with_no_safe_mode(
    tmp_path: Path, agentd_process: Callable[..., Any], process_env: Callable[..., Any],
    notify_socket: tuple[socket.socket, str],
) -> None:
    config = write_setup(tmp_path, KILLER)
    await crash(agentd_process, config)
    await crash(agentd_process, config)
    sock, path = notify_socket
    child, port = await serve(agentd_process, config, env=process_env(NOTIFY_SOCKET=path))
    assert (await get(port, "/v1/status"))[1]["safe_mode"] is not None
    # What `systemctl status agentd` shows: at READY=1, then in every status line.
    assert (await receive(sock)).splitlines() == [
        "READY=1", f"STATUS=serving on 127.0.0.1:{port} in safe mode"]
    assert re.fullmatch(r"STATUS=safe mode: 0 running, 0 queued, 0 streams, lag \d+ ms",
                        await receive(sock))
    assert await child.finish(signal.SIGTERM) == 0

    (tmp_path / "plugins" / "boom.py").write_text(FIXED)
    child, port = await serve(agentd_process, config)  # fixed, but not cleared
    _, health = await get(port, "/healthz")
    assert health["safe_mode"] is not None and plugin_names(health) == []
    assert await child.finish(signal.SIGTERM) == 0

    child, port = await serve(agentd_process, config, "--no-safe-mode")
    cleared = next(r for r in child.records() if r["event"] == "daemon.safe_mode_cleared")
    assert cleared["by"] == "agentd run --no-safe-mode"
    _, health = await get(port, "/healthz")
    assert (health["safe_mode"], plugin_names(health)) == (None, ["boom"])
    assert await child.finish(signal.SIGTERM) == 0

    child, port = await serve(agentd_process, config)  # the record was reset for good
    assert (await get(port, "/healthz"))[1]["safe_mode"] is None
    assert await child.finish(signal.SIGTERM) == 0


async def test_starts_stopped_at_once_by_sigterm_never_count_as_crashes(
    tmp_path: Path, agentd_process: Callable[..., Any],
) -> None:
    config = write_setup(tmp_path, FIXED)
    for _ in range(3):
        child, port = await serve(agentd_process, config)
        assert (await get(port, "/healthz"))[1]["safe_mode"] is None
        assert await child.finish(signal.SIGTERM) == 0
    record = json.loads((tmp_path / "data" / JOURNAL_NAME).read_text())
    assert [start["outcome"] for start in record["starts"]] == ["stopped"] * 3


async def test_a_start_that_served_safe_mode_after_seconds_ends_the_run_of_crashes(
    tmp_path: Path, agentd_process: Callable[..., Any],
) -> None:
    config = write_setup(tmp_path, KILL_WHILE_FILE, safe_mode_after=0.5)
    kill = tmp_path / "kill"
    kill.touch()
    await crash(agentd_process, config)
    kill.unlink()
    child, _ = await serve(agentd_process, config)
    await child.wait_for_log("daemon.start_survived")
    child.proc.kill()  # killed after it lasted: not a start that crashed
    await child.finish()
    kill.touch()
    await crash(agentd_process, config)
    kill.unlink()
    # Two kills in a row, but the first ended after the start had lasted: one crash only.
    child, port = await serve(agentd_process, config)
    _, health = await get(port, "/healthz")
    assert (health["safe_mode"], plugin_names(health)) == (None, ["boom"])
    assert await child.finish(signal.SIGTERM) == 0


async def test_clear_without_safe_mode_forgets_the_crashes_and_says_nothing_was_recorded(
    tmp_path: Path, agentd_process: Callable[..., Any],
) -> None:
    config = write_setup(tmp_path, KILL_WHILE_FILE)
    kill = tmp_path / "kill"
    kill.touch()
    await crash(agentd_process, config)
    kill.unlink()
    child, port = await serve(agentd_process, config)  # one crash so far: a normal start
    status, cleared = await post(port, "/v1/safe-mode/clear")
    assert (status, cleared) == (200, {"was_recorded": False, "safe_mode": False,
                                       "next_start": "normal"})
    child.proc.kill()  # a second crash, but the first was forgotten
    await child.finish()
    child, port = await serve(agentd_process, config)
    assert (await get(port, "/healthz"))[1]["safe_mode"] is None
    assert await child.finish(signal.SIGTERM) == 0


def test_safe_mode_after_must_be_positive(tmp_path: Path) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text("[daemon]\nsafe_mode_after = 0\n")
    with pytest.raises(ConfigError, match=r"agentd.toml: \[daemon\] safe_mode_after: expected a positive"):
        load_config(path)


@pytest.mark.both_stores
async def test_in_safe_mode_no_plugin_worker_or_scheduler_starts_and_the_stop_is_clean(
    tmp_path: Path, plugin_dir: Callable[..., Path], store_url: str | None,
) -> None:
    plugins = plugin_dir({"boom.py": FIXED})
    config = make_config(tmp_path, [plugins], with_store(None, store_url))
    async with Daemon(config):  # a normal start stores the declared schedules
        pass
    safe_mode = SafeMode("the last 2 starts ended ...", 1.0, (StartRecord(7, 1.0),))
    daemon = Daemon(config, safe_mode=safe_mode)
    async with daemon:
        assert daemon.plugins.states() == []
        assert "boom.ping" not in daemon.registry.names()
        loops = {loop["name"] for loop in daemon.supervisor.describe()}
        assert "scheduler" not in loops and "task-heartbeat" not in loops
        assert not any(name.startswith("claim:") for name in loops)
        # The schedules are shown and can be paused, but none fires.
        assert "agentd.purge_tasks" in daemon.scheduler.schedules
        await daemon.scheduler.set_paused("agentd.purge_tasks", True)
        assert await daemon.clear_safe_mode() is None  # nothing recorded in this data_dir
        assert daemon.safe_mode == dataclasses.replace(safe_mode, cleared=True)
    assert daemon.store.closed
    async with Daemon(config) as daemon:  # the pause outlasts safe mode
        assert daemon.scheduler.schedules["agentd.purge_tasks"].paused


# --------------------------------------------------------------------------- the record itself
# Each `StartJournal(config).begin()` below stands for one process's start; one that is not
# marked afterwards is a process that vanished (this test's own pid never counts as alive).


def begin(config: Any) -> SafeMode | None:
    return StartJournal(config).begin()


def test_two_unmarked_starts_put_the_third_in_safe_mode_and_zero_starts_turns_it_off(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    assert begin(config) is None
    assert begin(config) is None
    safe_mode = begin(config)
    assert safe_mode is not None and len(safe_mode.crashes) == 2
    assert begin(config) == safe_mode  # kept as it was entered, until cleared
    off = make_config(tmp_path, overrides={"daemon": {"safe_mode_starts": 0}})
    assert begin(off) is None  # a recorded safe mode included


async def test_a_start_whose_process_still_runs_is_not_a_crash(tmp_path: Path) -> None:
    config = make_config(tmp_path, overrides={"daemon": {"safe_mode_starts": 1}})
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=asyncio.subprocess.PIPE)
    try:
        journal = StartJournal(config)
        assert journal.begin() is None
        record = json.loads(journal.path.read_text())
        record["starts"][0]["pid"] = other.pid  # another daemon, started moments ago
        journal.path.write_text(json.dumps(record))
        assert begin(config) is None
    finally:
        assert other.stdin is not None
        other.stdin.close()
        await other.wait()


def test_an_unreadable_record_is_started_afresh(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    journal = StartJournal(config)
    journal.path.parent.mkdir(parents=True)
    journal.path.write_text("{not json")
    with structlog.testing.capture_logs() as logs:
        assert journal.begin() is None
    assert [log["event"] for log in logs] == ["daemon.start_record_unreadable"]
    assert len(json.loads(journal.path.read_text())["starts"]) == 1


async def test_memory_with_a_plugins_embedder_stays_closed_in_safe_mode_and_the_rest_serves(
    tmp_path: Path, plugin_dir: Callable[..., Path],
) -> None:
    plugins = plugin_dir({"vec.py": """
        from agentd import Plugin

        plugin = Plugin("vec")


        class Embedder:
            id, dimension = "vec-2", 2

            async def embed(self, texts):
                return [[1.0, 0.0] for _ in texts]


        @plugin.embedder("vec")
        def make(config):
            return Embedder()
        """})
    config = make_config(tmp_path, [plugins], {"memory": {"embedder": "vec"}})
    safe_mode = SafeMode("the last 2 starts ended ...", 1.0, ())
    async with Daemon(config, safe_mode=safe_mode) as daemon:
        assert daemon.memory is None
        async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{daemon.port}/v1/memory/stats") as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "memory_unavailable"


async def test_a_reload_in_safe_mode_leaves_plugins_workers_and_scheduler_off(
    tmp_path: Path, plugin_dir: Callable[..., Path],
) -> None:
    """A reload applies the file's live keys but starts nothing safe mode keeps off: a
    changed plugin table, a queue's workers, a new schedule; a plugin reload is refused."""
    plugins = plugin_dir({"boom.py": FIXED})
    path = tmp_path / "agentd.toml"
    path.touch(mode=0o600)
    path.write_text(f'[server]\nport = 0\n[daemon]\ndata_dir = "data"\n'
                    f'[plugins]\npaths = [{str(plugins)!r}]\n')
    daemon = Daemon(load_config(path), safe_mode=SafeMode("crashed", 1.0, (StartRecord(7, 1.0),)))
    async with daemon, aiohttp.ClientSession(daemon_url(daemon)) as http:
        path.write_text(path.read_text() + '[plugins.boom]\nanswer = 2\n[tasks]\nqueues = { default = 4 }\n'
                        '[[schedules]]\nid = "often"\nevery = 1\ntask = "agentd.purge_tasks"\n')
        async with http.post("/v1/reload") as response:
            assert response.status == 200
            outcome = await response.json()
        assert set(outcome["applied"]) == {"plugins.boom", "tasks.queues.default", "schedules.often"}
        assert outcome["plugins_reloaded"] == []
        async with http.post("/v1/plugins/boom/reload") as response:
            assert response.status == 409
            assert (await response.json())["error"]["code"] == "safe_mode"
        assert daemon.plugins.states() == []
        loops = {loop["name"] for loop in daemon.supervisor.describe()}
        assert "scheduler" not in loops and not any(name.startswith("claim:") for name in loops)
