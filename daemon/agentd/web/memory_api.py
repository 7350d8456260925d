"""`/v1/memory` (long-term memory) and `/v1/sessions/{id}/messages` (short-term)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import web

from agentd.memory import MemoryStore
from agentd.web.errors import ApiError, bad_request, read_json_object
from agentd.web.openapi import doc
from agentd.web.server import DAEMON

routes = web.RouteTableDef()
T = TypeVar("T")

MEMORY_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["text"],
    "properties": {
        "text": {"type": "string"}, "namespace": {"type": "string"},
        "metadata": {"type": "object"},
        "expires_at": {"type": "number", "description": "Unix time"},
        "ttl": {"type": "number", "description": "seconds from now (instead of expires_at)"},
        "supersedes": {"type": "integer", "description": "the id of the memory this corrects"},
    },
}


def _memory(request: web.Request) -> MemoryStore:
    memory = request.app[DAEMON].memory
    if memory is None:
        raise ApiError(503, "memory_unavailable", "memory is not open")
    return memory


async def _checked(call: Awaitable[T]) -> T:
    """Await a memory call; its ValueErrors are the client's: 400."""
    try:
        return await call
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise bad_request(f"{name}: expected a number, got {value!r}")
    return float(value)


def _memory_id(request: web.Request) -> int:
    memory_id = int(request.match_info["id"])
    if memory_id >= 2**63:
        raise ApiError(404, "memory_not_found", f"no memory with id {memory_id}")
    return memory_id


@routes.post("/v1/memory")
@doc("Remember a text; an exact or near duplicate in the namespace returns the existing memory",
     tag="memory", body=MEMORY_SCHEMA,
     responses={201: "A new memory", 200: "A duplicate: the existing memory", 400: "A bad field"})
async def remember(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    unknown = sorted(set(body) - set(MEMORY_SCHEMA["properties"]))
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}")
    expires_at, ttl = _number(body, "expires_at"), _number(body, "ttl")
    if ttl is not None:
        expires_at = time.time() + ttl
    supersedes = body.get("supersedes")
    if supersedes is not None and (not isinstance(supersedes, int) or isinstance(supersedes, bool)):
        raise bad_request(f"supersedes: expected a memory id, got {supersedes!r}")
    text = body.get("text")
    if not isinstance(text, str):
        raise bad_request(f"text: expected a string, got {text!r}")
    memory, created = await _checked(_memory(request).remember(
        text, namespace=body.get("namespace", "default"),
        metadata=body.get("metadata"), expires_at=expires_at, supersedes=supersedes))
    return web.json_response({**memory.to_dict(), "created": created}, status=201 if created else 200)


@routes.get("/v1/memory/search")
@doc("Recall: the memories nearest a query in meaning", tag="memory", query={
    "q": "the query text (required)", "namespace": "default: default", "k": "how many, 1..1000 (10)",
    "where": 'a JSON object of metadata filters, e.g. {"kind": "fact"} or {"kind": ["a", "b"]}',
    "hybrid": "true to fuse with keyword (FTS5) ranking"},
    responses={200: "`results`, best first, each with score and distance", 400: "A bad parameter"})
async def search(request: web.Request) -> web.Response:
    query = request.query
    try:
        k = int(query.get("k", "10"))
        where = json.loads(query["where"]) if "where" in query else None
    except ValueError:
        raise bad_request("k must be an integer and where a JSON object") from None
    hybrid = query.get("hybrid", "false").lower()
    if hybrid not in ("true", "false", "1", "0"):
        raise bad_request(f"hybrid must be true or false, got {hybrid!r}")
    results = await _checked(_memory(request).recall(
        query.get("q", ""), namespace=query.get("namespace", "default"), k=k, where=where,
        hybrid=hybrid in ("true", "1")))
    return web.json_response({"results": [r.to_dict() for r in results]})


@routes.get("/v1/memory/stats")
@doc("The embedder, and memories per namespace, sessions and messages", tag="memory")
async def stats(request: web.Request) -> web.Response:
    return web.json_response(await _memory(request).stats())


@routes.get(r"/v1/memory/{id:\d+}")
@doc("One memory", tag="memory", responses={200: "The memory", 404: "No such memory"})
async def get_memory(request: web.Request) -> web.Response:
    return web.json_response((await _memory(request).get(_memory_id(request))).to_dict())


@routes.patch(r"/v1/memory/{id:\d+}")
@doc("Change a memory's text (embedded again), metadata or expiry (null: never expires)",
     tag="memory",
     body={"type": "object", "properties": {"text": {"type": "string"}, "metadata": {"type": "object"},
                                            "expires_at": {"type": ["number", "null"]}}},
     responses={200: "The memory", 400: "A bad field", 404: "No such memory"})
async def update_memory(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    unknown = sorted(set(body) - {"text", "metadata", "expires_at"})
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}; known: text, metadata, expires_at")
    text = body.get("text")
    if text is not None and not isinstance(text, str):
        raise bad_request("text: expected a string")
    memory = await _checked(_memory(request).update(
        _memory_id(request), text=text, metadata=body.get("metadata"),
        expires_at=_number(body, "expires_at") if "expires_at" in body else ...))
    return web.json_response(memory.to_dict())


@routes.delete(r"/v1/memory/{id:\d+}")
@doc("Forget a memory", tag="memory", responses={204: "Forgotten", 404: "No such memory"})
async def forget(request: web.Request) -> web.Response:
    await _memory(request).forget(_memory_id(request))
    return web.Response(status=204)


@routes.get("/v1/sessions/{id}/messages")
@doc("A conversation's messages, oldest first", tag="memory",
     query={"limit": "the last N messages (default 50, at most 1000)"},
     responses={200: "`messages`", 400: "A bad session id or limit"})
async def history(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise bad_request("limit must be an integer") from None
    if not 1 <= limit <= 1000:
        raise bad_request(f"limit must be between 1 and 1000, got {limit}")
    session = _session(request)
    return web.json_response({"session_id": session.id, "messages": await session.history(limit)})


@routes.post("/v1/sessions/{id}/messages")
@doc("Add a message to a conversation (it keeps the session alive for [memory] session_ttl)",
     tag="memory", body={"type": "object", "required": ["role", "content"], "properties": {
         "role": {"type": "string"}, "content": {"type": "string"}, "meta": {"type": "object"}}},
     responses={201: "The message", 400: "A bad field"})
async def append(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    message = await _checked(_session(request).append(
        body.get("role"), body.get("content"), body.get("meta")))
    return web.json_response(message, status=201)


@routes.delete("/v1/sessions/{id}/messages")
@doc("Clear a conversation", tag="memory", responses={200: "`deleted`: how many messages"})
async def clear(request: web.Request) -> web.Response:
    return web.json_response({"deleted": await _session(request).clear()})


def _session(request: web.Request) -> Any:
    try:
        return _memory(request).session(request.match_info["id"])
    except ValueError as exc:
        raise bad_request(str(exc)) from None
