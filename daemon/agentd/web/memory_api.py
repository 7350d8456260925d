"""`/v1/memory` (long-term memory) and `/v1/sessions/{id}/messages` (short-term)."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from msgspec import UNSET

from agentd.errors import UnstorableTextError
from agentd.memory import MAX_MEMORY_BATCH, MemoryStore, NewMemory
from agentd.web.errors import ApiError, bad_request, path_id, read_body, read_query
from agentd.web.openapi import doc
from agentd.web.schemas import (
    HistoryQuery,
    JsonObject,
    MemoryBatchBody,
    MemoryBody,
    MemoryItem,
    MemoryPatch,
    MessageBody,
    SearchQuery,
    SessionPath,
    SessionsQuery,
    check_json,
    whole,
)
from agentd.web.server import DAEMON

routes = web.RouteTableDef()
T = TypeVar("T")
_UNAVAILABLE = {503: "Memory is not open or its embedder does not answer (or the daemon is stopping)"}
_UNSTORABLE = {422: "A text, key or metadata string holds U+0000 (NUL), which memory cannot keep"}

# `where`, a JSON object in a query parameter: no Struct field can state that, so it is
# described here and decoded by `_where`, both from `JsonObject`.
_WHERE_PARAMETER = {
    "name": "where", "in": "query", "required": False,
    "description": 'metadata filters, e.g. {"kind": "fact"} or {"kind": ["a", "b"]}',
    "content": {"application/json": {"schema": msgspec.json.schema(JsonObject)}},
}


def _memory(request: web.Request) -> MemoryStore:
    memory = request.app[DAEMON].memory
    if memory is None:
        raise ApiError(503, "memory_unavailable", "memory is not open")
    return memory


async def _checked(call: Awaitable[T]) -> T:
    """Await a memory call; its ValueErrors are the client's: 400, or 422 for text memory
    cannot keep."""
    try:
        return await call
    except UnstorableTextError as exc:
        raise ApiError(422, "unstorable_text", str(exc)) from None
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def _memory_id(request: web.Request) -> int:
    return path_id(request, "memory_not_found", "memory")


@routes.post("/v1/memory")
@doc("Remember a text; an exact or near duplicate in the namespace returns the existing memory",
     tag="memory", body=MemoryItem,
     responses={**_UNAVAILABLE, **_UNSTORABLE, 201: "A new memory", 200: "A duplicate: the existing memory",
                404: "`supersedes` names no memory"})
async def remember(request: web.Request) -> web.Response:
    body = await read_body(request, MemoryBody)
    memory, created = await _checked(_memory(request).remember(
        body.text, namespace=body.namespace, metadata=body.metadata, expires_at=body.expiry(),
        supersedes=whole(body.supersedes)))
    return web.json_response({**memory.to_dict(), "created": created}, status=201 if created else 200)


@routes.post("/v1/memory/batch")
@doc(f"Remember up to {MAX_MEMORY_BATCH} texts at once, as POST /v1/memory would one by one in that "
     "order (an item repeating an earlier one, exactly or nearly, gets its memory); embedded in "
     "batches, written in one transaction. Every item is checked first: a bad one (named by its "
     "index) stores nothing", tag="memory", body=MemoryBatchBody,
     responses={**_UNAVAILABLE, **_UNSTORABLE, 200: "`results` in the items' order, each `id` and `created` "
                "(false: a duplicate's), and the counts `created` and `duplicates`"})
async def remember_batch(request: web.Request) -> web.Response:
    body = await read_body(request, MemoryBatchBody)
    items = [NewMemory(item.text, item.namespace, item.metadata, item.expiry()) for item in body.memories]
    results = await _checked(_memory(request).remember_many(items))
    created = sum(1 for _, new in results if new)
    return web.json_response({
        "results": [{"id": memory.id, "created": new} for memory, new in results],
        "created": created, "duplicates": len(results) - created})


@routes.get("/v1/memory/search")
@doc("Recall: the memories nearest a query in meaning", tag="memory", query=SearchQuery,
     extra_query=(_WHERE_PARAMETER,),
     responses={**_UNAVAILABLE, 200: "`results`, best first, each with score and distance"})
async def search(request: web.Request) -> web.Response:
    query = read_query(request, SearchQuery)
    results = await _checked(_memory(request).recall(
        query.q, namespace=query.namespace, k=query.k, where=_where(request), hybrid=query.hybrid))
    return web.json_response({"results": [r.to_dict() for r in results]})


def _where(request: web.Request) -> dict[str, Any] | None:
    text = request.query.get("where")
    if text is None:
        return None
    try:
        where: dict[str, Any] = msgspec.json.decode(text, type=JsonObject)
        check_json(where, "where")
    except (msgspec.DecodeError, ValueError) as exc:
        raise bad_request(f"where must be a JSON object: {exc}") from None
    return where


@routes.get("/v1/memory/stats")
@doc("The embedder, and memories per namespace, sessions and messages", tag="memory",
     responses={**_UNAVAILABLE, 200: "OK"})
async def stats(request: web.Request) -> web.Response:
    return web.json_response(await _memory(request).stats())


@routes.get(r"/v1/memory/{id:\d+}")
@doc("One memory", tag="memory", responses={**_UNAVAILABLE, 200: "The memory", 404: "No such memory"})
async def get_memory(request: web.Request) -> web.Response:
    return web.json_response((await _memory(request).get(_memory_id(request))).to_dict())


@routes.get(r"/v1/memory/{id:\d+}/history")
@doc("A memory's history, oldest first: `created`, each `updated` (with the text and metadata "
     "before), `superseded` (by a correction)", tag="memory",
     responses={**_UNAVAILABLE, 200: "`history`", 404: "No such memory"})
async def memory_history(request: web.Request) -> web.Response:
    changes = await _memory(request).history(_memory_id(request))
    return web.json_response({"memory_id": _memory_id(request),
                              "history": [change.to_dict() for change in changes]})


@routes.patch(r"/v1/memory/{id:\d+}")
@doc("Change a memory's text (embedded again), metadata or expiry (null: never expires)",
     tag="memory",
     body=MemoryPatch, responses={**_UNAVAILABLE, **_UNSTORABLE, 200: "The memory", 404: "No such memory"})
async def update_memory(request: web.Request) -> web.Response:
    body = await read_body(request, MemoryPatch)
    memory = await _checked(_memory(request).update(
        _memory_id(request), text=body.text if isinstance(body.text, str) else None,
        metadata=body.metadata if isinstance(body.metadata, dict) else None,
        expires_at=... if body.expires_at is UNSET else body.expires_at))
    return web.json_response(memory.to_dict())


@routes.delete(r"/v1/memory/{id:\d+}")
@doc("Forget a memory", tag="memory",
     responses={**_UNAVAILABLE, 204: "Forgotten", 404: "No such memory"})
async def forget(request: web.Request) -> web.Response:
    await _memory(request).forget(_memory_id(request))
    return web.Response(status=204)


@routes.get("/v1/sessions")
@doc("Conversations alive, the most recently active first: each `id`, `updated_at`, "
     "`expires_at` and its number of `messages`", tag="memory", query=SessionsQuery,
     responses={**_UNAVAILABLE, 200: "`sessions`"})
async def sessions(request: web.Request) -> web.Response:
    query = read_query(request, SessionsQuery)
    found = await _memory(request).list_sessions(time.time(), query.limit, query.prefix)
    return web.json_response({"sessions": found})


@routes.get("/v1/sessions/{id}/messages")
@doc("A conversation's messages, oldest first", tag="memory",
     query=HistoryQuery, path=SessionPath, responses={**_UNAVAILABLE, 200: "`messages`"})
async def history(request: web.Request) -> web.Response:
    limit = read_query(request, HistoryQuery).limit
    session = _session(request)
    return web.json_response({"session_id": session.id, "messages": await session.history(limit)})


@routes.post("/v1/sessions/{id}/messages")
@doc("Add a message to a conversation (it keeps the session alive for [memory] session_ttl)",
     tag="memory", body=MessageBody, path=SessionPath,
     responses={**_UNAVAILABLE, **_UNSTORABLE, 201: "The message"})
async def append(request: web.Request) -> web.Response:
    body = await read_body(request, MessageBody)
    message = await _checked(_session(request).append(body.role, body.content, body.meta))
    return web.json_response(message, status=201)


@routes.delete("/v1/sessions/{id}/messages")
@doc("Clear a conversation", tag="memory", path=SessionPath,
     responses={**_UNAVAILABLE, 200: "`deleted`: how many messages"})
async def clear(request: web.Request) -> web.Response:
    return web.json_response({"deleted": await _session(request).clear()})


def _session(request: web.Request) -> Any:
    try:
        return _memory(request).session(request.match_info["id"])
    except ValueError as exc:
        raise bad_request(str(exc)) from None
