"""The smallest useful plugin: a durable task and a fire-and-forget handler.

    curl -s -XPOST localhost:8470/v1/tasks -d '{"name": "hello.greet", "args": {"name": "Ada"}}'
    agentd submit hello.greet --args '{"name": "Ada"}' --wait

Configure it with a `[plugins.hello]` table in agentd.toml: `greeting = "hi"`.
"""

from agentd import Context, Event, Plugin, PluginContext

plugin = Plugin("hello", description="greets people; an example of a task and a handler")


@plugin.task(max_attempts=3, timeout=30)
async def greet(ctx: Context, name: str) -> str:
    """Return a greeting, reporting progress on the way."""
    ctx.progress("greeting", {"to": name})
    return f"{ctx.config.get('greeting', 'hello')}, {name}"


@plugin.on("task.succeeded")
async def log_greetings(ctx: PluginContext, event: Event) -> None:
    """Log every greeting that was delivered, without making anyone wait for the log."""
    if event.data.get("name") == "hello.greet":
        ctx.log.info("hello.greeted", task_id=event.data["task_id"])
