"""Publishing events over HTTP, inbound webhooks, and stream tokens for browsers."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from agentd.events import check_publishable
from agentd.hooks import HookSignatureError, ReplayedDeliveryError
from agentd.web.auth import STREAM_TOKENS, stream_scope
from agentd.web.errors import ApiError, read_body, read_whole_body
from agentd.web.openapi import doc
from agentd.web.schemas import MAX_DEPTH, EventBody, StreamTokenBody, StreamTokenItem
from agentd.web.server import DAEMON

routes = web.RouteTableDef()

_FORWARDED_HEADERS = ("Content-Type", "User-Agent", "X-GitHub-Event", "X-GitHub-Delivery", "webhook-id")


@routes.post("/v1/events")
@doc("Publish an event; answered at once while handlers run fire-and-forget. Durable "
     "handlers' tasks are committed before the answer", tag="events",
     body=EventBody, responses={202: "Published: `id` and `topic`"})
async def publish(request: web.Request) -> web.Response:
    body = await read_body(request, EventBody)
    daemon = request.app[DAEMON]
    event = await daemon.publish_durably(check_publishable(body.topic), body.data)
    # The id streams show it with (on PostgreSQL the log's, given at commit).
    return web.json_response({"id": daemon.eventlog.stream_id(event), "topic": event.topic}, status=202)


@routes.post("/v1/stream-tokens")
@doc("A token a browser's EventSource or WebSocket passes as `?token=` on stream routes (they "
     "cannot send an Authorization header). It only reads: GET on stream routes, and on /v1/ws "
     "subscribe, unsubscribe, result and ping. It opens a stream until `open_until` ([streams] "
     "token_ttl) and resumes one (a request with Last-Event-ID) until `expires_at` "
     "([streams] token_resume_ttl). The body is optional: `path` binds the token to one stream "
     "route, `topics` (with path /v1/stream) to one `topics` value", tag="streams",
     body=StreamTokenItem, optional_body=True,
     responses={201: "`token`, `open_until`, `expires_at` (Unix times), `path`, `topics`",
                400: "A path that is no stream route, or bad topics"})
async def stream_token(request: web.Request) -> web.Response:
    body = await read_body(request, StreamTokenBody, optional=True)
    tokens = request.app[STREAM_TOKENS]
    token, grant = tokens.issue(*stream_scope(request.app, body.path, body.topics))
    return web.json_response({"token": token, **grant.to_dict(tokens.config)}, status=201)


@routes.delete("/v1/stream-tokens")
@doc("Revoke every stream token: the signing key is replaced. Streams already open go on "
     "until they end; none opens or resumes with an older token", tag="streams",
     responses={204: "Revoked"})
async def revoke_stream_tokens(request: web.Request) -> web.Response:
    await request.app[STREAM_TOKENS].rotate(request.app[DAEMON].storage.stream_key)
    return web.Response(status=204)


@routes.post("/hooks/{name}")
@doc("Inbound webhook, signed by Standard Webhooks: `webhook-id`, `webhook-timestamp` (Unix "
     "seconds, within `[hooks] tolerance`) and `webhook-signature: v1,<base64 HMAC-SHA256 of "
     "\"{id}.{timestamp}.{body}\">`; GitHub's `X-Hub-Signature-256` or `X-Agentd-Signature` "
     "only where the hook lists them. Published as `hook.<name>`", tag="events", public=True,
     responses={202: "Published", 401: "Missing, bad or stale signature: nothing published",
                404: "No hook of that name is configured",
                408: "The body did not arrive within [server] header_timeout of the head",
                409: "A delivery id this hook has taken already: nothing published"})
async def inbound_hook(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    name = request.match_info["name"]
    hook = daemon.hooks.get(name)
    if hook is None:
        raise ApiError(404, "unknown_hook", f"no hook named {name!r}; configure [hooks.{name}]")
    raw = await read_whole_body(request)
    try:
        delivery = hook.verify(request.headers, raw, time.time())
    except HookSignatureError as exc:
        raise ApiError(401, exc.code, str(exc)) from None
    payload = _hook_body(raw)
    headers = {h: _text(request.headers[h]) for h in _FORWARDED_HEADERS if h in request.headers}
    try:
        async with daemon.hooks.taking(name, delivery) as take:
            event = await daemon.publish_durably(f"hook.{name}", {"body": payload, "headers": headers},
                                                 alongside=take)
    except ReplayedDeliveryError as exc:
        raise ApiError(409, "duplicate_delivery", str(exc)) from None
    return web.json_response({"id": daemon.eventlog.stream_id(event), "topic": event.topic}, status=202)


def _hook_body(raw: bytes) -> Any:
    """A hook's body as published: its JSON, or its text when it is not JSON or nests
    deeper than the API's JSON values may (`MAX_DEPTH`): a much deeper value fails to decode
    or to encode again wherever the event goes (Python's recursion limit)."""
    if not raw:
        return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return raw.decode(errors="replace")
    return body if _nests_within(body, MAX_DEPTH) else raw.decode(errors="replace")


def _nests_within(value: Any, limit: int) -> bool:
    """Whether JSON `value` nests at most `limit` arrays or objects deep."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


def _text(header: str) -> str:
    """A header value as text: aiohttp keeps the bytes of a value that is not UTF-8 as lone
    surrogates (not text a client can take); they become U+FFFD, as in a body kept as text."""
    return header.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
