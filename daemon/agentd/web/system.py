"""System routes: liveness, readiness, status, clearing safe mode and the OpenAPI document."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

from aiohttp import web

from agentd import __version__
from agentd.errors import describe
from agentd.web.auth import ACCESS, may_see_details
from agentd.web.openapi import build_document, doc
from agentd.web.server import DAEMON

if TYPE_CHECKING:
    from agentd.app import Daemon

routes = web.RouteTableDef()


@routes.get("/healthz")
@doc("Liveness, with the state of every plugin and background loop, any warning (plugin "
     "files and errors only for a caller with the token, when one is configured) and safe mode "
     "(null, or why, since when and the crashed starts)", tag="system",
     public=True,
     responses={200: "The process is alive; `status` is degraded when a plugin failed, a "
                     "loop is down or the daemon serves in safe mode"})
async def healthz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    plugins = daemon.plugins.states()
    warnings = daemon.plugins.warnings
    details = may_see_details(request)
    degraded = (any(p["state"] == "failed" for p in plugins) or bool(daemon.supervisor.down)
                or daemon.safe_mode is not None)
    if not details:
        # Paths and error texts tell an outsider how the host is laid out.
        plugins = [{"name": p["name"], "state": p["state"]} for p in plugins]
        warnings = [{"warning": w["warning"]} for w in warnings]
    return web.json_response({
        "status": "degraded" if degraded else "ok",
        "version": __version__,
        "uptime": round(time.monotonic() - daemon.started_monotonic, 3),
        "plugins": plugins,
        "loops": daemon.supervisor.describe(details),
        "warnings": warnings,
        "safe_mode": _safe_mode(daemon),
    })


def _safe_mode(daemon: Daemon) -> dict[str, object] | None:
    return None if daemon.safe_mode is None else daemon.safe_mode.to_dict()


# /readyz's answer, ready or not: a probe reads `ready`, a person `checks`.
_READINESS = {
    "type": "object", "required": ["ready", "checks"],
    "properties": {
        "ready": {"type": "boolean"},
        "checks": {"type": "object", "description": "Each check by name (store, plugins, loops, "
                   "loop_lag, intake, safe_mode): `ok` and what it found",
                   "additionalProperties": {"type": "object", "required": ["ok"],
                                            "properties": {"ok": {"type": "boolean"}}}},
    },
}


@routes.get("/readyz")
@doc("Readiness: store writable, plugins started and none failed, background loops running, "
     "event-loop lag bounded, not in safe mode",
     tag="system",
     responses={200: "Ready", 503: "Not ready; `checks` says which check failed"},
     schemas={200: _READINESS, 503: _READINESS})
async def readyz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    checks: dict[str, dict[str, object]] = {}
    try:
        await asyncio.wait_for(daemon.store.check_writable(), timeout=2.0)
        checks["store"] = {"ok": True}
    except Exception as exc:  # a StoreWriteError names its cause: store_full, store_busy...
        checks["store"] = {"ok": False, "code": getattr(exc, "code", "store_unavailable"),
                           "error": describe(exc)}
    failed = daemon.plugins.failed
    checks["plugins"] = {"ok": daemon.plugins_started and not failed, "failed": failed}
    down = daemon.supervisor.down
    checks["loops"] = {"ok": not down, "down": down}
    lag, bound = daemon.lag.lag, daemon.config.server.max_loop_lag
    checks["loop_lag"] = {"ok": lag <= bound, "seconds": round(lag, 4), "bound": bound}
    checks["intake"] = {"ok": not daemon.stopping}
    # A daemon in safe mode runs no task: a load balancer should send work elsewhere.
    checks["safe_mode"] = ({"ok": True} if daemon.safe_mode is None
                           else {"ok": False, "reason": daemon.safe_mode.reason})
    ready = all(check["ok"] for check in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


@routes.get("/v1/status")
@doc("What the running daemon is doing: process, store, bus, handlers, tasks, loops and plugins; "
     "its node id and the daemons alive that share its store; safe mode (null, or why, since "
     "when and the crashed starts)",
     tag="system")
async def status(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return web.json_response({
        "version": __version__,
        "pid": os.getpid(),
        "config": daemon.config.source,
        "uptime": round(time.monotonic() - daemon.started_monotonic, 3),
        "stopping": daemon.stopping,
        "store": {**daemon.store.describe(),
                  **await daemon.store.stats(("tasks", "events", "schedules"))},
        "events": await daemon.eventlog.stats(),
        "bus": daemon.bus.stats(),
        "handlers": {"running": len(daemon.spawner), "failed": daemon.spawner.failed,
                     "dropped": daemon.spawner.dropped},
        "tasks": {"by_status": await daemon.queue.counts(), "running_here": len(daemon.workers.running),
                  "registered": daemon.registry.names()},
        # The daemons sharing the store whose heartbeat is at most a lease old (SQLite: this one).
        "node": daemon.queue.tasks.node_id,
        "daemons": await daemon.queue.tasks.live_nodes(daemon.config.tasks.lease),
        "loop_lag": round(daemon.lag.lag, 4),
        "loops": daemon.supervisor.describe(),
        "plugins": daemon.plugins.states(),
        "safe_mode": _safe_mode(daemon),
    })


_CLEARED = {
    "type": "object", "required": ["was_recorded", "safe_mode", "next_start"],
    "properties": {
        "was_recorded": {"type": "boolean", "description": "A safe mode was recorded for the "
                         "next start, and is now cleared"},
        "safe_mode": {"type": "boolean", "description": "This process serves in safe mode (until "
                      "it is restarted)"},
        "next_start": {"type": "string", "enum": ["normal"]},
    },
}


@routes.post("/v1/safe-mode/clear")
@doc("Clear safe mode and the record of crashed starts: the next start is a normal one. A daemon "
     "serving in safe mode stays in it until restarted", tag="system",
     responses={200: "Cleared (also when there was nothing to clear)"}, schemas={200: _CLEARED})
async def clear_safe_mode(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    previous = await daemon.clear_safe_mode()
    return web.json_response({"was_recorded": previous is not None,
                              "safe_mode": daemon.safe_mode is not None, "next_start": "normal"})


@routes.get("/v1/openapi.json")
@doc("This OpenAPI 3 document", tag="system", public=True)
async def openapi(request: web.Request) -> web.Response:
    rules = request.app[ACCESS]
    return web.json_response(build_document(request.app, __version__, bool(rules.token),
                                            bool(rules.token or rules.scrape_token)))
