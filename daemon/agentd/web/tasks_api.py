"""`/v1/tasks`: enqueue (one or a batch), inspect, list, wait, cancel, requeue, delete."""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from agentd.taskqueue import FINAL_STATES, TaskQueue, TaskRecord, TaskRequest
from agentd.web.errors import bad_request, read_json_object
from agentd.web.openapi import doc
from agentd.web.server import DAEMON

routes = web.RouteTableDef()

MAX_WAIT = 300.0
MAX_BATCH = 10_000

_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "name": (str, "a string"),
    "args": (dict, "a JSON object"),
    "queue": (str, "a string"),
    "priority": (int, "an integer"),
    "delay": ((int, float), "a number of seconds"),
    "run_at": ((int, float), "a Unix time in seconds"),
    "idempotency_key": (str, "a string"),
    "max_attempts": (int, "an integer"),
    "timeout": ((int, float), "a number of seconds"),
}

TASK_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "description": "a registered task name"},
        "args": {"type": "object", "description": "keyword arguments, JSON"},
        "queue": {"type": "string"},
        "priority": {"type": "integer", "description": "higher runs first"},
        "delay": {"type": "number", "description": "seconds from now"},
        "run_at": {"type": "number", "description": "Unix time; not with delay"},
        "idempotency_key": {"type": "string", "description": "the same key returns the same task"},
        "max_attempts": {"type": "integer", "minimum": 1},
        "timeout": {"type": "number", "description": "seconds per attempt"},
    },
}


def task_request(body: dict[str, Any], where: str = "") -> TaskRequest:
    """A TaskRequest from a JSON body, or a 400 naming the field that is wrong."""
    unknown = sorted(set(body) - set(_FIELDS))
    if unknown:
        raise bad_request(f"{where}unknown field(s): {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    if body.get("name") is None:
        raise bad_request(f"{where}field 'name' is required")
    for field, (kind, expected) in _FIELDS.items():
        value = body.get(field)
        if value is None:
            continue
        numeric = kind in (int, (int, float))
        if not isinstance(value, kind) or (numeric and isinstance(value, bool)):
            raise bad_request(f"{where}field {field!r} must be {expected}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise bad_request(f"{where}field {field!r} must be finite, got {value!r}")
    return TaskRequest(
        name=body["name"], args=body.get("args") or {}, queue=body.get("queue"),
        priority=body.get("priority"), delay=body.get("delay"), run_at=body.get("run_at"),
        idempotency_key=body.get("idempotency_key"), max_attempts=body.get("max_attempts"),
        timeout=body.get("timeout"),
    )


def _task_id(request: web.Request) -> int:
    return int(request.match_info["id"])


async def with_children(queue: TaskQueue, record: TaskRecord) -> dict[str, Any]:
    """The task as GET /v1/tasks/{id} shows it: its record and its children's ids."""
    return {**record.to_dict(), "children": await queue.children(record.id)}


@routes.post("/v1/tasks")
@doc("Enqueue a task", tag="tasks", body=TASK_REQUEST_SCHEMA, responses={
    201: "Created; the task", 200: "An idempotency key matched: the existing task",
    400: "A field is missing or wrong", 404: "No task of that name is registered"})
async def enqueue(request: web.Request) -> web.Response:
    queue = request.app[DAEMON].queue
    (outcome,) = await queue.enqueue_many([task_request(await read_json_object(request))])
    return web.json_response(outcome.task.to_dict(), status=201 if outcome.created else 200)


@routes.post("/v1/tasks/batch")
@doc("Enqueue many tasks in one transaction: all are validated, then all are committed",
     tag="tasks",
     body={"type": "object", "required": ["tasks"],
           "properties": {"tasks": {"type": "array", "items": TASK_REQUEST_SCHEMA}}},
     responses={201: "The tasks, in order, each with `created`", 400: "A task is invalid (its index "
                "is named)", 404: "A task name is not registered"})
async def enqueue_batch(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    items = body.get("tasks")
    if not isinstance(items, list) or not items:
        raise bad_request("field 'tasks' must be a non-empty list of task objects")
    if len(items) > MAX_BATCH:
        raise bad_request(f"field 'tasks' holds {len(items)} tasks; at most {MAX_BATCH} per batch")
    requests = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad_request(f"tasks[{index}] must be a JSON object")
        requests.append(task_request(item, where=f"tasks[{index}]: "))
    outcomes = await request.app[DAEMON].queue.enqueue_many(requests)
    return web.json_response(
        {"tasks": [{**o.task.to_dict(), "created": o.created} for o in outcomes]}, status=201)


@routes.get("/v1/tasks")
@doc("List tasks, newest first", tag="tasks", query={
    "status": "queued, running, succeeded, failed, dead or cancelled", "name": "task name",
    "queue": "queue name", "limit": "page size, 1..500 (default 50)",
    "before": "the `next` value of the previous page"},
    responses={200: "`tasks` and `next` (null on the last page)", 400: "A bad filter"})
async def list_tasks(request: web.Request) -> web.Response:
    query = request.query
    try:
        limit = int(query.get("limit", "50"))
        before = int(query["before"]) if "before" in query else None
    except ValueError:
        raise bad_request("limit and before must be integers") from None
    if not 1 <= limit <= 500:
        raise bad_request(f"limit must be between 1 and 500, got {limit}")
    records = await request.app[DAEMON].queue.list(
        status=query.get("status"), name=query.get("name"), queue=query.get("queue"),
        before_id=before, limit=limit)
    next_page = records[-1].id if len(records) == limit else None
    return web.json_response({"tasks": [r.to_dict() for r in records], "next": next_page})


@routes.get(r"/v1/tasks/{id:\d+}")
@doc("A task with its children; `?wait=SECONDS` long-polls until it is finished", tag="tasks",
     query={"wait": f"seconds to wait for a final state (max {MAX_WAIT:g})"},
     responses={200: "The task (finished, or as it is when the wait ran out)",
                404: "No such task", 400: "A bad wait value"})
async def get_task(request: web.Request) -> web.Response:
    queue = request.app[DAEMON].queue
    task_id = _task_id(request)
    wait = request.query.get("wait")
    if wait is None:
        record = await queue.get(task_id)
    else:
        try:
            seconds = float(wait)
        except ValueError:
            raise bad_request(f"wait must be a number of seconds, got {wait!r}") from None
        if not 0 <= seconds <= MAX_WAIT:
            raise bad_request(f"wait must be between 0 and {MAX_WAIT:g} seconds, got {wait}")
        try:
            record = await queue.wait(task_id, seconds)
        except TimeoutError:
            record = await queue.get(task_id)
    return web.json_response(await with_children(queue, record))


@routes.post(r"/v1/tasks/{id:\d+}/cancel")
@doc("Cancel a queued or running task and its unfinished children", tag="tasks",
     responses={200: "The task (cancelled, or running with cancel_requested until it stops)",
                404: "No such task"})
async def cancel_task(request: web.Request) -> web.Response:
    queue = request.app[DAEMON].queue
    record = await queue.cancel(_task_id(request))
    if record.status == "running":
        # Give the cancelled coroutine a moment to stop so most callers see the end state.
        try:
            record = await queue.wait(record.id, 1.0)
        except TimeoutError:
            record = await queue.get(record.id)
    return web.json_response(await with_children(queue, record))


@routes.post(r"/v1/tasks/{id:\d+}/requeue")
@doc("Run a dead, failed or cancelled task again with a fresh attempt count", tag="tasks",
     responses={200: "The queued task", 404: "No such task", 409: "The task is not dead, failed or "
                "cancelled"})
async def requeue_task(request: web.Request) -> web.Response:
    record = await request.app[DAEMON].queue.requeue(_task_id(request))
    return web.json_response(record.to_dict())


@routes.delete(r"/v1/tasks/{id:\d+}")
@doc("Delete a finished task", tag="tasks", responses={
    204: "Deleted", 404: "No such task", 409: f"Not finished ({', '.join(sorted(FINAL_STATES))})"})
async def delete_task(request: web.Request) -> web.Response:
    await request.app[DAEMON].queue.delete(_task_id(request))
    return web.Response(status=204)


@routes.get("/v1/task-types")
@doc("The registered task names with their defaults", tag="tasks")
async def task_types(request: web.Request) -> web.Response:
    registry = request.app[DAEMON].registry
    types = []
    for name in registry.names():
        definition = registry.get(name)
        types.append({
            "name": name, "plugin": definition.plugin, "queue": definition.queue,
            "max_attempts": definition.max_attempts, "timeout": definition.timeout,
            "priority": definition.priority, "concurrency": definition.concurrency,
            "signature": str(definition.signature),
        })
    return web.json_response({"task_types": types})
