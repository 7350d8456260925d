"""`agentd store copy --to postgresql://...`: a stopped SQLite deployment moved into
PostgreSQL with every row and id, and the copy refused where it would do harm (a daemon
running on the file, a target that holds agentd data, a URL that is not PostgreSQL's), a
failure midway leaving the target as it was."""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from agentd.cli import main
from agentd.config import redact_url
from agentd.store.copy import TABLES
from agentd.testing import daemon_url, running_daemon
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
    assert "not copied: memory.db (sessions, long-term memory) stays at " in out
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
    all of it back."""
    config = await _deployment(tmp_path, plugin_dir)
    conn = sqlite3.connect(tmp_path / "data" / "agentd.db")
    with conn:
        conn.execute("INSERT INTO events (id, topic, time, data, durable) "
                     "VALUES ((SELECT max(id) + 1 FROM events), 'bad', 0, ?, 1)", ("a\x00b",))
    conn.close()
    url = await fresh_database()

    code, out, err = await run_cli("store", "copy", "--config", str(config), "--to", url)

    assert code == 1
    assert "the copy failed in table events (" in err, err
    assert "it was rolled back: the target" in err and "holds nothing of it" in err
    assert out == ""
    assert set((await _counts(url)).values()) == {0}


def test_the_help_says_what_is_copied_and_what_is_not(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["store", "copy", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "Stop the daemon" in out and "refuses while a daemon holds it" in out
    assert "memory.db (sessions, long-term memory) is not copied" in out
    assert "--force" in out and "--to URL" in out


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
