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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from agentd.config import StoreConfig
from agentd.errors import StoreUnavailableError
from agentd.store.postgres import PgConnection, PgStore
from pg import database_url

# A request must be answered within this many seconds while the server is away: the
# store's deadline (5 s) and a margin for a loaded machine.
ANSWER_WITHIN = 6.5
# How long a fault lasts: the 10 s.
FAULT_SECONDS = 10.0
RECOVERY_TIMEOUT = 30.0


class ThrowawayServer:
    """A PostgreSQL server of its own (pgserver's, in `root`) that tests may freeze, stop
    and start again on the same data directory and socket."""

    def __init__(self, root: Path) -> None:
        import pgserver

        self.root = root
        self.server = pgserver.get_server(root, cleanup_mode="stop")
        self.url: str = self.server.get_uri()
        self.socket_dir = self.server.get_postmaster_info().socket_dir
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

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.root, user=self.server.system_user, timeout=30)

    def start(self) -> None:
        """Start it again on the same data directory and socket directory."""
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}", "-l", str(self.root / "log"),
                "start"], pgdata=self.root, user=self.server.system_user, timeout=30)

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
        self.thaw()
        with contextlib.suppress(Exception):
            self.server.cleanup()


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
                assert "the PostgreSQL server did not answer in time" in str(outcomes[0][1])
                assert store.failure is not None
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
                assert "cannot be reached" in str(outcome)
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


_ = signal  # the daemon-level tests below send signals
