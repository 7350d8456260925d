"""Backups of a deployment's SQLite files: `agentd backup` and `[backup]`'s schedule make
them, `agentd restore` checks one and puts it back.

A backup is a directory `agentd-backup-<UTC time>` holding a copy of agentd.db, of
memory.db when memory is kept there, and `manifest.json`: the agentd version, when the
backup began, who made it (`command` or `schedule`), and each file with its role, schema
version, size and sha256. It is written under a hidden `.<name>.partial` name and renamed
once complete, so a backup that crashed midway never looks like one.

Each file is copied with SQLite's online backup API, in steps, inside one read transaction
held for the whole copy: the copy is the database as it was when that transaction began
(every commit before it, none after) while the daemon's writers go on (a WAL reader blocks
no writer; without the held transaction every commit of theirs would restart the copy).
Meanwhile the backup holds the file's `BackupLock`, so the daemon's checkpoints do not wait
for it. A file is opened with the driver the daemon opens it with: a scheduled backup runs
in the daemon's process, and two SQLite libraries in one process drop each other's POSIX
locks on a file when either closes it. The copies are rollback-journal files of their own
(no -wal beside them), checked with `PRAGMA integrity_check` before the backup counts.

Restoring needs the daemon stopped: it holds the files' daemon locks (`FileLock`) for its
whole run, checks the backup (each file's size and sha256 against the manifest, its
integrity, a schema this agentd knows) before it touches anything, and moves the files it
replaces, with their -wal and -shm, into `replaced-<UTC time>/` beside them.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from agentd.config import Config
from agentd.errors import BackupError, StoreLockedError
from agentd.store.driver import Connection, Error, driver, plain_driver
from agentd.store.lock import BackupLock, FileLock
from agentd.store.migrations import SCHEMA_VERSION, load

Role = Literal["store", "memory"]
MadeBy = Literal["command", "schedule"]
FILE_NAMES: dict[Role, str] = {"store": "agentd.db", "memory": "memory.db"}
SETTINGS: dict[Role, str] = {"store": "[store] path", "memory": "[memory] path"}
KNOWN_SCHEMA: dict[Role, int] = {"store": SCHEMA_VERSION, "memory": load("sql/memory")[-1][0]}
MANIFEST = "manifest.json"
FORMAT = "agentd-backup/1"
PREFIX = "agentd-backup-"
# Pages copied per step of the backup API (4 MB of 4 KB pages): between steps the thread
# gives the GIL back and a cancelled backup stops.
STEP_PAGES = 1024
_BUSY_TIMEOUT_MS = 5000
_CHUNK = 1 << 20

POSTGRES_BACKUP = (
    "the store is on PostgreSQL ([store] url): agentd backs up only its SQLite files. Use "
    "PostgreSQL's own tools: pg_dump -Fc (one database, restored with pg_restore) or "
    "pg_basebackup (the whole server, with WAL archiving for point-in-time recovery); see "
    "docs/operations.md, Backups and restore")
POSTGRES_RESTORE = (
    "the store is on PostgreSQL ([store] url): agentd restores only its SQLite files. Use "
    "PostgreSQL's own tools: pg_restore (of a pg_dump -Fc), or start the server on a "
    "pg_basebackup copy; see docs/operations.md, Backups and restore")


@dataclass(frozen=True, slots=True)
class Source:
    """A database file a backup copies, and which of agentd's it is."""

    role: Role
    path: Path


@dataclass(frozen=True, slots=True)
class BackupFile:
    """One file of a backup, as its manifest records it."""

    name: str
    role: Role
    bytes: int
    sha256: str
    schema_version: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """A backup's `manifest.json`: `created_at` is when the backup began (ISO 8601, UTC):
    it holds every commit made before then."""

    agentd_version: str
    created_at: str
    seconds: float
    made_by: MadeBy
    files: tuple[BackupFile, ...]
    format: str = FORMAT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["files"] = [asdict(file) for file in self.files]
        return data

    @classmethod
    def from_json(cls, data: Any, where: Path) -> Manifest:
        """Raises BackupError naming `where` if `data` is not a manifest of this format."""
        try:
            if data["format"] != FORMAT:
                raise BackupError(f"{where}: format {data['format']!r}, this agentd reads {FORMAT!r}")
            files = tuple(BackupFile(name=str(f["name"]), role=f["role"], bytes=int(f["bytes"]),
                                     sha256=str(f["sha256"]), schema_version=int(f["schema_version"]))
                          for f in data["files"])
            manifest = cls(agentd_version=str(data["agentd_version"]),
                           created_at=str(data["created_at"]), seconds=float(data["seconds"]),
                           made_by=data["made_by"], files=files)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupError(f"{where}: not an agentd backup manifest ({type(exc).__name__}: "
                              f"{exc})") from None
        roles = [file.role for file in files]
        names = [file.name for file in files]
        if (manifest.made_by not in get_args(MadeBy) or "store" not in roles
                or any(role not in FILE_NAMES for role in roles) or len(set(roles)) != len(roles)
                or any(name != FILE_NAMES[role] for name, role in zip(names, roles, strict=True))):
            raise BackupError(f"{where}: not an agentd backup manifest (made_by {manifest.made_by!r}, "
                              f"files {names})")
        return manifest


@dataclass(frozen=True, slots=True)
class Backup:
    """A complete backup: its directory and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def bytes(self) -> int:
        return sum(file.bytes for file in self.manifest.files)


@dataclass
class Restored:
    """What a restore did: the files put in place, the files set aside (in `aside`), and
    what it left alone and why (`notes`)."""

    backup: Backup
    restored: list[Path] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)
    aside: Path | None = None
    notes: list[str] = field(default_factory=list)


def sources(config: Config) -> list[Source]:
    """The files a backup of `config`'s deployment copies: agentd.db, and memory.db when
    memory is kept there (no `[memory] url`) and the file exists.

    Raises:
        BackupError: the store is on PostgreSQL, or agentd.db does not exist.
    """
    if config.store.url:
        raise BackupError(POSTGRES_BACKUP)
    if not config.database_path.is_file():
        raise BackupError(f"{config.database_path}: no database there ([store] path): nothing "
                          "to back up")
    found = [Source("store", config.database_path)]
    if not config.memory_url and config.memory_path.is_file():
        found.append(Source("memory", config.memory_path))
    return found


def make_backup(files: Sequence[Source], directory: Path, *, made_by: MadeBy, version: str,
                cancel: threading.Event | None = None) -> Backup:
    """Copy `files` into a new backup in `directory` (created if missing), its manifest
    naming agentd `version`; blocking (see `take` for the daemon's loop). With `cancel`
    set meanwhile, the copy stops at its next step and nothing of it is left.

    Raises:
        BackupError: a file cannot be read or copied, the copy is damaged, the directory
            cannot be written (naming the path), or the backup was cancelled.
    """
    began = time.time()
    started = time.monotonic()
    name = PREFIX + _stamp(began)
    partial = directory / f".{name}.partial"
    final = directory / name
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial.mkdir(mode=0o700)
    except OSError as exc:
        raise BackupError(f"cannot write the backup directory {directory}: {exc}") from None
    try:
        copied = [_copy(source, partial / FILE_NAMES[source.role], cancel) for source in files]
        manifest = Manifest(agentd_version=version, created_at=_iso(began),
                            seconds=round(time.monotonic() - started, 3), made_by=made_by,
                            files=tuple(copied))
        with (partial / MANIFEST).open("w") as out:
            json.dump(manifest.to_json(), out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        _fsync_dir(partial)
        os.rename(partial, final)  # the backup is complete from here on
        _fsync_dir(directory)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise BackupError(f"cannot write the backup {final}: {exc}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return Backup(final, manifest)


async def take(files: Sequence[Source], directory: Path, *, made_by: MadeBy,
               version: str) -> Backup:
    """`make_backup` in a thread, off the loop; cancelled, it stops the copy at its next
    step and waits for that (a thread cannot be interrupted), then re-raises."""
    cancel = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(
        make_backup, files, directory, made_by=made_by, version=version, cancel=cancel))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        cancel.set()
        with suppress(BackupError):  # "cancelled": the caller hears the cancellation
            await work
        raise


def read_manifest(path: Path) -> Manifest:
    """The manifest of the backup at `path`, unchecked against its files.

    Raises:
        BackupError: `path` holds no readable agentd manifest (a backup that did not finish,
            or not a backup).
    """
    where = path / MANIFEST
    if not where.is_file():
        hint = (": a backup that did not finish" if path.name.endswith(".partial")
                else ": not a complete agentd backup")
        raise BackupError(f"{path}: no {MANIFEST}{hint}")
    try:
        data = json.loads(where.read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{where}: cannot read it: {exc}") from None
    return Manifest.from_json(data, where)


def verify(path: Path) -> Backup:
    """Check the backup at `path`: every file the manifest lists is there with its size and
    sha256, passes `PRAGMA integrity_check`, and has a schema this agentd knows.

    Raises:
        BackupError: naming the file and what is wrong with it.
    """
    manifest = read_manifest(path)
    for entry in manifest.files:
        file = path / entry.name
        if not file.is_file():
            raise BackupError(f"{file}: missing, though {MANIFEST} lists it")
        size, digest = _digest(file)
        if (size, digest) != (entry.bytes, entry.sha256):
            raise BackupError(f"{file}: {size} bytes with sha256 {digest}, but {MANIFEST} says "
                              f"{entry.bytes} bytes with sha256 {entry.sha256}: the file was "
                              "changed or damaged since the backup")
        if entry.schema_version > KNOWN_SCHEMA[entry.role]:
            raise BackupError(f"{file}: schema version {entry.schema_version} is newer than this "
                              f"agentd knows ({KNOWN_SCHEMA[entry.role]}); restore it with agentd "
                              f"{manifest.agentd_version} or newer")
        _check_integrity(file, entry.role)
    return Backup(path, manifest)


def restore(path: Path, config: Config) -> Restored:
    """Put the backup at `path` in place of `config`'s agentd.db and memory.db, the daemon
    stopped. The backup is checked first (`verify`) and copied beside each target before
    anything is moved; the files replaced, with their -wal and -shm, are moved into
    `replaced-<UTC time>/` beside them, never deleted. A memory.db that the backup has none
    of is set aside too, so the deployment is the backup's.

    Raises:
        BackupError: the store is on PostgreSQL, a daemon holds the files, the backup fails
            its checks, or a file cannot be copied or moved (naming it).
    """
    if config.store.url:
        raise BackupError(POSTGRES_RESTORE)
    targets: dict[Role, Path] = {"store": config.database_path}
    if not config.memory_url:
        targets["memory"] = config.memory_path
    with ExitStack() as held:
        for role, target in targets.items():
            held.enter_context(_daemon_lock(target, SETTINGS[role]))
        backup = verify(path)
        report = Restored(backup)
        entries = {entry.role: entry for entry in backup.manifest.files}
        if "memory" in entries and "memory" not in targets:
            report.notes.append(f"{FILE_NAMES['memory']} of the backup was not restored: [memory] "
                                "url keeps memory in PostgreSQL")
        _replace(targets, entries, report)
    return report


def _replace(targets: dict[Role, Path], entries: dict[Role, BackupFile], report: Restored) -> None:
    """Copy the backup's files beside their targets, set the targets aside, then rename the
    copies into place, recording it all in `report`."""
    path = report.backup.path
    staged: dict[Role, Path] = {}
    try:
        # Copied first: a full disk fails the restore before anything was moved.
        for role, target in targets.items():
            if role in entries:
                staged[role] = target.with_name(target.name + ".restoring")
                _copy_file(path / entries[role].name, staged[role])
        stamp = _stamp(time.time())
        for role, target in targets.items():
            moved = _set_aside(target, target.parent / f"replaced-{stamp}")
            if moved:
                report.aside = target.parent / f"replaced-{stamp}"
                report.set_aside += moved
                if role not in entries:
                    report.notes.append(f"{target} was set aside: the backup has no "
                                        f"{FILE_NAMES[role]} (the daemon starts a new one)")
        for role, staged_file in staged.items():
            os.replace(staged_file, targets[role])
            _fsync_dir(targets[role].parent)
            report.restored.append(targets[role])
    except OSError as exc:
        for staged_file in staged.values():
            staged_file.unlink(missing_ok=True)
        raise BackupError(f"the restore failed: {exc}" + (
            f"; the replaced files are in {report.aside}" if report.aside else
            "; nothing was replaced")) from None


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete the scheduled backups in `directory` but the newest `keep`; return the deleted.
    Backups made by `agentd backup` and directories that are not complete backups are left
    alone."""
    scheduled = []
    for entry in directory.iterdir():
        if not entry.name.startswith(PREFIX) or not entry.is_dir():
            continue
        try:
            manifest = read_manifest(entry)
        except BackupError:
            continue
        if manifest.made_by == "schedule":
            scheduled.append(entry)
    scheduled.sort(key=lambda entry: entry.name)  # names are UTC times: oldest first
    old = scheduled[:-keep]
    for entry in old:
        shutil.rmtree(entry)
    return old


def _copy(source: Source, target: Path, cancel: threading.Event | None) -> BackupFile:
    """Copy `source` to `target` in one snapshot, check the copy, and describe it."""
    module = plain_driver if source.role == "store" else driver
    with ExitStack() as held:
        try:
            held.enter_context(BackupLock(source.path).shared())
        except OSError as exc:
            raise BackupError(f"{source.path}: cannot take its backup lock: {exc} (run the "
                              "backup as the daemon's user)") from None
        try:
            src: Connection = module.connect(str(source.path), isolation_level=None,
                                             check_same_thread=False)
        except Error as exc:
            raise BackupError(f"{source.path}: cannot open it: {exc}") from None
        try:
            src.execute("PRAGMA query_only = ON")
            src.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            src.execute("BEGIN")
            # The transaction's first read: its snapshot, the one copied, starts here.
            version = _schema_version(src)
            dst: Connection = module.connect(str(target), isolation_level=None,
                                             check_same_thread=False)
            try:
                src.backup(dst, pages=STEP_PAGES, progress=_stop_when(cancel))
                dst.execute("PRAGMA journal_mode = DELETE")  # a file of its own: no -wal
            finally:
                dst.close()
        except Error as exc:
            raise BackupError(f"{source.path}: the copy failed: {exc}") from None
        finally:
            src.close()
    _check_integrity(target, source.role)
    size, digest = _digest(target)
    return BackupFile(name=target.name, role=source.role, bytes=size, sha256=digest,
                      schema_version=version)


def _stop_when(cancel: threading.Event | None) -> Callable[[int, int, int], None]:
    def progress(status: int, remaining: int, total: int) -> None:
        if cancel is not None and cancel.is_set():
            raise BackupError("the backup was cancelled (the daemon is stopping)")

    return progress


def _schema_version(conn: Connection) -> int:
    try:
        return int(conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0])
    except Error as exc:
        raise BackupError(f"not an agentd database: {exc}") from None


def _check_integrity(file: Path, role: Role) -> None:
    """Raise BackupError unless `PRAGMA integrity_check` finds `file` sound. The file is
    opened immutable: nothing is written beside it."""
    module = plain_driver if role == "store" else driver
    try:
        conn = module.connect(f"file:{file}?immutable=1", uri=True, isolation_level=None)
        try:
            found = [row[0] for row in conn.execute("PRAGMA integrity_check(20)")]
        finally:
            conn.close()
    except Error as exc:
        raise BackupError(f"{file}: cannot be read as a database: {exc}") from None
    if found != ["ok"]:
        raise BackupError(f"{file}: integrity_check found it damaged: {'; '.join(found)}")


def _digest(file: Path) -> tuple[int, str]:
    """`file`'s size and sha256, read through; the file is fsynced on the way."""
    digest = hashlib.sha256()
    size = 0
    with file.open("rb") as data:
        while chunk := data.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(data.fileno())
    return size, digest.hexdigest()


@contextmanager
def _daemon_lock(target: Path, setting: str) -> Iterator[None]:
    """Hold `target`'s daemon lock: no daemon runs on it meanwhile."""
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise BackupError(f"cannot create the data directory {target.parent}: {exc}") from None
    lock = FileLock(target, setting)
    try:
        lock.acquire()
    except StoreLockedError:
        holder = lock.path.read_text().strip() or "unknown"
        raise BackupError(f"{target} is in use by a running agentd (pid {holder}): stop the "
                          "daemon before restoring") from None
    try:
        yield
    finally:
        lock.release()


def _copy_file(source: Path, target: Path) -> None:
    """Copy `source` to `target` (private to the owner) and fsync it."""
    with source.open("rb") as src, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                                0o600), "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
        dst.flush()
        os.fsync(dst.fileno())


def _set_aside(target: Path, aside: Path) -> list[Path]:
    """Move `target` and its -wal, -shm and -journal into `aside`; return where they went.
    A -wal left behind would be replayed into the restored file."""
    moved = []
    for file in (target, *(target.with_name(target.name + s) for s in ("-wal", "-shm", "-journal"))):
        if file.exists():
            aside.mkdir(mode=0o700, exist_ok=True)
            shutil.move(file, aside / file.name)
            moved.append(aside / file.name)
    if moved:
        _fsync_dir(target.parent)
    return moved


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp(timestamp: float) -> str:
    """A UTC time as backup names carry it: sortable, to the microsecond."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="milliseconds")
