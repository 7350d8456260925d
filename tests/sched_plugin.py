"""The plugin the scheduler tests load (copied into each test's plugin directory as sched.py).

It declares schedules the three ways a plugin can: `@plugin.schedule` on a task, and
`plugin.schedule(...)` naming a task (with args) or an event (with data). Its tasks record
what they did in module-level state the tests read through `sys.modules`, and block on
named gates the tests open, so no test needs to sleep.
"""

import asyncio

from agentd import Plugin

plugin = Plugin("sched")

GATES: dict[str, asyncio.Event] = {}
RUNS: list[tuple[str, int, object]] = []
CANCELLED: list[int] = []


def gate(name: str) -> asyncio.Event:
    return GATES.setdefault(name, asyncio.Event())


@plugin.task()
@plugin.schedule(every="30m")
async def tick(ctx):
    RUNS.append(("tick", ctx.task.id, None))
    return "tick"


@plugin.task()
async def work(ctx, label="work"):
    RUNS.append(("work", ctx.task.id, label))
    return label


@plugin.task()
async def block(ctx, name: str):
    RUNS.append(("block", ctx.task.id, name))
    gate(f"started:{ctx.task.id}").set()
    gate(f"started:{name}").set()
    try:
        await gate(name).wait()
    except asyncio.CancelledError:
        CANCELLED.append(ctx.task.id)
        raise
    return name


@plugin.task(max_attempts=1)
async def fails(ctx):
    raise RuntimeError(f"scheduled failure {ctx.task.id}")


plugin.schedule(name="hourly", every="1h", task="sched.work", args={"label": "hourly"})
plugin.schedule(event="sched.ping", every="2h", data={"n": 1}, catch_up="skip")
