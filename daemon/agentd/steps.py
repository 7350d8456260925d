"""Memoized steps of a task (`ctx.step`): the `task_steps` table, part of the queue.

A step's JSON result is recorded under (task id, step key) once the step returns, and a
retried attempt of the task reads it back instead of running the step again. The rows go
with their task (`ON DELETE CASCADE`, sql/0002_tasks.sql). `Context.step` is the one caller.

`StepStore` is what the queue needs of the table; `SqliteSteps` is it on SQLite, with the
statements beside it, and `agentd.postgres.steps.PgSteps` on PostgreSQL. `app.py` picks one.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from agentd.store import Store


class StepStore(Protocol):
    """The `task_steps` table, as the queue uses it."""

    async def recorded(self, task_id: int, key: str) -> str | None:
        """The JSON result step `key` of task `task_id` recorded, or None if it has none."""

    def record(self, task_id: int, key: str, result: str) -> Awaitable[object]:
        """Record `result` (JSON) as step `key` of task `task_id`, replacing what it had;
        resolves once committed."""


# The statements on `task_steps`, all of them.
_RECORDED = "SELECT result FROM task_steps WHERE task_id = ? AND key = ?"
_RECORD = ("INSERT INTO task_steps (task_id, key, result) VALUES (?, ?, ?) "
           "ON CONFLICT (task_id, key) DO UPDATE SET result = excluded.result")


class SqliteSteps:
    """`StepStore` on agentd.db's SQLite file."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def recorded(self, task_id: int, key: str) -> str | None:
        row = await self.store.read_one(_RECORDED, (task_id, key))
        return None if row is None else str(row["result"])

    def record(self, task_id: int, key: str, result: str) -> Awaitable[object]:
        return self.store.write(lambda conn: conn.execute(_RECORD, (task_id, key, result)))
