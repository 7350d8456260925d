"""One peer workload, run by queue_bench.py under bench/.venv-peers' python.

    peer_driver.py {huey,dramatiq} {concurrent,backlog,dispatch} --tasks N --workdir DIR [...]

It starts the peer's worker process (in a session of its own, its pid written to
DIR/worker.pid so queue_bench.py can kill the group if this driver is killed), produces the
workload, stops the worker (SIGINT, then SIGKILL after 5 s) and prints one JSON object:

    concurrent  worker up first, then N no-op tasks enqueued one call each from this process
    backlog     N no-op tasks enqueued with no worker running, then the worker started
    dispatch    worker up and idle; `warmup` + N stamp tasks, each enqueued with its enqueue
                time and its result awaited before the next; the task returns start - enqueue

Times are wall-clock (`time.time()`), which the worker and this process share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=["huey", "dramatiq"])
    parser.add_argument("mode", choices=["concurrent", "backlog", "dispatch", "clean"])
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=8, help="worker threads (per process)")
    parser.add_argument("--processes", type=int, default=1, help="Dramatiq's worker processes")
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds for the whole run")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--redis-namespace", default="agentd-bench-dramatiq")
    args = parser.parse_args()

    deadline = time.monotonic() + args.deadline
    expect = args.tasks + (args.warmup if args.mode == "dispatch" else 0)
    os.environ.update({
        "BENCH_OUT": str(args.workdir),
        "BENCH_EXPECT": str(expect),
        "BENCH_HUEY_DB": str(args.workdir / "huey.db"),
        "BENCH_REDIS_URL": args.redis_url,
        "BENCH_REDIS_NS": args.redis_namespace,
        "BENCH_RESULTS": "1" if args.mode == "dispatch" else "0",
        "PYTHONPATH": str(HERE),
    })
    sys.path.insert(0, str(HERE))
    peer = HueyPeer(args) if args.system == "huey" else DramatiqPeer(args)
    if args.mode == "clean":  # after a run that had to be killed
        peer.clean()
        return 0
    worker = Worker(peer.worker_command(), args.workdir,
                    args.processes if args.system == "dramatiq" else 1)
    try:
        peer.clean()
        result = run(args, peer, worker, deadline)
        result["ok"] = True
    except Exception as exc:  # reported as the run's error line, not a traceback
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "log_tail": worker.log_tail()}
    finally:
        worker.stop()
        try:
            peer.clean()
        except Exception as exc:
            print(f"peer_driver: cleanup failed: {exc}", file=sys.stderr)
    result["config"] = peer.config()
    print(json.dumps(result))
    return 0


def run(args: argparse.Namespace, peer: Any, worker: Worker, deadline: float) -> dict[str, Any]:
    n = args.tasks
    out: dict[str, Any] = {"mode": args.mode, "tasks": n}
    if args.mode == "backlog":
        cpu0 = time.process_time()
        out["first_enqueue"] = time.time()
        for _ in range(n):
            peer.enqueue_noop()
        out["all_enqueued"] = time.time()
        out["cpu_producer_s"] = time.process_time() - cpu0
        worker.start(deadline)
        cpu_worker0 = worker.cpu_seconds()
        done = wait_done(args.workdir, n, worker, deadline)
        out["cpu_worker_s"] = worker.cpu_seconds() - cpu_worker0
        out.update(done)
        return out

    worker.start(deadline)
    if args.mode == "concurrent":
        cpu_worker0, cpu0 = worker.cpu_seconds(), time.process_time()
        cpu_server0 = peer.server_cpu_seconds()
        out["first_enqueue"] = time.time()
        for _ in range(n):
            peer.enqueue_noop()
        out["all_enqueued"] = time.time()
        done = wait_done(args.workdir, n, worker, deadline)
        out["cpu_producer_s"] = time.process_time() - cpu0
        out["cpu_worker_s"] = worker.cpu_seconds() - cpu_worker0
        out["cpu_server_s"] = peer.server_cpu_seconds() - cpu_server0
        out.update(done)
        return out

    latencies = []
    for i in range(args.warmup + n):
        if time.monotonic() > deadline:
            raise BenchError(f"deadline passed after {i} of {args.warmup + n} dispatch tasks")
        t0 = time.time()
        latency = peer.stamp_and_wait(t0, min(10.0, deadline - time.monotonic()))
        if i >= args.warmup:
            latencies.append(latency)
    out["latencies"] = latencies
    return out


def wait_done(workdir: Path, expect: int, worker: Worker, deadline: float) -> dict[str, Any]:
    """Wait until the worker processes' progress files add up to `expect` finished tasks."""
    while True:
        parts = []
        for path in workdir.glob("progress-*.json"):
            with contextlib.suppress(OSError, ValueError):
                parts.append(json.loads(path.read_text()))
        succeeded = sum(p["succeeded"] for p in parts)
        failed = sum(p["failed"] for p in parts)
        if succeeded + failed >= expect:
            return {"first_start": min(p["first_start"] for p in parts if p["first_start"]),
                    "last_done": max(p["last_done"] for p in parts),
                    "succeeded": succeeded, "failed": failed, "worker_processes": len(parts)}
        if worker.exited():
            raise BenchError(f"the worker exited with status {worker.returncode()} before finishing")
        if time.monotonic() > deadline:
            raise BenchError(f"deadline passed with {succeeded + failed} of {expect} tasks finished")
        time.sleep(0.002)


class Worker:
    """The peer's worker process group: started, watched, measured, stopped."""

    def __init__(self, command: list[str], workdir: Path, processes: int = 1) -> None:
        self.command = command
        self.processes = processes
        self.workdir = workdir
        self.log = workdir / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline: float) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command, cwd=HERE, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        (self.workdir / "worker.pid").write_text(str(self.proc.pid))
        while len(list(self.workdir.glob("ready-*.json"))) < self.processes:
            if self.exited():
                raise BenchError(f"the worker exited with status {self.returncode()} while starting")
            if time.monotonic() > deadline:
                raise BenchError("the worker did not become ready before the deadline")
            time.sleep(0.01)

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process in the worker's process group."""
        if self.proc is None:
            return 0.0
        pgid = self.proc.pid
        return cpu_seconds(lambda comm, fields: int(fields[2]) == pgid)

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # stragglers of a group whose leader exited
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def cpu_seconds(match: Callable[[str, list[str]], bool]) -> float:
    """User + system CPU of the live processes for which `match(comm, stat fields)` holds."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, tail = stat.read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        fields = tail.split()  # fields[0] is field 3 of proc(5): state
        if match(head.partition("(")[2], fields):
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return ticks / CLOCK_TICKS


class HueyPeer:
    def __init__(self, args: argparse.Namespace) -> None:
        import peer_huey

        self.args = args
        self.mod = peer_huey

    def worker_command(self) -> list[str]:
        return [sys.executable, "-m", "huey.bin.huey_consumer", "peer_huey.huey",
                "-k", "thread", "-w", str(self.args.workers), "-q"]

    def enqueue_noop(self) -> None:
        self.mod.noop()

    def stamp_and_wait(self, t0: float, timeout: float) -> float:
        # Huey's result wait polls; 1 ms between polls keeps it out of the way.
        result = self.mod.stamp(t0)
        value: float = result.get(blocking=True, timeout=timeout, backoff=1.0, max_delay=0.001)
        return value

    def server_cpu_seconds(self) -> float:
        return 0.0  # SQLite works inside the producer and the worker

    def clean(self) -> None:
        pass  # a fresh database file per run, in a temp dir queue_bench.py removes

    def config(self) -> dict[str, Any]:
        try:
            sync = self.mod.huey.storage.sql("pragma synchronous", results=True)[0][0]
            mode = self.mod.huey.storage.sql("pragma journal_mode", results=True)[0][0]
        except Exception:
            sync, mode = None, None
        return {"huey": metadata.version("huey"), "worker_type": "thread",
                "workers": self.args.workers, "synchronous": {0: "off", 1: "normal", 2: "full",
                                                              3: "extra"}.get(sync, sync),
                "journal_mode": mode}


class DramatiqPeer:
    def __init__(self, args: argparse.Namespace) -> None:
        import peer_dramatiq

        self.args = args
        self.mod = peer_dramatiq
        self.result_keys: list[str] = []  # the result backend's keys are hashes, unprefixed

    def worker_command(self) -> list[str]:
        return [sys.executable, "-m", "dramatiq", "peer_dramatiq", "--processes", str(self.args.processes),
                "--threads", str(self.args.workers), "--path", str(HERE)]

    def enqueue_noop(self) -> None:
        self.mod.noop.send()

    def stamp_and_wait(self, t0: float, timeout: float) -> float:
        message = self.mod.stamp.send(t0)
        self.result_keys.append(self.mod.backend.build_message_key(message))
        value: float = message.get_result(backend=self.mod.backend, block=True,
                                          timeout=max(1000, int(timeout * 1000)))
        return value

    def server_cpu_seconds(self) -> float:
        """CPU of the local redis-server processes (they serve this run alone here)."""
        return cpu_seconds(lambda comm, fields: comm == "redis-server")

    def clean(self) -> None:
        """Delete the keys this run created: those under its namespace, and its results."""
        client = self.mod.broker.client
        keys = list(client.scan_iter(match=self.args.redis_namespace + "*", count=1000))
        keys += self.result_keys
        self.result_keys = []
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])

    def config(self) -> dict[str, Any]:
        return {"dramatiq": metadata.version("dramatiq"), "redis_py": metadata.version("redis"),
                "processes": self.args.processes, "threads": self.args.workers,
                "redis_url": self.args.redis_url}


if __name__ == "__main__":
    sys.exit(main())
