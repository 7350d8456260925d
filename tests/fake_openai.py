"""An OpenAI-compatible HTTP server for tests: `/v1/chat/completions` (streamed or not) and
`/v1/embeddings`, served by aiohttp on 127.0.0.1. Tests script its answers in order and
read back the requests it received.

    async with FakeOpenAI() as llm:
        llm.reply("Hello there")                    # streamed word by word, with usage
        llm.fail(429, retry_after="0")              # the next request gets a 429
        llm.chunks([{"tool_calls": [...]}, ...])    # raw deltas, for tool-call shapes
        config = {"llm": {"base_url": llm.url, "model": "test-model"}}
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Scripted:
    """One scripted answer: an error status, or deltas (streamed) making a reply."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    deltas: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] | None = None
    finish_reason: str = "stop"
    hold: asyncio.Event | None = None  # streaming pauses before the last delta until set
    raw: list[str] | None = None  # the `data:` payloads to stream instead, and nothing more
    pieces: list[bytes] | None = None  # the body to stream instead, exactly, one write each
    whole: bool = False  # one JSON completion even when a stream was asked for


class FakeOpenAI:
    """The server. Unscripted chat requests get the default reply `ok`."""

    def __init__(self, key: str | None = None, dimension: int = 16) -> None:
        self.key = key
        self.dimension = dimension
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.received = asyncio.Condition()
        self._script: deque[Scripted] = deque()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    # -- scripting ---------------------------------------------------------------------------

    def reply(self, text: str, *, usage: dict[str, int] | None = None, with_usage: bool = True,
              hold: asyncio.Event | None = None) -> None:
        """The next chat answer: `text`, streamed one word (with its space) per chunk."""
        words = re.findall(r"\S+\s*", text) or [text]
        if usage is None and with_usage:
            usage = {"prompt_tokens": 10, "completion_tokens": len(words),
                     "total_tokens": 10 + len(words)}
        self._script.append(Scripted(deltas=[{"content": w} for w in words], usage=usage, hold=hold))

    def chunks(self, deltas: list[dict[str, Any]], *, finish_reason: str = "tool_calls") -> None:
        """The next chat answer: exactly these deltas (e.g. tool-call fragments)."""
        self._script.append(Scripted(deltas=deltas, finish_reason=finish_reason))

    def raw(self, payloads: list[str]) -> None:
        """The next chat answer streams exactly these `data:` payloads (no final chunk, no
        usage, no [DONE] unless given): for broken streams and error chunks."""
        self._script.append(Scripted(raw=payloads))

    def pieces(self, pieces: list[bytes]) -> None:
        """The next chat answer's body is exactly these bytes, written one piece at a time."""
        self._script.append(Scripted(pieces=pieces))

    def whole(self, text: str) -> None:
        """The next chat answer is one JSON completion of `text`, even to a stream request."""
        self._script.append(Scripted(deltas=[{"content": text}], whole=True,
                                     usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}))

    def fail(self, status: int, *, retry_after: str | None = None) -> None:
        """The next chat request is answered with `status` (and Retry-After when given)."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        self._script.append(Scripted(status=status, headers=headers))

    async def wait_requests(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until `count` chat/embedding requests have arrived; return them all."""
        async with asyncio.timeout(timeout), self.received:
            await self.received.wait_for(lambda: len(self.requests) >= count)
        return self.requests

    # -- handlers ----------------------------------------------------------------------------

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body: dict[str, Any] = await request.json()
        async with self.received:
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            self.received.notify_all()
        return body

    def _authorised(self, request: web.Request) -> bool:
        return self.key is None or request.headers.get("Authorization") == f"Bearer {self.key}"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        if not self._authorised(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        scripted = self._script.popleft() if self._script else Scripted(
            deltas=[{"content": "ok"}], usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
        if scripted.status != 200:
            return web.json_response({"error": {"message": f"scripted {scripted.status}"}},
                                     status=scripted.status, headers=scripted.headers)
        model = body.get("model") or "fake"
        if not body.get("stream") or scripted.whole:
            return web.json_response(_whole(scripted, model))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if scripted.raw is not None:
            for payload in scripted.raw:
                await response.write(f"data: {payload}\n\n".encode())
            await response.write_eof()
            return response
        if scripted.pieces is not None:
            for piece in scripted.pieces:
                await response.write(piece)
            await response.write_eof()
            return response
        for number, delta in enumerate(scripted.deltas):
            if scripted.hold is not None and number == len(scripted.deltas) - 1:
                await scripted.hold.wait()
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        last = {"id": "chatcmpl-1", "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": scripted.finish_reason}]}
        await response.write(f"data: {json.dumps(last)}\n\n".encode())
        if scripted.usage is not None and (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "chatcmpl-1", "choices": [], "usage": scripted.usage}
            await response.write(f"data: {json.dumps(usage)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if not self._authorised(request):
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"index": i, "embedding": word_vector(t, self.dimension)} for i, t in enumerate(texts)]
        return web.json_response({"data": data, "model": body.get("model", "fake")})


def _whole(scripted: Scripted, model: str) -> dict[str, Any]:
    text = "".join(d.get("content") or "" for d in scripted.deltas)
    calls = [c for d in scripted.deltas for c in d.get("tool_calls") or []]
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = calls
    out: dict[str, Any] = {"id": "chatcmpl-1", "model": model, "choices": [
        {"index": 0, "message": message, "finish_reason": scripted.finish_reason}]}
    if scripted.usage is not None:
        out["usage"] = scripted.usage
    return out


def word_vector(text: str, dimension: int) -> list[float]:
    """A deterministic bag-of-words vector: texts sharing words are near each other."""
    vector = [0.0] * dimension
    for word in re.findall(r"\w+", text.lower()):
        digest = hashlib.sha256(word.encode()).digest()
        vector[int.from_bytes(digest[:4], "big") % dimension] += 1.0 if digest[4] & 1 else -1.0
    if not any(vector):
        vector[0] = 1.0
    return vector
