"""`StepStore` (agentd/steps.py) on PostgreSQL: the `task_steps` table's statements."""

from __future__ import annotations

from collections.abc import Awaitable

from agentd.store.postgres import PgConnection, PgStore

_RECORDED = "SELECT result FROM task_steps WHERE task_id = $1 AND key = $2"
_RECORD = ("INSERT INTO task_steps (task_id, key, result) VALUES ($1, $2, $3) "
           "ON CONFLICT (task_id, key) DO UPDATE SET result = excluded.result")


class PgSteps:
    """`StepStore` on a `PgStore`."""

    def __init__(self, store: PgStore) -> None:
        self.store = store

    async def recorded(self, task_id: int, key: str) -> str | None:
        row = await self.store.read_one(_RECORDED, (task_id, key))
        return None if row is None else str(row["result"])

    def record(self, task_id: int, key: str, result: str) -> Awaitable[object]:
        async def op(conn: PgConnection) -> None:
            await conn.execute(_RECORD, task_id, key, result)

        return self.store.write(op)
