"""`PgStore`, the PostgreSQL engine, against a real throwaway server (tests/pg.py): grouped
writes, a failing op failing alone, reads, notifications, migrations run once by daemons
that start together, and a server that is away answering with StoreUnavailableError."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from agentd.config import StoreConfig
from agentd.errors import StoreError
from agentd.store.postgres import PgConnection, PgStore
from pg import fresh_database
from test_cluster_scheduler import until_async


@pytest.fixture
async def pg_store() -> Any:
    store = PgStore(StoreConfig(url=await fresh_database(), pool_size=4))
    await store.open()
    yield store
    await store.close()


def put(key: str, value: str) -> Any:
    async def op(conn: PgConnection) -> str:
        await conn.execute("INSERT INTO meta (key, value) VALUES ($1, $2)", key, value)
        return key

    return op


async def test_the_writes_of_a_tick_share_one_transaction(pg_store: PgStore) -> None:
    before = pg_store.transactions
    keys = await asyncio.gather(*(pg_store.write(put(f"k{i}", "v")) for i in range(50)))
    assert keys == [f"k{i}" for i in range(50)]
    assert pg_store.transactions == before + 1
    rows = await pg_store.read("SELECT count(*) AS n FROM meta WHERE key LIKE 'k%'")
    assert rows[0]["n"] == 50


async def test_a_failing_op_fails_alone(pg_store: PgStore) -> None:
    await pg_store.write(put("taken", "v"))
    results = await asyncio.gather(pg_store.write(put("a", "v")), pg_store.write(put("taken", "w")),
                                   pg_store.write(put("b", "v")), return_exceptions=True)
    assert results[0] == "a" and results[2] == "b"
    assert isinstance(results[1], asyncpg.UniqueViolationError)
    row = await pg_store.read_one("SELECT value FROM meta WHERE key = $1", ("taken",))
    assert row is not None and row["value"] == "v"


async def test_last_parts_run_at_the_end_of_the_transaction_and_alone(pg_store: PgStore) -> None:
    ran: list[str] = []

    def step(name: str, fail: bool = False) -> Any:
        async def op(conn: PgConnection) -> str:
            ran.append(name)
            if fail:
                raise ValueError(name)
            return name

        return op

    before = pg_store.transactions
    results = await asyncio.gather(pg_store.write(step("a"), last=step("a-last")),
                                   pg_store.write(step("b")),
                                   pg_store.write(step("c"), last=step("c-last")),
                                   pg_store.write(step("d")))
    assert results == ["a", "b", "c", "d"]  # the ops' results, not the last parts'
    assert ran == ["a", "b", "c", "d", "a-last", "c-last"]
    assert pg_store.transactions == before + 1
    ran.clear()
    outcome = await asyncio.gather(pg_store.write(step("e"), last=step("e-last")),
                                   pg_store.write(step("f"), last=step("f-last", fail=True)),
                                   return_exceptions=True)
    assert outcome[0] == "e" and isinstance(outcome[1], ValueError)
    # The batch, then each write alone: its op, then its last part.
    assert ran == ["e", "f", "e-last", "f-last", "e", "e-last", "f", "f-last"]


async def test_the_event_counter_is_taken_at_the_end_of_its_transaction(pg_store: PgStore) -> None:
    """The event counter's row lock orders every daemon's event-writing commits: a write
    batched after an event insert runs before the counter is taken, so it is held only
    until the commit and never before another row lock (no deadlock between daemons)."""
    from agentd.postgres.events import PgEvents

    events = PgEvents(pg_store, lambda: True)
    other = await asyncpg.connect(pg_store.config.url)
    try:
        async def probe(conn: PgConnection) -> bool:
            async with other.transaction():
                try:
                    await other.execute("SELECT last_id FROM event_counter FOR UPDATE NOWAIT")
                except asyncpg.LockNotAvailableError:
                    return False  # this transaction took the counter already
                return True

        inserted = events.insert([(1, "job.done", 1.0, "{}", None, None, 1)], alone=True)
        free = await pg_store.write(probe)
        await inserted
        assert free, "the counter was taken before a later write of the same transaction"
    finally:
        await other.close()
    rows = await pg_store.read("SELECT topic FROM events")
    assert [row["topic"] for row in rows] == ["job.done"]


async def test_notifications_reach_listeners_and_reconnects_are_announced(pg_store: PgStore) -> None:
    got: asyncio.Queue[str] = asyncio.Queue()
    reconnected = asyncio.Event()
    pg_store.listen("agentd_test", got.put_nowait)
    pg_store.on_reconnect(reconnected.set)
    listener = asyncio.create_task(pg_store.run_listener())
    try:
        await asyncio.wait_for(reconnected.wait(), 10)

        async def notify(conn: PgConnection) -> None:
            await conn.execute("SELECT pg_notify('agentd_test', 'hello')")

        await pg_store.write(notify)
        assert await asyncio.wait_for(got.get(), 10) == "hello"
    finally:
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener


async def test_channels_asked_for_together_on_the_open_connection_are_all_heard(
        pg_store: PgStore) -> None:
    """Several `listen()` at once once the connection is open (parts of a daemon starting):
    their LISTENs went to the connection together, and all but one were refused ("another
    operation is in progress"), leaving those channels unheard until a reconnect."""
    reconnected = asyncio.Event()
    pg_store.on_reconnect(reconnected.set)
    listener = asyncio.create_task(pg_store.run_listener())
    try:
        await asyncio.wait_for(reconnected.wait(), 10)
        heard: dict[str, asyncio.Future[str]] = {}
        for n in range(5):
            heard[f"agentd_test_{n}"] = asyncio.get_running_loop().create_future()
            pg_store.listen(f"agentd_test_{n}", heard[f"agentd_test_{n}"].set_result)
        while pg_store._adding:
            await asyncio.wait(set(pg_store._adding), timeout=10)

        async def notify(conn: PgConnection) -> None:
            for channel in heard:
                await conn.execute("SELECT pg_notify($1, $1)", channel)

        await pg_store.write(notify)
        for channel, future in heard.items():
            assert await asyncio.wait_for(future, 10) == channel
    finally:
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener


async def test_a_channel_asked_for_while_the_listening_session_is_set_up_is_heard(
        pg_store: PgStore) -> None:
    """`listen()` called while the opening connection runs its session statements (a daemon's
    event feed starting while the task queue's advisory lock is taken): that channel went
    unLISTENed, and the daemon's streams missed the other daemons' events."""
    holder = await asyncpg.connect(pg_store.config.url)
    lock = ("SELECT pg_advisory_lock($1)", 4242)
    await holder.execute(*lock)  # the listening session's statement waits on it
    pg_store.on_listener_open(*lock)
    reconnected = asyncio.Event()
    pg_store.on_reconnect(reconnected.set)
    listener = asyncio.create_task(pg_store.run_listener())
    try:
        await until_async(lambda: holder.fetchval(
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))
        heard: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        pg_store.listen("agentd_test_late", heard.set_result)
        await holder.execute("SELECT pg_advisory_unlock($1)", 4242)
        await asyncio.wait_for(reconnected.wait(), 10)

        async def notify(conn: PgConnection) -> None:
            await conn.execute("SELECT pg_notify('agentd_test_late', 'late')")

        await pg_store.write(notify)
        assert await asyncio.wait_for(heard, 10) == "late"
    finally:
        listener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listener
        await holder.close()


async def test_daemons_that_start_together_migrate_once() -> None:
    url = await fresh_database()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
    stores = [PgStore(StoreConfig(url=url, pool_size=2)) for _ in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    try:
        assert {store.schema_version for store in stores} == {stores[0].schema_version}
        rows = await stores[0].read("SELECT version, count(*) AS n FROM schema_version GROUP BY version")
        assert rows and all(row["n"] == 1 for row in rows)
    finally:
        await asyncio.gather(*(store.close() for store in stores))


async def test_an_unreachable_server_is_a_clear_error() -> None:
    store = PgStore(StoreConfig(url="postgresql://agentd:secret@127.0.0.1:1/nowhere"))
    with pytest.raises(StoreError, match=r"cannot connect to PostgreSQL") as caught:
        await store.open()
    assert "secret" not in str(caught.value) and "agentd:***@127.0.0.1:1" in str(caught.value)


async def test_connections_the_server_ended_are_replaced_without_a_failure(
        pg_store: PgStore) -> None:
    # Every connection of the pool is closed by the server, as when it restarts.
    other = await asyncpg.connect(pg_store.config.url)
    try:
        await other.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    finally:
        await other.close()
    # The pool replaces broken connections: the next write and read go through.
    assert await pg_store.write(put("after", "v")) == "after"
    assert (await pg_store.read_one("SELECT value FROM meta WHERE key = 'after'")) is not None
