"""One daemon per database file: an exclusive `flock` on `<database>.lock`; and a backup
under way, a shared one on `<database>.backup-lock` (`BackupLock`).

The lock file holds the owner's pid, so a second daemon started on the same file refuses
with a message naming the process that has it. The kernel drops the lock when its owner
dies, so a crashed daemon never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agentd.errors import StoreLockedError


class FileLock:
    """An exclusive `flock` on `<database>.lock`. `setting` is the agentd.toml key that
    names the database, for the error message."""

    def __init__(self, database: Path, setting: str) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._setting = setting
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our pid in it. Raises StoreLockedError if another
        process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreLockedError(
                f"{self.path.with_suffix('')} is in use by another agentd process (pid {holder}); "
                f"stop it or set a different {self._setting}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (closing the file drops it); a no-op if not held."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class BackupLock:
    """`<database>.backup-lock`: held shared by each backup while it reads the file, so the
    daemon's checkpoints that wait for readers (RESTART, TRUNCATE) know not to.

    A backup reads the database in one snapshot, a read transaction open for the whole
    copy. A TRUNCATE checkpoint takes the WAL's write lock and then waits (up to
    busy_timeout) for every reader to leave its snapshot: behind a backup it held the
    daemon's writer that long, and the writer's own wait for the lock could run out first.
    With a backup under way the checkpoint runs PASSIVE instead (`checkpoints.checkpoint`).

    The file is opened read-only and created readable by all: the daemon, `agentd backup`
    and `agentd restore` may run as different users, and the lock holds no data.
    """

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".backup-lock")

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock shared for a backup; waits while a checkpoint holds it."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def exclusive_unless_busy(self) -> Iterator[bool]:
        """Try the lock exclusive without waiting; yield whether it was taken (False: a
        backup is reading the database). A lock file that cannot be opened counts as free:
        no backup of this agentd could have taken it."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            yield True
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)
