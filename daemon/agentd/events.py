"""The event: what every component reports on the bus, and the topic grammar.

Topics are dotted names: one or more segments of letters, digits, `_` and `-`
(`task.succeeded`, `hook.github`, `news.new`). Patterns are topics in which a segment may be
`*` (exactly one segment) or `**` (zero or more segments): `task.*` matches
`task.started` but not `task.a.b`; `task.**` matches `task`, `task.started` and
`task.a.b`; `**` matches every topic.
"""

from __future__ import annotations

import itertools
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from time import time as _clock
from typing import Any, NamedTuple

from agentd.errors import PatternError

_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
# A whole topic, for documents (the HTTP API's schemas); `validate_topic` says which segment is wrong.
TOPIC_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
# Longer topics are refused: a topic is a name, kept with every event and matched per subscriber.
MAX_TOPIC_LENGTH = 255

# The marker an iterating subscriber receives in place of events its full buffer dropped.
LAGGED_TOPIC = "bus.lagged"


class _EventFields(NamedTuple):
    id: int
    topic: str
    data: Mapping[str, Any]
    time: float
    correlation_id: str | None
    causation_id: str | None


class Event(_EventFields):
    """A fact that happened: immutable, with a globally monotonic id.

    `Event(id=..., topic=..., data=..., time=..., correlation_id=..., causation_id=...)`;
    data defaults to {}, time to now. `correlation_id` ties together everything done for one
    request or root task; `causation_id` names the direct cause (a parent task, the event a
    handler reacted to). A named tuple rather than a frozen dataclass: a frozen dataclass
    sets each field through `object.__setattr__`, which made building an event cost 2.7
    times as much, and a task publishes up to three. Being a tuple, an event is also a
    sequence of its six fields; compare events by `id`.
    """

    __slots__ = ()

    def __new__(cls, id: int, topic: str, data: Mapping[str, Any] | None = None,  # noqa: PLR0917
                time: float | None = None, correlation_id: str | None = None,
                causation_id: str | None = None) -> Event:
        return tuple.__new__(cls, (id, topic, {} if data is None else data,
                                   _clock() if time is None else time, correlation_id, causation_id))

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape used by the HTTP API, streams and the event log."""
        return {
            "id": self.id,
            "topic": self.topic,
            "time": self.time,
            "data": dict(self.data),
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
        }


def validate_topic(topic: object) -> str:
    """Return `topic` if it follows the grammar; raise PatternError naming the fault otherwise."""
    if not isinstance(topic, str) or not topic:
        raise PatternError(f"topic must be a non-empty string, got {topic!r}")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise PatternError(f"topic is {len(topic)} characters long; at most {MAX_TOPIC_LENGTH}")
    return _validate_topic_text(topic)


class Lagged(Event):
    """The marker a subscriber receives in place of events its full buffer dropped. Told
    apart by its type: anyone may publish an event whose topic is `bus.lagged`."""

    __slots__ = ()


RESERVED_PREFIXES = ("bus.", "task.", "schedule.", "daemon.", "plugin.", "handler.")


# How deep a plugin's event data may nest, as the HTTP API's JSON values (`MAX_DEPTH`).
MAX_DATA_DEPTH = 32


def check_event_data(data: object) -> dict[str, Any]:
    """The data of an event a plugin publishes, as a dict of its own (None: empty): a
    mapping whose dicts, lists and tuples nest at most MAX_DATA_DEPTH deep. Values JSON
    cannot hold are written as their `str()` (NaN as null), as for every event.

    Deeper data, or data that contains itself, cannot be encoded: the event log's write
    failed in the store's writer, with every write of its batch (tasks' acks and claims).

    Raises:
        TypeError: `data` is not a mapping.
        ValueError: it nests deeper, or contains itself.
    """
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise TypeError(f"event data must be a mapping, got {type(data).__name__}")
    copy = dict(data)
    _check_nesting(copy, 1)
    return copy


def _check_nesting(value: object, depth: int) -> None:
    if isinstance(value, dict):
        items: Iterable[object] = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return
    if depth > MAX_DATA_DEPTH:
        raise ValueError(f"event data nests more than {MAX_DATA_DEPTH} deep (or contains itself)")
    for item in items:
        _check_nesting(item, depth + 1)


def check_publishable(topic: object) -> str:
    """A topic a client may publish: valid, and not one of the daemon's own (`task.*`, ...),
    which streams and schedules rely on. Raises PatternError naming the fault."""
    text = validate_topic(topic)
    if text.startswith(RESERVED_PREFIXES) or text in {p.rstrip(".") for p in RESERVED_PREFIXES}:
        raise PatternError(f"topic {text!r} is reserved for the daemon's own events "
                           f"({', '.join(p + '*' for p in RESERVED_PREFIXES)})")
    return text


@lru_cache(maxsize=4096)
def _validate_topic_text(topic: str) -> str:
    for segment in topic.split("."):
        if not _SEGMENT.fullmatch(segment):
            raise PatternError(
                f"topic {topic!r}: segment {segment!r} must be letters, digits, '_' or '-'"
            )
    return topic


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """A compiled topic pattern (see the module docstring for the grammar)."""

    text: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: object) -> TopicPattern:
        if not isinstance(text, str) or not text:
            raise PatternError(f"pattern must be a non-empty string, got {text!r}")
        segments = tuple(text.split("."))
        for segment in segments:
            if segment not in ("*", "**") and not _SEGMENT.fullmatch(segment):
                raise PatternError(
                    f"pattern {text!r}: segment {segment!r} must be a name, '*' or '**'"
                )
        return cls(text, segments)

    @property
    def is_exact(self) -> bool:
        return not any(s in ("*", "**") for s in self.segments)

    def matches(self, topic: str) -> bool:
        return _match(self.segments, tuple(topic.split(".")))


@dataclass(frozen=True, slots=True)
class TopicFilter:
    """Several patterns; a topic passes when any of them matches it."""

    patterns: tuple[TopicPattern, ...]

    @classmethod
    def parse(cls, patterns: str | Sequence[str]) -> TopicFilter:
        """From one pattern, a comma-separated string of them, or a list of them."""
        if isinstance(patterns, str):
            items: list[object] = list(patterns.split(","))
        elif isinstance(patterns, list | tuple):
            items = list(patterns)
        else:
            raise PatternError(f"patterns must be a string or a list of strings, got {patterns!r}")
        parsed = tuple(TopicPattern.parse(p.strip() if isinstance(p, str) else p) for p in items)
        if not parsed:
            raise PatternError("at least one topic pattern is needed")
        return cls(parsed)

    @property
    def text(self) -> str:
        return ",".join(p.text for p in self.patterns)

    def matches(self, topic: str) -> bool:
        return any(p.matches(topic) for p in self.patterns)


def _match(pattern: tuple[str, ...], topic: tuple[str, ...]) -> bool:
    """Whether `pattern` matches `topic`, in time proportional to their lengths' product.

    Not by backtracking: a branch for each way a `**` could split the topic is exponential
    in the `**`s (a dozen of them took seconds), and a recursion per segment overflowed
    the stack for a pattern of ~1,000 segments, which any stream client may send."""
    if "**" not in pattern:  # the common case: segment by segment
        return len(pattern) == len(topic) and all(
            segment in ("*", name) for segment, name in zip(pattern, topic, strict=True))
    # ends[j]: the segments of `pattern` read so far can match topic[:j] exactly.
    ends = [True] + [False] * len(topic)
    for segment in pattern:
        if segment == "**":
            ends = list(itertools.accumulate(ends, operator.or_))
        else:
            ends = [False] + [ends[j] and segment in ("*", name)
                              for j, name in enumerate(topic)]
        if not any(ends):
            return False
    return ends[-1]
