"""news_watch: a scheduled agent. Every 30 minutes it fetches the feeds named in agentd.toml
(RSS, Atom, or JSON: a list of items or a JSON Feed), remembers each new item in long-term
memory (namespace `news`; a duplicate returns the memory it repeats, so nothing is
stored or announced twice) and publishes `news.new` for it. `news_watch.ask` answers a
question from those memories: with an LLM when `[llm]` is set, else it returns what it
recalled and says what it would do with one.

    [plugins.news_watch]
    feeds = ["https://example.com/feed.xml"]
    [plugins.news_watch.schedules.fetch]      # optional: retime the schedule
    every = "10m"

    curl -s -XPOST localhost:8470/v1/schedules/news_watch.fetch/run
    curl -s -XPOST localhost:8470/v1/tasks \\
         -d '{"name": "news_watch.ask", "args": {"question": "What happened to the rover?"}}'
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

import aiohttp

from agentd import Context, Plugin

plugin = Plugin("news_watch", description="fetches feeds into memory and answers questions from them")

NAMESPACE = "news"
_ATOM = "{http://www.w3.org/2005/Atom}"


@dataclass(frozen=True)
class Item:
    """One feed entry."""

    title: str
    link: str
    summary: str

    @property
    def text(self) -> str:
        """What is remembered: the title and the summary, whichever are there."""
        return ". ".join(part for part in (self.title.strip(), self.summary.strip()) if part)


@plugin.schedule(every="30m", catch_up="once", overlap="skip")
@plugin.task(max_attempts=3, timeout=300)
async def fetch(ctx: Context) -> dict[str, Any]:
    """Fetch every configured feed; remember and announce the items not seen before."""
    feeds = ctx.config.get("feeds", [])
    new, failed = [], []
    timeout = aiohttp.ClientTimeout(total=float(ctx.config.get("timeout", 30)))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for url in feeds:
            try:
                async with session.get(url) as response:
                    response.raise_for_status()
                    items = parse_feed(await response.read())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                # One broken feed must not keep the others from being read.
                ctx.log.warning("news_watch.feed_failed", url=url, error=str(exc))
                failed.append({"url": url, "error": str(exc) or type(exc).__name__})
                continue
            for item in items:
                memory, created = await ctx.memory.remember(
                    item.text, namespace=NAMESPACE,
                    metadata={"kind": "news", "source": url, "title": item.title, "link": item.link})
                if created:
                    ctx.publish("news.new", {"memory_id": memory.id, "title": item.title,
                                             "link": item.link, "source": url})
                    new.append(memory.id)
            ctx.progress("feed", {"url": url, "items": len(items)})
    return {"feeds": len(feeds), "new": len(new), "failed": failed}


@plugin.task(max_attempts=3, timeout=300)
async def ask(ctx: Context, question: str, k: int = 5) -> dict[str, Any]:
    """Answer `question` from the remembered news: the LLM's answer when one is
    configured, and always the items it was based on."""
    found = await ctx.memory.recall(question, namespace=NAMESPACE, k=k, hybrid=True)
    items = [{"id": r.memory.id, "title": r.memory.metadata.get("title"),
              "link": r.memory.metadata.get("link"), "text": r.memory.text} for r in found]
    if not ctx.llm.enabled:
        return {"question": question, "answer": None, "items": items,
                "note": "no LLM is configured ([llm] base_url): with one, agentd would answer "
                        f"the question from these {len(items)} recalled items"}
    context = "\n".join(f"- {item['text']} ({item['link']})" for item in items)
    reply = await ctx.llm.chat([
        {"role": "system", "content": "Answer from these news items only; say so if they do not tell.\n"
                                      + context},
        {"role": "user", "content": question},
    ])
    return {"question": question, "answer": reply.content, "items": items}


def parse_feed(body: bytes) -> list[Item]:
    """Items of an RSS 2.0, Atom or JSON feed.

    Raises:
        ValueError: the body is none of these.
    """
    text = body.lstrip()
    if text[:1] in (b"[", b"{"):
        return _parse_json(json.loads(text))
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise ValueError(f"not a feed: {exc}") from exc
    if root.tag == f"{_ATOM}feed":
        items = [Item(_text(e, f"{_ATOM}title"), _atom_link(e),
                      _text(e, f"{_ATOM}summary") or _text(e, f"{_ATOM}content"))
                 for e in root.iter(f"{_ATOM}entry")]
    elif root.tag == "rss":
        items = [Item(_text(e, "title"), _text(e, "link"), _text(e, "description"))
                 for e in root.iter("item")]
    else:
        raise ValueError(f"not a feed: the document is <{root.tag}>, not RSS or Atom")
    return [item for item in items if item.text]  # an entry with no words has nothing to remember


def _parse_json(document: Any) -> list[Item]:
    entries = document.get("items") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise ValueError("not a feed: JSON without a list of items")
    items = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        summary = str(entry.get("summary") or entry.get("content_text") or entry.get("description") or "")
        # JSON Feed 1.1 items may have no title: their text stands alone.
        item = Item(str(entry.get("title") or ""), str(entry.get("url") or entry.get("link") or ""),
                    summary.strip())
        if item.text:
            items.append(item)
    return items


def _text(element: ElementTree.Element, tag: str) -> str:
    found = element.find(tag)
    return (found.text or "").strip() if found is not None else ""


def _atom_link(entry: ElementTree.Element) -> str:
    for link in entry.iter(f"{_ATOM}link"):
        if link.get("rel", "alternate") == "alternate":
            return link.get("href", "")
    return ""
