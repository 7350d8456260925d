"""The RAM index of the codes on PostgreSQL (`agentd.postgres.memory_index`): recall through
it ranks as an exact search does and filters as PostgreSQL's filters do; what one daemon
writes is recalled through another at once, before the other has heard of it; each
daemon's index comes to hold exactly the searchable memories through every kind of write
by any daemon, and is read anew when its listener reconnects; it loads once the database
holds enough memories. Each `PgMemory` here stands for a daemon: its own pools, listener
and index, on one database."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from agentd import memory as memory_module
from agentd.config import MemoryConfig, StoreConfig
from agentd.memory import NewMemory, SqliteMemory
from agentd.postgres.memory import PgMemory
from agentd.postgres.memory_index import matching_tags, tag_of
from pg import fresh_database

WAIT = 15.0
DIMENSION = 64
NAMESPACES = ("a", "b", "c")
KINDS = ("fact", "event", "alert")


def gaussian(seed: str, n: int) -> list[float]:
    rng = random.Random(hashlib.sha256(seed.encode()).digest())
    return [rng.gauss(0.0, 1.0) for _ in range(n)]


def seeded_vector(text: str) -> list[float]:
    """A text "t<c> ..." lies near centre c: recall has neighbours to tell apart."""
    centre = np.array(gaussian(text.split(maxsplit=1)[0], DIMENSION))
    values = centre / np.linalg.norm(centre) + 0.06 * np.array(gaussian(text, DIMENSION))
    return (values / np.linalg.norm(values)).tolist()


class Seeded:
    id = "seeded-64"
    dimension = DIMENSION

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return [seeded_vector(t) for t in texts]


async def until(condition: Callable[[], Any], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)  # noqa: sleep - polling a condition with a deadline


@pytest.fixture
def ram_from_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RAM index loaded whatever the database holds (a daemon waits for 10,000)."""
    monkeypatch.setattr(memory_module, "RAM_INDEX_FROM", 0)


@pytest.fixture
async def memories() -> AsyncIterator[Callable[..., Any]]:
    """`a = await memories(**config)`: memory opened on one fresh database per test, as a
    daemon opens it, closed at the end."""
    url = await fresh_database()
    async with contextlib.AsyncExitStack() as stack:
        async def open_one(**config: Any) -> PgMemory:
            memory = PgMemory(MemoryConfig(url=url, **config), url, Seeded())
            await memory.open()
            stack.push_async_callback(memory.close)
            return memory

        open_one.url = url  # type: ignore[attr-defined]
        yield open_one


def corpus(count: int, seed: int = 7) -> list[NewMemory]:
    rng = random.Random(seed)
    return [NewMemory(f"t{rng.randrange(12)} note {i} {rng.random():.6f}", NAMESPACES[i % 3],
                      {"kind": KINDS[rng.randrange(3)], "n": i}) for i in range(count)]


def in_ram(memory: PgMemory) -> dict[int, str]:
    """The ids the index holds, with their namespaces."""
    assert memory._bits is not None and memory._bits.index is not None
    held: dict[int, str] = {}
    for namespace, block in memory._bits.index._blocks.items():
        for memory_id in block.ids[:block.count].tolist():
            if memory_id >= 0:
                held[memory_id] = namespace
    return held


async def searchable(memory: PgMemory) -> dict[int, str]:
    rows = await memory.store.read(
        "SELECT id, namespace FROM memories WHERE superseded_by IS NULL AND embedding IS NOT NULL")
    return {row["id"]: row["namespace"] for row in rows}


async def held_alike(memory: PgMemory) -> dict[int, str]:
    """The searchable memories, once the index is found to hold exactly them."""
    assert memory._bits is not None
    await memory._bits.loaded()

    async def alike() -> bool:
        return memory._bits is not None and memory._bits.index is not None and \
            in_ram(memory) == await searchable(memory)

    await until(alike)
    return in_ram(memory)


async def exact(memory: PgMemory, query: str, k: int, namespace: str | None,
                where: dict[str, Any]) -> list[int]:
    """The exact nearest by numpy over the stored vectors, filtered as PostgreSQL filters."""
    rows = await memory.store.read(
        "SELECT id, namespace, metadata, embedding::text AS embedding FROM memories "
        "WHERE superseded_by IS NULL AND embedding IS NOT NULL")
    query_vector = np.array(seeded_vector(query))
    scored = []
    for row in rows:
        metadata = __import__("json").loads(row["metadata"])
        if namespace is not None and row["namespace"] != namespace:
            continue
        if any(metadata.get(key) not in (value if isinstance(value, list) else [value])
               for key, value in where.items()):
            continue
        vector = np.array([float(x) for x in row["embedding"].strip("[]").split(",")])
        scored.append((1.0 - float(vector @ query_vector), row["id"]))
    return [memory_id for _, memory_id in sorted(scored)[:k]]


# --------------------------------------------------------------------------- the parts


def test_filter_tags_match_as_postgresql_s_filter_matches() -> None:
    """A filter value matches a memory's equal JSON value, or one whose text is the value's
    `str`; None matches null and absent; objects and arrays send the search to pgvector."""
    tags = [tag_of("number", "5"), tag_of("number", "5.0"), tag_of("string", "5"),
            tag_of("boolean", "true"), tag_of("string", "true"), tag_of("string", "True"),
            tag_of("null", None), tag_of(None, None), tag_of("object", '{"a": 1}')]
    assert matching_tags(tags, 5) == ["number:5", "number:5.0", "string:5"]
    assert matching_tags(tags, "5") == ["number:5", "string:5"]  # '5.0' is not the text "5"
    assert matching_tags(tags, True) == ["boolean:true", "string:True"]
    assert matching_tags(tags, "true") == ["boolean:true", "string:true"]
    assert matching_tags(tags, None) == ["", ""]  # null, absent
    assert matching_tags(tags, [5.0, "True"]) == ["number:5", "number:5.0", "string:True"]
    assert matching_tags(tags, '{"a": 1}') == ['object:{"a": 1}']
    assert matching_tags(tags, {"a": 1}) is None and matching_tags(tags, [[1]]) is None
    assert matching_tags(tags, 0) == [] and matching_tags(tags, False) == []


# --------------------------------------------------------------------------- recall


async def test_recall_through_the_ram_index_finds_what_sqlite_s_finds_and_nearly_all_of_the_exact(
        memories: Any, ram_from_start: None, tmp_path: Path) -> None:
    """The codes read from pgvector are sqlite-vec's and the candidates follow the same rule:
    the same memories recalled on SQLite's RAM index come back in the same order (pgvector's
    HNSW would differ); against numpy's exact search, recall@10 at 64 dimensions."""
    memory = await memories()
    on_sqlite = SqliteMemory(MemoryConfig(), StoreConfig(), tmp_path / "memory.db", Seeded())
    await on_sqlite.open()
    try:
        items = corpus(900)
        for engine in (memory, on_sqlite):
            await engine.remember_many(items[:450])
            await engine.remember_many(items[450:])
        await held_alike(memory)
        assert on_sqlite._bits is not None
        await on_sqlite._bits.loaded()
        assert (await memory.stats())["vector_index"]["state"] == "ready"
        compared = agreed = 0
        for c in range(12):
            query = f"t{c} what is there"
            for namespace in NAMESPACES:
                for where in ({}, {"kind": "alert"}, {"kind": ["event", "fact"]}):
                    found = await memory.recall(query, namespace=namespace, k=10, where=where)
                    assert [r.memory.id for r in found] == [
                        r.memory.id for r in await on_sqlite.recall(query, namespace=namespace, k=10,
                                                                    where=where)]
                    truth = await exact(memory, query, 10, namespace, where)
                    compared += len(truth)
                    agreed += len({r.memory.id for r in found} & set(truth))
            (vector,) = await memory.embedder.embed([query])
            rows = await memory._knn(vector, 10, None, {})
            assert [row["id"] for row in rows] == [i for i, _ in await on_sqlite._knn(vector, 10, None)]
            truth = await exact(memory, query, 10, None, {})
            compared += len(truth)
            agreed += len({row["id"] for row in rows} & set(truth))
        assert compared == 12 * (9 + 1) * 10  # not a comparison of empty lists
        assert agreed / compared >= 0.95
    finally:
        await on_sqlite.close()


async def test_filters_through_the_index_match_what_pgvector_s_search_matches(
        memories: Any, ram_from_start: None) -> None:
    """Values of every JSON type, and keys that are not filter fields (those go to pgvector)."""
    through_ram = await memories()
    through_pgvector = await memories(ram_index=False)
    values: list[Any] = [5, 5.0, "5", True, "true", None, 0.5, "x", [1, 2], {"a": 1}]
    items = [NewMemory(f"t{i % 4} value note {i}", "a",
                       {} if i % 11 == 0 else {"kind": values[i % len(values)], "other": i % 3})
             for i in range(220)]
    await through_ram.remember_many(items)
    await held_alike(through_ram)
    filters: list[dict[str, Any]] = [{"kind": v} for v in values[:8]] + [
        {"kind": [True, "x"]}, {"kind": {"a": 1}}, {"other": 1}, {"kind": "5", "other": 2}]
    # k = 70: a filter matches 60 memories at most (5 matches 5, 5.0 and "5"), all of them
    # among the 70 nearest codes it lets through: both searches return every one.
    for where in filters:
        ram = [r.memory.id for r in await through_ram.recall("t1 value", namespace="a", k=70, where=where)]
        pgvector = [r.memory.id for r in await through_pgvector.recall("t1 value", namespace="a", k=70,
                                                                         where=where)]
        assert ram == pgvector and 0 < len(ram) < 70, (where, ram, pgvector)
    assert (await through_pgvector.stats())["vector_index"] == {"engine": "pgvector"}


# --------------------------------------------------------------------------- two daemons


async def test_a_memory_written_through_another_daemon_is_recalled_before_it_is_heard(
        memories: Any, ram_from_start: None) -> None:
    """B's index stops following (its follower gone, as when it lags): what A writes is
    re-ranked through B all the same, past B's horizon."""
    a, b = await memories(), await memories()
    await a.remember_many(corpus(300))
    await held_alike(b)
    assert b._bits is not None
    follower = b._bits._tasks[1]
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower
    written, _ = await a.remember("t7 written through A a moment ago", namespace="b",
                                  metadata={"kind": "event"})
    assert written.id not in in_ram(b)
    found = await b.recall("t7 written through A a moment ago", namespace="b", k=1,
                           where={"kind": "event"})
    assert [r.memory.id for r in found] == [written.id]
    # A correction through A hides the original through B at once too.
    correction, _ = await a.remember("t7 corrected through A", namespace="b", supersedes=written.id)
    found = await b.recall("t7 written through A a moment ago", namespace="b", k=10)
    assert written.id not in [r.memory.id for r in found]
    found = await b.recall("t7 corrected through A", namespace="b", k=1)
    assert [r.memory.id for r in found] == [correction.id]


async def test_each_index_holds_what_the_database_holds_through_every_write_of_any_daemon(
        memories: Any, ram_from_start: None) -> None:
    a, b = await memories(), await memories()
    await a.remember_many(corpus(400))
    await held_alike(a)
    await held_alike(b)
    first, _ = await b.remember("t3 written through B", namespace="a", metadata={"kind": "alert"})
    correction, _ = await a.remember("t4 a correction", namespace="a", supersedes=first.id)
    await b.update(correction.id, metadata={"kind": "event"})  # a retag
    await a.forget(memory_id=5)
    for memory in (a, b):
        held = await held_alike(memory)
        assert first.id not in held and correction.id in held and 5 not in held
        found = await memory.recall("t4 a correction", namespace="a", k=1, where={"kind": "event"})
        assert [r.memory.id for r in found] == [correction.id]
    await b.forget(memory_id=correction.id)  # the original comes back (the foreign key's update)
    await a.forget(namespace="b", where={"kind": "fact"})
    await b.update(first.id, text="t5 changed text")  # a new vector: the code moves
    for memory in (a, b):
        assert first.id in await held_alike(memory)
        found = await memory.recall("t5 changed text", namespace="a", k=1)
        assert [r.memory.id for r in found] == [first.id]
    expired, _ = await a.remember("t6 short lived", namespace="c", expires_at=time.time() + 0.05)

    async def past() -> bool:
        return time.time() > expired.expires_at  # type: ignore[operator]

    await until(past)
    assert (await b.purge_expired())["memories"] == 1
    for memory in (a, b):
        assert expired.id not in await held_alike(memory)


async def test_an_index_is_read_anew_when_its_listener_reconnects(
        memories: Any, ram_from_start: None) -> None:
    """Notifications sent while the listener was away are lost: deletions among them would
    stay in the index for good, so each reconnection loads it anew."""
    a, b = await memories(), await memories()
    await a.remember_many(corpus(200))
    await held_alike(b)
    assert b._bits is not None
    before = b._bits.index
    conn = await asyncpg.connect(a.store.config.url)
    try:
        ended = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()")
        assert ended == 2  # A's and B's
    finally:
        await conn.close()

    async def reloaded() -> bool:
        return b._bits is not None and b._bits.index is not None and b._bits.index is not before

    await until(reloaded)
    await a.forget(namespace="c")
    held = await held_alike(b)
    assert held and "c" not in held.values()


async def test_the_index_loads_once_the_database_holds_enough_memories(
        memories: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below `RAM_INDEX_FROM` memories recall stays on pgvector; writes through any daemon
    that bring the database there load every daemon's index."""
    monkeypatch.setattr(memory_module, "RAM_INDEX_FROM", 150)
    a, b = await memories(), await memories()
    await a.remember_many(corpus(100))
    stats = (await b.stats())["vector_index"]
    assert stats["engine"] == "pgvector" and stats["state"] == "waiting" and stats["ram_from"] == 150
    assert b._bits is not None and b._bits.index is None
    await a.remember_many(corpus(100, seed=8))
    for memory in (a, b):
        assert len(await held_alike(memory)) == 200
        assert (await memory.stats())["vector_index"]["state"] == "ready"
    late = await memories()  # a daemon starting on a database that holds enough loads at once
    assert len(await held_alike(late)) == 200


async def test_an_index_whose_catch_up_failed_answers_meanwhile_and_loads_anew(
        memories: Any, ram_from_start: None) -> None:
    """B's catch-up fails (here: its query cancelled while it waits on a lock): recall
    still answers through the index as it was, and a load anew after a backoff brings the
    index level again; then the connection that reads the codes is cut, and the next
    catch-up reconnects."""
    a, b = await memories(), await memories()
    await a.remember_many(corpus(200))
    await held_alike(b)
    assert b._bits is not None and b._bits._conn is not None
    before = b._bits.index
    written, _ = await a.remember("t2 written while B's index could not read", namespace="a")
    blocker = await asyncpg.connect(a.store.config.url)
    try:
        index_pid = b._bits._conn.get_server_pid()
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE memories IN ACCESS EXCLUSIVE MODE")
            b._bits._heard("c")  # as a notification of another write would

            async def waiting() -> bool:
                return bool(await blocker.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                    index_pid))

            await until(waiting)
            assert await blocker.fetchval("SELECT pg_cancel_backend($1)", index_pid)
        found = await b.recall("t2 written while B's index could not read", namespace="a", k=1)
        assert [r.memory.id for r in found] == [written.id]

        async def reloaded() -> bool:
            return b._bits is not None and b._bits.index is not before

        await until(reloaded)
        assert written.id in await held_alike(b)
        assert (await b.stats())["vector_index"]["state"] == "ready"
        assert b._bits._conn is not None
        assert await blocker.fetchval("SELECT pg_terminate_backend($1)", b._bits._conn.get_server_pid())
    finally:
        await blocker.close()
    again, _ = await a.remember("t3 written after B's connection was cut", namespace="b")
    assert again.id in await held_alike(b)
