"""One daemon per database file: an exclusive `flock` on `<database>.lock`.

The lock file holds the owner's pid, so a second daemon started on the same file refuses
with a message naming the process that has it. The kernel drops the lock when its owner
dies, so a crashed daemon never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
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
