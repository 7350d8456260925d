"""Instructions per no-op task, counted by valgrind's callgrind: agentd's queue cost in a
unit that does not move with the machine's speed.

    python3 bench/queue_instructions.py [--against REV ...] [--tasks 1000,3000]
                                        [--enqueue batch|single] [--repeat 3]
                                        [--parallel 2] [--keep DIR]
    python3 bench/queue_instructions.py --check [FILE]    # CI: exit 1 on a regression
    python3 bench/queue_instructions.py --record [FILE]   # write the figure --check compares with

Wall-clock and CPU-time figures on a shared VM drift by +-20 % within minutes (and by 2x
between days); an instruction count repeats far better. Each agentd measured (the working
tree's, and each `--against` git revision, exported with `git archive`) runs the no-op
workload of queue_bench.py (the daemon on its defaults, the tasks enqueued while the
workers run) under callgrind with the two `--tasks` sizes; the difference of the two
totals divided by the difference of the sizes is what one more task costs, start-up and
shutdown cancelled out. That is done `--repeat` times, the agentds taking turns, and the
figure is the median, printed with each round's figure and their spread; a change smaller
than the spread is not shown by this run. Prints one JSON line per agentd; each `--against`
line also says how the working tree's count compares with it.

Start-up (the interpreter, the imports, the daemon's start) is about 2.8 billion
instructions, four times what the 2,000 tasks between the default sizes cost: whatever in
it changes from run to run moves the per-task figure four times as much. So the measured
processes run with `MEASURED_ENV`, which takes out what depended on thread scheduling.
What is left depends on how long a run lasts (timers, the loop's wake-ups; about 0.1 million
instructions per second of a run under valgrind): a run slowed down by a loaded machine
counts a little more, which the median of the rounds absorbs. `transactions` lists each
run's write transactions, small size then large: the loop groups the writes of a tick into
one, so they show whether a difference came from how writes grouped.

`memset_per_task` is reported apart: valgrind counts a `rep stosb` (how glibc zeroes SQLite's
4 KiB pages) as one instruction per byte, so it stands for far less time than its count.

`--check` and `--record` count the working tree alone on CHECK_WORKLOAD (one pair of runs
at the default sizes). `--record` writes the figure, with that workload, the commit and the
environment it was measured in, to FILE (default bench/queue_instructions.json); `--check`
exits 1 when the count is more than TOLERANCE (10 %) over FILE's figure, and says so when
it is more than 10 % under it, as the figure should then be recorded again.

Needs valgrind (`apt-get install valgrind`). Takes about 3 minutes per agentd on 2 cores with
the defaults, more on a loaded machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

from machine import source_trees

HERE = Path(__file__).resolve().parent

# The workload, run as `python -c DRIVER N ENQUEUE` with the measured agentd first on the path.
# Its last line on stdout is the run's figures as JSON (write transactions committed).
DRIVER = """
import json
import sys
sys.path.insert(0, {bench!r})
import queue_bench
from agentd.log import configure_logging
configure_logging("warning", "json", stream=sys.stderr)
run = queue_bench.agentd_run(queue_bench.agentd_noop(int(sys.argv[1]), sys.argv[2], hold=False),
                             "normal", 8, 600)
print(json.dumps({{"transactions": run["transactions"]}}))
"""

# The environment of every measured process, beyond PYTHONPATH. Both take out instructions
# that depend on how the OS schedules threads, not on agentd:
# - OPENBLAS_NUM_THREADS=1: sqlite_vec imports numpy, whose OpenBLAS starts a thread per core
#   that spins while it waits for work (it never gets any here). How long they spin depends
#   on scheduling: 15 to 56 million instructions a run (`blas_thread_server`), which moved
#   the per-task figure by +-4 %.
# - PYTHONHASHSEED=0: string hashes, and with them dict and set probe sequences and set
#   iteration order, the same in every run (a random seed moved `unicodekeys_lookup_unicode`
#   by 3 million instructions between two runs).
MEASURED_ENV = {"OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

Run = tuple[int, int, int]  # (all instructions, memset's, write transactions) of one run

# What `--check` (CI: .ci/run) and `--record` measure: the working tree's agentd, one pair of
# runs at the default sizes, about 105 CPU-seconds (a minute on 2 idle cores). Start-up takes
# most of a run's time, so smaller sizes would save little and divide the same start-up
# wobble by a smaller difference; one round, not the median of three, as a single pair's
# figure already stays within 2.1 % of the median of five (bench/README.md).
CHECK_WORKLOAD: dict[str, Any] = {"tasks": [1000, 3000], "enqueue": "batch", "repeat": 1}
# Where the figure `--check` compares with is kept, in the repository.
RECORDED = HERE / "queue_instructions.json"
# How far the count may grow over the recorded figure before `--check` fails: about three
# times the check's run-to-run spread (3.5 % between five runs on a loaded machine), so noise
# does not fail it. A smaller regression is for the full bench's before/after (`--against`).
TOLERANCE = 0.10
RECORD_COMMAND = "python3 bench/queue_instructions.py --record"


def main() -> int:
    args = parse_args()
    if shutil.which("valgrind") is None:
        print("queue_instructions: valgrind is not installed (apt-get install valgrind)",
              file=sys.stderr)
        return 1
    if args.check or args.record:
        return check_or_record(args)
    rows = measure(args)
    return 1 if any("error" in row for row in rows) else 0


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Count the working tree's agentd and each `--against` revision's, print one JSON line
    per agentd as it is summarised, and return the lines."""
    small, large = args.tasks
    with tempfile.TemporaryDirectory(prefix="agentd-instr-") as tmp:
        sources = source_trees(Path(tmp), args.against)
        # Round by round, each agentd's two sizes in turn: a change in the machine's load
        # during the bench falls on every agentd alike. `--parallel` runs at once, as
        # callgrind runs a program on one core.
        jobs = [(index, round_, tasks) for round_ in range(args.repeat)
                for index in range(len(sources)) for tasks in (small, large)]

        def run(job: tuple[int, int, int]) -> Run | None:
            index, round_, tasks = job
            return count(tasks, args.enqueue, sources[index][1], Path(tmp),
                         f"{index}-{round_}", args.keep)

        with ThreadPoolExecutor(args.parallel) as pool:
            runs = dict(zip(jobs, pool.map(run, jobs), strict=True))
        rows: list[dict[str, Any]] = []
        for index, (label, _) in enumerate(sources):
            pairs = [(runs[index, r, small], runs[index, r, large]) for r in range(args.repeat)]
            row = summarise(label, args, [(a, b) for a, b in pairs if a and b])
            if len(row.get("per_task", ())) < args.repeat:
                row["error"] = "a callgrind run failed (see stderr)"
            first = rows[0].get("instructions_per_task") if rows else None
            if first is not None and "instructions_per_task" in row:
                # How the working tree's count compares with this revision's (medians).
                this = row["instructions_per_task"]
                row["working_tree_vs_this"] = f"{(first - this) / this:+.1%}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def check_or_record(args: argparse.Namespace) -> int:
    """`--check FILE`: count the working tree's agentd on CHECK_WORKLOAD and compare the
    figure with FILE's; 1 when it grew more than TOLERANCE, when FILE holds no figure for
    that workload, or when a run failed. `--record FILE`: count it and write FILE."""
    path: Path = args.check or args.record
    recorded: dict[str, Any] = {}
    if args.check:
        try:
            recorded = read_recorded(path)
        except ValueError as exc:
            print(f"queue_instructions: {exc}", file=sys.stderr)
            return 1
    args.tasks, args.enqueue, args.repeat = (CHECK_WORKLOAD["tasks"], CHECK_WORKLOAD["enqueue"],
                                             CHECK_WORKLOAD["repeat"])
    [row] = measure(args)
    if "error" in row:
        return 1
    if args.record:
        write_recorded(path, row)
        print(f"queue_instructions: recorded {row['instructions_per_task']:,} instructions per "
              f"no-op task in {path}: commit it")
        return 0
    passed, verdict = compare(recorded["instructions_per_task"], row["instructions_per_task"])
    print(f"queue_instructions: {verdict}", file=sys.stdout if passed else sys.stderr)
    changed = [f"{key} {was} -> {now}" for key, now in environment().items()
               if (was := recorded.get("environment", {}).get(key, "(not recorded)")) != now]
    if changed:
        print("queue_instructions: besides agentd, these differ from when the figure was "
              f"recorded, and move the count too: {'; '.join(changed)}",
              file=sys.stdout if passed else sys.stderr)
    return 0 if passed else 1


def compare(recorded: int, measured: int) -> tuple[bool, str]:
    """Whether `measured` instructions per no-op task passes the check against the
    `recorded` figure (at most TOLERANCE more), and the sentence that says so."""
    change = (measured - recorded) / recorded
    file = RECORDED.relative_to(HERE.parent)
    figures = f"{measured:,} instructions per no-op task against {recorded:,} recorded ({change:+.1%})"
    if change > TOLERANCE:
        return False, (f"{figures}: more than {TOLERANCE:.0%} over the recorded figure. If the "
                       f"change is meant (it buys something worth the cost), record the figure "
                       f"again with `{RECORD_COMMAND}` and commit {file}")
    if change < -TOLERANCE:
        return True, (f"{figures}: more than {TOLERANCE:.0%} under it. Record the new figure "
                      f"(`{RECORD_COMMAND}`, and commit {file}) so that the check guards it")
    return True, f"{figures}: within {TOLERANCE:.0%}"


def read_recorded(path: Path) -> dict[str, Any]:
    """The figure recorded in `path` (what `write_recorded` wrote), or ValueError saying why
    it cannot be compared with: missing, unreadable, or measured on another workload."""
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: record the figure with `{RECORD_COMMAND}`") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}): record the figure again with "
                         f"`{RECORD_COMMAND}`") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("instructions_per_task"), int):
        raise ValueError(f"{path} holds no `instructions_per_task` figure: record it again with "
                         f"`{RECORD_COMMAND}`")
    if recorded.get("workload") != CHECK_WORKLOAD:
        raise ValueError(f"{path} was measured on the workload {recorded.get('workload')}, the "
                         f"check runs {CHECK_WORKLOAD}: record the figure again with "
                         f"`{RECORD_COMMAND}`")
    return recorded


def write_recorded(path: Path, row: dict[str, Any]) -> None:
    """Write `row`'s figure to `path` with the workload, the agentd and the environment it
    was measured with, and how to measure it again."""
    recorded = {
        "about": (f"Instructions per no-op task, counted under callgrind by bench/queue_instructions.py. "
                  f"CI (.ci/run) runs `python3 bench/queue_instructions.py --check` and fails when "
                  f"the count grows more than {TOLERANCE:.0%} over this figure. When a change "
                  f"moves it on purpose, or a change of Python, SQLite or a dependency moved it, "
                  f"run `{RECORD_COMMAND}` (a minute or two) and commit this file."),
        "instructions_per_task": row["instructions_per_task"],
        "memset_per_task": row["memset_per_task"],
        "per_task": row["per_task"],
        "transactions": row["transactions"],
        "workload": CHECK_WORKLOAD,
        "measured": f"{datetime.date.today().isoformat()}, {row['agentd']}",
        "environment": environment(),
    }
    path.write_text(json.dumps(recorded, indent=2) + "\n")


def environment() -> dict[str, str]:
    """What, besides agentd's code, moves the count: the interpreter, SQLite, valgrind, the
    CPU (glibc picks its string functions by the CPU features valgrind reports) and the
    versions of agentd's dependencies installed."""
    valgrind = "not installed"
    if shutil.which("valgrind"):
        valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True,
                                  check=False, timeout=60).stdout.strip()
    found = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
             "valgrind": valgrind, "cpu": cpu_model()}
    try:
        requirements = metadata.requires("agentd") or []
    except metadata.PackageNotFoundError:  # measured from a checkout not installed
        requirements = []
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)
        if name is None or "extra ==" in requirement:
            continue
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name.group(0)] = metadata.version(name.group(0))
    return found


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown"."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def summarise(label: str, args: argparse.Namespace, pairs: list[tuple[Run, Run]]) -> dict[str, Any]:
    """One agentd's JSON line: the median of its per-task figures (one per round), the
    figures themselves, and each run's write transactions (how its writes grouped)."""
    small, large = args.tasks
    row: dict[str, Any] = {"bench": "queue_instructions", "agentd": label,
                           "enqueue": args.enqueue, "tasks": [small, large]}
    if not pairs:
        return row
    span = large - small
    per_task = [round((b[0] - a[0]) / span) for a, b in pairs]
    row["instructions_per_task"] = round(statistics.median(per_task))
    row["memset_per_task"] = round(statistics.median((b[1] - a[1]) / span for a, b in pairs))
    row["per_task"] = per_task
    row["spread"] = f"{(max(per_task) - min(per_task)) / row['instructions_per_task']:.1%}"
    row["transactions"] = [[a[2] for a, _ in pairs], [b[2] for _, b in pairs]]
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", action="append", default=[], metavar="REV",
                        help="a git revision to measure too (repeatable)")
    parser.add_argument("--tasks",
                        help="the two workload sizes whose difference is counted (default 1000,3000)")
    parser.add_argument("--enqueue", choices=("batch", "single"),
                        help="enqueue_many x 1000 (default: batch) or one task per call from 100 callers")
    parser.add_argument("--repeat", type=int,
                        help="rounds: each agentd's figure is the median of this many (default 3)")
    parser.add_argument("--parallel", type=int, default=2,
                        help="callgrind runs at once (default 2: one per core of the reference machine)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep the callgrind files in DIR (compare two with callgrind_annotate)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", nargs="?", type=Path, const=RECORDED, metavar="FILE",
                      help="CI's check: count the working tree on the check's workload, exit 1 "
                           f"if it is more than {TOLERANCE:.0%} over FILE's figure "
                           f"(default {RECORDED.relative_to(HERE.parent)})")
    mode.add_argument("--record", nargs="?", type=Path, const=RECORDED, metavar="FILE",
                      help="count the working tree on the check's workload and write the figure "
                           f"to FILE (default {RECORDED.relative_to(HERE.parent)})")
    args = parser.parse_args()
    if (args.check or args.record) and (args.against or args.tasks or args.enqueue
                                        or args.repeat is not None):
        parser.error("--check and --record run their own workload: drop --against, --tasks, "
                     "--enqueue and --repeat")
    sizes = sorted(int(n) for n in (args.tasks or "1000,3000").split(","))
    if len(sizes) != 2 or sizes[0] == sizes[1] or sizes[0] < 1:
        parser.error("--tasks takes two different positive sizes, e.g. 1000,3000")
    args.tasks, args.enqueue = sizes, args.enqueue or "batch"
    args.repeat = 3 if args.repeat is None else args.repeat
    if args.repeat < 1 or args.parallel < 1:
        parser.error("--repeat and --parallel take a positive number")
    return args


def count(tasks: int, enqueue: str, source: Path, tmp: Path, tag: str, keep: Path | None) -> Run | None:
    """(all instructions, memset's, write transactions) of one run under callgrind with the
    agentd in `source` first on the path, or None if it failed. `tag` names its file."""
    out = (keep or tmp) / f"callgrind-{tag}-{tasks}.out"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **MEASURED_ENV)
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
    transactions = json.loads(run.stdout.strip().splitlines()[-1])["transactions"]
    return int(total.group(1).replace(",", "")), memset, transactions


if __name__ == "__main__":
    sys.exit(main())
