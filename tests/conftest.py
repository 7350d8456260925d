"""Shared fixtures: a clean environment, plugin directories, HTTP clients, daemons and
`agentd` subprocesses. Everything is real: files under tmp_path, sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import structlog

if TYPE_CHECKING:
    from agentd.app import Daemon

REPO = Path(__file__).resolve().parent.parent
# A subprocess must be up within this many seconds (imports + store + HTTP take well under 1 s).
PROCESS_TIMEOUT = 15.0
_OUR_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")


def _is_ours(name: str) -> bool:
    return name.startswith("AGENTD_") or name in _OUR_ENV


# xdist workers the whole suite runs on unless the command line says how many (`-n 0` runs it
# in this process, as does `-p no:xdist`). Half of a serial run's time goes to waiting:
# subprocesses starting, daemons stopping, deadlines running out; a second worker fills it.
WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Run on WORKERS xdist workers unless `-n` says otherwise, scheduled by `xdist_group`
    (see HEAVY), when xdist is installed and no distribution mode was chosen. Set here, not
    in pyproject's addopts, so that `-p no:xdist` still runs the suite (with `-n` in addopts
    it is a usage error), and `--pdb` too (which needs the tests in this process)."""
    if (not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput")
            or config.option.collectonly or config.option.usepdb
            or config.option.dist != "no" or config.option.distload):
        return
    if config.option.numprocesses is None:
        config.option.numprocesses = WORKERS
    if config.option.numprocesses:  # not -n 0
        config.option.dist = "loadgroup"


# The tests that load both cores by themselves (floods, load under faults, the fuzzer): one
# xdist group, so they run one after another on one worker while the other runs the rest.
# Two at once, their timing bounds would be measured on half a machine. The group is
# scheduled first (xdist hands out the largest group first), so it cannot be the run's tail.
HEAVY = pytest.mark.xdist_group("heavy")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AGENTD_* override or systemd variable of the caller's shell leaks into a test."""
    for name in list(os.environ):
        if _is_ours(name):
            monkeypatch.delenv(name)


# --------------------------------------------------------------------------- plugins


PluginDirFactory = Callable[..., Path]


@pytest.fixture
def plugin_dir(tmp_path: Path) -> PluginDirFactory:
    """`plugin_dir({"hello.py": "...", "pkg/__init__.py": "..."}, name="plugins")` writes the
    files (dedented) into tmp_path/<name> and returns that directory."""

    def make(files: Mapping[str, str], name: str = "plugins") -> Path:
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        for relative, text in files.items():
            target = root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(textwrap.dedent(text).lstrip())
        return root

    return make


# --------------------------------------------------------------------------- daemons & HTTP


# --------------------------------------------------------------------------- both stores

STORES = ("sqlite", "postgres")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test marked `both_stores` (or in a module so marked) that uses `store_url` (through
    `start_daemon`, say) runs twice: on SQLite and on a fresh PostgreSQL database. One
    marked `sqlite_only` too runs on SQLite alone: it looks at what only SQLite has."""
    if ("store_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_stores")
            and not metafunc.definition.get_closest_marker("sqlite_only")):
        metafunc.parametrize("store_url", STORES, indirect=True)


@pytest.fixture
async def store_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite, the default), or the URL of a fresh, migrated PostgreSQL database of
    this test's own on the session's throwaway server (tests/pg.py)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return None
    from pg import fresh_database

    return await fresh_database()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from pg import stop_server

    stop_server()


def with_store(overrides: Mapping[str, Mapping[str, Any]] | None,
               store_url: str | None) -> Mapping[str, Mapping[str, Any]] | None:
    """`overrides` with `[store] url` set to `store_url` (unless they set it), for daemons
    started on the test's store."""
    if store_url is None or (overrides and "url" in overrides.get("store", {})):
        return overrides
    merged = {section: dict(table) for section, table in (overrides or {}).items()}
    merged.setdefault("store", {})["url"] = store_url
    return merged


@pytest.fixture
async def start_daemon(tmp_path: Path, store_url: str | None) -> AsyncIterator[Callable[..., Any]]:
    """`daemon, events = await start_daemon(plugin_dirs=[...], overrides={...})`: a real daemon
    on 127.0.0.1 with an OS-chosen port, its bus captured from before the start (so plugin
    startup events are seen), stopped at teardown unless the test stopped it. On the test's
    store: SQLite, or PostgreSQL in a `both_stores` test's second run."""
    from agentd.app import Daemon
    from agentd.testing import EventCapture, make_config

    async with AsyncExitStack() as stack:

        async def start(
            plugin_dirs: Sequence[Path] = (),
            overrides: Mapping[str, Mapping[str, Any]] | None = None,
            state_dir: Path | None = None,
        ) -> tuple[Daemon, EventCapture]:
            daemon = Daemon(make_config(state_dir or tmp_path, plugin_dirs,
                                        with_store(overrides, store_url)))
            events = EventCapture(daemon.bus)
            await stack.enter_async_context(daemon)
            # Its own start events reach the stream bus only once committed on PostgreSQL:
            # a stream opened just after the start would otherwise see them come in.
            await daemon.eventlog.settle()
            return daemon, events

        yield start


@pytest.fixture
async def http() -> AsyncIterator[Callable[..., aiohttp.ClientSession]]:
    """`client = http(daemon, token=None)`: an aiohttp session on the daemon's URL."""
    from agentd.testing import daemon_url

    sessions: list[aiohttp.ClientSession] = []

    def open_session(daemon: Daemon, token: str | None = None) -> aiohttp.ClientSession:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        session = aiohttp.ClientSession(
            daemon_url(daemon), headers=headers, timeout=aiohttp.ClientTimeout(total=10)
        )
        sessions.append(session)
        return session

    yield open_session
    for session in sessions:
        await session.close()


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """For a test whose code calls `configure_logging` (the CLI run in process): its global
    changes are undone afterwards, so later tests do not log into a closed capture.

    structlog's configuration is put back in place, not reset: a daemon module's logger
    first used during the test is cached with the configured processors list, and must
    stay on the one list that later tests' capture_logs changes."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    config = structlog.get_config()
    processors = list(config["processors"])
    yield
    configured = structlog.get_config()["processors"]
    configured[:] = processors
    structlog.configure(**{**config, "processors": configured})
    root.handlers[:] = handlers
    root.setLevel(level)


# --------------------------------------------------------------------------- subprocesses


def _process_env(**extra: str) -> dict[str, str]:
    """The caller's environment without AGENTD_*/systemd variables, with port 0, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not _is_ours(k)}
    env["AGENTD_SERVER_PORT"] = "0"
    env.update(extra)
    return env


def _write_config(directory: Path, extra: str = "", name: str = "agentd.toml") -> Path:
    """A config file keeping all state under `directory`, without plugins."""
    path = directory / name
    path.write_text(
        textwrap.dedent(
            """
            [daemon]
            data_dir = "data"
            stop_timeout = 5.0

            [plugins]
            paths = []
            entry_points = false
            """
        )
        + textwrap.dedent(extra)
    )
    return path


@pytest.fixture
def process_env() -> Callable[..., dict[str, str]]:
    """`process_env(NOTIFY_SOCKET=...)`: a clean environment for a child agentd (port 0)."""
    return _process_env


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    """`config_file(extra_toml="", name="agentd.toml", directory=tmp_path)` → the written path."""

    def make(extra: str = "", name: str = "agentd.toml", directory: Path | None = None) -> Path:
        return _write_config(directory or tmp_path, extra, name)

    return make


class AgentdProcess:
    """`python -m agentd <args>` as a real child process, its stdout read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []  # every stdout line read so far
        self.stderr = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    async def wait_for_log(self, event: str, timeout: float = PROCESS_TIMEOUT) -> dict[str, Any]:
        """Read stdout until a JSON line with this `event`; fail if the process ends first."""

        async def scan() -> dict[str, Any]:
            assert self.proc.stdout is not None
            while True:
                raw = await self.proc.stdout.readline()
                if not raw:
                    await self.proc.wait()
                    assert self.proc.stderr is not None
                    self.stderr += (await self.proc.stderr.read()).decode()
                    raise AssertionError(
                        f"agentd exited with {self.proc.returncode} before logging {event!r}; "
                        f"stdout: {self.lines}; stderr: {self.stderr}"
                    )
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                record = json.loads(line)
                if record.get("event") == event:
                    return record

        return await asyncio.wait_for(scan(), timeout)

    async def started(self) -> int:
        """Wait for `daemon.started` and check it serves /healthz; return the bound port."""
        port = int((await self.wait_for_log("daemon.started"))["port"])
        timeout = aiohttp.ClientTimeout(total=PROCESS_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
            f"http://127.0.0.1:{port}/healthz"
        ) as response:
            assert response.status == 200
        return port

    async def finish(self, sig: signal.Signals | None = None, timeout: float = PROCESS_TIMEOUT) -> int:
        """Optionally send `sig`, then read the rest of stdout/stderr and return the exit code."""
        if sig is not None:
            self.proc.send_signal(sig)
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        self.lines.extend(out.decode().splitlines())
        self.stderr += err.decode()
        assert self.proc.returncode is not None
        return self.proc.returncode


@pytest.fixture
async def agentd_process(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`p = await agentd_process("run", "--config", path, env=...)`; killed at teardown if alive."""
    started: list[AgentdProcess] = []

    async def spawn(*args: str, env: Mapping[str, str] | None = None) -> AgentdProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentd", *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else _process_env(),
            cwd=tmp_path,
        )
        child = AgentdProcess(proc)
        started.append(child)
        return child

    yield spawn
    for child in started:
        if child.proc.returncode is None:
            child.proc.kill()
            await child.proc.communicate()


@pytest.fixture
def run_cli(agentd_process: Callable[..., Any]) -> Callable[..., Any]:
    """`code, out, err = await run_cli("check-config", "--config", p)` for short commands."""

    async def run(*args: str, env: Mapping[str, str] | None = None,
                  timeout: float = PROCESS_TIMEOUT) -> tuple[int, str, str]:
        child: AgentdProcess = await agentd_process(*args, env=env)
        code = await child.finish(timeout=timeout)
        return code, "\n".join(child.lines), child.stderr

    return run


# --------------------------------------------------------------------------- the stream plugin


@pytest.fixture
def copied_plugin(plugin_dir: PluginDirFactory) -> Callable[[str, str], Path]:
    """`copied_plugin("queue_plugin.py", "qt")`: a plugin directory holding that file of
    tests/ as the plugin `qt`."""

    def make(source: str, name: str) -> Path:
        return plugin_dir({f"{name}.py": (REPO / "tests" / source).read_text()}, name=f"{name}_plugins")

    return make


@pytest.fixture
def st_dir(copied_plugin: Callable[[str, str], Path]) -> Path:
    """A plugin directory holding tests/stream_plugin.py as the plugin `st`."""
    return copied_plugin("stream_plugin.py", "st")


@pytest.fixture
async def st(start_daemon: Any, st_dir: Path) -> Any:
    """`daemon, events, module = await st(overrides)` with the stream test plugin loaded
    (and fast task retries)."""

    async def start(overrides: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Any, Any, Any]:
        tables: dict[str, dict[str, Any]] = {"tasks": {"retry_base": 0.01, "retry_max": 0.02}}
        for section, table in (overrides or {}).items():
            tables.setdefault(section, {}).update(table)
        daemon, events = await start_daemon(plugin_dirs=[st_dir], overrides=tables)
        return daemon, events, sys.modules["agentd_plugins.st"]

    return start
