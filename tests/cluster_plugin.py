"""The plugin of the tests of several daemons on one PostgreSQL database
(test_cluster_queue.py), copied into each test's plugin directory.

Each daemon loads its own copy of the module, so what the tasks record goes to one module
they share (`SHARED`), created by the first. `[plugins.ct] node` names the daemon a task
ran on."""

import asyncio
import sys
import types
from pathlib import Path

from agentd import Plugin

plugin = Plugin("ct")

SHARED = sys.modules.setdefault("agentd_cluster_shared", types.ModuleType("agentd_cluster_shared"))
if not hasattr(SHARED, "runs"):
    SHARED.runs = []  # (task id, node) per attempt started
    SHARED.limited = {"now": 0, "max": 0, "done": 0}
    SHARED.gates = {}
    SHARED.started = {}  # task id -> asyncio.Event set when it starts


def gate(name):
    return SHARED.gates.setdefault(name, asyncio.Event())


def started(task_id):
    return SHARED.started.setdefault(task_id, asyncio.Event())


@plugin.task()
async def work(ctx, n=0):
    SHARED.runs.append((ctx.task.id, ctx.config.get("node")))
    started(ctx.task.id).set()
    return n


@plugin.task(concurrency=2)
async def limited(ctx):
    SHARED.runs.append((ctx.task.id, ctx.config.get("node")))
    SHARED.limited["now"] += 1
    SHARED.limited["max"] = max(SHARED.limited["max"], SHARED.limited["now"])
    try:
        await asyncio.sleep(0.02)  # noqa: sleep - holds its place while others try to start
    finally:
        SHARED.limited["now"] -= 1
        SHARED.limited["done"] += 1


@plugin.task()
async def block(ctx, name):
    SHARED.runs.append((ctx.task.id, ctx.config.get("node")))
    started(ctx.task.id).set()
    try:
        await gate(name).wait()
    except asyncio.CancelledError:
        gate(f"cancelled:{ctx.task.id}").set()
        raise


@plugin.task()
async def takeover(ctx):
    """Step one, then (on a daemon whose config says `hang`) wait to be killed; else step
    two. Each step's run is a line of `runs_file`, shared by the processes."""
    runs = Path(ctx.config["runs_file"])

    def mark(step):
        with runs.open("a") as out:
            out.write(f"{step} {ctx.task.id} {ctx.config.get('node')}\n")
        return step

    await ctx.step("one", lambda: mark("one"))
    if ctx.config.get("hang"):
        ctx.log.info("ct.hanging", task_id=ctx.task.id)
        await asyncio.Event().wait()
    await ctx.step("two", lambda: mark("two"))
    return "done"
