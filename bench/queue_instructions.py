"""Instructions per no-op task, counted by valgrind's callgrind: agentd's queue cost in a
unit that does not move with the machine's speed.

    python3 bench/queue_instructions.py [--against REV ...] [--tasks 1000,3000]
                                        [--enqueue batch|single]

Wall-clock and CPU-time figures on a shared VM drift by +-20 % within minutes (and by 2x
between days); an instruction count repeats to within a fraction of a percent. Each
agentd measured (the working tree's, and each `--against` git revision, exported with
`git archive`) runs the no-op workload of queue_bench.py (the daemon on its defaults, the
tasks enqueued while the workers run) twice under callgrind, with the two `--tasks` sizes;
the difference of the two totals divided by the difference of the sizes is what one more
task costs, start-up and shutdown cancelled out. Prints one JSON line per agentd; each
`--against` line also says how the working tree's count compares with it.

`memset_per_task` is reported apart: valgrind counts a `rep stosb` (how glibc zeroes SQLite's
4 KiB pages) as one instruction per byte, so it stands for far less time than its count.
Needs valgrind (`apt-get install valgrind`). Takes about 2.5 minutes per agentd on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from machine import source_trees

HERE = Path(__file__).resolve().parent

# The workload, run as `python -c DRIVER N ENQUEUE` with the measured agentd first on the path.
DRIVER = """
import sys
sys.path.insert(0, {bench!r})
import queue_bench
from agentd.log import configure_logging
configure_logging("warning", "json", stream=sys.stderr)
queue_bench.agentd_run(queue_bench.agentd_noop(int(sys.argv[1]), sys.argv[2], hold=False),
                       "normal", 8, 600)
"""


def main() -> int:
    args = parse_args()
    if shutil.which("valgrind") is None:
        print("queue_instructions: valgrind is not installed (apt-get install valgrind)",
              file=sys.stderr)
        return 1
    small, large = args.tasks
    with tempfile.TemporaryDirectory(prefix="agentd-instr-") as tmp:
        sources = source_trees(Path(tmp), args.against)
        rows: list[dict[str, Any]] = []
        for label, source in sources:
            # The two sizes at once, one per core: callgrind runs a program on one.
            with ThreadPoolExecutor(2) as pool:
                small_run, large_run = pool.map(
                    lambda n, src=source: count(n, args.enqueue, src, Path(tmp)), (small, large))
            row: dict[str, Any] = {"bench": "queue_instructions", "agentd": label,
                                   "enqueue": args.enqueue, "tasks": [small, large]}
            if small_run is None or large_run is None:
                row["error"] = "a callgrind run failed (see stderr)"
            else:
                span = large - small
                row["instructions_per_task"] = round((large_run[0] - small_run[0]) / span)
                row["memset_per_task"] = round((large_run[1] - small_run[1]) / span)
                first = rows[0].get("instructions_per_task") if rows else None
                if first is not None:
                    # How the working tree's count compares with this revision's.
                    this = row["instructions_per_task"]
                    row["working_tree_vs_this"] = f"{(first - this) / this:+.1%}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return 1 if any("error" in row for row in rows) else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", action="append", default=[], metavar="REV",
                        help="a git revision to measure too (repeatable)")
    parser.add_argument("--tasks", default="1000,3000",
                        help="the two workload sizes whose difference is counted (default 1000,3000)")
    parser.add_argument("--enqueue", choices=("batch", "single"), default="batch",
                        help="enqueue_many x 1000 (default) or one task per call from 100 callers")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.tasks.split(","))
    if len(sizes) != 2 or sizes[0] == sizes[1] or sizes[0] < 1:
        parser.error("--tasks takes two different positive sizes, e.g. 1000,3000")
    args.tasks = sizes
    return args


def count(tasks: int, enqueue: str, source: Path, tmp: Path) -> tuple[int, int] | None:
    """(all instructions, memset's) of one run under callgrind with the agentd in `source`
    first on the path, or None if it failed."""
    out = tmp / f"callgrind-{os.getpid()}-{tasks}-{abs(hash(source))}.out"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    run = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-c",
         DRIVER.format(bench=str(HERE)), str(tasks), enqueue],
        check=False, env=env, capture_output=True, text=True, timeout=1800)
    if run.returncode != 0 or not out.exists():
        print(run.stderr[-2000:], file=sys.stderr)
        return None
    annotated = subprocess.run(["callgrind_annotate", "--threshold=100", str(out)],
                               capture_output=True, text=True, check=True, timeout=600).stdout
    total = re.search(r"^([\d,]+) \(100\.0+%\)\s+PROGRAM TOTALS", annotated, re.MULTILINE)
    if total is None:
        print(f"queue_instructions: no total in {out}", file=sys.stderr)
        return None
    memset = sum(int(m.group(1).replace(",", "")) for m in re.finditer(
        r"^\s*([\d,]+) \([\s\d.]+%\)\s+\S*memset\S*", annotated, re.MULTILINE))
    return int(total.group(1).replace(",", "")), memset


if __name__ == "__main__":
    sys.exit(main())
