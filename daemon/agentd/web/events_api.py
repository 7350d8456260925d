"""Publishing events over HTTP, inbound webhooks, and stream tokens for browsers."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from aiohttp import web

from agentd.events import check_publishable
from agentd.web.auth import STREAM_TOKENS
from agentd.web.errors import ApiError, read_body
from agentd.web.openapi import doc
from agentd.web.schemas import EventBody
from agentd.web.server import DAEMON

routes = web.RouteTableDef()

SIGNATURE_HEADERS = ("X-Agentd-Signature", "X-Hub-Signature-256")
_FORWARDED_HEADERS = ("Content-Type", "User-Agent", "X-GitHub-Event", "X-GitHub-Delivery")


@routes.post("/v1/events")
@doc("Publish an event; answered at once while handlers run fire-and-forget. Durable "
     "handlers' tasks are committed before the answer", tag="events",
     body=EventBody, responses={202: "Published: `id` and `topic`"})
async def publish(request: web.Request) -> web.Response:
    body = await read_body(request, EventBody)
    event = await request.app[DAEMON].publish_durably(check_publishable(body.topic), body.data)
    return web.json_response({"id": event.id, "topic": event.topic}, status=202)


@routes.post("/v1/stream-tokens")
@doc("A short-lived token a browser's EventSource or WebSocket passes as `?token=` on stream "
     "routes (they cannot send an Authorization header)", tag="streams",
     responses={201: "`token` and `expires_at` (Unix time)"})
async def stream_token(request: web.Request) -> web.Response:
    token, expires_at = request.app[STREAM_TOKENS].issue()
    return web.json_response({"token": token, "expires_at": expires_at}, status=201)


@routes.post("/hooks/{name}")
@doc("Inbound webhook: an HMAC-SHA256 of the raw body with the hook's secret, hex, in "
     "`X-Agentd-Signature: sha256=<hex>` (or GitHub's X-Hub-Signature-256); published as "
     "`hook.<name>`", tag="events", public=True,
     responses={202: "Published", 401: "Missing or bad signature: nothing published",
                404: "No hook of that name is configured"})
async def inbound_hook(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    name = request.match_info["name"]
    secret = daemon.config.hook_secret(name)
    if secret is None:
        raise ApiError(404, "unknown_hook", f"no hook named {name!r}; configure [hooks.{name}]")
    raw = await request.read()
    given = next((request.headers[h] for h in SIGNATURE_HEADERS if h in request.headers), "")
    expected = "sha256=" + hmac.new(secret, raw, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "bad_signature",
                       f"{SIGNATURE_HEADERS[0]} must be sha256=<hex HMAC-SHA256 of the body>")
    payload: Any
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = raw.decode(errors="replace")
    headers = {h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers}
    event = await daemon.publish_durably(f"hook.{name}", {"body": payload, "headers": headers})
    return web.json_response({"id": event.id, "topic": event.topic}, status=202)
