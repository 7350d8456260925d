"""Start and footprint: how long `agentd run` on its defaults (the shipped plugins, SQLite,
memory.db, the HTTP server) takes to be ready, and what it holds once idle; beside the
floor any Python HTTP service pays (an interpreter that imports aiohttp and serves one
route), in the same run.

    PYTHONPATH=daemon python3 bench/start_bench.py [--runs 7] [--idle 5] [--against REV ...]

Each run starts a fresh process in a fresh temp dir (a new agentd.db and memory.db: the
first start's migrations included) with a NOTIFY_SOCKET of the bench's own, and measures
from the spawn to READY=1 (what systemd waits for) and to the first /readyz 200; then RSS
once ready, and RSS and CPU after `--idle` seconds of doing nothing; then SIGTERM and the
time to exit. `--against REV` measures agentd at an older commit too (exported with git
archive, imported the same way), to show what a change did. Figures are medians over
`--runs`, with the slowest run beside them. Prints a JSON line per system on stdout and a
markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

from machine import BenchRun, source_trees

READY_TIMEOUT = 30.0  # seconds a start may take before the run counts as failed
FLOOR_SERVER = textwrap.dedent("""
    import os, socket
    from aiohttp import web

    async def ok(request):
        return web.json_response({"ready": True})

    async def notify(app):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(os.environ["NOTIFY_SOCKET"])
            sock.sendall(b"READY=1")

    app = web.Application()
    app.router.add_get("/readyz", ok)
    app.on_startup.append(notify)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), print=None, access_log=None)
""")


def main() -> int:
    args = parse_args()
    run = BenchRun("start_bench")
    with tempfile.TemporaryDirectory(prefix="agentd-start-") as tmp:
        systems: list[tuple[str, list[str], dict[str, str]]] = [
            ("python + aiohttp, one route (the floor)", [sys.executable, "-c", FLOOR_SERVER], {})]
        for label, source in source_trees(Path(tmp), args.against):
            systems.append((f"agentd run, defaults ({label})", [sys.executable, "-m", "agentd", "run"],
                            {"PYTHONPATH": str(source)}))
        for name, command, env in systems:
            samples = [measure(command, env, Path(tmp), i, args.idle) for i in range(args.runs)]
            run.emit({"system": name, "runs": args.runs, "idle_seconds": args.idle,
                      **summarise(samples)})
    print_table(run)
    return run.exit_code


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="starts per system (default 7)")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds of idling before RSS and CPU are read again (default 5)")
    parser.add_argument("--against", action="append", default=[], metavar="REV",
                        help="also measure agentd at this git revision")
    return parser.parse_args()


def measure(command: list[str], env: dict[str, str], tmp: Path, index: int, idle: float) -> dict[str, float]:
    """One start: seconds to READY=1 and to /readyz 200, RSS (MB) at ready and after
    `idle` s, CPU-seconds used while idle, seconds from SIGTERM to exit."""
    home = tmp / f"run-{len(list(tmp.iterdir()))}-{index}"
    home.mkdir()
    port = free_port()
    notify_path = str(home / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(READY_TIMEOUT)
        child_env = {**os.environ, **env, "NOTIFY_SOCKET": notify_path, "PORT": str(port),
                     "AGENTD_SERVER_PORT": str(port), "AGENTD_DAEMON_DATA_DIR": str(home / "data")}
        started = time.monotonic()
        child = subprocess.Popen(command, cwd=home, env=child_env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            while not notify.recv(4096).startswith(b"READY=1"):
                pass
            to_notify = time.monotonic() - started
            to_ready = wait_ready(port, started)
            rss_ready = rss_mb(child.pid)
            cpu_before = cpu_seconds(child.pid)
            time.sleep(idle)  # the idle time under test
            figures = {"ready_notify_s": to_notify, "readyz_200_s": to_ready, "rss_ready_mb": rss_ready,
                       "rss_idle_mb": rss_mb(child.pid), "idle_cpu_s": cpu_seconds(child.pid) - cpu_before}
            stopping = time.monotonic()
            child.send_signal(signal.SIGTERM)
            child.wait(timeout=60)
            figures["stop_s"] = time.monotonic() - stopping
            return figures
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def wait_ready(port: int, started: float) -> float:
    """Seconds from `started` to the first /readyz 200 (polled every 5 ms)."""
    deadline = started + READY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.005)  # a poll interval, bounded by the deadline
    raise TimeoutError(f"/readyz did not answer 200 within {READY_TIMEOUT} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def summarise(samples: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = round(statistics.median(values), 3)
        out[f"{key}_worst"] = round(max(values), 3)
    return out


def print_table(run: BenchRun) -> None:
    lines = [f"start_bench: {run.revision}, {run.rows[0]['runs']} starts each, "
             f"{run.elapsed:.0f} s. {run.load.report()}", "",
             "| system | READY=1 | /readyz 200 | RSS ready | RSS idle | CPU idle | stop |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in run.rows:
        lines.append(
            f"| {row['system']} | {row['ready_notify_s']:.2f} s ({row['ready_notify_s_worst']:.2f}) "
            f"| {row['readyz_200_s']:.2f} s ({row['readyz_200_s_worst']:.2f}) "
            f"| {row['rss_ready_mb']:.0f} MB | {row['rss_idle_mb']:.0f} MB "
            f"| {row['idle_cpu_s'] / row['idle_seconds'] * 100:.1f} % "
            f"| {row['stop_s']:.2f} s |")
    lines.append("")
    lines.append("Medians; the slowest start in brackets. CPU idle: the share of one core used "
                 "while idle. stop: SIGTERM to exit.")
    print("\n".join(lines), file=sys.stderr)
    print(json.dumps({"table": "start_bench", "seconds": round(run.elapsed, 1)}), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
