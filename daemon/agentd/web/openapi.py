"""The OpenAPI 3 document at `/v1/openapi.json`, built from the routes actually mounted.

Each handler declares its documentation with `@doc(...)`; a route without it still
appears (so the document can never miss a route) and the test suite fails on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

H = TypeVar("H", bound=Callable[..., Any])

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


@dataclass(frozen=True, slots=True)
class RouteDoc:
    summary: str
    tag: str
    responses: dict[int, str]
    request_body: dict[str, Any] | None = None
    parameters: list[dict[str, Any]] = field(default_factory=list)
    public: bool = False
    stream: bool = False


def doc(
    summary: str,
    *,
    tag: str,
    responses: dict[int, str] | None = None,
    body: dict[str, Any] | None = None,
    query: dict[str, str] | None = None,
    public: bool = False,
    stream: bool = False,
) -> Callable[[H], H]:
    """Attach OpenAPI documentation to a handler.

    Args:
        summary: one line on what the route does.
        tag: the group it is listed under.
        responses: status → description (error statuses use the shared error schema).
        body: the JSON schema of the request body, if any.
        query: query parameter → description.
        public: True when the route needs no bearer token.
        stream: True when the route also accepts a stream token as `?token=`.
    """

    def attach(handler: H) -> H:
        handler.__openapi__ = RouteDoc(  # type: ignore[attr-defined]
            summary=summary,
            tag=tag,
            responses=responses or {200: "OK"},
            request_body=body,
            parameters=[
                {"name": name, "in": "query", "required": False, "description": text,
                 "schema": {"type": "string"}}
                for name, text in (query or {}).items()
            ],
            public=public,
            stream=stream,
        )
        return handler

    return attach


def build_document(app: web.Application, version: str) -> dict[str, Any]:
    """The OpenAPI document for every method and path routed by `app`."""
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        method = route.method.lower()
        if method in ("head", "*"):
            continue
        path = route.resource.canonical if route.resource else ""
        if not path:
            continue
        handler_doc: RouteDoc | None = getattr(route.handler, "__openapi__", None)
        paths.setdefault(path, {})[method] = _operation(path, handler_doc)
    return {
        "openapi": "3.1.0",
        "info": {"title": "agentd", "version": version},
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
    }


def _operation(path: str, route_doc: RouteDoc | None) -> dict[str, Any]:
    if route_doc is None:
        return {"summary": "", "responses": {"default": {"description": "undocumented"}}}
    params = [
        {"name": part[1:-1].split(":")[0], "in": "path", "required": True,
         "schema": {"type": "string"}}
        for part in path.split("/")
        if part.startswith("{")
    ]
    operation: dict[str, Any] = {
        "summary": route_doc.summary,
        "tags": [route_doc.tag],
        "parameters": params + route_doc.parameters,
        "responses": {
            str(status): (
                {"description": text,
                 "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                if status >= 400
                else {"description": text}
            )
            for status, text in route_doc.responses.items()
        },
    }
    if route_doc.request_body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": route_doc.request_body}},
        }
    if route_doc.public:
        operation["security"] = []
    return operation
