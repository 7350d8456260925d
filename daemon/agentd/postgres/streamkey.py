"""`StreamKeyStore` (agentd/streamkey.py) on PostgreSQL: the stream tokens' signing key in
the shared `meta` table, so a token issued by one daemon opens a stream on any.

A rotation notifies `agentd_stream_key` at commit, and every daemon re-reads the key when
notified (and whenever its listening connection re-opens, since notifications sent while
it was away are lost): a token revoked on one daemon stops working on the others once they
hear of it, within a notification's delivery (under a millisecond on a local network)."""

from __future__ import annotations

from collections.abc import Callable

from agentd.store.postgres import PgConnection, PgStore, notify

CHANNEL = "agentd_stream_key"
_KEY_NAME = "stream_token_key"
_CREATE_KEY = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING"
_READ_KEY = "SELECT value FROM meta WHERE key = $1"
_REPLACE_KEY = ("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE "
                "SET value = excluded.value")


class PgStreamKey:
    """`StreamKeyStore` on a `PgStore`."""

    def __init__(self, store: PgStore) -> None:
        self.store = store

    async def load(self, fresh: str) -> str:
        row = await self.store.read_one(_READ_KEY, (_KEY_NAME,))
        if row is not None:
            return str(row["value"])

        async def read_or_create(conn: PgConnection) -> str:
            await conn.execute(_CREATE_KEY, _KEY_NAME, fresh)
            return str(await conn.fetchval(_READ_KEY, _KEY_NAME))

        return await self.store.write(read_or_create)

    async def replace(self, fresh: str) -> None:
        async def op(conn: PgConnection) -> None:
            await conn.execute(_REPLACE_KEY, _KEY_NAME, fresh)
            notify(CHANNEL, "")

        await self.store.write(op)

    def watch(self, replaced: Callable[[], None]) -> None:
        self.store.listen(CHANNEL, lambda _payload: replaced())
        self.store.on_reconnect(replaced)
