"""`agentd backup` while the daemon writes: how long a backup of a database of a given size
takes, at how many MB/s, and how much the writers' latency grows meanwhile.

    PYTHONPATH=daemon python3 bench/backup_bench.py [--mb 100] [--writers 4] [--sample 400]

A real `agentd run` on a temp dir (loopback, a free port) with a plugin task that does
nothing; `--writers` HTTP clients POST tasks with 16 KB of arguments until agentd.db holds
about `--mb` MB (the maintenance schedule, run over the API between batches, folds the WAL
into it; the database figure printed adds the WAL left at the backup). Then the same
writers post `--sample` tasks with no backup running (the baseline latency), and again
while `agentd backup` runs as a subprocess, until it ends (at most 100 times `--sample`
tasks). Every loop is bounded in count. Prints a JSON line on stdout and a markdown table
on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp

PAD = "x" * 16_000
DAEMON = Path(__file__).resolve().parent.parent / "daemon"
PLUGIN = """
from agentd import Plugin

plugin = Plugin("bb")


@plugin.task()
async def noop(ctx, pad=""):
    return None
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def post_tasks(url: str, count: int, writers: int, stop: asyncio.Event | None = None) -> list[float]:
    """Latencies (s) of up to `count` POST /v1/tasks from `writers` clients; stops early
    once `stop` is set."""
    latencies: list[float] = []
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def writer() -> None:
            while len(latencies) < count and not (stop is not None and stop.is_set()):
                started = time.perf_counter()
                async with session.post("/v1/tasks", json={"name": "bb.noop", "args": {"pad": PAD}}) as reply:
                    if reply.status != 201:
                        raise RuntimeError(f"POST /v1/tasks: HTTP {reply.status}: {await reply.text()}")
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(writer() for _ in range(writers)))
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "max_ms": 1000 * ordered[-1]}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="agentd-backup-bench-"))
    (root / "plugins").mkdir()
    (root / "plugins" / "bb.py").write_text(PLUGIN)
    port = free_port()
    config = root / "agentd.toml"
    config.write_text(textwrap.dedent(f"""
        [daemon]
        data_dir = "data"
        [server]
        port = {port}
        [plugins]
        paths = ["plugins"]
        entry_points = false
        [log]
        level = "warning"
        access = false
    """))
    env = {**os.environ, "PYTHONPATH": str(DAEMON)}
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentd", "run", "--config", str(config), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as probe:
            for _ in range(300):  # up to 30 s for the start
                try:
                    async with probe.get(url + "/readyz") as reply:
                        if reply.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the daemon did not get ready in 30 s")
        database = root / "data" / "agentd.db"
        target = args.mb * 1_000_000
        for _ in range(10 * args.mb):  # a bound: 500 tasks of 16 KB add about 8 MB
            if database.stat().st_size >= target:
                break
            await post_tasks(url, 500, args.writers)
            # Under steady writes the PASSIVE checkpoints fall behind and the WAL holds the
            # pages; the maintenance schedule's TRUNCATE folds them into the database file.
            async with aiohttp.ClientSession() as session, session.post(
                    url + "/v1/schedules/agentd.maintain_store/run") as reply:
                if reply.status >= 300:
                    raise RuntimeError(f"running agentd.maintain_store: HTTP {reply.status}")
        baseline = await post_tasks(url, args.sample, args.writers)

        done = asyncio.Event()
        during_task = asyncio.create_task(post_tasks(url, args.sample * 100, args.writers, done))
        started = time.perf_counter()
        backup = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentd", "backup", "--config", str(config), str(root / "backups"),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await backup.communicate()
        wall = time.perf_counter() - started
        done.set()
        during = await during_task
        if backup.returncode != 0:
            raise RuntimeError(f"agentd backup failed: {err.decode()}")
        (made,) = (root / "backups").iterdir()
        manifest = json.loads((made / "manifest.json").read_text())
        size = sum(entry["bytes"] for entry in manifest["files"])
        return {"database_mb": round((database.stat().st_size + _wal(database)) / 1e6, 1),
                "backup_mb": round(size / 1e6, 1), "copy_s": manifest["seconds"],
                "command_s": round(wall, 2), "mb_per_s": round(size / 1e6 / manifest["seconds"], 1),
                "writes_baseline": summary(baseline), "writes_during": summary(during)}
    finally:
        daemon.terminate()
        await daemon.wait()


def _wal(database: Path) -> int:
    wal = database.with_name(database.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100, help="agentd.db's size to reach, MB")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--sample", type=int, default=400, help="tasks per latency sample")
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result))
    base, during = result["writes_baseline"], result["writes_during"]
    print("| database + WAL | backup | copy | command | MB/s | write p50 / p99 / max, no backup "
          "| during the backup |\n"
          f"|---|---|---|---|---|---|---|\n"
          f"| {result['database_mb']} MB | {result['backup_mb']} MB | {result['copy_s']} s | "
          f"{result['command_s']} s | {result['mb_per_s']} | {base['p50_ms']:.1f} / {base['p99_ms']:.1f} / "
          f"{base['max_ms']:.1f} ms | {during['p50_ms']:.1f} / {during['p99_ms']:.1f} / "
          f"{during['max_ms']:.1f} ms (n={during['n']}) |", file=sys.stderr)
