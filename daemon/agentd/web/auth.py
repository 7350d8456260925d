"""Who may call: the Host check, the Origin allowlist and CORS, the bearer token, and
stream tokens.

Host. With no token (the default) the API trusts whoever reaches loopback, so a page whose
name was rebound to 127.0.0.1 (DNS rebinding) must not be answered: its requests are
same-origin, carry no `Origin`, but do carry its name in `Host`. A request is served only
when its Host is a loopback name, the configured `[server] host`, or listed in
`[server] allowed_hosts` (421 otherwise), before anything else is looked at.

Origin and CORS. A request that carries an `Origin` header (a browser's) must come from an
origin in `[server] allowed_origins` or from a loopback origin (403 otherwise). Listed
origins, and only they, are granted CORS: preflights are answered without auth and every
response to them names the origin in `Access-Control-Allow-Origin`.

Stream tokens. Browsers' EventSource cannot send headers, so `POST /v1/stream-tokens` hands
out a token that stream routes, and only they, accept as `?token=`. It only reads (GET on a
stream route; on `/v1/ws` it subscribes but cannot publish, submit or cancel), optionally
for one route and one set of topics. It opens a stream within `[streams] token_ttl` seconds
of its issue and resumes one (a request with `Last-Event-ID`, as EventSource sends when it
reconnects) within `token_resume_ttl`. Its signing key is kept in the database, so tokens
outlive a restart; rotating the key revokes every token. The key is kept through a
`StreamKeyStore` (agentd/streamkey.py: `SqliteStreamKey`, or `agentd.postgres.streamkey.PgStreamKey`), where
the daemons sharing the database share the key, so a token from one opens a stream on any,
and a rotation on one is told to the others (they re-read the key).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from agentd.config import LOOPBACK_HOSTS, Config, StreamsConfig
from agentd.events import TopicFilter
from agentd.log import get_logger
from agentd.streamkey import StreamKeyStore
from agentd.web.errors import ApiError

if TYPE_CHECKING:
    pass

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_log = get_logger("auth")

# Set on a request the auth middleware let in with a stream token: it may only read.
READ_ONLY: web.RequestKey[bool] = web.RequestKey("read_only", bool)

@dataclass(frozen=True, slots=True)
class StreamGrant:
    """What a stream token allows: its issue time, and the route path and topics it is
    bound to (None: any stream route, any topics)."""

    issued: int
    path: str | None
    topics: str | None

    def to_dict(self, config: StreamsConfig) -> dict[str, Any]:
        return {"path": self.path, "topics": self.topics,
                "open_until": self.issued + config.token_ttl,
                "expires_at": self.issued + max(config.token_ttl, config.token_resume_ttl)}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StreamTokens:
    """Issues and checks `<payload>.<signature>` stream tokens (URL-safe base64), signed
    with HMAC-SHA256 by a key kept in the database's meta table."""

    def __init__(self, config: StreamsConfig) -> None:
        self.config = config
        self._key = b""
        self._rereading: asyncio.Task[None] | None = None
        self._reread_again = False

    async def load(self, store: StreamKeyStore) -> None:
        """Read the signing key, creating it on the database's first start; follow its
        replacements by other daemons from then on."""
        self._key = bytes.fromhex(await store.load(os.urandom(32).hex()))
        store.watch(partial(self._replaced_elsewhere, store))

    async def rotate(self, store: StreamKeyStore) -> None:
        """Replace the signing key: every token issued so far stops working."""
        fresh = os.urandom(32).hex()
        await store.replace(fresh)
        self._key = bytes.fromhex(fresh)

    def _replaced_elsewhere(self, store: StreamKeyStore) -> None:
        """Re-read the key, one read at a time (a replacement during a read reads again)."""
        if self._rereading is not None and not self._rereading.done():
            self._reread_again = True
            return
        self._rereading = asyncio.get_running_loop().create_task(self._reread(store),
                                                                 name="stream-key-reread")

    async def _reread(self, store: StreamKeyStore) -> None:
        while True:
            self._reread_again = False
            try:
                self._key = bytes.fromhex(await store.load(os.urandom(32).hex()))
            except Exception as exc:  # the store is away: its reconnect calls again
                _log.error("stream_tokens.reload_failed", error=f"{type(exc).__name__}: {exc}")
            if not self._reread_again:
                return

    def _sign(self, payload: str) -> bytes:
        if not self._key:
            raise RuntimeError("StreamTokens.load() has not run")
        # A payload from a request may hold undecodable bytes (as surrogates): kept as they came.
        message = f"stream:{payload}".encode("utf-8", "surrogateescape")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def issue(self, path: str | None = None, topics: str | None = None) -> tuple[str, StreamGrant]:
        grant = StreamGrant(int(time.time()), path, topics)
        payload = _b64(json.dumps([grant.issued, path, topics], separators=(",", ":")).encode())
        return f"{payload}.{_b64(self._sign(payload))}", grant

    def grant(self, token: str) -> StreamGrant | None:
        """The grant a token signed with the current key carries, or None."""
        payload, _, signature = token.rpartition(".")
        # Compared as text: base64 has several spellings of the same last bits, and a token
        # with a character changed must not still pass.
        expected = _b64(self._sign(payload)).encode()
        if not hmac.compare_digest(signature.encode("utf-8", "surrogateescape"), expected):
            return None
        try:
            issued, path, topics = json.loads(_unb64(payload))
        except (ValueError, TypeError, binascii.Error):
            return None
        if not (isinstance(issued, int) and isinstance(path, str | None) and isinstance(topics, str | None)):
            return None
        return StreamGrant(issued, path, topics)

    def refusal(self, token: str, request: web.Request) -> str | None:
        """Why `token` does not let `request` in, or None when it does."""
        grant = self.grant(token)
        if grant is None:
            return "the stream token is not valid here (forged, of another daemon, or revoked)"
        if request.method not in ("GET", "HEAD"):
            return "a stream token only reads (GET)"
        if grant.path is not None and request.path != grant.path:
            return f"the stream token was issued for {grant.path}, not {request.path}"
        if grant.topics is not None and _topics(request.query.get("topics")) != grant.topics:
            return f"the stream token was issued for topics={grant.topics}"
        now = time.time()
        if request.headers.get("Last-Event-ID"):
            if now < grant.issued + max(self.config.token_ttl, self.config.token_resume_ttl):
                return None
            return "the stream token is past [streams] token_resume_ttl: ask for another"
        if now < grant.issued + self.config.token_ttl:
            return None
        return ("the stream token is past [streams] token_ttl: it only resumes a stream now "
                "(with Last-Event-ID); ask for another to open one")


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


def _topics(raw: str | None) -> str:
    """Topic patterns as a stream route reads them, written one way (raises PatternError)."""
    return TopicFilter.parse(raw or "**").text


def stream_scope(app: web.Application, path: str | None, topics: str | None) -> tuple[str | None, str | None]:
    """Check what a token is asked for: `path` a stream route's path, `topics` (only with
    `/v1/stream`) its patterns; returns them as tokens hold them.

    Raises:
        ApiError: 400 naming what is wrong.
    """
    if path is not None and not any(
        r.method == "GET" and r.resource is not None and getattr(_doc(r.handler), "stream", False)
        and _resource_matches(r.resource, path) for r in app.router.routes()
    ):
        raise ApiError(400, "bad_request", f"'path' must be the path of a stream route "
                       f"(/v1/stream, /v1/tasks/<id>/stream, /v1/ws), got {path!r}")
    if topics is not None:
        if path != "/v1/stream":
            raise ApiError(400, "bad_request", "'topics' binds a token of path '/v1/stream' only")
        topics = _topics(topics)
    return path, topics


def _resource_matches(resource: web.AbstractResource, path: str) -> bool:
    info = resource.get_info()
    if "path" in info:
        return bool(info["path"] == path)
    pattern = info.get("pattern")
    return isinstance(pattern, re.Pattern) and pattern.fullmatch(path) is not None


def _doc(handler: Any) -> object:
    return getattr(handler, "__openapi__", None)


def _scheme_folded(authorization: bytes) -> bytes:
    """The header with its scheme in lower case: schemes are case-insensitive (RFC 9110
    11.1; `bearer` and `BEARER` are `Bearer`), the token after it is not."""
    scheme, space, rest = authorization.partition(b" ")
    return scheme.lower() + space + rest


class AccessRules:
    """Who may call, as `[server]` says now: the API token, the Host names and the origins
    allowed. The middlewares read it at each request, so a reload (`update`) applies to
    the next request; one under way keeps the rules it was let in by."""

    def __init__(self, config: Config) -> None:
        self.token = ""
        self.scrape_token = ""
        self.hosts: frozenset[str] = frozenset()
        self.origins: frozenset[str] = frozenset()
        self.update(config)

    def update(self, config: Config) -> None:
        """Take `[server] token`/`token_file` and `[metrics] token`/`token_file` (as read
        into the secrets), `host`, `allowed_hosts` and `allowed_origins` from `config`."""
        server = config.server
        self.token = config.secrets.api_token
        self.scrape_token = config.secrets.metrics_token
        self.hosts = frozenset(name.strip("[]").rstrip(".").lower()
                               for name in (server.host, *server.allowed_hosts))
        self.origins = listed_origins(server.allowed_origins)

    @property
    def expected(self) -> bytes:
        """The Authorization header that carries the token, its scheme folded."""
        return f"bearer {self.token}".encode()


ACCESS: web.AppKey[AccessRules] = web.AppKey("access", AccessRules)


def make_auth_middleware(rules: AccessRules, stream_tokens: StreamTokens) -> Middleware:
    """While a token is configured, require `Authorization: Bearer <token>` on every route
    not documented as public; stream routes also take `?token=<stream token>`, which only
    reads, and the scrape route (`/metrics`) also takes `[metrics] token` as its bearer
    token. With neither, let everything through (the Host and Origin checks stand); with
    only the metrics token, only the scrape route is guarded, by it."""

    @web.middleware
    async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not rules.token and not rules.scrape_token:
            return await handler(request)
        expected = rules.expected if rules.token else None
        scrape_expected = f"bearer {rules.scrape_token}".encode() if rules.scrape_token else None
        route_doc = _doc(request.match_info.route.handler)
        # aiohttp decodes header bytes with surrogateescape: encode them back the same way.
        given = _scheme_folded(request.headers.get("Authorization", "").encode("utf-8", "surrogateescape"))
        if route_doc is not None and getattr(route_doc, "public", False):
            if expected is not None:
                request[_TOKEN_GIVEN] = hmac.compare_digest(given, expected)
            return await handler(request)
        if expected is not None and hmac.compare_digest(given, expected):
            return await handler(request)
        scrape = bool(getattr(route_doc, "scrape", False))
        if scrape and scrape_expected is not None and hmac.compare_digest(given, scrape_expected):
            return await handler(request)
        if expected is None and not scrape:
            return await handler(request)
        stream = bool(getattr(route_doc, "stream", False))
        query_token = request.query.get("token")
        why = "a valid 'Authorization: Bearer <token>' is required"
        if scrape and scrape_expected is not None:
            why += " (the [metrics] token" + (" or the API token)" if expected is not None else ")")
        if stream:
            why += " (or ?token= from POST /v1/stream-tokens)"
            if query_token:
                refusal = stream_tokens.refusal(query_token, request)
                if refusal is None:
                    request[READ_ONLY] = True
                    return await handler(request)
                why = refusal
        raise web.HTTPUnauthorized(text=why, headers={"WWW-Authenticate": 'Bearer realm="agentd"'})

    return bearer_auth


# --------------------------------------------------------------------------- Host

_HOST = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[^\[\]:@/\\\s]+)(?::(?P<port>[0-9]{1,5}))?")


def host_name(header: str) -> str | None:
    """The name a Host header gives (lower case, without brackets, port or final dot), or
    None when it is not one."""
    match = _HOST.fullmatch(header)
    if match is None:
        return None
    return match["name"].strip("[]").rstrip(".").lower() or None


def host_allowed(name: str, allowed: frozenset[str]) -> bool:
    """True for `localhost`, a loopback address, or a name in `allowed` ("*": any)."""
    if name == "localhost" or name in allowed or "*" in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def make_host_middleware(rules: AccessRules) -> Middleware:
    """Refuse (421) a request whose Host header is not a name this daemon answers to."""

    @web.middleware
    async def check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
        # No Host at all is no browser's request (they always send it): not a rebinding.
        header = request.headers.get("Host")
        if header is not None:
            name = host_name(header)
            if name is None or not host_allowed(name, rules.hosts):
                raise ApiError(421, "host_not_allowed",
                               f"this daemon does not answer to Host {header!r}; add the name to "
                               "[server] allowed_hosts if it should")
        return await handler(request)

    return check_host


# --------------------------------------------------------------------------- Origin, CORS

CORS_MAX_AGE = 600  # seconds a browser may keep a preflight's answer (Chromium caps it at 7200)
_CORS_METHODS = "GET, POST, PATCH, DELETE"
_CORS_HEADERS = "Authorization, Content-Type, Last-Event-ID"


def origin_allowed(origin: str, allowed: frozenset[str]) -> bool:
    """True for an origin in `allowed` (exact, or "*") or one whose host is loopback."""
    if cors_granted(origin, allowed):
        return True
    try:
        host = urlsplit(origin).hostname
    except ValueError:  # e.g. "http://[::1": no origin at all
        return False
    return host is not None and host in LOOPBACK_HOSTS


def cors_granted(origin: str, allowed: frozenset[str]) -> bool:
    """True for an origin listed in `[server] allowed_origins` (`allowed`: as
    `listed_origins` gives them) or when "*" is listed."""
    return "*" in allowed or origin.rstrip("/") in allowed


def listed_origins(allowed_origins: tuple[str, ...]) -> frozenset[str]:
    """`[server] allowed_origins` as `cors_granted` compares them, made once."""
    return frozenset(origin.rstrip("/") for origin in allowed_origins)


def make_origin_middleware(rules: AccessRules) -> Middleware:
    """Refuse a browser request (it has an Origin header) from an origin not allowed, and
    answer the CORS preflights of listed origins (before auth: preflights carry no token)."""

    @web.middleware
    async def check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        allowed = rules.origins
        if not origin_allowed(origin, allowed):
            raise ApiError(403, "origin_not_allowed",
                           f"origin {origin!r} is not allowed; add it to [server] allowed_origins")
        if (request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
                and cors_granted(origin, allowed)):
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": _CORS_METHODS,
                "Access-Control-Allow-Headers": _CORS_HEADERS,
                "Access-Control-Max-Age": str(CORS_MAX_AGE),
            })
        return await handler(request)

    return check_origin


ResponseSignal = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def make_cors_signal(rules: AccessRules) -> ResponseSignal:
    """An `on_response_prepare` handler naming a listed origin in every response to it,
    errors and streams included (a page must be able to read a 401 too). The origin is
    echoed, never `*`, and no credentials (cookies) are allowed: the API has none. While
    no origin is listed it adds nothing."""

    async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        allowed = rules.origins
        if not allowed:
            return
        origin = request.headers.get("Origin")
        response.headers.add("Vary", "Origin")
        if origin is not None and cors_granted(origin, allowed):
            response.headers["Access-Control-Allow-Origin"] = origin

    return add_cors_headers
