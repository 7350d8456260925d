"""Keeping the WAL file small: checkpoints, and handing free pages back.

The writer never checkpoints (`wal_autocheckpoint = 0`): a checkpoint fsyncs and would
stall the loop for milliseconds. `run_checkpoints` copies the WAL back into the database
from a reader connection, in its thread, once the WAL has grown; `maintain` (the
maintenance schedule) truncates it and runs an incremental vacuum. Neither waits for a
backup under way (`BackupLock`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from agentd.log import get_logger
from agentd.store.driver import WAL_SIZE_LIMIT, Connection, Error
from agentd.store.lock import BackupLock

if TYPE_CHECKING:
    from agentd.store.sqlite import SqliteStore

MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")


async def checkpoint(store: SqliteStore, mode: str = "PASSIVE") -> tuple[int, int, int]:
    """Run `PRAGMA wal_checkpoint(mode)` off the loop: (busy, WAL pages, pages copied).

    A mode that waits for readers (all but PASSIVE) runs PASSIVE while a backup reads the
    file (see `BackupLock`): it would hold the writer until the backup ended or busy_timeout
    ran out. The lock is held through the checkpoint, so no backup starts in its middle."""
    if mode not in MODES:
        raise ValueError(f"unknown checkpoint mode {mode!r}")
    if mode == "PASSIVE":
        return await _checkpoint(store, mode)
    with BackupLock(store.path).exclusive_unless_busy() as free:
        if not free:
            get_logger("store").info("store.checkpoint_deferred", path=str(store.path), mode=mode,
                                     reason="a backup is reading the database")
            mode = "PASSIVE"
        return await _checkpoint(store, mode)


async def _checkpoint(store: SqliteStore, mode: str) -> tuple[int, int, int]:
    row = await store.read_one(f"PRAGMA wal_checkpoint({mode})")
    return (row[0], row[1], row[2]) if row is not None else (0, 0, 0)


async def run_checkpoints(store: SqliteStore, interval: float, wal_limit: int) -> None:
    """Forever: every `interval` s, checkpoint once the WAL file is past `wal_limit` bytes.

    PASSIVE never waits, so under writes that never pause it never catches up and the
    WAL only grows (786 MB after 100,000 bulk remember()s). For a store of slow writes
    (`writes_in_thread`: memory.db), past WAL_SIZE_LIMIT it runs a RESTART checkpoint
    instead, which holds the writer thread (up to busy_timeout) and makes the next write
    start the WAL over, cut back to WAL_SIZE_LIMIT. The queue's store stays PASSIVE:
    holding its writer would hold claims and acks (up to a second, measured), so its
    WAL is bounded by `maintain()`'s TRUNCATE.

    A checkpoint that fails (the database file cannot grow on a full disk) is logged
    once and tried again every `interval` s: the WAL keeps its pages meanwhile."""
    wal = store.path.with_name(store.path.name + "-wal")
    log = get_logger("store")
    failing = False
    while True:
        await asyncio.sleep(interval)
        try:
            size = wal.stat().st_size
        except FileNotFoundError:
            continue
        if size > WAL_SIZE_LIMIT and store.writes_in_thread:
            mode = "RESTART"
        elif size > wal_limit:
            mode = "PASSIVE"
        else:
            continue
        try:
            await store.checkpoint(mode)
        except Error as exc:
            if not failing:
                log.error("store.checkpoint_failed", path=str(store.path), error=str(exc))
            failing = True
            continue
        if failing:
            log.warning("store.checkpoint_recovered", path=str(store.path))
            failing = False


async def maintain(store: SqliteStore) -> dict[str, int]:
    """Fold the WAL into the database and truncate it, and give free pages back to the
    file system; return what it did."""
    busy, wal_pages, copied = await store.checkpoint("TRUNCATE")
    freed = await store.write(_incremental_vacuum)
    return {"checkpoint_busy": busy, "wal_pages": wal_pages, "pages_copied": copied,
            "pages_freed": freed}


def _incremental_vacuum(conn: Connection) -> int:
    before = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    conn.execute("PRAGMA incremental_vacuum").fetchall()
    return before - int(conn.execute("PRAGMA freelist_count").fetchone()[0])
