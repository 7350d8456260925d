"""The exceptions agentd raises, and `Retry`, the one a task raises on purpose."""

from __future__ import annotations


class AgentdError(Exception):
    """Base of every error agentd raises for a reason it can name."""


class ConfigError(AgentdError):
    """The configuration is invalid; the message names the file and the key."""


class StoreError(AgentdError):
    """The database cannot be opened or used as this daemon needs it."""


class StoreLockedError(StoreError):
    """Another agentd process owns the database file."""


class PluginError(AgentdError):
    """A plugin could not be imported, declared itself wrongly, or failed to start."""


class PatternError(AgentdError, ValueError):
    """A topic or topic pattern does not follow the bus grammar."""
