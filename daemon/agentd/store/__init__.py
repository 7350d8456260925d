"""Where everything agentd keeps is stored, and the one interface the rest of agentd uses.

Modules, by job:

- `__init__.py`: `Database`, what the daemon needs of either engine; `Store`, the SQLite
  engine as the parts' SQLite storage uses it; and the names they import.
- `sqlite.py`: `SqliteStore`, the SQLite engine: lock, connections, schema, writer,
  readers and checkpoints put together.
- `driver.py`: the SQLite driver (sqlean or the stdlib), value adapters, `connect` and its
  pragmas, what an SQLite error means.
- `migrations.py`: the numbered `agentd/sql/NNNN_*.sql` scripts, applied once each.
- `lock.py`: one daemon per database file (`flock` on `<file>.lock`); a backup under way
  (`<file>.backup-lock`, which the checkpoints respect).
- `writer.py`: the one writer: writes grouped into transactions, riders, `BatchedWrite`,
  failed writes and the write checks.
- `checkpoints.py`: WAL checkpoints and the incremental vacuum.
- `postgres.py`: `PgStore`, the PostgreSQL engine (`[store] url`): a pool, grouped write
  transactions, reads, notifications, its migrations (`agentd/sql/pg/`).
- `copy.py`: `agentd store copy`, agentd.db's SQLite tables copied into PostgreSQL.
- `text.py`: what text the stores can keep (no U+0000, as PostgreSQL's text and jsonb).

The seam. Each part that stores (queue, steps, event log, scheduler, digests, hook
deliveries, the stream key) declares what it needs of its tables as a Protocol, with its
SQLite implementation beside it (on a `Store`: `write` runs an op on the write connection
inside a grouped transaction; `join_batch`/`add_rider`/`request_flush` add writes sized
when a batch is taken; `read`/`read_one` query off the loop) and its PostgreSQL one in
`agentd/postgres/` (on a `PgStore`, the same calls with coroutine ops). Each keeps its
statements as module-level constants, so neither engine's SQL has a branch for the other.
`agentd/storage.py` builds one set for the configured engine, once; memory.db stays on
SQLite (`memory.py` opens its own `SqliteStore`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agentd.config import StoreConfig
from agentd.errors import StoreWriteError
from agentd.store.driver import Connection, Error, IntegrityError, Row
from agentd.store.writer import BatchedWrite, WriteOp, execute_rows

T = TypeVar("T")

__all__ = ["BatchedWrite", "Connection", "Database", "Error", "IntegrityError", "Row", "Store",
           "WriteOp", "execute_rows"]


class Database(Protocol):
    """What the daemon itself needs of agentd.db's engine, SQLite (`SqliteStore`) or
    PostgreSQL (`store.postgres.PgStore`): its lifecycle, its health and its figures. The
    parts that store use an engine's own interface (`Store` on SQLite) through their
    storage classes; see `agentd/storage.py`."""

    config: StoreConfig
    schema_version: int
    transactions: int
    failure: StoreWriteError | None

    @property
    def closed(self) -> bool:
        """Whether the store is closed (or not yet open)."""

    @property
    def location(self) -> str:
        """Where the data is, for logs: the file's path, or the URL without its password."""

    @property
    def name(self) -> str:
        """A short name for it in results: the file's name, or "postgresql"."""

    async def open(self) -> None:
        """Connect and migrate. Raises StoreError."""

    async def close(self) -> None:
        """Commit what is pending, then close the connections."""

    async def check_writable(self) -> None:
        """Raise StoreWriteError unless a write commits now."""

    async def maintain(self) -> dict[str, int]:
        """Compact the storage; return what was done (for the maintenance schedule)."""

    async def stats(self, tables: tuple[str, ...]) -> dict[str, int | str | None]:
        """Size, row counts of `tables`, and the current write failure's code."""

    def describe(self) -> dict[str, Any]:
        """What `/v1/status` shows of the store: its engine, where it is, its settings."""


class Store(Protocol):
    """A database with one writer and grouped write transactions, as the parts see it.

    Writes are synchronous ops of the write connection: ops submitted in the same loop
    tick share one transaction, and each op's future resolves once it commits. A write the
    storage refuses fails with a `StoreWriteError` naming the cause (`failure` holds the
    last until a write check commits); a closed store refuses writes and reads with a
    StoreError."""

    path: Path
    config: StoreConfig
    schema_version: int
    transactions: int
    failure: StoreWriteError | None

    @property
    def closed(self) -> bool:
        """Whether the store is closed (or not yet open)."""

    async def open(self) -> None:
        """Take the database for this process, connect and migrate. Raises StoreError."""

    async def close(self) -> None:
        """Commit what is pending, then close the connections and give the database up."""

    def write(self, op: WriteOp[T]) -> asyncio.Future[T]:
        """Run `op(connection)` in the next grouped transaction; resolve to its result."""

    def join_batch(self, op: WriteOp[T], future: asyncio.Future[T] | None = None) -> asyncio.Future[T]:
        """Add `op` to the next batch without starting one (for riders)."""

    def add_rider(self, rider: Callable[[], None]) -> None:
        """Call `rider()` just before each batch is taken, to `join_batch` writes of its own."""

    def request_flush(self) -> None:
        """Make sure a batch is taken soon (a rider has writes to add)."""

    async def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        """Rows of a read-only query, run off the event loop. Parameters are positional
        only: asyncpg, the PostgreSQL driver to come, binds no named ones."""

    async def read_one(self, sql: str, params: tuple[Any, ...] = ()) -> Row | None:
        """The first row of `read(sql, params)`, or None."""

    async def check_writable(self) -> None:
        """Raise StoreWriteError unless a write that needs room commits now."""

    async def run_checkpoints(self, interval: float = 1.0, wal_limit: int = 4 << 20) -> None:
        """Forever: keep the engine's write-ahead log bounded (a service the daemon runs)."""

    async def maintain(self) -> dict[str, int]:
        """Compact the storage; return what was done (for the maintenance schedule)."""

    async def stats(self, tables: tuple[str, ...]) -> dict[str, int | str | None]:
        """Size on disk, row counts of `tables`, and the current write failure's code."""

    def describe(self) -> dict[str, Any]:
        """What `/v1/status` shows of the store: its engine, where it is, its settings."""
