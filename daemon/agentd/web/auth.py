"""Who may call: the bearer token, short-lived stream tokens, and the Origin allowlist.

Browsers' EventSource cannot send headers, so `POST /v1/stream-tokens` hands out a token
(valid `[streams] token_ttl` seconds, signed with a key that lives as long as the process)
that stream routes, and only they, accept as `?token=`.

A request that carries an `Origin` header (a browser's) must come from an origin in
`[server] allowed_origins` or from a loopback origin: a page on another site cannot use
the API through the user's browser, even after its name was rebound to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from agentd.config import LOOPBACK_HOSTS
from agentd.web.errors import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StreamTokens:
    """Issues and checks `<expiry>.<signature>` tokens for stream routes."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._key = os.urandom(32)

    def _sign(self, expiry: str) -> str:
        return hmac.new(self._key, f"stream:{expiry}".encode(), hashlib.sha256).hexdigest()

    def issue(self) -> tuple[str, float]:
        expiry = int(time.time() + self.ttl)
        return f"{expiry}.{self._sign(str(expiry))}", float(expiry)

    def valid(self, token: str) -> bool:
        expiry, _, signature = token.partition(".")
        if not (expiry.isascii() and expiry.isdigit()):
            return False
        if not hmac.compare_digest(signature, self._sign(expiry)):
            return False
        return int(expiry) > time.time()


STREAM_TOKENS: web.AppKey[StreamTokens] = web.AppKey("stream_tokens", StreamTokens)


# Set on a public route's request when a token is configured: whether the caller gave it.
# Public routes show details (plugin files, errors) only to such a caller.
_TOKEN_GIVEN: web.RequestKey[bool] = web.RequestKey("token_given", bool)


def may_see_details(request: web.Request) -> bool:
    """True when the caller gave the bearer token, or when none is configured (then the
    daemon listens on loopback only, and browsers' pages are kept out by the Host and
    Origin checks)."""
    given: bool = request.get(_TOKEN_GIVEN, True)
    return given


def _route_doc(request: web.Request) -> object:
    return getattr(request.match_info.route.handler, "__openapi__", None)


def make_auth_middleware(token: str, stream_tokens: StreamTokens) -> Middleware:
    """Require `Authorization: Bearer <token>` on every route not documented as public;
    stream routes also take `?token=<stream token>`."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        route_doc = _route_doc(request)
        given = request.headers.get("Authorization", "").encode()
        if route_doc is not None and getattr(route_doc, "public", False):
            request[_TOKEN_GIVEN] = hmac.compare_digest(given, expected)
            return await handler(request)
        if hmac.compare_digest(given, expected):
            return await handler(request)
        query_token = request.query.get("token")
        if query_token and getattr(route_doc, "stream", False) and stream_tokens.valid(query_token):
            return await handler(request)
        raise web.HTTPUnauthorized(
            text="a valid 'Authorization: Bearer <token>' is required"
            + (" (or ?token= from POST /v1/stream-tokens)" if getattr(route_doc, "stream", False) else ""),
            headers={"WWW-Authenticate": 'Bearer realm="agentd"'},
        )

    return bearer_auth


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """True for an origin in `allowed` (exact, or "*") or one whose host is loopback."""
    if "*" in allowed or origin.rstrip("/") in {a.rstrip("/") for a in allowed}:
        return True
    host = urlsplit(origin).hostname
    return host is not None and host in LOOPBACK_HOSTS


def make_origin_middleware(allowed: tuple[str, ...]) -> Middleware:
    """Refuse a browser request (it has an Origin header) from an origin not allowed."""

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, allowed):
            raise ApiError(403, "origin_not_allowed",
                           f"origin {origin!r} is not allowed; add it to [server] allowed_origins")
        return await handler(request)

    return check_origin
