"""PostgreSQL going away under agentd, and coming back: frozen (SIGSTOP on every process of
the server, as a stalled VM or a storage hang looks from outside) or stopped and restarted.
While it is away, writes and reads fail with StoreUnavailableError (HTTP 503
`store_unavailable`) within the deadline instead of hanging; once it is back, the store and
its listener recover by themselves and nothing that was acknowledged is lost.

These tests freeze and stop a server of their own (`ThrowawayServer`, one per module), never
the session's (tests/pg.py), which other tests use at the same time."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from agentd.config import StoreConfig
from agentd.errors import StoreUnavailableError
from agentd.store.postgres import PgConnection, PgStore, load_migrations
from conftest import HEAVY, AgentdProcess
from pg import database_url

pytestmark = HEAVY

# A request must be answered within this many seconds while the server is away: the
# store's deadline (5 s) and a margin for a loaded machine.
ANSWER_WITHIN = 6.5
# How long a fault lasts: the 10 s.
FAULT_SECONDS = 10.0
RECOVERY_TIMEOUT = 30.0


class ThrowawayServer:
    """A PostgreSQL server of its own (pgserver's binaries, data in `root`) that tests may
    freeze, stop and start again on the same data directory and socket. Made with initdb and
    pg_ctl directly: pgserver's `get_server` and cleanup wait for a lock that every pgserver
    of the machine shares, which another test session holds for as long as its own
    server's stop takes."""

    def __init__(self, root: Path) -> None:
        from pgserver._commands import POSTGRES_BIN_PATH, initdb

        self.root = root
        self.user: str | None = None
        root.mkdir(parents=True)
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: as pgserver's user
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            self.user = "pgserver"
            entry = ensure_user_exists(self.user)
            assert entry is not None
            ensure_prefix_permissions(root)
            ensure_prefix_permissions(POSTGRES_BIN_PATH)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        initdb(["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
               pgdata=root, user=self.user)
        self.socket_dir = root
        self.start()
        self.url = f"postgresql://postgres:@/postgres?host={root}"
        self._names = itertools.count(1)
        self._frozen: list[Any] = []

    def postmaster_pid(self) -> int:
        """The server's main process, from the first line of `postmaster.pid`."""
        return int((self.root / "postmaster.pid").read_text().split()[0])

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Every process of the server stopped (SIGSTOP), continued (SIGCONT) on exit, however
        the block ends. The postmaster first, so it starts no new backend meanwhile."""
        import psutil

        postmaster = psutil.Process(self.postmaster_pid())
        postmaster.suspend()
        self._frozen = [postmaster]
        try:
            for child in postmaster.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.suspend()
                    self._frozen.append(child)
            yield
        finally:
            self.thaw()

    def thaw(self) -> None:
        import psutil

        frozen, self._frozen = self._frozen, []
        for process in reversed(frozen):  # the postmaster last
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()

    def stop(self) -> None:
        """Stop the server as an administrator would (`pg_ctl stop -m fast`): every session
        is ended, the socket goes away."""
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.root, user=self.user, timeout=30)

    def start(self) -> None:
        """Start it again on the same data directory and socket directory."""
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.root / "log"),
                "start"], pgdata=self.root, user=self.user, timeout=30)

    async def database(self) -> str:
        """The URL of a new, empty database on this server."""
        name = f"agentd_fault_{os.getpid()}_{next(self._names)}"
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()
        return database_url(self.url, name)

    def cleanup(self) -> None:
        """Stop the server for good (its data is thrown away)."""
        from pgserver._commands import pg_ctl

        self.thaw()
        with contextlib.suppress(Exception):
            pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=self.root, user=self.user, timeout=30)


@pytest.fixture(scope="module")
def pg_server() -> Iterator[ThrowawayServer]:
    root = Path(tempfile.mkdtemp(prefix="agentd-pgfault-"))
    server = ThrowawayServer(root / "data")
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)  # noqa: sleep - polling a condition that has no event


async def timed(call: Awaitable[Any]) -> tuple[float, BaseException | Any]:
    """(seconds taken, the result or the exception raised) of awaiting `call`."""
    started = time.monotonic()
    try:
        outcome = await call
    except Exception as exc:
        outcome = exc
    return time.monotonic() - started, outcome


def put(key: str) -> Callable[[PgConnection], Awaitable[str]]:
    async def op(conn: PgConnection) -> str:
        await conn.execute("INSERT INTO meta (key, value) VALUES ($1, 'v') ON CONFLICT (key) "
                           "DO UPDATE SET value = excluded.value", key)
        return key

    return op


@contextlib.asynccontextmanager
async def open_store(url: str) -> AsyncIterator[tuple[PgStore, asyncio.Queue[str], list[float]]]:
    """A PgStore with its listener running: (store, notifications on `faults`, the times of
    the listener's (re)connections)."""
    store = PgStore(StoreConfig(url=url, pool_size=4))
    await store.open()
    notes: asyncio.Queue[str] = asyncio.Queue()
    connected: list[float] = []
    store.listen("faults", notes.put_nowait)
    store.on_reconnect(lambda: connected.append(time.monotonic()))
    listener = asyncio.create_task(store.run_listener())
    try:
        await wait_until(lambda: bool(connected), RECOVERY_TIMEOUT, "the listener connected")
        yield store, notes, connected
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await store.close()


async def notify(store: PgStore, payload: str) -> None:
    async def op(conn: PgConnection) -> None:
        await conn.execute("SELECT pg_notify('faults', $1)", payload)

    await store.write(op)


async def test_a_frozen_server_fails_writes_and_reads_in_time_and_the_store_recovers_by_itself(
        pg_server: ThrowawayServer) -> None:
    async with open_store(await pg_server.database()) as (store, notes, connected):
        assert await store.write(put("before")) == "before"
        with pg_server.frozen():
            frozen_at = time.monotonic()
            # Two waves: at the start of the freeze, and once the first has failed (the
            # pool's connections were closed then: the second wave opens new ones).
            for wave in range(2):
                calls = [store.write(put(f"w{wave}{i}")) for i in range(5)]
                calls += [store.read("SELECT 1"), store.read_one("SELECT 2"), store.check_writable()]
                outcomes = await asyncio.gather(*(timed(call) for call in calls))
                for seconds, outcome in outcomes:
                    assert isinstance(outcome, StoreUnavailableError), outcome
                    assert seconds < ANSWER_WITHIN, (wave, seconds)
                assert store.failure is not None
                if wave == 0:
                    assert "the PostgreSQL server did not answer in time" in str(outcomes[0][1])
                else:  # known away: writes and reads fail at once; the write check still tries
                    assert all(seconds < 1.0 for seconds, _ in outcomes[:7]), outcomes[:7]
                    assert "the PostgreSQL server is away" in str(outcomes[0][1])
                    assert "the PostgreSQL server is away" in str(outcomes[5][1])
                    assert outcomes[-1][0] > 4.0, "the write check did not try the server"
            assert time.monotonic() - frozen_at >= FAULT_SECONDS - 1
        # Thawed: the store finds out by itself (its write check) and the listener is back.
        await wait_until(lambda: store.failure is None, RECOVERY_TIMEOUT, "writes recovered")
        await asyncio.wait_for(store.listening.wait(), RECOVERY_TIMEOUT)
        assert await store.write(put("after")) == "after"
        await notify(store, "after the freeze")
        while (note := await asyncio.wait_for(notes.get(), RECOVERY_TIMEOUT)) != "after the freeze":
            pass
        assert len(connected) >= 2, "the listener never noticed the freeze"
        rows = await store.read("SELECT key FROM meta WHERE key IN ('before', 'after')")
        assert sorted(row["key"] for row in rows) == ["after", "before"]
        # Nothing of the refused writes was stored.
        assert await store.read("SELECT key FROM meta WHERE key LIKE 'w%'") == []
        assert note == "after the freeze"


async def test_a_stopped_server_fails_writes_at_once_and_a_restarted_one_is_used_again(
        pg_server: ThrowawayServer) -> None:
    async with open_store(await pg_server.database()) as (store, notes, connected):
        assert await store.write(put("before")) == "before"
        pg_server.stop()
        try:
            stopped_at = time.monotonic()
            while time.monotonic() - stopped_at < FAULT_SECONDS / 2:
                seconds, outcome = await timed(store.write(put("refused")))
                assert isinstance(outcome, StoreUnavailableError), outcome
                # The first write meets the server gone; the next ones fail at once until a
                # write check passes.
                assert "cannot be reached" in str(outcome) or "server is away" in str(outcome)
                assert seconds < 1.0
                seconds, outcome = await timed(store.read("SELECT 1"))
                assert isinstance(outcome, StoreUnavailableError) and seconds < 1.0, outcome
                await asyncio.sleep(0.5)  # noqa: sleep - keep asking while the server is down
            await wait_until(lambda: not store.listening.is_set(), RECOVERY_TIMEOUT, "listener lost")
        finally:
            pg_server.start()
        await wait_until(lambda: store.failure is None, RECOVERY_TIMEOUT, "writes recovered")
        await asyncio.wait_for(store.listening.wait(), RECOVERY_TIMEOUT)
        assert len(connected) >= 2
        assert await store.write(put("after")) == "after"
        await notify(store, "after the restart")
        while await asyncio.wait_for(notes.get(), RECOVERY_TIMEOUT) != "after the restart":
            pass
        assert await store.read("SELECT key FROM meta WHERE key = 'refused'") == []


# --------------------------------------------------------------------------- daemons

LOAD_PLUGIN = '''
import asyncio
import os

from agentd import Plugin

plugin = Plugin("load")
_loops = []


@plugin.task()
async def work(ctx, n: int, origin: str = "http"):
    doubled = await ctx.step("double", lambda: n * 2)
    return {"n": n, "doubled": doubled, "origin": origin}


@plugin.startup
async def start(ctx):
    """Enqueue a task every 50 ms for as long as the daemon runs, writing the id of each
    one committed (acknowledged) to $LOAD_LOG."""
    log = os.environ["LOAD_LOG"]

    async def enqueue_forever():
        n = 0
        while n < 6000:  # bounded: 5 minutes at this pace, past any test's end
            n += 1
            try:
                record = await ctx.submit("load.work", {"n": n, "origin": "plugin"})
            except Exception as exc:
                ctx.log.info("load.refused", error=type(exc).__name__)
            else:
                with open(log, "a") as out:
                    out.write(f"{record.id}\\n")
            await asyncio.sleep(0.05)  # noqa: sleep -- the load's pace, not a wait for a condition

    _loops.append(asyncio.get_running_loop().create_task(enqueue_forever()))


@plugin.shutdown
async def stop(ctx):
    for loop in _loops:
        loop.cancel()
'''


# Seconds a task's lease lasts. A claim whose COMMIT was cut off by the fault may have been
# stored without the daemon knowing it: those tasks wait for their lease to lapse before
# another heartbeat takes them back. Longer than the fault, so leases renewed before it
# are still held after it.
LEASE = 15.0


def daemon_config(directory: Path, plugins: Path | None) -> Path:
    """An agentd.toml for one daemon of a cluster: its own data directory (memory.db), JSON
    logs, the daemon's own maintenance far apart. The database's URL comes by
    AGENTD_STORE_URL (one with a password may not be in a file others can read)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "agentd.toml"
    config.write_text(textwrap.dedent(f"""
        [daemon]
        data_dir = "{directory / 'data'}"
        stop_timeout = 5.0

        [server]
        port = 0

        [store]
        maintenance_interval = 315360000.0

        [tasks]
        queues = {{ default = 4 }}
        lease = {LEASE}
        purge_interval = 315360000.0

        [events]
        sweep_interval = 315360000.0

        [plugins]
        paths = [{f'"{plugins}"' if plugins else ""}]
        entry_points = false

        [log]
        format = "json"
        """))
    return config


@dataclass
class Node:
    """One daemon of the cluster: its process, port, and its stdout read in the background
    (a pipe nobody reads would block its logging once full)."""

    process: AgentdProcess
    port: int
    reader: asyncio.Task[None] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop_reading(self) -> None:
        """Leave stdout to the fixture's teardown (after a failure)."""
        if self.reader is not None:
            self.reader.cancel()

    def drain(self) -> None:
        async def read() -> None:
            stdout = self.process.proc.stdout
            assert stdout is not None
            while raw := await stdout.readline():
                self.process.lines.append(raw.decode().rstrip("\n"))

        self.reader = asyncio.create_task(read())

    async def stop(self) -> int:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        return await self.process.finish(signal.SIGTERM, timeout=90)


async def start_nodes(count: int, url: str, tmp_path: Path, agentd_process: Callable[..., Any],
                      process_env: Callable[..., dict[str, str]], plugins: Path | None) -> list[Node]:
    """`count` daemons on `url`, spawned together, each ready to serve."""
    processes = [await agentd_process(
        "run", "--config", str(daemon_config(tmp_path / f"node{i}", plugins)),
        env=process_env(AGENTD_STORE_URL=url, LOAD_LOG=str(tmp_path / f"load{i}.log")))
        for i in range(count)]
    ports = await asyncio.gather(*(process.started() for process in processes))
    nodes = [Node(process, port) for process, port in zip(processes, ports, strict=True)]
    for node in nodes:
        node.drain()
    return nodes


@dataclass
class Answer:
    """One HTTP request of the load: when it was sent, how long it took, what came back."""

    sent: float
    seconds: float
    status: int | None  # None: no answer (a connection error, the client's own timeout)
    body: Any


async def submit_load(node: Node, stop: asyncio.Event, answers: list[Answer]) -> None:
    """POST /v1/tasks to `node` every 50 ms until `stop`."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(node.base, timeout=timeout) as http:
        n = 0
        while not stop.is_set():
            n += 1
            sent = time.monotonic()
            try:
                async with http.post("/v1/tasks", json={"name": "load.work", "args": {"n": n}}) as response:
                    answer = Answer(sent, time.monotonic() - sent, response.status, await response.json())
            except (aiohttp.ClientError, TimeoutError) as exc:
                answer = Answer(sent, time.monotonic() - sent, None, repr(exc))
            answers.append(answer)
            await asyncio.sleep(0.05)  # noqa: sleep - the load's pace


async def probe_ready(node: Node) -> Answer:
    sent = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(node.base, timeout=timeout) as http, \
                http.get("/readyz") as response:
            return Answer(sent, time.monotonic() - sent, response.status, await response.json())
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Answer(sent, time.monotonic() - sent, None, repr(exc))


async def wait_ready(nodes: list[Node], timeout: float) -> float:
    """Seconds until every node's /readyz answers 200 (polled every 200 ms)."""
    started = time.monotonic()
    pending = list(nodes)
    while pending:
        answers = await asyncio.gather(*(probe_ready(node) for node in pending))
        pending = [node for node, answer in zip(pending, answers, strict=True) if answer.status != 200]
        if pending and time.monotonic() - started > timeout:
            raise AssertionError(f"not ready {timeout} s after the fault: "
                                 f"{[answer.body for answer in answers if answer.status != 200]}")
        if pending:
            await asyncio.sleep(0.2)  # noqa: sleep - readiness has no event to wait on
    return time.monotonic() - started


async def unfinished(url: str, ids: set[int]) -> dict[int, str]:
    """The tasks of `ids` not in a final state (or missing: status "missing")."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id, status FROM tasks WHERE id = any($1::bigint[])", list(ids))
    finally:
        await conn.close()
    found = {row["id"]: row["status"] for row in rows}
    return {task: found.get(task, "missing") for task in ids if found.get(task, "missing") not in FINAL}


FINAL = {"succeeded", "failed", "dead", "cancelled"}


def acknowledged(answers: list[Answer], tmp_path: Path) -> set[int]:
    """Every task the API answered 201 for, and every one the plugins' submit returned."""
    ids = {answer.body["id"] for answer in answers if answer.status == 201}
    for log in tmp_path.glob("load*.log"):
        ids.update(int(line) for line in log.read_text().split())
    return ids


async def run_fault_under_load(pg_server: ThrowawayServer, tmp_path: Path, plugin_dir: Any,
                               agentd_process: Callable[..., Any],
                               process_env: Callable[..., dict[str, str]],
                               fault: Callable[[], contextlib.AbstractAsyncContextManager[None]]) -> None:
    """Two daemons under load (their plugins enqueue, HTTP clients submit to both); `fault`
    lasts FAULT_SECONDS while /readyz is probed; then everything is checked."""
    url = await pg_server.database()
    plugins = plugin_dir({"load.py": LOAD_PLUGIN})
    nodes = await start_nodes(2, url, tmp_path, agentd_process, process_env, plugins)
    try:
        await _ride_out(nodes, url, tmp_path, fault)
    finally:
        for node in nodes:
            node.stop_reading()


async def _ride_out(nodes: list[Node], url: str, tmp_path: Path,
                    fault: Callable[[], contextlib.AbstractAsyncContextManager[None]]) -> None:
    answers: list[list[Answer]] = [[] for _ in nodes]
    stop = asyncio.Event()
    clients = [asyncio.create_task(submit_load(node, stop, mine))
               for node, mine in zip(nodes, answers, strict=True)]
    try:
        await wait_until(lambda: all(sum(a.status == 201 for a in mine) >= 10 for mine in answers),
                         RECOVERY_TIMEOUT, "the load running")
        probes: list[Answer] = []
        async with fault():
            began = time.monotonic()
            while time.monotonic() - began < FAULT_SECONDS:
                probes += await asyncio.gather(*(probe_ready(node) for node in nodes))
                await asyncio.sleep(0.5)  # noqa: sleep - probing while the fault lasts
        ended = time.monotonic()
        recovered_in = await wait_ready(nodes, RECOVERY_TIMEOUT)
        # Work goes on: each daemon takes new tasks again.
        await wait_until(lambda: all(sum(a.status == 201 and a.sent > ended + recovered_in
                                         for a in mine) >= 10 for mine in answers),
                         RECOVERY_TIMEOUT, "tasks taken again after the fault")
    finally:
        stop.set()
        await asyncio.gather(*clients)

    for node, mine in zip(nodes, answers, strict=True):
        during = [a for a in mine if began <= a.sent < ended]
        refused = [a for a in during if a.status == 503]
        assert refused, f"no 503 from {node.base} while the database was away"
        for answer in refused:
            assert answer.body["error"]["code"] == "store_unavailable", answer.body
        slowest = max(mine, key=lambda a: a.seconds)
        assert slowest.seconds < ANSWER_WITHIN, slowest
        odd = {a.status: a.body for a in mine if a.status not in (201, 503)}
        assert not odd, odd
    assert all(probe.status == 503 for probe in probes), [p.body for p in probes if p.status != 503]
    assert max(probe.seconds for probe in probes) < ANSWER_WITHIN
    assert any(probe.body["checks"]["store"].get("code") == "store_unavailable" for probe in probes)

    ids = acknowledged([a for mine in answers for a in mine], tmp_path)
    deadline = time.monotonic() + 60
    while left := await unfinished(url, ids):
        assert time.monotonic() < deadline, f"{len(left)} acknowledged tasks never finished: {left}"
        await asyncio.sleep(0.5)  # noqa: sleep - polling the table for the stragglers
    conn = await asyncpg.connect(url)
    try:
        statuses = dict(await conn.fetch("SELECT status, count(*) FROM tasks WHERE id = any($1::bigint[]) "
                                         "GROUP BY status", list(ids)))
    finally:
        await conn.close()
    assert statuses == {"succeeded": len(ids)}, statuses
    for node in nodes:
        assert await node.stop() == 0, node.process.stderr
    flat = [a for mine in answers for a in mine]
    print(f"acknowledged {len(ids)} tasks ({sum(a.status == 201 for a in flat)} over HTTP), all "
          f"succeeded; ready again {recovered_in:.1f} s after the fault; slowest answer "
          f"{max(a.seconds for a in flat):.2f} s; {sum(a.status == 503 for a in flat)} answered 503")


async def test_daemons_under_load_ride_out_a_frozen_postgresql(
        pg_server: ThrowawayServer, tmp_path: Path, plugin_dir: Any,
        agentd_process: Callable[..., Any], process_env: Callable[..., dict[str, str]]) -> None:
    @contextlib.asynccontextmanager
    async def freeze() -> AsyncIterator[None]:
        with pg_server.frozen():
            yield

    await run_fault_under_load(pg_server, tmp_path, plugin_dir, agentd_process, process_env, freeze)


async def test_daemons_under_load_ride_out_a_postgresql_restart(
        pg_server: ThrowawayServer, tmp_path: Path, plugin_dir: Any,
        agentd_process: Callable[..., Any], process_env: Callable[..., dict[str, str]]) -> None:
    @contextlib.asynccontextmanager
    async def restart() -> AsyncIterator[None]:
        await asyncio.to_thread(pg_server.stop)
        try:
            yield
        finally:
            await asyncio.to_thread(pg_server.start)

    await run_fault_under_load(pg_server, tmp_path, plugin_dir, agentd_process, process_env, restart)


async def test_daemons_started_together_on_an_empty_database_migrate_it_once(
        pg_server: ThrowawayServer, tmp_path: Path, agentd_process: Callable[..., Any],
        process_env: Callable[..., dict[str, str]]) -> None:
    url = await pg_server.database()
    nodes = await start_nodes(3, url, tmp_path, agentd_process, process_env, None)
    try:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT version, count(*) AS n FROM schema_version GROUP BY version "
                                    "ORDER BY version")
            memory_rows = await conn.fetch("SELECT version, count(*) AS n FROM memory_schema_version "
                                           "GROUP BY version ORDER BY version")
        finally:
            await conn.close()
        assert [(row["version"], row["n"]) for row in rows] == [
            (version, 1) for version, _, _ in load_migrations()]
        assert [(row["version"], row["n"]) for row in memory_rows] == [
            (version, 1) for version, _, _ in load_migrations("sql/pg_memory")]
        for component, migrations in (("store", load_migrations()),
                                      ("memory", load_migrations("sql/pg_memory"))):
            opened = [record for node in nodes for record in node.process.records()
                      if record.get("event") == "store.opened" and record.get("component") == component]
            assert len(opened) == 3, component
            assert {record["schema"] for record in opened} == {migrations[-1][0]}
        await wait_ready(nodes, RECOVERY_TIMEOUT)
    finally:
        for node in nodes:
            assert await node.stop() == 0, node.process.stderr
