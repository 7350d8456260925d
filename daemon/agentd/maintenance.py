"""The daemon's own periodic work, run as ordinary tasks on ordinary schedules (so it shows
in the API, retries, and is never missed silently): purge expired tasks, sweep the event
log, checkpoint and vacuum the database, purge expired sessions and memories, and with
`[backup] dir` back the SQLite files up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from agentd import backup
from agentd.config import Config
from agentd.context import Context
from agentd.eventlog import EventLog
from agentd.log import get_logger
from agentd.memory import MemoryStore, SqliteMemory
from agentd.schedule import ScheduleSpec
from agentd.scheduler import DeclaredSource
from agentd.store import Database
from agentd.taskdef import TaskDef, TaskRegistry
from agentd.taskqueue import TaskQueue

SOURCE: Final[DeclaredSource] = "builtin"  # the source of the schedules `register` returns


def register(registry: TaskRegistry, config: Config, *, store: Database, queue: TaskQueue,
             eventlog: EventLog, memory: Callable[[], MemoryStore | None],
             version: str) -> list[ScheduleSpec]:
    """Register the maintenance tasks; return their schedules (intervals from agentd.toml).
    `version` is agentd's, for the backups' manifests."""

    async def purge_tasks(ctx: Context) -> dict[str, int]:
        return {"deleted": await queue.purge_expired()}

    async def sweep_events(ctx: Context) -> dict[str, int]:
        return {"deleted": await eventlog.sweep()}

    async def maintain_store(ctx: Context) -> dict[str, dict[str, int]]:
        done = {store.name: await store.maintain()}
        current = memory()
        if isinstance(current, SqliteMemory):  # PostgreSQL's autovacuum keeps its own
            done[current.store.path.name] = await current.store.maintain()
        return done

    async def purge_memory(ctx: Context) -> dict[str, int]:
        current = memory()
        return await current.purge_expired() if current is not None else {}

    jobs: list[tuple[str, Callable[[Context], Any], float]] = [
        ("agentd.purge_tasks", purge_tasks, config.tasks.purge_interval),
        ("agentd.sweep_events", sweep_events, config.events.sweep_interval),
        ("agentd.maintain_store", maintain_store, config.store.maintenance_interval),
        ("agentd.purge_memory", purge_memory, config.memory.purge_interval),
    ]
    if config.backup_dir is not None:
        jobs.append(("agentd.backup", _back_up(config, config.backup_dir, queue, version),
                     config.backup.every))
    specs = []
    for name, fn, interval in jobs:
        registry.add(TaskDef(name=name, fn=fn, max_attempts=3, queue=builtin_queue(config)))
        specs.append(ScheduleSpec(id=name, every=interval, task=name, catch_up="once",
                                  overlap="skip", queue=builtin_queue(config)))
    return specs


def _back_up(config: Config, directory: Path, queue: TaskQueue,
             version: str) -> Callable[[Context], Any]:
    """The scheduled backup's task: a backup into `directory`, then the scheduled ones but
    the newest `[backup] keep` deleted; logged (`backup.created`) and published
    (`daemon.backed_up`) with the backup's path, size and time and the backups deleted."""
    log = get_logger("backup")

    async def back_up(ctx: Context) -> dict[str, Any]:
        made = await backup.take(backup.sources(config), directory, made_by="schedule",
                                 version=version)
        pruned = await asyncio.to_thread(backup.prune, directory, config.backup.keep)
        summary = {"path": str(made.path), "bytes": made.bytes,
                   "seconds": made.manifest.seconds,
                   "files": [file.name for file in made.manifest.files],
                   "pruned": [entry.name for entry in pruned]}
        log.info("backup.created", **summary)
        queue.bus.publish("daemon.backed_up", summary)
        return summary

    return back_up


def builtin_queue(config: Config) -> str:
    """The queue the daemon's own tasks (maintenance, mail, webhooks, digests) run on."""
    return "default" if "default" in config.tasks.queues else next(iter(config.tasks.queues))
