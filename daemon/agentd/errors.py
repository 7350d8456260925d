"""The exceptions agentd raises, and `Retry` and `Fail`, the ones a task raises on purpose."""

from __future__ import annotations

import math


def describe(exc: BaseException) -> str:
    """How agentd names an exception in its logs, events and task records: `Type: message`."""
    return f"{type(exc).__name__}: {exc}"


class AgentdError(Exception):
    """Base of every error agentd raises for a reason it can name."""


class ConfigError(AgentdError):
    """The configuration is invalid; the message names the file and the key."""


class StoreError(AgentdError):
    """The database cannot be opened or used as this daemon needs it."""


class StoreLockedError(StoreError):
    """Another agentd process owns the database file."""


class StoreWriteError(StoreError):
    """A write was not committed for a reason of the storage, not of what was written:
    nothing of it is stored, and the same write can succeed once the cause is gone. The
    subclasses name the cause; `code` is how the HTTP API names it."""

    code = "store_unavailable"


class StoreFullError(StoreWriteError):
    """The disk, or the database's `max_page_count`, has no room for the write."""

    code = "store_full"


class StoreBusyError(StoreWriteError):
    """Another connection held the database locked for longer than `busy_timeout_ms`."""

    code = "store_busy"


class StoreIOError(StoreWriteError):
    """The operating system failed a read or a write of the database's files."""

    code = "store_io_error"


class StoreReadOnlyError(StoreWriteError):
    """The database's files cannot be written (permissions, a read-only mount)."""

    code = "store_read_only"


class StoreUnavailableError(StoreWriteError):
    """The database server cannot be reached, or did not answer in time (PostgreSQL down,
    frozen or restarting): nothing of the write was stored; it can succeed once it is back."""

    code = "store_unavailable"


class PluginError(AgentdError):
    """A plugin could not be imported, declared itself wrongly, or failed to start."""


class PluginNotFoundError(PluginError, LookupError):
    """No plugin of that name was found (loaded, started, failed or stopped)."""


class PatternError(AgentdError, ValueError):
    """A topic or topic pattern does not follow the bus grammar."""


class TaskError(AgentdError):
    """Base of the task queue's errors."""


class UnknownTaskError(TaskError, LookupError):
    """No task of that name is registered (the plugin that declared it is not loaded)."""


class TaskNotFoundError(TaskError, LookupError):
    """No task has that id (it never existed or was deleted)."""


class InvalidTaskError(TaskError, ValueError):
    """An enqueue request is malformed; the message names the field."""


class TaskStateError(TaskError):
    """The operation does not apply to the task in its current state."""


class TaskFailedError(TaskError):
    """The awaited task ended without a result: failed, dead or cancelled.

    `status` is the final status and `error` the task's own error text.
    """

    def __init__(self, task_id: int, name: str, status: str, error: str | None) -> None:
        super().__init__(f"task {task_id} ({name}) ended {status}: {error or 'no error recorded'}")
        self.task_id = task_id
        self.name = name
        self.status = status
        self.error = error


class Retry(Exception):  # noqa: N818 - a control-flow signal, named as the verb it asks for
    """Raise inside a task to ask for another attempt after `delay` seconds.

    The attempt counts against `max_attempts`; with none left the task goes dead.
    """

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay

    # A server asking for more than this is capped: a typo or a hostile header must not park
    # a task for days.
    MAX_RETRY_AFTER = 3600.0

    @classmethod
    def after(cls, retry_after: str | None, reason: str) -> Retry:
        """A retry after an HTTP `Retry-After` header's seconds, at most MAX_RETRY_AFTER (the
        backoff when the header is absent or in the rarely used date form)."""
        try:
            delay = float(retry_after) if retry_after is not None else None
        except ValueError:
            delay = None
        if delay is not None and math.isnan(delay):
            delay = None
        return cls(delay=None if delay is None else min(max(0.0, delay), cls.MAX_RETRY_AFTER),
                   reason=reason)


class RateLimited(Retry):
    """An endpoint refused for its rate (an LLM endpoint's HTTP 429). With the server's
    `delay` (Retry-After), every task of the attempt's rate group (its name and `rate_key`)
    is held back until then, across restarts, and the attempt is not spent; without one it
    is an ordinary `Retry`."""


class WaitTimeoutError(TimeoutError):
    """Raised by `ctx.wait_for` or `ctx.ask` when its `timeout` passed first: no event
    matched, or nobody answered. `wait` is the wait's number among the task's waits."""

    def __init__(self, wait: int, what: str) -> None:
        super().__init__(f"wait {wait} timed out: {what}")
        self.wait = wait


class Fail(Exception):  # noqa: N818 - a control-flow signal
    """Raise inside a task to fail it now, without retrying (status `failed`)."""


class InvalidScheduleError(AgentdError, ValueError):
    """A schedule's definition is invalid; the message names the field and the value."""


class ScheduleNotFoundError(AgentdError, LookupError):
    """No schedule has that id."""


class EmbedderError(AgentdError):
    """An embedder could not produce vectors (model missing, endpoint failing)."""


class EmbedderInputError(EmbedderError):
    """The embedder refused the texts themselves (an endpoint's 4xx, e.g. a text too long):
    sending them again cannot help, sending the others without them may."""


class MemoryNotFoundError(AgentdError, LookupError):
    """No memory has that id."""


class UnstorableTextError(AgentdError, ValueError):
    """Text to keep holds U+0000 (NUL), which PostgreSQL's text and jsonb cannot hold.
    Neither store takes it, so that what one keeps the other can (`agentd store copy`)."""


class MemoryBusyError(AgentdError):
    """Memories kept changing under an operation that needs them still; try it again."""


class EmbedderMismatchError(AgentdError):
    """The database's vectors were made by another embedder (id or dimension differ)."""


class BackupError(AgentdError):
    """A backup could not be made, checked or restored; the message says which file and why."""
