"""`/v1/schedules`: list, create, inspect, change, delete, pause, resume, run now."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from msgspec import UNSET

from agentd.schedule import ScheduleSpec
from agentd.scheduler import Scheduler
from agentd.taskdef import INTERNAL_PREFIX
from agentd.web.errors import ApiError, read_body
from agentd.web.openapi import doc
from agentd.web.schemas import ScheduleBody, ScheduleItem, SchedulePatch
from agentd.web.server import DAEMON

routes = web.RouteTableDef()

_UNUSABLE = ("Well-formed but unusable: a date out of range, a cron expression or time the "
             "trigger refuses, args that do not fit the task, a queue without workers")


def _id(request: web.Request) -> str:
    return request.match_info["id"]


def _check_task(request: web.Request, fields: dict[str, Any]) -> None:
    """403 for a schedule of the API naming one of agentd's own tasks; 404 for a task no
    plugin registers (as POST /v1/tasks answers)."""
    task = fields.get("task")
    if task is None:
        return
    if task.startswith(INTERNAL_PREFIX):
        raise ApiError(403, "internal_task", f"task {task!r} is one of agentd's own; a schedule "
                       "of the API cannot run it")
    request.app[DAEMON].registry.get(task)


def _check_id(schedule_id: str) -> None:
    """403 for an id of agentd's own schedules (`agentd.*`): a later version of agentd may
    declare it, and a declared schedule replaces one of the API with its id."""
    if schedule_id.startswith(INTERNAL_PREFIX):
        raise ApiError(403, "internal_schedule", f"schedule id {schedule_id!r} is agentd's own "
                       f"({INTERNAL_PREFIX}*); choose another")


@routes.get("/v1/schedules")
@doc("Every schedule with its record: last fire and outcome, next fire, counts", tag="schedules")
async def list_schedules(request: web.Request) -> web.Response:
    scheduler = await _scheduler(request, None)
    return web.json_response(
        {"schedules": [s.to_dict() for _, s in sorted(scheduler.schedules.items())]})


@routes.post("/v1/schedules")
@doc("Create a schedule (kept across restarts)", tag="schedules", body=ScheduleItem,
     responses={201: "The schedule",
                403: "The task, or the id, is one of agentd's own (agentd.*)",
                404: "No task of that name is registered",
                409: "The id is taken (by a plugin or agentd.toml: the message names it)",
                422: _UNUSABLE})
async def create_schedule(request: web.Request) -> web.Response:
    body = await read_body(request, ScheduleBody)
    fields = body.fields()
    _check_id(body.id)
    _check_task(request, fields)
    scheduler = await _scheduler(request, body.id)
    state = await scheduler.create(ScheduleSpec.from_mapping(fields), body.paused is True)
    return web.json_response(state.to_dict(), status=201)


@routes.get("/v1/schedules/{id}")
@doc("One schedule", tag="schedules", responses={200: "The schedule", 404: "No such schedule"})
async def get_schedule(request: web.Request) -> web.Response:
    return web.json_response((await _scheduler(request, _id(request))).get(_id(request)).to_dict())


@routes.patch("/v1/schedules/{id}")
@doc("Change fields of a schedule created over the API", tag="schedules", body=SchedulePatch,
     responses={200: "The schedule", 403: "The task is one of agentd's own (agentd.*)",
                404: "No such schedule, or no task of that name is registered",
                409: "Defined by a plugin or agentd.toml: change it there", 422: _UNUSABLE})
async def update_schedule(request: web.Request) -> web.Response:
    body = await read_body(request, SchedulePatch)
    scheduler = await _scheduler(request, _id(request))
    changes = body.fields()
    _check_task(request, changes)
    state = await scheduler.update(_id(request), changes) if changes else scheduler.get(_id(request))
    if body.paused is not UNSET:
        state = await scheduler.set_paused(_id(request), body.paused)
    return web.json_response(state.to_dict())


@routes.delete("/v1/schedules/{id}")
@doc("Delete a schedule created over the API", tag="schedules",
     responses={204: "Deleted", 404: "No such schedule", 409: "Defined by a plugin or agentd.toml"})
async def delete_schedule(request: web.Request) -> web.Response:
    await (await _scheduler(request, _id(request))).delete(_id(request))
    return web.Response(status=204)


@routes.post("/v1/schedules/{id}/pause")
@doc("Pause a schedule: it fires nothing until resumed", tag="schedules",
     responses={200: "The schedule", 404: "No such schedule"})
async def pause_schedule(request: web.Request) -> web.Response:
    state = await (await _scheduler(request, _id(request))).set_paused(_id(request), True)
    return web.json_response(state.to_dict())


@routes.post("/v1/schedules/{id}/resume")
@doc("Resume a paused schedule from now on", tag="schedules",
     responses={200: "The schedule", 404: "No such schedule"})
async def resume_schedule(request: web.Request) -> web.Response:
    state = await (await _scheduler(request, _id(request))).set_paused(_id(request), False)
    return web.json_response(state.to_dict())


@routes.post("/v1/schedules/{id}/run")
@doc("Fire a schedule once now, outside its timetable (its overlap policy applies)",
     tag="schedules", responses={200: "The schedule, with the new last_task_id", 404: "No such schedule"})
async def run_schedule(request: web.Request) -> web.Response:
    state = await (await _scheduler(request, _id(request))).run_now(_id(request))
    return web.json_response(state.to_dict())


async def _scheduler(request: web.Request, schedule_id: str | None) -> Scheduler:
    """The daemon's scheduler, its copy of `schedule_id` (None: of every schedule) made
    current first: one made or changed through another daemon a moment ago is seen (see
    `Scheduler.refresh`)."""
    scheduler = request.app[DAEMON].scheduler
    await scheduler.refresh(schedule_id)
    return scheduler
