"""The stream tokens' signing key, kept in agentd.db's `meta` table so it outlives restarts
(and, on PostgreSQL, is shared by every daemon): `StreamKeyStore` is what `web/auth.py`
needs of it, `SqliteStreamKey` is it on SQLite, `agentd.postgres.streamkey.PgStreamKey` on
PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from agentd.store import Connection, Store

_KEY_NAME = "stream_token_key"  # the row of the meta table holding the signing key (hex)
# The statements on that row, all of them.
_CREATE_KEY = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"
_READ_KEY = "SELECT value FROM meta WHERE key = ?"
_REPLACE_KEY = ("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                "SET value = excluded.value")


class StreamKeyStore(Protocol):
    """Where the stream tokens' signing key (hex) is kept."""

    async def load(self, fresh: str) -> str:
        """The stored key, storing `fresh` first if there is none."""

    async def replace(self, fresh: str) -> None:
        """Store `fresh` as the key (once committed, every daemon's tokens must stop)."""

    def watch(self, replaced: Callable[[], None]) -> None:
        """Call `replaced()` when another daemon may have replaced the key."""


class SqliteStreamKey:
    """`StreamKeyStore` in agentd.db's SQLite `meta` table."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self, fresh: str) -> str:
        def read_or_create(conn: Connection) -> str:
            conn.execute(_CREATE_KEY, (_KEY_NAME, fresh))
            return str(conn.execute(_READ_KEY, (_KEY_NAME,)).fetchone()[0])

        return await self.store.write(read_or_create)

    async def replace(self, fresh: str) -> None:
        await self.store.write(lambda conn: conn.execute(_REPLACE_KEY, (_KEY_NAME, fresh)))

    def watch(self, replaced: Callable[[], None]) -> None:
        pass  # one daemon uses the file: only it replaces the key
