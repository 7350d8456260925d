"""Memoized steps of a task (`ctx.step`): the `task_steps` table, part of the queue.

A step's JSON result is recorded under (task id, step key) once the step returns, and a
retried attempt of the task reads it back instead of running the step again. The rows go
with their task (`ON DELETE CASCADE`, sql/0002_tasks.sql). `Context.step` is the one caller;
this module keeps the table's statements in one place, beside the queue that owns the table.
"""

from __future__ import annotations

import asyncio

from agentd.store import Store

# The statements on `task_steps`, all of them.
_RECORDED = "SELECT result FROM task_steps WHERE task_id = ? AND key = ?"
_RECORD = ("INSERT INTO task_steps (task_id, key, result) VALUES (?, ?, ?) "
           "ON CONFLICT (task_id, key) DO UPDATE SET result = excluded.result")


async def recorded(store: Store, task_id: int, key: str) -> str | None:
    """The JSON result step `key` of task `task_id` recorded, or None if it has none."""
    row = await store.read_one(_RECORDED, (task_id, key))
    return None if row is None else str(row["result"])


def record(store: Store, task_id: int, key: str, result: str) -> asyncio.Future[object]:
    """Record `result` (JSON) as step `key` of task `task_id`, replacing what it had;
    resolves once committed."""
    return store.write(lambda conn: conn.execute(_RECORD, (task_id, key, result)))
