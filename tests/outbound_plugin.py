"""The plugin the outbound tests load (copied into each test's plugin directory as `ob.py`):
tasks and a handler that send mail, post webhooks and chat with the LLM through `ctx`.

What the handler did is recorded in module-level state the tests read through
`sys.modules["agentd_plugins.ob"]`; tasks that must wait for the test block on named gates.
"""

import asyncio

from agentd import Context, Event, Plugin, PluginContext

plugin = Plugin("ob")

GATES: dict[str, asyncio.Event] = {}
# (event id, task id of the first post, task id of the second post with the same key)
POSTED: list[tuple[int, int, int]] = []
CHANGED = asyncio.Event()


def gate(name: str) -> asyncio.Event:
    return GATES.setdefault(name, asyncio.Event())


# -- mail -------------------------------------------------------------------------------------


@plugin.task(max_attempts=3)
async def mail(ctx: Context, to, subject: str, text: str, html=None, fail_first: bool = False) -> int:
    """Send one mail; with fail_first, the first attempt raises after sending."""
    record = await ctx.mail.send(to, subject, text, html=html)
    if fail_first and ctx.task.attempt == 1:
        raise RuntimeError("failed after sending")
    return record.id


@plugin.task()
async def bad_mail(ctx: Context, to) -> str:
    """What send() raises for this address (no task is enqueued)."""
    try:
        await ctx.mail.send(to, "subject", "text")
    except ValueError as exc:
        return f"ValueError: {exc}"
    return "no error"


# -- webhooks ---------------------------------------------------------------------------------


@plugin.task(max_attempts=3)
async def post(ctx: Context, url: str, body, fail_first: bool = False) -> int:
    """Post one webhook; with fail_first, the first attempt raises after posting."""
    record = await ctx.webhook.post(url, body)
    if fail_first and ctx.task.attempt == 1:
        raise RuntimeError("failed after posting")
    return record.id


@plugin.task()
async def bad_post(ctx: Context, url: str) -> str:
    try:
        await ctx.webhook.post(url, {"a": 1})
    except ValueError as exc:
        return f"ValueError: {exc}"
    return "no error"


@plugin.on("ob.ping")
async def on_ping(ctx: PluginContext, event: Event) -> None:
    """Posts the event twice under one key: the receiver must get it once."""
    key = f"x:{event.id}"
    body = {"event_id": event.id, "n": event.data.get("n")}
    first = await ctx.webhook.post(ctx.config["url"], body, idempotency_key=key)
    second = await ctx.webhook.post(ctx.config["url"], body, idempotency_key=key)
    POSTED.append((event.id, first.id, second.id))
    CHANGED.set()


# -- LLM --------------------------------------------------------------------------------------


@plugin.task(max_attempts=3)
async def chat(ctx: Context, prompt: str = "hi", calls: int = 1, wait=None) -> dict:
    """`calls` chats in a row (after gate `wait` opens); returns the last result and all contents."""
    if wait is not None:
        await gate(wait).wait()
    contents = []
    result = None
    for _ in range(calls):
        result = await ctx.llm.chat([{"role": "user", "content": prompt}])
        contents.append(result.content)
    assert result is not None
    return {**result.to_dict(), "contents": contents}


@plugin.task(max_attempts=1)
async def chat_cut_short(ctx: Context, cut: str) -> str:
    """Chats in an inner task and cancels it once gate `cut` opens; returns the name of the
    exception the cancelled chat raised."""
    chatting = asyncio.create_task(ctx.llm.chat([{"role": "user", "content": "hi"}]))
    await gate(cut).wait()
    chatting.cancel()
    try:
        await chatting
    except BaseException as exc:  # what the chat raised, a CancelledError too, is the answer
        return type(exc).__name__
    return "finished"


@plugin.task(max_attempts=3)
async def use_tools(ctx: Context) -> dict:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    result = await ctx.llm.chat([{"role": "user", "content": "weather?"}], tools=tools)
    return result.to_dict()


@plugin.task(max_attempts=3, token_budget=5)
async def budgeted(ctx: Context) -> str:
    result = await ctx.llm.chat([{"role": "user", "content": "hi"}])
    return result.content
