"""The plugin the durable-wait tests load (copied into each test's plugin directory).

Its tasks publish what they do (`wt.top` each time their code runs from the top, `wt.step`
when a memoized step's body runs), so a test counts replays from the events."""

import asyncio
import time

from agentd import Plugin, WaitTimeoutError

plugin = Plugin("wt")


def _stepped(ctx) -> float:
    ctx.publish("wt.step", {"task": ctx.task.id})
    return time.time()


@plugin.task()
async def nap(ctx, seconds: float):
    """Sleep durably between a memoized step and the return."""
    ctx.publish("wt.top", {"task": ctx.task.id})
    before = await ctx.step("before", lambda: _stepped(ctx))
    await ctx.sleep(seconds)
    return {"before": before, "woke": time.time(), "attempt": ctx.task.attempt}


@plugin.task()
async def nap_until(ctx, when: float):
    await ctx.sleep_until(when)
    return time.time()


@plugin.task()
async def await_event(ctx, pattern: str, match: dict | None = None, timeout: float | None = None,
                      publish_first: dict | None = None):
    """Wait for an event; `publish_first` (topic, data) is published just after the wait is
    asked, before the task's waiting state can be written."""
    ctx.publish("wt.top", {"task": ctx.task.id})
    if publish_first is not None:
        asyncio.get_running_loop().call_soon(ctx.publish, publish_first["topic"], publish_first["data"])
    try:
        event = await ctx.wait_for(pattern, match, timeout=timeout)
    except WaitTimeoutError as exc:
        return {"timed_out": str(exc)}
    return {"id": event.id, "topic": event.topic, "data": dict(event.data)}


@plugin.task()
async def approve(ctx, draft: str, timeout: float | None = None, prompt: str = "Send this draft?"):
    """Ask before 'sending' the draft; the send is a step, run once."""
    ctx.publish("wt.top", {"task": ctx.task.id})
    try:
        answer = await ctx.ask(prompt, {"draft": draft}, timeout=timeout)
    except WaitTimeoutError:
        return {"answer": None, "timed_out": True}
    return {"answer": answer}


@plugin.task()
async def child(ctx):
    ctx.publish("wt.child_ran", {"task": ctx.task.id})
    return ctx.task.id


@plugin.task()
async def call_then_nap(ctx, seconds: float):
    """A durable child, then a sleep: the run after the sleep gets the same child back."""
    first = await ctx.call("wt.child")
    await ctx.sleep(seconds)
    return {"child": first, "again": await ctx.call("wt.child")}
