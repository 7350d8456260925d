"""The public faces of the objects `ctx` hands to plugins, as `typing.Protocol`s.

The classes behind `ctx.memory`, `ctx.mail`, `ctx.webhook`, `ctx.llm` and the task
records that `submit`, `send` and `post` return are internal: they carry what the daemon
needs (their stores, the worker's bookkeeping) and may change. A plugin annotates with
these instead, re-exported from `agentd`. Each lists what a plugin may use, no more.

`Context` and `PluginContext` declare their properties with these types, so mypy checks
on every run that the real classes satisfy them; each is also `runtime_checkable`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import EllipsisType
from typing import Any, Protocol, runtime_checkable

from agentd.llm import ChatResult
from agentd.memory import DEFAULT_NAMESPACE, Memory, MemoryChange, Recalled
from agentd.taskqueue import TaskStatus


@runtime_checkable
class TaskRecord(Protocol):
    """A task as it stood when it was returned (enqueued, or finished for `wait`)."""

    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def queue(self) -> str: ...
    @property
    def status(self) -> TaskStatus:
        """queued, running, succeeded, failed, dead or cancelled."""
    @property
    def args(self) -> dict[str, Any]: ...
    @property
    def priority(self) -> int: ...
    @property
    def run_at(self) -> float:
        """The Unix time it is due."""
    @property
    def attempts(self) -> int: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def timeout(self) -> float | None:
        """Seconds an attempt may run (None: no limit)."""
    @property
    def parent_id(self) -> int | None: ...
    @property
    def correlation_id(self) -> str: ...
    @property
    def result(self) -> Any:
        """What the task returned (JSON), once it succeeded."""
    @property
    def error(self) -> str | None: ...
    @property
    def created_at(self) -> float: ...
    @property
    def started_at(self) -> float | None: ...
    @property
    def finished_at(self) -> float | None: ...
    @property
    def finished(self) -> bool:
        """Whether it is in a final state (succeeded, failed, dead, cancelled)."""

    def to_dict(self) -> dict[str, Any]:
        """The task as the HTTP API shows it."""


@runtime_checkable
class Session(Protocol):
    """One conversation in short-term memory (`ctx.memory.session(id)`); it expires
    `[memory] session_ttl` seconds after its last message."""

    @property
    def id(self) -> str: ...

    async def append(self, role: str, content: str,
                     meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Add a message; return it with its id and time."""

    async def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """The last `limit` messages, oldest first (none once the session has expired)."""

    async def clear(self) -> int:
        """Delete the session and its messages; return how many messages there were."""


@runtime_checkable
class MemoryStore(Protocol):
    """`ctx.memory`: short-term sessions and long-term memory searched by meaning.

    Raises (every method): ValueError for a malformed argument, MemoryNotFoundError for an
    id that names no memory.
    """

    def session(self, session_id: str) -> Session:
        """The conversation `session_id` (letters, digits and `_.:-`, up to 128)."""

    async def remember(self, text: str, namespace: str = DEFAULT_NAMESPACE,
                       metadata: Mapping[str, Any] | None = None, expires_at: float | None = None,
                       supersedes: int | None = None) -> tuple[Memory, bool]:
        """Store `text`; return the memory and whether it is new (False: the existing
        memory it duplicates). `supersedes`: the id of a memory this one corrects."""

    async def recall(self, query: str, namespace: str = DEFAULT_NAMESPACE, k: int = 10,
                     where: Mapping[str, Any] | None = None, hybrid: bool = False) -> list[Recalled]:
        """The `k` memories nearest `query` in meaning within `namespace`, newest corrections
        only; `hybrid` also ranks by keywords. `where`: {field: value or [values]}."""

    async def get(self, memory_id: int) -> Memory:
        """One memory by id."""

    async def history(self, memory_id: int) -> list[MemoryChange]:
        """The memory's changes, oldest first: `created`, each `updated` (with the text and
        metadata before), `superseded` (by a correction)."""

    async def update(self, memory_id: int, text: str | None = None,
                     metadata: Mapping[str, Any] | None = None,
                     expires_at: float | EllipsisType | None = ...) -> Memory:
        """Change a memory in place; `expires_at` left out keeps its expiry."""

    async def forget(self, memory_id: int | None = None, namespace: str | None = None,
                     where: Mapping[str, Any] | None = None) -> int:
        """Delete one memory by id, or every memory of a namespace matching `where`;
        return how many went."""


@runtime_checkable
class Mail(Protocol):
    """`ctx.mail`: mail sent by the durable task `agentd.send_mail`."""

    @property
    def enabled(self) -> bool:
        """Whether `[mail] host` names a server; without one `send` raises
        MailUnavailableError."""

    async def send(self, to: str | Sequence[str], subject: str, text: str, html: str | None = None,
                   *, idempotency_key: str | None = None) -> TaskRecord:
        """Check the message and enqueue its delivery; return the `agentd.send_mail` task.
        From a task the key defaults to one numbered per task (a retry does not send again).

        Raises:
            MailUnavailableError: mail is not configured.
            InvalidTaskError: (a ValueError) an address, the subject or the body is malformed.
        """

    def check(self, to: str | Sequence[str], subject: str = "", text: str = "",
              html: str | None = None) -> None:
        """Raise InvalidTaskError (a ValueError) for what `send` would refuse, sending
        nothing: to find a bad address before the work whose result it would carry."""


@runtime_checkable
class Webhook(Protocol):
    """`ctx.webhook`: signed POSTs sent by the durable task `agentd.post_webhook`."""

    async def post(self, url: str, json: Any, *, idempotency_key: str | None = None) -> TaskRecord:
        """Check the URL and the body and enqueue the delivery; return its task. From a
        task the key defaults to one numbered per task (a retry does not post again).

        Raises:
            InvalidTaskError: (a ValueError) the URL is not http(s) or the body is not JSON.
        """


@runtime_checkable
class Llm(Protocol):
    """`ctx.llm`: chat completions on behalf of the running task, its tokens streamed
    to the task's clients and counted against its token budget."""

    @property
    def enabled(self) -> bool:
        """Whether `[llm] base_url` is set; without it `chat` raises LlmUnavailableError."""

    @property
    def used(self) -> int:
        """Tokens this task has used so far, over all its attempts."""

    async def chat(self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None,
                   tools: Sequence[Mapping[str, Any]] | None = None, stream: bool = True,
                   **params: Any) -> ChatResult:
        """One completion of `messages` (OpenAI's format); `params` go to the server as is.

        Raises:
            LlmUnavailableError: no LLM is configured.
            TokenBudgetExceededError: the task's tokens passed its budget.
        """
