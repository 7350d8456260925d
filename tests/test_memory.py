"""Agent memory against the real daemon: short-term sessions, long-term memories in
memory.db (sqlite-vec + FTS5), the real MiniLM embedder, an OpenAI-compatible HTTP embedder
served by the test, a plugin's embedder, the HTTP API, the CLI, and tasks that remember.

Each test starts at most a few daemons; each daemon that embeds loads the real model once
(~1 s), so related checks share a daemon. Nothing sleeps: expiry is an `expires_at` in the
past or a TTL of 0, and purging runs through the built-in schedule.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import math
import re
import struct
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlean
import sqlite_vec
from aiohttp import web

from agentd.embed import MiniLMEmbedder, build_embedder
from agentd.errors import (
    EmbedderError,
    EmbedderInputError,
    EmbedderMismatchError,
    MemoryNotFoundError,
    UnstorableTextError,
)
from agentd.memory import NewMemory, SqliteMemory
from agentd.memory_import import Progress
from agentd.testing import make_config
from fake_openai import word_vector

# Every test on memory.db and again on PostgreSQL + pgvector (the store's database): one
# contract, two engines. What only one engine has is asserted where the test says so.
pytestmark = pytest.mark.both_stores

# Daemons started by this module; every one that embeds loads the model (~1 s).
DAEMON_BUDGET = 48  # 21 today on each store; the file runs in about 20 s
STARTED = {"daemons": 0}


@pytest.fixture(scope="module", autouse=True)
def _daemon_budget() -> Iterator[None]:
    yield
    assert STARTED["daemons"] <= DAEMON_BUDGET, f"{STARTED['daemons']} daemons started: too slow"


@pytest.fixture
def start(start_daemon: Any) -> Any:
    """`daemon, events = await start(plugin_dirs=..., overrides=..., state_dir=...)`, counted."""

    async def run(**kwargs: Any) -> Any:
        STARTED["daemons"] += 1
        return await start_daemon(**kwargs)

    return run


# --------------------------------------------------------------------------- helpers


def unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(unit(a), unit(b), strict=True))


async def call(client: Any, method: str, path: str, body: Any = None, *, status: int = 200,
               params: dict[str, str] | None = None) -> Any:
    """One API call; asserts the status and returns the JSON body (None for 204)."""
    async with client.request(method, path, json=body, params=params) as response:
        text = await response.text()
        assert response.status == status, f"{method} {path}: {response.status} {text}"
        if response.status == 204:
            return None
        assert response.content_type == "application/json", text
        return json.loads(text)


async def search(client: Any, q: str, **params: Any) -> list[dict[str, Any]]:
    query = {"q": q, **{k: (json.dumps(v) if k == "where" else str(v)) for k, v in params.items()}}
    return (await call(client, "GET", "/v1/memory/search", params=query))["results"]


def on_sqlite(daemon: Any) -> bool:
    return isinstance(daemon.memory, SqliteMemory)


_SHARED_TABLE = re.compile(r"\b(FROM|UPDATE|INTO|JOIN)\s+(sessions|messages|meta)\b")


def for_engine(daemon: Any, sql: str) -> str:
    """SQL written for memory.db, for the daemon's memory: on PostgreSQL its tables are
    prefixed `memory_` and its placeholders numbered."""
    if on_sqlite(daemon):
        return sql
    numbers = itertools.count(1)
    sql = _SHARED_TABLE.sub(lambda m: f"{m[1]} memory_{m[2]}", sql)
    return re.sub(r"\?", lambda _: f"${next(numbers)}", sql)


async def rows(daemon: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of memory's tables (SQL as for memory.db), read through the daemon's own
    connection."""
    return [tuple(r) for r in await daemon.memory.store.read(for_engine(daemon, sql), params)]


async def execute(daemon: Any, sql: str, params: tuple[Any, ...] = ()) -> None:
    """One statement on memory's tables (SQL as for memory.db), through the daemon's writer."""
    sql = for_engine(daemon, sql)
    if on_sqlite(daemon):
        await daemon.memory.store.write(lambda conn: conn.execute(sql, params))
        return

    async def op(conn: Any) -> None:
        await conn.execute(sql, *params)

    await daemon.memory.store.write(op)


async def searchable(daemon: Any) -> list[int]:
    """The ids the vector search holds: vec0's rows on SQLite; on PostgreSQL, the memories
    with a vector that no correction superseded (the HNSW index's)."""
    sql = ("SELECT id FROM memory_vectors" if on_sqlite(daemon) else
           "SELECT id FROM memories WHERE superseded_by IS NULL AND embedding IS NOT NULL")
    return sorted(row[0] for row in await rows(daemon, sql))


async def keyworded(daemon: Any) -> list[int]:
    """The ids keyword search holds: FTS5's rows on SQLite; the live memories on PostgreSQL
    (their `keywords` column)."""
    sql = ("SELECT rowid FROM memories_fts" if on_sqlite(daemon) else
           "SELECT id FROM memories WHERE superseded_by IS NULL")
    return sorted(row[0] for row in await rows(daemon, sql))


def recorded(daemon: Any, dimension: str, embedder: str) -> list[tuple[str, str]]:
    """What memory records of its embedder (and, on SQLite, of its vec0 filter columns and
    the layout of its vectors)."""
    found = [("dimension", dimension), ("embedder", embedder)]
    if not on_sqlite(daemon):
        return found
    return [*found, ("filter_fields", "kind,source,agent"), ("quantization", "binary")]


async def run_purge_schedule(daemon: Any, client: Any) -> Any:
    """Fire the built-in `agentd.purge_memory` schedule now and return its task's result."""
    ran = await call(client, "POST", "/v1/schedules/agentd.purge_memory/run")
    return await daemon.queue.result(ran["last_task_id"], timeout=10)


def bad(error: dict[str, Any], code: str, *needles: str) -> None:
    assert error["error"]["code"] == code, error
    for needle in needles:
        assert needle in error["error"]["message"], (needle, error)


# A plugin whose tasks use ctx.memory, and remember their results.
MEM_PLUGIN = """
    from agentd import Plugin

    plugin = Plugin("mem")


    @plugin.task()
    async def chat(ctx, session, content):
        conversation = ctx.memory.session(session)
        await conversation.append("user", content, {"task_id": ctx.task.id})
        return await conversation.history()


    @plugin.task(remember=True)
    async def summarize(ctx, topic):
        return f"Summary: the {topic} project ships its first release in March."


    @plugin.task(remember="notes")
    async def note(ctx, city):
        return {"city": city, "fact": f"{city} has the largest harbour in the region"}


    @plugin.task(remember=True)
    async def nothing(ctx):
        return None


    @plugin.task(remember=True)
    async def blank(ctx):
        return ""


    @plugin.task()
    async def learn(ctx, text):
        memory, created = await ctx.memory.remember(
            text, namespace="learned",
            metadata={"task": ctx.task.name, "task_id": ctx.task.id, "kind": "lesson"})
        found = await ctx.memory.recall(text, namespace="learned", k=1, where={"kind": "lesson"})
        return {"id": memory.id, "created": created, "recalled": found[0].memory.id}
"""

# A plugin registering an embedder: deterministic bag-of-words vectors of 8 dimensions.
TOY_PLUGIN = """
    import hashlib
    import re

    from agentd import Plugin

    plugin = Plugin("toy")
    CALLS = []


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
            CALLS.append(list(texts))
            return [vector(t) for t in texts]


    @plugin.embedder("toy")
    def make(config):
        return ToyEmbedder()
"""


@pytest.fixture
def mem_dir(plugin_dir: Any) -> Path:
    return plugin_dir({"mem.py": MEM_PLUGIN}, name="mem_plugins")


# --------------------------------------------------------------------------- an embeddings server


class EmbeddingServer:
    """An OpenAI-compatible `POST /v1/embeddings` on 127.0.0.1: word-hash vectors, answered
    in reverse order (clients must sort by index); `fail_next` queues error answers first."""

    def __init__(self, dimension: int = 64) -> None:
        self.dimension = dimension
        self.requests: list[dict[str, Any]] = []
        self.failures: list[tuple[int, dict[str, str]]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    def fail_next(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.failures.append((status, headers or {}))

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append({"authorization": request.headers.get("Authorization"),
                              "model": body.get("model"), "input": body.get("input"),
                              "client_port": peer[1] if peer else None})
        if self.failures:
            status, headers = self.failures.pop(0)
            return web.json_response({"error": {"message": f"answering {status}"}}, status=status,
                                     headers=headers)
        data = [{"object": "embedding", "index": i, "embedding": word_vector(text, self.dimension)}
                for i, text in enumerate(body["input"])]
        return web.json_response({"object": "list", "model": body.get("model"), "data": data[::-1]})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/embeddings", self._embeddings)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def embedding_server() -> AsyncIterator[EmbeddingServer]:
    server = EmbeddingServer()
    await server.start()
    yield server
    await server.close()


def http_embedder_table(server: EmbeddingServer, **extra: Any) -> dict[str, Any]:
    return {"embedder": "http", "http_url": server.url, "http_model": "hash-64",
            "http_dimension": server.dimension, **extra}


# --------------------------------------------------------------------------- short-term sessions


async def test_sessions_over_http_and_inside_a_task(start: Any, http: Any, mem_dir: Path) -> None:
    daemon, _ = await start(plugin_dirs=[mem_dir])
    client = http(daemon)
    first = await call(client, "POST", "/v1/sessions/chat-1/messages",
                       {"role": "user", "content": "hello", "meta": {"lang": "en"}}, status=201)
    assert (first["session_id"], first["role"], first["content"], first["meta"]) == (
        "chat-1", "user", "hello", {"lang": "en"})
    await call(client, "POST", "/v1/sessions/chat-1/messages",
               {"role": "assistant", "content": "hi, how can I help?"}, status=201)
    await call(client, "POST", "/v1/sessions/other/messages", {"role": "user", "content": "elsewhere"},
               status=201)

    # A task appends through ctx.memory and sees the whole conversation, oldest first.
    task = await daemon.queue.enqueue("mem.chat", {"session": "chat-1", "content": "from a task"})
    history = await daemon.queue.result(task.id, timeout=10)
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "hello"), ("assistant", "hi, how can I help?"), ("user", "from a task")]
    assert history[0]["meta"] == {"lang": "en"} and history[2]["meta"] == {"task_id": task.id}
    assert history[0]["id"] == first["id"]

    listed = await call(client, "GET", "/v1/sessions/chat-1/messages")
    assert listed["session_id"] == "chat-1"
    assert [m["content"] for m in listed["messages"]] == ["hello", "hi, how can I help?", "from a task"]
    last_two = await call(client, "GET", "/v1/sessions/chat-1/messages", params={"limit": "2"})
    assert [m["content"] for m in last_two["messages"]] == ["hi, how can I help?", "from a task"]
    session = daemon.memory.session("chat-1")
    assert [m["content"] for m in await session.history(limit=1)] == ["from a task"]
    await session.append("assistant", "noted", {"tokens": 3})
    assert [m["content"] for m in await session.history()][-2:] == ["from a task", "noted"]
    stats = await call(client, "GET", "/v1/memory/stats")
    assert (stats["sessions"], stats["messages"]) == (2, 5)
    # Listed, the most recently active first; found by the start of their ids.
    listing = (await call(client, "GET", "/v1/sessions"))["sessions"]
    assert [(s["id"], s["messages"]) for s in listing] == [("chat-1", 4), ("other", 1)]
    assert listing[0]["expires_at"] > listing[0]["updated_at"] >= listing[1]["updated_at"]
    assert [s["id"] for s in (await call(client, "GET", "/v1/sessions", params={"prefix": "oth"}))[
        "sessions"]] == ["other"]
    assert [s["id"] for s in (await call(client, "GET", "/v1/sessions", params={"limit": "1"}))[
        "sessions"]] == ["chat-1"]

    # The session lives for session_ttl after its last message (the default: a day).
    (expires_at,) = (await rows(daemon, "SELECT expires_at FROM sessions WHERE id = 'chat-1'"))[0]
    assert expires_at == pytest.approx(time.time() + daemon.config.memory.session_ttl, abs=5)

    cleared = await call(client, "DELETE", "/v1/sessions/chat-1/messages")
    assert cleared == {"deleted": 4}
    assert (await call(client, "GET", "/v1/sessions/chat-1/messages"))["messages"] == []
    assert await rows(daemon, "SELECT count(*) FROM messages WHERE session_id = 'chat-1'") == [(0,)]
    assert await rows(daemon, "SELECT count(*) FROM sessions WHERE id = 'chat-1'") == [(0,)]
    assert await session.clear() == 0
    # The other conversation is untouched.
    other = await call(client, "GET", "/v1/sessions/other/messages")
    assert [m["content"] for m in other["messages"]] == ["elsewhere"]


async def test_bad_session_requests_are_400_naming_the_problem(start: Any, http: Any) -> None:
    daemon, _ = await start()
    client = http(daemon)
    path = "/v1/sessions/s/messages"
    bad(await call(client, "GET", path, params={"limit": "0"}, status=400), "bad_request",
        "query parameter limit: expected `int` >= 1, got '0'")
    bad(await call(client, "GET", path, params={"limit": "many"}, status=400), "bad_request",
        "query parameter limit: expected `int`, got `str`")
    bad(await call(client, "POST", path, {"content": "no role"}, status=400), "bad_request",
        "missing required field `role`")
    bad(await call(client, "POST", path, {"role": "user", "content": 5}, status=400), "bad_request",
        "content: expected `str`, got `int`")
    bad(await call(client, "POST", path, {"role": "user", "content": "x", "meta": [1]}, status=400),
        "bad_request", "meta: expected `object | null`, got `array`")
    bad(await call(client, "POST", "/v1/sessions/not%20ok/messages", {"role": "user", "content": "x"},
                   status=400), "bad_request", "session id 'not ok'")
    with pytest.raises(ValueError, match="session id"):
        daemon.memory.session("")
    bad(await call(client, "GET", "/v1/sessions", params={"prefix": "no spaces"}, status=400),
        "bad_request", "query parameter prefix")
    bad(await call(client, "GET", "/v1/sessions", params={"limit": "1001"}, status=400),
        "bad_request", "query parameter limit")
    assert await rows(daemon, "SELECT count(*) FROM messages") == [(0,)]


async def test_expired_sessions_and_memories_are_hidden_then_purged_by_the_builtin_schedule(
    start: Any, http: Any
) -> None:
    # session_ttl 0: a session expires as soon as its message is written.
    daemon, _ = await start(overrides={"memory": {"session_ttl": 0.0}})
    client = http(daemon)
    await call(client, "POST", "/v1/sessions/brief/messages", {"role": "user", "content": "gone soon"},
               status=201)
    assert (await call(client, "GET", "/v1/sessions/brief/messages"))["messages"] == []
    assert (await call(client, "GET", "/v1/sessions"))["sessions"] == []
    assert await daemon.memory.session("brief").history() == []
    assert await rows(daemon, "SELECT count(*) FROM messages WHERE session_id = 'brief'") == [(1,)]

    memory = daemon.memory
    kept, _ = await memory.remember("The backup job runs every night at two.", namespace="ops")
    by_ttl = await call(client, "POST", "/v1/memory", {
        "text": "The VPN certificate expires next week.", "namespace": "ops", "ttl": 0}, status=201)
    assert by_ttl["expires_at"] <= time.time()
    by_time, created = await memory.remember("Deploys are frozen until Monday.", namespace="ops",
                                             expires_at=time.time() - 60)
    assert created
    # Expired memories are never recalled (vector or keyword), though their rows remain...
    for query in ("VPN certificate expiry", "deploy freeze Monday"):
        for hybrid in (False, True):
            found = await memory.recall(query, namespace="ops", k=10, hybrid=hybrid)
            assert [r.memory.id for r in found] == [kept.id], (query, hybrid)
    assert (await call(client, "GET", f"/v1/memory/{by_time.id}"))["id"] == by_time.id
    assert {by_ttl["id"], by_time.id} <= set(await searchable(daemon))

    # ...until the built-in schedule purges them, with the expired session and its messages.
    assert await run_purge_schedule(daemon, client) == {"memories": 2, "sessions": 1}
    assert await rows(daemon, "SELECT id FROM memories") == [(kept.id,)]
    assert await searchable(daemon) == await keyworded(daemon) == [kept.id]
    assert await rows(daemon, "SELECT count(*) FROM sessions") == [(0,)]
    assert await rows(daemon, "SELECT count(*) FROM messages") == [(0,)]
    bad(await call(client, "GET", f"/v1/memory/{by_time.id}", status=404), "memory_not_found",
        f"no memory with id {by_time.id}")
    assert await memory.purge_expired() == {"memories": 0, "sessions": 0}
    assert (await memory.stats())["namespaces"] == {"ops": 1}


async def test_an_expired_session_does_not_come_back_when_a_message_is_added(start: Any) -> None:
    """Once a session's expiry has passed its history is gone; a new message must start a
    fresh conversation, not revive the expired messages (which would otherwise depend on
    whether the purge schedule happened to run in between)."""
    daemon, _ = await start()
    session = daemon.memory.session("stale")
    await session.append("user", "an old secret")
    # The session's expiry passes (as if session_ttl elapsed before the hourly purge).
    await execute(daemon, "UPDATE sessions SET expires_at = ? WHERE id = 'stale'", (time.time() - 1,))
    assert await session.history() == []
    await session.append("user", "a new conversation")
    assert [m["content"] for m in await session.history()] == ["a new conversation"]


# --------------------------------------------------------------------------- long-term memory


async def test_long_term_memory_over_http(start: Any, http: Any) -> None:
    daemon, _ = await start(overrides={"memory": {"dedupe_threshold": 0.9}})
    client = http(daemon)
    dark = "The user prefers dark mode in the editor."
    first = await call(client, "POST", "/v1/memory", {
        "text": dark, "namespace": "prefs", "metadata": {"kind": "preference", "source": "chat"}},
        status=201)
    assert first["created"] is True
    assert (first["namespace"], first["text"], first["metadata"]) == (
        "prefs", dark, {"kind": "preference", "source": "chat"})
    assert (first["supersedes"], first["superseded_by"], first["expires_at"]) == (None, None, None)

    # The row in memories, its vector in vec0 (partition: the namespace; filter columns) and
    # its keywords in FTS5.
    row = (await rows(daemon, "SELECT namespace, text, metadata, hash, created_at, updated_at, expires_at, "
                              "supersedes, superseded_by FROM memories WHERE id = ?", (first["id"],)))[0]
    assert row[:2] == ("prefs", dark) and row[3] == hashlib.sha256(dark.encode()).hexdigest()
    assert json.loads(row[2]) == {"kind": "preference", "source": "chat"}
    assert row[4] == row[5] == first["created_at"] and row[6:] == (None, None, None)
    if on_sqlite(daemon):
        assert await rows(daemon, "SELECT namespace, kind, source, agent FROM memory_vectors WHERE id = ?",
                          (first["id"],)) == [("prefs", "preference", "chat", "")]
        assert await rows(daemon, "SELECT text FROM memories_fts WHERE rowid = ?",
                          (first["id"],)) == [(dark,)]
    assert first["id"] in await searchable(daemon) and first["id"] in await keyworded(daemon)
    assert await call(client, "GET", f"/v1/memory/{first['id']}") == {
        k: v for k, v in first.items() if k != "created"}

    # An exact duplicate (whitespace aside) and a near duplicate return the existing memory.
    same = await call(client, "POST", "/v1/memory",
                      {"text": "  The user prefers   dark mode\nin the editor. ", "namespace": "prefs"})
    assert (same["id"], same["created"]) == (first["id"], False)
    paraphrase = "The user likes dark mode in the editor."
    blue = "The user's favourite colour is blue."
    a, b, c = await daemon.memory.embedder.embed([dark, paraphrase, blue])
    assert cosine(a, b) >= 0.9 > cosine(a, c)
    near = await call(client, "POST", "/v1/memory", {"text": paraphrase, "namespace": "prefs"})
    assert (near["id"], near["created"], near["text"]) == (first["id"], False, dark)
    colour = await call(client, "POST", "/v1/memory", {"text": blue, "namespace": "prefs"}, status=201)
    # Namespaces are separate: the same text elsewhere is a new memory.
    elsewhere = await call(client, "POST", "/v1/memory", {"text": dark, "namespace": "team"}, status=201)
    assert elsewhere["id"] != first["id"]

    # A correction supersedes what it replaces: recall returns the new one only.
    green = await call(client, "POST", "/v1/memory", {
        "text": "The user's favourite colour is green.", "namespace": "prefs", "supersedes": colour["id"]},
        status=201)
    assert green["supersedes"] == colour["id"]
    old = await call(client, "GET", f"/v1/memory/{colour['id']}")
    assert old["superseded_by"] == green["id"]
    found = await search(client, "Which colour does the user like best?", namespace="prefs", k=10)
    ids = [r["id"] for r in found]
    assert ids[0] == green["id"] and colour["id"] not in ids
    assert [r["score"] for r in found] == sorted((r["score"] for r in found), reverse=True)
    # A vector recall's score is the cosine similarity: it says how good the match is.
    assert all(r["score"] == round(1 - r["distance"], 6) for r in found)
    assert 0.5 < found[0]["score"] <= 1
    assert colour["id"] not in [r["id"] for r in await search(
        client, "favourite colour is blue", namespace="prefs", hybrid="true")]
    bad(await call(client, "POST", "/v1/memory", {"text": "A correction of nothing.", "namespace": "prefs",
                                                   "supersedes": 999999}, status=404),
        "memory_not_found", "supersedes: no memory 999999 in namespace 'prefs'")
    bad(await call(client, "POST", "/v1/memory", {"text": "A correction across namespaces.",
                                                   "namespace": "team", "supersedes": green["id"]},
                   status=404), "memory_not_found", f"no memory {green['id']} in namespace 'team'")

    # An update with a new text embeds it again: recall by the new meaning finds it.
    wifi = await call(client, "POST", "/v1/memory", {"text": "The guest wifi password is hunter2.",
                                                      "namespace": "prefs"}, status=201)
    changed = await call(client, "PATCH", f"/v1/memory/{wifi['id']}", {
        "text": "The office printer is on the third floor.", "metadata": {"kind": "fact"}})
    assert (changed["id"], changed["text"], changed["metadata"]) == (
        wifi["id"], "The office printer is on the third floor.", {"kind": "fact"})
    assert changed["updated_at"] > changed["created_at"]
    top = await search(client, "Where can I find the printer?", namespace="prefs", k=1)
    assert [r["id"] for r in top] == [wifi["id"]]
    assert [r["id"] for r in await search(client, "printer", namespace="prefs", where={"kind": "fact"})] == [
        wifi["id"]]
    # A metadata-only update moves the filter columns too.
    await call(client, "PATCH", f"/v1/memory/{wifi['id']}", {"metadata": {"kind": "location"}})
    assert [r["id"] for r in await search(client, "printer", namespace="prefs",
                                          where={"kind": "location"})] == [wifi["id"]]
    assert await search(client, "printer", namespace="prefs", where={"kind": "fact"}) == []
    bad(await call(client, "PATCH", f"/v1/memory/{wifi['id']}", {"text": "  "}, status=400),
        "bad_request", "text: expected text that is not empty or only spaces, got '  '")
    # The expiry: set, kept when the field is left out, removed with null.
    soon, path = time.time() + 3600, f"/v1/memory/{wifi['id']}"
    assert (await call(client, "PATCH", path, {"expires_at": soon}))["expires_at"] == soon
    kept = await call(client, "PATCH", path, {"metadata": {"kind": "location"}})
    assert kept["expires_at"] == soon
    assert (await call(client, "PATCH", path, {"expires_at": None}))["expires_at"] is None

    # Stats count live memories per namespace (not the superseded one).
    stats = await call(client, "GET", "/v1/memory/stats")
    assert stats["namespaces"] == {"prefs": 3, "team": 1}
    assert (stats["embedder"], stats["dimension"]) == ("minilm-l6-v2-int8", 384)

    # Forget by id: gone from every table; a second time, 404.
    await call(client, "DELETE", f"/v1/memory/{wifi['id']}", status=204)
    assert await rows(daemon, "SELECT count(*) FROM memories WHERE id = ?", (wifi["id"],)) == [(0,)]
    assert wifi["id"] not in await searchable(daemon) and wifi["id"] not in await keyworded(daemon)
    for method in ("GET", "DELETE"):
        bad(await call(client, method, f"/v1/memory/{wifi['id']}", status=404), "memory_not_found",
            f"no memory with id {wifi['id']}")
    bad(await call(client, "PATCH", f"/v1/memory/{wifi['id']}", {"text": "x"}, status=404),
        "memory_not_found")
    assert wifi["id"] not in [r["id"] for r in await search(client, "printer", namespace="prefs")]


async def test_a_memory_keeps_its_history_until_it_is_forgotten(start: Any, http: Any) -> None:
    """mem0's history(memory_id): each change keeps what the memory was before it, over
    HTTP and through ctx.memory (the daemon's MemoryStore), on both engines."""
    daemon, _ = await start()
    client = http(daemon)
    memory = await call(client, "POST", "/v1/memory", {
        "text": "The release is on Friday.", "namespace": "team", "metadata": {"kind": "plan"}},
        status=201)
    path = f"/v1/memory/{memory['id']}"
    await call(client, "PATCH", path, {"text": "The release moved to Monday."})
    await call(client, "PATCH", path, {"metadata": {"kind": "decision"}})
    await call(client, "PATCH", path, {"expires_at": time.time() + 3600})  # no change kept
    correction = await call(client, "POST", "/v1/memory", {
        "text": "The release is cancelled.", "namespace": "team", "supersedes": memory["id"]},
        status=201)
    answer = await call(client, "GET", f"{path}/history")
    assert answer["memory_id"] == memory["id"]
    changes = answer["history"]
    assert [(c["event"], c["text"], c["old_text"]) for c in changes] == [
        ("created", "The release is on Friday.", None),
        ("updated", "The release moved to Monday.", "The release is on Friday."),
        ("updated", "The release moved to Monday.", "The release moved to Monday."),
        ("superseded", "The release moved to Monday.", None)]
    assert [(c["metadata"], c["old_metadata"]) for c in changes[1:3]] == [
        ({"kind": "plan"}, {"kind": "plan"}), ({"kind": "decision"}, {"kind": "plan"})]
    assert changes[3]["superseded_by"] == correction["id"]
    assert [c["at"] for c in changes] == sorted(c["at"] for c in changes)
    # The same through the daemon's memory (ctx.memory's).
    assert [c.to_dict() for c in await daemon.memory.history(memory["id"])] == changes
    assert [c["event"] for c in (await call(client, "GET", f"/v1/memory/{correction['id']}/history"))[
        "history"]] == ["created"]
    # Forgotten, its history goes with it: a forget is for good.
    await call(client, "DELETE", path, status=204)
    bad(await call(client, "GET", f"{path}/history", status=404), "memory_not_found",
        f"no memory with id {memory['id']}")
    assert await rows(daemon, "SELECT count(*) FROM memory_history WHERE memory_id = ?",
                      (memory["id"],)) == [(0,)]


async def test_bad_memory_requests_are_400_naming_the_problem(start: Any, http: Any) -> None:
    daemon, _ = await start()
    client = http(daemon)
    posts = [
        ({"text": ""}, "bad_request", "text: expected text that is not empty or only spaces, got ''"),
        ({"text": " \n "}, "bad_request", "text: expected text that is not empty or only spaces"),
        ({"namespace": "x"}, "bad_request", "missing required field `text`"),
        ({"text": 42}, "bad_request", "text: expected `str`, got `int`"),
        ({"text": "x", "colour": "red"}, "bad_request", "unknown field `colour`"),
        ({"text": "x", "namespace": "no spaces"}, "bad_request", "namespace: expected 1-128 letters"),
        ({"text": "x", "namespace": ""}, "bad_request", "namespace: expected 1-128 letters"),
        ({"text": "x", "ttl": "soon"}, "bad_request", "ttl: expected `float | null`, got `str`"),
        ({"text": "x", "ttl": -1}, "bad_request", "ttl: expected `float` >= 0.0, got -1"),
        ({"text": "x", "expires_at": True}, "bad_request", "expires_at: expected `float | null`, got `bool`"),
        ({"text": "x", "supersedes": "7"}, "bad_request", "supersedes: expected `int | float | null`"),
        ([1, 2], "bad_request", "Expected `object`, got `array`"),
    ]
    for body, code, needle in posts:
        bad(await call(client, "POST", "/v1/memory", body, status=400), code, needle)
    async with client.post("/v1/memory", data="{nope", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        bad(await r.json(), "invalid_json", "not JSON")

    searches = [
        ({}, "missing required field `q`"),
        ({"q": "  "}, "query parameter q: expected text that is not empty or only spaces"),
        ({"q": "x", "k": "0"}, "query parameter k: expected `int` >= 1, got '0'"),
        ({"q": "x", "k": "1001"}, "query parameter k: expected `int` <= 1000, got '1001'"),
        ({"q": "x", "k": "ten"}, "query parameter k: expected `int`, got `str`"),
        ({"q": "x", "where": "{kind: fact}"}, "where must be a JSON object"),
        ({"q": "x", "where": "[1]"}, "where must be a JSON object"),
        ({"q": "x", "hybrid": "maybe"}, "query parameter hybrid: expected `bool`, got `str`"),
        ({"q": "x", "namespace": "a/b"}, "query parameter namespace: expected 1-128 letters"),
    ]
    for params, needle in searches:
        bad(await call(client, "GET", "/v1/memory/search", params=params, status=400), "bad_request", needle)

    bad(await call(client, "PATCH", "/v1/memory/1", {"colour": "red"}, status=400), "bad_request",
        "unknown field `colour`")
    bad(await call(client, "PATCH", "/v1/memory/1", {"text": 5}, status=400), "bad_request",
        "text: expected `str | null`, got `int`")
    bad(await call(client, "PATCH", "/v1/memory/1", {"expires_at": "later"}, status=400), "bad_request",
        "expires_at: expected `float | null`, got `str`")
    for method in ("GET", "PATCH", "DELETE"):
        body = {"text": "x"} if method == "PATCH" else None
        bad(await call(client, method, "/v1/memory/424242", body, status=404), "memory_not_found",
            "no memory with id 424242")
    bad(await call(client, "GET", f"/v1/memory/{2**64}", status=404), "memory_not_found")
    bad(await call(client, "GET", "/v1/memory/abc", status=404), "not_found", "no route")

    # The same rules in Python.
    memory = daemon.memory
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        await memory.remember("   ")
    with pytest.raises(ValueError, match="k must be between 1 and 1000"):
        await memory.recall("x", k=0)
    with pytest.raises(ValueError, match="where must be an object"):
        await memory.recall("x", where=["kind"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give a memory id, or a namespace"):
        await memory.forget()
    with pytest.raises(MemoryNotFoundError, match="no memory with id 5"):
        await memory.get(5)
    with pytest.raises(MemoryNotFoundError):
        await memory.forget(5)
    assert (await memory.stats())["namespaces"] == {}


async def test_metadata_that_is_not_an_object_is_a_400_naming_metadata(start: Any, http: Any) -> None:
    daemon, _ = await start()
    client = http(daemon)
    for metadata in ([1], "kind=fact", [["kind", "fact"]]):
        error = await call(client, "POST", "/v1/memory", {"text": "a fact", "metadata": metadata}, status=400)
        bad(error, "bad_request", "metadata: expected `object | null`")
    assert (await daemon.memory.stats())["namespaces"] == {}
    saved = await call(client, "POST", "/v1/memory", {"text": "a fact"}, status=201)
    bad(await call(client, "PATCH", f"/v1/memory/{saved['id']}", {"metadata": [1]}, status=400),
        "bad_request", "metadata: expected `object | null`, got `array`")


async def test_text_holding_a_nul_is_a_422_on_both_stores_and_a_nul_in_a_filter_matches_nothing(
        start: Any, http: Any) -> None:
    """PostgreSQL's text and jsonb hold no U+0000: a NUL in a memory's text or metadata, or
    in a message, was a 500 there (and taken on SQLite, so `agentd store copy` would fail
    on it). Both stores refuse it with a 422 naming where it is, keep nothing of the
    request, and a NUL in a search's `where` matches nothing, as no stored key has one."""
    daemon, _ = await start()
    client = http(daemon)
    kept = await call(client, "POST", "/v1/memory",
                      {"text": "the moon is far", "metadata": {"kind": "fact", "raw": "\\u0000"}}, status=201)
    refused = [
        ("POST", "/v1/memory", {"text": "a\u0000b"}, "text holds U+0000"),
        ("POST", "/v1/memory", {"text": "x", "metadata": {"k": ["ok", "a\u0000"]}},
         "metadata.k[1] holds U+0000"),
        ("POST", "/v1/memory", {"text": "x", "metadata": {"a\u0000": 1}},
         "metadata key 'a\\x00' holds U+0000"),
        ("POST", "/v1/memory/batch", {"memories": [{"text": "fine"}, {"text": "\u0000"}]},
         "memories[1]: text holds U+0000"),
        ("PATCH", f"/v1/memory/{kept['id']}", {"text": "moon\u0000"}, "text holds U+0000"),
        ("PATCH", f"/v1/memory/{kept['id']}", {"metadata": {"kind": "\u0000"}}, "metadata.kind holds U+0000"),
        ("POST", "/v1/sessions/s/messages", {"role": "user", "content": "hi\u0000"}, "content holds U+0000"),
        ("POST", "/v1/sessions/s/messages", {"role": "\u0000", "content": "hi"}, "role holds U+0000"),
    ]
    for method, path, body, needle in refused:
        bad(await call(client, method, path, body, status=422), "unstorable_text", needle)
    stats = await daemon.memory.stats()
    assert stats["namespaces"] == {"default": 1} and stats["sessions"] == 0
    again = await call(client, "GET", f"/v1/memory/{kept['id']}")
    assert (again["text"], again["metadata"]) == ("the moon is far", {"kind": "fact", "raw": "\\u0000"})

    async def found(where: dict[str, Any]) -> list[int]:
        answer = await call(client, "GET", "/v1/memory/search",
                            params={"q": "moon", "hybrid": "true", "where": json.dumps(where)})
        return [hit["id"] for hit in answer["results"]]

    assert await found({"kind": "fact\u0000"}) == []
    assert await found({"kind\u0000": "fact"}) == []
    assert await found({"kind\u0000": None}) == [kept["id"]]  # an absent key is None
    assert await found({"kind": ["\u0000", "fact"]}) == [kept["id"]]
    assert await found({"raw": "\\u0000"}) == [kept["id"]]  # six characters, no NUL
    assert await found({"raw": "\u0000"}) == []

    with pytest.raises(UnstorableTextError, match=r"text holds U\+0000"):
        await daemon.memory.remember("\u0000")
    with pytest.raises(UnstorableTextError, match=r"content holds U\+0000"):
        await daemon.memory.session("s").append("user", "\u0000")


async def test_metadata_comes_back_as_it_was_given_and_the_same_again_is_no_change(
        start: Any, http: Any) -> None:
    """On PostgreSQL metadata came back as jsonb spells it: keys reordered, 1e300 as a
    301-digit integer, -0.0 as 0.0; and an update with the same metadata was then recorded
    in the history as a change."""
    daemon, _ = await start()
    client = http(daemon)
    metadata = {"zeta": 1, "a": 1e300, "sign": -0.0, "big": 2**70, "nested": {"y": [1.5, None], "b": True}}
    saved = await call(client, "POST", "/v1/memory", {"text": "the sky is blue", "metadata": metadata},
                       status=201)
    for shown in (saved, await call(client, "GET", f"/v1/memory/{saved['id']}"),
                  (await call(client, "GET", "/v1/memory/search", params={"q": "sky"}))["results"][0],
                  (await call(client, "GET", "/v1/memory/search",
                              params={"q": "sky", "hybrid": "true"}))["results"][0]):
        assert json.dumps(shown["metadata"]) == json.dumps(metadata)
    await call(client, "PATCH", f"/v1/memory/{saved['id']}", {"metadata": metadata})
    history = (await call(client, "GET", f"/v1/memory/{saved['id']}/history"))["history"]
    assert [change["event"] for change in history] == ["created"]


async def test_a_plugin_cannot_store_an_expiry_that_is_no_time(start: Any) -> None:
    """From a plugin, expires_at=inf was stored and GET /v1/memory/{id} then answered
    `"expires_at": Infinity`, which is not JSON; NaN was stored as never expiring."""
    daemon, _ = await start()
    for expires_at in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="expires_at must be a Unix time"):
            await daemon.memory.remember("a fact", expires_at=expires_at)
    assert (await daemon.memory.stats())["namespaces"] == {}
    memory, _ = await daemon.memory.remember("a fact")
    with pytest.raises(ValueError, match="expires_at must be a Unix time"):
        await daemon.memory.update(memory.id, expires_at=math.inf)
    assert (await daemon.memory.get(memory.id)).expires_at is None


CITIES = ["Oslo", "Lisbon", "Nairobi", "Lima", "Hanoi", "Quebec", "Perth", "Tbilisi", "Dakar", "Bergen",
          "Cusco", "Kyoto", "Porto", "Accra"]
WEATHER = ["heavy rain is expected", "a heatwave is forecast", "snow will fall overnight",
           "strong winds are coming", "thick fog is likely"]
DAYS = ["Monday", "Thursday", "the weekend"]
RECIPES = ["Knead the bread dough for ten minutes before it rises.",
           "Simmer the tomato sauce with basil and garlic.",
           "Whisk the eggs and sugar until pale for the sponge cake.",
           "Marinate the chicken in yogurt and cumin overnight.",
           "Toast the sesame seeds in a dry pan."]


async def test_filters_apply_inside_the_knn_and_namespaces_isolate(start: Any) -> None:
    daemon, _ = await start()
    memory = daemon.memory
    common = []
    for i in range(35):
        city = CITIES[i % len(CITIES)]
        text = f"In {city}, {WEATHER[i % len(WEATHER)]} on {DAYS[i % len(DAYS)]}."
        saved, created = await memory.remember(text, namespace="kb",
                                               metadata={"kind": "common", "city": city})
        assert created, text
        common.append(saved)
    rare = []
    for text in RECIPES:
        saved, created = await memory.remember(text, namespace="kb", metadata={"kind": "rare"})
        assert created, text
        rare.append(saved)
    query = "Will it rain tomorrow in the city?"

    # Unfiltered, the nearest 13 are all weather: filtering those afterwards would find none.
    nearest = await memory.recall(query, namespace="kb", k=13)
    assert {r.memory.metadata["kind"] for r in nearest} == {"common"}
    # Inside the KNN, the filter still gives k rows: exactly the 5 rare ones.
    found = await memory.recall(query, namespace="kb", k=5, where={"kind": "rare"})
    assert sorted(r.memory.id for r in found) == [m.id for m in rare]
    assert all(r.distance is not None for r in found)
    assert [r.score for r in found] == sorted((r.score for r in found), reverse=True)
    either = await memory.recall(query, namespace="kb", k=40, where={"kind": ["rare", "common"]})
    assert len(either) == 40
    # A key that is not a filter field is applied after the search, on an over-fetched set
    # (on SQLite; on PostgreSQL every key filters inside the search).
    assert "city" not in daemon.config.memory.filter_fields
    oslo = await memory.recall("What is the weather like in Oslo?", namespace="kb", k=2,
                               where={"city": "Oslo"})
    assert len(oslo) == 2 and {r.memory.metadata["city"] for r in oslo} == {"Oslo"}
    lima = await memory.recall("Is it going to snow in Lima?", namespace="kb", k=3,
                               where={"kind": "common", "city": "Lima"})
    assert len(lima) == 3 and {r.memory.metadata["city"] for r in lima} == {"Lima"}
    assert await memory.recall(query, namespace="kb", where={"city": "Atlantis"}) == []

    # Namespaces: vec0 partitions; nothing crosses them, duplicates included.
    twin, created = await memory.remember(common[0].text, namespace="kb-copy")
    assert created and twin.id != common[0].id
    assert [r.memory.id for r in await memory.recall(common[0].text, namespace="kb-copy")] == [twin.id]
    assert twin.id not in [r.memory.id for r in await memory.recall(common[0].text, namespace="kb", k=50)]
    assert await memory.recall(query, namespace="empty") == []
    if on_sqlite(daemon):
        assert await rows(daemon, "SELECT namespace FROM memory_vectors WHERE id = ?", (twin.id,)) == [
            ("kb-copy",)]

    # Python get and update: new metadata moves the memory between filters.
    moved = await memory.update(common[1].id, metadata={"kind": "rare", "city": "Lisbon"})
    assert (await memory.get(common[1].id)).metadata == moved.metadata == {"kind": "rare", "city": "Lisbon"}
    found = await memory.recall(query, namespace="kb", k=10, where={"kind": "rare"})
    assert sorted(r.memory.id for r in found) == sorted([common[1].id, *(m.id for m in rare)])
    await memory.update(common[1].id, metadata={"kind": "common", "city": "Lisbon"})

    # Forget by namespace and filter, then by namespace alone.
    assert await memory.forget(namespace="kb", where={"kind": "rare"}) == 5
    assert await memory.recall(query, namespace="kb", k=5, where={"kind": "rare"}) == []
    assert await memory.forget(namespace="kb", where={"city": "Oslo"}) == 3
    assert (await memory.stats())["namespaces"] == {"kb": 32, "kb-copy": 1}
    assert await memory.forget(namespace="kb-copy") == 1
    assert await rows(daemon, "SELECT count(*) FROM memories WHERE namespace = 'kb-copy'") == [(0,)]
    assert len(await searchable(daemon)) == len(await keyworded(daemon)) == 32


SHIPPING = [
    "The delivery of order 1182 is delayed by the storm.",
    "Shipment status: the parcel left the Hamburg depot this morning.",
    "The courier delivers the package between nine and noon.",
    "Order 5530 has been delivered to the front desk.",
    "Customs cleared the container of spare parts on Tuesday.",
    "The supplier confirmed the delivery date for next week.",
    "ZX-4471 is the catalogue code of the blue ceramic teapot.",
    "The warehouse inventory count is scheduled for Friday.",
]


async def test_keyword_ranking_puts_memories_with_every_word_first(start: Any) -> None:
    """Hybrid recall's keyword half ranks the memories holding every word of the query
    before those holding some, each group by relevance: a short memory repeating one rare
    word outscores, by bm25 alone, a long one holding both words (and SQLite ranked it
    first). Both engines rank the same way, over a bounded set of matches."""
    daemon, _ = await start()
    memory = daemon.memory
    fillers = ["apple", "river", "violin", "glacier", "pepper", "saddle", "comet", "lantern",
               "orchid", "tunnel", "walrus", "pillow", "meadow", "anchor", "biscuit", "candle",
               "dolphin", "feather", "granite", "harbour"]
    long_both = ("The crane " + " ".join(f"{w}s" for w in fillers[:14]) + " and the invoice.")
    stored = await memory.remember_many([
        NewMemory(long_both, namespace="kw"), NewMemory("Crane, crane, crane.", namespace="kw"),
        *(NewMemory(f"An invoice about the {word}.", namespace="kw") for word in fillers)])
    both, crane_only = stored[0][0], stored[1][0]
    assert all(created for _, created in stored)
    if isinstance(memory, SqliteMemory):
        ranked = await memory._keyword("crane invoice", "kw", 5, [], {})
    else:
        ranked = await memory._keyword("crane invoice", "kw", 5, {})
    assert [m.id for m in ranked[:2]] == [both.id, crane_only.id]


async def test_hybrid_recall_fuses_keyword_matches(start: Any, http: Any) -> None:
    daemon, _ = await start()
    client = http(daemon)
    ids = []
    for text in SHIPPING:
        ids.append((await call(client, "POST", "/v1/memory", {"text": text, "namespace": "orders"},
                               status=201))["id"])
    teapot = ids[SHIPPING.index("ZX-4471 is the catalogue code of the blue ceramic teapot.")]
    query = "When will ZX-4471 arrive?"
    vector_only = [r["id"] for r in await search(client, query, namespace="orders", k=8)]
    hybrid = await search(client, query, namespace="orders", k=8, hybrid="true")
    hybrid_ids = [r["id"] for r in hybrid]
    # The product code matches one memory by keyword, not by meaning: hybrid ranks it first.
    assert vector_only[0] != teapot and hybrid_ids[0] == teapot
    assert hybrid_ids.index(teapot) < vector_only.index(teapot)
    # Reciprocal rank fusion: scores add 1/(60 + rank) per ranking.
    assert hybrid[0]["score"] > 1 / 61 and [r["score"] for r in hybrid] == sorted(
        (r["score"] for r in hybrid), reverse=True)
    assert sorted(hybrid_ids) == sorted(ids)
    for flag in ("1", "TRUE"):
        again = await search(client, query, namespace="orders", k=8, hybrid=flag)
        assert [r["id"] for r in again] == hybrid_ids


@pytest.mark.sqlite_only  # memory.db's own migrations
async def test_a_memory_file_from_before_namespaced_keywords_is_migrated(start: Any, http: Any) -> None:
    """memory.db schema 1 kept keywords without their namespace; opening it rebuilds the
    keyword index per namespace (sql/memory/0002), and hybrid recall finds them again; and
    it starts the history of the memories it holds (0003)."""
    daemon, _ = await start()
    client = http(daemon)
    code = await call(client, "POST", "/v1/memory", {"text": "Order QX-7781 left the warehouse.",
                                                     "namespace": "orders-b"}, status=201)
    await call(client, "POST", "/v1/memory", {"text": "QX-7781 is also a bus line.", "namespace": "orders.b"},
               status=201)
    path = daemon.memory.store.path
    await daemon.stop()
    # The daemon's own driver: it loads sqlite-vec, which the vec0 table needs.
    conn = sqlean.connect(str(path), isolation_level=None)
    conn.enable_load_extension(True)
    sqlite_vec.load(conn)
    conn.executescript("DROP TABLE memories_fts; CREATE VIRTUAL TABLE memories_fts USING fts5 (text);"
                       "INSERT INTO memories_fts (rowid, text) SELECT id, text FROM memories;"
                       "DROP TABLE memory_history; DELETE FROM schema_version WHERE version > 1;")
    conn.close()

    daemon, _ = await start(state_dir=path.parent.parent)
    client = http(daemon)
    assert daemon.memory.store.schema_version == 3
    found = await search(client, "QX-7781", namespace="orders-b", k=5, hybrid="true")
    assert [r["id"] for r in found] == [code["id"]]  # orders.b tokenises alike but stays apart
    # sql/memory/0003: the memories from before history start with theirs.
    (change,) = (await call(client, "GET", f"/v1/memory/{code['id']}/history"))["history"]
    assert (change["event"], change["text"]) == ("created", code["text"])


# --------------------------------------------------------------------------- quantization

NOTES = ["The staging server is called orion.", "Backups run nightly at two.",
         "The billing job failed because of an expired certificate.", "Ada prefers tea to coffee.",
         "The deploy pipeline timed out during the release.", "Our office is in Lisbon.",
         "The search index is rebuilt every Sunday.", "Bob is allergic to peanuts.",
         "The mail relay lost its lock after the upgrade.", "Invoices go out on the first of the month.",
         "The cache warmer ran out of memory.", "Customer imports are limited to 10,000 rows.",
         "The auth proxy was restarted at midnight.", "The weekly report goes to the board.",
         "Eve manages the payments team.", "The image resizer skipped a run on Friday.",
         "The metrics exporter reported stale data.", "Passwords rotate every ninety days.",
         "The build farm has eight machines.", "The payment service had a DNS outage."]
QUESTIONS = ["what broke in billing?", "who leads payments?", "where do we work?",
             "which machine is staging?", "what ran out of memory?", "when are backups?"]


async def recalls(memory: Any) -> list[list[tuple[int, float | None]]]:
    """(id, distance) of what memory recalls for QUESTIONS: in a namespace, with a filter
    field, with a metadata key that is not one (filtered after the search), hybrid."""
    found = []
    for q in QUESTIONS:
        for kwargs in ({}, {"where": {"kind": "ops"}}, {"where": {"team": "b"}}, {"hybrid": True}):
            result = await memory.recall(q, namespace="notes", k=5, **kwargs)
            found.append([(r.memory.id, None if r.distance is None else round(r.distance, 5))
                          for r in result])
    return found


@pytest.mark.sqlite_only  # [memory] quantization is memory.db's
async def test_binary_recall_returns_the_exact_nearest_and_an_old_float_file_is_rebuilt_alike(
    start: Any, tmp_path: Path
) -> None:
    """With quantization "binary" (the default) recall ranks its Hamming candidates by exact
    cosine: on real MiniLM vectors it returns the exact nearest (checked against a scan of
    every float vector), with namespaces, filters and hybrid alike. A memory.db of the float
    layout (as agentd wrote it before quantization: no `quantization` in `meta`) is rebuilt
    in the binary layout on open from its stored vectors, and recalls the same; and back."""
    state = tmp_path / "state"
    daemon, _ = await start(state_dir=state, overrides={"memory": {"quantization": "none"}})
    memory = daemon.memory
    for i, text in enumerate(NOTES):
        await memory.remember(text, namespace="notes" if i % 4 else "other",
                              metadata={"kind": "ops" if i % 2 else "people", "team": "ab"[i % 3 % 2]})
    # As agentd left a memory.db before quantization: the float layout, not recorded.
    await execute(daemon, "DELETE FROM meta WHERE key = 'quantization'")
    exact = await recalls(memory)
    await daemon.stop()

    daemon, _ = await start(state_dir=state)
    memory = daemon.memory
    assert ("quantization", "binary") in await rows(daemon, "SELECT key, value FROM meta")
    assert await searchable(daemon) == sorted(row[0] for row in await rows(
        daemon, "SELECT id FROM memory_embeddings"))
    assert len(await searchable(daemon)) == len(NOTES)
    assert await recalls(memory) == exact
    for q in QUESTIONS:  # the exact ranking, from every float vector of the namespace
        vector = (await memory.embedder.embed([q]))[0]
        scan = await rows(daemon, "SELECT e.id, round(vec_distance_cosine(e.embedding, ?), 5) AS d "
                                  "FROM memory_embeddings e JOIN memories m ON m.id = e.id "
                                  "WHERE m.namespace = 'notes' ORDER BY d, e.id LIMIT 5",
                          (struct.pack("384f", *vector),))
        found = await memory.recall(q, namespace="notes", k=5)
        assert [(r.memory.id, round(r.distance or 0.0, 5)) for r in found] == scan
    # A near duplicate is still found through the quantized search.
    twin, new = await memory.remember("BACKUPS run nightly at two.", namespace="notes")  # model: uncased
    assert (twin.text, new) == (NOTES[1], False)
    await daemon.stop()

    daemon, _ = await start(state_dir=state, overrides={"memory": {"quantization": "none"}})
    assert ("quantization", "none") in await rows(daemon, "SELECT key, value FROM meta")
    assert await rows(daemon, "SELECT name FROM sqlite_master WHERE name = 'memory_embeddings'") == []
    assert await recalls(daemon.memory) == exact


# --------------------------------------------------------------------------- embedders


async def test_minilm_ranks_a_paraphrase_first_and_embeds_off_the_event_loop(start: Any, http: Any) -> None:
    daemon, _ = await start()
    client = http(daemon)
    assert isinstance(daemon.memory.embedder, MiniLMEmbedder)
    texts = ["The cat sleeps on the sofa", "Quarterly revenue grew 12%", "The train to Berlin leaves at nine"]
    ids = [(await daemon.memory.remember(t, namespace="house"))[0].id for t in texts]
    found = await search(client, "a kitten napping on the couch", namespace="house", k=3)
    assert found[0]["id"] == ids[0]
    assert found[0]["distance"] < min(r["distance"] for r in found[1:])
    vector = (await daemon.memory.embedder.embed(["a kitten napping on the couch"]))[0]
    assert len(vector) == 384 and math.sqrt(sum(x * x for x in vector)) == pytest.approx(1.0, abs=1e-4)

    # A large batch runs in a thread: the loop keeps running callbacks and serving HTTP.
    batch = [f"Paragraph {i}: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
             for i in range(64)]
    loop = asyncio.get_running_loop()
    ran: list[float] = []
    loop.call_soon(lambda: ran.append(time.perf_counter()))
    embedding = asyncio.ensure_future(daemon.memory.embedder.embed(batch))
    async with client.get("/healthz") as response:
        assert response.status == 200
    served = time.perf_counter()
    assert not embedding.done(), "the batch finished before /healthz answered: make it larger"
    vectors = await embedding
    finished = time.perf_counter()
    assert len(vectors) == 64
    assert ran and ran[0] < served < finished
    assert daemon.lag.lag < 0.25


async def test_http_embedder_batches_retries_and_sends_the_key(
    start: Any, http: Any, embedding_server: EmbeddingServer, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path
) -> None:
    server = embedding_server
    monkeypatch.setenv("MEMTEST_EMBED_KEY", "sk-from-env")
    table = http_embedder_table(server, http_key_env="MEMTEST_EMBED_KEY")
    daemon, _ = await start(overrides={"memory": table})
    client = http(daemon)
    assert (daemon.memory.embedder.id, daemon.memory.embedder.dimension) == ("http:hash-64", 64)

    # A 500, then a 429 with Retry-After: 0: retried until it answers.
    server.fail_next(500)
    server.fail_next(429, {"Retry-After": "0"})
    text = "The nightly export writes to the archive bucket."
    saved = await call(client, "POST", "/v1/memory", {"text": text, "namespace": "ops"}, status=201)
    assert [r["input"] for r in server.requests] == [[text]] * 3
    assert {r["authorization"] for r in server.requests} == {"Bearer sk-from-env"}
    assert {r["model"] for r in server.requests} == {"hash-64"}
    found = await search(client, "nightly export archive", namespace="ops")
    assert found[0]["id"] == saved["id"]
    assert (await search(client, text, namespace="ops"))[0]["distance"] == pytest.approx(0.0, abs=1e-5)

    # Many texts go in batches of 64 per request, vectors back in the texts' order.
    server.requests.clear()
    texts = [f"log line {i} from host{i % 7}" for i in range(70)]
    vectors = await daemon.memory.embedder.embed(texts)
    assert [len(r["input"]) for r in server.requests] == [64, 6]
    assert [r["input"] for r in server.requests] == [texts[:64], texts[64:]]
    for got, source in zip(vectors, texts, strict=True):
        assert got == pytest.approx(unit(word_vector(source, 64)), abs=1e-6)
    # One client session, its connection kept alive from one call to the next.
    await daemon.memory.embedder.embed(["one more call"])
    assert len({r["client_port"] for r in server.requests}) == 1

    # A request the server refuses (400) is not retried: the API answers 503.
    server.requests.clear()
    server.fail_next(400)
    refused = await call(client, "POST", "/v1/memory", {"text": "never stored", "namespace": "ops"},
                         status=503)
    bad(refused, "embedder_unavailable", "HTTP 400")
    assert len(server.requests) == 1
    stats = await call(client, "GET", "/v1/memory/stats")
    assert (stats["embedder"], stats["dimension"], stats["namespaces"]) == ("http:hash-64", 64, {"ops": 1})
    assert await rows(daemon, "SELECT key, value FROM meta ORDER BY key") == recorded(
        daemon, "64", "http:hash-64")

    # The key can come from a file (first line); a wrong dimension is an EmbedderError.
    key_file = tmp_path / "embed.key"
    key_file.write_text("sk-from-file\nignored\n")
    key_file.chmod(0o600)
    config = make_config(tmp_path / "other", overrides={
        "memory": http_embedder_table(server, http_key_file=str(key_file))})
    server.requests.clear()
    from_file = build_embedder(config, {})
    await from_file.embed(["one", "two"])
    await from_file.close()  # type: ignore[attr-defined]
    assert [(r["authorization"], r["input"]) for r in server.requests] == [
        ("Bearer sk-from-file", ["one", "two"])]
    wrong = make_config(tmp_path / "other", overrides={"memory": {**http_embedder_table(server),
                                                                   "http_dimension": 32}})
    wrong_dimension = build_embedder(wrong, {})
    with pytest.raises(EmbedderError, match="expected 1 vectors of 32 dimensions, got 1 of 64"):
        await wrong_dimension.embed(["one"])
    await wrong_dimension.close()  # type: ignore[attr-defined]


async def test_plugin_embedder_mismatch_refuses_to_start_until_reembed(
    start: Any, http: Any, plugin_dir: Any, embedding_server: EmbeddingServer, run_cli: Any,
    config_file: Any, process_env: Any, store_url: str | None
) -> None:
    toy_dir = plugin_dir({"toy.py": TOY_PLUGIN}, name="toy_plugins")
    daemon, _ = await start(plugin_dirs=[toy_dir], overrides={"memory": {"embedder": "toy"}})
    toy = sys.modules["agentd_plugins.toy"]
    client = http(daemon)
    assert (daemon.memory.embedder.id, daemon.memory.embedder.dimension) == ("toy-8", 8)
    texts = ["alpha beta gamma", "delta epsilon zeta", "theta iota kappa"]
    ids = [(await call(client, "POST", "/v1/memory", {"text": t, "namespace": "greek"}, status=201))["id"]
           for t in texts]
    assert (await search(client, "delta epsilon zeta", namespace="greek", k=1))[0]["id"] == ids[1]
    assert ["delta epsilon zeta"] in toy.CALLS
    assert await rows(daemon, "SELECT key, value FROM meta ORDER BY key") == recorded(
        daemon, "8", "toy-8")
    await daemon.stop()

    # Another embedder on the same memory.db: the daemon refuses to start, naming both.
    with pytest.raises(EmbedderMismatchError) as refused:
        await start()
    message = str(refused.value)
    for needle in ("'toy-8'", "'minilm-l6-v2-int8'", "'8'", "'384'", "agentd memory reembed"):
        assert needle in message

    # `agentd memory reembed` (daemon stopped) rebuilds the vectors with the configured one.
    path = config_file(f"""
        [memory]
        embedder = "http"
        http_url = "{embedding_server.url}"
        http_model = "hash-64"
        http_dimension = 64
        """)
    on_the_store = {"AGENTD_STORE_URL": store_url} if store_url else {}
    code, out, err = await run_cli("memory", "reembed", "--config", str(path),
                                   env=process_env(**on_the_store))
    assert code == 0, err
    assert "re-embedded 3 memories with http:hash-64 (64 dimensions)" in out
    assert [r["input"] for r in embedding_server.requests] == [texts]  # one batch

    daemon, _ = await start(overrides={"memory": http_embedder_table(embedding_server)})
    client = http(daemon)
    found = await search(client, "theta iota kappa", namespace="greek", k=3)
    assert found[0]["id"] == ids[2] and found[0]["distance"] == pytest.approx(0.0, abs=1e-5)
    assert await rows(daemon, "SELECT key, value FROM meta ORDER BY key") == recorded(
        daemon, "64", "http:hash-64")
    assert await searchable(daemon) == sorted(ids)


# --------------------------------------------------------------------------- tasks that remember


async def test_tasks_remember_their_results(start: Any, http: Any, mem_dir: Path) -> None:
    daemon, _ = await start(plugin_dirs=[mem_dir])
    client = http(daemon)
    queue = daemon.queue
    summary = await queue.enqueue("mem.summarize", {"topic": "Atlas"})
    assert await queue.result(summary.id, timeout=10) == (
        "Summary: the Atlas project ships its first release in March.")
    note = await queue.enqueue("mem.note", {"city": "Valparaiso"})
    await queue.result(note.id, timeout=10)
    nothing = await queue.enqueue("mem.nothing")
    assert await queue.result(nothing.id, timeout=10) is None

    # remember=True: the plugin's namespace; metadata names the task.
    found = await search(client, "When does Atlas ship?", namespace="mem", k=5)
    assert len(found) == 1
    assert found[0]["text"] == "Summary: the Atlas project ships its first release in March."
    assert found[0]["metadata"] == {"task": "mem.summarize", "task_id": summary.id}
    # remember="notes": that namespace; a JSON result is stored as its JSON text.
    noted = await search(client, "harbour in Valparaiso", namespace="notes", k=5)
    assert len(noted) == 1 and noted[0]["metadata"] == {"task": "mem.note", "task_id": note.id}
    assert json.loads(noted[0]["text"]) == {"city": "Valparaiso",
                                            "fact": "Valparaiso has the largest harbour in the region"}
    assert (await call(client, "GET", "/v1/memory/stats"))["namespaces"] == {"mem": 1, "notes": 1}

    # ctx.memory.remember / recall inside a task.
    learn = await queue.enqueue("mem.learn", {"text": "Always pin dependency versions in production."})
    learned = await queue.result(learn.id, timeout=10)
    assert learned["created"] is True and learned["recalled"] == learned["id"]
    again = await queue.enqueue("mem.learn", {"text": "Always pin dependency versions in production."})
    assert (await queue.result(again.id, timeout=10))["created"] is False
    stored = await daemon.memory.get(learned["id"])
    assert (stored.namespace, stored.metadata) == (
        "learned", {"task": "mem.learn", "task_id": learn.id, "kind": "lesson"})


async def test_a_remember_task_whose_result_is_an_empty_string_still_succeeds(
    start: Any, mem_dir: Path
) -> None:
    """Nothing to remember is not a reason to fail the task (and re-run it until it is dead)."""
    daemon, _ = await start(plugin_dirs=[mem_dir],
                            overrides={"tasks": {"retry_base": 0.01, "retry_max": 0.02}})
    record = await daemon.queue.enqueue("mem.blank")
    final = await daemon.queue.wait(record.id, timeout=10)
    assert (final.status, final.attempts, final.error) == ("succeeded", 1, None)


async def test_forgetting_or_purging_a_correction_keeps_the_chain_whole(start: Any, http: Any) -> None:
    """A correction chain stays whole when one of its links goes: forgetting the newest makes
    the one it replaced the newest again (recalled, deduplicated, counted); forgetting one in
    the middle links its neighbours; an expired correction purged by the schedule revives
    what it replaced."""
    daemon, _ = await start()
    client = http(daemon)
    original = await call(client, "POST", "/v1/memory", {"text": "The standup is at 9:30.",
                                                          "namespace": "team"}, status=201)
    correction = await call(client, "POST", "/v1/memory", {
        "text": "The standup moved to 10:00.", "namespace": "team", "supersedes": original["id"]}, status=201)
    await call(client, "DELETE", f"/v1/memory/{correction['id']}", status=204)
    again = await call(client, "POST", "/v1/memory", {"text": "The standup is at 9:30.", "namespace": "team"})
    assert (again["id"], again["created"], again["superseded_by"]) == (original["id"], False, None)
    found = [r["id"] for r in await search(client, "When is the standup?", namespace="team")]
    assert found == [original["id"]]
    assert (await call(client, "GET", "/v1/memory/stats"))["namespaces"] == {"team": 1}

    memory = daemon.memory
    first, _ = await memory.remember("The office wifi is called Atlas.", namespace="office")
    second, _ = await memory.remember("The office wifi is now called Boreas.", namespace="office",
                                      supersedes=first.id)
    third, _ = await memory.remember("The office wifi was renamed Cygnus.", namespace="office",
                                     supersedes=second.id)
    assert await memory.forget(second.id) == 1
    assert ((await memory.get(first.id)).superseded_by, (await memory.get(third.id)).supersedes) == (
        third.id, first.id)
    assert [r.memory.id for r in await memory.recall("wifi name", namespace="office")] == [third.id]

    expiring, _ = await memory.remember("The wifi is Draco for today only.", namespace="office",
                                        supersedes=third.id, expires_at=time.time() - 1)
    assert await run_purge_schedule(daemon, client) == {"memories": 1, "sessions": 0}
    assert (await memory.get(third.id)).superseded_by is None
    assert [r.memory.id for r in await memory.recall("wifi name", namespace="office")] == [third.id]
    assert third.id in await searchable(daemon)
    with pytest.raises(MemoryNotFoundError):
        await memory.get(expiring.id)


GATED_PLUGIN = TOY_PLUGIN.replace('plugin = Plugin("toy")', '''plugin = Plugin("toy")
    import asyncio
    GATE = asyncio.Event()   # once ARMED, embedding a text that starts with "HOLD" waits for it
    HELD = asyncio.Event()   # set once such an embedding is waiting
    ARMED = []''').replace(
    "            CALLS.append(list(texts))", '''            CALLS.append(list(texts))
            if ARMED and any(t.startswith("HOLD") for t in texts):
                HELD.set()
                await GATE.wait()''')


# SQLite only: the race needs forget to embed the original again, which PostgreSQL never
# does (the original keeps its vector); its delete re-plans the same way (ChainChangedError).
@pytest.mark.sqlite_only
async def test_a_correction_landing_while_its_original_is_forgotten_keeps_one_chain(
    start: Any, plugin_dir: Any
) -> None:
    """forget(B) plans to revive A (B's original) and embeds A again; a correction of B that
    commits meanwhile must not leave two newest memories: the delete re-plans and links A
    to the new correction instead."""
    toy_dir = plugin_dir({"toy.py": GATED_PLUGIN}, name="gated_plugins")
    daemon, _ = await start(plugin_dirs=[toy_dir], overrides={"memory": {"embedder": "toy"}})
    toy = sys.modules["agentd_plugins.toy"]
    memory = daemon.memory
    original, _ = await memory.remember("HOLD the office opens at eight", namespace="office")
    correction, _ = await memory.remember("the office opens at nine", namespace="office",
                                          supersedes=original.id)
    toy.ARMED.append(True)
    forgetting = asyncio.ensure_future(memory.forget(correction.id))
    await asyncio.wait_for(toy.HELD.wait(), 5)  # forget is re-embedding the original
    newest, _ = await memory.remember("the office opens at ten now", namespace="office",
                                      supersedes=correction.id)
    toy.GATE.set()
    assert await asyncio.wait_for(forgetting, 5) == 1
    assert ((await memory.get(original.id)).superseded_by, (await memory.get(newest.id)).supersedes) == (
        newest.id, original.id)
    found = await memory.recall("when does the office open", namespace="office", k=5)
    assert [r.memory.id for r in found] == [newest.id]
    assert (await memory.stats())["namespaces"] == {"office": 1}


# --------------------------------------------------------------------------- the CLI


async def test_cli_memory_commands_against_a_running_daemon(
    start: Any, run_cli: Any, config_file: Any, process_env: Any, store_url: str | None
) -> None:
    daemon, _ = await start()
    path = config_file()
    on_the_store = {"AGENTD_STORE_URL": store_url} if store_url else {}
    env = process_env(AGENTD_SERVER_PORT=str(daemon.port), **on_the_store)

    async def cli(action: str, *args: str) -> tuple[int, str, str]:
        # Four at once, one loading the embedding model to re-embed: on two busy cores that
        # has taken longer than a short command's usual bound.
        return await run_cli("memory", action, "--config", str(path), *args, env=env, timeout=60.0)

    (code, out, err), (reembed_code, _, reembed_err), (bad_code, _, bad_err), (gone_code, _, gone_err) = (
        await asyncio.gather(
            cli("add", "The staging server is called orion.", "--namespace", "ops",
                "--metadata", '{"kind": "fact"}'),
            cli("reembed"), cli("add", "x", "--metadata", "{oops"), cli("forget", "424242")))
    assert code == 0, err
    added = json.loads(out)
    assert (added["created"], added["namespace"], added["metadata"]) == (True, "ops", {"kind": "fact"})
    if on_sqlite(daemon):  # reembed needs the daemon stopped: memory.db is locked by it
        assert reembed_code == 1 and "in use by another agentd process" in reembed_err
        assert reembed_err.rstrip().endswith("stop it or set a different [memory] path")
    else:  # on PostgreSQL it rebuilds in one transaction beside the daemons
        assert reembed_code == 0, reembed_err
    assert bad_code == 2 and "--metadata is not valid JSON" in bad_err
    assert gone_code == 2 and "no memory with id 424242" in gone_err

    (code, out, err), (stats_code, stats_out, _) = await asyncio.gather(
        cli("search", "What is the name of the staging machine?", "--namespace", "ops", "-k", "3",
            "--where", '{"kind": "fact"}', "--hybrid"),
        cli("stats"))
    assert code == 0, err
    assert out.split()[0] == str(added["id"]) and out.endswith("The staging server is called orion.")
    assert stats_code == 0
    stats = json.loads(stats_out)
    assert (stats["namespaces"], stats["embedder"]) == ({"ops": 1}, "minilm-l6-v2-int8")

    code, out, err = await cli("forget", str(added["id"]))
    assert (code, out) == (0, ""), err
    assert (await daemon.memory.stats())["namespaces"] == {}


# --------------------------------------------------------------------------- many at once


async def test_a_batch_is_remembered_in_order_its_repeats_sharing_one_memory(
    start: Any, http: Any, plugin_dir: Any
) -> None:
    toy_dir = plugin_dir({"toy.py": TOY_PLUGIN}, name="toy_plugins")
    daemon, _ = await start(plugin_dirs=[toy_dir], overrides={"memory": {"embedder": "toy"}})
    toy = sys.modules["agentd_plugins.toy"]
    client = http(daemon)
    stored = await call(client, "POST", "/v1/memory", {"text": "the archive is in bucket nine",
                                                      "namespace": "a"}, status=201)
    items = [
        {"text": "alpha beta gamma", "namespace": "a"},
        {"text": "delta epsilon", "namespace": "a", "metadata": {"kind": "fact"}},
        {"text": "alpha beta gamma", "namespace": "a"},               # the same text as [0]
        {"text": "the archive is in bucket nine", "namespace": "a"},  # stored before
        {"text": "Gamma, alpha; BETA!", "namespace": "a"},            # the same words as [0]
        {"text": "alpha beta gamma", "namespace": "b"},               # another namespace
        {"text": "zeta eta theta", "namespace": "a", "ttl": 3600},
    ]
    toy.CALLS.clear()
    answer = await call(client, "POST", "/v1/memory/batch", {"memories": items})
    ids = [result["id"] for result in answer["results"]]
    created = [result["created"] for result in answer["results"]]
    assert created == [True, True, False, False, False, True, True]
    assert (answer["created"], answer["duplicates"]) == (4, 3)
    assert ids[2] == ids[0] and ids[3] == stored["id"] and ids[4] == ids[0]
    assert len({ids[0], ids[1], ids[5], ids[6]}) == 4
    # One model call for the texts not already known by their digest: near repeats included.
    assert toy.CALLS == [["alpha beta gamma", "delta epsilon", "Gamma, alpha; BETA!", "alpha beta gamma",
                          "zeta eta theta"]]
    kept = await call(client, "GET", f"/v1/memory/{ids[1]}")
    assert (kept["text"], kept["metadata"]) == ("delta epsilon", {"kind": "fact"})
    assert (await call(client, "GET", f"/v1/memory/{ids[6]}"))["expires_at"] > time.time()
    history = await call(client, "GET", f"/v1/memory/{ids[0]}/history")
    assert [change["event"] for change in history["history"]] == ["created"]
    assert (await daemon.memory.stats())["namespaces"] == {"a": 4, "b": 1}
    found = await search(client, "alpha beta gamma", namespace="a", k=1)
    assert found[0]["id"] == ids[0]

    # The same batch again: every item a duplicate, nothing embedded but the near repeat's text.
    toy.CALLS.clear()
    again = await call(client, "POST", "/v1/memory/batch", {"memories": items})
    assert [result["id"] for result in again["results"]] == ids
    assert (again["created"], again["duplicates"]) == (0, 7)
    assert toy.CALLS == [["Gamma, alpha; BETA!"]]


async def test_a_batch_with_one_bad_item_stores_nothing_and_names_it(start: Any, http: Any) -> None:
    daemon, _ = await start()
    client = http(daemon)
    items = [{"text": "a fine memory"}, {"text": "another one", "namespace": "no spaces allowed"}]
    refused = await call(client, "POST", "/v1/memory/batch", {"memories": items}, status=400)
    bad(refused, "bad_request", "memories[1].namespace: expected 1-128 letters")
    blank = await call(client, "POST", "/v1/memory/batch",
                       {"memories": [{"text": "fine"}, {"text": "   "}]}, status=400)
    bad(blank, "bad_request", "memories[1]")
    for memories in ([], [{"text": f"m{i}"} for i in range(1001)]):
        too_many = await call(client, "POST", "/v1/memory/batch", {"memories": memories}, status=400)
        bad(too_many, "bad_request", "memories")
    unknown = await call(client, "POST", "/v1/memory/batch",
                         {"memories": [{"text": "x", "supersedes": 1}]}, status=400)
    bad(unknown, "bad_request", "supersedes")
    assert (await daemon.memory.stats())["namespaces"] == {}


BATCHED_PLUGIN = GATED_PLUGIN.replace("        dimension = 8\n",
                                      "        dimension = 8\n        parallel_calls = 1\n")


async def until_true(condition: Any, timeout: float = 10.0) -> None:
    """Wait for `condition()`: texts queued for the embedder publish nothing to wait on."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - nothing to wait on but the condition
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), timeout)


async def grouped_behind_a_held_call(start: Any, plugin_dir: Any, plugin: str, name: str,
                                     texts: list[str]) -> tuple[Any, Any, Any, list[Any]]:
    """A daemon on the toy embedder `plugin`, a remember() whose embedding the toy holds,
    and `texts` remembered at once behind it (one group, waiting for the model): the
    daemon's memory, the toy module, the held call and the callers. Set `toy.GATE` to go."""
    toy_dir = plugin_dir({"toy.py": plugin}, name=name)
    daemon, _ = await start(plugin_dirs=[toy_dir], overrides={"memory": {"embedder": "toy"}})
    toy = sys.modules["agentd_plugins.toy"]
    memory = daemon.memory
    toy.ARMED.append(True)
    held = asyncio.ensure_future(memory.remember("HOLD the model is busy", namespace="zoo"))
    await asyncio.wait_for(toy.HELD.wait(), 5)
    remembering = [asyncio.ensure_future(memory.remember(text, namespace="zoo")) for text in texts]
    await until_true(lambda: memory.grouped.unanswered == len(texts) + 1)
    return memory, toy, held, remembering


async def test_concurrent_remembers_share_a_model_call_and_a_recall_does_not_wait_for_it(
    start: Any, plugin_dir: Any
) -> None:
    toy_dir = plugin_dir({"toy.py": BATCHED_PLUGIN}, name="batched_plugins")
    daemon, _ = await start(plugin_dirs=[toy_dir], overrides={"memory": {"embedder": "toy"}})
    toy = sys.modules["agentd_plugins.toy"]
    memory = daemon.memory
    await memory.remember("the office opens at eight", namespace="office")
    toy.ARMED.append(True)
    held = asyncio.ensure_future(memory.remember("HOLD the model is busy", namespace="office"))
    await asyncio.wait_for(toy.HELD.wait(), 5)
    # No two of these are near duplicates under the toy vectors (a group dedupes them).
    texts = [f"note {i} about {word}" for i, word in enumerate(
        ["ants", "bees", "cats", "dogs", "frogs", "geese", "jays", "kites", "lions", "mice"])]
    remembering = [asyncio.ensure_future(memory.remember(text, namespace="office")) for text in texts]
    # Taken as one group, which waits for the held call's group to leave the model.
    await until_true(lambda: memory.grouped.unanswered == len(texts) + 1)
    # Recall's query has a lane of its own: answered while the model still holds a call.
    found = await asyncio.wait_for(memory.recall("when does the office open", namespace="office"), 10)
    assert found[0].memory.text == "the office opens at eight"
    assert not held.done() and memory.grouped.unanswered == len(texts) + 1
    toy.GATE.set()
    await held
    results = await asyncio.gather(*remembering)
    assert all(created for _, created in results) and len({m.id for m, _ in results}) == len(texts)
    # The held call, the query's, then one call for the ten (in the order their duplicate
    # checks ended).
    held_call, query_call, next_call = toy.CALLS[-3:]
    assert (held_call, query_call) == (["HOLD the model is busy"], ["when does the office open"])
    assert sorted(next_call) == texts


async def test_concurrent_near_duplicates_are_stored_once(start: Any, plugin_dir: Any) -> None:
    """Callers remembering at once are stored as one group: a near duplicate of another
    caller's text gets that memory, as it would had it come a moment later (each caller's
    nearest-neighbour search ran before the other's write, and both were stored)."""
    # The same vector under the toy embedder: near duplicates, not exact ones.
    twins = ["note 3 about dogs", "note 4 about eels"]
    memory, toy, held, remembering = await grouped_behind_a_held_call(
        start, plugin_dir, BATCHED_PLUGIN, "batched_plugins", twins)
    toy.GATE.set()
    await held
    (first, first_new), (second, second_new) = await asyncio.gather(*remembering)
    assert (first_new, second_new, second.id) == (True, False, first.id)
    assert first.text == "note 3 about dogs"
    assert (await memory.stats())["namespaces"] == {"zoo": 2}


REFUSING_PLUGIN = BATCHED_PLUGIN.replace(
    "            CALLS.append(list(texts))", """            CALLS.append(list(texts))
            if any("REFUSE" in t for t in texts):
                from agentd.errors import EmbedderInputError
                raise EmbedderInputError("the toy refuses REFUSE")""")


async def test_a_text_the_embedder_refuses_fails_only_its_caller_in_a_group(
    start: Any, plugin_dir: Any
) -> None:
    texts = ["note 0 about ants", "REFUSE this one", "note 1 about bees"]
    memory, toy, held, remembering = await grouped_behind_a_held_call(
        start, plugin_dir, REFUSING_PLUGIN, "refusing_plugins", texts)
    toy.GATE.set()
    await held
    ants, refused, bees = await asyncio.gather(*remembering, return_exceptions=True)
    assert isinstance(refused, EmbedderInputError), refused
    assert isinstance(ants, tuple) and isinstance(bees, tuple)
    assert (ants[0].text, ants[1], bees[0].text, bees[1]) == ("note 0 about ants", True,
                                                              "note 1 about bees", True)
    assert sorted(toy.CALLS[-4:-3][0]) == sorted(texts)  # one call for the three, then each alone
    assert (await memory.stats())["namespaces"] == {"zoo": 3}


async def test_cli_imports_json_lines_in_batches_and_again_as_duplicates(
    start: Any, run_cli: Any, config_file: Any, process_env: Any, store_url: str | None, tmp_path: Path
) -> None:
    daemon, _ = await start()
    path = config_file()
    on_the_store = {"AGENTD_STORE_URL": store_url} if store_url else {}
    env = process_env(AGENTD_SERVER_PORT=str(daemon.port), **on_the_store)

    async def cli(*args: str) -> tuple[int, str, str]:
        return await run_cli("memory", "import", "--config", str(path), *args, env=env, timeout=60.0)

    knowledge = tmp_path / "knowledge.jsonl"
    knowledge.write_text("\n".join([
        json.dumps("The staging server is called orion."),
        json.dumps({"text": "Backups run nightly at two.", "metadata": {"kind": "fact"}}),
        "",
        json.dumps({"text": "The on-call rota changes on Mondays.", "namespace": "people"}),
        json.dumps("The staging server is called orion."),
        json.dumps({"text": "Deploys freeze on Fridays.", "ttl": 86400}),
    ]) + "\n")
    code, out, err = await cli(str(knowledge), "--namespace", "ops", "--batch", "2")
    assert code == 0, err
    assert out.strip() == f"imported {knowledge}: 5 lines, 4 new memories, 1 duplicates"
    # Not a terminal: a plain progress line at each tenth reached, the last at 100 %.
    assert err.strip().splitlines()[-1].startswith("[" + "#" * 30 + "]  5/5 lines  100%")
    assert (await daemon.memory.stats())["namespaces"] == {"ops": 3, "people": 1}
    found = await daemon.memory.recall("when are backups made", namespace="ops", k=1)
    assert (found[0].memory.text, found[0].memory.metadata) == (
        "Backups run nightly at two.", {"kind": "fact"})

    code, out, err = await cli(str(knowledge), "--namespace", "ops", "--quiet")
    assert (code, err) == (0, "")
    assert out.strip() == f"imported {knowledge}: 5 lines, 0 new memories, 5 duplicates"

    # A malformed line stops the import before anything is sent.
    broken = tmp_path / "broken.jsonl"
    broken.write_text('"first, fine"\n{"text": "second, fine"}\n{"text": oops}\n')
    code, out, err = await cli(str(broken))
    assert (code, out) == (2, "")
    assert f"{broken}:3: not JSON" in err and "nothing was imported" in err
    refused = tmp_path / "refused.jsonl"
    refused.write_text('"stored before the bad line"\n{"text": "bad", "namespace": "has space"}\n')
    code, out, err = await cli(str(refused), "--batch", "1", "--quiet")
    assert (code, out) == (2, "")
    assert f"{refused}:2: " in err and "1 lines before it were stored" in err
    missing = await cli(str(tmp_path / "nowhere.jsonl"))
    assert missing[0] == 2 and "nowhere.jsonl: cannot be read: No such file or directory" in missing[2]
    namespaces = (await daemon.memory.stats())["namespaces"]
    assert namespaces == {"ops": 3, "people": 1, "default": 1}


def test_the_import_progress_bar_redraws_on_a_terminal_and_tells_tenths_elsewhere() -> None:
    ticks = iter([0.0, 4.0, 8.0, 10.0])
    screen = io.StringIO()
    bar = Progress(10_000, screen, tty=True, clock=lambda: next(ticks))
    bar.update(1_000)
    bar.update(2_000)
    bar.update(10_000)
    bar.finish()
    assert screen.getvalue() == (
        "\r[###...........................]  1,000/10,000 lines  10%  250/s  eta 36s"
        "\r[######........................]  2,000/10,000 lines  20%  250/s  eta 32s"
        "\r[##############################]  10,000/10,000 lines  100%  1,000/s  done\n")
    log = io.StringIO()
    ticks = iter([0.0] + [1.0] * 10)
    plain = Progress(100, log, tty=False, clock=lambda: next(ticks))
    for done in (5, 9, 10, 11, 35, 100):
        plain.update(done)
    plain.finish()
    assert [line.split("  ")[1] for line in log.getvalue().splitlines()] == [
        "10/100 lines", "35/100 lines", "100/100 lines"]
