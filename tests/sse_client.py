"""A strict SSE client for tests: reads frames from a streaming aiohttp response, each
read bounded by a timeout, and fails on anything that is not SSE."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp

FRAME_TIMEOUT = 2.0


@dataclass
class Frame:
    """One SSE frame: its fields, and the comment lines that came with it."""

    id: int | None = None
    event: str | None = None
    data: Any = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self == Frame()


class Sse:
    """Reads SSE frames from a streaming aiohttp response, each read bounded by a timeout."""

    def __init__(self, response: aiohttp.ClientResponse, *, browser: bool = False) -> None:
        """`browser`: the stream was opened as a browser's (Fetch Metadata headers or a
        stream token), so it opens with an id and a blank line that ends no event."""
        self.response = response
        self.browser = browser

    async def frame(self, timeout: float = FRAME_TIMEOUT) -> Frame | None:
        """The next frame: an event (a blank line ends it) or a comment line, with the
        fields read before it (the opening `retry`); None at the end of the stream.

        A blank line must end a block with `data` (but for a browser's): EventSource ignores
        one without, but clients such as httpx-sse report it as an empty `message` event."""

        async def read() -> Frame | None:
            frame = Frame()
            data: list[str] = []
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    assert frame.retry is None and frame.id is None and frame.event is None \
                        and not data, f"the stream ended inside a frame: {frame}"
                    return None
                line = raw.decode().rstrip("\r\n")
                if line == "" and not data and self.browser and frame.empty:
                    continue  # the end of a browser stream's opening block: no event
                if line == "":
                    assert data, f"a blank line ends a block without data: {frame}"
                    frame.data = json.loads("\n".join(data))
                    return frame
                if line.startswith(":"):
                    assert not data and frame.event is None, f"a comment inside an event: {line!r}"
                    frame.comments.append(line[1:].strip())
                    return frame
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "data":
                    data.append(value)
                elif name in ("id", "retry"):
                    setattr(frame, name, int(value))
                elif name == "event":
                    frame.event = value
                else:
                    raise AssertionError(f"unexpected SSE field {line!r}")

        return await asyncio.wait_for(read(), timeout)

    async def next_event(self, timeout: float = FRAME_TIMEOUT) -> Frame:
        """The next frame carrying an event (keepalive comments are skipped)."""
        while True:
            frame = await self.frame(timeout)
            assert frame is not None, "the stream ended"
            if frame.event is not None:
                return frame

    async def events(self, count: int) -> list[Frame]:
        return [await self.next_event() for _ in range(count)]

    async def opened(self) -> Frame:
        """The first frame, sent before any event: the reconnect delay and a comment, and for
        a browser's stream the resume point (an id of no event)."""
        frame = await self.frame()
        assert frame is not None
        assert frame.retry is not None and (frame.id is not None) == self.browser
        assert frame.event is None and frame.data is None
        return frame

    async def until(self, name: str) -> list[Frame]:
        """Every event frame up to and including the first one named `name`."""
        frames = [await self.next_event()]
        while frames[-1].event != name:
            frames.append(await self.next_event())
        return frames


async def logged(daemon: Any, events: Any) -> list[Any]:
    """`events`, published on `daemon`'s bus, as the log and streams have them: themselves on
    SQLite; on PostgreSQL with the log's ids, given at commit (see agentd/eventlog.py)."""
    return list(await daemon.eventlog.stored(list(events)))


async def logged_ids(daemon: Any, events: Any) -> list[int]:
    return [e.id for e in await logged(daemon, events)]


def sql(daemon: Any, statement: str) -> str:
    """`statement` with `?` placeholders as the daemon's engine takes them."""
    if daemon.storage.postgres is None:
        return statement
    parts = statement.split("?")
    return parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], start=1))


async def bus_id(daemon: Any, stream_id: int) -> int:
    """The id `daemon`'s bus (its handlers, its triggers' tasks) gave the event that streams
    show as `stream_id`: the same on SQLite; on PostgreSQL the log keeps it (`origin_id`)."""
    if daemon.storage.postgres is None:
        return stream_id
    row = await daemon.store.read_one("SELECT origin_id FROM events WHERE id = $1", (stream_id,))
    assert row is not None, f"no event {stream_id} in the log"
    return int(row["origin_id"])
