"""The tasks queue_bench.py runs on agentd: a no-op and a dispatch-latency stamp."""

import time

from agentd import Plugin

plugin = Plugin("bench", description="queue benchmark tasks")


@plugin.task()
async def noop(ctx):
    return None


@plugin.task()
async def stamp(ctx, t0: float):
    """Seconds from `t0` (a `time.perf_counter()` taken just before the enqueue) to now."""
    return time.perf_counter() - t0
