"""`SqliteStore`: a store on one SQLite file, owned by one process.

It puts the parts of this package together: the lock (`lock.py`), the connections and
their pragmas (`driver.py`), the schema (`migrations.py`), the one writer with its grouped
transactions (`writer.py`, which it extends: a write is the hot path and pays no call
through a facade), the reader connections, and the WAL's checkpoints (`checkpoints.py`).
Reads that are not part of a write go through aiosqlite connections, off the loop.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiosqlite

from agentd.config import StoreConfig
from agentd.errors import StoreError
from agentd.store import checkpoints
from agentd.store.driver import Row, connect, driver, plain_driver
from agentd.store.lock import FileLock
from agentd.store.migrations import MIGRATIONS, load, migrate
from agentd.store.writer import Writer


class SqliteStore(Writer):
    """The daemon's database: one owner process, one writer connection, and `readers`
    reader connections (each its own thread: SQLite runs queries without the GIL, so two
    readers use two cores for slow reads such as vector searches). `migrations` is the
    package folder of its schema scripts; `setting` is the agentd.toml key that names
    `path`, for error messages."""

    def __init__(self, path: Path, config: StoreConfig, *, migrations: str = "sql",
                 writes_in_thread: bool = False, readers: int = 1, extensions: bool = True,
                 setting: str = "[store] path") -> None:
        super().__init__(path)
        self.config = config
        self.extensions = extensions
        self._migrations = MIGRATIONS if migrations == "sql" else load(migrations)
        # Slow writes (sqlite-vec inserts) go to the writer thread whatever the durability.
        self.writes_in_thread = writes_in_thread
        self.schema_version = 0
        self._lock = FileLock(path, setting)
        self._reader_count = max(1, readers)
        self._readers: list[aiosqlite.Connection] = []
        self._reads_in_flight: list[int] = []

    async def open(self) -> None:
        """Take the lock, open the connections and migrate. Raises StoreError."""
        try:
            # Private from the start (0700, 0600), whatever the umask: the database holds
            # task arguments, results and the stream tokens' signing key.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # SQLite's -wal/-shm copy its mode
        except OSError as exc:
            raise StoreError(f"cannot create the data directory {self.path.parent}: {exc}") from exc
        self._lock.acquire()
        try:
            self._conn = connect(self.path, self.config, self.extensions)
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self.schema_version = migrate(self._conn, self.path, self._migrations)
            for _ in range(self._reader_count):
                reader = aiosqlite.Connection(lambda: connect(self.path, self.config, self.extensions),
                                              iter_chunk_size=256)
                await reader
                self._readers.append(reader)
                self._reads_in_flight.append(0)
        except BaseException:
            await self.close()
            raise
        if self.config.synchronous == "full" or self.writes_in_thread:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="agentd-writer")
        self._log.info("store.opened", path=str(self.path), schema=self.schema_version,
                       driver=(driver if self.extensions else plain_driver).__name__,
                       synchronous=self.config.synchronous)

    async def close(self) -> None:
        """Finish pending writes, then close the connections and release the lock."""
        await self.finish()
        readers, self._readers, self._reads_in_flight = self._readers, [], []
        for reader in readers:
            await reader.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._lock.release()

    async def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        """Rows of a read-only query, run off the event loop on the least busy reader."""
        if not self._readers:
            raise StoreError(f"{self.path}: the store is closed")
        index = self._reads_in_flight.index(min(self._reads_in_flight))
        reader = self._readers[index]
        self._reads_in_flight[index] += 1
        try:
            return list(await reader.execute_fetchall(sql, params))
        finally:
            if index < len(self._reads_in_flight) and self._readers[index] is reader:
                self._reads_in_flight[index] -= 1

    async def read_one(self, sql: str, params: tuple[Any, ...] = ()) -> Row | None:
        """The first row of `read(sql, params)`, or None."""
        rows = await self.read(sql, params)
        return rows[0] if rows else None

    async def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """See `checkpoints.checkpoint`."""
        return await checkpoints.checkpoint(self, mode)

    async def run_checkpoints(self, interval: float = 1.0, wal_limit: int = 4 << 20) -> None:
        """Forever: checkpoint once the WAL has grown; see `checkpoints.run_checkpoints`."""
        await checkpoints.run_checkpoints(self, interval, wal_limit)

    async def maintain(self) -> dict[str, int]:
        """Truncate the WAL and give free pages back; see `checkpoints.maintain`."""
        return await checkpoints.maintain(self)

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> dict[str, Any]:
        """What `/v1/status` shows of the store."""
        return {"engine": "sqlite", "path": str(self.path), "schema_version": self.schema_version,
                "synchronous": self.config.synchronous}

    async def stats(self, tables: tuple[str, ...]) -> dict[str, int | str | None]:
        """The database's size on disk, the row count of each table in `tables`, and the
        code of the storage failure writes meet now (None while they commit)."""
        row = await self.read_one(
            "SELECT (SELECT page_count FROM pragma_page_count) AS pages, "
            "(SELECT page_size FROM pragma_page_size) AS page_size, "
            "(SELECT freelist_count FROM pragma_freelist_count) AS free")
        wal = self.path.with_name(self.path.name + "-wal")
        out: dict[str, int | str | None] = {
            "write_failure": None if self.failure is None else self.failure.code,
            "transactions": self.transactions,
            "bytes": row["pages"] * row["page_size"] if row is not None else 0,
            "free_pages": row["free"] if row is not None else 0,
            "wal_bytes": wal.stat().st_size if wal.exists() else 0,
        }
        for table in tables:
            counted = await self.read_one(f"SELECT count(*) AS n FROM {table}")
            out[f"{table}_rows"] = counted["n"] if counted is not None else 0
        return out


