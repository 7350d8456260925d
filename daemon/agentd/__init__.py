"""agentd: one asyncio process and one SQLite file that run AI agents and their background work.

The names here are the plugin-facing API.
"""

# Defined before the imports below: submodules (web.system) read it while agentd loads.
__version__ = "0.1.0"

from agentd.context import Context
from agentd.errors import Fail, Retry, TaskFailedError
from agentd.events import Event
from agentd.plugin import Plugin
from agentd.plugins import PluginContext

__all__ = [
    "Context",
    "Event",
    "Fail",
    "Plugin",
    "PluginContext",
    "Retry",
    "TaskFailedError",
    "__version__",
]
