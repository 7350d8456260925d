"""`/v1/ws`: one WebSocket for everything live. JSON messages, each request with a client id:

    {"id": 1, "type": "subscribe", "patterns": ["task.*"], "since": 123}
        → {"id": 1, "ok": true, "subscription": "s1"}, then
          {"type": "event", "subscription": "s1", "event": {...}} for each event
    {"id": 2, "type": "unsubscribe", "subscription": "s1"}  → {"id": 2, "ok": true}
    {"id": 3, "type": "publish", "topic": "user.clicked", "data": {}}
        → {"id": 3, "ok": true, "event_id": ...}
    {"id": 4, "type": "submit", "name": "hello.greet", "args": {...}}
        → {"id": 4, "ok": true, "task": {...}, "created": true}
    {"id": 5, "type": "cancel", "task_id": 7}  → {"id": 5, "ok": true, "task": {...}}
    {"id": 6, "type": "result", "task_id": 7, "timeout": 30}
        → {"id": 6, "ok": true, "task": {...}} once it is finished
    {"id": 7, "type": "ping"}  → {"id": 7, "ok": true, "type": "pong"}

A failed request answers `{"id", "ok": false, "error": {"code", "message"}}`: every message
gets exactly one reply, whatever goes wrong (one that cannot be read is answered with the
`id` it starts with, else null), and a bad message fails only itself, never the socket.
What one socket holds is bounded: its messages (`[server] max_body_bytes` each), the
requests in flight (`[streams] ws_max_requests`) and its subscriptions
(`ws_max_subscriptions`). Subscriptions follow the SSE policy: bounded buffers, tokens
folded first, then `{"type": "lagged", "subscription", "resume_after"}` and the socket is
closed (code 4000).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from aiohttp import WSMsgType, web

from agentd.bus import Subscription
from agentd.errors import AgentdError, describe
from agentd.eventlog import ReplayGap
from agentd.events import Lagged, TopicFilter, check_publishable
from agentd.log import get_logger
from agentd.web.auth import READ_ONLY
from agentd.web.errors import ApiError, bad_request, from_agentd_error
from agentd.web.openapi import doc
from agentd.web.schemas import JsonValueError, check_json
from agentd.web.server import DAEMON, SOCKETS, STREAMS
from agentd.web.streams import (
    ENCODED,
    bound_send_buffer,
    coalesce_tokens,
    drop_connection,
    event_json,
    writes_at_once,
)
from agentd.web.tasks_api import task_request

routes = web.RouteTableDef()

CLOSE_LAGGED = 4000
_CLOSE_LAGGED_FRAME = struct.pack("!H", CLOSE_LAGGED) + b"lagged"
MAX_RESULT_WAIT = 300.0
REPLAY_YIELD_EVERY = 256
# What a socket opened with a stream token may ask: a list of what reads, so a request type
# added later is refused to such sockets until it is listed here.
_READS = frozenset({"subscribe", "unsubscribe", "result", "ping"})
# A message up to this many times `[server] max_body_bytes` is read in whole and refused with
# the socket kept open. aiohttp refuses a larger one from its frame header, before reading
# it, and closes the socket (1009): past an unread message the stream cannot be parsed.
OVERSIZE_READ_FACTOR = 16
# The `id` a message starts with, for the reply to a message that cannot be parsed.
_LEADING_ID = re.compile(r'\s*\{\s*"id"\s*:\s*(-?\d{1,19}(?![\d.eE])|"(?:[^"\\]|\\.){0,256}")')


class _Session:
    """One connection: its subscriptions and its pending requests.

    The session owns the tasks it starts (one per request being answered, one pump per
    subscription): `close` cancels and awaits them all. A request task that ends with an
    exception is logged as it ends (`ws.reply_failed`), a pump that fails is logged
    (`ws.pump_failed`) and drops the connection: no failure is left to asyncio.
    """

    def __init__(self, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.request = request
        self.daemon = request.app[DAEMON]
        self.config = self.daemon.config.streams
        self.ws = ws
        self.subscriptions: dict[str, tuple[Subscription, asyncio.Task[None]]] = {}
        self.requests: set[asyncio.Task[None]] = set()
        self._counter = 0

    async def take(self, text: str) -> None:
        """Start answering one message on its own task (so a long `result` holds up no
        other request), or answer it here when it cannot be read or the socket already has
        `ws_max_requests` requests in flight."""
        try:
            message = parse_message(text, self.daemon.config.server.max_body_bytes)
        except ApiError as exc:
            await self.reply(_failure(leading_id(text), exc))
            return
        if len(self.requests) >= self.config.ws_max_requests:
            await self.reply(_failure(message.get("id") if isinstance(message, dict) else None, ApiError(
                429, "too_many_requests",
                f"{len(self.requests)} requests are in flight on this socket, the most it takes "
                "([streams] ws_max_requests): wait for their replies")))
            return
        task = asyncio.get_running_loop().create_task(self.handle(message), name="ws:request")
        self.requests.add(task)
        task.add_done_callback(self._request_ended)

    def _request_ended(self, task: asyncio.Task[None]) -> None:
        self.requests.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # `handle` answers every failure of a request; this is one of answering it.
            get_logger("ws").error("ws.reply_failed", error=describe(exc),
                                   exc_info=exc)

    async def reply(self, answer: dict[str, Any]) -> None:
        """Send a reply; a client that does not take it within `send_timeout` is dropped."""
        try:
            await self.send(answer)
        except (TimeoutError, ConnectionError) as exc:
            get_logger("ws").info("ws.dropped", reason=type(exc).__name__)
            drop_connection(self.request)

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_text(json.dumps(message))

    async def send_text(self, text: str) -> None:
        """Send one JSON message; a client that does not take it within `send_timeout` is
        a TimeoutError."""
        await self.send_frame(text.encode(), WSMsgType.TEXT)

    async def send_frame(self, data: bytes, kind: WSMsgType) -> None:
        if writes_at_once(self.request.transport, len(data)):
            # The send cannot wait on the client, so it needs no timer (`wait_for` around every
            # message cost a task and a timer each).
            await self.ws.send_frame(data, kind)
            return
        async with asyncio.timeout(self.daemon.config.streams.send_timeout):
            await self.ws.send_frame(data, kind)

    async def handle(self, message: Any) -> None:
        """Answer one request with exactly one reply: its result, or the error, whatever
        failed (a failure of the server's own is logged and answered `internal_error`)."""
        request_id = message.get("id") if isinstance(message, dict) else None
        try:
            if not isinstance(message, dict):
                raise bad_request("each message must be a JSON object")
            kind = message.get("type")
            handler = self._HANDLERS.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise bad_request(f"unknown type {kind!r}; known: {', '.join(self._HANDLERS)}")
            if kind not in _READS and self.request.get(READ_ONLY, False):
                raise ApiError(403, "read_only", f"{kind!r} needs the bearer token: this socket "
                               "was opened with a stream token, which only reads")
            reply = await handler(self, message)
            answer = {"id": request_id, "ok": True, **reply}
        except Exception as exc:
            error = _api_error(exc)
            if error.status >= 500:
                get_logger("ws").exception("ws.request_failed", type=message.get("type"),
                                           id=request_id)
            answer = _failure(request_id, error)
        await self.reply(answer)

    async def subscribe(self, message: dict[str, Any]) -> dict[str, Any]:
        if len(self.subscriptions) >= self.config.ws_max_subscriptions:
            raise ApiError(429, "too_many_subscriptions",
                           f"this socket has {len(self.subscriptions)} subscriptions, the most it "
                           "holds ([streams] ws_max_subscriptions): unsubscribe one first")
        patterns = TopicFilter.parse(message.get("patterns", "**"))
        since = message.get("since")
        if since is not None and (
            not isinstance(since, int) or isinstance(since, bool) or not 0 <= since < 2**63
        ):
            raise bad_request(f"'since' must be an event id (an integer), got {since!r}")
        self._counter += 1
        name = f"s{self._counter}"
        sub = self.daemon.eventlog.streams.subscribe(
            patterns.text, name=f"ws:{name}", maxsize=self.config.client_buffer,
            merge=coalesce_tokens)
        self.request.app[STREAMS].add(sub)
        # Live-only, a lag resumes after what existed when it subscribed, not the whole log.
        after = self.daemon.eventlog.streams.delivered_id if since is None else since
        pump = asyncio.get_running_loop().create_task(
            self._pump(name, sub, patterns, after, replay=since is not None), name=f"ws:pump:{name}")
        self.subscriptions[name] = (sub, pump)
        return {"subscription": name}

    async def _pump(self, name: str, sub: Subscription, patterns: TopicFilter, after: int,
                    replay: bool) -> None:
        try:
            await self._forward(name, sub, patterns, after, replay)
        except (TimeoutError, ConnectionError) as exc:
            # A client that takes nothing for `send_timeout` is gone or stuck: drop the
            # connection (a close frame could not get through its full buffer either), so
            # it holds no subscription, task or buffer any longer.
            get_logger("ws").info("ws.dropped", subscription=name, reason=type(exc).__name__)
            drop_connection(self.request)
        except Exception:
            # A subscription that stopped forwarding would leave its client waiting for events
            # that never come: the connection is dropped, and the client resumes (`since`).
            get_logger("ws").exception("ws.pump_failed", subscription=name)
            drop_connection(self.request)

    async def _forward(self, name: str, sub: Subscription, patterns: TopicFilter, after: int,
                       replay: bool) -> None:
        last = after
        # Live events the replay also sent are skipped, by id. Not by "id <= last": the log
        # may hold an event published durably (written before it goes out) while events with
        # lower ids, already out, are still to be written, and come only live.
        replayed: set[int] = set()
        # The message is built around the event's JSON, which the cache shares with every
        # other client (the same object as `{"type": "event", "subscription", "event"}`).
        prefix = f'{{"type":"event","subscription":{json.dumps(name)},"event":'
        if replay:
            log = self.daemon.eventlog
            if after < await log.current_horizon():
                await self.send({"type": "gap", "subscription": name, "requested_after": after,
                                 "kept_after": log.horizon})
            n = 0
            async for page in log.replay_pages(after, lambda e: patterns.matches(e.topic)):
                if isinstance(page, ReplayGap):
                    await self.send({"type": "gap", "subscription": name, "requested_after": page.after,
                                     "kept_after": page.kept_after})
                    continue
                for event in page:
                    # The log's copies, one per client: encoded here, not through the cache.
                    await self.send_text(f"{prefix}{event_json(event)}}}")
                    replayed.add(event.id)
                    last = max(last, event.id)
                    n += 1
                    if n % REPLAY_YIELD_EVERY == 0:
                        # Sends that do not wait never yield: a long replay must not hold the loop.
                        await asyncio.sleep(0)
        async for event in sub:
            if isinstance(event, Lagged):
                await self.send({"type": "lagged", "subscription": name, "resume_after": last})
                await self._close_lagged()
                return
            if event.id in replayed and self.daemon.eventlog.replayable(event):
                continue
            await self.send_text(f"{prefix}{ENCODED.body(event)}}}")
            last = max(last, event.id)

    async def _close_lagged(self) -> None:
        """Send the close frame (4000); the client's reply ends the handler's reading loop,
        which closes the connection (and cancels this pump). Not `ws.close()`: called beside
        the reading loop, aiohttp's close ends the connection right after sending its frame,
        without waiting for the client's, whose reply then met a closed connection: the
        client saw 1006, not 4000 (on PostgreSQL most of the time, where the events come
        from the feed's task). A client that does not answer within `send_timeout` is
        dropped."""
        await self.send_frame(_CLOSE_LAGGED_FRAME, WSMsgType.CLOSE)
        await asyncio.sleep(self.config.send_timeout)  # noqa: sleep - the wait for the reply, cancelled by it
        get_logger("ws").info("ws.dropped", reason="no close reply")
        drop_connection(self.request)

    async def unsubscribe(self, message: dict[str, Any]) -> dict[str, Any]:
        name = message.get("subscription")
        if not isinstance(name, str) or name not in self.subscriptions:
            raise bad_request(f"no subscription {name!r} on this connection")
        self._drop(name)
        return {}

    async def publish(self, message: dict[str, Any]) -> dict[str, Any]:
        data = message.get("data", {})
        if not isinstance(data, dict):
            raise bad_request("'data' must be a JSON object")
        # As POST /v1/events checks it: data nested past MAX_DEPTH (or holding NaN) was
        # published as it came, and one near the recursion limit failed every stream it went
        # to as it was encoded (a 500 ending each).
        try:
            check_json(data, "data")
        except JsonValueError as exc:
            raise bad_request(str(exc)) from None
        event = await self.daemon.publish_durably(check_publishable(message.get("topic")), data)
        return {"event_id": self.daemon.eventlog.stream_id(event)}

    async def submit(self, message: dict[str, Any]) -> dict[str, Any]:
        fields = {k: v for k, v in message.items() if k not in ("id", "type")}
        (outcome,) = await self.daemon.queue.enqueue_many([task_request(fields)])
        return {"task": outcome.task.to_dict(), "created": outcome.created}

    async def cancel(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"task": (await self.daemon.queue.cancel(_task_id(message))).to_dict()}

    async def result(self, message: dict[str, Any]) -> dict[str, Any]:
        timeout = message.get("timeout", MAX_RESULT_WAIT)
        if not isinstance(timeout, int | float) or not 0 <= timeout <= MAX_RESULT_WAIT:
            raise bad_request(f"'timeout' must be a number of seconds up to {MAX_RESULT_WAIT:g}")
        try:
            record = await self.daemon.queue.wait(_task_id(message), float(timeout))
        except TimeoutError:
            raise ApiError(408, "timeout", f"the task did not finish within {timeout} s") from None
        return {"task": record.to_dict()}

    async def ping(self, message: dict[str, Any]) -> dict[str, Any]:
        return {"type": "pong"}

    _HANDLERS: ClassVar[dict[str, Callable[[_Session, dict[str, Any]], Awaitable[dict[str, Any]]]]] = {
        "subscribe": subscribe, "unsubscribe": unsubscribe, "publish": publish, "submit": submit,
        "cancel": cancel, "result": result, "ping": ping,
    }

    def _drop(self, name: str) -> asyncio.Task[None]:
        """End a subscription; return its pump, cancelled."""
        sub, pump = self.subscriptions.pop(name)
        sub.unsubscribe()
        self.request.app[STREAMS].discard(sub)
        pump.cancel()
        return pump

    async def close(self) -> None:
        """Cancel the pumps and the requests in flight, and wait for them to end (their
        failures are logged as they end)."""
        tasks = {self._drop(name) for name in list(self.subscriptions)} | self.requests
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def parse_message(text: str, limit: int) -> Any:
    """A message's JSON value.

    Raises:
        ApiError: the message is over `limit` bytes, is not JSON, is nested too deeply to
            read, or holds a string that is not Unicode (a lone surrogate such as "\\ud800",
            which JSON's escapes can spell but nothing downstream can store or encode).
    """
    size = len(text) if text.isascii() else len(text.encode())
    if size > limit:
        raise ApiError(413, "message_too_large",
                       f"the message is {size} bytes, over the {limit} a message may have "
                       "([server] max_body_bytes)")
    try:
        value = json.loads(text)
        if "\\u" in text:  # only an escape can spell a lone surrogate
            json.dumps(value, ensure_ascii=False).encode()
    except RecursionError:
        raise bad_request("the message is nested too deeply to be read") from None
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end].encode("unicode_escape").decode()
        raise bad_request(f"the message holds a lone surrogate ({bad}): strings must be "
                          "valid Unicode") from None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"not valid JSON: {exc}") from None
    return value


def leading_id(text: str) -> Any:
    """The `id` a message's text starts with (a number or a string), else None."""
    match = _LEADING_ID.match(text)
    if match is None:
        return None
    with contextlib.suppress(ValueError, RecursionError):
        return json.loads(match.group(1))
    return None


def _api_error(exc: Exception) -> ApiError:
    """What a client is told of a failed request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, AgentdError) and (error := from_agentd_error(exc)) is not None:
        return error
    if isinstance(exc, RecursionError):
        return bad_request("the request is nested too deeply to be handled")
    return ApiError(500, "internal_error", "the server failed to handle this request")


def _failure(request_id: Any, error: ApiError) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": error.code, "message": error.message}}


def _task_id(message: dict[str, Any]) -> int:
    task_id = message.get("task_id")
    if not isinstance(task_id, int) or isinstance(task_id, bool):
        raise bad_request(f"'task_id' must be an integer, got {task_id!r}")
    return task_id


@routes.get("/v1/ws")
@doc("WebSocket: subscribe (with resume), publish, submit, cancel, result, ping; the "
     "protocol is in docs/streams.md", tag="streams", stream=True,
     query={"token": "a stream token from POST /v1/stream-tokens (for browsers)"},
     responses={101: "Switching to the WebSocket protocol"})
async def websocket(request: web.Request) -> web.WebSocketResponse:
    max_size = request.app[DAEMON].config.server.max_body_bytes
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=max_size * OVERSIZE_READ_FACTOR)
    bound_send_buffer(request, request.app[DAEMON].config.streams.send_buffer)
    await ws.prepare(request)
    session = _Session(request, ws)
    request.app[SOCKETS].add(ws)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await session.take(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await session.reply(_failure(None, bad_request(
                    "binary messages are not read: send each request as JSON text")))
    finally:
        try:
            await session.close()
            with contextlib.suppress(Exception):
                await ws.close()
        finally:
            # Only once its requests have ended (their `result` waiters with them): a socket
            # gone from SOCKETS holds nothing any more.
            request.app[SOCKETS].discard(ws)
    return ws
