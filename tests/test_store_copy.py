"""`agentd store copy --to postgresql://...`: a stopped SQLite deployment moved into
PostgreSQL with every row and id, its memory.db too (sessions, memories with their vectors,
history), and the copy refused where it would do harm (a daemon running on the file, a
target that holds agentd data, a URL that is not PostgreSQL's), a failure midway leaving
the target as it was."""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from agentd.cli import main
from agentd.config import MemoryConfig, StoreConfig, redact_url
from agentd.memory import MemoryStore, SqliteMemory
from agentd.postgres.memory import PgMemory
from agentd.store.copy import MEMORY_TABLES, TABLES
from agentd.store.sqlite import SqliteStore
from agentd.testing import daemon_url, running_daemon
from fake_openai import word_vector
from pg import fresh_database

PLUGIN = '''
from agentd import Fail, Plugin

plugin = Plugin("cp")


@plugin.task()
async def stepped(ctx, value):
    first = await ctx.step("first", lambda: value * 2)
    second = await ctx.step("second", lambda: {"doubled": first})
    return second


@plugin.task()
async def refused(ctx):
    raise Fail("not today")


@plugin.task(max_attempts=1)
async def broken(ctx):
    raise RuntimeError("it broke")
'''

# The rows a refused copy must not have touched: every table of agentd.db but meta.
DATA_TABLES = [table for table in TABLES if table != "meta"]


async def _deployment(tmp_path: Path, plugin_dir: Callable[..., Path]) -> Path:
    """A real daemon on SQLite, run and stopped: tasks succeeded (with steps), failed, dead,
    queued (delayed) and cancelled; a schedule made over the API; events posted. Returns
    its agentd.toml."""
    plugins = plugin_dir({"cp.py": PLUGIN})
    async with running_daemon(tmp_path, [plugins]) as daemon, aiohttp.ClientSession(
            daemon_url(daemon), timeout=aiohttp.ClientTimeout(total=30)) as http:

        async def submit(body: dict[str, Any], wait: bool = True) -> dict[str, Any]:
            async with http.post("/v1/tasks", json=body) as response:
                assert response.status == 201, await response.text()
                task: dict[str, Any] = await response.json()
            if wait:
                async with http.get(f"/v1/tasks/{task['id']}?wait=20") as response:
                    task = await response.json()
            return task

        for value in range(3):
            assert (await submit({"name": "cp.stepped", "args": {"value": value}}))["status"] == "succeeded"
        assert (await submit({"name": "cp.refused"}))["status"] == "failed"
        assert (await submit({"name": "cp.broken"}))["status"] == "dead"
        await submit({"name": "cp.stepped", "args": {"value": 9}, "delay": 3600,
                      "idempotency_key": "later"}, wait=False)
        doomed = await submit({"name": "cp.stepped", "args": {"value": 7}, "delay": 3600}, wait=False)
        async with http.post(f"/v1/tasks/{doomed['id']}/cancel") as response:
            assert response.status == 200, await response.text()
        async with http.post("/v1/schedules", json={"id": "nightly", "cron": "0 3 * * *",
                                                    "task": "cp.stepped", "args": {"value": 1}}) as response:
            assert response.status == 201, await response.text()
        for number in range(3):
            event = {"topic": "copy.test", "data": {"n": number}}
            async with http.post("/v1/events", json=event) as response:
                assert response.status == 202
        async with http.post("/v1/stream-tokens", json={}) as response:  # makes the signing key
            assert response.status in (200, 201), await response.text()
    config = tmp_path / "agentd.toml"
    config.write_text(f'[daemon]\ndata_dir = "{tmp_path / "data"}"\n')
    return config


async def _views(daemon: Any, ids: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What the API shows of the tasks `ids` and of the schedule "nightly"."""
    async with aiohttp.ClientSession(daemon_url(daemon), timeout=aiohttp.ClientTimeout(total=30)) as http:
        tasks = []
        for task in ids:
            async with http.get(f"/v1/tasks/{task}") as response:
                assert response.status == 200, await response.text()
                tasks.append(await response.json())
        async with http.get("/v1/schedules/nightly") as response:
            assert response.status == 200, await response.text()
            schedule = await response.json()
    return tasks, schedule


async def test_a_daemon_on_postgresql_serves_the_copied_deployment_as_it_was(
        tmp_path: Path, plugin_dir: Callable[..., Path], run_cli: Callable[..., Any]) -> None:
    """What a user sees through the API, before the move on SQLite and after it on
    PostgreSQL: the same tasks (statuses, results, errors), the same schedule; new tasks
    get new ids and run."""
    config = await _deployment(tmp_path, plugin_dir)
    ids = [row["id"] for row in _sqlite_rows(tmp_path / "data" / "agentd.db", "tasks")]
    plugins = tmp_path / "plugins"
    async with running_daemon(tmp_path, [plugins]) as daemon:
        before = await _views(daemon, ids)
    url = await fresh_database()
    code, _, err = await run_cli("store", "copy", "--config", str(config), "--to", url)
    assert code == 0, err

    async with running_daemon(tmp_path / "moved", [plugins], {"store": {"url": url}}) as daemon:
        assert daemon.store.describe()["engine"] == "postgresql"
        after = await _views(daemon, ids)
        assert after == before
        async with aiohttp.ClientSession(daemon_url(daemon), timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.post("/v1/tasks", json={"name": "cp.stepped", "args": {"value": 5}}) as response:
                assert response.status == 201, await response.text()
                task = await response.json()
            # Past every copied id (the identity was moved on), not necessarily next to
            # them: the daemon's own schedules may enqueue first once it serves.
            assert task["id"] > max(ids)
            async with http.get(f"/v1/tasks/{task['id']}?wait=20") as response:
                done = await response.json()
            assert done["status"] == "succeeded" and done["result"] == {"doubled": 10}


def _sqlite_rows(path: Path, table: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(f"SELECT * FROM {table} ORDER BY {TABLES[table]}")]
    finally:
        conn.close()


async def _pg_rows(url: str, table: str, columns: list[str]) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {TABLES[table]}")
        return [dict(row) for row in rows]
    finally:
        await conn.close()


async def _counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {table: await conn.fetchval(f"SELECT count(*) FROM {table}") for table in TABLES}
    finally:
        await conn.close()


async def test_a_stopped_sqlite_deployment_moves_to_postgresql_with_every_row_and_id(
        tmp_path: Path, plugin_dir: Callable[..., Path], run_cli: Callable[..., Any]) -> None:
    config = await _deployment(tmp_path, plugin_dir)
    database = tmp_path / "data" / "agentd.db"
    url = await fresh_database()

    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 0, err
    statuses = {row["status"] for row in _sqlite_rows(database, "tasks")}
    assert {"succeeded", "failed", "dead", "queued", "cancelled"} <= statuses
    for table in TABLES:
        source = _sqlite_rows(database, table)
        copied = await _pg_rows(url, table, list(source[0]) if source else ["*"])
        assert copied == source, table
        assert f"\n  {table:<16} {len(source):>10}\n" in out + "\n", out
    assert _sqlite_rows(database, "task_steps"), "the deployment made no steps"
    assert any(row["id"] == "nightly" for row in _sqlite_rows(database, "schedules"))
    assert any(row["key"] == "stream_token_key" for row in _sqlite_rows(database, "meta"))
    assert len([row for row in _sqlite_rows(database, "events") if row["topic"] == "copy.test"]) == 3
    assert "not copied" not in out
    # The daemon's memory.db, empty but for its embedder's record, goes too.
    assert "with its vectors (minilm-l6-v2-int8, 384 dimensions); rows per table:" in out, out
    assert f'next: set [store] url = "{redact_url(url)}" with its password in {config}' in out

    conn = await asyncpg.connect(url)
    try:
        highest_task = max(row["id"] for row in _sqlite_rows(database, "tasks"))
        new_task = await conn.fetchval(
            "INSERT INTO tasks (queue, name, args, status, run_at, max_attempts, created_at) "
            "VALUES ('default', 'cp.stepped', '{}', 'queued', 0, 1, 0) RETURNING id")
        assert new_task == highest_task + 1
        highest_event = max(row["id"] for row in _sqlite_rows(database, "events"))
        new_event = await conn.fetchval(
            "INSERT INTO events (topic, time, data, durable) VALUES ('t', 0, '{}', 1) RETURNING id")
        assert new_event > highest_event
    finally:
        await conn.close()


async def test_a_deleted_tasks_id_is_not_handed_out_again_on_postgresql(
        tmp_path: Path, plugin_dir: Callable[..., Path], run_cli: Callable[..., Any]) -> None:
    """SQLite's AUTOINCREMENT never reuses the id of a deleted last task; neither does the
    copy's identity."""
    config = await _deployment(tmp_path, plugin_dir)
    database = tmp_path / "data" / "agentd.db"
    conn = sqlite3.connect(database)
    with conn:
        highest = conn.execute("SELECT max(id) FROM tasks").fetchone()[0]
        conn.execute("DELETE FROM tasks WHERE id = ?", (highest,))
    conn.close()
    url = await fresh_database()

    code, _, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 0, err
    pg = await asyncpg.connect(url)
    try:
        assert await pg.fetchval(
            "INSERT INTO tasks (queue, name, args, status, run_at, max_attempts, created_at) "
            "VALUES ('default', 'x', '{}', 'queued', 0, 1, 0) RETURNING id") == highest + 1
    finally:
        await pg.close()


async def test_the_copy_is_refused_while_a_daemon_runs_on_the_file(
        tmp_path: Path, plugin_dir: Callable[..., Path], run_cli: Callable[..., Any]) -> None:
    config = await _deployment(tmp_path, plugin_dir)
    url = await fresh_database()
    async with running_daemon(tmp_path):  # the same data directory, in this process
        code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 1
    assert (f"agentd: store copy: {tmp_path / 'data' / 'agentd.db'} is in use by a running agentd "
            f"(pid {os.getpid()}): stop the daemon first") in err, err
    assert out == ""
    assert set((await _counts(url)).values()) == {0}


async def test_a_target_holding_agentd_data_is_refused_unless_forced(
        tmp_path: Path, plugin_dir: Callable[..., Path], run_cli: Callable[..., Any]) -> None:
    config = await _deployment(tmp_path, plugin_dir)
    url = await fresh_database()
    assert (await run_cli("store", "copy", "--config", str(config), "--to", url))[0] == 0
    once = await _counts(url)

    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 1
    assert f"already holds agentd data ({once['tasks']} tasks, " in err, err
    assert "refusing to mix two deployments" in err and "--force" in err
    assert await _counts(url) == once

    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", url, "--force")

    assert code == 0, err
    assert f"replaced (--force) what the target held: {once['tasks']} tasks, " in out
    assert await _counts(url) == once


async def test_a_url_that_is_not_postgresqls_is_a_usage_error_and_an_unreachable_one_fails(
        tmp_path: Path, plugin_dir: Callable[..., Path], run_cli: Callable[..., Any]) -> None:
    config = await _deployment(tmp_path, plugin_dir)

    code, _, err = await run_cli("store", "copy", "--config", str(config), "--to", "mysql://db/agentd")
    assert code == 2
    assert "--to: expected a postgresql:// URL, got 'mysql://db/agentd'" in err, err

    code, _, err = await run_cli("store", "copy", "--config", str(config), "--to",
                                 f"postgresql://agentd:s3cret@127.0.0.1:{_closed_port()}/agentd")
    assert code == 1
    assert "cannot connect to PostgreSQL" in err and "agentd:***@127.0.0.1" in err, err
    assert "s3cret" not in err


async def test_a_configuration_without_a_database_file_has_nothing_to_copy(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(f'[daemon]\ndata_dir = "{tmp_path / "nothing"}"\n')

    code, _, err = await run_cli("store", "copy", "--config", str(config), "--to",
                                 "postgresql://127.0.0.1/agentd")

    assert code == 1
    assert f"{tmp_path / 'nothing' / 'agentd.db'}: no such database file: nothing to copy" in err, err
    assert not (tmp_path / "nothing").exists()


async def test_a_failure_midway_leaves_the_target_as_it_was(
        tmp_path: Path, plugin_dir: Callable[..., Path], run_cli: Callable[..., Any]) -> None:
    """The event log goes last, after the tasks and their steps went over in the same
    transaction: an event PostgreSQL refuses (text with a NUL, which SQLite keeps) rolls
    all of it back, and the failure names the row."""
    config = await _deployment(tmp_path, plugin_dir)
    conn = sqlite3.connect(tmp_path / "data" / "agentd.db")
    with conn:
        bad = conn.execute("SELECT max(id) + 1 FROM events").fetchone()[0]
        conn.execute("INSERT INTO events (id, topic, time, data, durable) "
                     "VALUES (?, 'bad', 0, ?, 1)", (bad, "a\x00b"))
    conn.close()
    url = await fresh_database()

    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 1
    assert (f"the copy failed in table events (events id {bad} (data) hold U+0000 (NUL), which "
            "PostgreSQL cannot store: take it out of the SQLite file") in err, err
    assert "it was rolled back: the target" in err and "holds nothing of it" in err
    assert out == ""
    assert set((await _counts(url)).values()) == {0}


def test_the_help_says_what_is_copied_and_what_is_not(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["store", "copy", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "Stop the daemon" in out and "refuses while a daemon holds it" in out
    assert "memory.db" in out and "[memory] url" in out and "not embedded again" in out
    assert "--force" in out and "--to URL" in out


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --------------------------------------------------------------------------- memory.db


class WordEmbedder:
    """A deterministic embedder (bag of words, 64 dimensions): texts sharing words are near."""

    id = "test-words"
    dimension = 64

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors = [word_vector(text, self.dimension) for text in texts]
        return [[x / math.sqrt(sum(y * y for y in vector)) for x in vector] for vector in vectors]


QUERIES = [("default", "sky colour"), ("default", "what do cats do all day"),
           ("default", "deploy key rotation"), ("ops", "disk alert on the database host")]


async def _memory_deployment(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A stopped deployment whose memory.db (made by SqliteMemory with `WordEmbedder`) holds
    two sessions, memories in two namespaces with a correction chain, an updated memory,
    and two live memories sharing a text each (an expired one the purge has not reached,
    and an update to another memory's text). Returns its agentd.toml and what SQLite shows:
    every memory, each one's history, the sessions' messages and the recalls of QUERIES."""
    data = tmp_path / "data"
    store = SqliteStore(data / "agentd.db", StoreConfig())
    await store.open()
    await store.close()
    memory = SqliteMemory(MemoryConfig(), StoreConfig(), data / "memory.db", WordEmbedder())
    await memory.open()
    try:
        await memory.session("chat-1").append("user", "hello", {"lang": "en"})
        await memory.session("chat-1").append("assistant", "hi there")
        await memory.session("chat-2").append("user", "second conversation")
        sky, _ = await memory.remember("the sky is blue", metadata={"kind": "fact"})
        green, _ = await memory.remember("the sky is green today", supersedes=sky.id)
        await memory.remember("the sky is grey over the harbour", supersedes=green.id)
        await memory.remember("cats sleep most of the day", metadata={"kind": "fact", "agent": "a1"})
        dogs, _ = await memory.remember("dogs bark at the postman")
        await memory.update(dogs.id, text="dogs bark at the mail carrier", metadata={"kind": "pets"})
        await memory.remember("the deploy key rotates monthly", expires_at=time.time() - 60)
        await memory.remember("the deploy key rotates monthly")
        await memory.remember("rotate the deploy key before friday")
        await memory.remember("the database host alerts on full disks", "ops")
        two, _ = await memory.remember("backups run nightly at two", "ops")
        await memory.update(two.id, text="the database host alerts on full disks")
        await memory.remember("page the on-call engineer for a full disk", "ops",
                              expires_at=time.time() + 86400)
        ids = [row["id"] for row in await memory.store.read("SELECT id FROM memories ORDER BY id")]
        seen = await _what_memory_shows(memory, ids, ["chat-1", "chat-2"])
    finally:
        await memory.close()
    config = tmp_path / "agentd.toml"
    config.write_text(f'[daemon]\ndata_dir = "{data}"\n')
    return config, seen


async def _what_memory_shows(memory: MemoryStore, ids: list[int], sessions: list[str]) -> dict[str, Any]:
    """Every memory, its history, the sessions' messages, and the vector recall of QUERIES
    as (similarity, ids) from the nearest down: memories as near as each other are a set,
    in whatever order an engine gives them. (Hybrid recall is left out: the keyword
    rankings differ by design, FTS5's bm25 and PostgreSQL's ts_rank_cd.)"""
    recalls: dict[tuple[str, str], list[tuple[float, set[int]]]] = {}
    for namespace, query in QUERIES:
        ranking = recalls[namespace, query] = []
        for found in await memory.recall(query, namespace, k=5):
            score = round(found.score, 4)
            if ranking and ranking[-1][0] == score:
                ranking[-1][1].add(found.memory.id)
            else:
                ranking.append((score, {found.memory.id}))
    return {"memories": [await memory.get(i) for i in ids],
            "history": {i: await memory.history(i) for i in ids},
            "sessions": {s: await memory.session(s).history() for s in sessions},
            "recalls": recalls}


async def _pg_memory(url: str) -> PgMemory:
    memory = PgMemory(MemoryConfig(), url, WordEmbedder())
    await memory.open()
    return memory


async def test_memory_moves_with_its_vectors_and_is_recalled_on_postgresql_as_on_sqlite(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    """Sessions, memories (ids, chains, metadata, times), history and vectors come over; a
    PgMemory with the same embedder ranks as SQLite did, finds the texts it holds, and
    hands out ids past the copied ones."""
    config, before = await _memory_deployment(tmp_path)
    url = await fresh_database()

    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 0, err
    memory_db = tmp_path / "data" / "memory.db"
    assert (f"copied {memory_db} to {redact_url(url)} with its vectors (test-words, 64 "
            "dimensions); rows per table:") in out, out
    counts = {"memory_sessions": 2, "memory_messages": 3, "memories": 11, "memory_history": 15}
    for table, count in counts.items():
        assert f"\n  {table:<16} {count:>10}\n" in out + "\n", out
    assert "no memory.db" not in out
    assert all(recalled for recalled in before["recalls"].values())
    chain = [m for m in before["memories"] if m.text.startswith("the sky")]
    assert [(m.supersedes, m.superseded_by) for m in chain] == [
        (None, chain[1].id), (chain[0].id, chain[2].id), (chain[1].id, None)]

    memory = await _pg_memory(url)
    try:
        ids = [m.id for m in before["memories"]]
        after = await _what_memory_shows(memory, ids, ["chat-1", "chat-2"])
        assert after["memories"] == before["memories"]
        assert after["history"] == before["history"]
        assert after["sessions"] == before["sessions"]
        assert after["recalls"] == before["recalls"]
        # A text two live memories shared on SQLite is the oldest unexpired one's here.
        monthly = [m for m in before["memories"] if m.text == "the deploy key rotates monthly"]
        again, created = await memory.remember("the deploy key rotates monthly")
        assert (again.id, created) == (monthly[1].id, False)
        disks = [m for m in before["memories"] if m.text == "the database host alerts on full disks"]
        again, created = await memory.remember("the database host alerts on full disks", "ops")
        assert (again.id, created) == (disks[0].id, False)

        # Superseded memories had left SQLite's vector index: they come without a vector.
        superseded = {m.id for m in before["memories"] if m.superseded_by is not None}
        bare = await memory.store.read("SELECT id FROM memories WHERE embedding IS NULL")
        assert {row["id"] for row in bare} == superseded == {chain[0].id, chain[1].id}

        new, created = await memory.remember("an entirely new memory about owls")
        assert created and new.id == max(ids) + 1
        corrected, _ = await memory.remember("cats sleep most of the night",
                                             supersedes=before["memories"][3].id)
        assert corrected.supersedes == before["memories"][3].id
        history_ids = [c.id for changes in before["history"].values() for c in changes]
        assert min(c.id for c in await memory.history(new.id)) > max(history_ids)
        message = await memory.session("chat-1").append("user", "still here")
        assert message["id"] == 4
        assert [m["content"] for m in await memory.session("chat-1").history()] == [
            "hello", "hi there", "still here"]
    finally:
        await memory.close()


async def test_memory_goes_to_memory_url_and_a_target_holding_memories_is_refused_unless_forced(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    config, before = await _memory_deployment(tmp_path)
    store_url, memory_url = await fresh_database(), await fresh_database()
    config.write_text(config.read_text() + f'[memory]\nurl = "{memory_url}"\n')
    config.chmod(0o600)  # the URL holds a password

    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", store_url)

    assert code == 0, err
    assert "with its vectors (test-words, 64 dimensions)" in out
    assert f" to {redact_url(memory_url)} with its vectors" in out, out
    assert not await _has_memory_tables(store_url)
    once = await _memory_counts(memory_url)
    assert once == {"memory_sessions": 2, "memory_messages": 3, "memories": 11, "memory_history": 15}

    # Only the memory target holds data now (agentd.db's target is emptied by hand).
    conn = await asyncpg.connect(store_url)
    try:
        await conn.execute(f"TRUNCATE {', '.join(t for t in TABLES if t != 'meta')}")
    finally:
        await conn.close()
    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", store_url)

    assert code == 1
    assert (f"{redact_url(memory_url)} already holds agentd data (2 memory_sessions, "
            "3 memory_messages, 11 memories, 15 memory_history): refusing to mix") in err, err
    assert await _memory_counts(memory_url) == once
    assert set((await _counts(store_url)).values()) == {0}

    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", store_url,
                                   "--force")

    assert code == 0, err
    assert ("replaced (--force) what the target held: 2 memory_sessions, 3 memory_messages, "
            "11 memories, 15 memory_history") in out, out
    assert await _memory_counts(memory_url) == once
    memory = await _pg_memory(memory_url)
    try:
        after = await _what_memory_shows(memory, [m.id for m in before["memories"]], [])
        assert after["recalls"] == before["recalls"]
    finally:
        await memory.close()


async def test_a_deployment_without_memory_db_says_there_was_no_memory(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    config, _ = await _memory_deployment(tmp_path)
    for path in (tmp_path / "data").glob("memory.db*"):
        path.unlink()
    url = await fresh_database()

    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 0, err
    assert f"no memory.db at {tmp_path / 'data' / 'memory.db'}: there was no memory to copy" in out
    assert not await _has_memory_tables(url)  # left for a daemon to make, should memory go there


async def _memory_counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {table: await conn.fetchval(f"SELECT count(*) FROM {table}") for table in MEMORY_TABLES}
    finally:
        await conn.close()


async def _has_memory_tables(url: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT to_regclass('memories')") is not None
    finally:
        await conn.close()


async def test_a_memory_row_postgresql_refuses_rolls_back_agentd_db_too(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    """Memory goes in the same transaction as agentd.db when both share a database: a
    message PostgreSQL refuses (text with a NUL, which SQLite keeps) leaves nothing."""
    config, _ = await _memory_deployment(tmp_path)
    conn = sqlite3.connect(tmp_path / "data" / "memory.db")
    with conn:
        bad = conn.execute("INSERT INTO messages (session_id, role, content, created_at) "
                           "VALUES ('chat-2', 'user', ?, 0)", ("a\x00b",)).lastrowid
    conn.close()
    url = await fresh_database()

    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 1
    assert f"the copy failed in table memory_messages (messages id {bad} (content) hold U+0000" in err, err
    assert f"it was rolled back: the target {redact_url(url)} holds nothing of it" in err
    assert out == ""
    assert await _memory_counts(url) == dict.fromkeys(MEMORY_TABLES, 0)
    assert set((await _counts(url)).values()) == {0}
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM memory_meta") == 0
    finally:
        await conn.close()


async def test_memories_whose_metadata_jsonb_refuses_are_named_with_more_said(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    """Metadata goes to jsonb, which refuses a NUL in a string or key though JSON text holds
    it escaped; a backslash before "u0000" is no NUL and goes over. Past three rows, the
    failure says there are more."""
    config, _ = await _memory_deployment(tmp_path)
    conn = sqlite3.connect(tmp_path / "data" / "memory.db")
    with conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM memories ORDER BY id")]
        conn.execute("UPDATE memories SET metadata = ? WHERE id = ?", ('{"k": "\\\\u0000"}', ids[0]))
        for bad in ids[1:5]:
            conn.execute("UPDATE memories SET metadata = ? WHERE id = ?", ('{"k": "a\\u0000b"}', bad))
    conn.close()
    url = await fresh_database()

    code, _, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 1
    named = ", ".join(f"id {bad} (metadata)" for bad in ids[1:4])
    assert f"the copy failed in table memories (memories {named} and more hold U+0000" in err, err
    assert await _memory_counts(url) == dict.fromkeys(MEMORY_TABLES, 0)


async def test_a_task_whose_error_holds_a_nul_is_copied_as_postgresql_keeps_one(
        tmp_path: Path, plugin_dir: Callable[..., Path], run_cli: Callable[..., Any]) -> None:
    """An exception's message may hold U+0000: an older agentd kept it as it was on SQLite;
    the stores now write it as the four characters \\x00, and so does the copy, which
    failed on it before."""
    plugins = plugin_dir({"nul.py": NUL_PLUGIN})
    async with running_daemon(tmp_path, [plugins]) as daemon:
        record = await daemon.queue.enqueue("nul.fails")
        assert (await daemon.queue.wait(record.id, 10.0)).status == "dead"
    conn = sqlite3.connect(tmp_path / "data" / "agentd.db")
    with conn:  # as an older agentd left it
        conn.execute("UPDATE tasks SET error = replace(error, '\\x00', char(0)) WHERE id = ?",
                     (record.id,))
        assert "\x00" in conn.execute("SELECT error FROM tasks WHERE id = ?", (record.id,)).fetchone()[0]
    conn.close()
    config = tmp_path / "agentd.toml"
    config.write_text(f'[daemon]\ndata_dir = "{tmp_path / "data"}"\n')
    url = await fresh_database()

    code, _, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 0, err
    async with running_daemon(tmp_path / "pg", [plugins], {"store": {"url": url}}) as daemon:
        copied = await daemon.queue.get(record.id)
        again = await daemon.queue.enqueue("nul.fails")
        on_postgresql = await daemon.queue.wait(again.id, 10.0)
    assert "before\\x00after" in (copied.error or "")
    assert copied.error == on_postgresql.error


NUL_PLUGIN = """
from agentd import Plugin

plugin = Plugin("nul")


@plugin.task(max_attempts=1)
async def fails(ctx):
    raise RuntimeError("before\\x00after")
"""


async def test_forgetting_a_copied_correction_brings_its_original_back_into_recall(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    """A superseded memory has no vector on SQLite (it left the index), so it comes over
    without one: forgetting its correction embeds it before it is live again (PgMemory keeps
    the vectors of the memories it supersedes itself)."""
    config, before = await _memory_deployment(tmp_path)
    url = await fresh_database()
    assert (await run_cli("store", "copy", "--config", str(config), "--to", url))[0] == 0
    chain = [m for m in before["memories"] if m.text.startswith("the sky")]

    memory = await _pg_memory(url)
    try:
        assert await memory.forget(chain[2].id) == 1
        assert (await memory.get(chain[1].id)).superseded_by is None
        found = await memory.recall("the sky is green today", k=1)
        assert [r.memory.id for r in found] == [chain[1].id]
    finally:
        await memory.close()
