"""The SQLite store (agentd.store): pragmas, sqlite-vec, migrations, the lock, grouped writes
and the writer's own tasks."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agentd.config import StoreConfig
from agentd.errors import StoreError, StoreLockedError
from agentd.store import BatchedWrite, Connection, Error, IntegrityError, Store, writer
from agentd.store.driver import WAL_SIZE_LIMIT, connect, driver
from agentd.store.migrations import MIGRATIONS, SCHEMA_VERSION
from agentd.store.sqlite import SqliteStore


# (synchronous, extensions): agentd.db is opened without extensions (the stdlib driver
# where its SQLite is new enough), memory.db with them (sqlean).
@pytest.fixture(params=[("normal", False), ("full", False), ("normal", True)],
                ids=["normal-plain", "full-plain", "normal-extensions"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    synchronous, extensions = request.param
    opened = SqliteStore(tmp_path / "data" / "agentd.db", StoreConfig(synchronous=synchronous),
                   extensions=extensions)
    await opened.open()
    yield opened
    await opened.close()


def raw_connection(path: Path) -> Any:
    """A plain driver connection with none of agentd's pragmas: sees only committed data."""
    return driver.connect(str(path), isolation_level=None, check_same_thread=False)


async def create_table(store: Store) -> None:
    await store.write(lambda c: c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"))


async def count(store: Store) -> int:
    row = await store.read_one("SELECT count(*) AS n FROM t")
    assert row is not None
    return int(row["n"])


# --------------------------------------------------------------------------- pragmas & extension


async def test_file_is_in_wal_mode(store: Store) -> None:
    conn = raw_connection(store.path)
    try:
        # journal_mode=WAL is a property of the file: a fresh connection sees it.
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


async def test_reader_and_writer_pragmas(store: Store) -> None:
    expected_sync = {"normal": 1, "full": 2}[store.config.synchronous]

    def writer_pragmas(conn: Connection) -> tuple[int, int, int]:
        return tuple(  # type: ignore[return-value]
            conn.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("foreign_keys", "synchronous", "busy_timeout")
        )

    assert await store.write(writer_pragmas) == (1, expected_sync, 5000)
    for name, value in (("foreign_keys", 1), ("synchronous", expected_sync), ("busy_timeout", 5000)):
        row = await store.read_one(f"PRAGMA {name}")
        assert row is not None
        assert row[0] == value, name


async def test_maintenance_hands_free_pages_back(store: Store) -> None:
    """Found while testing a full disk: auto_vacuum was set after WAL mode had written the
    new file's first page, where SQLite ignores it, so maintain() never freed a page."""
    row = await store.read_one("PRAGMA auto_vacuum")
    assert row is not None and row[0] == 2  # incremental
    await create_table(store)
    await store.write(lambda c: c.executemany("INSERT INTO t (v) VALUES (?)",
                                              [("x" * 1000,) for _ in range(500)]))
    await store.write(lambda c: c.execute("DELETE FROM t"))
    assert (await store.maintain())["pages_freed"] > 0


async def test_connect_applies_the_configured_settings(tmp_path: Path) -> None:
    conn = connect(tmp_path / "x.db", StoreConfig(synchronous="full", busy_timeout_ms=1234))
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 1234
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.in_transaction is False  # autocommit: callers BEGIN themselves
    finally:
        conn.close()


async def test_foreign_keys_are_enforced(store: Store) -> None:
    def schema(conn: Connection) -> None:
        conn.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        conn.execute("CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parent(id))")

    await store.write(schema)
    with pytest.raises(IntegrityError, match="FOREIGN KEY"):
        await store.write(lambda c: c.execute("INSERT INTO child VALUES (1, 42)"))


async def test_sqlite_vec_is_loaded_on_both_connections(store: Store) -> None:
    if not store.extensions:
        with pytest.raises(Error, match="vec_version"):
            await store.read_one("SELECT vec_version()")
        return
    row = await store.read_one("SELECT vec_version() AS v, vec_length('[1, 2, 3]') AS n")
    assert row is not None
    assert row["v"].startswith("v")
    assert row["n"] == 3
    assert await store.write(lambda c: c.execute("SELECT vec_length('[1, 2]')").fetchone()[0]) == 2


# --------------------------------------------------------------------------- migrations


async def test_migrations_are_recorded(store: Store) -> None:
    assert SCHEMA_VERSION == MIGRATIONS[-1][0] >= 1
    assert store.schema_version == SCHEMA_VERSION
    rows = await store.read("SELECT version, name FROM schema_version ORDER BY version")
    assert [(r["version"], r["name"]) for r in rows] == [(v, name) for v, name, _ in MIGRATIONS]
    assert await store.read_one("SELECT name FROM sqlite_master WHERE name = 'meta'") is not None


async def test_reopening_applies_nothing_twice(tmp_path: Path) -> None:
    path = tmp_path / "agentd.db"
    first = SqliteStore(path, StoreConfig())
    await first.open()
    before = [tuple(r) for r in await first.read("SELECT * FROM schema_version ORDER BY version")]
    await first.close()
    second = SqliteStore(path, StoreConfig())
    await second.open()
    try:
        after = [tuple(r) for r in await second.read("SELECT * FROM schema_version ORDER BY version")]
        assert after == before
        assert second.schema_version == SCHEMA_VERSION
    finally:
        await second.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agentd.db"
    first = SqliteStore(path, StoreConfig())
    await first.open()
    await first.write(lambda c: c.execute(
        "INSERT INTO schema_version VALUES (?, 'from-the-future.sql', 0)", (SCHEMA_VERSION + 1,)
    ))
    await first.close()

    for _ in range(2):  # the failed open released the lock: the second attempt is not "locked"
        newer = SqliteStore(path, StoreConfig())
        with pytest.raises(StoreError) as caught:
            await newer.open()
        assert not isinstance(caught.value, StoreLockedError)
        message = str(caught.value)
        assert str(path) in message
        assert f"schema version {SCHEMA_VERSION + 1} is newer" in message
        assert f"({SCHEMA_VERSION})" in message


async def test_uncreatable_data_dir_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create the data directory"):
        await SqliteStore(tmp_path / "file" / "sub" / "agentd.db", StoreConfig()).open()


# --------------------------------------------------------------------------- the lock


async def test_second_store_on_the_same_file_is_locked_out(tmp_path: Path) -> None:
    path = tmp_path / "agentd.db"
    first = SqliteStore(path, StoreConfig())
    await first.open()
    second = SqliteStore(path, StoreConfig())
    try:
        with pytest.raises(StoreLockedError) as caught:
            await second.open()
        assert f"pid {os.getpid()}" in str(caught.value)
        assert str(path) in str(caught.value)
    finally:
        await first.close()
    await second.open()  # released by close()
    await second.close()


# --------------------------------------------------------------------------- grouped writes


async def test_writes_of_one_tick_share_one_transaction(store: Store) -> None:
    await create_table(store)
    observer = raw_connection(store.path)  # sees committed rows only

    def insert(i: int) -> Any:
        def op(conn: Connection) -> tuple[int, int]:
            conn.execute("INSERT INTO t (id, v) VALUES (?, ?)", (i, f"v{i}"))
            return i, observer.execute("SELECT count(*) FROM t").fetchone()[0]
        return op

    try:
        results = await asyncio.gather(*(store.write(insert(i)) for i in range(50)))
        # All 50 ran before any commit: one transaction, committed once.
        assert results == [(i, 0) for i in range(50)]
        assert await count(store) == 50
        # A write of a later tick is a new transaction and sees the committed 50.
        assert await store.write(insert(50)) == (50, 50)
    finally:
        observer.close()


async def test_batched_values_are_written_by_one_op_per_transaction(store: Store) -> None:
    await create_table(store)
    calls: list[list[int]] = []

    def write_values(conn: Connection, values: list[int]) -> list[int]:
        calls.append(list(values))
        conn.executemany("INSERT INTO t (id) VALUES (?)", [(v,) for v in values])
        return [v * 10 for v in values]

    batched: BatchedWrite[int, int] = BatchedWrite(store, write_values)
    first = [batched.add(i) for i in range(5)]
    assert len(set(map(id, first))) == 1  # one future for the batch
    assert await first[0] == [0, 10, 20, 30, 40]
    # Added after that batch was taken: the next transaction, its own future; `submit`
    # gives each value its own result.
    later = batched.add(5)
    assert later is not first[0]
    assert await asyncio.gather(batched.submit(6), batched.submit(9)) == [60, 90]
    assert (await later)[0] == 50  # its batch's results, in the order the values came
    assert calls[0] == [0, 1, 2, 3, 4]
    assert sorted(v for call in calls[1:] for v in call) == [5, 6, 9]
    assert await count(store) == 8
    # A batch that fails fails every value's future, and nothing of it is written.
    doomed = [batched.add(7), batched.add(7)]
    with pytest.raises(IntegrityError):
        await doomed[0]
    assert await count(store) == 8
    # Values held when the store closes are written before it does.
    pending = batched.add(8)
    await store.close()
    assert pending.done() and pending.exception() is None


async def test_a_cancelled_value_does_not_cancel_the_rest_of_its_batch(store: Store) -> None:
    """Values of one batch share a future: a caller cancelled while it waits (an HTTP client
    gone) cancelled that future, and every other value of the batch failed with
    CancelledError though it was stored. Now only the cancelled caller sees its cancel."""
    await create_table(store)

    def write_values(conn: Connection, values: list[str]) -> list[str]:
        conn.executemany("INSERT INTO t (v) VALUES (?)", [(v,) for v in values])
        return [f"stored {v}" for v in values]

    batched = BatchedWrite(store, write_values)
    gone = asyncio.ensure_future(batched.submit("a"))
    kept = asyncio.ensure_future(batched.submit("b"))
    await asyncio.sleep(0)  # noqa: sleep - a yield: both start and wait on the batch's future
    gone.cancel()
    assert await asyncio.wait_for(kept, 10) == "stored b"
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await count(store) == 2


async def test_a_failing_op_fails_alone(store: Store) -> None:
    await create_table(store)

    def insert(i: int) -> Any:
        def op(conn: Connection) -> int:
            conn.execute("INSERT INTO t (id) VALUES (?)", (i,))
            if i == 5:
                raise ValueError("op 5 refuses")
            return i
        return op

    futures = [store.write(insert(i)) for i in range(10)]
    futures.append(store.write(lambda c: c.execute("INSERT INTO t (id) VALUES (3)")))  # duplicate
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[:5] == [0, 1, 2, 3, 4]
    assert isinstance(outcomes[5], ValueError)
    assert str(outcomes[5]) == "op 5 refuses"
    assert outcomes[6:10] == [6, 7, 8, 9]
    assert isinstance(outcomes[10], IntegrityError)
    rows = await store.read("SELECT id FROM t ORDER BY id")
    # The failed batch was rolled back before the ops were re-run alone: no duplicates, no 5.
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, 6, 7, 8, 9]


async def test_more_writes_than_one_batch_holds(store: Store) -> None:
    await create_table(store)
    results = await asyncio.gather(*(
        store.write(lambda c, i=i: c.execute("INSERT INTO t (id) VALUES (?)", (i,)).lastrowid)
        for i in range(1, 1201)
    ))
    assert results == list(range(1, 1201))
    assert await count(store) == 1200


async def test_writes_submitted_during_a_flush_are_not_lost(store: Store) -> None:
    await create_table(store)
    first = [store.write(lambda c, i=i: c.execute("INSERT INTO t (id) VALUES (?)", (i,))) for i in range(5)]
    await asyncio.gather(*first[:1])
    second = [store.write(lambda c, i=i: c.execute("INSERT INTO t (id) VALUES (?)", (i,)))
              for i in range(5, 10)]
    await asyncio.gather(*first, *second)
    assert await count(store) == 10


async def test_close_finishes_pending_writes(tmp_path: Path) -> None:
    for mode in ("normal", "full"):
        path = tmp_path / mode / "agentd.db"
        opened = SqliteStore(path, StoreConfig(synchronous=mode))  # type: ignore[arg-type]
        await opened.open()
        await create_table(opened)
        pending = [opened.write(lambda c, i=i: c.execute("INSERT INTO t (id) VALUES (?)", (i,)))
                   for i in range(20)]
        await opened.close()
        assert all(f.done() and f.exception() is None for f in pending), mode
        conn = raw_connection(path)
        try:
            assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 20, mode
        finally:
            conn.close()


async def test_a_close_cut_short_leaves_no_write_of_the_writer_thread_waiting(tmp_path: Path) -> None:
    """A close cancelled while the writer thread runs a batch (the daemon's stop stage
    timed out on a slow write) leaves that batch to commit and its writes resolved: the
    close cancelled the task feeding the thread, and the batch's futures hung for ever."""
    store = SqliteStore(tmp_path / "x.db", StoreConfig(synchronous="full"))
    await store.open()
    in_thread, release = threading.Event(), threading.Event()

    def slow(conn: Connection) -> str:
        in_thread.set()
        release.wait(10)
        return "committed"

    try:
        written = store.write(slow)
        await asyncio.to_thread(in_thread.wait, 10)
        # The op holds the thread until `release`: close cannot finish before the timeout.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.close(), 0.05)
        release.set()
        assert await asyncio.wait_for(written, 10) == "committed"
    finally:
        release.set()
        await store.close()


async def test_closed_store_refuses_reads_and_writes(tmp_path: Path) -> None:
    closed = SqliteStore(tmp_path / "agentd.db", StoreConfig())
    await closed.open()
    await closed.close()
    with pytest.raises(StoreError, match="the store is closed"):
        closed.write(lambda c: None)
    with pytest.raises(StoreError, match="the store is closed"):
        await closed.read("SELECT 1")


async def test_check_writable_records_the_check(store: Store) -> None:
    await store.check_writable()
    row = await store.read_one("SELECT value FROM meta WHERE key = 'last_write_check'")
    assert row is not None
    assert float(row["value"]) > 0


async def test_the_wal_file_is_cut_back_once_a_checkpoint_resets_it(tmp_path: Path) -> None:
    """A write burst grows the WAL file; checkpoints reuse it from the start but would never
    shrink it. journal_size_limit cuts it back to WAL_SIZE_LIMIT when it is next reset."""
    store = SqliteStore(tmp_path / "burst.db", StoreConfig())
    await store.open()
    try:
        await store.write(lambda conn: conn.execute("CREATE TABLE blob (b BLOB)"))
        chunk = b"x" * (1 << 20)
        for _ in range(80):  # 80 MB of WAL, past the limit
            await store.write(lambda conn: conn.execute("INSERT INTO blob VALUES (?)", (chunk,)))
        wal = tmp_path / "burst.db-wal"
        assert wal.stat().st_size > WAL_SIZE_LIMIT
        await store.checkpoint("PASSIVE")
        await store.write(lambda conn: conn.execute("DELETE FROM blob"))  # restarts the WAL
        assert wal.stat().st_size <= WAL_SIZE_LIMIT
    finally:
        await store.close()


async def test_with_two_readers_a_quick_read_does_not_wait_for_a_slow_one(tmp_path: Path) -> None:
    """Reads go to the least busy reader: with two, a quick query is answered while a slow
    one runs; with one, it waits its turn behind it."""
    slow_sql = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000) "
                "SELECT count(*) FROM n")

    async def first_done(readers: int) -> str:
        store = SqliteStore(tmp_path / f"r{readers}.db", StoreConfig(), readers=readers)
        await store.open()
        try:
            finished: list[str] = []
            slow = asyncio.ensure_future(store.read(slow_sql))
            slow.add_done_callback(lambda _: finished.append("slow"))
            await asyncio.sleep(0)  # the slow read is handed to its reader first
            quick = asyncio.ensure_future(store.read("SELECT 1"))
            quick.add_done_callback(lambda _: finished.append("quick"))
            await asyncio.wait_for(asyncio.gather(slow, quick), 10)
            return finished[0]
        finally:
            await store.close()

    assert await first_done(2) == "quick"
    assert await first_done(1) == "slow"


# --------------------------------------------------------------------------- the writer's own tasks


@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_a_flush_that_breaks_fails_its_writes_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    """A flush that raises by itself (a bug in the writer or a rider, not the storage) fails
    the writes it held with a StoreError and logs once: none is left waiting for a commit
    that will not come, inline (`normal`) or from the writer thread's task (`full`). The
    store keeps running: the next flush that works commits."""
    store = SqliteStore(tmp_path / "x.db", StoreConfig(synchronous=synchronous))  # type: ignore[arg-type]
    await store.open()
    try:
        await create_table(store)

        def broken(ops: list[Any]) -> list[tuple[bool, Any]]:
            raise RuntimeError("writer bug")

        monkeypatch.setattr(store, "_run_batch", broken)
        with capture_logs() as logs:
            writes = [store.write(lambda c: c.execute("INSERT INTO t (v) VALUES ('x')"))
                      for _ in range(3)]
            outcomes = await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), 10)
        assert all(isinstance(o, StoreError) and "writer bug" in str(o) for o in outcomes), outcomes
        failed = [entry for entry in logs if entry["event"] == "store.flush_failed"]
        assert len(failed) == 1
        assert failed[0]["writes"] == 3 and "writer bug" in failed[0]["error"]

        monkeypatch.undo()
        await asyncio.wait_for(store.write(lambda c: c.execute("INSERT INTO t (v) VALUES ('y')")), 10)
        assert await count(store) == 1
    finally:
        await store.close()


async def test_a_write_check_that_breaks_is_logged_and_close_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's own write check (run while writes fail) that raises otherwise than on
    the storage is logged once and tried again, not lost with its task; close() ends it."""
    monkeypatch.setattr(writer, "_PROBE_INTERVAL", 0.01)
    store = SqliteStore(tmp_path / "x.db", StoreConfig())
    await store.open()
    checks = 0
    checked_twice = asyncio.Event()

    async def broken_check() -> None:
        nonlocal checks
        checks += 1
        if checks == 2:
            checked_twice.set()
        raise RuntimeError("check bug")

    def full(conn: Connection) -> None:
        raise driver.OperationalError("database or disk is full")

    try:
        monkeypatch.setattr(store, "check_writable", broken_check)
        with capture_logs() as logs:
            with pytest.raises(StoreError, match="is full"):
                await store.write(full)
            await asyncio.wait_for(checked_twice.wait(), 10)
        assert [e["event"] for e in logs if e["event"].startswith("store.")] == [
            "store.writes_failing", "store.write_check_failed"]
        prober = store._prober
        assert prober is not None
    finally:
        await store.close()
    assert prober.done() and store._prober is None


# --------------------------------------------------------------------------- the seam


# Each table's statements in the one module that owns it on each engine: the part's module
# holds its SQLite statements, `postgres/<part>.py` its PostgreSQL ones. `meta` is the
# store's key-value table, shared by design; memory.db is SQLite only (for now). The
# engines' migrations read `schema_version`, and `store/copy.py` and `backup.py` read its
# version to refuse a file from another agentd (they copy tables by name, or pages, never
# by statement).
TABLE_OWNERS = {
    "tasks": {"taskqueue.py", "postgres/tasks.py", "waits.py", "postgres/waits.py"},
    "task_steps": {"steps.py", "postgres/steps.py"},
    # A wait and its task's state change in one transaction: suspending writes the wait and
    # the task `waiting`, waking the outcome and the task queued, a cancel ends both.
    "task_waits": {"waits.py", "postgres/waits.py", "taskqueue.py", "postgres/tasks.py"},
    "events": {"eventlog.py", "postgres/events.py"},
    "schedules": {"scheduler.py", "postgres/schedules.py"},
    "digest_cursors": {"digests.py", "postgres/digests.py"},
    "hook_deliveries": {"hooks.py", "postgres/hooks.py"},
    # `agentd store copy` reads memory.db's memories with their vectors in one statement
    # (no re-embedding) and builds PgMemory's index after the bulk load: the one reader and
    # writer of memory tables besides the two stores. On PostgreSQL each daemon's RAM index
    # of the codes (`postgres/memory_index.py`) reads `memories` to load and catch up; it
    # writes nothing.
    "memories": {"memory.py", "postgres/memory.py", "postgres/memory_index.py", "store/copy.py"},
    "memories_fts": {"memory.py"},
    "memory_vectors": {"memory.py", "store/copy.py"}, "memory_embeddings": {"memory.py", "store/copy.py"},
    "messages": {"memory.py"}, "sessions": {"memory.py"},
    "memory_sessions": {"postgres/memory.py"}, "memory_messages": {"postgres/memory.py"},
    "schema_version": {"store/migrations.py", "store/postgres.py", "store/copy.py", "backup.py"},
}


def test_each_table_is_written_and_read_only_by_its_owner() -> None:
    package = Path(__file__).resolve().parent.parent / "daemon" / "agentd"
    statement = re.compile(r"\b(?:FROM|UPDATE|INTO|JOIN)\s+(\w+)")
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for table in statement.findall(path.read_text(encoding="utf-8")):
            if table in TABLE_OWNERS:
                found.setdefault(table, set()).add(str(path.relative_to(package)))
    assert found["tasks"] and found["task_steps"]  # the scan sees the statements it is for
    assert {table: owners for table, owners in found.items()
            if not owners <= TABLE_OWNERS[table]} == {}
