"""The plugin the tests of limits per key load (tests/test_key_limits.py): tasks limited per
user and per model, and one whose LLM calls a 429 holds back per model.

Tasks record what they did in module-level state the tests read through `sys.modules`,
and block on named gates the tests open, so no test needs to sleep.
"""

import asyncio

from agentd import Plugin

plugin = Plugin("kl")

GATES: dict[str, asyncio.Event] = {}
RUNNING: dict[str, int] = {}  # per user, now
PEAK: dict[str, int] = {}  # per user, the most at once


def gate(name: str) -> asyncio.Event:
    return GATES.setdefault(name, asyncio.Event())


@plugin.task(concurrency=2, concurrency_key="{user}")
async def per_user(ctx, user: str, name: str) -> None:
    RUNNING[user] = RUNNING.get(user, 0) + 1
    PEAK[user] = max(PEAK.get(user, 0), RUNNING[user])
    gate(f"started:{name}").set()
    try:
        await gate(name).wait()
    finally:
        RUNNING[user] -= 1


@plugin.task(rate="1/h", rate_key=lambda args: args["model"])
async def per_model(ctx, model: str) -> str:
    return model


@plugin.task(rate_key="{model}")
async def ask(ctx, model: str) -> str:
    result = await ctx.llm.chat([{"role": "user", "content": "hi"}], model=model)
    return result.content


@plugin.task(concurrency=1, concurrency_key="{tenant}")
async def tenanted(ctx, **args) -> None:
    return None
