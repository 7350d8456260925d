"""One model call for many callers: the texts that concurrent `remember()` and `recall()`
calls want embedded are gathered into batches.

An embedding model costs far less per text in a batch than alone (MiniLM on two cores:
about 445 sentences/s in batches of 64 against 150/s one at a time), but each agent
remembers one text at a time. `EmbeddingBatcher` sits between memory and its embedder:
every call queues its texts and waits; while the model works on one batch, the next one
fills with whatever arrived meanwhile. An idle daemon's lone call goes straight to the
model (no timer waits for company), and the busier memory is, the larger the batches.

Recall's queries (`query=True`) have a lane of their own, batched among themselves: an
agent waiting on recall waits neither for the call the model is on (up to `embed_batch`
texts: hundreds of milliseconds on two cores) nor for a bulk import's backlog.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from agentd.embed import Embedder
from agentd.errors import EmbedderError, EmbedderInputError

DEFAULT_PARALLEL_CALLS = 4


@dataclass(slots=True)
class _Request:
    texts: list[str]
    future: asyncio.Future[list[list[float]]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class _Lane:
    """Requests waiting for the model, and the tasks calling it for them (at most `limit`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.waiting: deque[_Request] = deque()
        self.runners: set[asyncio.Task[None]] = set()

    def take(self, max_texts: int) -> list[_Request]:
        """The next batch: whole requests, in order, until it holds `max_texts` texts (a
        larger request alone)."""
        batch: list[_Request] = []
        size = 0
        while self.waiting and (not batch or size + len(self.waiting[0].texts) <= max_texts):
            request = self.waiting.popleft()
            if request.future.done():  # its caller was cancelled
                continue
            batch.append(request)
            size += len(request.texts)
        return batch


class EmbeddingBatcher:
    """Embeds through `embedder`, the texts of concurrent calls together.

    A model call takes whole requests from the queue until it holds `max_texts` texts (a
    request larger than that goes alone; the embedder splits it as it must). At most
    `embedder.parallel_calls` model calls for texts to store run at once
    (`DEFAULT_PARALLEL_CALLS` when the embedder does not say: one slow call, e.g. to a
    remote model, then holds up no other), and beside them one for queries.
    A failed call fails every request in it, except that a batch refused for its input
    (`EmbedderInputError`, e.g. one text too long for an endpoint) is retried request by
    request, so one bad text fails only its own caller. A caller that is cancelled while
    waiting is dropped from its batch.
    """

    def __init__(self, embedder: Embedder, max_texts: int = 64) -> None:
        if max_texts < 1:
            raise ValueError(f"max_texts: expected at least 1, got {max_texts}")
        self.embedder = embedder
        self.max_texts = max_texts
        parallel = max(1, int(getattr(embedder, "parallel_calls", DEFAULT_PARALLEL_CALLS)))
        self._texts = _Lane(parallel)
        self._queries = _Lane(1)
        self._closed = False
        # What the batches held, for /metrics and the bench: calls made, texts embedded.
        self.model_calls = 0
        self.texts_embedded = 0

    @property
    def id(self) -> str:
        return self.embedder.id

    @property
    def dimension(self) -> int:
        return self.embedder.dimension

    @property
    def queued(self) -> int:
        """Texts waiting for a model call (those of calls already under way not counted)."""
        return sum(len(request.texts) for lane in (self._texts, self._queries)
                   for request in lane.waiting if not request.future.done())

    async def embed(self, texts: Sequence[str], *, query: bool = False) -> list[list[float]]:
        """The vectors of `texts`, in order; `query`: a recall's, in the lane of queries.

        Raises:
            EmbedderError: the embedder failed, or the batcher is closed.
        """
        if not texts:
            return []
        if self._closed:
            raise EmbedderError("memory is closing: nothing more is embedded")
        lane = self._queries if query else self._texts
        request = _Request(list(texts))
        lane.waiting.append(request)
        if len(lane.runners) < lane.limit:
            runner = asyncio.create_task(self._run(lane), name="agentd-embedding-batcher")
            lane.runners.add(runner)
        return await request.future

    async def close(self) -> None:
        """Fail what is queued, stop the model calls under way, close the embedder if it
        holds anything (an HTTP session)."""
        self._closed = True
        runners = [*self._texts.runners, *self._queries.runners]
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        closing = EmbedderError("memory closed before this text was embedded")
        for lane in (self._texts, self._queries):
            while lane.waiting:
                _fail(lane.waiting.popleft(), closing)
        close = getattr(self.embedder, "close", None)
        if close is not None:
            await close()

    async def _run(self, lane: _Lane) -> None:
        try:
            while lane.waiting:
                batch = lane.take(self.max_texts)
                if batch:
                    await self._embed_batch(batch)
        finally:
            # Leaves the lane in the step that found it empty: a done callback would leave it
            # a loop turn later, and a caller woken by this runner's last batch that asked
            # again at once found the lane full of runners and no runner coming (it waited
            # for ever with a one-call embedder, MiniLM).
            lane.runners.discard(asyncio.current_task())

    async def _embed_batch(self, batch: list[_Request]) -> None:
        texts = [text for request in batch for text in request.texts]
        try:
            vectors = await self._call(texts)
        except EmbedderInputError as exc:
            if len(batch) == 1:
                _fail(batch[0], exc)
                return
            for request in batch:  # find the text the model refused: each request alone
                if not request.future.done():
                    await self._embed_batch([request])
            return
        except asyncio.CancelledError:
            closing = EmbedderError("memory closed while this text was being embedded")
            for request in batch:
                _fail(request, closing)
            raise
        except Exception as exc:  # every caller of the batch gets the failure
            failure = exc if isinstance(exc, EmbedderError) else EmbedderError(
                f"embedder {self.embedder.id!r} failed: {type(exc).__name__}: {exc}")
            for request in batch:
                _fail(request, failure)
            return
        start = 0
        for request in batch:
            end = start + len(request.texts)
            if not request.future.done():
                request.future.set_result(vectors[start:end])
            start = end

    async def _call(self, texts: list[str]) -> list[list[float]]:
        vectors = await self.embedder.embed(texts)
        self.model_calls += 1
        self.texts_embedded += len(texts)
        if len(vectors) != len(texts):
            raise EmbedderError(f"embedder {self.embedder.id!r} returned {len(vectors)} vectors "
                                f"for {len(texts)} texts")
        return vectors


def _fail(request: _Request, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)
