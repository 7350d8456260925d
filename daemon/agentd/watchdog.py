"""What systemd hears while the daemon serves: a watchdog ping that means the loop is
healthy, and a status line that says what the daemon is doing.

`WATCHDOG=1` goes out only while the event loop's lag (`LagMonitor.lag`, the worst of its
last ticks) is within `[server] max_loop_lag`: a loop that still runs now and then, but
too late to serve anyone (a plugin hogging it, a CPU-bound handler), stops the pings, and
systemd restarts the daemon once `WatchdogSec` passes without one. A loop stuck for good
sends nothing at all, since the pings come from the loop itself. A lag that passes clears
the way again: one late tick does not restart anything, a whole `WatchdogSec` does.

`STATUS=` (what `systemctl status agentd` shows) is sent at each tick, every few seconds:
`12 running, 340 queued, 3 streams, lag 2 ms`. Counting the queued tasks reads the store,
which may be away (PostgreSQL down): the count then reads as unknown, and never delays the
ping, which depends on the loop alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from agentd.log import get_logger
from agentd.systemd import Notifier

STATUS_EVERY = 5.0  # seconds between status lines when no watchdog asks for more
# How long the status line waits for the store's count of queued tasks.
_COUNT_TIMEOUT = 0.5


class ServiceWatchdog:
    """Tells systemd, every `tick` seconds, that the loop is healthy (WATCHDOG=1, only
    then) and what the daemon is doing (STATUS=).

    Args:
        notifier: the socket systemd listens on (everything is a no-op without one).
        lag: the event loop's current lag in seconds.
        max_lag: the lag beyond which the loop counts as unhealthy.
        running: the tasks this daemon runs now.
        queued: the tasks waiting in the store (all daemons' on PostgreSQL).
        streams: the open SSE and WebSocket streams.
        stopping: whether the daemon is stopping: the status line (systemd shows the stop's
            own) ends, the ping goes on.
        safe_mode: whether the daemon serves in safe mode: the status line begins by saying so.
        reloading: whether a reload is under way: its own status line stands until it is
            over, the ping goes on.
    """

    def __init__(self, notifier: Notifier, *, lag: Callable[[], float], max_lag: float,
                 running: Callable[[], int], queued: Callable[[], Awaitable[int]],
                 streams: Callable[[], int], stopping: Callable[[], bool],
                 safe_mode: Callable[[], bool], reloading: Callable[[], bool] = lambda: False) -> None:
        self._notifier = notifier
        self._lag = lag
        self._max_lag = max_lag
        self._running = running
        self._queued = queued
        self._streams = streams
        self._stopping = stopping
        self._safe_mode = safe_mode
        self._reloading = reloading
        self.withheld = False  # whether the last tick held the ping back
        self._log = get_logger("watchdog")

    @property
    def tick(self) -> float:
        """Seconds between ticks: four per watchdog timeout (a lagging tick or two is
        outlived), at most STATUS_EVERY."""
        interval = self._notifier.watchdog_interval  # half the timeout
        return min(STATUS_EVERY, interval / 2) if interval else STATUS_EVERY

    async def run(self) -> None:
        """Tick until cancelled; the first tick at once."""
        while True:
            await self.report()
            await asyncio.sleep(self.tick)

    async def report(self) -> None:
        """One tick: the ping if the loop is healthy, and the status line."""
        lag = self._lag()
        healthy = lag <= self._max_lag
        if self._stopping() or self._reloading():
            if healthy and self._notifier.watchdog_interval:
                self._notifier.notify(WATCHDOG="1")
            return
        status = await self.status_line(lag)
        if self._stopping():  # began while the store was asked: its line is the last
            return
        if healthy and self._notifier.watchdog_interval:
            self._notifier.notify(WATCHDOG="1", STATUS=status)
        elif healthy:
            self._notifier.notify(STATUS=status)
        else:
            self._notifier.notify(STATUS=f"{status}; watchdog withheld: lag over {self._max_lag:g} s")
        if healthy == self.withheld:  # it changed
            self.withheld = not healthy
            if self.withheld:
                self._log.warning("watchdog.withheld", lag=round(lag, 3), max_loop_lag=self._max_lag,
                                  pinging=bool(self._notifier.watchdog_interval))
            else:
                self._log.info("watchdog.resumed", lag=round(lag, 3))

    async def status_line(self, lag: float) -> str:
        """`12 running, 340 queued, 3 streams, lag 2 ms`, after `safe mode: ` in safe mode."""
        try:
            # Not wait_for: on 3.11 it can swallow a cancellation that lands as the count
            # completes, and the daemon's stop would then wait on this loop.
            async with asyncio.timeout(_COUNT_TIMEOUT):
                queued = str(await self._queued())
        except Exception:  # the store away or slow: the line goes out anyway
            queued = "?"
        return (("safe mode: " if self._safe_mode() else "")
                + f"{self._running()} running, {queued} queued, {self._streams()} streams, "
                f"lag {lag * 1000:.0f} ms")
