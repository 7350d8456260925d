"""The aiohttp application: its middlewares (access log, JSON errors, Host, origin, auth,
intake) and the listener."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import WSCloseCode, web
from aiohttp.typedefs import Middleware

from agentd.errors import AgentdError
from agentd.log import get_logger
from agentd.web.access import HttpMetrics, add_request_id, make_access_middleware
from agentd.web.auth import (
    ACCESS,
    STREAM_TOKENS,
    AccessRules,
    StreamTokens,
    make_auth_middleware,
    make_cors_signal,
    make_host_middleware,
    make_origin_middleware,
)
from agentd.web.errors import BODY_TIMEOUT, ApiError, error_response, from_agentd_error

if TYPE_CHECKING:
    from agentd.app import Daemon
    from agentd.bus import Subscription

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")
# The bus subscriptions of open SSE and WebSocket streams, and the open WebSockets:
# ended at shutdown so closing the server does not wait for them.
STREAMS: web.AppKey[set[Subscription]] = web.AppKey("streams")
SOCKETS: web.AppKey[set[web.WebSocketResponse]] = web.AppKey("sockets")
# Requests counted and timed by the access middleware, for /metrics.
HTTP_METRICS: web.AppKey[HttpMetrics] = web.AppKey("http_metrics", HttpMetrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_log = get_logger("http")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into `{"error": {"code", "message"}}` with the right status."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, **exc.details)
    except AgentdError as exc:
        api_error = from_agentd_error(exc)
        if api_error is None:
            raise
        return error_response(api_error.status, api_error.code, api_error.message)
    except web.RequestPayloadError as exc:  # the body could not be read: bad gzip, a broken chunk
        reason = getattr(exc.__cause__, "message", None) or str(exc)
        return error_response(400, "invalid_body", f"the request body cannot be read: {reason}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = (exc.reason or "error").lower().replace(" ", "_")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if isinstance(exc, web.HTTPNotFound):
            message = f"no route for {request.method} {request.path}"
        elif isinstance(exc, web.HTTPMethodNotAllowed):
            allowed = ", ".join(sorted(exc.allowed_methods))
            message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
        elif isinstance(exc, web.HTTPRequestEntityTooLarge):
            limit = request.app[DAEMON].config.server.max_body_bytes
            message = f"the request body is larger than {limit} bytes"
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return error_response(exc.status, code, message or code, headers=headers)
    except Exception:
        _log.exception("http.handler_failed", method=request.method, path=request.path)
        return error_response(500, "internal_error", "the server failed to handle this request")


@web.middleware
async def intake(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Once the daemon is stopping, refuse new work but keep answering reads and health."""
    if request.app[DAEMON].stopping and request.method not in ("GET", "HEAD"):
        raise ApiError(503, "stopping", "the daemon is stopping and takes no new work")
    return await handler(request)


def build_app(daemon: Daemon, *route_tables: web.RouteTableDef) -> web.Application:
    """The application with its middlewares: the access log around everything, JSON
    errors, then the Host check, the origin
    check (which answers CORS preflights), auth and intake, each only for what passed the
    ones before it; responses to listed origins carry CORS headers."""
    config = daemon.config
    stream_tokens = StreamTokens(config.streams)
    rules = AccessRules(config)  # what a reload changes (agentd/reload.py)
    http_metrics = HttpMetrics()
    middlewares: list[Middleware] = [
        make_access_middleware(config.log.access, http_metrics),
        json_errors,
        make_host_middleware(rules),
        make_origin_middleware(rules),
        make_auth_middleware(rules, stream_tokens),
        intake,
    ]
    app = web.Application(middlewares=middlewares, client_max_size=config.server.max_body_bytes)
    app[DAEMON] = daemon
    app[ACCESS] = rules
    app[HTTP_METRICS] = http_metrics
    app[STREAM_TOKENS] = stream_tokens
    app[BODY_TIMEOUT] = config.server.header_timeout
    app[STREAMS] = set()
    app[SOCKETS] = set()
    app.on_startup.append(load_stream_key)
    app.on_response_prepare.append(add_request_id)
    app.on_response_prepare.append(make_cors_signal(rules))
    app.on_shutdown.append(close_streams)
    for table in route_tables:
        app.add_routes(table)
    return app


async def load_stream_key(app: web.Application) -> None:
    """At startup: the stream tokens' signing key, from the database (made there once)."""
    await app[STREAM_TOKENS].load(app[DAEMON].storage.stream_key)


async def close_streams(app: web.Application) -> None:
    """At shutdown: end every stream, so closing the server need not wait for them."""
    streams: set[Subscription] = app[STREAMS]
    for sub in list(streams):
        sub.unsubscribe()
    sockets: set[web.WebSocketResponse] = app[SOCKETS]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"agentd is stopping")


class HttpServer:
    """Binds the application to host:port; `port` is the bound one (useful with port 0)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        # aiohttp's keep-alive timer is armed when a connection opens and again after each
        # response, and closes the connection if no whole request head came by then: with
        # `header_timeout` it bounds how long a half-sent request line or header holds a
        # socket (aiohttp's default is an hour), and how long an idle keep-alive lingers.
        header_timeout = app[DAEMON].config.server.header_timeout
        # access_log=None: agentd's own (agentd/web/access.py) replaces aiohttp's, which
        # logged the query string, stream tokens included.
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0,
                                     keepalive_timeout=header_timeout, access_log=None)
        self._host = host
        self._requested_port = port
        self.port = port

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._requested_port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        address = self._runner.addresses[0]
        self.port = int(address[1])

    async def close(self) -> None:
        await self._runner.cleanup()
