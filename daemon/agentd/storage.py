"""Which engine holds agentd.db's data, chosen once: `open_storage(config)` builds the
engine (SQLite by default, PostgreSQL with `[store] url`) and, for each part that stores,
its storage on that engine; `open_memory` chooses memory's (memory.db, or PostgreSQL with
pgvector). The parts receive their storage from `app.py` and never ask
which engine it is; each engine's statements live beside the part (`steps.py`) or in
`agentd/postgres/` (`postgres/steps.py`). The PostgreSQL engine (asyncpg and every module
of `agentd/postgres/`) is imported only when a URL asks for it: a daemon on SQLite starts
without paying for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentd.config import Config
from agentd.digests import DigestStore, SqliteDigests
from agentd.embed import Embedder
from agentd.eventlog import EventStore, SqliteEvents
from agentd.hooks import DeliveryStore, SqliteDeliveries
from agentd.memory import MemoryStore, SqliteMemory
from agentd.scheduler import ScheduleStore, SqliteSchedules
from agentd.steps import SqliteSteps, StepStore
from agentd.store import Database, Store
from agentd.store.sqlite import SqliteStore
from agentd.streamkey import SqliteStreamKey, StreamKeyStore
from agentd.taskqueue import SqliteTasks, TaskStore
from agentd.waits import SqliteWaits, WaitStore

if TYPE_CHECKING:
    from agentd.store.postgres import PgStore


@dataclass(frozen=True, slots=True)
class Storage:
    """agentd.db's engine and each part's storage on it. `sqlite` is the engine when it is
    SQLite (None on PostgreSQL), `postgres` when it is PostgreSQL: the daemon runs the
    engine's own loops (WAL checkpoints; the notification listener)."""

    database: Database
    sqlite: SqliteStore | None
    postgres: PgStore | None
    steps: StepStore
    tasks: TaskStore
    waits: WaitStore
    events: EventStore
    digests: DigestStore
    schedules: ScheduleStore
    hook_deliveries: DeliveryStore
    stream_key: StreamKeyStore


def open_storage(config: Config) -> Storage:
    """The storage `config` asks for (not yet opened: `database.open()` does that)."""
    if config.store.url:
        from agentd.store.postgres import PgStore

        return _postgres(PgStore(config.store))
    return _sqlite(SqliteStore(config.database_path, config.store, extensions=False))


def _sqlite(store: SqliteStore) -> Storage:
    sqlite: Store = store
    return Storage(database=store, sqlite=store, postgres=None, steps=SqliteSteps(sqlite),
                   tasks=SqliteTasks(sqlite), waits=SqliteWaits(sqlite), events=SqliteEvents(sqlite),
                   digests=SqliteDigests(sqlite),
                   schedules=SqliteSchedules(sqlite), hook_deliveries=SqliteDeliveries(sqlite),
                   stream_key=SqliteStreamKey(sqlite))


def _postgres(store: PgStore) -> Storage:
    from agentd.postgres.digests import PgDigests
    from agentd.postgres.events import PgEvents
    from agentd.postgres.hooks import PgDeliveries
    from agentd.postgres.schedules import PgSchedules
    from agentd.postgres.steps import PgSteps
    from agentd.postgres.streamkey import PgStreamKey
    from agentd.postgres.tasks import PgTasks
    from agentd.postgres.waits import PgWaits

    tasks = PgTasks(store)
    return Storage(database=store, sqlite=None, postgres=store, steps=PgSteps(store),
                   tasks=tasks, waits=PgWaits(store, tasks),
                   events=PgEvents(store, tasks.peers_alive, tasks.on_peers_changed),
                   digests=PgDigests(store),
                   schedules=PgSchedules(store), hook_deliveries=PgDeliveries(store),
                   stream_key=PgStreamKey(store))


def open_memory(config: Config, embedder: Embedder) -> MemoryStore:
    """The memory the configuration names: on PostgreSQL with `[memory] url` or `[store]
    url` set, else in memory.db. Not opened yet."""
    if config.memory_url:
        from agentd.postgres.memory import PgMemory

        setting = "[memory] url" if config.memory.url else "[store] url"
        return PgMemory(config.memory, config.memory_url, embedder, setting=setting)
    return SqliteMemory(config.memory, config.store, config.memory_path, embedder)
