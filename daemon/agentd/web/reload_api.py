"""`/v1/reload` and `/v1/plugins/{name}/reload`: reload agentd.toml, or one plugin from its
file, in the running daemon (agentd/reload.py). Admin actions: they need the API token
when one is configured, like every route that changes something."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agentd.errors import PluginError, PluginNotFoundError
from agentd.web.errors import ApiError
from agentd.web.openapi import doc
from agentd.web.server import DAEMON

routes = web.RouteTableDef()

_KEYS = {"type": "array", "items": {"type": "string"}}
_OUTCOME = {
    "type": "object",
    "required": ["ok", "trigger", "source", "at", "took", "error", "applied", "restart_required",
                 "plugins_reloaded", "schedules_changed", "errors"],
    "properties": {
        "ok": {"type": "boolean", "description": "false: the file was refused, nothing changed"},
        "trigger": {"type": "string", "description": "SIGHUP, api"},
        "source": {"type": "string", "description": "the file read"},
        "at": {"type": "number", "description": "Unix time the reload began"},
        "took": {"type": "number", "description": "seconds"},
        "error": {"type": ["string", "null"], "description": "why the file was refused"},
        "applied": {**_KEYS, "description": "changed keys now in effect (`section.key`, "
                    "`plugins.<name>`, `schedules.<id>`, `tasks.queues.<name>`)"},
        "restart_required": {**_KEYS, "description": "changed keys that keep their running "
                             "value until agentd restarts"},
        "plugins_reloaded": {**_KEYS, "description": "plugins whose table changed, reloaded"},
        "schedules_changed": {**_KEYS, "description": "schedule ids added, changed or removed"},
        "errors": {"type": "object", "additionalProperties": {"type": "string"},
                   "description": "what failed once the file was accepted (`plugin <name>`, "
                                  "`digests`, `schedules`); the rest of the reload stands"},
    },
}
_LAST = {"type": "object", "required": ["last"],
         "properties": {"last": {"anyOf": [_OUTCOME, {"type": "null"}],
                                 "description": "the last reload since the start, or null"}}}
_PLUGIN = {
    "type": "object", "required": ["name", "source", "state", "error", "schedules_changed",
                                   "schedules_error"],
    "properties": {
        "name": {"type": "string"}, "source": {"type": "string"},
        "state": {"enum": ["started", "failed"], "description": "failed: its new code registered "
                  "a clashing task or a startup hook failed; it is unloaded"},
        "error": {"type": ["string", "null"]},
        "schedules_changed": _KEYS,
        "schedules_error": {"type": ["string", "null"], "description": "an agentd.toml schedule "
                            "names a task the new code dropped: the schedules stay as they were"},
    },
}


@routes.post("/v1/reload")
@doc("Reload agentd.toml: apply what can change live, name the changed keys that need a "
     "restart; a file with an error is refused whole and the running configuration kept",
     tag="system", schemas={200: _OUTCOME},
     responses={200: "Reloaded: what was applied and what waits for a restart",
                422: "The file was refused (its error in the message); nothing changed"})
async def reload_config(request: web.Request) -> web.Response:
    outcome = await request.app[DAEMON].reloader.reload("api")
    if not outcome.ok:
        raise ApiError(422, "config_refused", outcome.error or "the file was refused",
                       reload=outcome.to_dict())
    return web.json_response(outcome.to_dict())


@routes.get("/v1/reload")
@doc("The last reload's outcome (null before the first)", tag="system", schemas={200: _LAST})
async def last_reload(request: web.Request) -> web.Response:
    last = request.app[DAEMON].reloader.last
    return web.json_response({"last": None if last is None else last.to_dict()})


@routes.post("/v1/plugins/{name}/reload")
@doc("Reload one plugin from its file: new tasks run its new code, running ones finish on "
     "the old; its shutdown and startup hooks run", tag="system", schemas={200: _PLUGIN},
     responses={200: "The plugin as reloaded (started, or failed with its error)",
                404: "No plugin of that name",
                409: "The daemon serves in safe mode: its plugins are off until it is cleared "
                     "and restarted",
                422: "Its new code was refused (import error, another plugin name, an entry "
                     "point's plugin): the old code runs on"})
async def reload_plugin(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    daemon = request.app[DAEMON]
    if daemon.safe_mode is not None:  # loading its code now would undo what safe mode is for
        raise ApiError(409, "safe_mode", "the daemon serves in safe mode: plugins are off until "
                       "it is cleared (POST /v1/safe-mode/clear) and restarted")
    try:
        answer: dict[str, Any] = await daemon.reloader.reload_plugin(name)
    except PluginNotFoundError as exc:
        raise ApiError(404, "plugin_not_found", str(exc)) from None
    except PluginError as exc:
        raise ApiError(422, "plugin_refused", str(exc)) from None
    return web.json_response(answer)
