"""The OpenAPI 3.1 document at `/v1/openapi.json`, built from the routes actually mounted.

Each handler declares its documentation with `@doc(...)`, naming the Structs of
web/schemas.py that its body and query are validated with: the document's schemas are
generated from those same types. The error answers every route can give (a bad body, a
missing token, a daemon that is stopping, ...) are added here from what the route is, so no
operation can forget them. A route without `@doc` still appears (so the document can never
miss a route) and the test suite fails on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
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
_REF = "#/components/schemas/{name}"


@dataclass(frozen=True, slots=True)
class RouteDoc:
    summary: str
    tag: str
    responses: dict[int, str]
    body: Any = None
    optional_body: bool = False
    query: type[msgspec.Struct] | dict[str, str] | None = None
    path: type[msgspec.Struct] | None = None
    extra_query: tuple[dict[str, Any], ...] = ()
    public: bool = False
    stream: bool = False
    scrape: bool = False
    schemas: dict[int, dict[str, Any]] | None = None
    media_type: str | tuple[str, ...] = "application/json"


def doc(
    summary: str,
    *,
    tag: str,
    responses: dict[int, str] | None = None,
    body: Any = None,
    optional_body: bool = False,
    query: type[msgspec.Struct] | dict[str, str] | None = None,
    path: type[msgspec.Struct] | None = None,
    extra_query: tuple[dict[str, Any], ...] = (),
    public: bool = False,
    stream: bool = False,
    scrape: bool = False,
    schemas: dict[int, dict[str, Any]] | None = None,
    media_type: str | tuple[str, ...] = "application/json",
) -> Callable[[H], H]:
    """Attach OpenAPI documentation to a handler.

    Args:
        summary: one line on what the route does.
        tag: the group it is listed under.
        responses: status → description, for the route's own answers; the errors every
            route of its kind gives (400, 401, 403, 404, 413, 415, 503) are added.
        body: the type (a Struct, maybe Annotated) the JSON body is decoded as.
        optional_body: True when the route also takes no body at all.
        query: the Struct the query parameters are validated with (or, for a route that
            reads them itself, parameter → description: text parameters).
        path: the Struct describing path parameters that are not plain digits.
        extra_query: OpenAPI parameter objects no Struct can state (a JSON-valued parameter).
        public: True when the route needs no bearer token.
        stream: True when the route also accepts a stream token as `?token=`.
        scrape: True when the route also accepts `[metrics] token` as its bearer token
            (and needs it when that alone is configured).
        schemas: status → the JSON schema of that answer's body, for an answer of the
            route's own that is not the error envelope (an error status's default).
        media_type: the content type of the route's own successful answers, when not JSON
            (their schema, from `schemas`, is then that of the text); several when it
            answers in one of them (a static file's).
    """

    def attach(handler: H) -> H:
        handler.__openapi__ = RouteDoc(  # type: ignore[attr-defined]
            summary=summary, tag=tag, responses=responses or {200: "OK"}, body=body,
            optional_body=optional_body, query=query, path=path, extra_query=extra_query,
            public=public, stream=stream, scrape=scrape, schemas=schemas, media_type=media_type)
        return handler

    return attach


def build_document(app: web.Application, version: str, token_required: bool,
                   scrape_token_required: bool = False) -> dict[str, Any]:
    """The OpenAPI document for every method and path routed by `app`. `token_required`:
    a bearer token is configured, so every non-public route may answer 401;
    `scrape_token_required`: the scrape route may (a bearer or `[metrics]` token is set)."""
    routes: list[tuple[str, str, RouteDoc | None]] = []
    for route in app.router.routes():
        method = route.method.lower()
        path = route.resource.canonical if route.resource else ""
        if method not in ("head", "*") and path:
            routes.append((path, method, getattr(route.handler, "__openapi__", None)))
    bodies = sorted({d.body for _, _, d in routes if d is not None and d.body is not None}, key=repr)
    body_schemas, components = msgspec.json.schema_components(bodies, ref_template=_REF)
    schema_of = dict(zip(bodies, body_schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for path, method, route_doc in routes:
        guarded = token_required or (route_doc is not None and route_doc.scrape and scrape_token_required)
        operation = (_operation(path, method, route_doc, schema_of, guarded) if route_doc
                     else {"summary": "", "responses": {"default": {"description": "undocumented"}}})
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "agentd", "version": version},
        "components": {
            "schemas": {"Error": ERROR_SCHEMA, **components},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}] if token_required else [],
        "paths": dict(sorted(paths.items())),
    }


def _operation(path: str, method: str, route_doc: RouteDoc, schema_of: dict[Any, Any],
               token_required: bool) -> dict[str, Any]:
    params = _path_parameters(path, route_doc.path) + _struct_parameters(route_doc.query, "query")
    params += list(route_doc.extra_query)
    responses = _errors(route_doc, params, method, token_required)
    for status, text in route_doc.responses.items():
        # A route's own 403 has another cause than a refused Origin: both are listed.
        responses[status] = f"{text}; or: {responses[403]}" if status == 403 else text
    operation: dict[str, Any] = {
        "summary": route_doc.summary,
        "tags": [route_doc.tag],
        "parameters": params,
        "responses": {
            str(status): _response(status, text, (route_doc.schemas or {}).get(status),
                                   route_doc.media_type)
            for status, text in sorted(responses.items())
        },
    }
    if route_doc.body is not None:
        operation["requestBody"] = {
            "required": not route_doc.optional_body,
            "content": {"application/json": {"schema": schema_of[route_doc.body]}},
        }
    if route_doc.public:
        operation["security"] = []
    elif route_doc.scrape and token_required:
        operation["security"] = [{"bearer": []}]
    return operation


def _response(status: int, text: str, schema: dict[str, Any] | None,
              media_type: str | tuple[str, ...] = "application/json") -> dict[str, Any]:
    """A response object: its own schema if the route gives one (in `media_type` for a
    success), the error envelope for an error status, else no body schema."""
    if schema is None and status >= 400:
        schema = {"$ref": "#/components/schemas/Error"}
    if schema is None:
        return {"description": text}
    types = (media_type,) if isinstance(media_type, str) else media_type
    if status >= 400:
        types = ("application/json",)
    return {"description": text, "content": {kind: {"schema": schema} for kind in types}}


def _errors(route_doc: RouteDoc, params: list[dict[str, Any]], method: str,
            token_required: bool) -> dict[int, str]:
    """The error answers that follow from what the route is."""
    errors: dict[int, str] = {403: "The request's Origin is not allowed",
                              421: "The Host header names no address of this daemon"}
    if route_doc.body is not None or params:
        errors[400] = "A parameter or field is wrong; the message names it"
    if token_required and not route_doc.public:
        errors[401] = "A valid 'Authorization: Bearer <token>' is required"
    if any(p["in"] == "path" for p in params):
        errors[404] = "Nothing has that id"
    if route_doc.body is not None:
        errors[413] = "The body is larger than [server] max_body_bytes"
        errors[415] = "The body is not JSON in UTF-8"
        errors[408] = "The body did not arrive within [server] header_timeout of the head"
    if method != "get":
        errors[503] = "The daemon takes no new work: it is stopping, or its store cannot write"
    return errors


def _path_parameters(path: str, described: type[msgspec.Struct] | None) -> list[dict[str, Any]]:
    named = {p["name"]: p for p in _struct_parameters(described, "path")}
    params = []
    for part in path.split("/"):
        if part.startswith("{"):
            name, _, regex = part[1:-1].partition(":")
            schema = {"type": "integer", "minimum": 0} if regex == r"\d+" else {"type": "string"}
            params.append(named.get(name) or {"name": name, "in": "path", "required": True,
                                               "schema": schema})
    return params


def _struct_parameters(kind: type[msgspec.Struct] | dict[str, str] | None,
                       where: str) -> list[dict[str, Any]]:
    """One parameter per field of `kind`, its schema generated from the field's type."""
    if kind is None:
        return []
    if isinstance(kind, dict):
        return [{"name": name, "in": where, "required": False, "description": text,
                 "schema": {"type": "string"}} for name, text in kind.items()]
    (_,), components = msgspec.json.schema_components([kind], ref_template=_REF)
    properties = components[kind.__name__]["properties"]
    params = []
    for field in msgspec.structs.fields(kind):
        schema = dict(properties[field.encode_name])
        schema.pop("default", None)
        schema.pop("title", None)
        if "anyOf" in schema:  # `X | None = None`: absent is how a query says None
            schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
        param: dict[str, Any] = {"name": field.encode_name, "in": where,
                                 "required": field.required or where == "path", "schema": schema}
        if "description" in schema:
            param["description"] = schema["description"]
        params.append(param)
    return params
