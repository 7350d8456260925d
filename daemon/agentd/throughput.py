"""How many tasks had finished, sampled every few seconds over the last hour: the history
behind the dashboard's throughput chart (`GET /v1/tasks/throughput`), so a page opened now
draws the last hour at once instead of starting from nothing.

Each sample is the store's count of tasks in a final state (succeeded, failed, dead,
cancelled), every daemon's on PostgreSQL, as `/v1/tasks/counts` gives it: the difference of
two samples over their interval is tasks finished per second. Tasks deleted or purged in
between lower the count; that interval reads as none finished. The samples live in memory:
a restarted daemon's history starts at its start.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

from agentd.log import get_logger
from agentd.taskqueue import FINAL_STATES, TaskStatus

SAMPLE_EVERY = 10.0  # seconds
KEEP = 360  # samples: an hour at SAMPLE_EVERY
# How long a sample waits for the store's count (PostgreSQL may be away): a missed
# sample leaves a gap, it never holds up the next.
COUNT_TIMEOUT = 2.0


class ThroughputHistory:
    """Samples of (Unix time, tasks finished so far), oldest first, at most `keep`."""

    def __init__(self, counts: Callable[[], Awaitable[Mapping[TaskStatus, int]]], *,
                 every: float = SAMPLE_EVERY, keep: int = KEEP, timeout: float = COUNT_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self.every = every
        self.timeout = timeout
        self.samples: deque[tuple[float, int]] = deque(maxlen=keep)
        self._counts = counts
        self._clock = clock
        self._log = get_logger("throughput")

    async def sample(self) -> None:
        """Add one sample now; a store that does not answer in time adds none."""
        try:
            # Not wait_for: on 3.11 it can swallow a cancellation that lands as the count
            # completes, and the daemon's stop would then wait on this loop.
            async with asyncio.timeout(self.timeout):
                by_status = await self._counts()
        except Exception as exc:  # the store away: the chart shows a gap, the loop goes on
            self._log.info("throughput.sample_skipped", error=f"{type(exc).__name__}: {exc}")
            return
        self.samples.append((round(self._clock(), 3), sum(by_status.get(state, 0) for state in FINAL_STATES)))

    async def run(self) -> None:
        """Sample every `every` seconds until cancelled; the first sample at once."""
        while True:
            await self.sample()
            await asyncio.sleep(self.every)
