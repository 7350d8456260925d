"""The dashboard with real volumes: how long its first view takes over a store of many
tasks, and whether the live event view keeps the tab responsive under a stream of events.

    PYTHONPATH=daemon python3 bench/dashboard_bench.py [--tasks 100000] [--rate 1000] [--seconds 3]

A real daemon in this process (SQLite in a temp dir, loopback HTTP, no token) and Debian's
Chromium driven by Playwright (`/usr/bin/chromium`, headless):

1. `--tasks` tasks due in an hour (so none runs) are written in batches of 5,000 by a first
   daemon; the page is then timed on a second one, freshly opening the store.
2. First view: three fresh tabs (nothing cached) open `/#/tasks`; each time is from the
   start of the navigation to the later of the page's own marks `agentd.view` (the task list
   shown) and `agentd.counters` (the header counters shown). Issue 20's target: < 500 ms.
3. Live view: `--rate` events a second for `--seconds` s published on the daemon's bus, the
   tab following them; the longest main-thread task the browser reports (PerformanceObserver
   "longtask": what a user feels as a freeze) and the rows the list keeps.

Every wait is bounded; loopback only. Prints a JSON line per figure set on stdout and a
markdown table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import BenchRun
from playwright.async_api import async_playwright

from agentd.taskqueue import TaskRequest
from agentd.testing import daemon_url, running_daemon

CHROMIUM = "/usr/bin/chromium"
BATCH = 5000
WAIT_MS = 60_000
FIRST_VIEW = """() => Math.max(...["agentd.view", "agentd.counters"]
    .map((name) => performance.getEntriesByName(name)[0].startTime))"""
WATCH_LONG_TASKS = """() => {
    window.longest = 0;
    new PerformanceObserver((list) => {
        for (const entry of list.getEntries()) window.longest = Math.max(window.longest, entry.duration);
    }).observe({type: "longtask", buffered: false});
}"""


async def first_views(browser: Any, url: str, tasks: int) -> list[float]:
    timings = []
    for _ in range(3):
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        await page.goto(f"{url}/#/tasks")
        await page.locator("table.tasks tbody tr").first.wait_for()
        await page.locator('#counters dd[data-state="queued"]').filter(has_text=str(tasks)).wait_for()
        timings.append(float(await page.evaluate(FIRST_VIEW)))
        await context.close()
    return timings


async def live_view(browser: Any, daemon: Any, rate: int, seconds: int) -> dict[str, Any]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    await page.goto(f"{daemon_url(daemon)}/#/live")
    await page.get_by_label("Topics").fill("load.*")
    await page.get_by_role("button", name="Apply").click()
    await page.locator('.stream-state[data-state="open"]').wait_for()
    await page.evaluate(WATCH_LONG_TASKS)
    per_tenth = max(1, rate // 10)
    for second in range(seconds):
        tick = time.perf_counter()
        for chunk in range(10):
            for n in range(per_tenth):
                daemon.bus.publish("load.tick", {"n": (second * 10 + chunk) * per_tenth + n})
            # Pacing the load at `rate` a second: a bench's deliberate wait.
            await asyncio.sleep(max(0.0, tick + (chunk + 1) / 10 - time.perf_counter()))  # noqa: sleep
    total = seconds * 10 * per_tenth
    await page.get_by_label("Events received").filter(has_text=str(total)).wait_for()
    rows = await page.locator("ol.events > li").count()
    longest = float(await page.evaluate("window.longest"))
    await context.close()
    return {"events": total, "rows_kept": rows, "longest_task_ms": round(longest, 1)}


async def run(args: argparse.Namespace, bench: BenchRun) -> None:
    with tempfile.TemporaryDirectory(prefix="agentd-dashbench-") as tmp:
        state = Path(tmp)
        async with running_daemon(state) as filler:
            for start in range(0, args.tasks, BATCH):
                await filler.queue.enqueue_many(
                    [TaskRequest(name="agentd.purge_tasks", delay=3600)
                     for _ in range(min(BATCH, args.tasks - start))])
        async with running_daemon(state) as daemon, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM)
            try:
                timings = await first_views(browser, daemon_url(daemon), args.tasks)
                bench.emit({"figure": "first view", "tasks": args.tasks,
                            "ms": [round(t) for t in timings], "best_ms": round(min(timings)),
                            "median_ms": round(statistics.median(timings)),
                            "target_ms": 500, "pass": min(timings) < 500})
                live = await live_view(browser, daemon, args.rate, args.seconds)
                bench.emit({"figure": "live view", "rate": args.rate, **live})
            finally:
                await browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks in the store (default 100000)")
    parser.add_argument("--rate", type=int, default=1000,
                        help="events a second in the live view (default 1000)")
    parser.add_argument("--seconds", type=int, default=3, help="seconds of events (default 3)")
    args = parser.parse_args()
    if args.tasks < 1 or args.rate < 10 or not 1 <= args.seconds <= 60:
        parser.error("--tasks >= 1, --rate >= 10 and 1 <= --seconds <= 60")
    bench = BenchRun("dashboard_bench")
    asyncio.run(asyncio.wait_for(run(args, bench), 1800))
    first = next(row for row in bench.rows if row["figure"] == "first view")
    live = next(row for row in bench.rows if row["figure"] == "live view")
    print(f"\ndashboard_bench: {bench.revision}, {bench.elapsed:.0f} s. {bench.load.report()}\n\n"
          "| figure | value |\n| --- | ---: |\n"
          f"| first view over {first['tasks']:,} tasks, best / median of 3 (target < 500 ms) | "
          f"{first['best_ms']} / {first['median_ms']} ms ({'PASS' if first['pass'] else 'FAIL'}) |\n"
          f"| live view, {live['rate']:,} events/s: longest main-thread task | "
          f"{live['longest_task_ms']} ms |\n"
          f"| live view: rows kept of {live['events']:,} events | {live['rows_kept']} |",
          file=sys.stderr)
    return bench.exit_code


if __name__ == "__main__":
    sys.exit(main())
