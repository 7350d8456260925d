"""`agentd backup` and `agentd restore`: a backup taken while a real daemon serves and writes
holds every task committed before it began and nothing committed after it ended; its
manifest describes each file; a restore puts it back (the daemon stopped), setting the
replaced files aside; damaged, incomplete and PostgreSQL cases are refused; `[backup]`'s
schedule keeps the newest backups; and a backup under way never lets the daemon's TRUNCATE
checkpoint hold its writer."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import shutil
import signal
import sqlite3
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from agentd import __version__
from agentd.backup import MANIFEST, PREFIX, BackupFile, sources, take
from agentd.config import load_config
from agentd.errors import ConfigError
from agentd.events import Event
from agentd.store.lock import BackupLock
from agentd.store.migrations import SCHEMA_VERSION
from agentd.testing import ManualClock, daemon_url, running_daemon
from conftest import HEAVY
from pg import fresh_database
from test_disk_full import until

PLUGIN = {"bk.py": '''
from agentd import Plugin

plugin = Plugin("bk")


@plugin.task()
async def noop(ctx, pad=""):
    return None
'''}
PAD = "x" * 16_000  # each task's args: a database of some megabytes in a few thousand tasks
PREFILL = 2000
MAX_TASKS = 20_000  # the load loop's bound
WAIT = 60.0


def _config(tmp_path: Path, plugins: Path | None = None, extra: str = "") -> Path:
    path = tmp_path / "agentd.toml"
    path.write_text(textwrap.dedent(f"""
        [daemon]
        data_dir = "data"
        stop_timeout = 5.0

        [plugins]
        paths = [{f'"{plugins}"' if plugins else ""}]
        entry_points = false

        [log]
        access = false
    """) + textwrap.dedent(extra))
    return path


def _task_ids(database: Path) -> set[int]:
    with sqlite3.connect(database) as db:
        return {row[0] for row in db.execute("SELECT id FROM tasks")}


def _integrity(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute("PRAGMA integrity_check")]


def _only_backup(directory: Path) -> Path:
    (found,) = directory.iterdir()
    assert found.name.startswith(PREFIX)
    return found


@HEAVY
async def test_a_backup_under_write_load_restores_every_task_committed_before_it_began(
        tmp_path: Path, plugin_dir: Callable[..., Path], agentd_process: Callable[..., Any],
        run_cli: Callable[..., Any]) -> None:
    config = _config(tmp_path, plugin_dir(PLUGIN))
    daemon = await agentd_process("run", "--config", str(config))
    port = await daemon.started()
    assert daemon.proc.stdout is not None
    # Its log read as it comes: a full pipe would stop the daemon at its next line.
    drained = asyncio.create_task(daemon.proc.stdout.read())
    acked: list[tuple[int, float]] = []  # (task id, when its 201 came back: committed by then)
    backup_done = asyncio.Event()

    async def load(session: aiohttp.ClientSession) -> None:
        while len(acked) < MAX_TASKS and not backup_done.is_set():
            async with session.post("/v1/tasks", json={"name": "bk.noop", "args": {"pad": PAD}}) as reply:
                assert reply.status == 201, await reply.text()
                acked.append(((await reply.json())["id"], time.time()))

    backups = tmp_path / "backups"
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}",
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post("/v1/memory", json={"text": "the backup keeps this"}) as reply:
            assert reply.status == 201, await reply.text()
        writers = [asyncio.create_task(load(session)) for _ in range(4)]
        async with asyncio.timeout(WAIT):
            while len(acked) < PREFILL:
                await asyncio.wait(writers, timeout=0.05)
        code, out, err = await run_cli("backup", "--config", str(config), str(backups))
        ended = time.time()
        backup_done.set()
        await asyncio.gather(*writers)
        # Written after the backup ended: must not be in it.
        for _ in range(5):
            async with session.post("/v1/tasks", json={"name": "bk.noop"}) as reply:
                acked.append(((await reply.json())["id"], time.time()))
    assert code == 0, err
    made = _only_backup(backups)
    assert f"to {made} in" in out
    manifest = json.loads((made / MANIFEST).read_text())
    began = datetime.datetime.fromisoformat(manifest["created_at"]).timestamp()
    before = {task for task, at in acked if at < began}
    during = [task for task, at in acked if began <= at < ended]
    after = {task for task, at in acked if at > ended}
    assert len(before) >= PREFILL and during, "the daemon wrote while the backup ran"

    daemon.proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(drained, WAIT)
    assert await daemon.proc.wait() == 0
    database = tmp_path / "data" / "agentd.db"
    live = _task_ids(database)
    code, out, err = await run_cli("restore", "--config", str(config), str(made))
    assert code == 0, err
    restored = _task_ids(database)
    assert before <= restored
    assert not after & restored
    assert _integrity(database) == ["ok"]
    assert _integrity(tmp_path / "data" / "memory.db") == ["ok"]
    with sqlite3.connect(tmp_path / "data" / "memory.db") as memory:
        assert memory.execute("SELECT text FROM memories").fetchall() == [("the backup keeps this",)]
    # The replaced files were set aside, whole: the live database had every task.
    (aside,) = (tmp_path / "data").glob("replaced-*")
    assert f"the files it replaced are in {aside}" in out
    assert {"agentd.db", "memory.db"} <= {p.name for p in aside.iterdir()}
    assert _task_ids(aside / "agentd.db") == live and {task for task, _ in acked} <= live

    # A daemon starts on the restored files and serves what they hold.
    async with running_daemon(tmp_path, overrides={"plugins": {"paths": []}}) as restarted, \
            aiohttp.ClientSession(daemon_url(restarted)) as client, \
            client.get(f"/v1/tasks/{min(before)}") as reply:
        assert reply.status == 200


async def test_a_backup_of_a_stopped_deployment_has_a_manifest_of_every_file(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    async with running_daemon(tmp_path) as daemon:
        await daemon.queue.enqueue("agentd.purge_tasks", {}, delay=3600)
    config = _config(tmp_path)
    started = time.time()
    code, out, err = await run_cli("backup", "--config", str(config), str(tmp_path / "b"))
    assert code == 0, err
    made = _only_backup(tmp_path / "b")
    assert sorted(p.name for p in made.iterdir()) == ["agentd.db", MANIFEST, "memory.db"]
    manifest = json.loads((made / MANIFEST).read_text())
    assert manifest["format"] == "agentd-backup/1"
    assert manifest["agentd_version"] == __version__ and manifest["made_by"] == "command"
    assert started - 1 <= datetime.datetime.fromisoformat(manifest["created_at"]).timestamp() <= time.time()
    files = {entry["name"]: BackupFile(**entry) for entry in manifest["files"]}
    assert files["agentd.db"].role == "store" and files["memory.db"].role == "memory"
    assert files["agentd.db"].schema_version == SCHEMA_VERSION
    for name, entry in files.items():
        data = (made / name).read_bytes()
        assert (entry.bytes, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert len(_task_ids(made / "agentd.db")) == 1

    code, out, err = await run_cli("restore", "--check", "--config", str(config), str(made))
    assert code == 0, err
    assert out.startswith(f"{made}: ok, made {manifest['created_at']}")
    assert not list((tmp_path / "data").glob("replaced-*"))  # --check replaces nothing


async def test_restore_refuses_while_a_daemon_holds_the_data(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    config = _config(tmp_path)
    async with running_daemon(tmp_path):
        code, _, err = await run_cli("backup", "--config", str(config), str(tmp_path / "b"))
        assert code == 0, err
        code, _, err = await run_cli("restore", "--config", str(config),
                                     str(_only_backup(tmp_path / "b")))
    assert code == 1
    assert "is in use by a running agentd (pid" in err and "stop the daemon" in err
    assert not list((tmp_path / "data").glob("replaced-*"))


async def test_restore_refuses_a_damaged_or_incomplete_backup_and_replaces_nothing(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    async with running_daemon(tmp_path):
        pass
    config = _config(tmp_path)
    code, _, err = await run_cli("backup", "--config", str(config), str(tmp_path / "b"))
    assert code == 0, err
    good = _only_backup(tmp_path / "b")
    data = tmp_path / "data"
    before = (data / "agentd.db").read_bytes()

    async def refused(backup: Path, *expected: str) -> None:
        code, _, err = await run_cli("restore", "--config", str(config), str(backup))
        assert code == 1
        for text in expected:
            assert text in err
        assert (data / "agentd.db").read_bytes() == before
        assert not list(data.glob("replaced-*")) and not list(data.glob("*.restoring"))

    flipped = shutil.copytree(good, tmp_path / "flipped")
    with (flipped / "agentd.db").open("r+b") as file:
        file.seek(5000)
        byte = file.read(1)
        file.seek(5000)
        file.write(bytes([byte[0] ^ 0xFF]))
    await refused(flipped, "agentd.db", "sha256", "changed or damaged")

    # Damaged inside, the manifest made to match: integrity_check finds it.
    broken = shutil.copytree(good, tmp_path / "broken")
    page_size = 4096
    with (broken / "agentd.db").open("r+b") as file:
        file.seek(page_size)  # page 2, a b-tree page: its header overwritten
        file.write(b"\xff" * 64)
    manifest = json.loads((broken / MANIFEST).read_text())
    content = (broken / "agentd.db").read_bytes()
    for entry in manifest["files"]:
        if entry["name"] == "agentd.db":
            entry["sha256"] = hashlib.sha256(content).hexdigest()
    (broken / MANIFEST).write_text(json.dumps(manifest))
    await refused(broken, "integrity_check")

    unfinished = shutil.copytree(good, tmp_path / f".{good.name}.partial")
    (unfinished / MANIFEST).unlink()
    await refused(unfinished, "no manifest.json: a backup that did not finish")


async def test_on_postgresql_backup_and_restore_name_its_own_tools(
        tmp_path: Path, run_cli: Callable[..., Any], process_env: Callable[..., Any]) -> None:
    env = process_env(AGENTD_STORE_URL=await fresh_database())
    config = _config(tmp_path)
    code, _, err = await run_cli("backup", "--config", str(config), str(tmp_path / "b"), env=env)
    assert code == 1, err
    assert "pg_dump" in err and "pg_basebackup" in err
    assert not (tmp_path / "b").exists()
    code, _, err = await run_cli("restore", "--config", str(config), str(tmp_path / "b"), env=env)
    assert code == 1 and "pg_restore" in err
    config = _config(tmp_path, extra='[backup]\ndir = "b"\n')
    code, _, err = await run_cli("check-config", "--config", str(config), env=env)
    assert code == 2 and "[backup] dir" in err and "pg_dump" in err


def test_backup_settings_are_checked() -> None:
    for table, key in (({"keep": 0}, "keep"), ({"every": 0.5}, "every")):
        with pytest.raises(ConfigError, match=rf"\[backup\] {key}: expected at least"):
            load_config(None, env={}, overrides={"backup": table})
    assert load_config(None, env={}).backup_dir is None


BASE = 1_800_864_000.0  # 2027-01-25 08:00 UTC, a multiple of an hour


async def test_scheduled_backups_keep_the_newest_and_leave_the_commands_backups(
        tmp_path: Path, run_cli: Callable[..., Any]) -> None:
    backups = tmp_path / "backups"
    clock = ManualClock(BASE + 600)
    overrides = {"backup": {"dir": str(backups), "every": 3600, "keep": 2}}
    async with running_daemon(tmp_path, overrides=overrides, clock=clock) as daemon:
        backed_up: asyncio.Queue[Event] = asyncio.Queue()
        daemon.bus.subscribe("daemon.backed_up", backed_up.put_nowait, name="test")
        code, _, err = await run_cli("backup", "--config", str(_config(tmp_path)), str(backups))
        assert code == 0, err
        (by_command,) = backups.iterdir()
        events = []
        for hour in (1, 2, 3):
            clock.set(BASE + hour * 3600)
            events.append(await asyncio.wait_for(backed_up.get(), WAIT))
        made = [Path(event.data["path"]) for event in events]
        async with aiohttp.ClientSession(daemon_url(daemon)) as client, \
                client.get("/v1/schedules") as reply:
            schedule = next(s for s in (await reply.json())["schedules"] if s["id"] == "agentd.backup")
    assert (schedule["source"], schedule["every"], schedule["task"]) == ("builtin", 3600.0, "agentd.backup")
    assert [event.data["pruned"] for event in events] == [[], [], [made[0].name]]
    assert sorted(backups.iterdir()) == sorted([by_command, made[1], made[2]])
    last = events[-1].data
    assert last["files"] == ["agentd.db", "memory.db"] and last["bytes"] > 0
    assert json.loads((made[2] / MANIFEST).read_text())["made_by"] == "schedule"


async def test_a_backup_under_way_turns_the_truncate_checkpoint_passive(tmp_path: Path) -> None:
    """A backup holds its snapshot for the whole copy. A TRUNCATE checkpoint then waited for
    it up to busy_timeout (5 s), on the reader connection the daemon's reads share, holding
    the WAL's write lock: a write that came meanwhile failed "database is locked" (measured).
    With a backup under way it runs PASSIVE, at once, and the writes and reads go on."""
    async with running_daemon(tmp_path) as daemon:
        database = daemon.config.database_path
        await daemon.queue.enqueue("agentd.purge_tasks", {}, delay=3600)
        reader = sqlite3.connect(database, isolation_level=None)
        try:
            with BackupLock(database).shared():
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM tasks").fetchone()  # the backup's snapshot
                for _ in range(20):  # frames past the snapshot: a TRUNCATE must wait for it
                    await daemon.queue.enqueue("agentd.purge_tasks", {}, delay=3600)
                with capture_logs() as logs:
                    started = time.monotonic()
                    maintain = asyncio.create_task(daemon.store.maintain())
                    await daemon.queue.enqueue("agentd.purge_tasks", {}, delay=3600)
                    await daemon.store.read("SELECT count(*) FROM tasks")
                    done = await asyncio.wait_for(maintain, 3.0)
                    took = time.monotonic() - started
                reader.execute("COMMIT")
        finally:
            reader.close()
        assert took < 1.0
        assert [(log["mode"], log["reason"]) for log in logs
                if log["event"] == "store.checkpoint_deferred"] == [
            ("TRUNCATE", "a backup is reading the database")]
        assert done["checkpoint_busy"] == 0
        # Once no backup runs, the TRUNCATE runs as before and empties the WAL.
        assert (await daemon.store.maintain())["wal_pages"] == 0


async def test_a_cancelled_backup_stops_and_leaves_nothing(tmp_path: Path) -> None:
    """A scheduled backup runs in a thread; cancelled (the daemon stopping), it stops at its
    next step and removes what it wrote. The file's backup lock is held here, as a
    checkpoint holds it, so the copy cannot finish before the cancellation."""
    async with running_daemon(tmp_path) as daemon:
        config = daemon.config
    backups = tmp_path / "b"
    with BackupLock(config.database_path).exclusive_unless_busy() as free:
        assert free
        taking = asyncio.create_task(take(sources(config), backups, made_by="schedule",
                                          version=__version__))

        async def started() -> bool:
            return backups.is_dir() and any(backups.iterdir())

        await until(started)
        taking.cancel()
        await asyncio.sleep(0)  # noqa: sleep - one loop turn: take's cancellation handler runs first
    with pytest.raises(asyncio.CancelledError):
        await taking
    assert list(backups.iterdir()) == []
