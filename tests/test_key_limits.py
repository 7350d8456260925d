"""Limits per key (`@plugin.task(concurrency_key=..., rate_key=...)`) against the real daemon,
on SQLite and on PostgreSQL: a concurrency per user, a rate per model, and an LLM endpoint's
429 holding back every task of its model until its Retry-After, across a restart."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agentd.errors import InvalidTaskError
from fake_openai import FakeOpenAI
from test_queue import execute, rows

pytestmark = pytest.mark.both_stores

WAIT = 10.0


@pytest.fixture
def kl_dir(copied_plugin: Any) -> Path:
    return copied_plugin("keys_plugin.py", "kl")


async def start(start_daemon: Any, kl_dir: Path, **sections: dict[str, Any]) -> tuple[Any, Any, ModuleType]:
    daemon, events = await start_daemon(plugin_dirs=[kl_dir], overrides={
        "tasks": {"queues": {"default": 8}, "retry_base": 0.01, "retry_max": 0.02}, **sections})
    return daemon, events, sys.modules["agentd_plugins.kl"]


async def test_a_concurrency_per_user_holds_with_three_users_in_flight(
        start_daemon: Any, kl_dir: Path) -> None:
    daemon, _, module = await start(start_daemon, kl_dir)
    names = {user: [f"{user}{n}" for n in range(4)] for user in ("ann", "bob", "cy")}
    ids = [(await daemon.queue.enqueue("kl.per_user", {"user": user, "name": name})).id
           for n in range(4) for user, mine in names.items() for name in mine[n:n + 1]]
    # Eight slots, twelve tasks: two of each user start, the third of none.
    for mine in names.values():
        for name in mine[:2]:
            await asyncio.wait_for(module.gate(f"started:{name}").wait(), WAIT)
    running = await daemon.queue.list(status="running")
    assert sorted(record.args["name"] for record in running) == sorted(
        name for mine in names.values() for name in mine[:2])
    # Ann's first ending lets her third start, and nobody else's.
    module.gate("ann0").set()
    await asyncio.wait_for(module.gate("started:ann2").wait(), WAIT)
    assert not any(module.gate(f"started:{name}").is_set() for name in ("bob2", "cy2", "ann3"))
    for mine in names.values():
        for name in mine:
            module.gate(name).set()
    for task_id in ids:
        assert (await daemon.queue.wait(task_id, timeout=WAIT)).status == "succeeded"
    assert module.PEAK == {"ann": 2, "bob": 2, "cy": 2}


async def test_a_rate_per_model_holds_per_model_across_a_restart(start_daemon: Any, kl_dir: Path) -> None:
    daemon, _, _ = await start(start_daemon, kl_dir)
    # One an hour per model: the first of each model runs, the second waits its token. A
    # third model enqueued after them runs: the claims passed the waiting ones over.
    first = [await daemon.queue.enqueue("kl.per_model", {"model": m}) for m in ("a", "b")]
    second = [await daemon.queue.enqueue("kl.per_model", {"model": m}) for m in ("a", "b")]
    third = await daemon.queue.enqueue("kl.per_model", {"model": "c"})
    for record in (*first, third):
        assert await daemon.queue.result(record.id, timeout=WAIT) == record.args["model"]
    for record in second:
        assert (await daemon.queue.get(record.id)).status == "queued"
    # The buckets are stored: a restart does not refill them.
    await daemon.stop()
    again, _, _ = await start(start_daemon, kl_dir)
    fourth = await again.queue.enqueue("kl.per_model", {"model": "d"})
    assert await again.queue.result(fourth.id, timeout=WAIT) == "d"
    for record in second:
        assert (await again.queue.get(record.id)).status == "queued"


async def test_a_429_holds_back_its_model_not_another_and_across_a_restart(
        start_daemon: Any, kl_dir: Path) -> None:
    async with FakeOpenAI() as llm:
        llm_config = {"base_url": llm.url, "model": "test-model"}
        daemon, events, _ = await start(start_daemon, kl_dir, llm=llm_config)
        llm.fail(429, retry_after="8")  # long enough for a stop and a start on a busy machine
        refused = await daemon.queue.enqueue("kl.ask", {"model": "m1"})
        retrying = await events.wait_for("task.retrying", task_id=refused.id, timeout=WAIT)
        assert "429" in retrying.data["error"]
        held = await daemon.queue.get(refused.id)
        assert (held.status, held.attempts) == ("queued", 0)  # its attempt not spent
        hold_until = held.run_at
        same = await daemon.queue.enqueue("kl.ask", {"model": "m1"})
        other = await daemon.queue.enqueue("kl.ask", {"model": "m2"})
        assert await daemon.queue.result(other.id, timeout=WAIT) == "ok"
        assert (await daemon.queue.get(other.id)).finished_at < hold_until  # m2 is not held
        await daemon.stop()

        again, _, _ = await start(start_daemon, kl_dir, llm=llm_config)
        after_restart = await again.queue.enqueue("kl.ask", {"model": "m1"})
        assert after_restart.created_at < hold_until, "the restart outlasted the hold: inconclusive"
        for record in (refused, same, after_restart):
            assert await again.queue.result(record.id, timeout=WAIT) == "ok"
            final = await again.queue.get(record.id)
            # Nothing of m1 started before the hold ended, on either daemon.
            assert final.started_at >= hold_until and final.attempts == 1
        assert [request.get("model") for request in llm.requests] == ["m1", "m2", "m1", "m1", "m1"]


async def test_a_key_the_arguments_cannot_fill_is_refused_at_enqueue(
        start_daemon: Any, kl_dir: Path, http: Any) -> None:
    daemon, _, _ = await start(start_daemon, kl_dir)
    client = http(daemon)
    # The arguments fit the task (it takes any), but not its concurrency key "{tenant}".
    async with client.post("/v1/tasks", json={"name": "kl.tenanted", "args": {"user": "u"}}) as reply:
        body = await reply.json()
    assert reply.status == 400, body
    assert "concurrency_key '{tenant}' needs the argument 'tenant'" in body["error"]["message"]
    assert await daemon.queue.list(name="kl.tenanted") == []
    # PostgreSQL's text holds no NUL (it was a 500 there): refused on both stores, naming the key.
    for name, args, key in (("kl.tenanted", {"tenant": "t\u0000"}, "concurrency_key"),
                            ("kl.per_model", {"model": "\u0000"}, "rate_key")):
        async with client.post("/v1/tasks", json={"name": name, "args": args}) as reply:
            body = await reply.json()
        assert reply.status == 400, body
        assert body["error"]["message"] == f"{key} holds U+0000 (NUL), which the queue cannot keep"
    async with client.post("/v1/tasks", json={"name": "kl.tenanted", "args": {"tenant": "t"},
                                              "idempotency_key": "k\u0000"}) as reply:
        body = await reply.json()
    assert reply.status == 400 and "idempotency_key: expected text without U+0000" in body["error"]["message"]
    with pytest.raises(InvalidTaskError, match=r"^idempotency_key holds"):
        await daemon.queue.enqueue("kl.tenanted", {"tenant": "t"}, idempotency_key="\u0000")
    assert await daemon.queue.counts() == {}
    async with client.post("/v1/tasks", json={"name": "kl.tenanted", "args": {"tenant": "t"}}) as reply:
        assert reply.status in (200, 201, 202)
    async with client.get("/v1/task-types") as reply:
        types = {item["name"]: item for item in (await reply.json())["task_types"]}
    assert (types["kl.per_user"]["concurrency_key"], types["kl.per_user"]["rate_key"]) == ("{user}", None)
    assert types["kl.per_model"]["rate_key"] == "function <lambda>"


async def test_unused_rate_buckets_are_purged_and_holds_kept(start_daemon: Any, kl_dir: Path) -> None:
    daemon, _, _ = await start(start_daemon, kl_dir)
    now = time.time()
    for group, updated_at, held_until in (("kl.per_model:r:old", now - 2 * 86400, 0.0),
                                          ("kl.per_model:r:recent", now - 60, 0.0),
                                          ("kl.ask:r:held", now - 2 * 86400, now + 600)):
        await execute(daemon, "INSERT INTO task_rates (name, tokens, updated_at, held_until) "
                      "VALUES (?, 0, ?, ?)", group, updated_at, held_until)
    await daemon.queue.purge_expired()
    left = await rows(daemon, "SELECT name FROM task_rates ORDER BY name")
    assert [row["name"] for row in left] == ["kl.ask:r:held", "kl.per_model:r:recent"]

