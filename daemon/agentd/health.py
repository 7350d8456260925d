"""Event-loop lag: how late the loop runs a timer, the signal that something blocks it."""

from __future__ import annotations

import asyncio


class LagMonitor:
    """Measures how late a periodic timer fires; `lag` is the worst of the last few ticks."""

    def __init__(self, interval: float = 0.25, window: int = 8) -> None:
        self.interval = interval
        self._samples: list[float] = [0.0] * window
        self._tick = 0

    @property
    def lag(self) -> float:
        return max(self._samples)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval)
            self._samples[self._tick % len(self._samples)] = max(
                0.0, loop.time() - started - self.interval
            )
            self._tick += 1
