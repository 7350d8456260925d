"""The SQLite driver: which one, how values bind, how a connection is opened, what its
errors mean.

Drivers. sqlite-vec is a loadable extension and many Python builds (pyenv, some macOS) ship
a `sqlite3` that cannot load extensions. The driver of a store that needs extensions
(memory.db) is picked once, in this order: `sqlean` (a dependency, wheels everywhere) → the
stdlib when it can load extensions → `pysqlite3`. A store that needs none (the queue's and
the event log's agentd.db) uses the stdlib `sqlite3` when its SQLite has RETURNING (3.35):
its statements cost half of sqlean's in Python overhead (0.7 µs against 1.5 µs to execute
one, measured), a sixth of the instructions a no-op task takes. Catch `Error` from this
module (either driver's errors); rows of both drivers are read the same way.

`connect` sets the pragmas every connection of a store shares (WAL, busy_timeout, foreign
keys, durability); `write_error` names the storage failure an SQLite error stands for.
"""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from agentd.config import StoreConfig
from agentd.errors import (
    StoreBusyError,
    StoreFullError,
    StoreIOError,
    StoreReadOnlyError,
    StoreWriteError,
)

Connection = sqlite3.Connection  # the driver's connection class has the same interface


def _pick_driver() -> ModuleType:
    try:
        import sqlean

        module: ModuleType = sqlean
        return module
    except ImportError:
        pass
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import pysqlite3.dbapi2

        fallback: ModuleType = pysqlite3.dbapi2
        return fallback
    except ImportError as exc:
        raise ImportError(
            "agentd needs an SQLite driver that can load extensions: "
            "pip install sqlean.py (or pysqlite3-binary)"
        ) from exc


driver: ModuleType = _pick_driver()
plain_driver: ModuleType = sqlite3 if sqlite3.sqlite_version_info >= (3, 35) else driver


def _bind_null(value: None) -> None:
    return value


# Parameters that are not exactly int, float, str or bytearray take the driver's adaptation
# path: with no adapter registered for their type it builds two AttributeErrors (an
# `__adapt__` and a `__conform__` lookup) before binding the value as it is. A queued task
# binds four Nones (timeout, key, parent, correlation) and its event row one: that was 3 %
# of a no-op task's instructions. Registered adapters are found by one dict lookup and bind
# exactly what the fallback bound: None as NULL, a bool as its integer.
for _module in {sqlite3, driver}:
    _module.register_adapter(type(None), _bind_null)
    _module.register_adapter(bool, int)
if TYPE_CHECKING:
    Row = sqlite3.Row
else:
    Row = driver.Row
Error: tuple[type[Exception], ...] = (driver.Error, sqlite3.Error)
IntegrityError: tuple[type[Exception], ...] = (driver.IntegrityError, sqlite3.IntegrityError)


WAL_SIZE_LIMIT = 64 << 20  # bytes of WAL file kept after a checkpoint resets it


def _vec0_path() -> str:
    """The sqlite-vec extension the `sqlite_vec` package ships, found without importing the
    package: its `__init__` imports numpy (0.1 s of a daemon's start) for a helper agentd
    does not use."""
    spec = importlib.util.find_spec("sqlite_vec")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the sqlite-vec package is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / "vec0")


def connect(path: Path, config: StoreConfig, extensions: bool = True) -> Connection:
    """Open `path` with WAL, busy_timeout, foreign keys and the configured durability, and
    sqlite-vec unless `extensions` is False (then on `plain_driver`).

    The connection is in autocommit mode: callers write `BEGIN`/`COMMIT` themselves.
    """
    module = driver if extensions else plain_driver
    conn: Connection = module.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.row_factory = module.Row
    if extensions:
        conn.enable_load_extension(True)
        conn.load_extension(_vec0_path())
        conn.enable_load_extension(False)
    conn.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout_ms)}")
    if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
        # Only a new, empty file can take this, and only before WAL mode writes its first
        # page (after, it is silently ignored): it lets maintenance hand free pages back.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {config.synchronous.upper()}")
    conn.execute("PRAGMA foreign_keys = ON")
    # Checkpoints reuse the WAL file from its start but never shrink it: without a limit a
    # burst of writes (bulk remember()) leaves hundreds of MB on disk until the next
    # TRUNCATE. With one, SQLite cuts the file back to 64 MB each time it is reset.
    conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    return conn


# The storage failures a write can meet, by SQLite's primary result code (the low byte of
# the extended code the driver reports), and what each tells the client.
_WRITE_ERRORS: dict[int, tuple[type[StoreWriteError], str]] = {
    5: (StoreBusyError, "the database stayed locked by another connection past busy_timeout_ms"),
    6: (StoreBusyError, "the database stayed locked by another connection past busy_timeout_ms"),
    8: (StoreReadOnlyError, "the database files cannot be written (permissions, a read-only mount)"),
    10: (StoreIOError, "the disk failed a read or a write of the database files"),
    13: (StoreFullError, "the disk (or the database's max_page_count) is full"),
}
# The same causes by SQLite's message, for errors that come without a code: sqlite-vec
# reports a failed write of its own as an error of its own that quotes SQLite's message.
_WRITE_MESSAGES = {"database is locked": 5, "attempt to write a readonly database": 8,
                   "disk I/O error": 10, "database or disk is full": 13}


def write_error(path: Path, exc: Exception) -> StoreWriteError | None:
    """The `StoreWriteError` an SQLite error met writing `path` stands for, or None if it
    is not a storage failure (a constraint, a bug in the statement)."""
    if not isinstance(exc, Error):
        return None
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if code is None or code & 0xFF not in _WRITE_ERRORS:
        code = next((c for message, c in _WRITE_MESSAGES.items() if message in text), None)
        if code is None:
            return None
    kind, cause = _WRITE_ERRORS[code & 0xFF]
    error = kind(f"{path}: {cause}; nothing of this write was stored (SQLite: {text})")
    error.__cause__ = exc
    return error
