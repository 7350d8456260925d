"""The aiohttp application: middlewares (JSON errors, bearer auth, intake) and the listener."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Middleware

from agentd.errors import AgentdError
from agentd.log import get_logger
from agentd.web.errors import ApiError, error_response, from_agentd_error

if TYPE_CHECKING:
    from agentd.app import Daemon

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")

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


def _is_public(request: web.Request) -> bool:
    route_doc = getattr(request.match_info.route.handler, "__openapi__", None)
    return bool(route_doc is not None and route_doc.public)


def make_auth_middleware(token: str) -> Middleware:
    """Require `Authorization: Bearer <token>` on every route not documented as public."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not _is_public(request):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise web.HTTPUnauthorized(
                    text="a valid 'Authorization: Bearer <token>' is required",
                    headers={"WWW-Authenticate": 'Bearer realm="agentd"'},
                )
        return await handler(request)

    return bearer_auth


@web.middleware
async def intake(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Once the daemon is stopping, refuse new work but keep answering reads and health."""
    if request.app[DAEMON].stopping and request.method not in ("GET", "HEAD"):
        raise ApiError(503, "stopping", "the daemon is stopping and takes no new work")
    return await handler(request)


def build_app(daemon: Daemon, *route_tables: web.RouteTableDef) -> web.Application:
    token = daemon.config.api_token()
    middlewares: list[Middleware] = [json_errors]
    if token:
        middlewares.append(make_auth_middleware(token))
    middlewares.append(intake)
    app = web.Application(middlewares=middlewares, client_max_size=daemon.config.server.max_body_bytes)
    app[DAEMON] = daemon
    for table in route_tables:
        app.add_routes(table)
    return app


class HttpServer:
    """Binds the application to host:port; `port` is the bound one (useful with port 0)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=5.0)
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
