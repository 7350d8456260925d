"""deep_search: an orchestrator agent and two workers. `deep_search.run` (agent A) sends
"search" to `deep_search.search` (agent B) and "analyze sentiment" to
`deep_search.sentiment` (agent C) as durable children running in parallel, merges their
results, streams its progress, stores the summary in long-term memory (namespace
`deep_search`) and mails it when `[mail]` is set and an address is given. With
`[plugins.deep_search] approve = true` it first asks a person (`ctx.ask`): the run waits,
listed in `GET /v1/approvals`, until `POST /v1/tasks/{id}/answer` says `true` or "yes"
(anything else: no mail). The summary and the memory are steps, so the run that resumes
after the answer does not write them again.

The children are durable: if the daemon dies mid-run, the retried orchestrator gets the
children it already started back instead of starting them again. Without an LLM, B ranks
what memory holds and C scores words; with `[llm]` set, C asks the model and A writes
the summary with it, streaming its tokens.

    curl -s -XPOST localhost:8470/v1/tasks \\
         -d '{"name": "deep_search.run", "args": {"topic": "rover"}}'
    curl -sN localhost:8470/v1/tasks/1/stream
"""

from __future__ import annotations

import re
from typing import Any

from agentd import Context, Fail, Plugin

plugin = Plugin("deep_search", description="orchestrates a search agent and a sentiment agent")

SUMMARIES = "deep_search"
_POSITIVE = frozenset({
    "good", "great", "success", "successful", "win", "wins", "won", "gain", "gains", "record",
    "improved", "improve", "growth", "landed", "breakthrough", "safe", "happy", "praised", "strong",
    "launch", "launched"})
_NEGATIVE = frozenset({
    "bad", "fail", "failed", "failure", "loss", "losses", "lost", "crash", "crashed", "delay",
    "delayed", "risk", "problem", "problems", "down", "weak", "broken", "outage", "cut", "cuts",
    "warning", "feared"})


@plugin.task(max_attempts=3, timeout=600)
async def run(ctx: Context, topic: str, email: str | None = None) -> dict[str, Any]:
    """Agent A: delegate, merge, remember, mail."""
    if email:
        ctx.mail.check(email)  # a bad address fails now, not after the work
    ctx.progress("delegating", {"topic": topic, "to": ["deep_search.search", "deep_search.sentiment"]})
    found, mood = await ctx.gather(ctx.call("deep_search.search", query=topic),
                                   ctx.call("deep_search.sentiment", topic=topic))
    ctx.progress("merging", {"results": len(found["results"]), "sentiment": mood["label"]})
    # Steps: a run resumed after its approval (or retried) does not write them again.
    summary = await ctx.step("summary", lambda: _summarise(ctx, topic, found["results"], mood))
    memory_id = await ctx.step("remember", lambda: _remember(ctx, topic, summary))
    mailed = approved = None
    if email and ctx.mail.enabled:
        approved = await _approved(ctx, topic, email, summary)
        if approved is not False:
            mailed = (await ctx.mail.send(email, f"deep_search: {topic}", summary)).id
    ctx.progress("done", {"memory_id": memory_id, "mail_task_id": mailed})
    return {"topic": topic, "summary": summary, "sources": found["results"], "sentiment": mood,
            "memory_id": memory_id, "mail_task_id": mailed, "approved": approved}


async def _remember(ctx: Context, topic: str, summary: str) -> int:
    memory, _ = await ctx.memory.remember(
        summary, namespace=SUMMARIES, metadata={"kind": "summary", "agent": "deep_search", "topic": topic})
    return memory.id


_YES = frozenset({"yes", "y", "ok", "approve", "approved", "send"})


async def _approved(ctx: Context, topic: str, email: str, summary: str) -> bool | None:
    """With `approve = true`, whether a person approves the mail (None: nobody is asked)."""
    approve = ctx.config.get("approve", False)
    if not isinstance(approve, bool):
        raise Fail(f"[plugins.deep_search] approve must be true or false, got {approve!r}")
    if not approve:
        return None
    ctx.progress("asking", {"to": email})
    answer = await ctx.ask(f"Mail the summary on {topic!r} to {email}?",
                           {"topic": topic, "to": email, "summary": summary})
    return answer is True or (isinstance(answer, str) and answer.strip().lower() in _YES)


@plugin.task(max_attempts=3, timeout=120)
async def search(ctx: Context, query: str, k: int = 5) -> dict[str, Any]:
    """Agent B: what long-term memory knows about `query`, across the configured namespaces."""
    results = []
    for namespace in ctx.config.get("namespaces", ["news", "default"]):
        for hit in await ctx.memory.recall(query, namespace=namespace, k=k, hybrid=True):
            results.append({"id": hit.memory.id, "namespace": namespace, "text": hit.memory.text,
                            "score": hit.score})
    results.sort(key=lambda r: r["score"], reverse=True)
    ctx.progress("found", {"results": len(results[:k])})
    return {"query": query, "results": results[:k]}


@plugin.task(max_attempts=3, timeout=120)
async def sentiment(ctx: Context, topic: str) -> dict[str, Any]:
    """Agent C: the mood of what memory holds about `topic`: the LLM's judgement when one
    is configured, else a word count of positive and negative terms."""
    texts = [hit.memory.text for namespace in ctx.config.get("namespaces", ["news", "default"])
             for hit in await ctx.memory.recall(topic, namespace=namespace, k=5)]
    if ctx.llm.enabled and texts:
        reply = await ctx.llm.chat([
            {"role": "system", "content": "Answer with one word: positive, negative or neutral."},
            {"role": "user", "content": "\n".join(texts)}], stream=False)
        label = reply.content.strip().lower().strip(".")
        if label not in ("positive", "negative", "neutral"):
            label = "neutral"
        return {"label": label, "method": "llm", "texts": len(texts)}
    words = [w.lower() for text in texts for w in re.findall(r"[A-Za-z]+", text)]
    score = sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)
    label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    return {"label": label, "method": "lexicon", "score": score, "texts": len(texts)}


async def _summarise(ctx: Context, topic: str, results: list[dict[str, Any]], mood: dict[str, Any]) -> str:
    if not results:
        return f"Nothing is known about {topic!r} yet."
    if ctx.llm.enabled:
        sources = "\n".join(f"- {r['text']}" for r in results)
        reply = await ctx.llm.chat([
            {"role": "system", "content": "Summarise these findings in three sentences."},
            {"role": "user", "content": f"Topic: {topic}\nSentiment: {mood['label']}\n{sources}"}])
        return reply.content
    lines = "\n".join(f"- {r['text']}" for r in results)
    text = (f"{len(results)} findings on {topic!r}, sentiment {mood['label']}:\n{lines}\n"
            "(no LLM is configured: with [llm] base_url set, agentd would write this summary with it)")
    for piece in re.findall(r"\S+\s*", text):
        ctx.token(piece)  # stream the summary as it would stream an LLM's
    return text
