"""JSON errors for every HTTP failure: `{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations

import asyncio
import re
from typing import Any, TypeVar

import msgspec
from aiohttp import hdrs, web

from agentd.errors import (
    AgentdError,
    EmbedderError,
    InvalidScheduleError,
    InvalidTaskError,
    MemoryNotFoundError,
    PatternError,
    ScheduleNotFoundError,
    StoreBusyError,
    StoreFullError,
    StoreIOError,
    StoreReadOnlyError,
    StoreUnavailableError,
    TaskNotFoundError,
    TaskStateError,
    UnknownTaskError,
)
from agentd.web.schemas import INT64_MAX, PATTERN_MEANINGS

T = TypeVar("T")
QueryT = TypeVar("QueryT", bound=msgspec.Struct)

# How the daemon's own errors reach HTTP clients: (status, code).
_STATUS_OF: list[tuple[type[AgentdError], int, str]] = [
    (UnknownTaskError, 404, "unknown_task"),
    (TaskNotFoundError, 404, "task_not_found"),
    (InvalidTaskError, 400, "invalid_task"),
    (PatternError, 400, "bad_pattern"),
    (TaskStateError, 409, "conflict"),
    # The body's form is checked first (400); what is left is a well-formed schedule whose
    # meaning cannot be used: an impossible date, a cron expression the trigger refuses.
    (InvalidScheduleError, 422, "invalid_schedule"),
    (ScheduleNotFoundError, 404, "schedule_not_found"),
    (MemoryNotFoundError, 404, "memory_not_found"),
    (EmbedderError, 503, "embedder_unavailable"),
    (StoreFullError, 503, "store_full"),
    (StoreBusyError, 503, "store_busy"),
    (StoreIOError, 503, "store_io_error"),
    (StoreReadOnlyError, 503, "store_read_only"),
    (StoreUnavailableError, 503, "store_unavailable"),
]


class ApiError(Exception):
    """An error the API reports to its client with a status, a stable code and a message."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def from_agentd_error(exc: AgentdError) -> ApiError | None:
    """The API error for a daemon error a client caused, or None if it is the server's fault."""
    for kind, status, code in _STATUS_OF:
        if isinstance(exc, kind):
            return ApiError(status, code, str(exc))
    return None


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **details: Any
) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message, **details}
    return web.json_response({"error": body}, status=status, headers=headers)


def bad_request(message: str, **details: Any) -> ApiError:
    return ApiError(400, "bad_request", message, **details)


def not_found(message: str, **details: Any) -> ApiError:
    return ApiError(404, "not_found", message, **details)


def path_id(request: web.Request, code: str, what: str) -> int:
    """The path's `{id}` (digits, by its route's pattern) as an int, or a 404 `code` for an
    id no row can have: past 64 bits, or longer than `int()` reads (4,300 digits)."""
    digits = request.match_info["id"].lstrip("0") or "0"
    if len(digits) > len(str(INT64_MAX)) or int(digits) > INT64_MAX:
        shown = digits if len(digits) <= 40 else f"{digits[:37]}..."
        raise ApiError(404, code, f"no {what} with id {shown}")
    return int(digits)


# Media types read as JSON. curl's `-d` sends a form type: its body is read as JSON all the same.
_JSON_TYPES = frozenset({"application/json", "application/x-www-form-urlencoded"})
_UTF8 = frozenset({"utf-8", "utf8"})


def _check_media_type(request: web.Request) -> None:
    """415 unless the body is declared JSON in UTF-8 (or not declared at all)."""
    if hdrs.CONTENT_TYPE not in request.headers:
        return
    media_type = request.content_type
    if media_type not in _JSON_TYPES and not (
            media_type.startswith("application/") and media_type.endswith("+json")):
        raise ApiError(415, "unsupported_media_type",
                       f"the body must be JSON (Content-Type: application/json), not {media_type}")
    charset = request.charset
    if charset is not None and charset.lower() not in _UTF8:
        raise ApiError(415, "unsupported_media_type",
                       f"JSON bodies are UTF-8; charset {charset!r} is not supported")


_REGEX = re.compile(r"`str` matching regex '(.*)'")
# A pattern as msgspec's messages show it (backslashes doubled) → what it means.
_MEANINGS = {pattern.replace("\\", "\\\\"): meaning for pattern, meaning in PATTERN_MEANINGS.items()}
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_NOTHING = object()


def invalid(exc: msgspec.ValidationError, given: Any = _NOTHING, where: str = "") -> ApiError:
    """The 400 for a value a Struct of web/schemas.py refused: `field: what was expected, got
    the value` (the value found in `given`, the decoded request, when it can be; a field's
    pattern is in /v1/openapi.json: repeated here it would bury the message)."""
    message, _, path = str(exc).rpartition(" - at `")
    if not message:
        return bad_request(f"{where}{exc}")
    path = path.rstrip("`")
    message = _REGEX.sub(lambda m: _MEANINGS.get(m[1], "the form /v1/openapi.json gives"), message)
    value = _value_at(given, path)
    if value is not _NOTHING and ", got " not in message:
        shown = repr(value)
        message += f", got {shown if len(shown) <= 80 else shown[:77] + '...'}"
    field = path.removeprefix("$").removeprefix(".")
    return bad_request(f"{where}{field}: {message[0].lower()}{message[1:]}")


def _value_at(document: Any, path: str) -> Any:
    """What `path` (`$.tasks[3].priority`) names in `document`, or _NOTHING."""
    for key, index in _STEP.findall(path):
        try:
            document = document[int(index)] if index else document[key]
        except (KeyError, IndexError, TypeError):
            return _NOTHING
    return document


_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    return decoder


# How long a request's body may take to arrive once its head has ([server] header_timeout),
# set on the application by server.build_app.
BODY_TIMEOUT: web.AppKey[float] = web.AppKey("body_timeout", float)


async def read_whole_body(request: web.Request) -> bytes:
    """The request's body, which must arrive within `[server] header_timeout` of its head.

    aiohttp waits for a body as long as the client likes: one that never finishes (a
    Content-Length the client never sends) held its connection and handler for good.

    Raises:
        ApiError: 408 for a body still incomplete after the timeout; 400 for one whose client
            closed the connection before sending it whole (no one reads that answer, but it
            is the client's doing: not a server failure logged with its traceback).
    """
    timeout = request.app[BODY_TIMEOUT]
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout:g} s "
                       "of its head ([server] header_timeout)") from None
    except ConnectionResetError:
        raise ApiError(400, "body_incomplete", "the connection was closed before the whole "
                       "request body arrived") from None


async def read_body(request: web.Request, kind: type[T], optional: bool = False) -> T:
    """The request body decoded and validated as `kind` (a Struct of web/schemas.py); with
    `optional`, no body at all is `kind()`, the Struct's defaults.

    Raises:
        ApiError: 415 for a body that is not declared JSON in UTF-8; 400 for an empty body,
            text that is not JSON in UTF-8, or a value `kind` refuses (the field is named);
            408 for a body that does not arrive in time (`read_whole_body`).
    """
    raw = await read_whole_body(request)
    if optional and not raw:
        return kind()
    _check_media_type(request)
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        return _decoder(kind).decode(raw)
    except msgspec.ValidationError as exc:
        raise invalid(exc, _decoded(raw)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, "invalid_json", f"the request body is not JSON in UTF-8: {exc}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the request body is nested too deeply") from None


def _decoded(raw: bytes) -> Any:
    """The body as plain JSON values, to show the one a Struct refused (_NOTHING if that
    cannot be had: a Struct can refuse a body at its top before meeting its nesting)."""
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return _NOTHING


def read_query(request: web.Request, kind: type[QueryT]) -> QueryT:
    """The query string validated as `kind` (a Struct whose fields are the parameters; text is
    converted to the fields' types). Unknown parameters are ignored; a known one given twice
    is refused (which of the values was meant cannot be known).

    Raises:
        ApiError: 400 naming the parameter that is wrong.
    """
    for name in msgspec.structs.fields(kind):
        count = len(request.query.getall(name.encode_name, ()))
        if count > 1:
            raise bad_request(f"query parameter {name.encode_name!r} is given {count} times; "
                              "give it once")
    given = dict(request.query)
    try:
        return msgspec.convert(given, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise invalid(exc, given, "query parameter ") from None
