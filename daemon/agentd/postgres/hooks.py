"""`DeliveryStore` (agentd/hooks.py) on PostgreSQL: the `hook_deliveries` table's statements.
Every daemon sharing the database reads and records the same ids, so a delivery taken by
one is refused by all.

A delivery id is taken in the transaction that publishes the delivery (`Take.within`): the
copies of a delivery sent to several daemons at once each passed the check of the ids
taken before, and only one of them may commit. Its transaction first takes a lock of its
own for the id (transaction-level, not waited for: a copy whose lock another daemon holds
is refused as being taken), then stores the id unless a record of it stands. The lock is
not waited for because this write shares its transaction with others (acks, claims,
events): waiting there on another daemon's transaction, which may in turn wait on this
one's rows, could deadlock. The expired ids are forgotten in the same transaction,
skipping those another transaction holds, for the same reason.
"""

from __future__ import annotations

from agentd.hooks import ReplayedDeliveryError, Take
from agentd.store.postgres import PgConnection, PgStore

_TAKEN = ("SELECT 1 FROM hook_deliveries WHERE hook = $1 AND delivery_id = $2 "
          "AND refuse_until >= $3")
_FORGET_EXPIRED = ("DELETE FROM hook_deliveries WHERE (hook, delivery_id) IN (SELECT hook, "
                   "delivery_id FROM hook_deliveries WHERE refuse_until < $1 FOR UPDATE SKIP LOCKED)")
# A row back if the id was taken now (new, or its old record expired); none if its lock is
# held or its record stands.
_TAKE = ("INSERT INTO hook_deliveries (hook, delivery_id, refuse_until) SELECT $1::text, $2::text, $3 "
         "WHERE pg_try_advisory_xact_lock(hashtextextended('agentd.hook:' || $1 || E'\\n' || $2, 0)) "
         "ON CONFLICT (hook, delivery_id) DO UPDATE SET refuse_until = excluded.refuse_until "
         "WHERE hook_deliveries.refuse_until < $4 RETURNING 1")


class PgDeliveries:
    """`DeliveryStore` on a `PgStore`."""

    def __init__(self, store: PgStore) -> None:
        self.store = store

    async def taken(self, hook: str, delivery_id: str, now: float) -> bool:
        return await self.store.read_one(_TAKEN, (hook, delivery_id, now)) is not None

    def take(self, hook: str, delivery_id: str, refuse_until: float, now: float) -> Take:
        async def op(conn: PgConnection) -> None:
            await conn.execute(_FORGET_EXPIRED, now)
            if await conn.fetchval(_TAKE, hook, delivery_id, refuse_until, now) is None:
                raise ReplayedDeliveryError(hook, delivery_id)

        return Take(within=op)
