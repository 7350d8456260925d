"""The daemon's own periodic work, run as ordinary tasks on ordinary schedules (so it shows
in the API, retries, and is never missed silently): purge expired tasks, sweep the event
log, checkpoint and vacuum the database, purge expired sessions and memories."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from agentd.config import Config
from agentd.context import Context
from agentd.eventlog import EventLog
from agentd.memory import MemoryStore, SqliteMemory
from agentd.schedule import ScheduleSpec
from agentd.scheduler import DeclaredSource
from agentd.store import Database
from agentd.taskdef import TaskDef, TaskRegistry
from agentd.taskqueue import TaskQueue

SOURCE: Final[DeclaredSource] = "builtin"  # the source of the schedules `register` returns


def register(registry: TaskRegistry, config: Config, *, store: Database, queue: TaskQueue,
             eventlog: EventLog, memory: Callable[[], MemoryStore | None]) -> list[ScheduleSpec]:
    """Register the maintenance tasks; return their schedules (intervals from agentd.toml)."""

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

    jobs = (
        ("agentd.purge_tasks", purge_tasks, config.tasks.purge_interval),
        ("agentd.sweep_events", sweep_events, config.events.sweep_interval),
        ("agentd.maintain_store", maintain_store, config.store.maintenance_interval),
        ("agentd.purge_memory", purge_memory, config.memory.purge_interval),
    )
    specs = []
    for name, fn, interval in jobs:
        registry.add(TaskDef(name=name, fn=fn, max_attempts=3, queue=builtin_queue(config)))
        specs.append(ScheduleSpec(id=name, every=interval, task=name, catch_up="once",
                                  overlap="skip", queue=builtin_queue(config)))
    return specs


def builtin_queue(config: Config) -> str:
    """The queue the daemon's own tasks (maintenance, mail, webhooks, digests) run on."""
    return "default" if "default" in config.tasks.queues else next(iter(config.tasks.queues))
