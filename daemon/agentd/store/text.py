"""What text the stores can keep: PostgreSQL's text and jsonb hold no U+0000 (NUL), and
agentd keeps the same on SQLite, so a value reads alike on both (and copies across)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def nul_at(value: Any, where: str = "") -> str | None:
    """Where in `value` (a JSON value) a string or key holds U+0000, as `where.key[2]`, or
    None if none does."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if "\x00" in str(key):
                return f"{where} key {str(key)!r}"
            if (at := nul_at(item, f"{where}.{key}")) is not None:
                return at
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if (at := nul_at(item, f"{where}[{index}]")) is not None:
                return at
    return None


def storable_error(error: str) -> str:
    """A task's error as the stores keep it: an exception's message may hold U+0000, so a
    NUL is written as the four characters `\\x00`, on both stores (a task reads the same on
    either, in its events as in its row)."""
    return error.replace("\x00", "\\x00")
