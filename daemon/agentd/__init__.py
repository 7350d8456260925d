"""agentd: one asyncio process and one SQLite file that run AI agents and their background work.

The names here, and `agentd.testing`, are the plugin API: what a plugin imports and
annotates with, kept stable. Every other module (`agentd.mail`, `agentd.plugins`,
`agentd.taskqueue`, ...) is internal to the daemon and may change in any release, as may
any name with a leading underscore. Where the object a plugin is handed is internal
(`ctx.memory`, `ctx.mail`, `ctx.webhook`, `ctx.llm`, the task records returned by
`submit`, `send` and `post`), its type here is a `typing.Protocol` listing what a plugin
may use of it.
"""

# Defined before the imports below: submodules (web.system) read it while agentd loads.
__version__ = "0.1.0"

from agentd.context import Context, TaskInfo
from agentd.embed import Embedder
from agentd.errors import (
    AgentdError,
    Fail,
    InvalidTaskError,
    MemoryNotFoundError,
    PatternError,
    Retry,
    TaskFailedError,
    UnknownTaskError,
    WaitTimeoutError,
)
from agentd.events import Event
from agentd.llm import ChatResult, LlmUnavailableError, TokenBudgetExceededError
from agentd.mail import MailUnavailableError
from agentd.memory import Memory, MemoryChange, Recalled
from agentd.plugin import Plugin
from agentd.plugins import PluginContext
from agentd.protocols import Llm, Mail, MemoryStore, Session, TaskRecord, Webhook
from agentd.taskqueue import TaskStatus

__all__ = [
    "AgentdError",
    "ChatResult",
    "Context",
    "Embedder",
    "Event",
    "Fail",
    "InvalidTaskError",
    "Llm",
    "LlmUnavailableError",
    "Mail",
    "MailUnavailableError",
    "Memory",
    "MemoryChange",
    "MemoryNotFoundError",
    "MemoryStore",
    "PatternError",
    "Plugin",
    "PluginContext",
    "Recalled",
    "Retry",
    "Session",
    "TaskFailedError",
    "TaskInfo",
    "TaskRecord",
    "TaskStatus",
    "TokenBudgetExceededError",
    "UnknownTaskError",
    "WaitTimeoutError",
    "Webhook",
    "__version__",
]
