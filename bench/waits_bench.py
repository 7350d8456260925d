"""Durable waits at scale: what many waiting tasks cost the daemon that holds them.

    PYTHONPATH=daemon python3 bench/waits_bench.py [--tasks 100000] [--noop 2000] [--noop-rounds 3]

A real daemon in this process (SQLite in a temp dir, loopback HTTP, 8 workers) with a
plugin whose `park(n)` task waits for the event `bench.wake` with `{"n": n}`:

1. `--noop` no-op tasks run to the end, timed, `--noop-rounds` times: the baseline (the
   median round; on a shared machine one round swings by half either way).
2. `--tasks` parks are enqueued (batches of 1,000) and run until every one is `waiting`.
3. The process's resident memory and the objects Python's collector tracks; the same no-op
   rounds again, with the parks waiting; `GET /v1/status` and a page of
   `GET /v1/tasks?status=waiting`. Then the WAL file's size, and the no-op rounds once
   more after the maintenance schedule's checkpoint (`store.checkpoints.maintain`: TRUNCATE)
   has folded it into the database: parking wrote every task several times, and the
   queue's WAL is cut back only by that checkpoint.
4. The daemon is stopped and started again: the start (which counts the open event waits
   by topic pattern from the table) is timed.
5. Resume latency, the daemon otherwise idle: `--resume-samples` parks woken one at a time,
   each from the publish of its event to its task's `task.resumed` (queued again) and to its
   `task.started` (its replay running), each waited to its end before the next. Issue 19's
   target: the task resumes within 10 ms p99.
6. One event per remaining park is published; timed until every park has succeeded.

Every wait is bounded. Prints a JSON line on stdout and a markdown table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from agentd.app import Daemon
from agentd.events import Event
from agentd.store.checkpoints import maintain
from agentd.taskqueue import TaskRequest
from agentd.testing import daemon_url, make_config

PLUGIN = """
from agentd import Plugin

plugin = Plugin("wb")


@plugin.task()
async def park(ctx, n: int):
    return (await ctx.wait_for("bench.wake", {"n": n})).data["n"]


@plugin.task()
async def noop(ctx):
    return None
"""
BATCH = 1000
LIMIT = 1800.0  # seconds any phase may take


def rss_mb() -> float:
    """The process's resident memory now (Linux: /proc/self/statm), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 1e6


class Counter:
    """Counts a topic's events on a daemon's bus; `reached(n)` waits for the count."""

    def __init__(self, daemon: Daemon, topic: str) -> None:
        self.count = 0
        self._changed = asyncio.Event()
        daemon.bus.subscribe(topic, self._seen)

    def _seen(self, _event: Event) -> None:
        self.count += 1
        self._changed.set()

    async def reached(self, wanted: int) -> None:
        async def wait() -> None:
            while self.count < wanted:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), LIMIT)


async def enqueue(daemon: Daemon, name: str, args: list[dict[str, Any]]) -> None:
    for start in range(0, len(args), BATCH):
        await daemon.queue.enqueue_many([TaskRequest(name, item) for item in args[start:start + BATCH]])


async def run_noops(daemon: Daemon, count: int) -> float:
    """Seconds for `count` no-op tasks, enqueued at once, to succeed."""
    done = Counter(daemon, "task.succeeded")
    began = time.perf_counter()
    await enqueue(daemon, "wb.noop", [{}] * count)
    await done.reached(count)
    return time.perf_counter() - began


async def noop_rounds(daemon: Daemon, count: int, rounds: int) -> list[float]:
    """Seconds of each of `rounds` runs of `run_noops`."""
    return [round(await run_noops(daemon, count), 3) for _ in range(rounds)]


async def resume_latencies(daemon: Daemon, samples: int) -> dict[str, float]:
    """Wake parks 0..samples-1 one at a time; p50/p99 ms from the publish to `task.resumed`
    and to `task.started` of the woken park (the only one running: the daemon is idle)."""
    marks: dict[str, asyncio.Future[float]] = {}

    def seen(event: Event) -> None:
        future = marks.get(event.topic)
        if future is not None and not future.done() and event.data.get("name") == "wb.park":
            future.set_result(time.perf_counter())

    subscriptions = [daemon.bus.subscribe(topic, seen) for topic in ("task.resumed", "task.started")]
    succeeded = Counter(daemon, "task.succeeded")
    resumed: list[float] = []
    started: list[float] = []
    try:
        for n in range(samples):
            loop = asyncio.get_running_loop()
            marks = {"task.resumed": loop.create_future(), "task.started": loop.create_future()}
            began = time.perf_counter()
            daemon.bus.publish("bench.wake", {"n": n})
            resumed.append(await asyncio.wait_for(marks["task.resumed"], LIMIT) - began)
            started.append(await asyncio.wait_for(marks["task.started"], LIMIT) - began)
            await succeeded.reached(n + 1)
    finally:
        for subscription in subscriptions:
            subscription.unsubscribe()

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"resume_samples": samples,
            "resumed_p50_ms": ms(resumed, 0.5), "resumed_p99_ms": ms(resumed, 0.99),
            "started_p50_ms": ms(started, 0.5), "started_p99_ms": ms(started, 0.99)}


async def bench(tasks: int, noop: int, rounds: int, samples: int, state: Path,
                plugins: Path) -> dict[str, Any]:
    config = make_config(state, [plugins], {"tasks": {"queues": {"default": 8}}})
    figures: dict[str, Any] = {"tasks": tasks, "noop": noop}
    daemon = Daemon(config)
    await daemon.start()
    try:
        figures["rss_start_mb"] = round(rss_mb(), 1)
        figures["objects_start"] = len(gc.get_objects())
        alone = await noop_rounds(daemon, noop, rounds)
        figures["noop_s_baseline"] = statistics.median(alone)
        figures["noop_s_baseline_rounds"] = alone
        waiting = Counter(daemon, "task.waiting")
        began = time.perf_counter()
        await enqueue(daemon, "wb.park", [{"n": n} for n in range(tasks)])
        await waiting.reached(tasks)
        figures["park_s"] = round(time.perf_counter() - began, 2)
        figures["parks_per_s"] = round(tasks / figures["park_s"])
        figures["rss_waiting_mb"] = round(rss_mb(), 1)
        figures["objects_waiting"] = len(gc.get_objects())
        figures["indexed"] = daemon.waits.indexed
        beside = await noop_rounds(daemon, noop, rounds)
        figures["noop_s_while_waiting"] = statistics.median(beside)
        figures["noop_s_while_waiting_rounds"] = beside
        async with aiohttp.ClientSession(daemon_url(daemon)) as client:
            for label, path in (("status_ms", "/v1/status"),
                                ("waiting_page_ms", "/v1/tasks?status=waiting&limit=50")):
                began = time.perf_counter()
                async with client.get(path) as response:
                    body = await response.json()
                figures[label] = round((time.perf_counter() - began) * 1000, 1)
                if label == "status_ms":
                    figures["status_waiting"] = body["tasks"]["by_status"].get("waiting")
        assert daemon.storage.sqlite is not None
        wal = daemon.storage.sqlite.path.with_name(daemon.storage.sqlite.path.name + "-wal")
        figures["wal_mb_waiting"] = round(wal.stat().st_size / 1e6) if wal.exists() else 0
        await maintain(daemon.storage.sqlite)
        checkpointed = await noop_rounds(daemon, noop, rounds)
        figures["noop_s_after_checkpoint"] = statistics.median(checkpointed)
        figures["noop_s_after_checkpoint_rounds"] = checkpointed
    finally:
        await daemon.stop()
    daemon = Daemon(config)
    began = time.perf_counter()
    await daemon.start()
    try:
        figures["restart_s"] = round(time.perf_counter() - began, 2)
        figures["indexed_after_restart"] = daemon.waits.indexed
        figures.update(await resume_latencies(daemon, samples))
        succeeded = Counter(daemon, "task.succeeded")
        began = time.perf_counter()
        for n in range(samples, tasks):
            daemon.bus.publish("bench.wake", {"n": n})
            if n % BATCH == BATCH - 1:
                await asyncio.sleep(0)  # let the wakes' writes and the workers in
        await succeeded.reached(tasks - samples)
        figures["wake_s"] = round(time.perf_counter() - began, 2)
        figures["wakes_per_s"] = round((tasks - samples) / figures["wake_s"])
    finally:
        await daemon.stop()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--noop", type=int, default=2000)
    parser.add_argument("--noop-rounds", type=int, default=3)
    parser.add_argument("--resume-samples", type=int, default=200)
    args = parser.parse_args()
    if not 1 <= args.resume_samples < args.tasks:
        parser.error("--resume-samples must be at least 1 and fewer than --tasks")
    if args.noop_rounds < 1:
        parser.error("--noop-rounds must be at least 1")
    with tempfile.TemporaryDirectory(prefix="waits-bench-") as tmp:
        plugins = Path(tmp) / "plugins"
        plugins.mkdir()
        (plugins / "wb.py").write_text(PLUGIN)
        figures = asyncio.run(bench(args.tasks, args.noop, args.noop_rounds, args.resume_samples,
                                    Path(tmp) / "state", plugins))
    print(json.dumps(figures))
    print("| figure | value |\n|---|---|", file=sys.stderr)
    for key, value in figures.items():
        print(f"| {key} | {value} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
