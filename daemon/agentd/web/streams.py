"""Live streams over SSE: `/v1/stream` (any topics) and `/v1/tasks/{id}/stream` (one task
and its children), both resumable with `Last-Event-ID` (or `?since=`).

A stream subscribes to the bus first, then replays what the client missed from the event
log, then continues live, skipping the live events the replay sent (by id, not "up to the
last id replayed": the log may already hold an event published durably, written before it
goes out, while events with lower ids that went out just before are still to be written):
no gap and no duplicate across the seam. If the client
asks for events older than the log keeps, the stream starts with a `gap` event. Each
client has a bounded buffer: consecutive token events are folded together first; if it
still overflows, the client receives a `lagged` event naming the id to resume after, and
the stream ends. A write that the client does not take within `[streams] send_timeout`
ends the stream too. Memory per client is bounded (a resumed stream also keeps the ids its
replay sent: at most what the log holds).

Streams subscribe to `eventlog.streams`: the daemon's bus on SQLite; on PostgreSQL a bus
that carries every daemon's events with the log's ids, so a client resumes on any daemon
(see eventlog.py). There an ephemeral event bears the id of the stored event before it:
its `id` is a resume point like any other, but never one the replay skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from agentd.bus import Subscription
from agentd.config import StreamsConfig
from agentd.eventlog import ReplayGap
from agentd.events import Event, Lagged, TopicFilter
from agentd.jsontext import lenient_encoder
from agentd.taskqueue import FINAL_TOPIC
from agentd.web.auth import READ_ONLY
from agentd.web.errors import bad_request, path_id
from agentd.web.openapi import doc
from agentd.web.server import DAEMON, STREAMS
from agentd.web.tasks_api import with_children

routes = web.RouteTableDef()

FINAL_TOPICS = frozenset(FINAL_TOPIC.values())
TOKEN_SEGMENT = "token"
MAX_ID = 2**63 - 1  # SQLite's INTEGER
# Most bytes one write gathers from a stream's buffer or a replay: the transport's default
# high-water mark, so a batch does not by itself fill the transport's buffer.
MAX_BATCH_BYTES = 64 * 1024
# A keepalive timer firing this close to its deadline counts as on time (the loop runs
# timers up to its clock resolution early).
_TIMER_SLACK = 0.001


def opened_by_browser(request: web.Request) -> bool:
    """Whether a browser's EventSource opened this stream: browsers send Fetch Metadata
    (`Sec-Fetch-Mode`) with every request, and only EventSource needs a stream token
    (`?token=`: it cannot send an Authorization header). HTTP libraries send neither."""
    return "Sec-Fetch-Mode" in request.headers or request.get(READ_ONLY, False)


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
    # "²".isdigit() is True; int() refuses more than 4,300 digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(MAX_ID)) or int(raw) > MAX_ID:
        raise bad_request(f"Last-Event-ID / since must be an event id (digits), got {raw!r}")
    return int(raw)


_ENCODE = lenient_encoder()


def event_json(event: Event) -> str:
    """The event as the JSON object streams send (`Event.to_dict`), compact."""
    return _ENCODE(event.to_dict())


def sse_frame(event: Event, body: str) -> bytes:
    """One SSE frame: `id`, `event` (the topic), `data` (`body`, the event's JSON)."""
    return f"id: {event.id}\nevent: {event.topic}\ndata: {body}\n\n".encode()


# One cache entry: the event it was made from, its JSON, and its SSE frame once built. A
# tuple: an object built per event (a dataclass's __init__) was a tenth of the cache's cost.
_Encoded = tuple[Event, str, bytes | None]


def _size(entry: _Encoded) -> int:
    """The bytes an entry holds (its JSON and its frame)."""
    frame = entry[2]
    return len(entry[1]) + (len(frame) if frame is not None else 0)


class EncodedEvents:
    """Each live event's JSON and SSE frame, encoded once and shared by every stream that
    sends it, instead of once per client. Used on the event loop only.

    Entries are keyed by event id and hold the event itself: an entry serves only that very
    object, so another event with the same id (a folded token event, a copy read back from
    the log) is never sent with someone else's encoding. Bounded in entries and in bytes;
    the oldest entries go first, and an evicted event is simply encoded again. The bounds
    cover the default `client_buffer` (1000 events, how far behind a client may fall) of
    small events and cost about 1.5 MB once full: the entries keep their events alive.
    """

    def __init__(self, max_entries: int = 1024, max_bytes: int = 4 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # Oldest first, popped in O(1): a full cache (a thousand agents' tokens, each a new
        # event) evicts once per event, and `next(iter(dict))` walks past every slot earlier
        # evictions emptied, up to the dict's next resize (a fifth of a token's cost here).
        self._entries: OrderedDict[int, _Encoded] = OrderedDict()
        self._bytes = 0

    def body(self, event: Event) -> str:
        """`event_json(event)`, from the cache when this event was encoded before."""
        entry = self._entries.get(event.id)
        if entry is not None and entry[0] is event:
            return entry[1]
        body = event_json(event)
        self._put(event, (event, body, None), entry)
        return body

    def sse_frame(self, event: Event) -> bytes:
        """`sse_frame(event, event_json(event))`, from the cache when built before."""
        entry = self._entries.get(event.id)
        if entry is not None and entry[0] is event:
            if entry[2] is not None:
                return entry[2]
            frame = sse_frame(event, entry[1])
            self._put(event, (event, entry[1], frame), entry)  # keeps its place
            return frame
        body = event_json(event)
        frame = sse_frame(event, body)
        self._put(event, (event, body, frame), entry)
        return frame

    def _put(self, event: Event, entry: _Encoded, held: _Encoded | None) -> None:
        """Store `entry` for `event` in place of `held`, the entry its id had (if any)."""
        entries = self._entries
        if held is not None and held[0] is not event:
            del entries[event.id]  # another event's: the new one goes last
        entries[event.id] = entry
        self._bytes += _size(entry) - (_size(held) if held is not None else 0)
        # Keep the newest entry even when it alone is over the byte bound: its caller holds it.
        while len(entries) > 1 and (len(entries) > self.max_entries or self._bytes > self.max_bytes):
            self._bytes -= _size(entries.popitem(last=False)[1])


ENCODED = EncodedEvents()


def bound_send_buffer(request: web.Request, size: int) -> None:
    """Give the stream's socket a kernel send buffer of `size` bytes (`[streams]
    send_buffer`). Left to itself Linux grows a send buffer up to `tcp_wmem`'s 4 MiB for a
    client that reads nothing, and keeps taking writes meanwhile: 200 such clients cost as
    much as 200 readers until each had swallowed megabytes, and held nearly a gigabyte of
    the kernel's TCP memory, which once past `tcp_mem`'s pressure mark slows every socket
    of the machine. Bounded, such a client stops taking writes after a few hundred KiB and
    costs nothing more until `send_timeout` drops it."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def drop_connection(request: web.Request) -> None:
    """End the connection of a client that went away or stopped reading. Aborted, not
    closed: a close waits until the write buffer drains, which a client that reads nothing
    never lets happen, so its socket and buffer would be held until the daemon stops."""
    if request.transport is not None:
        request.transport.abort()


class _LossWatch(asyncio.Protocol):
    """Stands between a connection's transport and aiohttp's protocol while a stream runs,
    passing everything through, to call `on_lost` the moment the connection is lost.

    aiohttp tells a handler only when its next write fails: an idle stream whose client
    left stayed subscribed until its next keepalive, up to `keepalive` seconds later."""

    def __init__(self, protocol: asyncio.Protocol, on_lost: Callable[[], None]) -> None:
        self.protocol = protocol
        self.on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.protocol.connection_lost(exc)
        finally:
            self.on_lost()

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def data_received(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()


def on_connection_lost(request: web.Request, callback: Callable[[], None]) -> None:
    """Call `callback` as soon as the request's connection is lost, until
    `forget_connection_lost(request)`."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    if transport is not None and isinstance(protocol, asyncio.Protocol):
        transport.set_protocol(_LossWatch(protocol, callback))


def forget_connection_lost(request: web.Request) -> None:
    """Undo `on_connection_lost`: the connection may serve further requests."""
    transport = request.transport
    watch = transport.get_protocol() if transport is not None else None
    if transport is not None and isinstance(watch, _LossWatch):
        transport.set_protocol(watch.protocol)


def writes_at_once(transport: asyncio.Transport | None, size: int) -> bool:
    """Whether `size` more bytes can be handed to `transport` without aiohttp waiting for the
    client: its writing is not paused, and these bytes cannot take its buffer past the
    high-water mark (which would pause it, and aiohttp's write would then wait to drain)."""
    if transport is None or transport.is_closing():
        return False
    buffered = transport.get_write_buffer_size()
    low, high = transport.get_write_buffer_limits()
    # Writing is paused only above `high` and resumed once the buffer is at or below `low`,
    # so a buffer at or below `low` means it is not paused.
    return buffered <= low and buffered + size <= high


class IdleWait:
    """A stream's wait for its next event that gives up once `interval` seconds have passed
    since the stream's last write (`last_write`, in loop time): time for a keepalive.

    One timer per interval however many events the stream sends. `asyncio.timeout` around
    each wait arms and cancels a timer for every delivery, which cost a third of the
    throughput at 10,000 clients; this timer is armed once and, when it finds the stream
    wrote meanwhile, moves itself to the new deadline. It interrupts the wait the way
    `asyncio.timeout` does, by cancelling the task and then uncancelling it, so a
    cancellation from elsewhere still goes through.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.loop = asyncio.get_running_loop()
        self.last_write = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: asyncio.Task[Any] | None = None
        self._expired = False

    async def next(self, sub: Subscription) -> Event | None:
        """The next event (or lagged marker); None when the interval passed without a write.
        Raises StopAsyncIteration once the subscription is closed and drained."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("IdleWait.next must run in a task")
        if self._timer is None:
            self._timer = self.loop.call_at(self.last_write + self.interval, self._on_timer)
        cancelling = task.cancelling()
        self._waiting = task
        try:
            return await sub.get()
        except asyncio.CancelledError:
            if self._expired and task.uncancel() <= cancelling:
                return None
            raise
        finally:
            self._waiting = None
            self._expired = False

    def close(self) -> None:
        """Drop the timer, so an ended stream is not kept until it fires."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiting is None:
            return  # the stream is writing: its next wait arms the timer from that write
        due = self.last_write + self.interval
        if due > self.loop.time() + _TIMER_SLACK:
            self._timer = self.loop.call_at(due, self._on_timer)
            return
        self._expired = True
        self._waiting.cancel()


class SseStream:
    """One SSE response: frames events, comments and control events; bounds each write."""

    def __init__(self, request: web.Request, config: StreamsConfig,
                 replayable: Callable[[Event], bool]) -> None:
        self.request = request
        self.config = config
        self.replayable = replayable
        self.last_sent = 0  # the highest id sent: where a lagged client resumes
        self.replayed: set[int] = set()  # ids the replay sent, skipped when they come live
        self.idle = IdleWait(config.keepalive)
        self.response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
            "Connection": "keep-alive",
        })

    async def open(self) -> None:
        bound_send_buffer(self.request, self.config.send_buffer)
        await self.response.prepare(self.request)
        # The first bytes go out at once: proxies and browsers see the stream is live.
        if opened_by_browser(self.request):
            # EventSource remembers an `id` only as a blank line ends its block, and takes a
            # block without `data` as no event: so an id of no event (nothing is dispatched)
            # is where its reconnect resumes, even before the stream saw an event: nothing
            # missed, and a stream token past its opening window still lets it back in.
            await self._write(
                f"id: {self.last_sent}\nretry: {self.config.retry_ms}\n: connected\n\n".encode())
        else:
            # No blank line, nor after a keepalive: httpx-sse and others report a blank line
            # after lines without `data` as an empty `message` event (once an `id` was seen,
            # for a lone comment too). Comment lines need no terminator, and `retry` takes
            # effect as its line is read.
            await self._write(f"retry: {self.config.retry_ms}\n: connected\n".encode())

    async def send_all(self, events: Iterable[Event]) -> None:
        """Send events read back from the log, several per write."""
        batch: list[bytes] = []
        size = 0
        for event in events:
            # Not through the shared cache: these are the log's copies, one per client.
            frame = sse_frame(event, event_json(event))
            batch.append(frame)
            size += len(frame)
            self.last_sent = max(self.last_sent, event.id)
            self.replayed.add(event.id)
            if size >= MAX_BATCH_BYTES:
                await self._write(b"".join(batch))
                batch, size = [], 0
                # A long replay must not hold the event loop until its last batch is out.
                await asyncio.sleep(0)
        if batch:
            await self._write(b"".join(batch))

    async def control(self, name: str, data: dict[str, Any]) -> None:
        """A stream-level event (gap, lagged, end): no id, so it never moves the resume point."""
        await self._write(self._control_frame(name, data))

    async def keepalive(self) -> None:
        await self._write(b": keepalive\n")

    @staticmethod
    def _control_frame(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps(data, default=str)}\n\n".encode()

    async def _write(self, data: bytes) -> None:
        if writes_at_once(self.request.transport, len(data)):
            # The write cannot wait on the client, so it needs no timer. `wait_for` around
            # every write (a task and a timer each) was about a quarter of the server's time.
            await self.response.write(data)
        else:
            async with asyncio.timeout(self.config.send_timeout):
                await self.response.write(data)
        self.idle.last_write = self.idle.loop.time()

    async def pump(
        self,
        sub: Subscription,
        accept: Callable[[Event], bool] | None = None,
        stop: Callable[[Event], bool] | None = None,
        until_empty: bool = False,
    ) -> bool:
        """Send the live events `accept` takes until `stop(event)` holds (True), or the
        client lags, the daemon stops, or (`until_empty`) nothing is buffered (False).
        A keepalive comment goes out after `keepalive` seconds without a write."""
        try:
            while True:
                event = sub.get_nowait()
                if event is None and until_empty:
                    return False
                if event is None:
                    try:
                        event = await self.idle.next(sub)
                    except StopAsyncIteration:
                        return False
                    if event is None:
                        await self.keepalive()
                        continue
                outcome = await self._send_buffered(sub, event, accept, stop)
                if outcome is not None:
                    return outcome
        finally:
            self.idle.close()

    async def _send_buffered(
        self,
        sub: Subscription,
        first: Event,
        accept: Callable[[Event], bool] | None,
        stop: Callable[[Event], bool] | None,
    ) -> bool | None:
        """Send `first` and what else is buffered, in one write (up to MAX_BATCH_BYTES):
        True once `stop` held, False after `lagged`, None to go on."""
        batch: list[bytes] = []
        size = 0
        outcome: bool | None = None
        event: Event | None = first
        while event is not None:
            if isinstance(event, Lagged):
                batch.append(self._control_frame("lagged", {"resume_after": self.last_sent,
                                                            "dropped": event.data.get("dropped")}))
                outcome = False
                break
            if (event.id not in self.replayed or not self.replayable(event)) and (
                    accept is None or accept(event)):
                frame = ENCODED.sse_frame(event)
                batch.append(frame)
                size += len(frame)
                self.last_sent = max(self.last_sent, event.id)
                if stop is not None and stop(event):
                    outcome = True
                    break
                if size >= MAX_BATCH_BYTES:
                    break
            # Otherwise already sent by the replay, or not this stream's.
            event = sub.get_nowait()
        if batch:
            await self._write(b"".join(batch))
        return outcome


def _subscribe(request: web.Request, patterns: TopicFilter | str, name: str,
               correlation_id: str | None = None) -> Subscription:
    daemon = request.app[DAEMON]
    sub = daemon.eventlog.streams.subscribe(
        patterns.text if isinstance(patterns, TopicFilter) else patterns,
        name=name, maxsize=daemon.config.streams.client_buffer, merge=coalesce_tokens,
        correlation_id=correlation_id)
    request.app[STREAMS].add(sub)
    # A client that leaves ends its stream at once: the subscription closes, and the wait
    # for its next event ends with it.
    on_connection_lost(request, sub.unsubscribe)
    return sub


def _release(request: web.Request, sub: Subscription) -> None:
    forget_connection_lost(request)
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
    sse = SseStream(request, daemon.config.streams, daemon.eventlog.replayable)
    # Live-only, a lag resumes after what existed when it subscribed, not the whole log.
    sse.last_sent = daemon.eventlog.streams.delivered_id if after is None else after
    try:
        await sse.open()
        if after is not None:
            if after < await daemon.eventlog.current_horizon():
                await sse.control("gap", {"requested_after": after,
                                          "kept_after": daemon.eventlog.horizon})
            async for page in daemon.eventlog.replay_pages(after, lambda e: patterns.matches(e.topic)):
                if isinstance(page, ReplayGap):
                    await sse.control("gap", {"requested_after": page.after, "kept_after": page.kept_after})
                else:
                    await sse.send_all(page)
        await sse.pump(sub)
    except (ConnectionError, TimeoutError):
        drop_connection(request)
    finally:
        _release(request, sub)
    return sse.response


@routes.get(r"/v1/tasks/{id:\d+}/stream")
@doc("Server-sent events of one task and its descendants: first a `task` event with the task "
     "as GET /v1/tasks/{id} shows it, then its task.* events; ends after the task's final event. "
     "A finished task's stream replays what the log kept, then ends", tag="streams", stream=True,
     query={"since": "resume after this event id (as Last-Event-ID)",
            "token": "a stream token from POST /v1/stream-tokens"},
     responses={200: "text/event-stream: a `task` event, task.* events, then an `end` event",
                404: "No such task"})
async def task_stream(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    task_id = path_id(request, "task_not_found", "task")
    record = await daemon.queue.get(task_id)  # TaskNotFoundError (404) for any unknown id
    after = resume_point(request) or 0
    tree = {task_id}

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

    # Subscribed before the tree is read: a child enqueued meanwhile is then seen queued live
    # (read first, its task.queued could go out in between, and its events be taken as
    # another tree's). Keyed by the tree's correlation id, which its every task carries:
    # other tasks' events (a thousand agents' tokens) never reach this stream.
    sub = _subscribe(request, "task.**", f"sse:task:{task_id}", record.correlation_id)
    sse = SseStream(request, daemon.config.streams, daemon.eventlog.replayable)
    sse.last_sent = after
    try:
        # Where the task stands when the client joins: the event log keeps no task.queued or
        # task.started by default, so a late or resumed stream would not replay them.
        snapshot = await with_children(request, record)
        tree.update(await daemon.queue.descendants(task_id))
        await sse.open()
        await sse.control("task", {"task": snapshot})
        if after and after < await daemon.eventlog.current_horizon():
            await sse.control("gap", {"requested_after": after, "kept_after": daemon.eventlog.horizon})
        replayed = [event for event in await daemon.eventlog.replay_correlation(record.correlation_id, after)
                    if in_tree(event)]
        await sse.send_all(replayed)
        ended = any(is_end(event) for event in replayed)
        if not ended:
            # Already finished: its last events are buffered (published after we subscribed)
            # or were in the replay; send what is buffered and end either way.
            finished = (await daemon.queue.get(task_id)).finished
            if finished:
                # Its final event is on the stream bus (buffered) once committed and read
                # back there (on PostgreSQL), not as it is published.
                await daemon.eventlog.settle()
            ended = await sse.pump(sub, accept=in_tree, stop=is_end, until_empty=finished)
            ended = ended or finished
        if ended:
            final = await daemon.queue.get(task_id)
            await sse.control("end", {"task": await with_children(request, final)})
    except (ConnectionError, TimeoutError):
        drop_connection(request)
    finally:
        _release(request, sub)
    return sse.response
