"""Live streams over SSE: `/v1/stream` (any topics) and `/v1/tasks/{id}/stream` (one task
and its children), both resumable with `Last-Event-ID` (or `?since=`).

A stream subscribes to the bus first, then replays what the client missed from the event
log, then continues live, skipping live events at or below the last replayed id: no gap
and no duplicate across the seam. If the client asks for events older than the log keeps,
the stream starts with a `gap` event. Each client has a bounded buffer: consecutive token
events are folded together first; if it still overflows, the client receives a `lagged`
event naming the id to resume after, and the stream ends. A write that the client does not
take within `[streams] send_timeout` ends the stream too. Memory per client is bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from agentd.bus import Subscription
from agentd.config import StreamsConfig
from agentd.events import Event, Lagged, TopicFilter
from agentd.taskqueue import FINAL_STATES
from agentd.web.errors import bad_request
from agentd.web.openapi import doc
from agentd.web.server import DAEMON, STREAMS

routes = web.RouteTableDef()

FINAL_TOPICS = frozenset(f"task.{state}" for state in FINAL_STATES)
TOKEN_SEGMENT = "token"
MAX_ID = 2**63 - 1  # SQLite's INTEGER


def coalesce_tokens(last: Event, new: Event) -> Event | None:
    """Fold two consecutive token events of the same topic and task into one."""
    if (
        last.topic == new.topic
        and new.topic.rsplit(".", 1)[-1] == TOKEN_SEGMENT
        and last.data.get("task_id") == new.data.get("task_id")
        and isinstance(last.data.get("text"), str)
        and isinstance(new.data.get("text"), str)
    ):
        data = {**new.data, "text": last.data["text"] + new.data["text"],
                "merged": int(last.data.get("merged", 1)) + int(new.data.get("merged", 1))}
        return Event(id=new.id, topic=new.topic, data=data, time=new.time,
                     correlation_id=new.correlation_id, causation_id=new.causation_id)
    return None


def resume_point(request: web.Request) -> int | None:
    """The id after which the client wants events: `Last-Event-ID`, else `?since=`."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("since")
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_ID:  # "²".isdigit() is True
        raise bad_request(f"Last-Event-ID / since must be an event id (digits), got {raw!r}")
    return int(raw)


class SseStream:
    """One SSE response: frames events, comments and control events; bounds each write."""

    def __init__(self, request: web.Request, config: StreamsConfig) -> None:
        self.request = request
        self.config = config
        self.last_sent = 0
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
            "Connection": "keep-alive",
        })

    async def open(self) -> None:
        await self.response.prepare(self.request)
        # The first bytes go out at once: proxies and browsers see the stream is live.
        await self._write(f"retry: {self.config.retry_ms}\n: connected\n\n")

    async def send(self, event: Event, name: str | None = None) -> None:
        body = json.dumps(event.to_dict(), separators=(",", ":"), default=str)
        await self._write(f"id: {event.id}\nevent: {name or event.topic}\ndata: {body}\n\n")
        self.last_sent = max(self.last_sent, event.id)

    async def control(self, name: str, data: dict[str, Any]) -> None:
        """A stream-level event (gap, lagged, end): no id, so it never moves the resume point."""
        await self._write(f"event: {name}\ndata: {json.dumps(data, default=str)}\n\n")

    async def keepalive(self) -> None:
        await self._write(": keepalive\n\n")

    async def _write(self, text: str) -> None:
        await asyncio.wait_for(self.response.write(text.encode()), self.config.send_timeout)

    async def pump(
        self,
        sub: Subscription,
        accept: Callable[[Event], bool] | None = None,
        stop: Callable[[Event], bool] | None = None,
        until_empty: bool = False,
    ) -> bool:
        """Send the live events `accept` takes until `stop(event)` holds (True), or the
        client lags, the daemon stops, or (`until_empty`) nothing is buffered (False)."""
        while True:
            event = sub.get_nowait()
            if event is None and until_empty:
                return False
            if event is None:
                try:
                    event = await asyncio.wait_for(sub.get(), self.config.keepalive)
                except TimeoutError:
                    await self.keepalive()
                    continue
                except StopAsyncIteration:
                    return False
            if isinstance(event, Lagged):
                await self.control("lagged", {"resume_after": self.last_sent,
                                              "dropped": event.data.get("dropped")})
                return False
            if event.id <= self.last_sent or (accept is not None and not accept(event)):
                continue  # already sent by the replay, or not this stream's
            await self.send(event)
            if stop is not None and stop(event):
                return True


def _subscribe(request: web.Request, patterns: TopicFilter | str, name: str) -> Subscription:
    daemon = request.app[DAEMON]
    sub = daemon.bus.subscribe(
        patterns.text if isinstance(patterns, TopicFilter) else patterns,
        name=name, maxsize=daemon.config.streams.client_buffer, merge=coalesce_tokens)
    request.app[STREAMS].add(sub)
    return sub


def _release(request: web.Request, sub: Subscription) -> None:
    sub.unsubscribe()
    request.app[STREAMS].discard(sub)


@routes.get("/v1/stream")
@doc("Server-sent events on topics matching `topics`; resumable with Last-Event-ID or `since`",
     tag="streams", stream=True,
     query={"topics": "comma-separated topic patterns (default **)",
            "since": "resume after this event id (as Last-Event-ID)",
            "token": "a stream token from POST /v1/stream-tokens (for EventSource)"},
     responses={200: "text/event-stream: `id`, `event` (the topic), `data` (the event as JSON); "
                     "control events gap, lagged", 400: "A bad pattern or resume id"})
async def stream(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    patterns = TopicFilter.parse(request.query.get("topics") or "**")
    after = resume_point(request)
    sub = _subscribe(request, patterns, f"sse:{patterns.text}")
    sse = SseStream(request, daemon.config.streams)
    # Live-only, a lag resumes after what existed when it subscribed, not the whole log.
    sse.last_sent = daemon.bus.last_id if after is None else 0
    try:
        await sse.open()
        if after is not None:
            if after < daemon.eventlog.horizon:
                await sse.control("gap", {"requested_after": after,
                                          "kept_after": daemon.eventlog.horizon})
            for event in await daemon.eventlog.replay(after, lambda e: patterns.matches(e.topic)):
                await sse.send(event)
            sse.last_sent = max(sse.last_sent, after)
        await sse.pump(sub)
    except (ConnectionResetError, TimeoutError):
        pass  # the client went away or stopped reading: the stream just ends
    finally:
        _release(request, sub)
    return sse.response


@routes.get(r"/v1/tasks/{id:\d+}/stream")
@doc("Server-sent events of one task and its descendants; ends after the task's final event. "
     "A finished task's stream replays what the log kept, then ends", tag="streams", stream=True,
     query={"since": "resume after this event id (as Last-Event-ID)",
            "token": "a stream token from POST /v1/stream-tokens"},
     responses={200: "text/event-stream of task.* events, then an `end` event", 404: "No such task"})
async def task_stream(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    task_id = int(request.match_info["id"])
    record = await daemon.queue.get(task_id)  # TaskNotFoundError (404) for any unknown id
    tree = {task_id, *await daemon.queue.descendants(task_id)}
    after = resume_point(request) or 0

    def in_tree(event: Event) -> bool:
        owner = event.data.get("task_id")
        if owner in tree:
            return True
        parent = event.causation_id
        if (event.topic == "task.queued" and isinstance(owner, int) and parent is not None
                and parent.isascii() and parent.isdigit() and int(parent) in tree):
            tree.add(owner)
            return True
        return False

    def is_end(event: Event) -> bool:
        return event.topic in FINAL_TOPICS and event.data.get("task_id") == task_id

    sub = _subscribe(request, "task.**", f"sse:task:{task_id}")
    sse = SseStream(request, daemon.config.streams)
    try:
        await sse.open()
        if after and after < daemon.eventlog.horizon:
            await sse.control("gap", {"requested_after": after, "kept_after": daemon.eventlog.horizon})
        ended = False
        for event in await daemon.eventlog.replay_correlation(record.correlation_id, after):
            if in_tree(event):
                await sse.send(event)
                ended = ended or is_end(event)
        sse.last_sent = max(sse.last_sent, after)
        if not ended:
            # Already finished: its last events are buffered (published after we subscribed)
            # or were in the replay; send what is buffered and end either way.
            finished = (await daemon.queue.get(task_id)).finished
            ended = await sse.pump(sub, accept=in_tree, stop=is_end, until_empty=finished)
            ended = ended or finished
        if ended:
            final = await daemon.queue.get(task_id)
            await sse.control("end", {"task": final.to_dict()})
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        _release(request, sub)
    return sse.response
