"""`DeliveryStore` (agentd/hooks.py) on PostgreSQL: the `hook_deliveries` table's statements.
Every daemon sharing the database reads and records the same ids, so a delivery taken by
one is refused by all."""

from __future__ import annotations

from collections.abc import Awaitable

from agentd.store.postgres import PgConnection, PgStore

_TAKEN = ("SELECT 1 FROM hook_deliveries WHERE hook = $1 AND delivery_id = $2 "
          "AND refuse_until >= $3")
_FORGET_EXPIRED = "DELETE FROM hook_deliveries WHERE refuse_until < $1"
_TAKE = ("INSERT INTO hook_deliveries (hook, delivery_id, refuse_until) VALUES ($1, $2, $3) "
         "ON CONFLICT (hook, delivery_id) DO UPDATE SET refuse_until = excluded.refuse_until")


class PgDeliveries:
    """`DeliveryStore` on a `PgStore`."""

    def __init__(self, store: PgStore) -> None:
        self.store = store

    async def taken(self, hook: str, delivery_id: str, now: float) -> bool:
        return await self.store.read_one(_TAKEN, (hook, delivery_id, now)) is not None

    def take(self, hook: str, delivery_id: str, refuse_until: float, now: float) -> Awaitable[object]:
        async def op(conn: PgConnection) -> None:
            await conn.execute(_FORGET_EXPIRED, now)
            await conn.execute(_TAKE, hook, delivery_id, refuse_until)

        return self.store.write(op)
