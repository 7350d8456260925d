"""memory.db's binary codes in RAM (`agentd.bitindex`, `agentd.ramindex`, `[memory]
ram_index`): the codes it makes are sqlite-vec's, its candidates follow the SQL path's rule,
recall through it returns what recall through sqlite-vec returns, it is loaded once memory.db
holds enough memories, and it holds exactly the memories memory_vectors holds through every
kind of write: while it loads, after a cancelled caller, after reembed."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agentd import bitindex
from agentd import memory as memory_module
from agentd.bitindex import BitIndex, candidates, pack_bits, words_for
from agentd.config import StoreConfig
from agentd.memory import NewMemory, SqliteMemory
from agentd.ramindex import IndexChanges, Indexed
from agentd.store.driver import connect

WAIT = 10.0
DIMENSION = 64

# 64-dimensional vectors in clusters: a text "t<c> ..." lies near centre c, so recall has
# neighbours to tell apart, and the Hamming candidates matter.
SEEDED_PLUGIN = """
    import hashlib
    import random

    from agentd import Plugin

    plugin = Plugin("seeded")


    def gaussian(seed, n):
        rng = random.Random(hashlib.sha256(seed.encode()).digest())
        return [rng.gauss(0.0, 1.0) for _ in range(n)]


    def vector(text):
        centre = gaussian(text.split()[0], 64)
        norm = sum(x * x for x in centre) ** 0.5
        values = [c / norm + 0.06 * n for c, n in zip(centre, gaussian(text, 64))]
        norm = sum(x * x for x in values) ** 0.5
        return [x / norm for x in values]


    class Seeded:
        id = "seeded-64"
        dimension = 64

        async def embed(self, texts):
            return [vector(t) for t in texts]


    @plugin.embedder("seeded")
    def make(config):
        return Seeded()
"""
NAMESPACES = ("a", "b", "c")
KINDS = ("fact", "event", "alert")


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)  # noqa: sleep - polling a condition with a deadline


@pytest.fixture
def seeded_dir(plugin_dir: Any) -> Path:
    return plugin_dir({"seeded.py": SEEDED_PLUGIN}, name="seeded_plugins")


@pytest.fixture
def ram_from_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RAM index loaded whatever memory.db holds (a daemon waits for 10,000 memories)."""
    monkeypatch.setattr(memory_module, "RAM_INDEX_FROM", 0)


def memory_of(daemon: Any) -> SqliteMemory:
    memory = daemon.memory
    assert isinstance(memory, SqliteMemory)
    return memory


async def held_alike(memory: SqliteMemory) -> list[int]:
    """The ids memory_vectors holds, once the RAM index is loaded and found to hold the same."""
    assert memory._bits is not None
    await memory._bits.loaded()
    assert memory._bits.index is not None, memory._bits.describe()
    in_ram = sorted(int(i) for _, ids, _ in memory._bits.index.views(None) for i in ids if i >= 0)
    on_disk = sorted(r[0] for r in await memory.store.read("SELECT id FROM memory_vectors"))
    assert in_ram == on_disk
    return on_disk


def corpus(count: int, seed: int = 7) -> list[NewMemory]:
    rng = random.Random(seed)
    return [NewMemory(f"t{rng.randrange(12)} note {i} {rng.random():.6f}", NAMESPACES[i % 3],
                      {"kind": KINDS[rng.randrange(3)], "n": i}) for i in range(count)]


# --------------------------------------------------------------------------- the parts


def test_codes_are_packed_as_sqlite_vec_packs_them(tmp_path: Path) -> None:
    conn = connect(tmp_path / "codes.db", StoreConfig())
    rng = np.random.default_rng(1)
    try:
        for dimension in (8, 16, 64, 104, 384):
            for _ in range(20):
                vector = rng.standard_normal(dimension).astype(np.float32)
                vector[rng.integers(dimension)] = 0.0  # zero is not above 0: bit clear
                theirs = conn.execute("SELECT vec_quantize_binary(?)", (vector.tobytes(),)).fetchone()[0]
                ours = pack_bits(vector[np.newaxis], words_for(dimension)).tobytes()
                assert ours[:len(theirs)] == theirs and not any(ours[len(theirs):])
    finally:
        conn.close()


def reference(distances: np.ndarray, k: int, margin: int, cap: int) -> tuple[set[int], set[int], int]:
    """What `candidates` must return for these distances (index = id): (rows it must hold,
    rows it may hold, how many), by the rule spelled out the slow way."""
    order = sorted(range(len(distances)), key=lambda i: distances[i])
    if not order:
        return set(), set(), 0
    kth = distances[order[min(k, len(order)) - 1]]
    within = [i for i in order if distances[i] <= kth + margin]
    if len(within) <= cap:
        return set(within), set(), len(within)
    edge = distances[within[cap - 1]]  # the distance at which `cap` is reached
    must = {i for i in within if distances[i] < edge}
    return must, {i for i in within if distances[i] == edge}, cap


@pytest.mark.parametrize("split_from", [None, 1], ids=["one thread", "two halves"])
def test_candidates_follow_the_rule_with_filters_dead_rows_ties_and_a_cap(
        split_from: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule, whether the scan runs in one thread or (a long scan: here every one) in
    two halves cut anywhere across the blocks."""
    if split_from is not None:
        monkeypatch.setattr(bitindex, "_SPLIT_ROWS", split_from)
    rng = np.random.default_rng(2)
    words = words_for(DIMENSION)
    for trial in range(200):
        rows = int(rng.integers(1, 400))
        # Few distinct codes: many ties, so the cap falls among equals.
        pool = rng.integers(0, 2**63, size=(int(rng.integers(1, 40)), words), dtype=np.uint64)
        codes = pool[rng.integers(len(pool), size=rows)]
        ids = np.arange(rows, dtype=np.int64)
        tags = rng.integers(0, 3, size=(rows, 1)).astype(np.int32)
        dead = rng.random(rows) < 0.1
        ids[dead] = -1
        query = pool[0] ^ np.uint64(int(rng.integers(0, 2**20)))
        k, margin, cap = int(rng.integers(1, 20)), int(rng.integers(0, 8)), int(rng.integers(5, 60))
        wanted = [(0, np.array([1, 2], dtype=np.int32))] if trial % 2 else []
        # Two blocks, as two namespaces searched together.
        split = rows // 2
        views = [(codes[:split].T, ids[:split], tags[:split]), (codes[split:].T, ids[split:], tags[split:])]
        found = candidates(views, query, k, dimension=DIMENSION, margin=margin, cap=cap, wanted=wanted)
        xor = np.bitwise_xor(codes, query).ravel()
        distances = np.array([bin(int(x)).count("1") for x in xor]).reshape(rows, words).sum(1)
        eligible = ~dead & (np.isin(tags[:, 0], [1, 2]) if wanted else True)
        live = {i: distances[i] for i in range(rows) if eligible[i]}
        must, may, count = reference(np.array(list(live.values())), k, margin, cap)
        keys = list(live)
        must_ids, may_ids = {keys[i] for i in must}, {keys[i] for i in may}
        assert len(found) == len(set(found)) == count, (trial, len(found), count)
        assert must_ids <= set(found) <= must_ids | may_ids, trial


def test_candidates_none_when_the_nearest_is_past_bits_within() -> None:
    words = words_for(DIMENSION)
    codes = np.zeros((words, 3), dtype=np.uint64)  # a word per row, a code per column
    codes[0] = [0b1111, 0b111111, 0b1]  # 4, 6 and 1 bits from a zero query
    view = (codes, np.array([10, 11, 12]), np.zeros((3, 0), dtype=np.int32))
    query = np.zeros(words, dtype=np.uint64)
    assert candidates([view], query, 1, dimension=DIMENSION, margin=0, cap=10, bits_within=0) == []
    assert candidates([view], query, 1, dimension=DIMENSION, margin=0, cap=10, bits_within=1) == [12]
    view[1][2] = -1  # dead: the nearest live one is 4 bits away
    assert candidates([view], query, 1, dimension=DIMENSION, margin=0, cap=10, bits_within=3) == []


def test_an_index_replaces_removes_retags_and_compacts() -> None:
    index = BitIndex(DIMENSION, ("kind",))
    words = words_for(DIMENSION)
    rng = np.random.default_rng(3)

    def entry(memory_id: int, namespace: str, kind: str) -> Indexed:
        vector = rng.standard_normal(DIMENSION).astype(np.float32)
        return Indexed(memory_id, namespace, (kind,), vector.tobytes())

    changes = IndexChanges()
    for i in range(1, 201):
        changes.add(entry(i, "ab"[i % 2], "x"))
    index.apply(changes)
    assert len(index) == 200
    removed = IndexChanges()
    for i in range(1, 121):
        removed.remove(i)
    removed.add(entry(150, "a", "y"))  # a memory indexed again (its text changed), elsewhere
    removed.retag(151, ("y",))
    index.apply(removed)
    live = sorted(int(i) for _, ids, _ in index.views(None) for i in ids if i >= 0)
    assert live == list(range(121, 201))
    # Compacted: a search reads at most a quarter of dead rows, not the 121 marked.
    assert sum(len(ids) for _, ids, _ in index.views(None)) * 3 <= 80 * 4
    wanted = index.wanted([("kind", ["y"])])
    assert wanted is not None
    query = np.zeros(words, dtype=np.uint64)
    found = candidates(index.views(None), query, 10, dimension=DIMENSION, margin=DIMENSION, cap=100,
                       wanted=wanted)
    assert sorted(found) == [150, 151]
    assert index.wanted([("kind", ["never seen"])]) is None


# --------------------------------------------------------------------------- through memory


@pytest.mark.sqlite_only
async def test_recall_through_the_ram_index_returns_what_sqlite_vec_returns(
        start_daemon: Any, seeded_dir: Path, tmp_path: Path, ram_from_start: None) -> None:
    state = tmp_path / "state"
    daemon, _ = await start_daemon(plugin_dirs=[seeded_dir], state_dir=state,
                                   overrides={"memory": {"embedder": "seeded"}})
    memory = memory_of(daemon)
    items = corpus(1500)
    for start in range(0, len(items), 500):
        await memory.remember_many(items[start:start + 500])
    await held_alike(memory)
    assert (await memory.stats())["vector_index"]["state"] == "ready"

    async def answers() -> list[Any]:
        found: list[Any] = []
        for c in range(12):
            query = f"t{c} what is there"
            for namespace in NAMESPACES:
                for where in (None, {"kind": "alert"}, {"kind": ["event", "fact"]}, {"n": 3}):
                    result = await memory.recall(query, namespace=namespace, k=10, where=where)
                    found.append([(r.memory.id, round(r.distance or 0.0, 5)) for r in result])
            (vector,) = await memory.embedder.embed([query])
            found.append([(i, round(d, 5)) for i, d in await memory._knn(vector, 10, None)])
        return found

    through_ram = await answers()
    assert sum(len(a) for a in through_ram) > 12 * 3 * 25  # not a comparison of empty lists
    await daemon.stop()

    daemon, _ = await start_daemon(plugin_dirs=[seeded_dir], state_dir=state,
                                   overrides={"memory": {"embedder": "seeded", "ram_index": False}})
    memory = memory_of(daemon)
    assert memory._bits is None
    assert (await memory.stats())["vector_index"] == {"engine": "sqlite-vec"}
    assert memory_module.RAM_INDEX_FROM == 0  # the comparison is not of two sqlite-vec scans
    assert await answers() == through_ram


@pytest.mark.sqlite_only
async def test_the_index_holds_what_memory_vectors_holds_through_every_write(
        start_daemon: Any, seeded_dir: Path, ram_from_start: None) -> None:
    daemon, _ = await start_daemon(plugin_dirs=[seeded_dir], overrides={"memory": {"embedder": "seeded"}})
    memory = memory_of(daemon)
    assert memory._bits is not None
    await memory.remember_many(corpus(600))
    await held_alike(memory)
    # Writes while the index is read anew: each lands before or after the read's snapshot,
    # and either way the loaded index holds its outcome.
    memory._bits.start()
    first, _ = await memory.remember("t3 written while the index loads", namespace="a",
                                     metadata={"kind": "alert"})
    correction, _ = await memory.remember("t4 a correction", namespace="a", supersedes=first.id)
    await memory.update(correction.id, metadata={"kind": "event"})
    await memory.forget(memory_id=5)
    ids = await held_alike(memory)
    assert first.id not in ids and correction.id in ids and 5 not in ids
    found = await memory.recall("t4 a correction", namespace="a", k=3, where={"kind": "event"})
    assert found[0].memory.id == correction.id
    # Forgetting the correction brings back what it replaced (a delete's revival).
    await memory.forget(memory_id=correction.id)
    assert first.id in await held_alike(memory)
    await memory.forget(namespace="b", where={"kind": "fact"})
    await memory.update(first.id, text="t5 changed text")  # a new vector: the code moves
    await held_alike(memory)
    found = await memory.recall("t5 changed text", namespace="a", k=1)
    assert found[0].memory.id == first.id
    expired, _ = await memory.remember("t6 short lived", namespace="c", expires_at=time.time() + 0.05)
    await until(lambda: time.time() > expired.expires_at)  # type: ignore[operator]
    assert (await memory.purge_expired())["memories"] == 1
    assert expired.id not in await held_alike(memory)
    count = len(await held_alike(memory))
    assert await memory.reembed() == count  # the tables made anew: the index is read anew
    assert len(await held_alike(memory)) == count


@pytest.mark.sqlite_only
async def test_a_cancelled_remember_that_commits_is_indexed(
        start_daemon: Any, seeded_dir: Path, ram_from_start: None) -> None:
    """The write goes on when its caller is cancelled (an HTTP client gone): the memory it
    commits must be found, so the index follows the commit, not the caller."""
    daemon, _ = await start_daemon(plugin_dirs=[seeded_dir], overrides={"memory": {"embedder": "seeded"}})
    memory = memory_of(daemon)
    await held_alike(memory)
    held, release = threading.Event(), threading.Event()

    def hold(conn: Any) -> None:
        held.set()
        release.wait(WAIT)

    holding = memory.store.write(hold)  # the writer waits
    try:
        await until(held.is_set)
        caller = asyncio.create_task(memory.remember("t9 kept though its caller left", namespace="a"))
        await until(lambda: bool(memory.store._pending))  # its write is queued behind the hold
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
    finally:
        release.set()
    await holding
    await memory.store.write(lambda conn: None)  # writes commit in order: the remember's is in
    stored = await memory.store.read("SELECT id FROM memories WHERE text = 't9 kept though its caller left'")
    assert len(stored) == 1
    assert stored[0][0] in await held_alike(memory)
    found = await memory.recall("t9 kept though its caller left", namespace="a", k=1)
    assert found[0].memory.id == stored[0][0]


@pytest.mark.sqlite_only
async def test_the_index_loads_once_memory_holds_enough_memories(
        start_daemon: Any, seeded_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below `RAM_INDEX_FROM` memories recall stays on sqlite-vec (no numpy, no RAM spent);
    writes that bring memory.db there load the index, and a daemon opening a memory.db that
    holds enough loads it at once."""
    monkeypatch.setattr(memory_module, "RAM_INDEX_FROM", 300)
    state = tmp_path / "state"
    daemon, _ = await start_daemon(plugin_dirs=[seeded_dir], state_dir=state,
                                   overrides={"memory": {"embedder": "seeded"}})
    memory = memory_of(daemon)
    await memory.remember_many(corpus(250))
    assert (await memory.stats())["vector_index"] == {
        "engine": "sqlite-vec", "state": "waiting", "vectors": 250, "ram_from": 300}
    await memory.forget(memory_id=1)  # counted down too
    await memory.remember_many(corpus(50, seed=8))
    assert (await memory.stats())["vector_index"]["state"] == "waiting"
    await memory.remember("t1 the one that tips it", namespace="a")
    assert len(await held_alike(memory)) == 300
    assert (await memory.stats())["vector_index"]["state"] == "ready"
    await daemon.stop()

    daemon, _ = await start_daemon(plugin_dirs=[seeded_dir], state_dir=state,
                                   overrides={"memory": {"embedder": "seeded"}})
    assert len(await held_alike(memory_of(daemon))) == 300
