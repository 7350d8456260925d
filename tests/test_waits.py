"""Durable waits (`ctx.sleep`, `ctx.sleep_until`, `ctx.wait_for`, `ctx.ask`) against the real
daemon, on SQLite and on PostgreSQL: a waiting task holds no slot, lease or coroutine,
survives a restart, and resumes by replay (its steps return their recorded results)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.both_stores


@pytest.fixture
def wt_dir(copied_plugin: Any) -> Path:
    return copied_plugin("wait_plugin.py", "wt")


@pytest.fixture
async def wt(start_daemon: Any, wt_dir: Path) -> Any:
    return await start_daemon(plugin_dirs=[wt_dir])


async def test_a_sleeping_task_waits_without_slot_or_lease_and_resumes_by_replay(wt: Any) -> None:
    daemon, events = wt
    record = await daemon.queue.enqueue("wt.nap", {"seconds": 0.6})
    waiting = await events.wait_for("task.waiting", task_id=record.id)
    assert waiting.data["kind"] == "sleep" and waiting.data["wait"] == 1
    stored = await daemon.queue.get(record.id)
    assert stored.status == "waiting" and stored.attempts == 0  # no attempt spent
    assert record.id not in daemon.workers.running and not daemon.workers.leased
    assert [r.id for r in await daemon.queue.list(status="waiting")] == [record.id]
    assert (await daemon.queue.counts()).get("waiting") == 1
    result = await daemon.queue.result(record.id, timeout=5)
    assert result["woke"] - result["before"] >= 0.6
    assert result["attempt"] == 1
    await events.wait_for("task.resumed", task_id=record.id, wait=1, timed_out=False)
    # The code ran twice from the top; the memoized step once.
    assert events.topics().count("wt.top") == 2 and events.topics().count("wt.step") == 1


async def test_a_sleep_survives_a_restart(start_daemon: Any, wt_dir: Path, tmp_path: Path) -> None:
    first, events = await start_daemon(plugin_dirs=[wt_dir])
    record = await first.queue.enqueue("wt.nap", {"seconds": 1.5})
    await events.wait_for("task.waiting", task_id=record.id)
    asked_at = time.time()
    await first.stop()
    second, after = await start_daemon(plugin_dirs=[wt_dir])
    assert (await second.queue.get(record.id)).status == "waiting"
    result = await second.queue.result(record.id, timeout=10)
    assert result["woke"] >= asked_at + 1.0  # woke at the time the first daemon stored
    assert after.topics().count("wt.step") == 0  # the step's result came from the store
    assert after.topics().count("wt.top") == 1


async def test_a_sleep_until_a_time_past_returns_at_once(wt: Any) -> None:
    daemon, events = wt
    record = await daemon.queue.enqueue("wt.nap_until", {"when": time.time() - 10})
    assert await daemon.queue.result(record.id, timeout=5) > 0
    assert "task.waiting" not in events.topics()


async def test_cancel_ends_a_waiting_task_at_once(wt: Any, http: Any) -> None:
    daemon, events = wt
    record = await daemon.queue.enqueue("wt.nap", {"seconds": 3600})
    await events.wait_for("task.waiting", task_id=record.id)
    async with http(daemon).post(f"/v1/tasks/{record.id}/cancel") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "cancelled"
    await events.wait_for("task.cancelled", task_id=record.id)
    assert await daemon.storage.waits.next_due() is None  # its timer is gone with it
