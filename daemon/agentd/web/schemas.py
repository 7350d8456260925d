"""What a request to the HTTP API may hold, written once as typed msgspec Structs: the
handlers decode and validate every body and query with them, and the OpenAPI document's
schemas are generated from them, so the two cannot drift apart.

Each bound is stated here, once, as a constraint of a type: the Struct refuses what breaks it
(400 naming the field) and the document shows it. The free-form JSON a request carries
(task args, event data, memory metadata) must be JSON the daemon can store and give back
unchanged; `check_json` is that rule.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal
from zoneinfo import available_timezones

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from agentd.events import MAX_TOPIC_LENGTH, RESERVED_PREFIXES, TOPIC_PATTERN
from agentd.memory import MAX_MEMORY_BATCH, NAME_PATTERN
from agentd.schedule import MAX_DURATION, MIN_INTERVAL, CatchUp, Overlap
from agentd.taskdef import TASK_NAME_PATTERN
from agentd.taskqueue import LATEST_RUN_AT, TaskStatus

# How deep objects and arrays may nest inside a free-form JSON value: deep enough for any
# real payload, shallow enough that no encoder or decoder of the daemon recurses too far.
MAX_DEPTH = 32
# What an SQLite INTEGER holds: the bounds of the integer fields (priority, ids, counts).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The latest Unix time accepted for a task's run_at (the queue's own bound) or a memory's
# expiry: further out is a mistake, a task that would never run.
LATEST_TIME = LATEST_RUN_AT
MAX_DELAY = MAX_DURATION  # ten years
MAX_TIMEOUT = 7 * 86_400.0  # a week per attempt
MAX_ATTEMPTS = 1_000
MAX_BATCH = 10_000
MAX_KEY = 255  # an idempotency key or a name of anything
MAX_WAIT = 300.0  # seconds GET /v1/tasks/{id}?wait= may hold a request

# The largest float an INT64 holds: INT64_MAX is no float, and a float bounded by it (as
# `le=INT64_MAX`) lets 2**63 in, which 9.223372036854775807e18 decodes to.
WHOLE_FLOAT_MAX = 2.0**63 - 1024
# Integers. JSON Schema counts 5.0 as the integer 5, so each integer field also takes a
# whole float (the `...Whole` half of its union), which `whole` turns back into an int.
Int64 = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]
Int64Whole = Annotated[float, Meta(ge=INT64_MIN, le=WHOLE_FLOAT_MAX, multiple_of=1)]
Id = Annotated[int, Meta(ge=1, le=INT64_MAX)]
IdWhole = Annotated[float, Meta(ge=1, le=WHOLE_FLOAT_MAX, multiple_of=1)]
Count = Annotated[int, Meta(ge=0, le=INT64_MAX)]
CountWhole = Annotated[float, Meta(ge=0, le=WHOLE_FLOAT_MAX, multiple_of=1)]
Attempts = Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS)]
AttemptsWhole = Annotated[float, Meta(ge=1, le=MAX_ATTEMPTS, multiple_of=1)]
# What each pattern below means, in words: error messages show it instead of the regex.
PATTERN_MEANINGS: dict[str, str] = {}


def _text(pattern: str, meaning: str, **constraints: Any) -> Meta:
    """A string constraint: `pattern`, described as `meaning` (in the document and messages)."""
    PATTERN_MEANINGS[pattern] = meaning
    return Meta(pattern=pattern, description=meaning, **constraints)


TaskName = Annotated[str, _text(TASK_NAME_PATTERN, "a task name: letters, digits, '_', '.', '-'",
                                max_length=MAX_KEY)]
QueueName = Annotated[str, Meta(min_length=1, max_length=MAX_KEY, description="a configured queue")]
# PostgreSQL's text holds no U+0000 (NUL): what is kept as text may not hold one, on either
# store. As a pattern where the field has none; where it has, as a `not` of the document's
# (checked where the text is kept, as UnstorableTextError: 422).
_NUL_FREE = r"^[^\x00]*$"
_NO_NUL = Meta(extra_json_schema={"not": {"pattern": r"\x00"}})
Key = Annotated[str, _text(_NUL_FREE, "text without U+0000 (NUL)", min_length=1, max_length=MAX_KEY)]
_TOPIC_MEANING = "a topic: dot-separated names of letters, digits, '_', '-'"
Topic = Annotated[str, _text(TOPIC_PATTERN, _TOPIC_MEANING, max_length=MAX_TOPIC_LENGTH)]
PublishableTopic = Annotated[str, _text(
    TOPIC_PATTERN, _TOPIC_MEANING, max_length=MAX_TOPIC_LENGTH,
    extra_json_schema={
        "description": f"{_TOPIC_MEANING}; not the daemon's own ("
                       + ", ".join(p + "*" for p in RESERVED_PREFIXES) + ")",
        "not": {"pattern": "^(" + "|".join(p.rstrip(".").replace(".", r"\.") for p in RESERVED_PREFIXES)
                + r")(\.|$)"}})]
Namespace = Annotated[str, _text(f"^{NAME_PATTERN}$", "1-128 letters, digits or _ . : -")]
UnixTime = Annotated[float, Meta(ge=0, le=LATEST_TIME, description="Unix time in seconds")]
Delay = Annotated[float, Meta(ge=0, le=MAX_DELAY, description="seconds from now")]
Timeout = Annotated[float, Meta(gt=0, le=MAX_TIMEOUT, description="seconds per attempt")]
Ttl = Annotated[float, Meta(ge=0, le=MAX_DELAY, description="seconds from now")]
# A character `str.strip()` keeps, spelt out: `\S` means other things in Python and ECMAScript.
_NOT_SPACE = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
NonBlank = Annotated[str, _text(_NOT_SPACE, "text that is not empty or only spaces")]
JsonObject = Annotated[dict[str, Any], Meta(description=f"any JSON object nested at most {MAX_DEPTH} deep")]


class JsonValueError(ValueError):
    """A value is not JSON the daemon can store and give back unchanged; the message says where."""


def whole(value: float | None) -> int | None:
    """An integer field's value as an int (a whole float such as 5.0 becomes 5)."""
    return int(value) if type(value) is float else value  # type: ignore[return-value]


def check_json(value: Any, where: str) -> None:
    """Raise JsonValueError unless `value` (decoded JSON, or a Python value built from it)
    nests at most MAX_DEPTH deep and holds finite numbers and text that is valid Unicode (no
    lone surrogate: SQLite stores UTF-8). Integers of any size are kept exactly (JSON text
    is how args, data and metadata are stored). An empty object costs one test."""
    if value:
        _check(value, where, 0)


def _check(value: Any, where: str, depth: int) -> None:
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_text(value, where)
    elif kind is float:
        if not math.isfinite(value):
            raise JsonValueError(f"{where}: {value} is not a JSON number")
    elif kind is dict or kind is list:
        if depth >= MAX_DEPTH:
            raise JsonValueError(f"{where}: nested more than {MAX_DEPTH} deep")
        _check_items(value, where, depth + 1)


def _check_items(container: dict[str, Any] | list[Any], where: str, depth: int) -> None:
    if isinstance(container, dict):
        for key, item in container.items():
            if not key.isascii():
                _check_text(key, where)
            _check(item, f"{where}.{key}", depth)
    else:
        for index, item in enumerate(container):
            _check(item, f"{where}[{index}]", depth)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise JsonValueError(f"{where}: text holds a lone surrogate (\\ud800-\\udfff)") from None


class TaskBody(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """POST /v1/tasks, an item of POST /v1/tasks/batch, a WebSocket `submit`."""

    name: TaskName
    args: JsonObject | None = None
    queue: QueueName | None = None
    priority: Annotated[Int64, Meta(description="higher runs first")] | Int64Whole | None = None
    delay: Delay | None = None
    run_at: UnixTime | None = None
    idempotency_key: Annotated[Key, Meta(description="the same key returns the same task")] | None = None
    max_attempts: Attempts | AttemptsWhole | None = None
    timeout: Timeout | None = None

    def __post_init__(self) -> None:
        if self.delay is not None and self.run_at is not None:
            raise ValueError("give either delay or run_at, not both")
        check_json(self.args, "args")
        for text in (self.queue, self.idempotency_key):
            if text is not None and not text.isascii():
                _check_text(text, "text")


# The rule __post_init__ enforces, for the document.
TaskItem = Annotated[TaskBody, Meta(extra_json_schema={"not": {"required": ["delay", "run_at"]}})]


class TaskBatch(Struct, forbid_unknown_fields=True):
    """POST /v1/tasks/batch: all are validated, then all are committed."""

    tasks: Annotated[list[TaskItem], Meta(min_length=1, max_length=MAX_BATCH)]


# Query parameters: a parameter left out is UNSET (a `None` default would let `?x=null` in).
class TaskListQuery(Struct):
    status: TaskStatus | UnsetType = UNSET
    name: Annotated[str, Meta(max_length=MAX_KEY, description="task name")] | UnsetType = UNSET
    queue: Annotated[str, Meta(max_length=MAX_KEY, description="queue name")] | UnsetType = UNSET
    limit: Annotated[int, Meta(ge=1, le=500, description="page size")] = 50
    before: Annotated[Id, Meta(description="the `next` value of the previous page")] | UnsetType = UNSET


class ApprovalsQuery(Struct):
    limit: Annotated[int, Meta(ge=1, le=500, description="page size")] = 50
    before: Annotated[Id, Meta(description="the `next` value of the previous page")] | UnsetType = UNSET


class AnswerBody(Struct, forbid_unknown_fields=True):
    """POST /v1/tasks/{id}/answer: what `ctx.ask` returns to the task."""

    answer: Annotated[Any, Meta(description="any JSON value")]

    def __post_init__(self) -> None:
        check_json(self.answer, "answer")


class TaskWaitQuery(Struct):
    wait: Annotated[float, Meta(ge=0, le=MAX_WAIT,
                                description="seconds to wait for a final state")] | UnsetType = UNSET


class EventBody(Struct, forbid_unknown_fields=True):
    """POST /v1/events."""

    topic: PublishableTopic
    data: JsonObject = {}

    def __post_init__(self) -> None:
        check_json(self.data, "data")


MemoryText = Annotated[NonBlank, _NO_NUL]
Metadata = Annotated[JsonObject, Meta(description=f"any JSON object nested at most {MAX_DEPTH} deep, "
                                                  "no key or string holding U+0000 (NUL)")]


class NewMemoryBody(Struct, forbid_unknown_fields=True):
    """One memory of POST /v1/memory/batch (and POST /v1/memory, which adds `supersedes`)."""

    text: MemoryText
    namespace: Namespace = "default"
    metadata: Metadata | None = None
    expires_at: UnixTime | None = None
    ttl: Ttl | None = None

    def __post_init__(self) -> None:
        if self.expires_at is not None and self.ttl is not None:
            raise ValueError("give either expires_at or ttl, not both")
        check_json(self.metadata, "metadata")
        _check_text(self.text, "text")

    def expiry(self) -> float | None:
        """expires_at, or now + ttl."""
        return time.time() + self.ttl if self.ttl is not None else self.expires_at


class MemoryBody(NewMemoryBody, forbid_unknown_fields=True):
    """POST /v1/memory."""

    supersedes: Annotated[Id, Meta(description="the id of the memory this corrects")] | IdWhole | None = None


_EITHER_EXPIRY = Meta(extra_json_schema={"not": {"required": ["expires_at", "ttl"]}})
MemoryItem = Annotated[MemoryBody, _EITHER_EXPIRY]


class MemoryBatchBody(Struct, forbid_unknown_fields=True):
    """POST /v1/memory/batch."""

    memories: Annotated[list[Annotated[NewMemoryBody, _EITHER_EXPIRY]],
                        Meta(min_length=1, max_length=MAX_MEMORY_BATCH,
                             description="remembered in this order, as POST /v1/memory would one by one")]


class MemoryPatch(Struct, forbid_unknown_fields=True):
    """PATCH /v1/memory/{id}: the fields given change; `expires_at: null` keeps it for good."""

    text: MemoryText | UnsetType | None = UNSET  # None, as left out: unchanged
    metadata: Metadata | UnsetType | None = UNSET
    expires_at: UnixTime | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        if isinstance(self.metadata, dict):
            check_json(self.metadata, "metadata")
        if isinstance(self.text, str):
            _check_text(self.text, "text")


class SearchQuery(Struct):
    q: Annotated[NonBlank, Meta(description="the query text")]
    namespace: Namespace = "default"
    k: Annotated[int, Meta(ge=1, le=1000, description="how many")] = 10
    hybrid: Annotated[bool, Meta(description="fuse with keyword (FTS5) ranking")] = False


class MessageBody(Struct, forbid_unknown_fields=True):
    """POST /v1/sessions/{id}/messages."""

    role: Annotated[str, Meta(min_length=1, max_length=MAX_KEY), _NO_NUL]
    content: Annotated[str, _NO_NUL]
    meta: JsonObject | None = None

    def __post_init__(self) -> None:
        check_json(self.meta, "meta")
        for text in (self.role, self.content):
            if not text.isascii():
                _check_text(text, "text")


class SessionPath(Struct):
    id: Annotated[Namespace, Meta(description="the session (conversation) id")]


_TOPIC_SEGMENTS = r"([A-Za-z0-9_-]+|\*\*?)(\.([A-Za-z0-9_-]+|\*\*?))*"


class StreamTokenBody(Struct, forbid_unknown_fields=True):
    """POST /v1/stream-tokens (the body is optional): what the token is bound to."""

    path: Annotated[str, _text(r"^/v1/(stream|ws|tasks/[0-9]+/stream)$",
                               "a stream route: /v1/stream, /v1/tasks/<id>/stream or /v1/ws")] | None = None
    topics: Annotated[str, _text(f"^ *{_TOPIC_SEGMENTS} *(, *{_TOPIC_SEGMENTS} *)*$",
                                 "topic patterns separated by commas, e.g. 'task.*,hook.**'",
                                 max_length=4096)] | None = None

    def __post_init__(self) -> None:
        if self.topics is not None and self.path != "/v1/stream":
            raise ValueError("'topics' binds a token of path '/v1/stream' only")


StreamTokenItem = Annotated[StreamTokenBody, Meta(extra_json_schema={"dependentSchemas": {
    "topics": {"required": ["path"], "properties": {"path": {"const": "/v1/stream"}}}}})]


class SessionsQuery(Struct):
    limit: Annotated[int, Meta(ge=1, le=1000, description="at most this many")] = 50
    prefix: Annotated[str, _text(r"^[A-Za-z0-9_.:-]{0,128}$",
                                 "the start of session ids: letters, digits or _ . : -")] = ""


class HistoryQuery(Struct):
    limit: Annotated[int, Meta(ge=1, le=1000, description="the last N messages")] = 50


# Durations: seconds, or parts such as "30s", "30m", "1h30m", "2d", "500ms". Each part has at
# most 4 digits and a text at most 6 parts, so no duration overflows the calendar; one past
# ten years (MAX_DURATION) is a 422, as the numbers' bound cannot be a pattern.
_PART = r"\d{1,4}(\.\d{1,3})?(ms|s|m|h|d|w)"
Duration = (Annotated[float, Meta(ge=0, le=MAX_DELAY)]
            | Annotated[str, _text(f"^({_PART}){{1,6}}$", "a duration such as '30s', '1h30m' or '2d'")])
# An interval is at least 1 ms: at least one part starts with a digit from 1 to 9.
Interval = (Annotated[float, Meta(ge=MIN_INTERVAL, le=MAX_DELAY)]
            | Annotated[str, _text(f"^({_PART}){{0,5}}[1-9]\\d{{0,3}}(\\.\\d{{1,3}})?(ms|s|m|h|d|w)"
                                   f"({_PART}){{0,5}}$",
                                   "a duration of at least 1 ms such as '30s', '1h30m' or '2d'")])
ScheduleId = Annotated[str, _text(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$",
                                  "1-128 letters, digits or _ . - (not starting with . or -)")]
_CRON_FIELD = r"[0-9A-Za-z*/,?#-]+"
Cron = Annotated[str, _text(f"^{_CRON_FIELD}( {_CRON_FIELD}){{4}}$",
                            "5 cron fields, e.g. '0 9 * * 1-5'", max_length=MAX_KEY)]
At = (Annotated[float, Meta(ge=0, le=LATEST_TIME)]
      | Annotated[str, _text(r"^(19[7-9]\d|20\d\d)-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
                             r"[T ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,6})?)?"
                             r"(Z|[+-]([01]\d|2[0-3]):[0-5]\d)?$",
                             "an ISO 8601 date and time from 1970 to 2099")])
if TYPE_CHECKING:
    TimeZone = str
else:  # the zones this machine knows, which ZoneInfo accepts: an enum in the document
    TimeZone = Literal[tuple(sorted(available_timezones() | {"UTC"}))]


class _ScheduleFields(Struct, forbid_unknown_fields=True, omit_defaults=True):
    every: Interval | UnsetType = UNSET
    cron: Cron | UnsetType = UNSET
    at: At | UnsetType = UNSET
    timezone: TimeZone | UnsetType = UNSET
    task: TaskName | UnsetType = UNSET
    args: JsonObject | UnsetType = UNSET
    queue: QueueName | UnsetType = UNSET
    event: Topic | UnsetType = UNSET
    data: JsonObject | UnsetType = UNSET
    catch_up: CatchUp | UnsetType = UNSET
    catch_up_limit: Id | IdWhole | UnsetType = UNSET
    grace: Duration | UnsetType = UNSET
    overlap: Overlap | UnsetType = UNSET
    jitter: Duration | UnsetType = UNSET
    pause_after_failures: Count | CountWhole | UnsetType = UNSET
    paused: bool | UnsetType = UNSET

    def __post_init__(self) -> None:
        for name in ("args", "data"):
            value = getattr(self, name)
            if value is not UNSET:
                check_json(value, name)

    def fields(self) -> dict[str, Any]:
        """The fields given, without `paused` (which is the schedule's state, not its spec)."""
        given = msgspec.structs.asdict(self)
        for name in ("catch_up_limit", "pause_after_failures"):
            if type(given[name]) is float:
                given[name] = int(given[name])
        return {k: v for k, v in given.items() if v is not UNSET and k != "paused"}


class ScheduleBody(_ScheduleFields, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    """POST /v1/schedules: exactly one of every / cron / at, exactly one of task / event."""

    id: ScheduleId

    def __post_init__(self) -> None:
        super().__post_init__()
        if sum(v is not UNSET for v in (self.every, self.cron, self.at)) != 1:
            raise ValueError("give exactly one trigger: every, cron or at")
        if (self.task is UNSET) == (self.event is UNSET):
            raise ValueError("give exactly one action: task (with args) or event (with data)")


class SchedulePatch(_ScheduleFields, forbid_unknown_fields=True, omit_defaults=True):
    """PATCH /v1/schedules/{id}: the fields given change."""

    id: ScheduleId | UnsetType = UNSET


def _one_of(*names: str) -> dict[str, Any]:
    return {"oneOf": [{"required": [name]} for name in names]}


ScheduleItem = Annotated[ScheduleBody, Meta(extra_json_schema={
    "allOf": [_one_of("every", "cron", "at"), _one_of("task", "event")]})]
