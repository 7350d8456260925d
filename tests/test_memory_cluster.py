"""One memory for every daemon on one PostgreSQL database (pgvector): what an agent learned
through one daemon is recalled through another at once, the same text remembered through
two at the same instant is stored once, and `[memory] url` puts memory in a database of
its own."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from agentd.app import Daemon
from agentd.config import MemoryConfig
from agentd.errors import StoreError
from agentd.memory import SqliteMemory
from agentd.postgres import memory as postgres_memory
from agentd.postgres.memory import PgMemory
from agentd.testing import daemon_url, make_config
from fake_openai import word_vector
from pg import fresh_database

# An embedder of 8-dimensional word-hash vectors whose embedding of a text starting "TWICE"
# waits at the test's barrier (`sys.agentd_test_barrier`), so that two daemons remembering
# it get past their duplicate checks before either writes.
BARRIER_PLUGIN = """
import asyncio
import hashlib
import re
import sys

from agentd import Plugin

plugin = Plugin("toy")


def vector(text):
    values = [0.0] * 8
    for word in re.findall(r"\\w+", text.lower()):
        values[hashlib.sha256(word.encode()).digest()[0] % 8] += 1.0
    norm = sum(x * x for x in values) ** 0.5 or 1.0
    return [x / norm for x in values]


class ToyEmbedder:
    id = "toy-8"
    dimension = 8

    async def embed(self, texts):
        barrier = getattr(sys, "agentd_test_barrier", None)
        if barrier is not None and any(t.startswith("TWICE") for t in texts):
            await asyncio.wait_for(barrier.wait(), 10)
        return [vector(t) for t in texts]


@plugin.embedder("toy")
def make(config):
    return ToyEmbedder()
"""


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`a, b = await daemons(2, memory_url=None, toy=False)`: real daemons on one fresh
    database (memory in `memory_url`'s, if given; with the barrier embedder if `toy`), each
    with an HTTP client: `(daemon, client)`."""
    url = await fresh_database()
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "toy.py").write_text(BARRIER_PLUGIN)
    async with contextlib.AsyncExitStack() as stack:
        started = 0

        async def start(count: int, memory_url: str | None = None,
                        toy: bool = False) -> list[tuple[Daemon, Any]]:
            nonlocal started
            made = []
            for n in range(count):
                overrides: dict[str, dict[str, Any]] = {"store": {"url": url}, "memory": {}}
                if memory_url is not None:
                    overrides["memory"]["url"] = memory_url
                if toy:
                    overrides["memory"]["embedder"] = "toy"
                sys.modules.pop("agentd_plugins.toy", None)  # each daemon loads its own
                daemon = Daemon(make_config(tmp_path / f"d{started + n}", [plugins] if toy else [],
                                            overrides))
                await stack.enter_async_context(daemon)
                client = await stack.enter_async_context(aiohttp.ClientSession(
                    daemon_url(daemon), timeout=aiohttp.ClientTimeout(total=30)))
                made.append((daemon, client))
            started += count
            return made

        start.url = url  # type: ignore[attr-defined]
        yield start


async def post(client: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with client.post("/v1/memory", json=body) as response:
        return response.status, await response.json()


async def test_a_memory_remembered_through_one_daemon_is_recalled_through_another(
        daemons: Any) -> None:
    (a, a_client), (b, b_client) = await daemons(2)
    status, saved = await post(a_client, {"text": "The staging database lives on host orion.",
                                          "namespace": "ops", "metadata": {"kind": "fact"}})
    assert status == 201
    async with b_client.get("/v1/memory/search", params={
            "q": "Which machine runs the staging database?", "namespace": "ops",
            "where": '{"kind": "fact"}'}) as response:
        found = (await response.json())["results"]
    assert [r["id"] for r in found] == [saved["id"]]
    # A change through B is what A reads next, history included.
    async with b_client.patch(f"/v1/memory/{saved['id']}",
                              json={"text": "The staging database moved to host vega."}) as response:
        assert response.status == 200
    assert (await a.memory.get(saved["id"])).text == "The staging database moved to host vega."
    assert [c.event for c in await a.memory.history(saved["id"])] == ["created", "updated"]
    # Sessions too: a conversation goes on through either daemon.
    await a.memory.session("chat").append("user", "hello from A")
    await b.memory.session("chat").append("assistant", "hello from B")
    assert [m["content"] for m in await a.memory.session("chat").history()] == [
        "hello from A", "hello from B"]


async def test_the_same_text_remembered_through_two_daemons_at_once_is_stored_once(
        daemons: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both daemons embed the text only once both have found no memory of it (the barrier):
    their writes race, and the unique live text per namespace lets one store it."""
    (a, a_client), (_, b_client) = await daemons(2, toy=True)
    facts = ["TWICE the on-call phone number is 555-0100", "TWICE backups are kept ninety days",
             "TWICE the build server reboots on Sunday", "TWICE lunch is at noon in hall B",
             "TWICE the VPN certificate renews in spring"]
    for round_number, text in enumerate(facts):
        monkeypatch.setattr(sys, "agentd_test_barrier", asyncio.Barrier(2), raising=False)
        (first, one), (second, other) = await asyncio.gather(
            post(a_client, {"text": text, "namespace": f"round-{round_number}"}),
            post(b_client, {"text": text, "namespace": f"round-{round_number}"}))
        assert one["id"] == other["id"], (one, other)
        assert sorted((first, second)) == [200, 201], (round_number, one, other)
    conn = await asyncpg.connect(daemons.url)
    try:
        counts = await conn.fetch("SELECT text, count(*) FROM memories GROUP BY text")
    finally:
        await conn.close()
    assert len(counts) == 5 and {row[1] for row in counts} == {1}
    assert (await a.memory.stats())["namespaces"] == {f"round-{n}": 1 for n in range(5)}


async def test_metadata_written_by_an_agentd_from_before_its_text_column_reads_as_stored(
        daemons: Any) -> None:
    """During a rolling upgrade a daemon from before pg_memory 0003 writes `metadata` alone:
    the rows it inserts have no given spelling, and its update must not leave the given
    spelling of the metadata it replaced to be read."""
    ((a, client),) = await daemons(1, toy=True)
    status, saved = await post(client, {"text": "the kettle is blue",
                                        "metadata": {"zeta": 1, "a": 2}})
    assert status == 201 and list(saved["metadata"]) == ["zeta", "a"]
    conn = await asyncpg.connect(daemons.url)
    try:
        await conn.execute("UPDATE memories SET metadata = '{\"kind\": \"old\"}'::jsonb WHERE id = $1",
                           saved["id"])
        old_id = await conn.fetchval(
            "INSERT INTO memories (namespace, text, metadata, hash, created_at, updated_at) "
            "VALUES ('default', 'written before', '{\"zeta\": 1, \"a\": 2}', 'h', 0, 0) RETURNING id")
    finally:
        await conn.close()
    assert (await a.memory.get(saved["id"])).metadata == {"kind": "old"}
    assert list((await a.memory.get(old_id)).metadata) == ["a", "zeta"]  # jsonb's order


async def test_memory_url_puts_memory_in_a_database_of_its_own(daemons: Any) -> None:
    memory_url = await fresh_database()
    ((daemon, client),) = await daemons(1, memory_url=memory_url)
    assert daemon.memory.location.endswith(memory_url.rsplit("/", 1)[1])
    status, _ = await post(client, {"text": "Memory apart from the queue.", "namespace": "x"})
    assert status == 201
    conn = await asyncpg.connect(memory_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM memories") == 1
    finally:
        await conn.close()
    conn = await asyncpg.connect(daemons.url)
    try:  # the store's database holds no memory tables at all
        assert await conn.fetchval("SELECT to_regclass('memories')") is None
    finally:
        await conn.close()


async def test_a_server_without_pgvector_is_named_with_what_to_do(tmp_path: Path) -> None:
    """The machine's PostgreSQL stands for one without pgvector: a database whose `vector`
    extension cannot be made (here: a role that may not create it)."""
    base = await fresh_database()
    conn = await asyncpg.connect(base)
    try:
        await conn.execute("CREATE ROLE agentd_plain LOGIN")
        await conn.execute("CREATE DATABASE agentd_plain OWNER agentd_plain")
    finally:
        await conn.close()
    scheme, _, rest = base.partition("://")
    _, _, host_part = rest.partition("@")
    plain = f"{scheme}://agentd_plain@{host_part.split('/', 1)[0]}/agentd_plain?{base.split('?', 1)[1]}"
    daemon = Daemon(make_config(tmp_path, [], {"memory": {"url": plain}}))
    with pytest.raises(StoreError) as refused:
        await daemon.start()
    assert "[memory] url" in str(refused.value) and "pgvector" in str(refused.value)


class WordHash:
    """An embedder of 16-dimensional word-hash vectors: deterministic, no model."""

    id = "word-hash-16"
    dimension = 16

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return [word_vector(text, self.dimension) for text in texts]


async def test_a_hybrid_recall_ranks_the_same_matches_each_time_on_a_server_that_plans_in_parallel() -> None:
    """The keyword side ranks the newest 1,000 matches, not the first 1,000 a scan finds:
    parallel workers (here made cheap, as a big table makes them) found other ones at each
    call, and so did pooled connections planning the scan each its own way (the 1M bench's
    hybrid recall@10 read 0.50)."""
    url = await fresh_database()
    conn = await asyncpg.connect(url)
    try:
        database = await conn.fetchval("SELECT current_database()")
        for setting in ("parallel_setup_cost", "parallel_tuple_cost", "min_parallel_table_scan_size",
                        "min_parallel_index_scan_size"):
            await conn.execute(f"ALTER DATABASE {database} SET {setting} = 0")
    finally:
        await conn.close()
    memory = PgMemory(MemoryConfig(ram_index=False), url, WordHash())
    await memory.open()
    try:
        rng = random.Random(1)
        words = ["backup", "billing", "deploy", "search", "index", "nightly", "job", "pipeline", "error",
                 "warning", "disk", "full", "restart", "host", "alpha", "beta", "gamma", "delta"]
        texts = [" ".join(rng.choice(words) for _ in range(8)) + f" {n}" for n in range(20_000)]

        async def load(conn: Any) -> None:
            await conn.executemany(
                "INSERT INTO memories (namespace, text, hash, created_at, updated_at) "
                "VALUES ('kb', $1, $2, 0, 0)",
                [(text, hashlib.sha256(text.encode()).hexdigest()) for text in texts])
            await conn.execute("ANALYZE memories")

        await memory.store.write(load)
        answers = {tuple(m.id for m in await memory._keyword("which backup job failed on the nightly host",
                                                              "kb", 18, {}))
                   for _ in range(5)}
        assert len(answers) == 1 and len(next(iter(answers))) == 18, answers
    finally:
        await memory.close()


async def test_a_filter_that_keeps_few_rows_still_gets_k_through_the_hnsw_index(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The HNSW index answers a recall from its `ef_search` nearest (40 here): a filter that
    keeps one memory in a hundred would leave almost none of them. pgvector 0.8's iterative
    scan goes on through the index until `k` rows pass. (On a table this small the planner
    would rather scan it all, exactly: the test turns the other plans off.)"""
    searching = postgres_memory._search_settings
    monkeypatch.setattr(postgres_memory, "_search_settings", lambda config: {
        **searching(config), "enable_seqscan": "off", "enable_bitmapscan": "off", "enable_sort": "off"})
    url = await fresh_database()
    memory = PgMemory(MemoryConfig(hnsw_ef_search=40, ram_index=False), url, WordHash())
    await memory.open()
    try:
        texts = [f"note {n} about topic {n % 37} and item {n % 101}" for n in range(2000)]
        vectors = await memory.embedder.embed(texts)

        async def load(conn: Any) -> None:  # as a bulk load is done: the index after the rows
            await conn.execute("DROP INDEX memories_embedding")
            await conn.executemany(
                "INSERT INTO memories (namespace, text, metadata, hash, created_at, updated_at, "
                "embedding) VALUES ('kb', $1, $2::jsonb, $3, 0, 0, $4::text::vector)",
                [(text, json.dumps({"kind": "rare" if n % 100 == 0 else "common"}),
                  hashlib.sha256(text.encode()).hexdigest(), str(vector))
                 for n, (text, vector) in enumerate(zip(texts, vectors, strict=True))])
            await memory._build_index(conn)
            await conn.execute("ANALYZE memories")

        await memory.store.write(load)
        scans = "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'memories_embedding'"
        before = (await memory.store.read_one(scans))[0]
        found = await memory.recall("note about topic 5", namespace="kb", k=10, where={"kind": "rare"})
        assert len(found) == 10 and {r.memory.metadata["kind"] for r in found} == {"rare"}
        assert [r.distance for r in found] == sorted(r.distance for r in found)

        async def counted() -> bool:  # the statistics collector reports at its own pace
            return (await memory.store.read_one(scans))[0] > before

        deadline = asyncio.get_running_loop().time() + 10
        while not await counted():
            assert asyncio.get_running_loop().time() < deadline, "the recall did not use the index"
            await asyncio.sleep(0.05)  # noqa: sleep (polling a server statistic with a deadline)
    finally:
        await memory.close()


async def test_an_update_to_the_text_of_another_live_memory_is_refused(daemons: Any) -> None:
    """One live memory per text and namespace holds for updates too (memory.db lets the
    two stand, docs/memory.md says so): a 400 naming the text, and the memory unchanged."""
    ((daemon, client),) = await daemons(1)
    statuses = [await post(client, {"text": text, "namespace": "site"})
                for text in ("The canteen opens at eight.", "Parking is free after six.")]
    assert [status for status, _ in statuses] == [201, 201]
    second = statuses[1][1]
    async with client.patch(f"/v1/memory/{second['id']}",
                            json={"text": "The canteen opens at eight."}) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert "text" in error["message"] and "already holds a memory of this text" in error["message"]
    assert (await daemon.memory.get(second["id"])).text == "Parking is free after six."
    assert [c.event for c in await daemon.memory.history(second["id"])] == ["created"]


async def test_memory_url_sqlite_keeps_memory_in_each_daemons_own_file(
        daemons: Callable[..., Any]) -> None:
    """`[memory] url = "sqlite"`: the store is shared, memory is not (a server without
    pgvector); each daemon keeps its memory.db and needs nothing of PostgreSQL for it."""
    (a, client_a), (b, client_b) = await daemons(2, memory_url="sqlite")
    assert isinstance(a.memory, SqliteMemory) and isinstance(b.memory, SqliteMemory)
    assert a.config.memory_path != b.config.memory_path
    async with client_a.post("/v1/memory", json={"text": "Only daemon A knows this."}) as response:
        assert response.status == 201
    async with client_b.get("/v1/memory/search", params={"q": "Only daemon A knows this."}) as response:
        assert (await response.json())["results"] == []
    async with client_a.get("/v1/memory/search", params={"q": "Only daemon A knows this."}) as response:
        assert [r["text"] for r in (await response.json())["results"]] == ["Only daemon A knows this."]
