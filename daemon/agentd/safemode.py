"""Safe mode: the record of the daemon's starts, and the verdict it gives at each start.

Every `agentd run` records its start attempt in `<data_dir>/starts.json` before anything
else is built (before the store opens: a daemon dying while opening it, or while importing
a plugin, still counts), written to a temporary file, fsynced and renamed, so a crash at any
moment leaves the old record or the new one. The attempt is marked `survived` once the
daemon has served for `[daemon] safe_mode_after` seconds, `stopped` when a stop was asked
for (SIGTERM, SIGINT) and `failed` when the start failed with an error it reported. An
attempt still unmarked when the next start reads the record ended without a word: killed,
crashed or exited inside a plugin, within `safe_mode_after` of serving. After `[daemon]
safe_mode_starts` such starts in a row, the next one starts in safe mode, and every start
after it does until an operator clears it (`agentd run --no-safe-mode`, or
`POST /v1/safe-mode/clear` and a restart).

The record is a file of the daemon's own data directory, not a table of the store: it must
be written before the store opens (a crash in a migration, a database that hangs, counts),
and it belongs to one daemon, where a PostgreSQL store is shared by many on many hosts.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agentd.config import Config
from agentd.log import get_logger

JOURNAL_NAME = "starts.json"
KEPT_STARTS = 20  # the newest start attempts the record keeps
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

Outcome = Literal["running", "survived", "stopped", "failed"]


@dataclass(frozen=True, slots=True)
class StartRecord:
    """One start attempt: its process, when it began, and how it ended (`running`: not yet
    known, or, read by a later start, it ended without a word: a crash)."""

    pid: int
    started_at: float
    outcome: Outcome = "running"
    boot: str = ""  # the kernel's boot id, so a pid from before a reboot is not taken as alive

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "started_at": self.started_at, "outcome": self.outcome,
                "boot": self.boot}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StartRecord:
        return cls(pid=int(data["pid"]), started_at=float(data["started_at"]),
                   outcome=data["outcome"], boot=str(data.get("boot", "")))


@dataclass(frozen=True, slots=True)
class SafeMode:
    """Why the daemon serves in safe mode, since when, and the starts that ended without a
    word that put it there. `cleared`: an operator cleared it; the next start is normal."""

    reason: str
    since: float
    crashes: tuple[StartRecord, ...]
    cleared: bool = False

    def to_dict(self) -> dict[str, Any]:
        """As `/healthz`, `/v1/status` and the log show it."""
        return {"reason": self.reason, "since": self.since, "cleared": self.cleared,
                "crashes": [{"pid": crash.pid, "started_at": crash.started_at}
                            for crash in self.crashes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SafeMode:
        crashes = tuple(StartRecord(pid=int(c["pid"]), started_at=float(c["started_at"]))
                        for c in data["crashes"])
        return cls(reason=str(data["reason"]), since=float(data["since"]), crashes=crashes)


@dataclass(slots=True)
class _Journal:
    starts: list[StartRecord] = field(default_factory=list)
    safe_mode: SafeMode | None = None


class StartJournal:
    """The start record of the daemon of `config` (`<data_dir>/starts.json`).

    `begin` once per process, as early as possible; then `survived`, `ended` and `clear`,
    from the event loop's thread or another (they take a lock, and each write is a few
    hundred bytes fsynced: call them through `asyncio.to_thread` from async code).
    """

    def __init__(self, config: Config) -> None:
        self.path = config.data_dir / JOURNAL_NAME
        self._after = config.daemon.safe_mode_after
        self._threshold = config.daemon.safe_mode_starts
        self._lock = threading.Lock()
        self._mine: StartRecord | None = None
        self._log = get_logger("daemon")

    def begin(self, *, leave_safe_mode: bool = False) -> SafeMode | None:
        """Record this process's start attempt and return the safe mode it starts in (None:
        a normal start). Starts recorded as running whose process is gone count as crashes.
        `leave_safe_mode` (`agentd run --no-safe-mode`) forgets the safe mode and the
        crashes recorded so far first; so does `[daemon] safe_mode_starts = 0`.

        Raises:
            OSError: the data directory cannot be created or the record written.
        """
        with self._lock:
            journal = self._read()
            previous = journal.safe_mode
            if leave_safe_mode:
                journal = _Journal()
                if previous is not None:
                    self._log.warning("daemon.safe_mode_cleared", by="agentd run --no-safe-mode",
                                      reason=previous.reason, since=previous.since)
            crashes = _crashes_in_a_row(journal.starts)
            if self._threshold == 0:
                journal.safe_mode = None
            elif journal.safe_mode is None and len(crashes) >= self._threshold:
                journal.safe_mode = SafeMode(self._reason(crashes), time.time(), tuple(
                    StartRecord(crash.pid, crash.started_at) for crash in crashes))
            self._mine = StartRecord(os.getpid(), time.time(), boot=_boot_id())
            journal.starts = [*journal.starts, self._mine][-KEPT_STARTS:]
            self._write(journal)
            return journal.safe_mode

    def survived(self) -> bool:
        """Mark this start as one that served for `safe_mode_after` seconds: it ends the
        run of crashes (a safe mode already entered stays until cleared). False when the
        record could not be written (logged)."""
        return self._mark("survived")

    def ended(self, outcome: Literal["stopped", "failed"]) -> bool:
        """Mark this start as ended in order: a stop asked for, or a start that failed with
        an error it reported. Neither counts as a crash. False when the record could not
        be written (logged)."""
        return self._mark(outcome)

    def clear(self) -> SafeMode | None:
        """Forget the safe mode and the crashes recorded, keeping this process's own start:
        the next start is a normal one. Return the safe mode that was recorded (None: none)."""
        with self._lock:
            journal = self._read()
            previous = journal.safe_mode
            mine = [start for start in journal.starts if self._is_mine(start)]
            self._write(_Journal(starts=mine))
            return previous

    def _mark(self, outcome: Outcome) -> bool:
        with self._lock:
            if self._mine is None:
                return False  # this process began no start (an in-process Daemon, in tests)
            journal = self._read()
            journal.starts = [
                StartRecord(start.pid, start.started_at, outcome, start.boot)
                if self._is_mine(start) and start.outcome in ("running", "survived") else start
                for start in journal.starts]
            try:
                self._write(journal)
            except OSError as exc:  # the next start will count this one as a crash
                self._log.error("daemon.start_record_unwritable", path=str(self.path),
                                outcome=outcome, error=str(exc))
                return False
            return True

    def _is_mine(self, start: StartRecord) -> bool:
        mine = self._mine
        return mine is not None and (start.pid, start.started_at) == (mine.pid, mine.started_at)

    def _reason(self, crashes: list[StartRecord]) -> str:
        times = ", ".join(_iso(crash.started_at) for crash in crashes)
        return (f"the last {len(crashes)} starts ended before serving {self._after:g} s, without a "
                f"stop being asked for (killed or crashed; started at {times}); plugins are off, "
                "no task is claimed and no schedule fires until safe mode is cleared")

    def _read(self) -> _Journal:
        """The record as stored; an empty one when there is none or it cannot be read (the
        loss is logged: the record only ever tells whether to start safely)."""
        try:
            data = json.loads(self.path.read_text())
            return _Journal(
                starts=[StartRecord.from_dict(start) for start in data["starts"]],
                safe_mode=None if data["safe_mode"] is None else SafeMode.from_dict(data["safe_mode"]))
        except FileNotFoundError:
            return _Journal()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._log.warning("daemon.start_record_unreadable", path=str(self.path), error=str(exc))
            return _Journal()

    def _write(self, journal: _Journal) -> None:
        """Replace the record atomically and durably: a crash leaves the old one or this one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"safe_mode": None if journal.safe_mode is None else journal.safe_mode.to_dict(),
                "starts": [start.to_dict() for start in journal.starts]}
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with temporary.open("w") as file:
            json.dump(data, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power loss
        finally:
            os.close(directory)


def _crashes_in_a_row(starts: list[StartRecord]) -> list[StartRecord]:
    """The newest starts, oldest first, that ended without a word, up to the newest that
    ended in order (or survived). A start whose process is still alive (another daemon on
    this data directory, started moments ago) is not counted, nor does it end the run."""
    crashes: list[StartRecord] = []
    for start in reversed(starts):
        if start.outcome != "running":
            break
        if not _alive(start):
            crashes.append(start)
    return crashes[::-1]


def _alive(start: StartRecord) -> bool:
    """Whether the process of `start` still runs: same boot, and its pid is taken, by
    another process than this one (a container's daemon gets the same pid at each start)."""
    if start.pid == os.getpid() or not start.boot or start.boot != _boot_id():
        return False
    try:
        os.kill(start.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user holds the pid
    return True


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return _BOOT_ID.read_text().strip()
    return ""


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
