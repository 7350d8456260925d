"""What reading and validating a request costs on the HTTP enqueue path: `POST /v1/tasks`,
end to end, and the body's decoding and validation alone.

    python3 bench/http_enqueue_bench.py [--against REV ...] [--requests 3000] [--rounds 5]

Each agentd measured (the working tree's, and each `--against` git revision, exported with
`git archive`) runs in a subprocess of its own with that copy first on the path: a real
daemon (defaults, the plugin bench/plugins/benchtasks.py) and an aiohttp client on one
keep-alive connection in the same process, posting `--requests` enqueues one after the
other (each with a one-hour delay, so no worker runs and only the enqueue is measured).
Figures per request: the process's CPU time (client and server together) and the time the
validation alone takes (the body's bytes to the queue's `TaskRequest`, as that revision's
handler does it). The agentds take turns, `--rounds` times; the best round of each is
kept, as the least disturbed by the rest of the machine. Prints one JSON line per agentd;
each `--against` line also compares the working tree's figures with it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from machine import source_trees

HERE = Path(__file__).resolve().parent

DRIVER = """
import asyncio, json, sys, tempfile, time, timeit
from pathlib import Path
import aiohttp
from agentd.log import configure_logging
from agentd.testing import daemon_url, running_daemon

BODY = {"name": "bench.stamp", "args": {"t0": 1.5}, "delay": 3600, "priority": 1}
RAW = json.dumps(BODY).encode()


def validator():
    # This revision's own way from the body's bytes to a TaskRequest.
    try:
        from agentd.web.errors import _decoder
        from agentd.web.schemas import TaskBody
        from agentd.web.tasks_api import _request
        decode = _decoder(TaskBody).decode
        return lambda: _request(decode(RAW))
    except ImportError:
        from agentd.web.tasks_api import task_request
        return lambda: task_request(json.loads(RAW.decode()))


async def main(count):
    with tempfile.TemporaryDirectory() as tmp:
        async with running_daemon(Path(tmp), [Path(PLUGINS)]) as daemon:
            async with aiohttp.ClientSession(daemon_url(daemon)) as client:
                async def post(n):
                    for _ in range(n):
                        async with client.post("/v1/tasks", data=RAW,
                                               headers={"Content-Type": "application/json"}) as r:
                            assert r.status == 201, await r.text()
                            await r.read()
                await post(200)
                started, cpu = time.perf_counter(), time.process_time()
                await post(count)
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    check = validator()
    per_call = min(timeit.repeat(check, number=20000, repeat=5)) / 20000
    print(json.dumps({"cpu_us": cpu / count * 1e6, "wall_us": wall / count * 1e6,
                      "validate_us": per_call * 1e6}))


configure_logging("warning", "json", stream=sys.stderr)
asyncio.run(main(int(sys.argv[1])))
"""


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="agentd-http-") as tmp:
        sources = source_trees(Path(tmp), args.against)
        best: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for label, source in sources:
                figures = run(source, args.requests)
                kept = best.setdefault(label, figures)
                for key, value in figures.items():
                    kept[key] = min(kept[key], value)
    mine = best[sources[0][0]]
    for label, _ in sources:
        row: dict[str, Any] = {"bench": "http_enqueue", "agentd": label, "requests": args.requests,
                               **{k: round(v, 2) for k, v in best[label].items()}}
        if label != sources[0][0]:
            row["working_tree_vs_this"] = {
                k: f"{(mine[k] / v - 1) * 100:+.1f} %" for k, v in best[label].items()}
        print(json.dumps(row))
    return 0


def run(source: Path, requests: int) -> dict[str, float]:
    code = DRIVER.replace("PLUGINS", repr(str(HERE / "plugins")))
    result = subprocess.run([sys.executable, "-c", code, str(requests)], check=False,
                            capture_output=True, text=True, timeout=600,
                            env={"PYTHONPATH": str(source)})
    if result.returncode != 0:
        raise SystemExit(f"http_enqueue_bench: the run of {source} failed:\n{result.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", action="append", default=[], metavar="REV",
                        help="a git revision to measure too (repeatable)")
    parser.add_argument("--requests", type=int, default=3000, help="enqueues per run")
    parser.add_argument("--rounds", type=int, default=5, help="turns each agentd takes")
    args = parser.parse_args()
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be at least 1")
    return args


if __name__ == "__main__":
    sys.exit(main())
