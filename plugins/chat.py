"""chat: a streaming agent. `chat.reply` takes a prompt for a session: the conversation is
kept in short-term memory (`ctx.memory.session`), the LLM's tokens stream to the task's
SSE and WebSocket clients as they come, and the built-in hourly `agentd.purge_memory`
clears sessions idle past `[memory] session_ttl`. Without an LLM it streams a reply
saying what it would have done, so the whole path can be tried on the defaults.

    curl -s -XPOST localhost:8470/v1/tasks \\
         -d '{"name": "chat.reply", "args": {"session": "ada", "prompt": "Hello!"}}'
    curl -sN localhost:8470/v1/tasks/<id>/stream          # the task, task.token events, task.succeeded
    curl -s localhost:8470/v1/sessions/ada/messages
"""

from __future__ import annotations

import re
from typing import Any

from agentd import Context, Plugin

plugin = Plugin("chat", description="a streaming chat agent with per-session short-term memory")

SYSTEM = "You are a helpful assistant running inside agentd. Be brief."


@plugin.task(max_attempts=3, timeout=300)
async def reply(ctx: Context, session: str, prompt: str) -> dict[str, Any]:
    """Answer `prompt` in the conversation `session`, streaming the answer."""
    conversation = ctx.memory.session(session)
    # A retried attempt must not add the prompt twice: the step runs once per task.
    await ctx.step("prompt", lambda: conversation.append("user", prompt, {"task_id": ctx.task.id}))
    history = await conversation.history(limit=int(ctx.config.get("history", 20)))
    messages = [{"role": "system", "content": ctx.config.get("system", SYSTEM)}]
    messages += [{"role": m["role"], "content": m["content"]} for m in history]
    if ctx.llm.enabled:
        answer = (await ctx.llm.chat(messages)).content
    else:
        answer = (f"(no LLM is configured: with [llm] base_url set, agentd would stream the model's "
                  f"answer to {prompt!r} here, with the {len(history)} messages of session "
                  f"{session!r} as context)")
        for piece in re.findall(r"\S+\s*", answer):
            ctx.token(piece)
    await conversation.append("assistant", answer, {"task_id": ctx.task.id})
    return {"session": session, "answer": answer, "messages": len(history) + 1}
