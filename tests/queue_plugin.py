"""The plugin the queue tests load (copied into each test's plugin directory).

Tasks record what they did in module-level state the tests read through `sys.modules`,
and block on named gates the tests open, so no test needs to sleep.
"""

import asyncio
import contextvars
import threading

from agentd import Fail, Plugin, Retry, TaskFailedError

plugin = Plugin("qt")

GATES: dict[str, asyncio.Event] = {}
STARTED: list[tuple[str, int]] = []
STEP_RUNS: dict[str, int] = {}
CANCELLED: list[int] = []
RUNNING = {"now": 0, "max": 0}
THREADS: list[int] = []
TAG: contextvars.ContextVar[str] = contextvars.ContextVar("qt_tag", default="untouched")
TAGS_SEEN: list[str] = []


def gate(name: str) -> asyncio.Event:
    return GATES.setdefault(name, asyncio.Event())


@plugin.task()
async def echo(ctx, value=None):
    STARTED.append(("echo", ctx.task.id))
    return value


@plugin.task()
async def tag_context(ctx, tag: str):
    """What a task that binds context (structlog's bind_contextvars) leaves behind."""
    TAGS_SEEN.append(TAG.get())
    TAG.set(tag)


@plugin.task()
async def any_keywords(ctx, **kwargs):
    return kwargs


@plugin.task()
async def info(ctx):
    ctx.progress("looked", {"at": "myself"})
    return {"id": ctx.task.id, "name": ctx.task.name, "attempt": ctx.task.attempt,
            "parent": ctx.task.parent_id, "config": dict(ctx.config)}


@plugin.task()
async def wait_gate(ctx, name: str, result=None):
    STARTED.append((name, ctx.task.id))
    gate(f"started:{name}").set()
    try:
        await gate(name).wait()
    except asyncio.CancelledError:
        CANCELLED.append(ctx.task.id)
        raise
    gate(f"done:{name}").set()
    return result


@plugin.task()
async def gate_then_step(ctx, name: str):
    STARTED.append((name, ctx.task.id))
    gate(f"started:{name}").set()
    await gate(name).wait()
    return await ctx.step("after the gate", lambda: name)


@plugin.task()
async def step_named(ctx, key: str):
    return await ctx.step(key, lambda: key)


@plugin.task()
async def gate_then_call(ctx, name: str):
    STARTED.append((name, ctx.task.id))
    gate(f"started:{name}").set()
    await gate(name).wait()
    return await ctx.call("qt.echo", value=f"child of {name}")


@plugin.task(max_attempts=3)
async def fail_after_gate(ctx, name: str):
    STARTED.append((name, ctx.task.id))
    gate(f"started:{name}").set()
    await gate(name).wait()
    gate(f"done:{name}").set()
    raise RuntimeError(f"{name} failed")


@plugin.task(max_attempts=3)
async def always_fails(ctx):
    raise RuntimeError(f"attempt {ctx.task.attempt} failed")


@plugin.task(max_attempts=3)
async def retry_later(ctx, delay: float):
    if ctx.task.attempt == 1:
        raise Retry(delay=delay)
    return ctx.task.attempt


@plugin.task()
async def fail_now(ctx):
    raise Fail("no point retrying")


@plugin.task()
async def not_json(ctx):
    return {1, 2}


@plugin.task(max_attempts=1, timeout=0.2)
async def too_slow(ctx):
    await gate("never").wait()


@plugin.task(max_attempts=1, timeout=30)
async def upstream_timeout(ctx):
    raise TimeoutError("the upstream API took too long")


@plugin.task(max_attempts=3)
async def steps_then_fail_once(ctx):
    def count(key):
        STEP_RUNS[key] = STEP_RUNS.get(key, 0) + 1
        return {"ran": key}

    first = await ctx.step("first", lambda: count("first"))
    if ctx.task.attempt == 1:
        raise RuntimeError("crash after the first step")
    second = await ctx.step("second", lambda: count("second"))
    return [first, second]


@plugin.task()
async def parent(ctx, values: list):
    results = await ctx.gather(*(ctx.call("qt.echo", value=v) for v in values))
    return sum(results)


@plugin.task()
async def serial_parent(ctx):
    first = await ctx.call("qt.echo", value=1)
    second = await ctx.call("qt.echo", value=2)
    return [first, second]


STEP_VALUES: list = []


@plugin.task(max_attempts=2)
async def step_then_retry(ctx):
    value = await ctx.step("numbers", lambda: {1: "one", "pair": (1, 2)})
    STEP_VALUES.append(value)
    if ctx.task.attempt == 1:
        raise RuntimeError("once more")
    return value


@plugin.task(max_attempts=1)
async def gather_with_a_failure(ctx):
    try:
        await ctx.gather(ctx.call("qt.fail_now"), ctx.call("qt.wait_gate", name="sibling"))
    except TaskFailedError:
        gate("after the gather").set()
    return "went on"


@plugin.task()
async def submit_keyed(ctx, key: str):
    return (await ctx.submit("qt.echo", {"value": key}, idempotency_key=key)).id


@plugin.task()
async def slow_to_cancel(ctx, name: str):
    gate(f"started:{name}").set()
    try:
        await gate(name).wait()
    except asyncio.CancelledError:
        await gate(f"cleanup:{name}").wait()
        raise
    return f"{name} done"


@plugin.task()
async def parent_of_slow(ctx):
    return await ctx.call("qt.slow_to_cancel", name="slow child")


FAILS_LEFT = {"child": 1}


@plugin.task(max_attempts=1)
async def fails_the_first_time(ctx):
    if FAILS_LEFT["child"] > 0:
        FAILS_LEFT["child"] -= 1
        raise Fail("not this time")
    return "second time lucky"


@plugin.task(max_attempts=1)
async def parent_of_flaky(ctx):
    done_before = await ctx.step("before", lambda: STEP_RUNS.setdefault("before", 0) + 1)
    STEP_RUNS["before"] = done_before
    return await ctx.call("qt.fails_the_first_time")


@plugin.task(max_attempts=1)
async def parent_of_failure(ctx):
    await ctx.call("qt.fail_now")


@plugin.task()
async def parent_of_waiter(ctx, name: str):
    return await ctx.call("qt.wait_gate", name=name)


async def run_counted(count: dict, started: str, name: str) -> None:
    """Wait for gate `name`, counted as running in `count` (now, max); open `started` first."""
    count["now"] += 1
    count["max"] = max(count["max"], count["now"])
    gate(started).set()
    try:
        await gate(name).wait()
    finally:
        count["now"] -= 1


@plugin.task(concurrency=2)
async def limited(ctx, name: str):
    await run_counted(RUNNING, f"running:{RUNNING['now'] + 1}", name)


SOLO = {"now": 0, "max": 0}


@plugin.task(concurrency=1)
async def solo(ctx, name: str):
    await run_counted(SOLO, f"started:{name}", name)


@plugin.task(rate="4/s")
async def rated(ctx):
    STARTED.append(("rated", ctx.task.id))


@plugin.task(queue="reports")
async def report(ctx):
    return "report done"


@plugin.task()
def blocking(ctx, x: int):
    THREADS.append(threading.get_ident())
    ctx.progress("from-thread", {"x": x})
    return x * 2


THREAD_GATE = threading.Event()


@plugin.task()
def held_in_thread(ctx):
    THREAD_GATE.wait(30)
    return "held"
