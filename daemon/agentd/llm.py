"""Chat completions from an OpenAI-compatible endpoint (OpenAI, Ollama, vLLM, llama.cpp,
litellm), streamed: `LlmClient.chat` reads the server-sent chunks, hands each content
delta to a callback as it arrives, and assembles tool calls tolerantly.

Servers disagree on how tool-call deltas are numbered: OpenAI sends an `index` on every
delta and the `id` and name only on the first; Ollama sends each call whole without an
`index`; some proxies send `index` 0 for every call. A delta joins the call its `index`
names unless it carries a different `id` (then it starts a new call); without an `index`
it joins the call of its `id`, or the last call when it has none.

Errors map onto the queue's semantics: 503 becomes `Retry` (after `Retry-After` seconds
when the server says), 429 `RateLimited` (with a Retry-After it holds back every task of
the task's rate group until then, its attempt unspent), other 4xx a `Fail` (retrying the same request cannot
help), 5xx and connection errors an `LlmError`, which the worker retries with backoff.
A call cut short (a cancel, a timeout, the budget) still counts the tokens it streamed;
what cut it is what its caller sees, never a failure of that count, which is logged.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp
import orjson

from agentd.config import LlmConfig
from agentd.errors import AgentdError, Fail, InvalidTaskError, RateLimited, Retry, describe
from agentd.log import get_logger
from agentd.taskqueue import TaskQueue, TaskRecord

_LOG = get_logger("llm")
_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class LlmError(AgentdError):
    """The LLM endpoint failed in a way another attempt may not (5xx, connection lost)."""


class LlmUnavailableError(Fail):
    """No LLM is configured (`[llm] base_url` is empty)."""


class TokenBudgetExceededError(Fail):
    """The task used more LLM tokens than its budget allows; it fails without retrying."""


@dataclass(slots=True)
class ChatResult:
    """One completed chat: the text, the assembled tool calls, and the token usage
    (`estimated` when the server sent none and the counts are approximations)."""

    content: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str | None
    model: str
    usage: dict[str, int]
    estimated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"content": self.content, "tool_calls": self.tool_calls,
                "finish_reason": self.finish_reason, "model": self.model, "usage": self.usage}


@dataclass(slots=True)
class ToolCallAssembler:
    """Builds whole tool calls out of streamed deltas, however the server numbers them."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    _by_index: dict[int, int] = field(default_factory=dict)

    def add(self, delta: Mapping[str, Any]) -> None:
        call_id = delta.get("id") or None
        index = delta.get("index")
        function = delta.get("function") or {}
        name = function.get("name")
        position = self._position(index if isinstance(index, int) else None, call_id, name)
        if position is None:
            self.calls.append({"id": call_id, "type": "function",
                               "function": {"name": "", "arguments": ""}})
            position = len(self.calls) - 1
            if isinstance(index, int):
                self._by_index[index] = position
        call = self.calls[position]
        if call_id and not call["id"]:
            call["id"] = call_id
        # Some proxies repeat the whole name on every delta: a name equal to the one held
        # is a repeat, not a continuation.
        if isinstance(name, str) and name and name != call["function"]["name"]:
            call["function"]["name"] += name
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            call["function"]["arguments"] += arguments
        elif isinstance(arguments, Mapping):  # Ollama sends the arguments as an object
            call["function"]["arguments"] = json.dumps(arguments)

    def _position(self, index: int | None, call_id: str | None, name: Any) -> int | None:
        if index is not None and index in self._by_index:
            held = self.calls[self._by_index[index]]
            if call_id is None or held["id"] in (None, call_id):
                return self._by_index[index]
            return None  # the same index again with a new id: another call
        if index is not None:
            return None
        if call_id is not None:
            return next((i for i, c in enumerate(self.calls) if c["id"] == call_id), None)
        # No index and no id (Ollama): a name starts a call; arguments alone continue one.
        return len(self.calls) - 1 if self.calls and not name else None

    def result(self) -> list[dict[str, Any]]:
        """The calls, each with an id (made up when the server sent none)."""
        for number, call in enumerate(self.calls):
            call["id"] = call["id"] or f"call_{number}"
        return self.calls


class LlmClient:
    """The configured chat endpoint. One HTTP session, opened on first use."""

    def __init__(self, config: LlmConfig, api_key: str) -> None:
        self.config = config
        self._api_key = api_key
        self._session: aiohttp.ClientSession | None = None
        # Sessions a reload replaced (another `max_connections`): their requests under way
        # finish on them; they close with the client.
        self._retired: list[aiohttp.ClientSession] = []
        # (model, task name, "prompt" | "completion") → tokens the daemon's tasks spent, and
        # (model, task name) → their calls: what /metrics shows.
        self.tokens: Counter[tuple[str, str, str]] = Counter()
        self.calls: Counter[tuple[str, str]] = Counter()

    def reconfigure(self, config: LlmConfig, api_key: str) -> None:
        """Use `config` and `api_key` from the next request on (a reload); a request under
        way finishes with what it started with."""
        if self._session is not None and config.max_connections != self.config.max_connections:
            self._retired.append(self._session)  # the connector's limit is fixed at its making
            self._session = None
        self.config, self._api_key = config, api_key

    @property
    def enabled(self) -> bool:
        return bool(self.config.base_url)

    async def close(self) -> None:
        for session in [*self._retired, *([self._session] if self._session is not None else [])]:
            await session.close()
        self._retired.clear()
        self._session = None

    async def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        stream: bool = True,
        on_token: Callable[[str], None] | None = None,
        **params: Any,
    ) -> ChatResult:
        """Send one chat completion request; call `on_token(text)` for each content delta.

        Raises:
            LlmUnavailableError: no LLM is configured.
            RateLimited: 429; Retry: 503 (with the server's Retry-After as the delay when it
                gave one).
            Fail: any other 4xx: the request itself is wrong.
            LlmError: 5xx, a broken stream, or the connection failed.
            InvalidTaskError: `messages` is not a list of {role, content} objects.
        """
        if not self.enabled:
            raise LlmUnavailableError("no LLM is configured: set [llm] base_url in agentd.toml")
        _check_messages(messages)
        body: dict[str, Any] = {"model": model or self.config.model, "messages": list(messages),
                                "stream": stream, **params}
        if tools:
            body["tools"] = list(tools)
        if stream:
            body.setdefault("stream_options", {"include_usage": True})
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        # Per request, not the session's: a reload changes them for the next request.
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout,
                                        sock_read=self.config.read_timeout)
        try:
            async with self._client().post(url, json=body, headers=self._headers(),
                                           timeout=timeout) as response:
                await _raise_for_status(response)
                # Some servers answer a streamed request with one JSON completion.
                if not stream or response.content_type == "application/json":
                    return _from_message(await response.json(), body["model"], messages)
                return await _read_stream(response, body["model"], messages, on_token)
        except aiohttp.ClientError as exc:
            raise LlmError(f"the LLM endpoint {url} failed: {describe(exc)}") from exc
        except TimeoutError as exc:
            raise LlmError(f"the LLM endpoint {url} sent nothing for {self.config.read_timeout} s") from exc

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # One connection per streaming reply: the limit is the endpoint's concurrency.
            connector = aiohttp.TCPConnector(limit=self.config.max_connections)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}


class TaskLlm:
    """`ctx.llm`: chats on behalf of one running task. Content tokens are published as
    `task.token` events (the task's SSE and WebSocket streams carry them as they come),
    each call's usage is added to the task's (`usage` in the task API, summed over
    attempts), and a task past its token budget (`@plugin.task(token_budget=)`, else
    `[llm] token_budget`; 0 is none) is stopped mid-stream with a `task.budget_exceeded`
    event and fails."""

    def __init__(self, client: LlmClient, queue: TaskQueue, record: TaskRecord, budget: int,
                 on_token: Callable[[str], None]) -> None:
        self.client = client
        self._queue = queue
        self._record = record
        self._on_token = on_token
        self._budget = budget
        self._used = (record.usage or {}).get("total_tokens", 0)

    @property
    def enabled(self) -> bool:
        """Whether an LLM is configured; without one `chat` fails the task."""
        return self.client.enabled

    @property
    def used(self) -> int:
        """Tokens this task has used so far, over all its attempts."""
        return self._used

    async def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None,
                   tools: Sequence[Mapping[str, Any]] | None = None, stream: bool = True,
                   **params: Any) -> ChatResult:
        """`LlmClient.chat` for this task: streamed tokens become events, usage is counted.

        Raises:
            TokenBudgetExceededError: the task's tokens passed its budget.
            and what `LlmClient.chat` raises.
        """
        self._check_budget(0)
        prompt = estimate_usage(messages, "", 0)["prompt_tokens"]
        streamed = 0
        model = model or self.client.config.model

        def on_token(text: str) -> None:
            nonlocal streamed
            streamed += 1
            self._on_token(text)
            self._check_budget(prompt + streamed)

        try:
            result = await self.client.chat(messages, model=model, tools=tools, stream=stream,
                                            on_token=on_token, **params)
        except BaseException:
            # Tokens already streamed were spent, whatever ended the call (the budget, a
            # broken stream, a timeout, a cancel): count them, estimated, so the usage and the
            # budget hold across attempts. A call that produced nothing is not counted.
            if streamed:
                await self._count_spent({"prompt_tokens": prompt, "completion_tokens": streamed,
                                         "total_tokens": prompt + streamed}, model)
            raise
        await self._count(result.usage, model)
        self._check_budget(0)
        return result

    async def _count_spent(self, usage: Mapping[str, int], model: str) -> None:
        """Count the tokens of a call cut short, while the exception that cut it propagates.

        The count is shielded: a cancel cannot stop a write the store's thread may commit
        anyway. A count that fails is logged (`llm.usage_not_counted`) and returns, so the
        caller's exception (a cancel, a timeout, the budget) stays the one raised. Cancelled
        again while counting, it raises that CancelledError and the count runs on, logged
        should it fail with nobody left to hear.
        """
        counting = asyncio.ensure_future(self._count(usage, model))
        try:
            await asyncio.shield(counting)
        except asyncio.CancelledError:
            if not counting.done():
                counting.add_done_callback(partial(self._log_unheard_failure, usage))
            raise
        except Exception as exc:
            self._log_not_counted(usage, exc)

    def _log_unheard_failure(self, usage: Mapping[str, int], done: asyncio.Future[None]) -> None:
        if not done.cancelled() and (exc := done.exception()) is not None:
            self._log_not_counted(usage, exc)

    def _log_not_counted(self, usage: Mapping[str, int], exc: BaseException) -> None:
        _LOG.error("llm.usage_not_counted", task_id=self._record.id, task=self._record.name,
                   usage=dict(usage), error=describe(exc), exc_info=exc)

    async def _count(self, usage: Mapping[str, int], model: str) -> None:
        name = self._record.name
        self.client.tokens[model, name, "prompt"] += usage.get("prompt_tokens", 0)
        self.client.tokens[model, name, "completion"] += usage.get("completion_tokens", 0)
        self.client.calls[model, name] += 1
        totals = await self._queue.add_usage(self._record.id, {**usage, "calls": 1})
        self._used = totals.get("total_tokens", 0)
        self._record.usage = totals

    def _check_budget(self, pending: int) -> None:
        if not self._budget or self._used + pending <= self._budget:
            return
        used = self._used + pending
        self._queue.publish("task.budget_exceeded", self._record, budget=self._budget, used=used)
        raise TokenBudgetExceededError(
            f"token budget exceeded: the task used {used} tokens of its budget of {self._budget}")


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Raise InvalidTaskError (a ValueError: it fails a task at once) for malformed messages."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise InvalidTaskError("messages must be a non-empty list of {role, content} objects")
    for number, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidTaskError(f"messages[{number}] must be an object with a role, got {message!r}")


async def _raise_for_status(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    detail = (await response.text())[:500]
    where = f"the LLM endpoint answered {response.status}: {detail}"
    if response.status == 429:
        raise RateLimited.after(response.headers.get("Retry-After"), where)
    if response.status == 503:
        raise Retry.after(response.headers.get("Retry-After"), where)
    if response.status in _RETRY_STATUSES:
        raise LlmError(where)
    raise Fail(where)


async def _read_stream(response: aiohttp.ClientResponse, model: str,
                       messages: Sequence[Mapping[str, Any]],
                       on_token: Callable[[str], None] | None) -> ChatResult:
    reply = _StreamedReply(model, on_token)
    content = response.content
    # A server that never ends its line must not fill the memory: the bound aiohttp's
    # `readline` kept (its buffer's high-water mark) on the part of a line still to end.
    longest = content.get_read_buffer_limits()[1]
    pending = b""  # the start of a line whose end has not come yet
    # The body is split into lines here, not read a line at a time (`async for line in
    # response.content`): one await per read of the socket instead of two per chunk (its
    # `data:` line and the blank line after it), a third of the reading's CPU per token.
    async for block in content.iter_any():
        lines = (pending + block if pending else block).split(b"\n")
        pending = lines.pop()
        if len(pending) > longest:
            raise LlmError(f"the LLM endpoint sent a line longer than {longest} bytes")
        for line in lines:
            # Shorter lines cannot hold `data:`: the blank line ending every chunk.
            if len(line) >= 5 and reply.take(line):
                return reply.result(messages)
    if pending:  # the last line, without its newline
        reply.take(pending)
    return reply.result(messages)


class _StreamedReply:
    """A streamed reply as its `data:` lines come in, for `_read_stream`."""

    __slots__ = ("content", "done", "finish", "model", "on_token", "tools", "usage")

    def __init__(self, model: str, on_token: Callable[[str], None] | None) -> None:
        self.model = model
        self.on_token = on_token
        self.content: list[str] = []
        self.tools = ToolCallAssembler()
        self.finish: str | None = None
        self.usage: dict[str, int] | None = None
        self.done = False

    def take(self, raw: bytes) -> bool:
        """Take one line of the body (without its newline); True once it was `[DONE]`.

        Raises:
            LlmError: the line's payload is neither JSON nor `[DONE]`, or an error object.
        """
        line = raw.strip()
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                return True
            try:
                chunk = orjson.loads(payload)  # per token: a third of the stdlib's time
            except ValueError:  # not UTF-8, or Unicode whitespace around it
                return self._take_text(raw)
        elif line.isascii():
            return False  # comments, event names, blank separators
        else:  # Unicode whitespace before `data:`?
            return self._take_text(raw)
        self._add(chunk)
        return False

    def _take_text(self, raw: bytes) -> bool:
        """`take` for a line read as text: bytes that are not UTF-8 replaced, Unicode
        whitespace stripped around the line and its payload."""
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            return False
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return True
        try:
            chunk = orjson.loads(payload)
        except ValueError as exc:
            raise LlmError(f"the LLM endpoint sent a chunk that is not JSON: {payload[:200]!r}") from exc
        self._add(chunk)
        return False

    def _add(self, chunk: Any) -> None:
        _raise_for_error(chunk)
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                self.content.append(text)
                if self.on_token is not None:
                    self.on_token(text)
            for call in delta.get("tool_calls") or []:
                self.tools.add(call)
            self.finish = choice.get("finish_reason") or self.finish

    def result(self, messages: Sequence[Mapping[str, Any]]) -> ChatResult:
        """The whole reply, once the body ended or sent `[DONE]`.

        Raises:
            LlmError: the body ended before its last chunk, or without a completion.
        """
        if not self.done and self.finish is None:
            raise LlmError("the LLM stream ended before its last chunk")
        if self.finish is None and not self.content and not self.tools.calls:
            raise LlmError("the LLM stream ended without a completion (no content, no finish reason)")
        text = "".join(self.content)
        return ChatResult(text, self.tools.result(), self.finish, self.model,
                          self.usage or estimate_usage(messages, text, len(self.content)),
                          self.usage is None)


def _raise_for_error(body: Mapping[str, Any]) -> None:
    """An answer that is an error object ({"error": ...} or {"object": "error"}) despite a
    200 status (vLLM and some proxies send these mid-stream) is an LlmError."""
    if not isinstance(body, dict | Mapping):  # dict first: the ABC's check is slow, per token
        raise LlmError(f"the LLM endpoint sent {type(body).__name__} JSON, not an object")
    if body.get("error") or body.get("object") == "error":
        raise LlmError(f"the LLM endpoint sent an error: {body.get('error') or body.get('message')}")


def _from_message(body: Mapping[str, Any], model: str, messages: Sequence[Mapping[str, Any]]) -> ChatResult:
    _raise_for_error(body)
    if not body.get("choices"):
        raise LlmError("the LLM endpoint answered without choices")
    choice = body["choices"][0]
    message = choice.get("message") or {}
    tools = ToolCallAssembler()
    for call in message.get("tool_calls") or []:
        tools.add(call)
    text = message.get("content") or ""
    usage = _usage(body["usage"]) if body.get("usage") else None
    return ChatResult(text, tools.result(), choice.get("finish_reason"), body.get("model") or model,
                      usage or estimate_usage(messages, text, None), usage is None)


def _usage(raw: Mapping[str, Any]) -> dict[str, int]:
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": int(raw.get("total_tokens") or prompt + completion)}


def estimate_usage(messages: Sequence[Mapping[str, Any]], completion: str,
                   chunks: int | None) -> dict[str, int]:
    """Token counts for a server that reports none: about four characters a token, and at
    least one token per streamed chunk."""
    prompt = sum(len(str(m.get("content") or "")) for m in messages) // 4 + 1
    produced = max(len(completion) // 4, chunks or 0)
    return {"prompt_tokens": prompt, "completion_tokens": produced, "total_tokens": prompt + produced}
