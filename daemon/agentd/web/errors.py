"""JSON errors for every HTTP failure: `{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

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
    TaskNotFoundError,
    TaskStateError,
    UnknownTaskError,
)

# How the daemon's own errors reach HTTP clients: (status, code).
_STATUS_OF: list[tuple[type[AgentdError], int, str]] = [
    (UnknownTaskError, 404, "unknown_task"),
    (TaskNotFoundError, 404, "task_not_found"),
    (InvalidTaskError, 400, "invalid_task"),
    (PatternError, 400, "bad_pattern"),
    (TaskStateError, 409, "conflict"),
    (InvalidScheduleError, 400, "invalid_schedule"),
    (ScheduleNotFoundError, 404, "schedule_not_found"),
    (MemoryNotFoundError, 404, "memory_not_found"),
    (EmbedderError, 503, "embedder_unavailable"),
    (StoreFullError, 503, "store_full"),
    (StoreBusyError, 503, "store_busy"),
    (StoreIOError, 503, "store_io_error"),
    (StoreReadOnlyError, 503, "store_read_only"),
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


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 ApiError saying what is wrong with it."""
    text = await request.text()
    if not text.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request(f"expected a JSON object, got {type(body).__name__}")
    return body
