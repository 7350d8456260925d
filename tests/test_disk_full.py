"""A store that refuses writes (a full disk, a lock held past busy_timeout, a read-only
file) against the real daemon: every write path answers a 503 naming the cause, nothing
committed is lost, a finished task's outcome is written once the store takes writes again
and the task runs once, /readyz follows, and all of it without a restart.

A full disk is SQLite's own: `PRAGMA max_page_count` set on the store's writer connection
(through `Store.write`) to the pages the file has, after giving its free pages back, makes
every write that needs a new page fail with "database or disk is full", exactly as a full
disk does. Writes that fit in the pages the file has still commit, as on a real disk: the
tests make the refused writes large (more than a page). A failing disk is the process's
file size limit (RLIMIT_FSIZE): SQLite's writes to the WAL at commit, or to the database
file in a checkpoint, fail with an I/O error.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema_rs
import pytest
from structlog.testing import capture_logs

from agentd.config import StoreConfig
from agentd.errors import StoreBusyError, StoreFullError, StoreIOError, StoreReadOnlyError
from agentd.store import Connection, Store
from agentd.store.sqlite import SqliteStore

BIG = 20_000  # characters: more than four pages, so never stored without new pages

DF_PLUGIN = """
    import asyncio
    import hashlib

    from agentd import Plugin
    from agentd.errors import Retry

    plugin = Plugin("df")
    GATES = {}
    RUNS = []


    def gate(name):
        return GATES.setdefault(name, asyncio.Event())


    @plugin.task()
    async def produce(ctx, name, size):
        RUNS.append((name, ctx.task.attempt))
        gate(f"started:{name}").set()
        await gate(name).wait()
        return "x" * size


    @plugin.task()
    async def retry_once(ctx, name, size):
        RUNS.append((name, ctx.task.attempt))
        gate(f"started:{name}").set()
        await gate(name).wait()
        if ctx.task.attempt == 1:
            raise Retry(delay=0, reason="y" * size)
        return "done"


    class ToyEmbedder:
        id = "df-toy"
        dimension = 8

        async def embed(self, texts):
            return [[float(b) for b in hashlib.sha256(t.encode()).digest()[:8]] for t in texts]


    @plugin.embedder("df-toy")
    def make(config):
        return ToyEmbedder()
"""


@pytest.fixture
async def df(start_daemon: Any, plugin_dir: Any) -> Any:
    """`daemon, events, module = await df(**overrides)` with the plugin above, a short lease
    (a lease run out would show within a second) and the plugin's embedder. (The built-in
    schedules are far away, `make_config`'s doing: a sweep due at a minute's turn made a
    task of its own in a test that counts tasks.)"""

    async def start(**overrides: Any) -> tuple[Any, Any, ModuleType]:
        tables: dict[str, dict[str, Any]] = {
            "tasks": {"lease": 0.6, "retry_base": 0.01, "retry_max": 0.02},
            "memory": {"embedder": "df-toy"}}
        for section, table in overrides.items():
            tables.setdefault(section, {}).update(table)
        daemon, events = await start_daemon(plugin_dirs=[plugin_dir({"df.py": DF_PLUGIN})],
                                            overrides=tables)
        return daemon, events, sys.modules["agentd_plugins.df"]

    return start


async def fill(store: Store) -> None:
    """Leave `store` no room: its free pages taken by a row of zeros, and no page allowed
    beyond the ones the file has (SQLite clamps the limit to them)."""

    def op(conn: Connection) -> tuple[int, int]:
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if free:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            conn.execute("INSERT INTO meta (key, value) VALUES ('test_filler', zeroblob(?))",
                         (free * page_size,))
        return (conn.execute("PRAGMA max_page_count = 1").fetchone()[0],
                conn.execute("PRAGMA freelist_count").fetchone()[0])

    limit, free = await store.write(op)
    assert limit > 1 and free == 0


async def make_room(store: Store) -> None:
    await store.write(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823").fetchone())


async def writer_connection(store: Store) -> Connection:
    """The store's writer connection, as a write is handed it (for what `Store.write` cannot
    do: a write on a read-only connection fails before it runs)."""
    conn: Connection = await store.write(lambda conn: conn)
    return conn


async def call(client: Any, method: str, path: str, body: Any = None, status: int = 200) -> Any:
    async with client.request(method, path, json=body) as response:
        assert response.status == status, f"{method} {path}: {response.status} {await response.text()}"
        return await response.json()


def refused(answer: dict[str, Any], code: str, store: Store) -> None:
    """A 503 body naming the cause and the file."""
    assert answer["error"]["code"] == code, answer
    assert str(store.path) in answer["error"]["message"]
    assert "nothing of this write was stored" in answer["error"]["message"]


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes of any file of this process fail (EFBIG) until the end."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait for `await condition()`: what it waits for (a lease renewed) publishes nothing."""

    async def poll() -> None:
        while not await condition():  # noqa: ASYNC110 - a heartbeat publishes no event
            await asyncio.sleep(0.02)  # noqa: sleep - a bounded poll: a lease renewal publishes nothing

    await asyncio.wait_for(poll(), timeout)


# --------------------------------------------------------------------------- client writes


async def test_enqueues_on_a_full_disk_are_refused_with_store_full_and_taken_once_there_is_room(
    df: Any, http: Any
) -> None:
    daemon, events, _ = await df()
    client = http(daemon)
    await fill(daemon.store)
    big = {"args": {"name": "p" * BIG, "size": 1}, "delay": 60}
    # A single enqueue (the batched single-row INSERT), a keyed one and a batch (each
    # `_insert_tasks`): a 503 naming the cause, and no task.
    for path, body in (("/v1/tasks", {**big, "name": "df.produce"}),
                       ("/v1/tasks", {**big, "name": "df.produce", "idempotency_key": "k1"}),
                       ("/v1/tasks/batch", {"tasks": [{**big, "name": "df.produce"}] * 2})):
        refused(await call(client, "POST", path, body, status=503), "store_full", daemon.store)
    assert await daemon.store.read("SELECT id FROM tasks WHERE name = 'df.produce'") == []
    assert "task.queued" not in events.topics()

    await make_room(daemon.store)
    created = await call(client, "POST", "/v1/tasks", {**big, "name": "df.produce"}, status=201)
    assert created["status"] == "queued"


async def test_a_published_event_the_log_cannot_store_is_refused_before_anyone_sees_it(
    df: Any, http: Any
) -> None:
    daemon, events, _ = await df()
    client = http(daemon)
    await fill(daemon.store)
    body = {"topic": "disk.test", "data": {"pad": "p" * BIG}}
    refused(await call(client, "POST", "/v1/events", body, status=503), "store_full", daemon.store)
    assert "disk.test" not in events.topics()

    await make_room(daemon.store)
    published = await call(client, "POST", "/v1/events", body, status=202)
    assert (await events.wait_for("disk.test")).id == published["id"]
    stored = await daemon.store.read("SELECT id FROM events WHERE topic = 'disk.test'")
    assert [row["id"] for row in stored] == [published["id"]]  # stored once, before dispatch


async def test_memory_writes_on_a_full_memory_db_are_refused_with_store_full(df: Any, http: Any) -> None:
    daemon, _, _ = await df()
    client = http(daemon)
    memory_store = daemon.memory.store
    await fill(memory_store)
    text = "a long note " + "n" * BIG
    refused(await call(client, "POST", "/v1/memory", {"text": text}, status=503), "store_full",
            memory_store)
    refused(await call(client, "POST", "/v1/sessions/chat/messages",
                       {"role": "user", "content": text}, status=503), "store_full", memory_store)
    assert await memory_store.read("SELECT id FROM memories") == []

    await make_room(memory_store)
    assert (await call(client, "POST", "/v1/memory", {"text": text}, status=201))["text"] == text
    await call(client, "POST", "/v1/sessions/chat/messages", {"role": "user", "content": text},
               status=201)


# --------------------------------------------------------------------------- task outcomes


@pytest.mark.parametrize("synchronous", ["normal", "full"])  # writes on the loop; in a thread
async def test_a_task_finishing_on_a_full_disk_is_acknowledged_once_there_is_room_and_runs_once(
    df: Any, synchronous: str
) -> None:
    daemon, events, module = await df(store={"synchronous": synchronous})
    tasks = await asyncio.gather(*(daemon.queue.enqueue("df.produce", {"name": name, "size": BIG})
                                   for name in ("a", "b")))
    for name in ("a", "b"):
        await asyncio.wait_for(module.gate(f"started:{name}").wait(), 5)
    leased = {row["id"]: row["lease_until"] for row in await daemon.store.read(
        "SELECT id, lease_until FROM tasks WHERE status = 'running'")}
    await fill(daemon.store)
    with capture_logs() as logs:
        module.gate("a").set()
        module.gate("b").set()

        async def owed_and_still_leased() -> bool:
            # Finished, unacknowledged, and past the lease they were claimed with: a lease
            # run out would have sent them back to the queue to run again.
            rows = await daemon.store.read(
                "SELECT status, attempts, lease_until FROM tasks WHERE id IN (?, ?)",
                tuple(task.id for task in tasks))
            return time.time() > max(leased.values()) and all(
                (row["status"], row["attempts"]) == ("running", 1) and row["lease_until"] > leased[task.id]
                for row, task in zip(rows, tasks, strict=True))

        await until(owed_and_still_leased)
        assert any(log["event"] == "tasks.ack_failed" for log in logs)
    assert "task.succeeded" not in events.topics()  # announced only once committed
    waiting = asyncio.ensure_future(daemon.queue.result(tasks[0].id, timeout=10))

    await make_room(daemon.store)
    assert await waiting == "x" * BIG
    assert await daemon.queue.result(tasks[1].id, timeout=10) == "x" * BIG
    assert sorted(module.RUNS) == [("a", 1), ("b", 1)]
    succeeded = [e for e in events.events if e.topic == "task.succeeded"]
    assert sorted(e.data["task_id"] for e in succeeded) == sorted(task.id for task in tasks)
    assert not [e for e in events.events if e.topic == "task.queued" and e.data.get("recovered")]


async def test_a_retry_the_full_disk_refuses_is_written_once_there_is_room(df: Any) -> None:
    daemon, events, module = await df()
    task = await daemon.queue.enqueue("df.retry_once", {"name": "r", "size": BIG})
    await asyncio.wait_for(module.gate("started:r").wait(), 5)
    await fill(daemon.store)
    with capture_logs() as logs:
        module.gate("r").set()

        async def refused_twice() -> bool:
            return sum(log["event"] == "tasks.requeue_failed" for log in logs) >= 2

        await until(refused_twice)
    await make_room(daemon.store)
    assert await daemon.queue.result(task.id, timeout=10) == "done"
    retrying = await events.wait_for("task.retrying", task_id=task.id)
    assert retrying.data["error"] == "Retry: " + "y" * BIG  # the attempt's own error, not a crash's
    assert module.RUNS == [("r", 1), ("r", 2)]


async def test_a_stop_on_a_full_disk_ends_in_time_and_the_next_start_runs_the_task_again(
    df: Any,
) -> None:
    """What could not be written by the stop is lost as a crash would lose it: the task's
    outcome (its row stays running, and the next start runs it again: at least once) and
    the events the log held."""
    daemon, _, module = await df(daemon={"stop_timeout": 0.2})
    task = await daemon.queue.enqueue("df.produce", {"name": "s", "size": BIG})
    await asyncio.wait_for(module.gate("started:s").wait(), 5)
    await fill(daemon.store)
    with capture_logs() as logs:
        module.gate("s").set()
        daemon.bus.publish("disk.held", {"pad": "p" * BIG})

        async def both_refused() -> bool:
            return {"tasks.ack_failed", "eventlog.write_refused"} <= {log["event"] for log in logs}

        await until(both_refused)
        await asyncio.wait_for(daemon.stop(), 5)  # stages bounded by stop_timeout

        async def held_events_given_up() -> bool:  # by the log's next try, the store closed
            return daemon.eventlog.lost >= 1  # with those held behind it (daemon.stopping)

        await until(held_events_given_up)
    with contextlib.closing(sqlite3.connect(daemon.store.path)) as conn:
        assert conn.execute("SELECT status FROM tasks WHERE id = ?", (task.id,)).fetchone() == ("running",)

    again, events, module = await df()
    module.gate("s").set()
    assert await again.queue.result(task.id, timeout=10) == "x" * BIG
    assert (await events.wait_for("task.queued", task_id=task.id)).data["recovered"] is True


async def test_events_the_log_could_not_store_are_stored_once_there_is_room(df: Any) -> None:
    daemon, _, _ = await df()
    await fill(daemon.store)
    with capture_logs() as logs:
        held = daemon.bus.publish("disk.later", {"pad": "p" * BIG})

        async def refused_twice() -> bool:
            return sum(log["event"] == "eventlog.write_refused" for log in logs) >= 2

        await until(refused_twice)
    # Kept in memory meanwhile: a stream resuming now still gets it.
    assert [e.id for e in await daemon.eventlog.replay(0, lambda e: e.topic == "disk.later")] == [held.id]
    await make_room(daemon.store)
    await daemon.eventlog.flush()
    stored = await daemon.store.read("SELECT id FROM events WHERE topic = 'disk.later'")
    assert [row["id"] for row in stored] == [held.id]
    assert (await daemon.eventlog.stats())["lost"] == 0


# --------------------------------------------------------------------------- readiness


async def test_readyz_and_status_say_the_store_is_full_until_there_is_room(df: Any, http: Any) -> None:
    daemon, _, _ = await df()
    client = http(daemon)
    assert (await call(client, "GET", "/readyz"))["checks"]["store"]["ok"] is True
    with capture_logs() as logs:
        await fill(daemon.store)
        ready = await call(client, "GET", "/readyz", status=503)
        assert ready["checks"]["store"]["ok"] is False
        assert ready["checks"]["store"]["code"] == "store_full"
        # What the OpenAPI document says a 503 of /readyz holds (no error envelope).
        document = await call(client, "GET", "/v1/openapi.json")
        not_ready = document["paths"]["/readyz"]["get"]["responses"]["503"]
        jsonschema_rs.validate(not_ready["content"]["application/json"]["schema"], ready)
        status = await call(client, "GET", "/v1/status")
        assert status["store"]["write_failure"] == "store_full"

        await make_room(daemon.store)

        async def recovered_by_itself() -> bool:  # the store's own check, not a request
            return daemon.store.failure is None

        await until(recovered_by_itself)
    assert [log["event"] for log in logs if log["event"].startswith("store.writes")] == [
        "store.writes_failing", "store.writes_recovered"]
    assert (await call(client, "GET", "/readyz"))["ready"] is True
    assert (await call(client, "GET", "/v1/status"))["store"]["write_failure"] is None


# --------------------------------------------------------------------------- other causes


async def test_a_lock_held_past_busy_timeout_is_store_busy_and_acks_wait_it_out(
    df: Any, http: Any
) -> None:
    daemon, _, module = await df(store={"busy_timeout_ms": 50})
    client = http(daemon)
    task = await daemon.queue.enqueue("df.produce", {"name": "locked", "size": 3})
    await asyncio.wait_for(module.gate("started:locked").wait(), 5)
    other = sqlite3.connect(daemon.store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another program holding the write lock
        with capture_logs() as logs:
            module.gate("locked").set()
            body = {"name": "df.produce", "args": {"name": "later", "size": 1}}
            refused(await call(client, "POST", "/v1/tasks", body, status=503), "store_busy", daemon.store)
            refused(await call(client, "POST", "/v1/events", {"topic": "disk.busy"}, status=503),
                    "store_busy", daemon.store)

            async def ack_refused() -> bool:
                return any(log["event"] == "tasks.ack_failed" for log in logs)

            await until(ack_refused)
        other.execute("ROLLBACK")
    finally:
        other.close()
    assert await daemon.queue.result(task.id, timeout=10) == "xxx"
    assert module.RUNS == [("locked", 1)]


async def test_a_read_only_store_is_store_read_only(df: Any, http: Any) -> None:
    daemon, _, _ = await df()
    client = http(daemon)
    conn = await writer_connection(daemon.store)
    conn.execute("PRAGMA query_only = 1")  # SQLite answers writes as on a read-only file
    body = {"name": "df.produce", "args": {"name": "ro", "size": 1}, "delay": 60}
    try:
        refused(await call(client, "POST", "/v1/tasks", body, status=503), "store_read_only",
                daemon.store)
    finally:
        conn.execute("PRAGMA query_only = 0")
    await call(client, "POST", "/v1/tasks", body, status=201)


async def test_a_commit_the_disk_fails_is_store_io_error_and_the_ack_waits_it_out(df: Any) -> None:
    """Here the WAL cannot grow: the transaction fails at its commit, not at a statement."""
    daemon, _, module = await df()
    size = 2_000_000  # the result: the WAL must grow by that much to take the ack
    task = await daemon.queue.enqueue("df.produce", {"name": "io", "size": size})
    await asyncio.wait_for(module.gate("started:io").wait(), 5)
    wal = daemon.store.path.with_name(daemon.store.path.name + "-wal")
    with capture_logs() as logs, file_size_limit(wal.stat().st_size + 1_000_000):
        module.gate("io").set()

        async def ack_refused() -> bool:
            return any(log["event"] == "tasks.ack_failed" for log in logs)

        await until(ack_refused)
        assert isinstance(daemon.store.failure, StoreIOError)
    assert await daemon.queue.result(task.id, timeout=10) == "x" * size
    assert module.RUNS == [("io", 1)]


async def test_checkpoints_go_on_after_one_fails(tmp_path: Path) -> None:
    """A checkpoint that cannot write the database file (it must grow) used to end the
    checkpoint loop for good: the WAL then grew until the next maintenance."""
    store = SqliteStore(tmp_path / "x.db", StoreConfig())
    await store.open()
    checkpoints: asyncio.Task[None] | None = None
    try:
        await store.write(lambda conn: conn.execute(
            "INSERT INTO meta (key, value) VALUES ('pad', zeroblob(100000))"))
        size = store.path.stat().st_size
        with capture_logs() as logs:
            with file_size_limit(size):
                checkpoints = asyncio.create_task(store.run_checkpoints(interval=0.01, wal_limit=0))

                async def failed() -> bool:
                    return any(log["event"] == "store.checkpoint_failed" for log in logs)

                await until(failed)

            async def recovered() -> bool:  # logged once the checkpoint has returned
                return any(log["event"] == "store.checkpoint_recovered" for log in logs)

            await until(recovered)
        assert [log["event"] for log in logs] == ["store.checkpoint_failed", "store.checkpoint_recovered"]
        assert store.path.stat().st_size > size  # the pages are in the database file at last
    finally:
        if checkpoints is not None:
            checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checkpoints
        await store.close()


async def test_a_store_closed_as_its_writes_start_failing_leaves_no_check_running(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "x.db", StoreConfig())
    await store.open()
    await fill(store)
    refused_last = store.write(lambda conn: conn.execute(
        "INSERT INTO meta (key, value) VALUES ('pad', zeroblob(100000))"))
    await store.close()  # the write is refused as the store closes, which starts a check
    with pytest.raises(StoreFullError):
        await refused_last
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("store-check")] == []


@pytest.mark.parametrize(("code", "message", "kind"), [
    (778, "disk I/O error", StoreIOError),  # SQLITE_IOERR_WRITE: the primary code is in its low byte
    (13, "database or disk is full", StoreFullError),
    (None, "vec0 insert failed: database or disk is full", StoreFullError),  # sqlite-vec's wording
    (None, "database is locked", StoreBusyError),
    (None, "attempt to write a readonly database", StoreReadOnlyError),
])
async def test_storage_errors_are_named_by_their_cause(
    tmp_path: Path, code: int | None, message: str, kind: type[Exception]
) -> None:
    store = SqliteStore(tmp_path / "x.db", StoreConfig())
    await store.open()
    try:
        def fail(conn: Connection) -> None:
            error = sqlite3.OperationalError(message)
            if code is not None:
                error.sqlite_errorcode = code  # what the driver sets from SQLite's extended code
            raise error

        with pytest.raises(kind, match=f"{tmp_path / 'x.db'}: .*nothing of this write was stored"):
            await store.write(fail)
        assert isinstance(store.failure, kind)
        await store.check_writable()
        assert store.failure is None
    finally:
        await store.close()
