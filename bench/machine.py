"""What every benchmark here reports besides its figures: how busy the rest of the machine
was while it ran (these machines are shared), and which agentd it measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class CpuWatch:
    """How much CPU processes other than this run used meanwhile. `ours` counts CPU-seconds
    of helper processes that belong to the run (e.g. the local Redis a peer uses)."""

    def __init__(self, ours: Callable[[], float] = lambda: 0.0) -> None:
        self.loadavg_start = os.getloadavg()[0]
        self._ours = ours
        self.busy0, self.own0, self.ours0 = machine_busy(), own_cpu(), ours()
        self.t0 = time.monotonic()

    def report(self) -> str:
        wall = time.monotonic() - self.t0
        others = ((machine_busy() - self.busy0) - (own_cpu() - self.own0)
                  - (self._ours() - self.ours0))
        share = max(0.0, others) / (wall * (os.cpu_count() or 1))
        return (f"Other processes used about {max(0.0, others):.0f} CPU-s ({share:.0%} of the "
                f"machine) during the run; 1-minute load average {self.loadavg_start:.2f} at its start.")


class BenchRun:
    """A benchmark run's bookkeeping: agentd's logs kept off stdout, each figure row printed
    as a JSON line and kept for the markdown table, the agentd measured (read before the
    runs: daemon/ may be edited while they go on), how busy the machine is, the wall time."""

    def __init__(self, name: str, ours: Callable[[], float] = lambda: 0.0) -> None:
        from agentd.log import configure_logging

        configure_logging("warning", "json", stream=sys.stderr)
        self.rows: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.revision = agentd_revision()
        self.load = CpuWatch(ours)
        if self.load.loadavg_start > 0.5:
            print(f"{name}: the 1-minute load average is {self.load.loadavg_start:.2f} before the "
                  "run: other processes will skew the figures", file=sys.stderr)

    def emit(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def exit_code(self) -> int:
        """1 when a row reports an error, else 0."""
        return 1 if any("error" in row for row in self.rows) else 0


def machine_busy() -> float:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """This process's CPU and its reaped descendants' (drivers, workers, daemons)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def agentd_revision() -> str:
    """Which agentd was measured: the repo's commit (and whether daemon/ differed from it),
    or the directory it was imported from when that is not this repo (e.g. an exported
    commit put first on PYTHONPATH)."""
    import agentd

    source = Path(agentd.__file__).resolve().parent
    if not source.is_relative_to(REPO):
        return f"imported from {source}"
    return repo_revision()


def repo_revision() -> str:
    """This checkout's commit, and whether daemon/ differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "daemon"], check=True,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "an unknown commit"
    return f"commit {head} with uncommitted changes in daemon/" if dirty else f"commit {head}"


def source_trees(tmp: Path, revisions: list[str]) -> list[tuple[str, Path]]:
    """(label, `daemon/` folder) for the working tree and each of `revisions`, copied or
    exported under `tmp`: every agentd a bench compares is imported through PYTHONPATH from
    such a copy, the working tree's too, so that all are imported the same way."""
    working_tree = tmp / "src-0" / "daemon"
    shutil.copytree(REPO / "daemon", working_tree, ignore=shutil.ignore_patterns("__pycache__"))
    sources: list[tuple[str, Path]] = [(repo_revision(), working_tree)]
    for rev in revisions:
        export = tmp / f"src-{len(sources)}"
        export.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "daemon"],
                                 check=True, capture_output=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True, timeout=60)
        sources.append((f"commit {rev}", export / "daemon"))
    return sources
