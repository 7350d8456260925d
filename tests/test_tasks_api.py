"""`/v1/tasks` over real HTTP, and the `agentd submit` / `agentd tasks` commands against a
running daemon."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest
from aiohttp import web

pytestmark = pytest.mark.both_stores

@pytest.fixture
async def served(start_daemon: Any, http: Any, copied_plugin: Any) -> Any:
    daemon, events = await start_daemon(
        plugin_dirs=[copied_plugin("queue_plugin.py", "qt")],
        overrides={"tasks": {"retry_base": 0.01, "retry_max": 0.02,
                             "queues": {"default": 4, "reports": 1, "a+b&c": 1}}})
    return daemon, events, http(daemon), sys.modules["agentd_plugins.qt"]


async def _json(response: Any) -> Any:
    assert response.content_type == "application/json"
    return await response.json()


async def test_enqueue_then_long_poll_the_result(served: Any) -> None:
    _daemon, _, client, _ = served
    async with client.post("/v1/tasks", json={"name": "qt.echo", "args": {"value": [1, 2]}}) as r:
        assert r.status == 201
        task = await _json(r)
    assert task["status"] == "queued" and task["name"] == "qt.echo"
    async with client.get(f"/v1/tasks/{task['id']}", params={"wait": "5"}) as r:
        done = await _json(r)
    assert (done["status"], done["result"], done["children"]) == ("succeeded", [1, 2], [])
    for key in ("attempts", "args", "error", "created_at", "started_at", "finished_at", "parent_id"):
        assert key in done


async def test_long_poll_returns_the_current_state_when_the_wait_runs_out(served: Any) -> None:
    _, _, client, module = served
    async with client.post("/v1/tasks", json={"name": "qt.wait_gate", "args": {"name": "g"}}) as r:
        task = await _json(r)
    async with client.get(f"/v1/tasks/{task['id']}", params={"wait": "0.1"}) as r:
        assert r.status == 200
        assert (await _json(r))["status"] in ("queued", "running")
    module.gate("g").set()


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"name": "qt.nothing"}, 404, "qt.nothing"),
        ({"args": {}}, 400, "missing required field `name`"),
        ({"name": None}, 400, "name: expected `str`, got `null`"),
        ({"name": "qt.echo", "priority": "high"}, 400, "priority: expected `int"),
        ({"name": "qt.echo", "delay": True}, 400, "delay: expected `float | null`, got `bool`"),
        ({"name": "qt.echo", "colour": "red"}, 400, "unknown field `colour`"),
        ({"name": "qt.echo", "args": [1]}, 400, "args: expected `object | null`, got `array`"),
        ({"name": "qt.echo", "args": {"nope": 1}}, 400, "unexpected keyword argument 'nope'"),
        ({"name": "qt.echo", "delay": 1, "run_at": 2}, 400, "either delay or run_at"),
        ({"name": "qt.echo", "max_attempts": 0}, 400, "max_attempts: expected `int` >= 1"),
        ({"name": "qt.echo", "priority": 2**63}, 400, "priority: expected `int` <= 9223372036854775807"),
        ({"name": "qt.echo", "queue": "gpu"}, 400, "queue 'gpu' has no workers"),
    ],
)
async def test_bad_enqueue_requests_name_what_is_wrong(
    served: Any, body: dict[str, Any], status: int, needle: str
) -> None:
    daemon, _, client, _ = served
    async with client.post("/v1/tasks", json=body) as r:
        assert r.status == status
        error = (await _json(r))["error"]
    assert needle in error["message"]
    assert error["code"] in ("unknown_task", "bad_request", "invalid_task")
    assert await daemon.queue.counts() == {}


async def test_malformed_json_is_a_400(served: Any) -> None:
    _, _, client, _ = served
    async with client.post("/v1/tasks", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert (await _json(r))["error"]["code"] == "invalid_json"


async def test_the_same_idempotency_key_returns_the_same_task(served: Any) -> None:
    _, _, client, _ = served
    body = {"name": "qt.echo", "args": {"value": 1}, "idempotency_key": "order-7", "delay": 60}
    async with client.post("/v1/tasks", json=body) as r:
        assert r.status == 201
        first = await _json(r)
    async with client.post("/v1/tasks", json=body) as r:
        assert r.status == 200
        assert (await _json(r))["id"] == first["id"]


async def test_batch_enqueue_is_all_or_nothing(served: Any) -> None:
    daemon, _, client, _ = served
    tasks = [{"name": "qt.echo", "args": {"value": i}} for i in range(50)]
    async with client.post("/v1/tasks/batch", json={"tasks": tasks}) as r:
        assert r.status == 201
        created = (await _json(r))["tasks"]
    assert [t["args"]["value"] for t in created] == list(range(50))
    assert all(t["created"] for t in created)
    bad = [*tasks[:3], {"name": "qt.echo", "priority": "x"}]
    async with client.post("/v1/tasks/batch", json={"tasks": bad}) as r:
        assert r.status == 400
        assert "tasks[3].priority: expected `int" in (await _json(r))["error"]["message"]
    # What only the queue can tell (limits, names, queues) names the item too.
    for item, status, message in [
            ({"name": "qt.echo", "max_attempts": 0}, 400, "tasks[2].max_attempts: expected `int` >= 1"),
            ({"name": "qt.echo", "queue": "gpu"}, 400, "tasks[2]: queue 'gpu' has no workers"),
            ({"name": "qt.ghost"}, 404, "tasks[2]: no task named 'qt.ghost'")]:
        async with client.post("/v1/tasks/batch", json={"tasks": [*tasks[:2], item]}) as r:
            assert r.status == status
            assert message in (await _json(r))["error"]["message"]
    # Its own tasks only: the daemon's maintenance may have fired one meanwhile.
    assert len(await daemon.queue.list(name="qt.echo", limit=100)) == 50


async def test_list_filters_and_pages(served: Any) -> None:
    daemon, _, client, _ = served
    ids = [(await daemon.queue.enqueue("qt.echo", {"value": i}, delay=60)).id for i in range(5)]
    other = await daemon.queue.enqueue("qt.report", delay=60)
    async with client.get("/v1/tasks", params={"name": "qt.echo", "limit": "2"}) as r:
        page = await _json(r)
    assert [t["id"] for t in page["tasks"]] == [ids[4], ids[3]]
    params = {"name": "qt.echo", "limit": "2", "before": str(page["next"])}
    async with client.get("/v1/tasks", params=params) as r:
        second = await _json(r)
    assert [t["id"] for t in second["tasks"]] == [ids[2], ids[1]]
    async with client.get("/v1/tasks", params={"queue": "reports"}) as r:
        assert [t["id"] for t in (await _json(r))["tasks"]] == [other.id]
    async with client.get("/v1/tasks", params={"status": "sleeping"}) as r:
        assert r.status == 400
        assert "query parameter status: invalid enum value 'sleeping'" in (await _json(r))["error"]["message"]


async def test_cancel_requeue_and_delete(served: Any) -> None:
    daemon, _, client, _ = served
    task = await daemon.queue.enqueue("qt.echo", {"value": 1}, delay=60)
    async with client.delete(f"/v1/tasks/{task.id}") as r:
        assert r.status == 409
        assert "it is queued" in (await _json(r))["error"]["message"]
    async with client.post(f"/v1/tasks/{task.id}/requeue") as r:
        assert r.status == 409
    async with client.post(f"/v1/tasks/{task.id}/cancel") as r:
        assert (await _json(r))["status"] == "cancelled"
    async with client.post(f"/v1/tasks/{task.id}/requeue") as r:
        assert (await _json(r))["status"] == "queued"
    async with client.get(f"/v1/tasks/{task.id}", params={"wait": "5"}) as r:
        assert (await _json(r))["status"] == "succeeded"
    async with client.delete(f"/v1/tasks/{task.id}") as r:
        assert r.status == 204
    async with client.get(f"/v1/tasks/{task.id}") as r:
        assert r.status == 404
        assert (await _json(r))["error"]["code"] == "task_not_found"


async def test_cancel_a_running_task_over_http(served: Any) -> None:
    _, _, client, module = served
    async with client.post("/v1/tasks", json={"name": "qt.wait_gate", "args": {"name": "hold"}}) as r:
        task = await _json(r)
    await asyncio.wait_for(module.gate("started:hold").wait(), 5)
    async with client.post(f"/v1/tasks/{task['id']}/cancel") as r:
        assert (await _json(r))["status"] == "cancelled"


async def test_a_parent_lists_its_children(served: Any) -> None:
    daemon, _, client, _ = served
    parent = await daemon.queue.enqueue("qt.parent", {"values": [1, 2]})
    await daemon.queue.wait(parent.id, timeout=5)
    async with client.get(f"/v1/tasks/{parent.id}") as r:
        body = await _json(r)
    assert len(body["children"]) == 2
    async with client.get(f"/v1/tasks/{body['children'][0]}") as r:
        assert (await _json(r))["parent_id"] == parent.id


async def test_task_types_lists_registered_tasks(served: Any) -> None:
    _, _, client, _ = served
    async with client.get("/v1/task-types") as r:
        types = {t["name"]: t for t in (await _json(r))["task_types"]}
    assert types["qt.limited"]["concurrency"] == 2
    assert types["qt.report"]["queue"] == "reports"
    assert types["qt.echo"]["signature"] == "(ctx, value=None)"


async def test_every_task_route_is_in_the_openapi_document(served: Any) -> None:
    _, _, client, _ = served
    async with client.get("/v1/openapi.json") as r:
        paths = (await _json(r))["paths"]
    expected = {
        "/v1/tasks": {"get", "post"}, "/v1/tasks/batch": {"post"},
        "/v1/tasks/{id}": {"get", "delete"}, "/v1/tasks/{id}/cancel": {"post"},
        "/v1/tasks/{id}/requeue": {"post"}, "/v1/task-types": {"get"},
    }
    for path, methods in expected.items():
        assert set(paths[path]) == methods, path
        for method in methods:
            assert paths[path][method]["summary"]


# ---------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli(served: Any, run_cli: Any, config_file: Any, process_env: Any) -> Any:
    daemon = served[0]
    path = config_file()
    env = process_env(AGENTD_SERVER_PORT=str(daemon.port))

    async def run(*args: str) -> tuple[int, str, str]:
        # --config goes right after the (sub)command: `agentd tasks list --config ...`.
        head = 2 if args[0] == "tasks" else 1
        return await run_cli(*args[:head], "--config", str(path), *args[head:], env=env)

    return run


async def test_submit_and_wait_prints_the_result(cli: Any) -> None:
    code, out, err = await cli("submit", "qt.echo", "--args", '{"value": "hello"}', "--wait")
    assert code == 0, err
    task = json.loads(out)
    assert (task["status"], task["result"]) == ("succeeded", "hello")


async def test_submit_wait_exits_1_when_the_task_does_not_succeed(cli: Any) -> None:
    code, out, _ = await cli("submit", "qt.fail_now", "--wait")
    assert code == 1
    assert json.loads(out)["status"] == "failed"


async def test_submit_errors_name_the_problem(cli: Any) -> None:
    code, _, err = await cli("submit", "qt.ghost")
    assert code == 2 and "no task named 'qt.ghost'" in err
    code, _, err = await cli("submit", "qt.echo", "--args", "{bad")
    assert code == 2 and "--args is not valid JSON" in err


async def test_tasks_commands(served: Any, cli: Any) -> None:
    daemon = served[0]
    task = await daemon.queue.enqueue("qt.echo", {"value": 3}, delay=60)
    code, out, _ = await cli("tasks", "list")
    assert code == 0 and f"{task.id}" in out and "queued" in out and "qt.echo" in out
    code, out, _ = await cli("tasks", "show", str(task.id))
    assert code == 0 and json.loads(out)["id"] == task.id
    code, out, _ = await cli("tasks", "cancel", str(task.id))
    assert code == 0 and json.loads(out)["status"] == "cancelled"
    code, out, _ = await cli("tasks", "requeue", str(task.id))
    assert code == 0 and json.loads(out)["status"] == "queued"
    code, _, err = await cli("tasks", "show", "424242")
    assert code == 2 and "no task with id 424242" in err
    # A filter is sent as a value, whatever it holds ('+' read as a space, '&' as a split).
    odd = await daemon.queue.enqueue("qt.echo", {"value": 4}, delay=60, queue="a+b&c")
    code, out, _ = await cli("tasks", "list", "--queue", "a+b&c")
    assert code == 0 and f"{odd.id}" in out and f"{task.id}" not in out


async def test_cli_says_when_something_else_answers(run_cli: Any, config_file: Any,
                                                    process_env: Any) -> None:
    async def bad_gateway(_: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", bad_gateway)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        port = runner.addresses[0][1]
        code, _, err = await run_cli("submit", "qt.echo", "--config", str(config_file()),
                                     env=process_env(AGENTD_SERVER_PORT=str(port)))
    finally:
        await runner.cleanup()
    assert code == 1 and "answered HTTP 502 with text/html" in err


async def test_cli_without_a_daemon_exits_1(run_cli: Any, config_file: Any, process_env: Any) -> None:
    code, _, err = await run_cli("submit", "qt.echo", "--config", str(config_file()),
                                 env=process_env(AGENTD_SERVER_PORT="9"))
    assert code == 1 and "no daemon answers" in err


async def test_tasks_are_counted_per_status_and_per_queue(served: Any) -> None:
    _, _, client, module = served
    async with client.post("/v1/tasks/batch", json={"tasks": [
        {"name": "qt.echo", "delay": 3600}, {"name": "qt.echo", "delay": 3600, "queue": "reports"},
        {"name": "qt.echo", "delay": 3600, "queue": "reports"},
        {"name": "qt.wait_gate", "args": {"name": "counted"}}]}) as r:
        assert r.status == 201
    await asyncio.wait_for(module.gate("started:counted").wait(), 10)
    async with client.get("/v1/tasks/counts") as r:
        assert (await _json(r)) == {"by_status": {"queued": 3, "running": 1}}
    async with client.get("/v1/queues") as r:
        assert (await _json(r))["queues"] == [
            {"name": "a+b&c", "workers": 1, "queued": 0, "due": 0, "running": 0},
            {"name": "default", "workers": 4, "queued": 1, "due": 0, "running": 1},
            {"name": "reports", "workers": 1, "queued": 2, "due": 0, "running": 0}]
    module.gate("counted").set()
