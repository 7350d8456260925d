"""`/v1/schedules`: list, create, inspect, change, delete, pause, resume, run now."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agentd.schedule import ScheduleSpec
from agentd.web.errors import bad_request, read_json_object
from agentd.web.openapi import doc
from agentd.web.server import DAEMON

routes = web.RouteTableDef()

SCHEDULE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "exactly one of every / cron / at, and exactly one of task / event",
    "properties": {
        "id": {"type": "string"},
        "every": {"type": ["string", "number"], "description": "'30s', '30m', '1h30m', '2d' or seconds"},
        "cron": {"type": "string", "description": "5 fields, e.g. '0 9 * * 1-5'"},
        "at": {"type": ["string", "number"], "description": "ISO 8601 date and time, once"},
        "timezone": {"type": "string", "description": "for cron and naive dates (default UTC)"},
        "task": {"type": "string"}, "args": {"type": "object"}, "queue": {"type": "string"},
        "event": {"type": "string"}, "data": {"type": "object"},
        "catch_up": {"enum": ["skip", "once", "all"]},
        "catch_up_limit": {"type": "integer", "minimum": 1},
        "grace": {"type": ["string", "number"], "description": "how late a fire may still run"},
        "overlap": {"enum": ["allow", "skip", "queue_one", "cancel_previous"]},
        "jitter": {"type": ["string", "number"]},
        "pause_after_failures": {"type": "integer", "minimum": 0},
        "paused": {"type": "boolean"},
    },
}


def _id(request: web.Request) -> str:
    return request.match_info["id"]


@routes.get("/v1/schedules")
@doc("Every schedule with its record: last fire and outcome, next fire, counts", tag="schedules")
async def list_schedules(request: web.Request) -> web.Response:
    scheduler = request.app[DAEMON].scheduler
    return web.json_response(
        {"schedules": [s.to_dict() for _, s in sorted(scheduler.schedules.items())]})


@routes.post("/v1/schedules")
@doc("Create a schedule (kept across restarts)", tag="schedules", body=SCHEDULE_SCHEMA,
     responses={201: "The schedule", 400: "A field is wrong (it is named)", 409: "The id is taken"})
async def create_schedule(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    paused = body.pop("paused", False)
    if not isinstance(paused, bool):
        raise bad_request(f"paused: expected true or false, got {paused!r}")
    state = await request.app[DAEMON].scheduler.create(ScheduleSpec.from_mapping(body), paused)
    return web.json_response(state.to_dict(), status=201)


@routes.get("/v1/schedules/{id}")
@doc("One schedule", tag="schedules", responses={200: "The schedule", 404: "No such schedule"})
async def get_schedule(request: web.Request) -> web.Response:
    return web.json_response(request.app[DAEMON].scheduler.get(_id(request)).to_dict())


@routes.patch("/v1/schedules/{id}")
@doc("Change fields of a schedule created over the API", tag="schedules", body=SCHEDULE_SCHEMA,
     responses={200: "The schedule", 400: "A field is wrong", 404: "No such schedule",
                409: "Defined by a plugin or agentd.toml: change it there"})
async def update_schedule(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    scheduler = request.app[DAEMON].scheduler
    paused = body.pop("paused", None)
    if paused is not None and not isinstance(paused, bool):  # before anything changes
        raise bad_request(f"paused: expected true or false, got {paused!r}")
    state = await scheduler.update(_id(request), body) if body else scheduler.get(_id(request))
    if paused is not None:
        state = await scheduler.set_paused(_id(request), paused)
    return web.json_response(state.to_dict())


@routes.delete("/v1/schedules/{id}")
@doc("Delete a schedule created over the API", tag="schedules",
     responses={204: "Deleted", 404: "No such schedule", 409: "Defined by a plugin or agentd.toml"})
async def delete_schedule(request: web.Request) -> web.Response:
    await request.app[DAEMON].scheduler.delete(_id(request))
    return web.Response(status=204)


@routes.post("/v1/schedules/{id}/pause")
@doc("Pause a schedule: it fires nothing until resumed", tag="schedules",
     responses={200: "The schedule", 404: "No such schedule"})
async def pause_schedule(request: web.Request) -> web.Response:
    state = await request.app[DAEMON].scheduler.set_paused(_id(request), True)
    return web.json_response(state.to_dict())


@routes.post("/v1/schedules/{id}/resume")
@doc("Resume a paused schedule from now on", tag="schedules",
     responses={200: "The schedule", 404: "No such schedule"})
async def resume_schedule(request: web.Request) -> web.Response:
    state = await request.app[DAEMON].scheduler.set_paused(_id(request), False)
    return web.json_response(state.to_dict())


@routes.post("/v1/schedules/{id}/run")
@doc("Fire a schedule once now, outside its timetable (its overlap policy applies)",
     tag="schedules", responses={200: "The schedule, with the new last_task_id", 404: "No such schedule"})
async def run_schedule(request: web.Request) -> web.Response:
    state = await request.app[DAEMON].scheduler.run_now(_id(request))
    return web.json_response(state.to_dict())
