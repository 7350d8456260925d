"""The values `load_config` parses the named tables into: `HookSpec` (`[hooks.<name>]`),
`DigestSpec` (`[digests.<name>]`); the mail-address rules a digest's `to` and `subject`
are checked by, which mail.py checks a mail task's by too; and `signing_key`, the HMAC key
a webhook secret stands for, which webhooks.py and hooks.py sign and check with.

Like `agentd.schedule` (`ScheduleSpec`, `[[schedules]]`), a value module below the
configuration: it imports only `agentd.errors`, `agentd.events` and `agentd.schedule`
(tests/test_layers.py checks it).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentd.errors import InvalidTaskError
from agentd.events import TopicFilter
from agentd.schedule import parse_duration

# The signature schemes a hook may take (see hooks.py); "standard" is the default.
HOOK_SCHEMES = ("standard", "github", "agentd")
_SECRET_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    """The Standard Webhooks HMAC key of `secret`: the decoded bytes of `whsec_<base64>`,
    else the secret's UTF-8 bytes (see webhooks.py).

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


@dataclass(frozen=True, slots=True)
class HookSpec:
    """One `[hooks.<name>]`: its secret (read when the configuration was loaded), the
    signature schemes it takes, and how far its signed timestamps may be off (its own
    `tolerance`, else `[hooks] tolerance`)."""

    name: str
    secret: str = field(repr=False)
    schemes: tuple[str, ...]
    tolerance: float


_DIGEST_KEYS = {"pattern", "to", "subject", "every", "count", "limit"}


def mail_recipients(to: str | Sequence[str]) -> list[str]:
    """The addresses of `to` (one, or a list), each checked to be a mail address that can
    go into a header.

    Raises:
        InvalidTaskError: (a ValueError) naming `to` and the address that is not one.
    """
    recipients = [to] if isinstance(to, str) else list(to)
    if not recipients:
        raise InvalidTaskError("to: give at least one address")
    for address in recipients:
        if (not isinstance(address, str) or "@" not in email.utils.parseaddr(address)[1]
                or any(c in address for c in "\r\n")):
            raise InvalidTaskError(f"to: {address!r} is not a mail address")
    return recipients


def check_mail_subject(subject: object) -> str:
    """Return `subject` if it is one line of text.

    Raises:
        InvalidTaskError: (a ValueError) it is not.
    """
    if not isinstance(subject, str) or any(c in subject for c in "\r\n"):
        raise InvalidTaskError("subject must be one line of text")
    return subject


@dataclass(frozen=True, slots=True)
class DigestSpec:
    """One `[digests.<name>]` table: which events (its `pattern`, parsed), to whom, and when."""

    name: str
    topics: TopicFilter
    to: tuple[str, ...]
    subject: str
    every: float | None
    count: int | None
    limit: int = 200

    @property
    def pattern(self) -> str:
        """The pattern as text, for messages and subscribing."""
        return self.topics.text

    @classmethod
    def from_mapping(cls, name: str, table: Mapping[str, Any]) -> DigestSpec:
        """Raises ValueError naming the key that is wrong."""
        unknown = set(table) - _DIGEST_KEYS
        if unknown:
            raise ValueError(f"unknown key {sorted(unknown)[0]!r}; known: {', '.join(sorted(_DIGEST_KEYS))}")
        pattern = table.get("pattern")
        if not isinstance(pattern, str):
            raise ValueError("pattern: expected a topic pattern such as 'news.*'")
        topics = TopicFilter.parse(pattern)
        to = table.get("to", [])
        if not isinstance(to, str | list):
            raise ValueError(f"to: expected an address or a list of them, got {to!r}")
        recipients = mail_recipients(to)
        subject = check_mail_subject(table.get("subject", f"agentd digest: {name}"))
        every = parse_duration(table["every"], "every") if "every" in table else None
        count = table.get("count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise ValueError(f"count: expected a whole number >= 1, got {count!r}")
        if every is None and count is None:
            raise ValueError("give every (a duration) or count (a number of events), or both")
        limit = table.get("limit", 200)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit: expected a whole number >= 1, got {limit!r}")
        if count is not None and count > limit:
            raise ValueError(f"count: {count} is more than limit ({limit}), the events one mail holds")
        return cls(name, topics, tuple(recipients), subject, every, count, limit)
