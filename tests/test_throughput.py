"""ThroughputHistory: samples of the store's finished tasks, an hour of them, and a gap
(not a hang, not a crash) when the store does not answer."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from agentd.throughput import ThroughputHistory


async def test_each_sample_is_the_count_of_finished_tasks_and_the_oldest_go() -> None:
    counts = iter([{"queued": 5, "succeeded": 1}, {"succeeded": 2, "failed": 1, "dead": 1, "cancelled": 1,
                                                   "running": 3, "waiting": 2}, {"succeeded": 9}])
    times = iter([100.0, 110.0, 120.0])

    async def read() -> Mapping[str, int]:
        return next(counts)

    history = ThroughputHistory(read, keep=2, clock=lambda: next(times))  # type: ignore[arg-type]
    for _ in range(3):
        await history.sample()
    assert list(history.samples) == [(110.0, 5), (120.0, 9)]


async def test_a_store_that_fails_or_hangs_leaves_a_gap() -> None:
    async def broken() -> Mapping[str, int]:
        raise ConnectionError("the database is away")

    async def hung() -> Mapping[str, int]:
        await asyncio.Event().wait()
        return {}

    for counts in (broken, hung):
        history = ThroughputHistory(counts, timeout=0.05)  # type: ignore[arg-type]
        await history.sample()
        assert list(history.samples) == []
