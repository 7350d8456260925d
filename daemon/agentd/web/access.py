"""The access log: one `http.request` line per HTTP request once it is answered (a stream
or a WebSocket once it ends), with its method, route, path, status, duration, client and
request id; the request id also goes back in the `X-Request-Id` header.

A client may send its own `X-Request-Id` (a proxy's, to follow one request through both
logs): it is kept when it is 1 to 64 letters, digits, `.`, `_` or `-`, else replaced by one
of agentd's. The query string is never logged: it may carry a stream token. Probes
(`/healthz`, `/readyz`) and scrapes (`/metrics`), polled every few seconds, are logged at
debug level; `[log] access = false` turns the log off (the header stays).

The same middleware counts every request for `/metrics` (`HttpMetrics`), logged or not.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from agentd.log import get_logger
from agentd.metrics import HTTP_BUCKETS, Histograms

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
HEADER = "X-Request-Id"
# Polled by machines every few seconds: a line each would bury the rest.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# A client that went away before its answer was sent (nginx's code for it).
CLIENT_CLOSED = 499
_GIVEN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# The methods counted by name; any other is counted as "other" (a client may send any word).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_log = get_logger("http")


def request_id(given: str | None) -> str:
    """The id of a request: the client's `given` one if it is a plain token, else a new one."""
    if given is not None and _GIVEN_ID.fullmatch(given):
        return given
    return secrets.token_hex(8)


class HttpMetrics:
    """Every request answered, by method, route (its template, `/v1/tasks/{id}`; a
    path no route matched as `unmatched`) and status, and how long each took by method and
    route (a stream's or a WebSocket's whole life), for `/metrics`."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.seconds = Histograms(HTTP_BUCKETS)

    def count(self, request: web.Request, status: int, seconds: float) -> None:
        method = request.method if request.method in _METHODS else "other"
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        self.requests[method, route, str(status)] += 1
        self.seconds.observe((method, route), seconds)


def make_access_middleware(enabled: bool, metrics: HttpMetrics) -> Middleware:
    """The outermost middleware: it sees every request's final status, errors included;
    `enabled`: it logs them too."""

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[REQUEST_ID] = request_id(request.headers.get(HEADER))
        started = time.monotonic()
        status = 500  # an exception no middleware answered: aiohttp answers 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # a redirect or an answer aiohttp builds itself
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            seconds = time.monotonic() - started
            metrics.count(request, status, seconds)
            if enabled:
                _log_request(request, status, seconds)

    return access


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the header goes out with streamed responses too."""
    given = request.get(REQUEST_ID)
    if given is not None:
        response.headers[HEADER] = given


def _log_request(request: web.Request, status: int, seconds: float) -> None:
    resource = request.match_info.route.resource
    level = _log.debug if request.path in QUIET_PATHS and status < 500 else _log.info
    level("http.request", method=request.method, route=resource.canonical if resource else None,
          path=request.path, status=status, duration_ms=round(seconds * 1000, 2),
          client=request.remote, request_id=request[REQUEST_ID])
