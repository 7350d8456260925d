"""The tasks pg_bench.py runs on agentd daemons in subprocesses: a no-op, a dispatch-latency
stamp, and a hold that keeps one worker busy.

The stamp tells the bench its latency the way the procrastinate stamp does: with a
`pg_notify` on a connection of its own (`PGBENCH_NOTIFY_URL`), sent after the latency is
taken, so the bench learns it without polling anything. Without that variable (agentd on
SQLite) the bench waits for the task's result over HTTP instead."""

import asyncio
import json
import os
import time

from agentd import Plugin

plugin = Plugin("pgbench", description="PostgreSQL benchmark tasks")
MAX_HOLD = 600.0  # seconds: a hold never outlives a bench run, whatever it was asked
CHANNEL = "pgbench_stamp"
_notify: dict[str, object] = {}


@plugin.task()
async def noop(ctx):
    return None


@plugin.task()
async def stamp(ctx, t0: float):
    """`time.perf_counter()` - `t0` (taken in the bench process just before the enqueue
    request; CLOCK_MONOTONIC is one clock for every process of the machine) and the pid."""
    result = {"latency": time.perf_counter() - t0, "pid": os.getpid(), "t0": t0}
    url = os.environ.get("PGBENCH_NOTIFY_URL")
    if url:
        import asyncpg

        conn = _notify.get("conn")
        if conn is None:
            conn = _notify["conn"] = await asyncpg.connect(url)
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps(result))
    return result


@plugin.task(max_attempts=1)
async def hold(ctx, seconds: float):
    """Keeps the worker that runs it busy for `seconds` (or until cancelled or stopped)."""
    await asyncio.sleep(min(seconds, MAX_HOLD))  # the point of the task


@plugin.shutdown
async def close(ctx):
    conn = _notify.pop("conn", None)
    if conn is not None:
        await conn.close()
