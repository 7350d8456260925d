"""Task-queue benchmark: agentd against Huey (SQLite) and Dramatiq (Redis), same run, same machine.

    python3 bench/queue_bench.py [--tasks 20000] [--latency-tasks 1000]
                                 [--only agentd,huey,dramatiq] [--quick]

Prints one JSON line per figure set on stdout, then a markdown table on stderr.
See bench/README.md for what each figure means and how it is measured.

Workloads:
  noop_<N>      N no-op tasks, measured in two runs on fresh state:
                concurrent: the workers run while the tasks are enqueued
                  enqueue_rate = N / (last enqueue returned - first enqueue began)
                  e2e_s        = last completion - first enqueue began; e2e_rate = N / e2e_s
                  tail_s       = last completion - last enqueue returned
                backlog: all N enqueued while no worker can take them, then released
                  enqueue_rate_idle = N / enqueue time with idle workers
                  processing_rate   = N / (last completion - first task start)
  dispatch_<N>  N stamp tasks enqueued one at a time with an idle worker, each awaited
                before the next; latency = task start - enqueue call (p50/p99/mean/max)

agentd runs in this process (agentd.testing.running_daemon, bench/plugins/benchtasks.py).
The peers run in bench/.venv-peers (created on first use) as subprocesses: a producer
(bench/peers/peer_driver.py) that starts and stops the peer's worker process.
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
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from machine import BenchRun

HERE = Path(__file__).resolve().parent
PLUGINS = HERE / "plugins"
PEERS = HERE / "peers"
VENV = HERE / ".venv-peers"
VENV_PYTHON = VENV / "bin" / "python"
REQUIREMENTS = PEERS / "requirements.txt"

SYSTEMS = ("agentd", "huey", "dramatiq")
PEER_SYSTEM = {"huey": "huey-sqlite", "dramatiq": "dramatiq-redis"}
CHUNK = 1000  # tasks per enqueue_many call
CALLERS = 100  # concurrent callers in agentd's one-task-per-call variant
WARMUP = 10  # dispatch tasks run (and not counted) before the measured ones
HOLD = 3600.0  # agentd backlog runs enqueue with this delay, then make them due at once


def main() -> int:
    args = parse_args()
    run = BenchRun("queue_bench", ours=redis_cpu)
    if "agentd" in args.only:
        run_agentd(args, run.emit)
    peers = [s for s in ("huey", "dramatiq") if s in args.only]
    if peers:
        python, problem = ensure_venv()
        for system in peers:
            run_peer(args, system, python, problem, run.emit)
    print(markdown(run.rows, args, run.elapsed, run.revision, run.load.report()), file=sys.stderr)
    return run.exit_code


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, help="no-op tasks per throughput run (default 20000)")
    parser.add_argument("--latency-tasks", type=int, help="measured dispatch tasks (default 1000)")
    parser.add_argument("--only", default=",".join(SYSTEMS),
                        help="comma-separated subset of agentd,huey,dramatiq (default all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2000 tasks and 100 dispatch tasks unless given")
    parser.add_argument("--workers", type=int, default=8,
                        help="peers' worker threads (default 8, agentd's default slot count "
                             "until it became 1,000)")
    parser.add_argument("--agentd-workers", type=int, default=None,
                        help="agentd's workers on the default queue (default: agentd's default "
                             "configuration, 1000); more workers put more tasks in each transaction")
    parser.add_argument("--dramatiq-processes", type=int, default=os.cpu_count() or 1,
                        help="Dramatiq worker processes, each with --workers threads (default: "
                             "one per core, Dramatiq's own default)")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds one run may take before it is killed and reported (default 240)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13",
                        help="Dramatiq's Redis (loopback only; its keys are deleted after each run)")
    args = parser.parse_args()
    args.tasks = args.tasks or (2000 if args.quick else 20000)
    args.latency_tasks = args.latency_tasks or (100 if args.quick else 1000)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SYSTEMS)
    if unknown or not args.only:
        parser.error(f"--only takes a subset of {','.join(SYSTEMS)}; got {','.join(sorted(unknown))}")
    if args.tasks < 1 or args.latency_tasks < 1:
        parser.error("--tasks and --latency-tasks must be positive")
    host = args.redis_url.split("//", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        parser.error("--redis-url must point to a loopback address")
    return args


def label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def base_row(system: str, workload: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"bench": "queue", "system": system, "workload": f"{workload}_{label(n)}", **extra}


# -- figures ----------------------------------------------------------------------------------


def noop_figures(n: int, concurrent: dict[str, Any], backlog: dict[str, Any]) -> dict[str, Any]:
    """The throughput row's figures from a concurrent run and a backlog run (same clock each)."""
    enqueue_s = concurrent["all_enqueued"] - concurrent["first_enqueue"]
    e2e_s = concurrent["last_done"] - concurrent["first_enqueue"]
    idle_enqueue_s = backlog["all_enqueued"] - backlog["first_enqueue"]
    processing_s = backlog["last_done"] - backlog["first_start"]
    cpu_s = concurrent.get("cpu_s")  # agentd: this process; peers: producer, workers, Redis
    if cpu_s is None:
        cpu_s = (concurrent["cpu_producer_s"] + concurrent["cpu_worker_s"]
                 + concurrent.get("cpu_server_s", 0.0))
    return {
        "enqueue_rate": round(n / enqueue_s),
        "processing_rate": round(n / processing_s),
        "e2e_s": round(e2e_s, 3),
        "e2e_rate": round(n / e2e_s),
        "tail_s": round(concurrent["last_done"] - concurrent["all_enqueued"], 3),
        "enqueue_rate_idle": round(n / idle_enqueue_s),
        "cpu_us_per_task": round(cpu_s / n * 1e6, 1),
        **({"tasks_per_transaction": round(n / concurrent["transactions"], 1)}
           if concurrent.get("transactions") else {}),
    }


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


# -- agentd, in this process ------------------------------------------------------------------


def run_agentd(args: argparse.Namespace, emit: Callable[[dict[str, Any]], None]) -> None:
    from agentd.config import TasksConfig

    n, m = args.tasks, args.latency_tasks
    # The default configuration is measured unless --agentd-workers says otherwise.
    workers = args.agentd_workers or TasksConfig().queues["default"]
    # By default the event log keeps a task's final event, not its queued and started ones.
    # The last variant logs all three ("task.**=durable" first): what those rows cost.
    variants = [("batch", "normal", "final"), ("single", "normal", "final"), ("batch", "full", "final"),
                ("batch", "normal", "all")]
    for enqueue, synchronous, logged in variants:
        row = base_row("agentd", "noop", n, enqueue=describe_enqueue(enqueue),
                       synchronous=synchronous, workers=workers, task_events_logged=logged)
        try:
            concurrent = agentd_run(agentd_noop(n, enqueue, hold=False), synchronous, workers,
                                    args.timeout, log_task_events=logged)
            backlog = agentd_run(agentd_noop(n, enqueue, hold=True), synchronous, workers, args.timeout,
                                 log_task_events=logged)
            row.update(noop_figures(n, concurrent, backlog))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        emit({**row, "tasks": n})
    row = base_row("agentd", "dispatch", m, enqueue="single", synchronous="normal", workers=workers)
    try:
        latencies = agentd_run(agentd_dispatch(m), "normal", workers, args.timeout)
        row.update(latency_figures(latencies))
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    emit({**row, "tasks": m})


def describe_enqueue(kind: str) -> str:
    return f"batch_{CHUNK}" if kind == "batch" else f"single_x{CALLERS}"


Scenario = Callable[[Any], Awaitable[Any]]


def agentd_run(scenario: Scenario, synchronous: str, workers: int, timeout: float, *,
               log_task_events: str = "final") -> Any:
    """Run `scenario(daemon)` against a fresh daemon on a temp dir, bounded by `timeout`."""
    from agentd.config import EventsConfig
    from agentd.testing import running_daemon

    overrides: dict[str, dict[str, Any]] = {
        "store": {"synchronous": synchronous}, "tasks": {"queues": {"default": workers}}}
    if log_task_events == "all":
        overrides["events"] = {"persistence": ["task.**=durable", *EventsConfig().persistence]}

    async def go() -> Any:
        with tempfile.TemporaryDirectory(prefix="agentd-bench-") as tmp:
            async with running_daemon(Path(tmp), plugin_dirs=[PLUGINS], overrides=overrides) as daemon:
                if any(p["state"] != "started" for p in daemon.plugins.states()):
                    raise RuntimeError(f"bench plugin did not start: {daemon.plugins.states()}")
                return await asyncio.wait_for(scenario(daemon), timeout)

    return asyncio.run(go())


def agentd_noop(n: int, enqueue: str, *, hold: bool) -> Scenario:
    """N no-ops. hold=False: processed while being enqueued. hold=True: enqueued `HOLD` s in
    the future, then made due in one UPDATE (the backlog run); processing starts then."""
    from agentd.taskqueue import TaskRequest

    async def scenario(daemon: Any) -> dict[str, Any]:
        done = asyncio.Event()
        state: dict[str, Any] = {"ok": 0, "bad": 0, "first_start": None, "last_done": 0.0}

        def started(_: Any) -> None:
            # Only the first start is a figure: listening on, the bench would have the
            # daemon build and deliver a `task.started` per task that nobody else hears.
            if state["first_start"] is None:
                state["first_start"] = time.perf_counter()
                subs[0].unsubscribe()

        def finished(event: Any) -> None:
            state["ok" if event.topic == "task.succeeded" else "bad"] += 1
            state["last_done"] = time.perf_counter()
            if state["ok"] + state["bad"] == n:
                done.set()

        subs = [daemon.bus.subscribe("task.started", started, name="bench.started")]
        subs += [daemon.bus.subscribe(t, finished, name="bench.finished")
                 for t in ("task.succeeded", "task.failed", "task.dead", "task.cancelled")]
        delay = HOLD if hold else None
        transactions0 = getattr(daemon.store, "transactions", None)  # None: an agentd before it
        cpu0 = time.process_time()
        first_enqueue = time.perf_counter()
        if enqueue == "batch":
            for start in range(0, n, CHUNK):
                size = min(CHUNK, n - start)
                await daemon.queue.enqueue_many([TaskRequest("bench.noop", delay=delay)] * size)
        else:
            async def caller(count: int) -> None:
                for _ in range(count):
                    await daemon.queue.enqueue("bench.noop", delay=delay)

            share, extra = divmod(n, CALLERS)
            await asyncio.gather(*(caller(share + (i < extra)) for i in range(CALLERS)))
        all_enqueued = time.perf_counter()
        if hold:
            now = time.time()
            await daemon.store.write(lambda conn: conn.execute(
                "UPDATE tasks SET run_at = ? WHERE status = 'queued' AND name = 'bench.noop'", (now,)))
            daemon.queue.notify_work("default")
        await done.wait()
        cpu_s = time.process_time() - cpu0
        transactions = None if transactions0 is None else daemon.store.transactions - transactions0
        for sub in subs:
            sub.unsubscribe()
        if state["bad"]:
            raise RuntimeError(f"{state['bad']} of {n} no-op tasks did not succeed")
        return {"first_enqueue": first_enqueue, "all_enqueued": all_enqueued,
                "first_start": state["first_start"], "last_done": state["last_done"], "cpu_s": cpu_s,
                "transactions": transactions}

    return scenario


def agentd_dispatch(m: int) -> Scenario:
    async def scenario(daemon: Any) -> list[float]:
        latencies: list[float] = []
        for i in range(WARMUP + m):
            t0 = time.perf_counter()
            record = await daemon.queue.enqueue("bench.stamp", {"t0": t0})
            latency = await daemon.queue.result(record.id, 10.0)
            if i >= WARMUP:
                latencies.append(latency)
        return latencies

    return scenario


# -- peers, in bench/.venv-peers -------------------------------------------------------------


def ensure_venv() -> tuple[Path, str | None]:
    """bench/.venv-peers with the pinned peers; (python, None) or (python, why it is unusable)."""
    check = [str(VENV_PYTHON), "-c", "import huey, dramatiq, redis"]
    if VENV_PYTHON.exists() and subprocess.run(check, check=False, capture_output=True).returncode == 0:
        return VENV_PYTHON, None
    print(f"queue_bench: creating {VENV} (pip install -r {REQUIREMENTS})", file=sys.stderr)
    steps = [[sys.executable, "-m", "venv", str(VENV)],
             [str(VENV_PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "-r", str(REQUIREMENTS)]]
    for step in steps:
        try:
            proc = subprocess.run(step, check=False, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return VENV_PYTHON, f"{' '.join(step[:4])}: timed out"
        if proc.returncode != 0:
            return VENV_PYTHON, f"{' '.join(step[:4])}: {proc.stderr.strip()[-500:]}"
    return VENV_PYTHON, None


def redis_reachable(url: str) -> str | None:
    hostport = url.split("//", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port or 6379)), 2) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(64).startswith(b"+PONG"):
                return f"no PONG from {hostport}"
    except OSError as exc:
        return f"cannot reach Redis at {hostport}: {exc}"
    return None


def run_peer(args: argparse.Namespace, system: str, python: Path, problem: str | None,
             emit: Callable[[dict[str, Any]], None]) -> None:
    n, m = args.tasks, args.latency_tasks
    name = PEER_SYSTEM[system]
    if problem is None and system == "dramatiq":
        problem = redis_reachable(args.redis_url)
    shape = ({"worker_type": "thread"} if system == "huey"
             else {"processes": args.dramatiq_processes})
    noop = base_row(name, "noop", n, enqueue="single", workers=args.workers, **shape)
    dispatch = base_row(name, "dispatch", m, enqueue="single", workers=args.workers, **shape)
    if problem is not None:
        emit({**noop, "error": problem, "tasks": n})
        emit({**dispatch, "error": problem, "tasks": m})
        return
    try:
        concurrent = peer_run(args, python, system, "concurrent", n)
        backlog = peer_run(args, python, system, "backlog", n)
        noop.update(peer_config(system, concurrent["config"]))
        noop.update(noop_figures(n, concurrent, backlog))
    except PeerError as exc:
        noop["error"] = str(exc)
    emit({**noop, "tasks": n})
    try:
        result = peer_run(args, python, system, "dispatch", m)
        dispatch.update(peer_config(system, result["config"]))
        dispatch.update(latency_figures(result["latencies"]))
    except PeerError as exc:
        dispatch["error"] = str(exc)
    emit({**dispatch, "tasks": m})


def peer_config(system: str, config: dict[str, Any]) -> dict[str, Any]:
    if system == "huey":
        return {"version": config.get("huey"), "worker_type": "thread",
                "synchronous": config.get("synchronous")}
    return {"version": config.get("dramatiq"), "processes": config.get("processes")}


class PeerError(Exception):
    pass


def peer_run(args: argparse.Namespace, python: Path, system: str, mode: str, n: int) -> dict[str, Any]:
    """One peer_driver.py run in a fresh temp dir; its process group and its worker's are
    killed if it outlives `--timeout`."""
    workdir = Path(tempfile.mkdtemp(prefix=f"agentd-bench-{system}-"))
    command = [str(python), str(PEERS / "peer_driver.py"), system, mode, "--tasks", str(n),
               "--warmup", str(WARMUP), "--workdir", str(workdir), "--workers", str(args.workers),
               "--processes", str(args.dramatiq_processes),
               "--deadline", str(max(1.0, args.timeout - 20)), "--redis-url", args.redis_url]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        try:
            out, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.communicate()
            with contextlib.suppress(OSError, ValueError):
                kill_group(int((workdir / "worker.pid").read_text()))
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run([*command[:3], "clean", *command[4:]], check=False, timeout=60,
                               capture_output=True)
            raise PeerError(f"{mode} run killed after {args.timeout:.0f} s") from None
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise PeerError(f"{mode} run exited {proc.returncode}: {err.strip()[-800:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        if not result.get("ok"):
            raise PeerError(f"{mode} run: {result.get('error')}; worker log: "
                            f"{result.get('log_tail', '')[-400:]!r}")
        if mode != "dispatch" and result.get("failed"):
            raise PeerError(f"{mode} run: {result['failed']} of {n} tasks failed")
        return result
    finally:
        with contextlib.suppress(OSError, ValueError):
            kill_group(int((workdir / "worker.pid").read_text()))
        kill_group(proc.pid)
        shutil.rmtree(workdir, ignore_errors=True)


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# -- the machine ------------------------------------------------------------------------------


def redis_cpu() -> float:
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        if head.partition("(")[2] == "redis-server":
            fields = tail.split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- the table --------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, elapsed: float,
             revision: str, load: str) -> str:
    dispatch = {r["system"]: r for r in rows if r["workload"].startswith("dispatch")}
    today = datetime.date.today().isoformat()
    lines = [
        "",
        "---- markdown ----",
        f"Measured {today} on {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{label(args.tasks)} no-op tasks, {args.latency_tasks} dispatch tasks "
        f"({elapsed:.0f} s in all); agentd: {revision}. {load}",
        "",
        "| system | enqueue | enqueue/s | processing/s | end to end | end-to-end/s "
        "| CPU µs/task | dispatch p50 | dispatch p99 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    seen: set[str] = set()
    for row in rows:
        if not row["workload"].startswith("noop"):
            continue
        system = row["system"]
        variant = variant_text(row)
        lat = dispatch.get(system) if system not in seen else None
        seen.add(system)
        if "error" in row:
            cells = ["error: " + row["error"][:60], "", "", "", ""]
        else:
            cells = [f"{row['enqueue_rate']:,}", f"{row['processing_rate']:,}", f"{row['e2e_s']:.2f} s",
                     f"{row['e2e_rate']:,}", f"{row['cpu_us_per_task']:,.0f}"]
        if lat is None:
            cells += ["", ""]
        elif "error" in lat:
            cells += ["error", "error"]
        else:
            cells += [f"{lat['p50_ms']:.2f} ms", f"{lat['p99_ms']:.2f} ms"]
        lines.append(f"| {system} | {variant} | " + " | ".join(cells) + " |")
    lines.append("---- end ----")
    return "\n".join(lines)


def variant_text(row: dict[str, Any]) -> str:
    enqueue = row.get("enqueue", "")
    if enqueue.startswith("batch_"):
        text = f"enqueue_many x {enqueue.removeprefix('batch_')}"
    elif enqueue.startswith("single_x"):
        text = f"1 per call, {enqueue.removeprefix('single_x')} callers"
    else:
        text = "1 per call"
    if row["system"] == "agentd" or row.get("synchronous"):
        text += f", sync={row.get('synchronous')}"
    if row.get("task_events_logged") == "all":
        text += ", every task event logged"
    if row["system"] == "dramatiq-redis":
        text += f", {row.get('processes', 1)} proc x {row['workers']} threads"
    else:
        text += f", {row['workers']} workers"
    return text


if __name__ == "__main__":
    sys.exit(main())
