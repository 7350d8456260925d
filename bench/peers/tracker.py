"""Worker-side bookkeeping shared by the peer task modules (runs inside the peers' workers).

The worker learns from its environment where to write (`BENCH_OUT`) and how many task
completions make a run (`BENCH_EXPECT`). Each worker process writes `ready-<pid>.json` when
it has booted and `progress-<pid>.json` (atomically) with its counts and the wall-clock
times of its first task start and last completion: at once when its own count reaches the
expected total (one worker process), else from a flusher thread every 5 ms (several worker
processes; the driver adds them up). Times are recorded where they happen, so neither the
flush interval nor the driver's polling shows in a figure.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path


class Tracker:
    def __init__(self) -> None:
        self.out = Path(os.environ.get("BENCH_OUT", "."))
        self.expect = int(os.environ.get("BENCH_EXPECT", "0"))
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self.first_start: float | None = None
        self.last_done = 0.0
        self.succeeded = 0
        self.failed = 0

    def ready(self) -> None:
        """Called once per worker thread by Huey, once per process by Dramatiq."""
        with self._lock:
            if self._flusher is not None:
                return
            self._flusher = threading.Thread(target=self._flush_loop, name="bench-flush", daemon=True)
        self._flusher.start()
        _write_json(self.out / f"ready-{os.getpid()}.json", {"pid": os.getpid(), "at": time.time()})

    def started(self) -> None:
        if self.first_start is None:
            now = time.time()
            with self._lock:
                if self.first_start is None:
                    self.first_start = now

    def finished(self, ok: bool) -> None:
        now = time.time()
        with self._lock:
            if ok:
                self.succeeded += 1
            else:
                self.failed += 1
            self.last_done = now
            complete = self.expect and self.succeeded + self.failed == self.expect
        if complete:
            self.flush()

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"first_start": self.first_start, "last_done": self.last_done,
                    "succeeded": self.succeeded, "failed": self.failed}

    def flush(self) -> None:
        _write_json(self.out / f"progress-{os.getpid()}.json", self.snapshot())

    def _flush_loop(self) -> None:
        last = None
        while True:
            time.sleep(0.005)
            snapshot = self.snapshot()
            if snapshot != last:
                self.flush()
                last = snapshot


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")  # one writer per tmp file
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


TRACKER = Tracker()
