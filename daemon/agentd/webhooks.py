"""Outgoing webhooks and the signature schemes webhooks use both ways.

Signatures. The scheme is Standard Webhooks (standardwebhooks.com): the headers
`webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64>`, the
HMAC-SHA256 of `{id}.{timestamp}.{body}`. A secret written `whsec_<base64>` (as Standard
Webhooks libraries make them) signs with its decoded bytes; any other secret with its
UTF-8 bytes, so `openssl dgst -hmac "$SECRET"` makes the same signature (`signing_key`, in
agentd.specs, with which load_config checks every webhook secret). The hex schemes
sign the body alone with the secret's text: `sha256=<hex>` (GitHub's, and agentd's own
before Standard Webhooks). hooks.py checks them on the way in.

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
import hashlib
import hmac
import ipaddress
import json
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from agentd.config import Config, WebhooksConfig
from agentd.errors import Fail, InvalidTaskError, Retry
from agentd.log import get_logger
from agentd.specs import signing_key
from agentd.taskdef import TaskDef, TaskRegistry
from agentd.taskqueue import Enqueue, TaskRecord

if TYPE_CHECKING:
    from aiohappyeyeballs import AddrInfoType

    from agentd.context import Context

POST_WEBHOOK_TASK = "agentd.post_webhook"
SIGNATURE_HEADER = "X-Agentd-Signature"
DELIVERY_HEADER = "X-Agentd-Delivery"
_RETRY_STATUSES = frozenset({408, 425, 429})
_DETAIL_BYTES = 300  # of a refusing receiver's answer, kept in the task's error

_log = get_logger("webhooks")


# --------------------------------------------------------------------------- signatures


def standard_signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.digest(key, signed, hashlib.sha256)).decode()


def sign(secret: bytes, body: bytes) -> str:
    """The hex schemes' header value for `body`: `sha256=<hex HMAC-SHA256>`."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


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


def _allowed_networks(config: WebhooksConfig) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in config.allow_networks)


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
        self.allowed = allowed  # `[webhooks] allow_networks`; a reload replaces it
        self._resolver = aiohttp.ThreadedResolver()

    def check(self, host: str, name: str | None = None) -> None:
        """Raise AddressRefusedError if `host` (an IP address, which `name` resolved to
        when given) is refused."""
        address = ipaddress.ip_address(host.partition("%")[0])  # a link-local scope is not part of it
        reason = refusal_reason(address, self.allowed)
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
        self._guard = _AddressGuard(_allowed_networks(config))
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []  # sessions a reload replaced

    def reconfigure(self, config: WebhooksConfig, secret: str) -> None:
        """Use `config` and `secret` from the next delivery on (a reload); deliveries under
        way finish as they began. A changed `allow_networks` also takes a new session, so
        no connection opened under the old networks is reused.

        Raises:
            ValueError: the secret is a `whsec_` secret that is not base64 (nothing changed).
        """
        key = signing_key(secret)
        allowed = _allowed_networks(config)
        if allowed != self._guard.allowed and self._session is not None:
            # Its pooled connections were checked against the old networks: none is reused.
            # It is closed with the poster, once deliveries under way on it are long over.
            self._retired.append(self._session)
            self._session = None
        self.config, self._secret, self._key = config, secret, key
        self._guard.allowed = allowed

    @classmethod
    def from_config(cls, config: Config) -> WebhookPoster:
        """The poster of `[webhooks]`, with the secret `load_config` read (and checked)."""
        return cls(config.webhooks, config.secrets.webhooks_secret)

    def register(self, registry: TaskRegistry, queue: str) -> None:
        registry.add(TaskDef(name=POST_WEBHOOK_TASK, fn=self._deliver_task, queue=queue, max_attempts=8))

    async def close(self) -> None:
        for session in self._retired:
            await session.close()
        self._retired.clear()
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
            Fail: another 4xx, a 3xx (the receiver will not take it), a refused address
                (logged as `webhook.refused`; no connection was made), or a host no
                connection can be made to ("127.1").
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
            # The timeout per request, not the session's: a reload changes it for the next.
            async with self._client().post(url, data=payload, headers=headers, allow_redirects=False,
                                           timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                                           ) as response:
                status = response.status
                if 200 <= status < 300:
                    return {"status": status, "url": url}
                # The start of the answer is enough to say why: a receiver's body may be
                # endless, or not in the charset it names.
                start = b""
                while len(start) < _DETAIL_BYTES and (
                        chunk := await response.content.read(_DETAIL_BYTES - len(start))):
                    start += chunk
                detail = f"{url} answered {status}: {start.decode(errors='replace')}"
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, AddressRefusedError):
                _log.warning("webhook.refused", url=url, delivery_id=delivery_id, reason=str(exc.os_error))
                raise Fail(f"{url}: refused: {exc.os_error}") from None
            raise
        except (aiohttp.InvalidURL, UnicodeError) as exc:
            # A host aiohttp will not connect to ("127.1", "a..b"): no attempt would do better.
            raise Fail(f"{url}: not a URL a webhook can be posted to: {exc}") from None
        if status in _RETRY_STATUSES or status >= 500:
            raise Retry.after(response.headers.get("Retry-After"), detail)
        raise Fail(detail)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            guard = self._guard
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=guard, socket_factory=guard.socket))
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

