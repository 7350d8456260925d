"""The `agentd` command: parse arguments, call into the daemon or its HTTP API, set the exit code.

Exit codes: 0 success (for `run`: a completed stop), 1 the operation failed (daemon
unreachable, start failed, a stop that overran its bound), 2 bad configuration or usage,
141 the reader of stdout went away (`agentd tasks list | head`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import aiohttp

from agentd import __version__
from agentd.config import (
    LOCAL_MEMORY,
    ClientConfig,
    Config,
    find_config_path,
    load_client_config,
    load_config,
    redact_url,
    unused_settings,
)
from agentd.errors import AgentdError, ConfigError
from agentd.log import configure_logging
from agentd.taskqueue import FINAL_STATES, TaskStatus

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool killed by SIGPIPE

_DESCRIPTION = """\
agentd runs AI agents and their background work (schedules, a durable task queue, event
handlers, long-term memory) in one process with one SQLite file. `agentd run` starts the
daemon; most other commands ask a running daemon over its HTTP API, at the address and
with the token of the same configuration. `check-config`, `store copy`, `memory reembed`,
`backup` and `restore` work on the configuration and the files themselves."""

_EPILOG = """\
examples:
  agentd check-config                   would `agentd run` start cleanly?
  agentd run                            run the daemon in the foreground (Ctrl-C stops it)
  agentd submit hello.greet --args '{"name": "Ada"}' --wait
  agentd tasks list --status failed | head
  agentd schedules add nightly --cron '0 3 * * *' --task reports.build
  agentd reload                         apply an edited agentd.toml without a restart
  agentd store copy --to postgresql://agentd@db.example/agentd   (daemon stopped)
  agentd backup /var/backups/agentd     a consistent copy, the daemon running or not
  agentd restore /var/backups/agentd/agentd-backup-20270125T080000.000000Z   (daemon stopped)

configuration: --config PATH, else $AGENTD_CONFIG, else ./agentd.toml, else the built-in
defaults; any key can be overridden as AGENTD_<SECTION>_<KEY> (e.g. AGENTD_SERVER_PORT=9000).

exit codes: 0 success, 1 the operation failed, 2 bad configuration or usage.
`agentd COMMAND --help` describes one command."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentd", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"agentd {__version__}")
    config_help = "agentd.toml to use (default: $AGENTD_CONFIG, else ./agentd.toml)"
    parser.add_argument("--config", metavar="PATH", help=config_help)
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS keeps a --config given before the command when none is given after it.
    common.add_argument("--config", metavar="PATH", help=config_help, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    run = sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    run.add_argument("--no-safe-mode", action="store_true",
                     help="start normally even if the last starts crashed, forgetting them "
                          "(leaves safe mode: docs/operations.md, Safe mode)")
    sub.add_parser("check-config", parents=[common],
                   help="build what `run` would (plugins, schedules), without serving")
    sub.add_parser("status", parents=[common], help="ask the running daemon how it is")
    sub.add_parser("reload", parents=[common], description=_RELOAD_DESCRIPTION,
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   help="make the running daemon re-read agentd.toml")
    plugins = sub.add_parser("plugins", parents=[common], help="manage the running daemon's plugins")
    plugin_verbs = plugins.add_subparsers(dest="action", required=True)
    plugin_verbs.add_parser(
        "reload", parents=[common],
        help="reload one plugin from its file (new tasks run the new code)").add_argument("name")

    _task_commands(sub, common)
    _schedule_commands(sub, common)
    _memory_commands(sub, common)
    _store_commands(sub, common)
    _backup_commands(sub, common)
    return parser


def _task_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """`agentd submit` and `agentd tasks ...`."""
    submit = sub.add_parser("submit", parents=[common], help="enqueue a task on the running daemon")
    submit.add_argument("name", help="a registered task name, e.g. news.refresh")
    submit.add_argument("--args", default="{}", metavar="JSON", help="keyword arguments as a JSON object")
    submit.add_argument("--queue")
    submit.add_argument("--priority", type=int)
    submit.add_argument("--delay", type=float, metavar="SECONDS")
    submit.add_argument("--key", dest="idempotency_key", metavar="IDEMPOTENCY_KEY")
    submit.add_argument("--max-attempts", type=int)
    submit.add_argument("--timeout", type=float, metavar="SECONDS")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the result; exit 1 if the task does not succeed")

    tasks = sub.add_parser("tasks", parents=[common], help="inspect and manage tasks")
    actions = tasks.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", parents=[common], help="newest first")
    listing.add_argument("--status", choices=get_args(TaskStatus),
                         help="only tasks in this state (refused before asking the daemon)")
    listing.add_argument("--name")
    listing.add_argument("--queue")
    listing.add_argument("--limit", type=int, default=20)
    for action, text in (("show", "one task with its children"), ("cancel", "cancel a task and its children"),
                         ("requeue", "run a dead, failed or cancelled task again"),
                         ("delete", "delete a finished task")):
        actions.add_parser(action, parents=[common], help=text).add_argument("id", type=int)
    answer = actions.add_parser("answer", parents=[common],
                                help="answer the question a waiting task asks (ctx.ask)")
    answer.add_argument("id", type=int)
    answer.add_argument("answer", help="the answer: JSON (true, 3, {...}), else taken as text")


def _schedule_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """`agentd schedules ...`."""
    schedules = sub.add_parser("schedules", parents=[common], help="inspect and manage schedules")
    verbs = schedules.add_subparsers(dest="action", required=True)
    verbs.add_parser("list", parents=[common], help="every schedule with its record")
    add = verbs.add_parser("add", parents=[common], help="create a schedule (kept across restarts)")
    add.add_argument("id")
    when = add.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", help="an interval: 30s, 30m, 1h30m, 2d")
    when.add_argument("--cron", help="5 fields, e.g. '0 9 * * 1-5'")
    when.add_argument("--at", help="once, at an ISO 8601 date and time")
    add.add_argument("--timezone")
    what = add.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="the task to enqueue")
    what.add_argument("--event", help="the event topic to publish")
    add.add_argument("--args", metavar="JSON", help="the task's arguments")
    add.add_argument("--data", metavar="JSON", help="the event's data")
    add.add_argument("--catch-up", choices=["skip", "once", "all"])
    add.add_argument("--overlap", choices=["allow", "skip", "queue_one", "cancel_previous"])
    add.add_argument("--grace")
    add.add_argument("--jitter")
    add.add_argument("--pause-after-failures", type=int)
    for action, text in (("pause", "stop firing"), ("resume", "fire again from now on"),
                         ("run", "fire once now"), ("rm", "delete a schedule made over the API")):
        verbs.add_parser(action, parents=[common], help=text).add_argument("id")


def _memory_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """`agentd memory ...`."""
    memory = sub.add_parser("memory", parents=[common], help="long-term memory")
    memory_verbs = memory.add_subparsers(dest="action", required=True)
    add_memory = memory_verbs.add_parser("add", parents=[common], help="remember a text")
    add_memory.add_argument("text")
    add_memory.add_argument("--namespace", default="default")
    add_memory.add_argument("--metadata", metavar="JSON")
    add_memory.add_argument("--ttl", type=float, metavar="SECONDS")
    find = memory_verbs.add_parser("search", parents=[common], help="recall by meaning")
    find.add_argument("query")
    find.add_argument("--namespace", default="default")
    find.add_argument("-k", type=int, default=5)
    find.add_argument("--where", metavar="JSON")
    find.add_argument("--hybrid", action="store_true", help="fuse with keyword ranking")
    memory_verbs.add_parser("forget", parents=[common], help="forget a memory").add_argument("id", type=int)
    memory_verbs.add_parser("stats", parents=[common], help="memories per namespace, sessions")
    memory_verbs.add_parser("reembed", parents=[common],
                            help="rebuild every vector with the configured embedder (daemon stopped)")
    load = memory_verbs.add_parser(
        "import", parents=[common], help="remember every line of a JSON-lines file",
        description=_IMPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    load.add_argument("file", help="JSON lines ('-': standard input)")
    load.add_argument("--namespace", help="for lines that name none (default: 'default')")
    load.add_argument("--batch", type=int, default=256, metavar="N",
                      help="memories per request (default 256)")
    load.add_argument("--quiet", action="store_true", help="no progress bar")


_IMPORT_DESCRIPTION = """\
Remember every line of FILE through the running daemon (POST /v1/memory/batch), in order,
in batches, with a progress bar on a terminal. Each line is a JSON object with "text" and
optionally "namespace", "metadata", "expires_at" or "ttl", or a bare JSON string. The file
is checked whole first: a malformed line stores nothing. Importing again is safe: lines
already stored come back as duplicates (exact, or within [memory] dedupe_threshold).

exit codes: 0 imported, 1 the daemon failed or stopped answering part way (the message
says how many lines were stored), 2 a line of the file (or the daemon, about one) is wrong."""


_RELOAD_DESCRIPTION = """\
Ask the running daemon to read its agentd.toml again, as `systemctl reload agentd` (SIGHUP)
does, and print what it did: the changed keys applied live and those that need a restart.
A file with an error is refused whole: the daemon runs on as it was.

exit codes: 0 reloaded, 1 reloaded but a plugin or the schedules failed to follow (named in
`errors`), or no daemon answers, 2 the file was refused (its error is printed)."""

_COPY_DESCRIPTION = """\
Copy this configuration's agentd.db ([store] path) into a PostgreSQL database, so that
one or more daemons can run on it: tasks (ids, statuses, results, steps), schedules,
digest cursors, hook deliveries, the stream token key and the event log. Stop the daemon
first: the copy reads the file at rest and refuses while a daemon holds it. The target
database must exist; it is migrated, then filled in one transaction (a failure leaves it
as it was). A target that already holds agentd data is refused unless --force, which
deletes that data first. The SQLite files are only read.

memory.db ([memory] path: sessions, their messages, long-term memories with their
history and vectors) goes to the database of [memory] url if set, else to --to's. The
vectors are moved, not embedded again: daemons with the same embedder recall the copied
memories as they were (another embedder needs `agentd memory reembed`).

exit codes: 0 copied, 1 the copy failed or was refused (daemon running, target not
empty, PostgreSQL unreachable), 2 a bad --to URL or configuration."""


def _store_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """`agentd store ...`."""
    store = sub.add_parser("store", parents=[common], help="move agentd.db and memory.db to PostgreSQL")
    verbs = store.add_subparsers(dest="action", required=True)
    copy = verbs.add_parser("copy", parents=[common], description=_COPY_DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            help="copy agentd.db and memory.db into PostgreSQL (daemon stopped)")
    copy.add_argument("--to", required=True, metavar="URL",
                      help="the target database, postgresql://user:password@host:port/dbname")
    copy.add_argument("--force", action="store_true",
                      help="replace the agentd data the target holds instead of refusing")


_BACKUP_DESCRIPTION = """\
Back up agentd.db ([store] path) and memory.db ([memory] path) into a new directory
agentd-backup-<UTC time> in DIR (default: [backup] dir), with a manifest.json (agentd
version, time, each file's schema version, size and sha256). Each file is copied in one
snapshot while the daemon goes on serving and writing: the backup holds every task
committed before it began. It works with the daemon stopped too. A backup that fails or
is interrupted leaves only a hidden .agentd-backup-*.partial directory, never one that
looks complete.

On PostgreSQL ([store] url) use pg_dump or pg_basebackup instead: see docs/operations.md.

exit codes: 0 backed up, 1 the backup failed (PostgreSQL store, unreadable database,
unwritable DIR), 2 no DIR and no [backup] dir, or a bad configuration."""

_RESTORE_DESCRIPTION = """\
Put a backup made by `agentd backup` (or [backup]'s schedule) in place of this
configuration's agentd.db and memory.db. Stop the daemon first: the restore refuses while
one holds the files. The backup is checked before anything is replaced: every file's size
and sha256 against its manifest, PRAGMA integrity_check, and a schema this agentd knows.
The files replaced (with their -wal and -shm) are moved into replaced-<UTC time>/ beside
them, not deleted. --check stops after the checks.

exit codes: 0 restored (or checked), 1 refused or failed (daemon running, damaged or
incomplete backup, PostgreSQL store), 2 a bad configuration."""


def _backup_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """`agentd backup` and `agentd restore`."""
    backup = sub.add_parser("backup", parents=[common], description=_BACKUP_DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            help="back up agentd.db and memory.db (daemon running or not)")
    backup.add_argument("dir", nargs="?", metavar="DIR",
                        help="where the backup directory is made (default: [backup] dir)")
    restore = sub.add_parser("restore", parents=[common], description=_RESTORE_DESCRIPTION,
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             help="put a backup back (daemon stopped)")
    restore.add_argument("backup", metavar="BACKUP", help="a backup directory (agentd-backup-...)")
    restore.add_argument("--check", action="store_true",
                         help="only check the backup; replace nothing")


def main(argv: Sequence[str] | None = None) -> int:
    """The `agentd` command; returns the exit code."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, where a closed pipe can still be handled (--help too)
    except BrokenPipeError:
        # The reader went away (`agentd tasks list | head`): stop without a traceback, as a
        # tool killed by SIGPIPE would. stdout now points at /dev/null, or Python's own
        # flush at exit would fail again (the Python docs' recipe, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    path = find_config_path(args.config)
    try:
        if args.command == "check-config":
            return asyncio.run(_check_config(load_config(path)))
        if args.command == "run":
            return _run(load_config(path), leave_safe_mode=args.no_safe_mode)
        if args.command == "memory" and args.action == "reembed":
            return asyncio.run(_reembed(load_config(path)))
        if args.command == "store":
            return asyncio.run(_store_copy(load_config(path), args.to, args.force))
        if args.command == "backup":
            return _backup(load_config(path), args.dir)
        if args.command == "restore":
            return _restore(load_config(path), args.backup, args.check)
        # A client of the daemon reads the API token and no other secret.
        return asyncio.run(_remote(load_client_config(path), args))
    except ConfigError as exc:
        print(f"agentd: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE


async def _check_config(config: Config) -> int:
    """Build what `agentd run` builds, short of serving (see `Daemon.check`): exit 2 for
    what `run` would refuse (a ConfigError, raised), 1 for plugins `run` would fail, each
    named with its file; a missing plugin directory is only a warning."""
    from agentd.app import Daemon

    daemon = Daemon(config)
    # Warnings and errors (a plugin's import traceback) go to stderr; stdout keeps the verdict.
    configure_logging("warning", config.log.format, sys.stderr)
    await daemon.check()
    for unused in unused_settings(config):
        print(f"agentd: warning: {unused}", file=sys.stderr)
    for warning in daemon.plugins.warnings:
        print(f"agentd: warning: {warning['message']}", file=sys.stderr)
    failed = [p for p in daemon.plugins.plugins.values() if p.state == "failed"]
    for record in failed:
        print(f"agentd: plugin {record.name} ({record.source}) would fail: {record.error}",
              file=sys.stderr)
    if failed:
        print(f"{config.source}: {len(failed)} plugin(s) would fail; the daemon would run "
              "without them", file=sys.stderr)
        return EXIT_FAILED
    database = redact_url(config.store.url) if config.store.url else config.database_path
    print(f"{config.source}: ok (database {database}, "
          f"listening on {config.server.host}:{config.server.port})")
    return 0


def _run(config: Config, leave_safe_mode: bool) -> int:
    from agentd.app import serve

    configure_logging(config.log.level, config.log.format)
    try:
        asyncio.run(serve(config, leave_safe_mode))
    except ConfigError:
        raise
    except (AgentdError, OSError) as exc:
        print(f"agentd: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


class _ApiError(Exception):
    """The daemon answered with an error (its message is printed) or did not answer."""

    def __init__(self, message: str, exit_code: int, status: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status  # the daemon's HTTP status, None when it did not answer


class _Api:
    """A small client of the running daemon's HTTP API."""

    def __init__(self, config: ClientConfig, session: aiohttp.ClientSession) -> None:
        host = config.host if config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        self.base = f"http://{f'[{host}]' if ':' in host else host}:{config.port}"
        self.headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        self.session = session

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self.session.request(
                method, self.base + path, json=body, headers=self.headers
            ) as response:
                if response.status != 204 and response.content_type != "application/json":
                    # Something else answers there (a proxy's error page, another server).
                    raise _ApiError(f"{self.base} answered HTTP {response.status} with "
                                    f"{response.content_type or 'no content type'}, not agentd's "
                                    "JSON: is the daemon behind it running?", EXIT_FAILED)
                payload = await response.json() if response.status != 204 else None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _ApiError(f"no daemon answers at {self.base}: {exc}", EXIT_FAILED) from exc
        if response.status >= 400:
            error = (payload or {}).get("error", {})
            code = EXIT_USAGE if response.status in (400, 404, 409) else EXIT_FAILED
            raise _ApiError(f"{error.get('message', response.reason)} (HTTP {response.status})", code,
                            response.status)
        return payload


async def _remote(config: ClientConfig, args: argparse.Namespace) -> int:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        api = _Api(config, session)
        try:
            if args.command == "status":
                status = await api.call("GET", "/v1/status")
                _print(status)
                if status.get("safe_mode"):
                    print(_safe_mode_notice(status["safe_mode"]), file=sys.stderr)
                return 0
            if args.command == "submit":
                return await _submit(api, args)
            if args.command == "schedules":
                return await _schedules(api, args)
            if args.command == "memory":
                return await _memory(api, args)
            if args.command in ("reload", "plugins"):
                return await _reload(api, args)
            return await _tasks(api, args)
        except _ApiError as exc:
            print(f"agentd: {exc}", file=sys.stderr)
            return exc.exit_code


async def _reload(api: _Api, args: argparse.Namespace) -> int:
    """`agentd reload` and `agentd plugins reload NAME`."""
    if args.command == "plugins":
        result = await api.call("POST", f"/v1/plugins/{urllib.parse.quote(args.name, safe='')}/reload")
        _print(result)
        return 0 if result["state"] == "started" and result["schedules_error"] is None else EXIT_FAILED
    try:
        outcome = await api.call("POST", "/v1/reload")
    except _ApiError as exc:
        if exc.status == 422:
            raise _ApiError(f"reload refused, the daemon runs on as it was: {exc}", EXIT_USAGE,
                            exc.status) from None
        if exc.status == 401:
            raise _ApiError(f"{exc}; if the new agentd.toml changes the token, reload with "
                            "`systemctl reload agentd` (SIGHUP) instead", EXIT_FAILED, exc.status) from None
        raise
    _print(outcome)
    if outcome["restart_required"]:
        print(f"agentd: restart agentd to apply: {', '.join(outcome['restart_required'])}",
              file=sys.stderr)
    for what, error in outcome["errors"].items():
        print(f"agentd: {what}: {error}", file=sys.stderr)
    return EXIT_FAILED if outcome["errors"] else 0


async def _submit(api: _Api, args: argparse.Namespace) -> int:
    try:
        task_args = json.loads(args.args)
    except json.JSONDecodeError as exc:
        raise _ApiError(f"--args is not valid JSON: {exc}", EXIT_USAGE) from exc
    body = {"name": args.name, "args": task_args}
    for option in ("queue", "priority", "delay", "idempotency_key", "max_attempts", "timeout"):
        if getattr(args, option) is not None:
            body[option] = getattr(args, option)
    task = await api.call("POST", "/v1/tasks", body)
    if not args.wait:
        _print(task)
        return 0
    while task["status"] not in FINAL_STATES:
        task = await api.call("GET", f"/v1/tasks/{task['id']}?wait=60")
    _print(task)
    return 0 if task["status"] == "succeeded" else EXIT_FAILED


async def _tasks(api: _Api, args: argparse.Namespace) -> int:
    if args.action == "list":
        query = {k: v for k in ("status", "name", "queue") if (v := getattr(args, k)) is not None}
        query["limit"] = str(args.limit)
        page = await api.call("GET", "/v1/tasks?" + urllib.parse.urlencode(query))
        for task in page["tasks"]:
            print(f"{task['id']:>8}  {task['status']:<10} {task['name']:<30} "
                  f"attempts {task['attempts']}/{task['max_attempts']}")
        return 0
    if args.action == "answer":
        try:
            given = json.loads(args.answer)
        except json.JSONDecodeError:
            given = args.answer  # plain text: `agentd tasks answer 12 yes`
        _print(await api.call("POST", f"/v1/tasks/{args.id}/answer", {"answer": given}))
        return 0
    method, path = {
        "show": ("GET", "/v1/tasks/{}"), "cancel": ("POST", "/v1/tasks/{}/cancel"),
        "requeue": ("POST", "/v1/tasks/{}/requeue"), "delete": ("DELETE", "/v1/tasks/{}"),
    }[args.action]
    result = await api.call(method, path.format(args.id))
    if result is not None:
        _print(result)
    return 0


async def _schedules(api: _Api, args: argparse.Namespace) -> int:
    if args.action == "list":
        for item in (await api.call("GET", "/v1/schedules"))["schedules"]:
            trigger = item.get("cron") or (f"every {item['every']:g}s" if "every" in item else
                                           f"at {item.get('at')}")
            action = item.get("task") or f"event {item.get('event')}"
            state = "paused" if item["paused"] else f"next {_when(item['next_fire'])}"
            print(f"{item['id']:<28} {item['source']:<8} {trigger:<18} {action:<24} {state}  "
                  f"fires {item['fires']} misses {item['misses']} last {item['last_outcome'] or '-'}")
        return 0
    if args.action == "add":
        body: dict[str, Any] = {"id": args.id}
        for option in ("every", "cron", "at", "timezone", "task", "event", "catch_up", "overlap",
                       "grace", "jitter", "pause_after_failures"):
            if getattr(args, option) is not None:
                body[option] = getattr(args, option)
        for option in ("args", "data"):
            if getattr(args, option) is not None:
                try:
                    body[option] = json.loads(getattr(args, option))
                except json.JSONDecodeError as exc:
                    raise _ApiError(f"--{option} is not valid JSON: {exc}", EXIT_USAGE) from exc
        _print(await api.call("POST", "/v1/schedules", body))
        return 0
    method, path = {
        "pause": ("POST", "/v1/schedules/{}/pause"), "resume": ("POST", "/v1/schedules/{}/resume"),
        "run": ("POST", "/v1/schedules/{}/run"), "rm": ("DELETE", "/v1/schedules/{}"),
    }[args.action]
    result = await api.call(method, path.format(args.id))
    if result is not None:
        _print(result)
    return 0


async def _memory(api: _Api, args: argparse.Namespace) -> int:
    if args.action == "add":
        body: dict[str, Any] = {"text": args.text, "namespace": args.namespace}
        if args.metadata:
            body["metadata"] = _json_option(args.metadata, "--metadata")
        if args.ttl is not None:
            body["ttl"] = args.ttl
        _print(await api.call("POST", "/v1/memory", body))
    elif args.action == "search":
        query = {"q": args.query, "namespace": args.namespace, "k": str(args.k),
                 "hybrid": "true" if args.hybrid else "false"}
        if args.where:
            query["where"] = json.dumps(_json_option(args.where, "--where"))
        found = await api.call("GET", "/v1/memory/search?" + urllib.parse.urlencode(query))
        for item in found["results"]:
            print(f"{item['id']:>6}  {item['score']:.4f}  {item['text']}")
    elif args.action == "import":
        return await _import_memories(api, args)
    elif args.action == "forget":
        await api.call("DELETE", f"/v1/memory/{args.id}")
    else:
        _print(await api.call("GET", "/v1/memory/stats"))
    return 0


async def _import_memories(api: _Api, args: argparse.Namespace) -> int:
    """`agentd memory import FILE`: see `agentd.memory_import`."""
    from agentd.memory_import import ImportFileError, ImportStoppedError, Progress, import_lines, read_file

    if args.batch < 1:
        raise _ApiError(f"--batch: expected at least 1 memory per request, got {args.batch}", EXIT_USAGE)
    try:
        name, lines = await asyncio.to_thread(read_file, args.file, args.namespace)
    except ImportFileError as exc:
        raise _ApiError(f"{exc}; nothing was imported", EXIT_USAGE) from None

    async def send(items: list[dict[str, Any]]) -> dict[str, Any]:
        answer: dict[str, Any] = await api.call("POST", "/v1/memory/batch", {"memories": items})
        return answer

    progress = None if args.quiet or not lines else Progress(len(lines))
    try:
        outcome = await import_lines(lines, send, name, size=args.batch, progress=progress)
    except ImportStoppedError as exc:
        cause = exc.__cause__
        raise _ApiError(str(exc), cause.exit_code if isinstance(cause, _ApiError) else EXIT_FAILED) from None
    print(f"imported {name}: {outcome.lines:,} lines, {outcome.created:,} new memories, "
          f"{outcome.duplicates:,} duplicates")
    return 0


def _json_option(text: str, option: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _ApiError(f"{option} is not valid JSON: {exc}", EXIT_USAGE) from exc


async def _reembed(config: Config) -> int:
    """Rebuild memory.db's vectors in this process: the daemon must be stopped (it holds
    the file), which is also when a changed embedder stops it from starting."""
    from agentd.embed import build_embedder
    from agentd.storage import open_memory

    configure_logging(config.log.level, config.log.format, sys.stderr)
    # Built-in embedders only: a plugin's embedder exists once its plugin is loaded.
    embedder = build_embedder(config, {})
    memory = open_memory(config, embedder)
    try:
        await memory.open(check_embedder=False)
    except AgentdError as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        count = await memory.reembed()
    finally:
        await memory.close()
    print(f"re-embedded {count} memories with {embedder.id} ({embedder.dimension} dimensions)")
    return 0


async def _store_copy(config: Config, url: str, force: bool) -> int:
    """`agentd store copy`: see `agentd.store.copy`."""
    from agentd.postgres.memory import PgMemory
    from agentd.store.copy import MemorySource, copy_to_postgres

    configure_logging("warning", config.log.format, sys.stderr)
    # Memory kept local (`[memory] url = "sqlite"`) stays where it is.
    memory = (None if config.memory.url == LOCAL_MEMORY
              else MemorySource(config.memory_path, config.memory, PgMemory))
    try:
        report = await copy_to_postgres(config.database_path, url, memory=memory, force=force)
    except ConfigError:
        raise
    except AgentdError as exc:
        print(f"agentd: store copy: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"copied {report.source} to {report.target} in {report.seconds:.1f} s; rows per table:")
    for table, count in report.rows.items():
        print(f"  {table:<16} {count:>10}")
    if report.memory is None:
        print(f"no memory.db at {config.memory_path}: there was no memory to copy")
    else:
        moved = report.memory
        print(f"copied {moved.source} to {moved.target} with its vectors ({moved.embedder}, "
              f"{moved.dimension} dimensions); rows per table:")
        for table, count in moved.rows.items():
            print(f"  {table:<16} {count:>10}")
    if report.replaced:
        print("replaced (--force) what the target held: " +
              ", ".join(f"{count} {table}" for table, count in report.replaced.items()))
    where = config.source if config.source != "<defaults>" else "agentd.toml"
    password = " with its password" if report.target != url else ""
    print(f"next: set [store] url = \"{report.target}\"{password} in {where} (or AGENTD_STORE_URL), "
          "then start the daemon(s). The SQLite files were left as they were.")
    return 0


def _backup(config: Config, directory: str | None) -> int:
    """`agentd backup`: see `agentd.backup`."""
    from agentd import backup

    if directory is None and config.backup_dir is None:
        print("agentd: backup: name the directory to back up into (agentd backup DIR), or set "
              f"[backup] dir in {config.source}", file=sys.stderr)
        return EXIT_USAGE
    target = config.backup_dir if directory is None else Path(directory).absolute()
    assert target is not None
    try:
        made = backup.make_backup(backup.sources(config), target, made_by="command",
                                  version=__version__)
    except AgentdError as exc:
        print(f"agentd: backup: {exc}", file=sys.stderr)
        return EXIT_FAILED
    files = ", ".join(f"{file.name} ({_size(file.bytes)})" for file in made.manifest.files)
    print(f"backed up {files} to {made.path} in {made.manifest.seconds:.1f} s")
    if config.memory_url:
        print("memory is in PostgreSQL ([memory] url): back it up with pg_dump")
    elif not any(file.role == "memory" for file in made.manifest.files):
        print(f"no memory.db at {config.memory_path}: there was no memory to back up")
    return 0


def _restore(config: Config, path: str, check_only: bool) -> int:
    """`agentd restore`: see `agentd.backup`."""
    from agentd import backup

    try:
        if check_only:
            checked = backup.verify(Path(path))
            print(f"{checked.path}: ok, made {checked.manifest.created_at} by agentd "
                  f"{checked.manifest.agentd_version}: " +
                  ", ".join(f"{file.name} (schema {file.schema_version}, {_size(file.bytes)})"
                            for file in checked.manifest.files))
            return 0
        done = backup.restore(Path(path), config)
    except AgentdError as exc:
        print(f"agentd: restore: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"restored {done.backup.path} (made {done.backup.manifest.created_at}): " +
          ", ".join(str(target) for target in done.restored))
    if done.aside is not None:
        print(f"the files it replaced are in {done.aside}: " +
              ", ".join(moved.name for moved in done.set_aside))
    for note in done.notes:
        print(note)
    return 0


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count} bytes"


def _safe_mode_notice(safe_mode: dict[str, Any]) -> str:
    """What `agentd status` says, besides the JSON, of a daemon serving in safe mode."""
    if safe_mode.get("cleared"):
        return ("agentd: the daemon serves in safe mode, cleared: it starts normally once "
                "restarted")
    return (f"agentd: the daemon serves in safe mode since {_when(safe_mode['since'])}: "
            f"{safe_mode['reason']}. Fix the cause, then restart it with `agentd run "
            "--no-safe-mode` (or POST /v1/safe-mode/clear and restart it).")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _print(payload: Any) -> None:
    print(json.dumps(payload, indent=2))
