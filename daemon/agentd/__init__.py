"""agentd: one asyncio process and one SQLite file that run AI agents and their background work.

The names here are the plugin-facing API.
"""

from agentd.events import Event
from agentd.plugin import Plugin

__version__ = "0.1.0"

__all__ = ["Event", "Plugin", "__version__"]
