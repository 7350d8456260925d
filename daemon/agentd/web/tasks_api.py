"""`/v1/tasks`: enqueue (one or a batch), inspect, list, wait, cancel, requeue, delete; tasks
per status and per queue; and the questions of waiting tasks (`ctx.ask`): `/v1/approvals`,
`/v1/tasks/{id}/answer`."""

from __future__ import annotations

import time
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from agentd.jsontext import lenient_encoder
from agentd.taskdef import INTERNAL_PREFIX, LimitKey
from agentd.taskqueue import FINAL_STATES, TaskRecord, TaskRequest
from agentd.web.errors import ApiError, invalid, path_id, read_body, read_query
from agentd.web.openapi import doc
from agentd.web.schemas import (
    AnswerBody,
    ApprovalsQuery,
    TaskBatch,
    TaskBody,
    TaskItem,
    TaskListQuery,
    TaskWaitQuery,
    whole,
)
from agentd.web.server import DAEMON

routes = web.RouteTableDef()
# A batch's answer holds up to thousands of records, already JSON (arguments and results are
# checked when stored): orjson writes it several times as fast as the stdlib, which took a
# fifth of a daemon's time in pg_bench's enqueue of 1,000 tasks a request.
_encode_many = lenient_encoder()
T = TypeVar("T")


def task_request(fields: dict[str, Any]) -> TaskRequest:
    """A TaskRequest from a decoded JSON object (a WebSocket `submit`'s fields), or a 400
    naming the field that is wrong (403 for one of the daemon's own tasks)."""
    try:
        body = msgspec.convert(fields, TaskBody)
    except msgspec.ValidationError as exc:
        raise invalid(exc, fields) from None
    return _request(body)


def _request(body: TaskBody, where: str = "") -> TaskRequest:
    if body.name.startswith(INTERNAL_PREFIX):
        raise ApiError(403, "internal_task", f"{where}task {body.name!r} is one of agentd's own; "
                       "plugins enqueue it, the API does not")
    return TaskRequest(
        name=body.name, args=body.args or {}, queue=body.queue, priority=whole(body.priority),
        delay=body.delay, run_at=body.run_at, idempotency_key=body.idempotency_key,
        max_attempts=whole(body.max_attempts), timeout=body.timeout,
    )


def _given(value: T | UnsetType) -> T | None:
    return None if value is UNSET else value


def _task_id(request: web.Request) -> int:
    return path_id(request, "task_not_found", "task")


async def with_children(request: web.Request, record: TaskRecord) -> dict[str, Any]:
    """The task as GET /v1/tasks/{id} shows it: its record, its children's ids, and what it
    waits for (`waiting_for`, null unless it is waiting)."""
    daemon = request.app[DAEMON]
    shown = {**record.to_dict(), "children": await daemon.queue.children(record.id)}
    return (await with_waits(request, [shown]))[0]


async def with_waits(request: web.Request, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each task (as shown) with `waiting_for`: its open wait, read for the waiting ones."""
    waiting = [task["id"] for task in tasks if task["status"] == "waiting"]
    waits = await request.app[DAEMON].waits.store.open_waits(waiting) if waiting else {}
    for task in tasks:
        wait = waits.get(task["id"])
        task["waiting_for"] = None if wait is None else wait.to_dict()
    return tasks


@routes.post("/v1/tasks")
@doc("Enqueue a task", tag="tasks", body=TaskItem, responses={
    201: "Created; the task", 200: "An idempotency key matched: the existing task",
    403: "The task is one of agentd's own (agentd.*)", 404: "No task of that name is registered"})
async def enqueue(request: web.Request) -> web.Response:
    queue = request.app[DAEMON].queue
    (outcome,) = await queue.enqueue_many([_request(await read_body(request, TaskBody))])
    return web.json_response(outcome.task.to_dict(), status=201 if outcome.created else 200)


@routes.post("/v1/tasks/batch")
@doc("Enqueue many tasks in one transaction: all are validated, then all are committed",
     tag="tasks", body=TaskBatch,
     responses={201: "The tasks, in order, each with `created`", 400: "A task is invalid (its index "
                "is named)", 403: "A task is one of agentd's own (agentd.*)",
                404: "A task name is not registered"})
async def enqueue_batch(request: web.Request) -> web.Response:
    batch = await read_body(request, TaskBatch)
    requests = [_request(item, where=f"tasks[{index}]: ") for index, item in enumerate(batch.tasks)]
    outcomes = await request.app[DAEMON].queue.enqueue_many(requests)
    return web.json_response(
        {"tasks": [{**o.task.to_dict(), "created": o.created} for o in outcomes]}, status=201,
        dumps=_encode_many)


@routes.get("/v1/tasks")
@doc("List tasks, newest first", tag="tasks", query=TaskListQuery,
     responses={200: "`tasks` and `next` (null on the last page)"})
async def list_tasks(request: web.Request) -> web.Response:
    query = read_query(request, TaskListQuery)
    records = await request.app[DAEMON].queue.list(
        status=_given(query.status), name=_given(query.name), queue=_given(query.queue),
        before_id=_given(query.before), limit=query.limit)
    next_page = records[-1].id if len(records) == query.limit else None
    tasks = await with_waits(request, [record.to_dict() for record in records])
    return web.json_response({"tasks": tasks, "next": next_page})


@routes.get("/v1/tasks/counts")
@doc("Tasks per status (statuses with none left out): what /v1/status gives as tasks.by_status, "
     "without the rest of its work; the dashboard polls it", tag="tasks",
     responses={200: "`by_status`"})
async def task_counts(request: web.Request) -> web.Response:
    return web.json_response({"by_status": await request.app[DAEMON].queue.counts()})


@routes.get("/v1/tasks/throughput")
@doc("The store's count of finished tasks (succeeded, failed, dead, cancelled), sampled by "
     "this daemon every `every` seconds over the last hour, oldest first (kept in memory: since "
     "its start at most); the dashboard's throughput chart", tag="tasks",
     responses={200: "`every` (seconds) and `samples`: [Unix time, tasks finished] pairs"})
async def task_throughput(request: web.Request) -> web.Response:
    history = request.app[DAEMON].throughput
    return web.json_response({"every": history.every, "samples": [list(s) for s in history.samples]})


@routes.get("/v1/queues")
@doc("Each queue: the workers this daemon runs for it ([tasks] queues), its tasks queued (and "
     "of those, due now) and running", tag="tasks",
     responses={200: "`queues`: `name`, `workers`, `queued`, `due`, `running`, by name"})
async def queues(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    figures = await daemon.queue.tasks.by_queue(time.time())
    workers = daemon.config.tasks.queues
    queues = {name: {"name": name, "workers": workers.get(name, 0), "queued": 0, "due": 0,
                     "running": 0} for name in sorted({*workers, *(f.queue for f in figures)})}
    for figure in figures:
        if figure.status in ("queued", "running"):
            queues[figure.queue][figure.status] = figure.tasks
        if figure.status == "queued":
            queues[figure.queue]["due"] = figure.due
    return web.json_response({"queues": list(queues.values())})


@routes.get(r"/v1/tasks/{id:\d+}")
@doc("A task with its children; `?wait=SECONDS` long-polls until it is finished", tag="tasks",
     query=TaskWaitQuery,
     responses={200: "The task (finished, or as it is when the wait ran out)", 404: "No such task"})
async def get_task(request: web.Request) -> web.Response:
    queue = request.app[DAEMON].queue
    task_id = _task_id(request)
    wait = read_query(request, TaskWaitQuery).wait
    if wait is UNSET:
        record = await queue.get(task_id)
    else:
        try:
            record = await queue.wait(task_id, wait)
        except TimeoutError:
            record = await queue.get(task_id)
    return web.json_response(await with_children(request, record))


@routes.post(r"/v1/tasks/{id:\d+}/cancel")
@doc("Cancel a queued, running or waiting task and its unfinished children", tag="tasks",
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
    return web.json_response(await with_children(request, record))


@routes.post(r"/v1/tasks/{id:\d+}/answer")
@doc("Answer the question a waiting task asks (`ctx.ask`): the answer is what `ask` returns, "
     "and the task is queued again", tag="tasks", body=AnswerBody,
     responses={200: "The task, queued", 404: "No such task",
                409: "The task asks no question (not waiting on one, or answered already)"})
async def answer_task(request: web.Request) -> web.Response:
    body = await read_body(request, AnswerBody)
    record = await request.app[DAEMON].waits.answer(_task_id(request), body.answer)
    return web.json_response((await with_waits(request, [record.to_dict()]))[0])


@routes.get("/v1/approvals")
@doc("The questions waiting tasks ask (`ctx.ask`), newest task first", tag="tasks",
     query=ApprovalsQuery,
     responses={200: "`approvals` (each the task's `task_id`, `name`, `queue`, "
                "`correlation_id`, and its question: `wait`, `prompt`, `data`, `wake_at`, the "
                "time it times out or null) and `next` (null on the last page)"})
async def approvals(request: web.Request) -> web.Response:
    query = read_query(request, ApprovalsQuery)
    asked = await request.app[DAEMON].waits.store.questions(_given(query.before), query.limit)
    next_page = asked[-1][0].id if len(asked) == query.limit else None
    return web.json_response({"approvals": [
        {"task_id": record.id, "name": record.name, "queue": record.queue,
         "correlation_id": record.correlation_id, **question.to_dict()}
        for record, question in asked], "next": next_page})


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


def _key_text(key: LimitKey | None) -> str | None:
    """A limit key as listed: its format, or the function's name."""
    if key is None or isinstance(key, str):
        return key
    return f"function {getattr(key, '__qualname__', type(key).__name__)}"


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
            "concurrency_key": _key_text(definition.concurrency_key),
            "rate_key": _key_text(definition.rate_key),
            "signature": str(definition.signature),
        })
    return web.json_response({"task_types": types})
