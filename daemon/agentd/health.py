"""Event-loop health: how late the loop runs a timer (the lag /readyz reports), and a
watchdog thread that reports a blocked loop while it is blocked, naming what blocks it."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from agentd.log import get_logger


class StallWatch:
    """A thread that notices that the event loop has not run for `threshold` seconds while
    it happens: it logs `loop.stalled` (seconds so far, the asyncio task running, the plugin
    whose code is on the stack, the line the loop is at), then `loop.stall_ended` with the
    stall's length once the loop runs again.

    The loop's only cost is `beat()`, called by `LagMonitor` at each of its ticks.

    Args:
        threshold: seconds without a beat, beyond the beat interval, that make a stall.
        interval: seconds between beats when the loop is healthy.
        owner_of: the plugin whose module a module name is, or None (reads only, from the
            watch thread, while the loop is blocked).
    """

    def __init__(self, threshold: float, interval: float,
                 owner_of: Callable[[str], str | None]) -> None:
        self.threshold = threshold
        self.interval = interval
        self._owner_of = owner_of
        self._last_beat = time.monotonic()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = get_logger("loop")

    def beat(self) -> None:
        """The loop ran (called from the loop)."""
        self._last_beat = time.monotonic()

    def start(self) -> None:
        """Watch the running loop of the calling thread."""
        self._last_beat = time.monotonic()
        self._stopped.clear()
        self._thread = threading.Thread(
            target=self._watch, args=(asyncio.get_running_loop(), threading.get_ident()),
            name="agentd-stall-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; returns once the thread has ended (it wakes at once)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        stalled_since: float | None = None  # the last beat before the current stall
        culprit: dict[str, Any] = {}
        # Checked four times per beat interval (or per threshold, when shorter): a stall is
        # reported at most a quarter of that after it passes the threshold.
        while not self._stopped.wait(min(self.threshold, self.interval) / 4):
            last_beat = self._last_beat
            if stalled_since is None:
                blocked = time.monotonic() - last_beat - self.interval
                if blocked >= self.threshold:
                    stalled_since = last_beat
                    culprit = self._culprit(loop, loop_thread)
                    self._log.warning("loop.stalled", seconds=round(blocked, 3), **culprit)
            elif last_beat != stalled_since:
                length = last_beat - stalled_since - self.interval
                self._log.warning("loop.stall_ended", seconds=round(length, 3), **culprit)
                stalled_since = None

    def _culprit(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> dict[str, Any]:
        """What the loop thread is running: its asyncio task, the plugin whose code is on
        its stack, and the innermost Python line."""
        found: dict[str, Any] = {}
        try:
            # Reads the loop's current-task entry; safe from another thread in CPython.
            task = asyncio.current_task(loop)
        except RuntimeError:
            task = None
        if task is not None:
            found["task"] = task.get_name()
        frame: FrameType | None = sys._current_frames().get(loop_thread)
        if frame is not None:
            found["at"] = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        while frame is not None:
            plugin = self._owner_of(str(frame.f_globals.get("__name__", "")))
            if plugin is not None:
                found["plugin"] = plugin
                break
            frame = frame.f_back
        return found


class LagMonitor:
    """Measures how late a periodic timer fires; `lag` is the worst of the last few ticks.

    With `stall_warning` seconds (0: off), its ticks are also the heartbeat of a
    `StallWatch`, which runs while this does; `owner_of` maps a module to its plugin.
    """

    def __init__(self, interval: float = 0.25, window: int = 8, *, stall_warning: float = 0.0,
                 owner_of: Callable[[str], str | None] = lambda module: None) -> None:
        self.interval = interval
        self._samples: list[float] = [0.0] * window
        self._tick = 0
        self._stall_watch = (StallWatch(stall_warning, interval, owner_of)
                             if stall_warning > 0 else None)

    @property
    def lag(self) -> float:
        return max(self._samples)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        watch = self._stall_watch
        if watch is not None:
            watch.start()
        try:
            while True:
                started = loop.time()
                await asyncio.sleep(self.interval)
                if watch is not None:
                    watch.beat()
                self._samples[self._tick % len(self._samples)] = max(
                    0.0, loop.time() - started - self.interval
                )
                self._tick += 1
        finally:
            if watch is not None:
                watch.stop()
