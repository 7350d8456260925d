"""Inbound webhooks: `POST /hooks/<name>` requests verified by their hook's scheme, and
the delivery ids each hook has taken, so a replayed request is refused.

Standard Webhooks requests (`webhook-id`, `webhook-timestamp`, `webhook-signature`) are
taken within `tolerance` seconds of their timestamp, each id once. The hex schemes sign
no time and no id: a hook takes them only when its configuration lists them (`github`:
`X-Hub-Signature-256` with `X-GitHub-Delivery`; `agentd`: `X-Agentd-Signature` with
`X-Agentd-Delivery`), and refuses a repeat of the delivery id with the same body (its
signature) for `replay_window` seconds.

The ids taken are kept through a `DeliveryStore`: `SqliteDeliveries` below, or
`agentd.postgres.hooks.PgDeliveries`, where every daemon sharing the database refuses an id
any of them has taken. One daemon on SQLite holds an id in memory while it publishes the
delivery, and records it after. Daemons sharing PostgreSQL take it in the transaction that
publishes the delivery: of two sent to two daemons at once, one commits and the other is
refused, and a crash leaves both the event and the id, or neither.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from agentd.config import Config
from agentd.errors import AgentdError, StoreWriteError
from agentd.log import get_logger
from agentd.specs import signing_key
from agentd.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, sign, standard_signature

if TYPE_CHECKING:
    from agentd.store import Connection, Store

# A delivery id is kept as text and signed as ASCII: printable, no spaces, bounded.
_DELIVERY_ID = re.compile(r"[\x21-\x7e]{1,256}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")

_log = get_logger("hooks")

# The statements on `hook_deliveries`, all of them: the delivery ids taken, each refused
# again until its `refuse_until`.
_TAKEN = "SELECT 1 FROM hook_deliveries WHERE hook = ? AND delivery_id = ? AND refuse_until >= ?"
_FORGET_EXPIRED = "DELETE FROM hook_deliveries WHERE refuse_until < ?"
_TAKE = "INSERT OR REPLACE INTO hook_deliveries (hook, delivery_id, refuse_until) VALUES (?, ?, ?)"


@dataclass(frozen=True, slots=True)
class Take:
    """How a store records a delivery id as taken: `within`, a write op that the caller
    runs in the transaction of what the delivery does, which raises ReplayedDeliveryError
    if the id is taken, or being taken, already; or `after`, to call once that has
    committed: it writes the record, resolving once committed."""

    within: Callable[[Any], object] | None = None
    after: Callable[[], Awaitable[object]] | None = None


class DeliveryStore(Protocol):
    """The `hook_deliveries` table: the delivery ids each hook has taken."""

    async def taken(self, hook: str, delivery_id: str, now: float) -> bool:
        """Whether `hook` took `delivery_id` and refuses it still at `now`."""

    def take(self, hook: str, delivery_id: str, refuse_until: float, now: float) -> Take:
        """How to record the id as taken until `refuse_until` (forgetting the ids expired
        by `now`)."""


class SqliteDeliveries:
    """`DeliveryStore` on agentd.db's SQLite file: the id is recorded after (one daemon's
    process holds it meanwhile, `InboundHooks.taking`)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def taken(self, hook: str, delivery_id: str, now: float) -> bool:
        return await self.store.read_one(_TAKEN, (hook, delivery_id, now)) is not None

    def take(self, hook: str, delivery_id: str, refuse_until: float, now: float) -> Take:
        def record(conn: Connection) -> None:
            conn.execute(_FORGET_EXPIRED, (now,))
            conn.execute(_TAKE, (hook, delivery_id, refuse_until))

        return Take(after=partial(self.store.write, record))


def _header_bytes(value: str) -> bytes:
    # aiohttp decodes header bytes with surrogateescape: a plain encode() raises on them.
    return value.encode("utf-8", "surrogatepass")


class HookSignatureError(AgentdError):
    """An inbound hook request is not signed as its hook requires (answered 401).

    `code` is `bad_signature` or `stale_timestamp`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ReplayedDeliveryError(AgentdError):
    """An inbound hook request repeats a delivery id the hook has already taken (409)."""

    def __init__(self, hook: str, delivery_id: str) -> None:
        super().__init__(f"hook {hook!r} has already taken delivery {delivery_id!r}")


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
# Each scheme and the header its signature comes in, in the order they are preferred.
_SIGNATURE_HEADERS = (("standard", "webhook-signature"),
                      *((name, scheme.signature_header) for name, scheme in _HEX_SCHEMES.items()))


@dataclass(frozen=True, slots=True)
class InboundHook:
    """One `[hooks.<name>]`: its keys (the secret as each scheme uses it), the schemes it
    takes and their windows."""

    name: str
    standard_key: bytes
    hex_key: bytes
    schemes: tuple[str, ...]
    tolerance: float
    replay_window: float

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> Delivery:
        """Check the request's signature by the first scheme (standard, github, agentd)
        that this hook takes and whose signature header the request carries; return its
        delivery. (agentd's own webhooks carry two: a hook taking only `agentd` checks that.)

        Raises:
            HookSignatureError: no signature, none this hook takes, a wrong one, a missing
                delivery id, or a timestamp outside `tolerance`.
        """
        carried = tuple(name for name, header in _SIGNATURE_HEADERS if header in headers)
        scheme = next((name for name in carried if name in self.schemes), "")
        if not scheme:
            given = f"not {_describe(carried)}" if carried else "and this request carries no signature"
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
        expected = _header_bytes(standard_signature(self.standard_key, webhook_id, timestamp, body))
        if not any(hmac.compare_digest(_header_bytes(given), expected)
                   for given in signatures.split() if given.startswith("v1,")):
            raise HookSignatureError("bad_signature", "webhook-signature: expected v1,<base64 "
                                     "HMAC-SHA256 of \"{webhook-id}.{webhook-timestamp}.{body}\">")
        return Delivery(webhook_id, timestamp + self.tolerance)

    def _verify_hex(self, scheme: _HexScheme, headers: Mapping[str, str], body: bytes,
                    now: float) -> Delivery:
        expected = _header_bytes(sign(self.hex_key, body))
        if not hmac.compare_digest(_header_bytes(headers[scheme.signature_header]), expected):
            raise HookSignatureError("bad_signature", f"{scheme.signature_header}: expected "
                                     "sha256=<hex HMAC-SHA256 of the body>")
        delivery_id = headers.get(scheme.delivery_header, "")
        if not _DELIVERY_ID.fullmatch(delivery_id):
            raise HookSignatureError("bad_signature", f"{scheme.delivery_header}: expected the "
                                     "delivery's id (1 to 256 printable ASCII characters)")
        # Kept with the body's signature: a delivery id is unique per sender only (agentd's
        # is its task id), so another sender's delivery, or one made after the sender's
        # database was reset, may reuse it for another body; a replay repeats both.
        signature = headers[scheme.signature_header].removeprefix("sha256=")[:16]
        return Delivery(f"{delivery_id} ({signature})", now + self.replay_window)


def _describe(schemes: tuple[str, ...]) -> str:
    names = {"standard": "Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature)",
             **{name: f"{scheme.signature_header} with {scheme.delivery_header}"
                for name, scheme in _HEX_SCHEMES.items()}}
    return " or ".join(names[scheme] for scheme in schemes)


def configured_hooks(config: Config) -> dict[str, InboundHook]:
    """The hooks of `[hooks.<name>]`, with the secrets `load_config` read (and checked)."""
    return {name: InboundHook(
                name=name, standard_key=signing_key(spec.secret), hex_key=spec.secret.encode(),
                schemes=spec.schemes, tolerance=spec.tolerance,
                replay_window=config.hooks.replay_window)
            for name, spec in config.hooks.settings.items()}


class InboundHooks:
    """The configured inbound hooks, with their keys, and the delivery ids each has taken:
    kept in the database (table `hook_deliveries`), so a restart forgets none."""

    def __init__(self, hooks: Mapping[str, InboundHook], store: DeliveryStore) -> None:
        self._hooks = dict(hooks)
        self._store = store
        self._in_flight: set[tuple[str, str]] = set()

    @classmethod
    def from_config(cls, config: Config, store: DeliveryStore) -> InboundHooks:
        """Build the hooks of `[hooks.<name>]`, with the secrets `load_config` read (and checked)."""
        return cls(configured_hooks(config), store)

    def replace(self, hooks: Mapping[str, InboundHook]) -> None:
        """Serve `hooks` from the next delivery on (a reload); the delivery ids taken stay."""
        self._hooks = dict(hooks)

    def get(self, name: str) -> InboundHook | None:
        return self._hooks.get(name)

    @asynccontextmanager
    async def taking(self, hook: str, delivery: Delivery) -> AsyncIterator[Callable[[Any], object] | None]:
        """Hold `delivery` of `hook` while the block publishes it, and take it: a delivery
        taken before, or held by a request in flight, is refused. The block is given the
        write op that takes it where the store has one (`Take.within`), to run in the
        transaction of its publish (raising ReplayedDeliveryError there when another
        daemon took the id meanwhile, or is taking it); otherwise (None) the id is recorded
        once the block is done.

        Recorded after the block (`Take.after`), not before: a crash between the two lets
        the sender's retry through again (a repeat), where the other order would refuse it
        and lose the event. A record the storage refuses (a full disk) is logged, not raised: the
        event is out, and a refusal would make the sender send it again. The id then
        stays held, so this process refuses repeats until it stops.

        Raises:
            ReplayedDeliveryError: the id was taken (or is being taken) already.
        """
        key = (hook, delivery.id)
        # Held from before the read until the record has committed: a copy is refused as
        # held, or its read starts after the commit and finds the record; never neither.
        if key in self._in_flight:
            raise ReplayedDeliveryError(*key)
        self._in_flight.add(key)
        held_for_good = False
        try:
            # A copy taken before is refused here, without a write.
            if await self._store.taken(*key, time.time()):
                raise ReplayedDeliveryError(*key)
            take = self._store.take(*key, delivery.refuse_repeats_until, time.time())
            yield take.within
            if take.after is not None:
                try:
                    await take.after()
                except StoreWriteError as exc:
                    held_for_good = True
                    _log.error("hooks.record_failed", hook=hook, delivery_id=delivery.id,
                               error=str(exc))
        finally:
            if not held_for_good:
                self._in_flight.discard(key)
