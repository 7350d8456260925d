"""Durable waits (`ctx.sleep`, `ctx.sleep_until`, `ctx.wait_for`, `ctx.ask`) against the real
daemon, on SQLite and on PostgreSQL: a waiting task holds no slot, lease or coroutine,
survives a restart, and resumes by replay (its steps return their recorded results)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sse_client import Sse

pytestmark = pytest.mark.both_stores


async def until(condition: Callable[[], bool]) -> None:
    """Wait (at most 5 s) for `condition`, on state that publishes no event when it changes:
    what the daemon counts of its open waits."""

    async def polled() -> None:
        while not condition():  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.01)  # noqa: sleep - polled: nothing to wait on

    await asyncio.wait_for(polled(), 5)


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


async def test_a_child_called_before_a_sleep_is_not_run_again(wt: Any) -> None:
    daemon, events = wt
    record = await daemon.queue.enqueue("wt.call_then_nap", {"seconds": 0.2})
    result = await daemon.queue.result(record.id, timeout=5)
    assert result["child"] != result["again"]  # two calls, two children
    await events.wait_for("task.resumed", task_id=record.id)
    assert events.topics().count("wt.child_ran") == 2  # the first ran once, not once per run
    assert len(await daemon.queue.children(record.id)) == 2


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


async def test_wait_for_returns_the_first_event_matching_topic_and_fields(wt: Any, http: Any) -> None:
    daemon, events = wt
    record = await daemon.queue.enqueue("wt.await_event", {"pattern": "build.*.done",
                                                           "match": {"ok": True, "branch": "main"}})
    await events.wait_for("task.waiting", task_id=record.id, kind="event", pattern="build.*.done")
    client = http(daemon)
    for topic, data in (("build.web.done", {"ok": False, "branch": "main"}),
                        ("build.web.started", {"ok": True, "branch": "main"}),
                        ("build.web.done", {"ok": True}),
                        ("build.web.done", {"ok": 1, "branch": "main"}),  # 1 is not true
                        ("build.web.done", {"ok": True, "branch": "main", "n": 1}),
                        ("build.api.done", {"ok": True, "branch": "main", "n": 2})):
        async with client.post("/v1/events", json={"topic": topic, "data": data}) as response:
            assert response.status in (200, 201, 202), await response.text()
    result = await daemon.queue.result(record.id, timeout=5)
    assert result["topic"] == "build.web.done" and result["data"]["n"] == 1
    resumed = await events.wait_for("task.resumed", task_id=record.id)
    assert resumed.data == {**resumed.data, "wait": 1, "timed_out": False}


async def test_wait_for_times_out_with_wait_timeout_error(wt: Any) -> None:
    daemon, events = wt
    record = await daemon.queue.enqueue("wt.await_event", {"pattern": "never.comes", "timeout": 0.3})
    waiting = await events.wait_for("task.waiting", task_id=record.id)
    assert waiting.data["wake_at"] is not None
    result = await daemon.queue.result(record.id, timeout=5)
    assert result == {"timed_out": "wait 1 timed out: no event matching 'never.comes' came"}
    await events.wait_for("task.resumed", task_id=record.id, timed_out=True)
    await until(lambda: daemon.waits.indexed == 0)  # its pattern no longer heard


async def test_an_event_published_after_the_wait_was_asked_but_before_it_was_written_is_caught(
    wt: Any,
) -> None:
    """The task publishes the event on the loop's next turn after asking: before its
    `waiting` row can commit. The event is caught and the task queued again without ever
    waiting."""
    daemon, events = wt
    record = await daemon.queue.enqueue("wt.await_event", {
        "pattern": "reply.*", "publish_first": {"topic": "reply.fast", "data": {"n": 7}}})
    result = await daemon.queue.result(record.id, timeout=5)
    assert result["topic"] == "reply.fast" and result["data"] == {"n": 7}
    published = await events.wait_for("reply.fast")
    assert result["id"] == published.id
    assert "task.waiting" not in events.topics()  # caught before its waiting state was written
    await events.wait_for("task.resumed", task_id=record.id)


async def test_an_event_wait_survives_a_restart(start_daemon: Any, wt_dir: Path, http: Any) -> None:
    first, events = await start_daemon(plugin_dirs=[wt_dir])
    record = await first.queue.enqueue("wt.await_event", {"pattern": "deploy.finished",
                                                          "match": {"id": "d1"}})
    await events.wait_for("task.waiting", task_id=record.id)
    await first.stop()
    second, _ = await start_daemon(plugin_dirs=[wt_dir])
    async with http(second).post("/v1/events", json={"topic": "deploy.finished",
                                                     "data": {"id": "d1"}}) as response:
        assert response.status < 300
    result = await second.queue.result(record.id, timeout=5)
    assert result["data"] == {"id": "d1"}


async def test_a_wait_with_a_bad_pattern_or_match_fails_the_attempt(wt: Any) -> None:
    daemon, _ = wt
    record = await daemon.queue.enqueue("wt.await_event", {"pattern": "bad..pattern"},
                                        max_attempts=1)
    final = await daemon.queue.wait(record.id, timeout=5)
    assert final.status == "dead" and "bad..pattern" in (final.error or "")


# ------------------------------------------------------------------------ human approval


async def test_a_question_is_listed_answered_once_and_returned_by_ask(wt: Any, http: Any) -> None:
    daemon, events = wt
    client = http(daemon)
    record = await daemon.queue.enqueue("wt.approve", {"draft": "Hello Bob"})
    waiting = await events.wait_for("task.waiting", task_id=record.id, kind="ask")
    assert waiting.data["prompt"] == "Send this draft?" and waiting.data["data"] == {"draft": "Hello Bob"}
    async with client.get("/v1/approvals") as response:
        listed = await response.json()
    assert listed == {"approvals": [{
        "task_id": record.id, "name": "wt.approve", "queue": "default",
        "correlation_id": str(record.id), "wait": 1, "kind": "ask", "wake_at": None,
        "prompt": "Send this draft?", "data": {"draft": "Hello Bob"}}], "next": None}
    async with client.get(f"/v1/tasks/{record.id}") as response:
        shown = await response.json()
    assert shown["status"] == "waiting" and shown["waiting_for"]["prompt"] == "Send this draft?"
    async with client.get("/v1/tasks", params={"status": "waiting"}) as response:
        (listed_task,) = (await response.json())["tasks"]
    assert listed_task["id"] == record.id and listed_task["waiting_for"]["kind"] == "ask"
    async with client.post(f"/v1/tasks/{record.id}/answer", json={"answer": {"ok": True}}) as response:
        assert response.status == 200
        assert (await response.json())["status"] == "queued"
    async with client.post(f"/v1/tasks/{record.id}/answer", json={"answer": False}) as response:
        assert response.status == 409  # answered once: the first answer stands
        assert "asks no question" in (await response.json())["error"]["message"]
    assert await daemon.queue.result(record.id, timeout=5) == {"answer": {"ok": True}}
    assert events.topics().count("wt.top") == 2
    async with client.get("/v1/approvals") as response:
        assert (await response.json())["approvals"] == []
    async with client.get(f"/v1/tasks/{record.id}") as response:
        assert (await response.json())["waiting_for"] is None


async def test_answers_that_do_not_apply_are_refused(wt: Any, http: Any) -> None:
    daemon, events = wt
    client = http(daemon)
    async with client.post("/v1/tasks/424242/answer", json={"answer": 1}) as response:
        assert response.status == 404
    sleeper = await daemon.queue.enqueue("wt.nap", {"seconds": 3600})
    await events.wait_for("task.waiting", task_id=sleeper.id)
    async with client.post(f"/v1/tasks/{sleeper.id}/answer", json={"answer": 1}) as response:
        assert response.status == 409  # it waits, but asks nothing
    for body in ({}, {"answer": 1, "extra": 2}):
        async with client.post(f"/v1/tasks/{sleeper.id}/answer", json=body) as response:
            assert response.status == 400, body
    assert (await daemon.queue.get(sleeper.id)).status == "waiting"


async def test_an_unanswered_question_times_out(wt: Any) -> None:
    daemon, _ = wt
    record = await daemon.queue.enqueue("wt.approve", {"draft": "x", "timeout": 0.3})
    assert await daemon.queue.result(record.id, timeout=5) == {"answer": None, "timed_out": True}


async def test_a_question_survives_a_restart_and_cancel_ends_it(
    start_daemon: Any, wt_dir: Path, http: Any,
) -> None:
    first, events = await start_daemon(plugin_dirs=[wt_dir])
    asked = await first.queue.enqueue("wt.approve", {"draft": "a"})
    dropped = await first.queue.enqueue("wt.approve", {"draft": "b"})
    for record in (asked, dropped):
        await events.wait_for("task.waiting", task_id=record.id)
    await first.stop()
    second, _ = await start_daemon(plugin_dirs=[wt_dir])
    client = http(second)
    async with client.get("/v1/approvals", params={"limit": 1}) as response:
        page = await response.json()
    assert [item["task_id"] for item in page["approvals"]] == [dropped.id] and page["next"] == dropped.id
    async with client.post(f"/v1/tasks/{dropped.id}/cancel") as response:
        assert (await response.json())["status"] == "cancelled"
    async with client.get("/v1/approvals") as response:
        assert [item["task_id"] for item in (await response.json())["approvals"]] == [asked.id]
    async with client.post(f"/v1/tasks/{asked.id}/answer", json={"answer": "yes"}) as response:
        assert response.status == 200
    assert await second.queue.result(asked.id, timeout=5) == {"answer": "yes"}
    assert (await second.queue.get(dropped.id)).status == "cancelled"


@pytest.mark.sqlite_only  # the CLI speaks HTTP: the store is the daemon's business
async def test_the_cli_answers_a_question(
    wt: Any, run_cli: Any, config_file: Any, process_env: Any,
) -> None:
    daemon, events = wt
    env = process_env(AGENTD_SERVER_PORT=str(daemon.port))
    config = str(config_file())
    record = await daemon.queue.enqueue("wt.approve", {"draft": "c"})
    await events.wait_for("task.waiting", task_id=record.id)
    code, out, err = await run_cli("tasks", "answer", "--config", config, str(record.id), "yes",
                                   env=env)
    assert code == 0, err
    assert json.loads(out)["status"] == "queued"
    assert await daemon.queue.result(record.id, timeout=5) == {"answer": "yes"}  # text, not JSON
    code, _, err = await run_cli("tasks", "answer", "--config", config, str(record.id), "true",
                                 env=env)
    assert code != 0 and "asks no question" in err


# ------------------------------------------------------------------- states and events


async def test_a_question_holding_a_nul_fails_the_task_naming_it(wt: Any) -> None:
    """PostgreSQL's text holds no U+0000: writing such a question there failed, and the task
    stayed `running` with no coroutine. Both stores now fail the attempt, naming the prompt."""
    daemon, _ = wt
    record = await daemon.queue.enqueue("wt.approve", {"draft": "d", "prompt": "Send\u0000?"},
                                        max_attempts=1)
    final = await daemon.queue.wait(record.id, timeout=5)
    assert (final.status, final.error) == (
        "dead", "ValueError: prompt 'Send\\x00?' holds U+0000 (NUL), which the store cannot keep")


async def test_waiting_shows_in_status_the_task_stream_and_the_websocket(wt: Any, http: Any) -> None:
    daemon, _ = wt
    client = http(daemon)
    ws = await client.ws_connect("/v1/ws")
    await ws.send_json({"id": 1, "type": "subscribe", "patterns": ["task.waiting", "task.resumed"]})
    assert (await ws.receive_json(timeout=5))["ok"] is True
    record = await daemon.queue.enqueue("wt.approve", {"draft": "d"})
    async with client.get(f"/v1/tasks/{record.id}/stream") as response:
        sse = Sse(response)
        await sse.opened()
        frames = await sse.until("task.waiting")
        assert frames[-1].data["data"]["prompt"] == "Send this draft?"
        async with client.get("/v1/status") as status:
            assert (await status.json())["tasks"]["by_status"]["waiting"] == 1
        async with client.get("/v1/tasks", params={"status": "waiting"}) as listed:
            assert [task["id"] for task in (await listed.json())["tasks"]] == [record.id]
        await daemon.waits.answer(record.id, "ok")
        frames = await sse.until("end")
        assert [f.event for f in frames if f.event != "task.started"] == [
            "task.resumed", "task.succeeded", "end"]
    pushed = [(await ws.receive_json(timeout=5))["event"] for _ in range(2)]
    assert [(e["topic"], e["data"]["task_id"]) for e in pushed] == [
        ("task.waiting", record.id), ("task.resumed", record.id)]
    assert pushed[0]["data"]["kind"] == "ask" and pushed[1]["data"]["timed_out"] is False
    await ws.close()
    async with client.get("/v1/status") as status:
        assert "waiting" not in (await status.json())["tasks"]["by_status"]


async def test_an_event_published_on_another_daemon_ends_the_wait(
    start_daemon: Any, wt_dir: Path, http: Any, store_url: str | None, tmp_path: Path,
) -> None:
    """Two daemons share PostgreSQL: the one that did not write the wait hears of it (a
    notification) and matches the events published on it."""
    if store_url is None:
        pytest.skip("daemons share a store on PostgreSQL only")
    a, a_events = await start_daemon(plugin_dirs=[wt_dir], state_dir=tmp_path / "a")
    b, b_events = await start_daemon(plugin_dirs=[wt_dir], state_dir=tmp_path / "b")
    record = await a.queue.enqueue("wt.await_event", {"pattern": "approval.*", "match": {"n": 1}})
    heard = [asyncio.ensure_future(capture.wait_for("task.waiting", task_id=record.id))
             for capture in (a_events, b_events)]
    done, pending = await asyncio.wait(heard, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    for future in pending:
        future.cancel()
    assert done
    other = b if heard[0] in done else a  # the daemon that did not run the task

    await until(lambda: other.waits.indexed > 0)  # the notification publishes no event
    async with http(other).post("/v1/events", json={"topic": "approval.given",
                                                    "data": {"n": 1}}) as response:
        assert response.status < 300
    result = await a.queue.result(record.id, timeout=5)
    assert result["topic"] == "approval.given"


async def test_waits_on_one_topic_each_get_the_event_for_them(wt: Any) -> None:
    """Many waits of one topic, each matching its own id (the index files them by it)."""
    daemon, events = wt
    records = [await daemon.queue.enqueue("wt.await_event", {"pattern": "order.paid",
                                                             "match": {"order": n}})
               for n in range(5)]
    loose = await daemon.queue.enqueue("wt.await_event", {"pattern": "order.paid"})
    for record in (*records, loose):
        await events.wait_for("task.waiting", task_id=record.id)
    daemon.bus.publish("order.paid", {"order": 3, "by": "card"})
    assert (await daemon.queue.result(records[3].id, timeout=5))["data"] == {"order": 3, "by": "card"}
    assert (await daemon.queue.result(loose.id, timeout=5))["data"]["order"] == 3
    assert [(await daemon.queue.get(r.id)).status for r in records] == [
        "waiting", "waiting", "waiting", "succeeded", "waiting"]
    daemon.bus.publish("order.paid", {"order": True})  # true is no order number
    for n in (0, 1, 2, 4):
        daemon.bus.publish("order.paid", {"order": n})
    for n in (0, 1, 2, 4):
        assert (await daemon.queue.result(records[n].id, timeout=5))["data"] == {"order": n}
    assert daemon.waits.indexed == 0


async def test_a_burst_of_events_gives_each_wait_the_first_it_accepts(wt: Any) -> None:
    """Events heard while a lookup is under way are looked up together, in order: each of
    many waits on one topic gets the first event for it, not a later copy; a whole float
    matches the int it equals (`true` still matches no number)."""
    daemon, events = wt
    records = [await daemon.queue.enqueue("wt.await_event", {"pattern": "order.paid",
                                                             "match": {"order": n}})
               for n in range(40)]
    for record in records:
        await events.wait_for("task.waiting", task_id=record.id)
    for copy in (1, 2):  # one turn of the loop: every event is heard before any lookup ends
        for n in range(40):
            daemon.bus.publish("order.paid", {"order": True} if n == 7 and copy == 1 else
                               {"order": float(n) if n % 2 else n, "copy": copy})
    results = [await daemon.queue.result(record.id, timeout=10) for record in records]
    assert [result["data"]["copy"] for result in results] == [1] * 7 + [2] + [1] * 32
    assert [result["data"]["order"] for result in results] == list(range(40))
    await until(lambda: daemon.waits.indexed == 0)


async def test_the_topic_of_a_cancelled_wait_is_no_longer_heard(wt: Any, http: Any) -> None:
    """Cancelling a waiting task deletes its wait without the matcher hearing: the first
    event of its topic finds nothing, and the table, asked, says no wait is left."""
    daemon, events = wt
    record = await daemon.queue.enqueue("wt.await_event", {"pattern": "parcel.*", "match": {"id": 1}})
    await events.wait_for("task.waiting", task_id=record.id)
    assert daemon.waits.indexed == 1
    async with http(daemon).post(f"/v1/tasks/{record.id}/cancel") as response:
        assert response.status == 200
    assert daemon.waits.indexed == 1  # the count runs over
    daemon.bus.publish("parcel.sent", {"id": 1})
    await until(lambda: daemon.waits.indexed == 0)
    assert (await daemon.queue.get(record.id)).status == "cancelled"


@pytest.mark.sqlite_only
async def test_an_event_wait_written_before_migration_0013_is_still_matched(
    start_daemon: Any, wt_dir: Path, tmp_path: Path,
) -> None:
    """A file whose open event wait was written without an anchor (schema 12): the migration
    files it with those checked against every event of its pattern."""
    first, events = await start_daemon(plugin_dirs=[wt_dir])
    record = await first.queue.enqueue("wt.await_event", {"pattern": "deploy.finished",
                                                          "match": {"id": "d1"}})
    await events.wait_for("task.waiting", task_id=record.id)
    await first.stop()
    with sqlite3.connect(tmp_path / "data" / "agentd.db", isolation_level=None) as conn:
        conn.executescript("BEGIN; DROP INDEX task_waits_events; "
                           "ALTER TABLE task_waits DROP COLUMN anchor; "
                           "DELETE FROM schema_version WHERE version >= 13; COMMIT;")
    second, _ = await start_daemon(plugin_dirs=[wt_dir])
    assert second.waits.indexed == 1
    second.bus.publish("deploy.finished", {"id": "d2"})
    second.bus.publish("deploy.finished", {"id": "d1", "n": 2})
    assert (await second.queue.result(record.id, timeout=5))["data"] == {"id": "d1", "n": 2}
