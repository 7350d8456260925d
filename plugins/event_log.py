"""event_log: fire-and-forget handlers. `POST /v1/events` with a `ui.*` topic ("user
clicked the button") is answered 202 at once; a handler then records the event in the
user's short-term activity session (`activity-<user>`, kept for `[memory] session_ttl`
and cleared by the hourly purge). `notify` forwards the topics in `notify_topics` to
`notify_url` as signed webhooks (durable tasks, one per event even if handled twice);
without a URL it logs what it would send.

    [plugins.event_log]
    notify_url = "https://example.com/agentd-hook"
    notify_topics = ["ui.purchase"]

    curl -s -XPOST localhost:8470/v1/events \\
         -d '{"topic": "ui.click", "data": {"user": "ada", "button": "buy"}}'
    curl -s localhost:8470/v1/sessions/activity-ada/messages
"""

from __future__ import annotations

import json
import re

from agentd import Event, Plugin, PluginContext

plugin = Plugin("event_log", description="records UI events and forwards chosen ones to a webhook")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")


@plugin.on("ui.**")
async def record(ctx: PluginContext, event: Event) -> None:
    """Keep the event in its user's activity session."""
    user = _UNSAFE.sub("_", str(event.data.get("user") or "anonymous"))[:100]
    await ctx.memory.session(f"activity-{user}").append(
        "event", json.dumps({"topic": event.topic, "data": event.data}, sort_keys=True),
        {"event_id": event.id, "topic": event.topic})
    ctx.log.info("event_log.recorded", topic=event.topic, user=user, event_id=event.id)


@plugin.on("ui.**")
async def notify(ctx: PluginContext, event: Event) -> None:
    """Forward the configured topics to the configured webhook."""
    if event.topic not in ctx.config.get("notify_topics", ["ui.purchase"]):
        return
    url = ctx.config.get("notify_url", "")
    body = {"id": event.id, "topic": event.topic, "time": event.time, "data": event.data}
    if not url:
        ctx.log.info("event_log.would_notify", topic=event.topic,
                     note="set [plugins.event_log] notify_url to forward it")
        return
    await ctx.webhook.post(url, body, idempotency_key=f"event_log.notify:{event.id}")
