"""The edge of the HTTP API: whatever a client sends, a bad request is a 4xx naming what is
wrong, never a 5xx; what is accepted can be stored and given back unchanged; the daemon's own
tasks cannot be enqueued from outside; the OpenAPI document lists every error answer."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from agentd.errors import InvalidScheduleError, InvalidTaskError
from agentd.schedule import ScheduleSpec
from agentd.web.errors import ApiError
from agentd.web.schemas import MAX_DEPTH
from agentd.web.tasks_api import task_request

TOKEN = "edge-token"
JSON = {"Content-Type": "application/json"}

PLUGIN = """
    from agentd import Plugin, Retry

    plugin = Plugin("edge")

    @plugin.task()
    async def echo(ctx, **fields):
        return fields

    @plugin.task()
    async def again(ctx, delay):
        if ctx.task.attempt == 1:
            raise Retry(delay=float(delay))
        return "second attempt"
"""

# Every route that reads a JSON body, with a body it accepts.
BODY_ROUTES = [
    ("POST", "/v1/tasks", {"name": "edge.echo"}),
    ("POST", "/v1/tasks/batch", {"tasks": [{"name": "edge.echo"}]}),
    ("POST", "/v1/events", {"topic": "edge.ping"}),
    ("POST", "/v1/memory", {"text": "a fact"}),
    ("PATCH", "/v1/memory/1", {"text": "a fact"}),
    ("POST", "/v1/sessions/s/messages", {"role": "user", "content": "hi"}),
    ("POST", "/v1/schedules", {"id": "s", "every": "1h", "event": "edge.tick"}),
    ("PATCH", "/v1/schedules/s", {"every": "2h"}),
]


@pytest.fixture
async def edge(start_daemon: Any, http: Any, plugin_dir: Any) -> tuple[Any, Any]:
    daemon, _ = await start_daemon(plugin_dirs=[plugin_dir({"edge.py": PLUGIN})])
    return daemon, http(daemon)


async def send(client: Any, method: str, path: str, data: bytes | str,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with client.request(method, path, data=data, headers=headers or JSON) as response:
        return response.status, await response.json()


def error_of(body: dict[str, Any], code: str) -> str:
    assert body["error"]["code"] == code, body
    return str(body["error"]["message"])


@pytest.mark.parametrize(("method", "path", "_"), BODY_ROUTES)
async def test_a_body_that_is_not_utf8_json_is_a_400_on_every_route(
        edge: tuple[Any, Any], method: str, path: str, _: Any) -> None:
    daemon, client = edge
    cases = [
        b"\xff",  # printf '\xff' | curl --data-binary @-
        b'{"name": "\xff"}',
        b'{"x": "\\ud800"}',  # a lone surrogate: SQLite stores UTF-8
        b"[" * 5_000 + b"]" * 5_000,
        b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a": ' + b"1" * 5_000 + b"}",
        b'{"a": NaN}',
    ]
    for raw in cases:
        status, body = await send(client, method, path, raw)
        assert status == 400, (raw[:20], body)
        assert body["error"]["code"] in ("invalid_json", "bad_request"), body
    assert await daemon.queue.counts() == {}


@pytest.mark.parametrize(("method", "path", "sample"), BODY_ROUTES)
async def test_a_body_that_is_not_json_in_utf8_is_a_415_on_every_route(
        edge: tuple[Any, Any], method: str, path: str, sample: dict[str, Any]) -> None:
    _, client = edge
    raw = json.dumps(sample)
    for content_type, needle in [("text/plain", "not text/plain"),
                                 ("application/json; charset=no-such-codec", "no-such-codec"),
                                 ("application/json; charset=latin-1", "latin-1"),
                                 ("multipart/form-data; boundary=x", "not multipart/form-data")]:
        status, body = await send(client, method, path, raw, {"Content-Type": content_type})
        assert status == 415, (content_type, body)
        assert needle in error_of(body, "unsupported_media_type")


@pytest.mark.parametrize(("method", "path", "sample"), BODY_ROUTES)
async def test_a_body_that_cannot_be_decoded_is_a_400_on_every_route(
        edge: tuple[Any, Any], method: str, path: str, sample: dict[str, Any]) -> None:
    """`Content-Encoding: gzip` on a body that is not gzip was a 500 (the read raised)."""
    daemon, client = edge
    raw = json.dumps(sample).encode()
    status, body = await send(client, method, path, raw, {**JSON, "Content-Encoding": "gzip"})
    assert status == 400, body
    assert "content-encoding: gzip" in error_of(body, "invalid_body"), body
    assert await daemon.queue.counts() == {}


async def test_a_gzipped_body_is_read(edge: tuple[Any, Any]) -> None:
    _, client = edge
    raw = gzip.compress(b'{"topic": "edge.ping"}')
    status, body = await send(client, "POST", "/v1/events", raw, {**JSON, "Content-Encoding": "gzip"})
    assert status == 202, body


async def test_json_media_types_and_curl_defaults_are_read_as_json(edge: tuple[Any, Any]) -> None:
    _, client = edge
    for content_type in ("application/json", "application/json; charset=UTF-8",
                         "application/problem+json", "application/x-www-form-urlencoded"):
        status, body = await send(client, "POST", "/v1/events", '{"topic": "edge.ping"}',
                                  {"Content-Type": content_type})
        assert status == 202, (content_type, body)


async def test_values_that_could_not_be_kept_are_refused_naming_the_field(edge: tuple[Any, Any]) -> None:
    daemon, client = edge
    cases = [
        ("/v1/tasks", {"name": "edge.echo", "delay": 1e308}, "delay: expected `float` <= "),
        ("/v1/tasks", {"name": "edge.echo", "delay": -1}, "delay: expected `float` >= 0"),
        ("/v1/tasks", {"name": "edge.echo", "run_at": -1e18}, "run_at: expected `float` >= 0"),
        ("/v1/tasks", {"name": "edge.echo", "run_at": 1e18}, "run_at: expected `float` <= "),
        ("/v1/tasks", {"name": "edge.echo", "timeout": 0}, "timeout: expected `float` > 0"),
        ("/v1/tasks", {"name": "edge.echo", "priority": 2**64}, "priority: expected `int` <= "),
        ("/v1/tasks", {"name": "edge.echo", "args": {"a": 1}, "delay": 1, "run_at": 2},
         "either delay or run_at"),
        ("/v1/tasks", {"name": "x" * 300}, "name: expected `str` of length <= 255"),
        ("/v1/tasks", {"name": "edge.echo", "args": {"a": _nested(MAX_DEPTH)}},
         f"more than {MAX_DEPTH} deep"),
        ("/v1/events", {"topic": "t" * 100_000}, "topic: expected `str` of length <= 255"),
        ("/v1/memory", {"text": "a fact", "ttl": -5}, "ttl: expected `float` >= 0"),
        ("/v1/memory", {"text": "a fact", "expires_at": 1e300}, "expires_at: expected `float` <= "),
    ]
    for path, payload, needle in cases:
        status, body = await send(client, "POST", path, json.dumps(payload))
        assert status == 400, (payload, body)
        assert needle in error_of(body, "bad_request"), (payload, body)
    assert await daemon.queue.counts() == {}
    assert (await daemon.memory.stats())["namespaces"] == {}


async def test_a_plugin_cannot_enqueue_a_task_that_would_never_run(edge: tuple[Any, Any]) -> None:
    daemon, _ = edge
    for options in ({"delay": 1e308}, {"delay": float("nan")}, {"run_at": -1e18}, {"run_at": 1e12}):
        with pytest.raises(InvalidTaskError, match="run_at must be a Unix time from 0 to"):
            await daemon.queue.enqueue("edge.echo", **options)
    assert await daemon.queue.counts() == {}


async def test_a_plugin_cannot_enqueue_a_timeout_that_is_no_number_of_seconds(
        edge: tuple[Any, Any]) -> None:
    """An infinite timeout was stored, and GET /v1/tasks/{id} then answered `"timeout":
    Infinity`, which is not JSON; NaN was stored as none."""
    daemon, _ = edge
    for timeout in (float("inf"), float("nan"), -1.0, 0):
        with pytest.raises(InvalidTaskError, match="timeout must be"):
            await daemon.queue.enqueue("edge.echo", timeout=timeout)
    assert await daemon.queue.counts() == {}


async def test_a_schedule_whose_every_fire_would_fail_is_refused(edge: tuple[Any, Any]) -> None:
    """A jitter of 6 x 9999 weeks (the form allows it; numbers stop at ten years) was taken,
    and every fire then failed: its task would be due past the queue's last run_at."""
    daemon, client = edge
    for field in ("jitter", "grace", "every"):
        payload = {"id": "far", "cron": "* * * * *", "task": "edge.echo", field: "9999w" * 6}
        if field == "every":
            del payload["cron"]
        status, body = await send(client, "POST", "/v1/schedules", json.dumps(payload))
        assert status == 422, body
        assert error_of(body, "invalid_schedule").startswith(f"{field}: must be at most ten years")
    assert "far" not in daemon.scheduler.schedules
    with pytest.raises(InvalidScheduleError, match="jitter: must be at most ten years"):
        ScheduleSpec.from_mapping({"id": "far", "every": "1h", "task": "edge.echo",
                                   "jitter": 11 * 366 * 86_400})


async def test_a_retry_whose_delay_would_never_end_fails_the_task(edge: tuple[Any, Any]) -> None:
    """`raise Retry(delay=...)` bypassed the queue's bounds: with inf the task was queued
    for ever and GET answered `"run_at": Infinity` (not JSON), with 1e308 it never ran,
    and with NaN the requeue's write failed, leaving the task running under its lease."""
    daemon, client = edge
    for delay in ("inf", "1e308", "nan"):
        record = await daemon.queue.enqueue("edge.again", {"delay": delay})
        async with client.get(f"/v1/tasks/{record.id}?wait=10") as response:
            task = json.loads(await response.text(), parse_constant=_not_json)
        assert task["status"] == "failed", task
        assert "no number of seconds before 2100-01-01" in task["error"], task
    record = await daemon.queue.enqueue("edge.again", {"delay": "-5"})  # due at once
    async with client.get(f"/v1/tasks/{record.id}?wait=10") as response:
        assert (await response.json())["result"] == "second attempt"


async def test_a_schedule_every_microsecond_is_refused(edge: tuple[Any, Any]) -> None:
    """Every 1e-6 s was taken: every fire of the 60 s grace period was on time, so one pass
    enqueued them one by one, tens of millions, and no other schedule fired meanwhile."""
    daemon, client = edge
    payload = {"id": "fast", "every": 1e-6, "task": "edge.echo"}
    status, body = await send(client, "POST", "/v1/schedules", json.dumps(payload))
    assert status == 400, body
    assert error_of(body, "bad_request").startswith("every: "), body
    assert "fast" not in daemon.scheduler.schedules
    with pytest.raises(InvalidScheduleError, match="every: must be at least 1 ms"):
        ScheduleSpec.from_mapping(payload)
    status, body = await send(client, "POST", "/v1/schedules", json.dumps(
        {**payload, "every": 0.001, "paused": True}))
    assert status == 201, body


async def test_query_parameters_out_of_range_are_400(edge: tuple[Any, Any]) -> None:
    _, client = edge
    for query, needle in [("before=1e30", "before: expected `int`"),
                          ("before=" + "9" * 30, "before: expected `int` <= 9223372036854775807"),
                          ("limit=", "limit: expected `int`"), ("status=null", "status: invalid enum"),
                          ("limit=0", "limit: expected `int` >= 1")]:
        async with client.get(f"/v1/tasks?{query}") as response:
            assert response.status == 400, query
            assert needle in error_of(await response.json(), "bad_request"), query
    async with client.get("/v1/tasks/1?wait=1e400") as response:
        assert response.status == 400
    async with client.get("/v1/memory/search?q=x&k=") as response:
        assert response.status == 400


async def test_a_query_parameter_given_twice_is_a_400(edge: tuple[Any, Any]) -> None:
    """Found by review: `?limit=1&limit=500` was read as its first value, silently."""
    _, client = edge
    for path, name in [("/v1/tasks?limit=1&limit=500", "limit"),
                       ("/v1/memory/search?q=a&q=b", "q")]:
        async with client.get(path) as response:
            assert response.status == 400, path
            assert f"'{name}' is given 2 times" in error_of(await response.json(), "bad_request")
    async with client.get("/v1/tasks?limit=2&unknown=1&unknown=2") as response:
        assert response.status == 200  # parameters the route does not read are not its business


async def test_an_id_of_any_length_in_the_path_is_a_404(edge: tuple[Any, Any]) -> None:
    """An id of more than 4,300 digits was a 500: int() refuses to read so long a number."""
    _, client = edge
    huge = "9" * 5_000
    for method, path, code in [
            ("GET", f"/v1/tasks/{huge}", "task_not_found"),
            ("POST", f"/v1/tasks/{huge}/cancel", "task_not_found"),
            ("POST", f"/v1/tasks/{huge}/requeue", "task_not_found"),
            ("DELETE", f"/v1/tasks/{huge}", "task_not_found"),
            ("GET", f"/v1/tasks/{huge}/stream", "task_not_found"),
            ("GET", f"/v1/memory/{huge}", "memory_not_found"),
            ("DELETE", f"/v1/memory/{huge}", "memory_not_found"),
            ("GET", f"/v1/tasks/{'0' * 5_000}", "task_not_found")]:
        async with client.request(method, path) as response:
            assert response.status == 404, (method, path[:30], await response.text())
            error_of(await response.json(), code)


async def test_a_resume_point_of_any_length_is_a_400(edge: tuple[Any, Any]) -> None:
    """A `since` or Last-Event-ID of more than 4,300 digits was a 500 (int() refuses it)."""
    _, client = edge
    huge = "9" * 5_000
    await client.post("/v1/tasks", json={"name": "edge.echo", "delay": 60})
    for path, headers in [("/v1/stream?since=" + huge, {}), ("/v1/stream", {"Last-Event-ID": huge}),
                          ("/v1/tasks/1/stream", {"Last-Event-ID": huge})]:
        async with client.get(path, headers=headers) as response:
            assert response.status == 400, (path[:30], await response.text())
            assert "must be an event id" in error_of(await response.json(), "bad_request")


async def test_integers_past_64_bits_in_free_form_json_round_trip_exactly(edge: tuple[Any, Any]) -> None:
    daemon, client = edge
    big = {"big": 2**70, "small": -(2**100), "list": [10**30]}
    async with client.post("/v1/tasks", json={"name": "edge.echo", "args": big}) as response:
        assert response.status == 201
        task = await response.json()
    assert task["args"] == big
    async with client.get(f"/v1/tasks/{task['id']}?wait=10") as response:
        done = await response.json()
    assert (done["status"], done["args"], done["result"]) == ("succeeded", big, big)
    async with client.post("/v1/memory", json={"text": "numbers", "metadata": big}) as response:
        assert response.status == 201
        memory = await response.json()
    async with client.get(f"/v1/memory/{memory['id']}") as response:
        assert (await response.json())["metadata"] == big
    async with client.post("/v1/events", json={"topic": "edge.big", "data": big}) as response:
        assert response.status == 202
        event_id = (await response.json())["id"]
    await daemon.eventlog.flush()
    (stored,) = await daemon.eventlog.replay(event_id - 1, lambda event: event.id == event_id)
    assert dict(stored.data) == big


async def test_args_nested_up_to_the_limit_are_taken(edge: tuple[Any, Any]) -> None:
    _, client = edge
    deepest = {"name": "edge.echo", "args": {"a": _nested(MAX_DEPTH - 1)}, "delay": 60}
    async with client.post("/v1/tasks", json=deepest) as response:
        assert response.status == 201
        assert (await response.json())["args"] == deepest["args"]


async def test_a_whole_float_is_taken_for_an_integer_field(edge: tuple[Any, Any]) -> None:
    _, client = edge
    async with client.post("/v1/tasks", json={"name": "edge.echo", "priority": 5.0, "max_attempts": 2.0,
                                              "delay": 60}) as response:
        assert response.status == 201
        task = await response.json()
    assert (task["priority"], task["max_attempts"]) == (5, 2)
    assert type(task["priority"]) is int
    async with client.post("/v1/tasks", json={"name": "edge.echo", "priority": 5.5}) as response:
        assert response.status == 400


async def test_a_whole_float_past_int64_is_a_400_on_every_integer_field(edge: tuple[Any, Any]) -> None:
    """9.223372036854775807e18 is INT64_MAX written as a float: it decodes to 2**63, one
    past it, which SQLite cannot store (POST /v1/memory answered 500) and a schedule kept."""
    daemon, client = edge
    past = "9.223372036854775807e18"
    cases = [
        ("/v1/tasks", '{"name": "edge.echo", "priority": %s}', "priority"),
        ("/v1/memory", '{"text": "a fact", "supersedes": %s}', "supersedes"),
        ("/v1/schedules", '{"id": "s", "every": "1h", "event": "e.x", "catch_up_limit": %s}',
         "catch_up_limit"),
        ("/v1/schedules", '{"id": "s", "every": "1h", "event": "e.x", "pause_after_failures": %s}',
         "pause_after_failures"),
    ]
    for path, template, field in cases:
        status, body = await send(client, "POST", path, template % past)
        assert status == 400, (path, field, body)
        assert error_of(body, "bad_request").startswith(f"{field}: "), body
    assert await daemon.queue.counts() == {}
    assert "s" not in daemon.scheduler.schedules


def test_the_websocket_submit_validation_refuses_what_json_loads_lets_through() -> None:
    """`task_request` gets what the WebSocket decoded with the stdlib: lone surrogates, NaN."""
    for fields, needle in [({"name": "edge.echo", "args": {"a": "\ud800"}}, "lone surrogate"),
                           ({"name": "edge.echo", "idempotency_key": "k\udc00"}, "lone surrogate"),
                           ({"name": "edge.echo", "args": {"a": float("nan")}}, "not a JSON number"),
                           ({"name": "edge.echo", "delay": float("inf")}, "delay"),
                           ({"name": "edge.echo", "priority": True}, "priority"),
                           ({"name": "edge.echo", "colour": 1}, "colour")]:
        with pytest.raises(ApiError) as raised:
            task_request(fields)
        assert raised.value.status == 400
        assert needle in raised.value.message, fields
    assert task_request({"name": "edge.echo", "args": {"n": 1}}).args == {"n": 1}


@pytest.mark.parametrize("name", ["agentd.post_webhook", "agentd.send_mail", "agentd.purge_tasks"])
async def test_the_daemons_own_tasks_cannot_be_enqueued_over_the_api(
        edge: tuple[Any, Any], name: str) -> None:
    daemon, client = edge
    attempts = [
        ("POST", "/v1/tasks", {"name": name, "args": {}}),
        ("POST", "/v1/tasks/batch", {"tasks": [{"name": "edge.echo"}, {"name": name}]}),
        ("POST", "/v1/schedules", {"id": "sneaky", "every": "1h", "task": name}),
    ]
    for method, path, payload in attempts:
        async with client.request(method, path, json=payload) as response:
            assert response.status == 403, (path, await response.text())
            assert name in error_of(await response.json(), "internal_task")
    async with client.post("/v1/schedules", json={"id": "mine", "every": "1h", "task": "edge.echo",
                                                  "paused": True}) as response:
        assert response.status == 201
    async with client.patch("/v1/schedules/mine", json={"task": name}) as response:
        assert response.status == 403
        assert name in error_of(await response.json(), "internal_task")
    with pytest.raises(ApiError) as raised:  # the WebSocket's submit
        task_request({"name": name})
    assert raised.value.status == 403
    assert await daemon.queue.counts() == {}
    assert daemon.scheduler.get("mine").spec.task == "edge.echo"
    # Inside the daemon they are enqueued as before.
    record = await daemon.queue.enqueue("agentd.purge_tasks")
    assert record.name == "agentd.purge_tasks"


# The error answers whose body is the route's own, not the envelope: /readyz says which
# check failed in the same body as when it is ready.
OWN_ERROR_BODIES = {("/readyz", "503")}


async def test_the_document_lists_every_error_answer(start_daemon: Any, http: Any, tmp_path: Any) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"token": TOKEN}})
    async with http(daemon).get("/v1/openapi.json") as response:
        document = await response.json()
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            answers = set(operation["responses"])
            where = f"{method.upper()} {path}"
            if operation.get("security") != []:
                assert "401" in answers, where
            if "requestBody" in operation:
                assert {"400", "413", "415"} <= answers, where
            if method != "get":
                assert "503" in answers, where
            if "{" in path:
                assert "404" in answers, where
            for status, answer in operation["responses"].items():
                if int(status) >= 400 and (path, status) not in OWN_ERROR_BODIES:
                    assert answer["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}, where
    async with http(daemon, token=TOKEN).get("/v1/openapi.json") as response:
        assert (await response.json())["security"] == [{"bearer": []}]
    untokened, _ = await start_daemon(state_dir=tmp_path / "other")
    async with http(untokened).get("/v1/openapi.json") as response:
        open_document = await response.json()
    assert open_document["security"] == []
    assert "401" not in open_document["paths"]["/v1/tasks"]["post"]["responses"]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _not_json(constant: str) -> Any:
    raise AssertionError(f"{constant} is not JSON")
