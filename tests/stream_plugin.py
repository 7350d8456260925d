"""The plugin the stream, WebSocket and events tests load (copied into each test's plugin
directory as `st.py`).

Tasks and handlers record what they saw in module-level state the tests read through
`sys.modules["agentd_plugins.st"]`, and block on named gates the tests open, so no test
needs to sleep.
"""

import asyncio

from agentd import Plugin

plugin = Plugin("st")

GATES: dict[str, asyncio.Event] = {}
HANDLED: list[int] = []
TRIGGERED: list[dict] = []
FLAKY_ATTEMPTS: list[tuple[int, int]] = []


def gate(name: str) -> asyncio.Event:
    return GATES.setdefault(name, asyncio.Event())


@plugin.task()
async def echo(ctx, value=None):
    return value


@plugin.task()
async def wait_gate(ctx, name: str, result=None):
    gate(f"started:{name}").set()
    await gate(name).wait()
    return result


@plugin.task()
async def parent(ctx, name: str):
    ctx.progress("parent.before", {"name": name})
    child_result = await ctx.call("st.child", name=name)
    return {"child": child_result}


@plugin.task()
async def child(ctx, name: str):
    ctx.progress("child.working", {"name": name})
    gate(f"started:{name}").set()
    await gate(name).wait()
    return f"child {name} done"


@plugin.on("slow.*")
async def slow_handler(ctx, event):
    """Fire-and-forget, blocked on a gate: holds a handler slot until the test opens it."""
    gate("slow.started").set()
    await gate("slow.release").wait()
    HANDLED.append(event.id)


@plugin.on("order.*", durable=True)
async def on_order(ctx, event):
    TRIGGERED.append({
        "task_id": ctx.task.id, "task_name": ctx.task.name, "attempt": ctx.task.attempt,
        "event_type": type(event).__name__, "event_id": event.id, "topic": event.topic,
        "data": dict(event.data),
    })


@plugin.on("flaky.*", durable=True, max_attempts=3)
async def flaky(ctx, event):
    FLAKY_ATTEMPTS.append((ctx.task.id, ctx.task.attempt))
    if ctx.task.attempt == 1:
        raise RuntimeError("the first attempt of a durable handler fails")
