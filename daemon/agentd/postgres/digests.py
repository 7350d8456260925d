"""`DigestStore` (agentd/digests.py) on PostgreSQL: the `digest_cursors` table's statements."""

from __future__ import annotations

from collections.abc import Awaitable

from agentd.store.postgres import PgConnection, PgStore

_START_CURSOR = ("INSERT INTO digest_cursors (name, last_event_id, sent_at) VALUES ($1, $2, $3) "
                 "ON CONFLICT (name) DO NOTHING")
_CURSOR = "SELECT last_event_id, pending_last_id FROM digest_cursors WHERE name = $1"
_MARK_PENDING = "UPDATE digest_cursors SET pending_last_id = $1 WHERE name = $2"
_MARK_SENT = ("UPDATE digest_cursors SET last_event_id = $1, pending_last_id = NULL, sent_at = $2 "
              "WHERE name = $3")


class PgDigests:
    """`DigestStore` on a `PgStore`: one cursor per digest, shared by every daemon."""

    def __init__(self, store: PgStore) -> None:
        self.store = store

    def start(self, names: list[str], last_id: int, now: float) -> Awaitable[object]:
        async def op(conn: PgConnection) -> None:
            await conn.executemany(_START_CURSOR, [(name, last_id, now) for name in names])

        return self.store.write(op)

    async def cursor(self, name: str) -> tuple[int, int | None]:
        row = await self.store.read_one(_CURSOR, (name,))
        return (int(row["last_event_id"]), row["pending_last_id"]) if row is not None else (0, None)

    def mark_pending(self, name: str, last_id: int) -> Awaitable[object]:
        async def op(conn: PgConnection) -> None:
            await conn.execute(_MARK_PENDING, last_id, name)

        return self.store.write(op)

    def mark_sent(self, name: str, last_id: int, now: float) -> Awaitable[object]:
        async def op(conn: PgConnection) -> None:
            await conn.execute(_MARK_SENT, last_id, now, name)

        return self.store.write(op)
