"""Webhooks in and out: the signature schemes, inbound `/hooks/<name>` verification with
replay refusal, and outgoing delivery (`ctx.webhook.post`) to checked addresses only.

Signatures. The scheme is Standard Webhooks (standardwebhooks.com): the headers
`webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64>`, the
HMAC-SHA256 of `{id}.{timestamp}.{body}`. A secret written `whsec_<base64>` (as Standard
Webhooks libraries make them) signs with its decoded bytes; any other secret with its
UTF-8 bytes, so `openssl dgst -hmac "$SECRET"` makes the same signature. Two older schemes
sign the body alone, hex, with the secret's text: GitHub's `X-Hub-Signature-256:
sha256=<hex>` and agentd's own `X-Agentd-Signature: sha256=<hex>`. Having no timestamp,
a hook takes them only when its configuration lists them, and refuses a repeat of their
delivery header (`X-GitHub-Delivery`, `X-Agentd-Delivery`), which nothing signs.

Outgoing. `ctx.webhook.post(url, json)` enqueues the durable task `agentd.post_webhook`.
Each attempt carries `webhook-id` (the same on every attempt), a fresh `webhook-timestamp`
and its `webhook-signature` under `[webhooks] secret`, plus `X-Agentd-Signature`,
`X-Agentd-Delivery: <task id>` and `Idempotency-Key` as before. 2xx is delivered; 408,
425, 429 and 5xx are retried (after `Retry-After` seconds when the receiver says); any
other answer fails the task. Before connecting, the host's addresses are resolved and
checked: loopback, private, link-local, shared (CGNAT), multicast, reserved and cloud
metadata addresses are refused unless `[webhooks] allow_networks` lists them; the
connection goes to the checked address only, and redirects are not followed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from agentd.config import Config, WebhooksConfig
from agentd.errors import AgentdError, ConfigError, Fail, InvalidTaskError, Retry
from agentd.log import get_logger
from agentd.taskdef import TaskDef, TaskRegistry
from agentd.taskqueue import Enqueue, TaskRecord

if TYPE_CHECKING:
    from aiohappyeyeballs import AddrInfoType

    from agentd.context import Context
    from agentd.db import Connection, Store

POST_WEBHOOK_TASK = "agentd.post_webhook"
SIGNATURE_HEADER = "X-Agentd-Signature"
DELIVERY_HEADER = "X-Agentd-Delivery"
_RETRY_STATUSES = frozenset({408, 425, 429})
_SECRET_PREFIX = "whsec_"
# A delivery id is kept as text and signed as ASCII: printable, no spaces, bounded.
_DELIVERY_ID = re.compile(r"[\x21-\x7e]{1,256}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")

_log = get_logger("webhooks")


# --------------------------------------------------------------------------- signatures


def signing_key(secret: str) -> bytes:
    """The Standard Webhooks HMAC key of `secret`: the decoded bytes of `whsec_<base64>`,
    else the secret's UTF-8 bytes.

    Raises:
        ValueError: a `whsec_` secret whose rest is not base64.
    """
    if not secret.startswith(_SECRET_PREFIX):
        return secret.encode()
    try:
        key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX), validate=True)
    except binascii.Error:
        key = b""
    if not key:
        raise ValueError("a secret starting whsec_ must go on with its key in base64")
    return key


def standard_signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.digest(key, signed, hashlib.sha256)).decode()


def sign(secret: bytes, body: bytes) -> str:
    """The hex schemes' header value for `body`: `sha256=<hex HMAC-SHA256>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _header_bytes(value: str) -> bytes:
    # aiohttp decodes header bytes with surrogateescape: a plain encode() raises on them.
    return value.encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- inbound


class HookSignatureError(AgentdError):
    """An inbound hook request is not signed as its hook requires (answered 401).

    `code` is `bad_signature` or `stale_timestamp`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ReplayedDeliveryError(AgentdError):
    """An inbound hook request repeats a delivery id the hook has already taken (409)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A verified inbound request: its delivery id, and until when a repeat of it must be
    refused (past then its signature no longer passes, or the replay window is over)."""

    id: str
    refuse_repeats_until: float


@dataclass(frozen=True, slots=True)
class _HexScheme:
    signature_header: str
    delivery_header: str


_HEX_SCHEMES = {"github": _HexScheme("X-Hub-Signature-256", "X-GitHub-Delivery"),
                "agentd": _HexScheme(SIGNATURE_HEADER, DELIVERY_HEADER)}
_STANDARD_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


@dataclass(frozen=True, slots=True)
class InboundHook:
    """One `[hooks.<name>]`: its secret, the schemes it takes and their windows."""

    name: str
    secret: str
    schemes: tuple[str, ...]
    tolerance: float
    replay_window: float

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """Check the request's signature by the first scheme whose signature header it
        carries; return its delivery.

        Raises:
            HookSignatureError: no signature, one this hook does not take, a wrong one, a
                missing delivery id, or a timestamp outside `tolerance`.
        """
        if "webhook-signature" in headers:
            scheme = "standard"
        else:
            scheme = next((name for name, hex_scheme in _HEX_SCHEMES.items()
                           if hex_scheme.signature_header in headers), "")
        if scheme not in self.schemes:
            given = f"not {_describe((scheme,))}" if scheme else "and this request carries no signature"
            raise HookSignatureError("bad_signature", f"hook {self.name!r} takes requests signed "
                                     f"by {_describe(self.schemes)}, {given}")
        if scheme == "standard":
            return self._verify_standard(headers, body, now)
        return self._verify_hex(_HEX_SCHEMES[scheme], headers, body, now)

    def _verify_standard(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        webhook_id, stamp, signatures = (headers.get(name, "") for name in _STANDARD_HEADERS)
        if not _DELIVERY_ID.fullmatch(webhook_id):
            raise HookSignatureError("bad_signature", "webhook-id: expected 1 to 256 printable "
                                     "ASCII characters (the message's id)")
        if not _TIMESTAMP.fullmatch(stamp):
            raise HookSignatureError("bad_signature", "webhook-timestamp: expected whole seconds "
                                     "since the Unix epoch")
        timestamp = int(stamp)
        if abs(now - timestamp) > self.tolerance:
            raise HookSignatureError("stale_timestamp", f"webhook-timestamp {timestamp} is "
                                     f"{now - timestamp:+.0f} s from this server's clock; "
                                     f"hook {self.name!r} takes at most {self.tolerance:g} s either way")
        expected = _header_bytes(standard_signature(signing_key(self.secret), webhook_id, timestamp, body))
        if not any(hmac.compare_digest(_header_bytes(given), expected)
                   for given in signatures.split() if given.startswith("v1,")):
            raise HookSignatureError("bad_signature", "webhook-signature: expected v1,<base64 "
                                     "HMAC-SHA256 of \"{webhook-id}.{webhook-timestamp}.{body}\">")
        return Delivery(webhook_id, timestamp + self.tolerance)

    def _verify_hex(self, scheme: _HexScheme, headers: Mapping[str, str], body: bytes,
                    now: float) -> Delivery:
        expected = _header_bytes(sign(self.secret.encode(), body))
        if not hmac.compare_digest(_header_bytes(headers[scheme.signature_header]), expected):
            raise HookSignatureError("bad_signature", f"{scheme.signature_header}: expected "
                                     "sha256=<hex HMAC-SHA256 of the body>")
        delivery_id = headers.get(scheme.delivery_header, "")
        if not _DELIVERY_ID.fullmatch(delivery_id):
            raise HookSignatureError("bad_signature", f"{scheme.delivery_header}: expected the "
                                     "delivery's id (1 to 256 printable ASCII characters)")
        return Delivery(delivery_id, now + self.replay_window)


def _describe(schemes: tuple[str, ...]) -> str:
    names = {"standard": "Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature)",
             **{name: f"{scheme.signature_header} with {scheme.delivery_header}"
                for name, scheme in _HEX_SCHEMES.items()}}
    return " or ".join(names[scheme] for scheme in schemes)


class InboundHooks:
    """The configured inbound hooks, their secrets read once, and the delivery ids each has
    taken: kept in the database (table `hook_deliveries`), so a restart forgets none."""

    def __init__(self, hooks: Mapping[str, InboundHook], store: Store) -> None:
        self._hooks = dict(hooks)
        self._store = store
        self._in_flight: set[tuple[str, str]] = set()

    @classmethod
    def from_config(cls, config: Config, store: Store) -> InboundHooks:
        """Build the hooks, reading their secrets now.

        Raises:
            ConfigError: a secret file or variable cannot be read, or a `whsec_` secret is
                not base64, naming the hook.
        """
        hooks = {}
        for name, table in config.hooks.settings.items():
            secret = config.secret(f"hooks.{name}", table, "secret")
            try:
                signing_key(secret)
            except ValueError as exc:
                raise ConfigError(f"{config.source}: [hooks.{name}] secret: {exc}") from None
            hooks[name] = InboundHook(
                name=name, secret=secret, schemes=tuple(table.get("schemes", ("standard",))),
                tolerance=float(table.get("tolerance", config.hooks.tolerance)),
                replay_window=config.hooks.replay_window)
        return cls(hooks, store)

    def get(self, name: str) -> InboundHook | None:
        return self._hooks.get(name)

    @asynccontextmanager
    async def taking(self, hook: str, delivery: Delivery) -> AsyncIterator[None]:
        """Hold `delivery` of `hook` while the block publishes it; record it once the block
        is done. A delivery recorded before, or held by a request in flight, is refused.

        The id is recorded after the block, not before: a crash between the two lets the
        sender's retry through again (a repeat), where the other order would refuse it
        and lose the event.

        Raises:
            ReplayedDeliveryError: the id was taken (or is being taken) already.
        """
        key = (hook, delivery.id)
        seen = await self._store.read_one(
            "SELECT 1 FROM hook_deliveries WHERE hook = ? AND delivery_id = ? AND refuse_until >= ?",
            (*key, time.time()))
        if seen is not None or key in self._in_flight:
            raise ReplayedDeliveryError(f"hook {hook!r} has already taken delivery {delivery.id!r}")
        self._in_flight.add(key)
        try:
            yield
            now = time.time()

            def record(conn: Connection) -> None:
                conn.execute("DELETE FROM hook_deliveries WHERE refuse_until < ?", (now,))
                conn.execute("INSERT OR REPLACE INTO hook_deliveries (hook, delivery_id, refuse_until) "
                             "VALUES (?, ?, ?)", (*key, delivery.refuse_repeats_until))

            await self._store.write(record)
        finally:
            self._in_flight.discard(key)


# --------------------------------------------------------------------------- addresses

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(*pairs: tuple[str, str]) -> tuple[tuple[Network, str], ...]:
    return tuple((ipaddress.ip_network(network), name) for network, name in pairs)


# What a webhook may not reach unless allowed, first match named. Cloud metadata services
# come first: most lie inside a wider range, and their name says more.
_REFUSED = _networks(
    ("169.254.169.254/32", "cloud metadata"), ("169.254.170.2/32", "cloud metadata"),
    ("168.63.129.16/32", "cloud metadata"), ("100.100.100.200/32", "cloud metadata"),
    ("192.0.0.192/32", "cloud metadata"), ("fd00:ec2::254/128", "cloud metadata"),
    ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private"), ("100.64.0.0/10", "shared (CGNAT)"),
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"), ("192.0.2.0/24", "documentation"), ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"), ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"), ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("fc00::/7", "private (unique local)"),
    ("fe80::/10", "link-local"), ("fec0::/10", "site-local"), ("ff00::/8", "multicast"),
    ("64:ff9b:1::/48", "private (local NAT64)"), ("2001::/32", "Teredo"),
    ("2001:db8::/32", "documentation"),
)
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one leads to: mapped (::ffff:a.b.c.d), 6to4 or NAT64."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal_reason(address: Address, allowed: tuple[Network, ...] = ()) -> str | None:
    """Why a webhook may not go to `address` ("loopback", "private", "cloud metadata"...),
    or None when it may: a global unicast address, or one inside a network of `allowed`.
    An IPv6 address that leads to an IPv4 one (mapped, 6to4, NAT64) is judged by it."""
    if any(address in network for network in allowed):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return refusal_reason(embedded, allowed)
    reason = next((name for network, name in _REFUSED if address in network), None)
    if reason is None and isinstance(address, ipaddress.IPv6Address) and address not in _GLOBAL_UNICAST_V6:
        reason = "reserved"
    return reason


class AddressRefusedError(OSError):
    """A webhook's host is (or resolves to) an address it may not reach.

    An OSError, as aiohttp expects of resolvers and socket factories: it comes back as the
    `os_error` of the ClientConnectorError the request raises."""


class _AddressGuard(AbstractResolver):
    """Resolves a webhook's host and refuses it when any of its addresses is refused: the
    connector then connects to exactly the addresses checked (no second lookup a DNS
    rebind could answer differently). Its `socket` checks each address again as it is
    connected to, which covers URLs that name an IP address (never resolved)."""

    def __init__(self, allowed: tuple[Network, ...]) -> None:
        self._allowed = allowed
        self._resolver = aiohttp.ThreadedResolver()

    def check(self, host: str, name: str | None = None) -> None:
        """Raise AddressRefusedError if `host` (an IP address, which `name` resolved to
        when given) is refused."""
        address = ipaddress.ip_address(host.partition("%")[0])  # a link-local scope is not part of it
        reason = refusal_reason(address, self._allowed)
        if reason is not None:
            embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
            shown = f"{address} (that is {embedded})" if embedded else str(address)
            where = f"{name} resolves to {shown}" if name else shown
            article = "an" if reason[0] in "aeiou" else "a"
            raise AddressRefusedError(f"{where}, {article} {reason} address: webhooks go there only "
                                      "if [webhooks] allow_networks lists it")

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            self.check(result["host"], host)
        return results

    def socket(self, addr_info: AddrInfoType) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        self.check(str(sockaddr[0]))
        return socket.socket(family, kind, proto)

    async def close(self) -> None:
        await self._resolver.close()


# --------------------------------------------------------------------------- outgoing


class WebhookPoster:
    """Delivers webhooks: the `agentd.post_webhook` task and its HTTP session."""

    def __init__(self, config: WebhooksConfig, secret: str) -> None:
        self.config = config
        self._secret = secret
        self._key = signing_key(secret)
        self._allowed = tuple(ipaddress.ip_network(n, strict=False) for n in config.allow_networks)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, config: Config) -> WebhookPoster:
        """The poster of `[webhooks]`, its secret read now.

        Raises:
            ConfigError: the secret file cannot be read, or a `whsec_` secret is not base64.
        """
        secret = config.secret("webhooks", config.webhooks, "secret")
        try:
            return cls(config.webhooks, secret)
        except ValueError as exc:
            raise ConfigError(f"{config.origin('webhooks', 'secret')}: [webhooks] secret: {exc}") from None

    def register(self, registry: TaskRegistry, queue: str) -> None:
        registry.add(TaskDef(name=POST_WEBHOOK_TASK, fn=self._deliver_task, queue=queue, max_attempts=8))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _deliver_task(self, ctx: Context, url: str, body: Any,
                            webhook_id: str | None = None) -> dict[str, Any]:
        check_url(url)  # submitted by hand it may be unchecked
        # A delivery enqueued without an id (by ctx.submit) takes one from its task.
        return await self.deliver(url, body, ctx.task.id, webhook_id or f"msg_agentd_{ctx.task.id}")

    async def deliver(self, url: str, body: Any, delivery_id: int, webhook_id: str) -> dict[str, Any]:
        """POST `body` as JSON to `url` once; return the receiver's status.

        Raises:
            Retry: 408/425/429 and 5xx (after Retry-After when given, else the backoff).
            Fail: another 4xx, a 3xx (the receiver will not take it), or a refused address
                (logged as `webhook.refused`; no connection was made).
            aiohttp.ClientError, TimeoutError: worth another attempt.
        """
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: str(delivery_id),
                   "Idempotency-Key": f"agentd-webhook-{delivery_id}",
                   "User-Agent": "agentd-webhook", "webhook-id": webhook_id,
                   "webhook-timestamp": str(timestamp)}
        if self._secret:
            headers["webhook-signature"] = standard_signature(self._key, webhook_id, timestamp, payload)
            headers[SIGNATURE_HEADER] = sign(self._secret.encode(), payload)
        try:
            async with self._client().post(url, data=payload, headers=headers,
                                           allow_redirects=False) as response:
                status = response.status
                if 200 <= status < 300:
                    return {"status": status, "url": url}
                detail = f"{url} answered {status}: {(await response.text())[:300]}"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefusedError):
                _log.warning("webhook.refused", url=url, delivery_id=delivery_id, reason=str(exc.os_error))
                raise Fail(f"{url}: refused: {exc.os_error}") from None
            raise
        if status in _RETRY_STATUSES or status >= 500:
            raise Retry.after(response.headers.get("Retry-After"), detail)
        raise Fail(detail)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            guard = _AddressGuard(self._allowed)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=guard, socket_factory=guard.socket),
                timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        return self._session


class WebhookSender:
    """`ctx.webhook` (in tasks) and `PluginContext.webhook` (in handlers)."""

    def __init__(self, enqueue: Enqueue) -> None:
        self._enqueue = enqueue

    async def post(self, url: str, json: Any, *, idempotency_key: str | None = None) -> TaskRecord:
        """Check the URL and the body and enqueue the delivery; return its task.

        In a task, the key defaults to one numbered per task, so a retried task does not
        post again. The delivery's `webhook-id` is made here, unique across daemons.

        Raises:
            InvalidTaskError: (a ValueError) the URL is not http(s) or the body is not JSON.
        """
        check_url(url)
        args = {"url": url, "body": json, "webhook_id": f"msg_{uuid.uuid4().hex}"}
        return await self._enqueue(POST_WEBHOOK_TASK, args, idempotency_key)


def check_url(url: str) -> None:
    """Raise InvalidTaskError (a ValueError: in a task it fails the task at once) unless
    `url` is an absolute http(s) URL."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        usable = (parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
                  and (parts.port is None or parts.port > 0))
    except ValueError:  # a malformed IPv6 host, a port out of range: no use retrying either
        usable = False
    if not usable:
        raise InvalidTaskError(f"url: expected an absolute http:// or https:// URL, got {url!r}")

