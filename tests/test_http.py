"""The HTTP surface of a real daemon: system routes, JSON errors, body limit, bearer token,
and an OpenAPI document that documents every route."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from agentd import __version__
from agentd.store.migrations import SCHEMA_VERSION

TOKEN = "s3cret-token"


def assert_error(body: Any, code: str) -> str:
    """`body` is the API's error shape with this code; return its message."""
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return str(body["error"]["message"])


# --------------------------------------------------------------------------- system routes


async def test_healthz(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon()
    async with http(daemon).get("/healthz") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["plugins"] == []
    assert 0 <= body["uptime"] < 60


async def test_readyz(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon(overrides={"server": {"max_loop_lag": 0.75}})
    async with http(daemon).get("/readyz") as response:
        assert response.status == 200
        body = await response.json()
    assert body["ready"] is True
    checks = body["checks"]
    assert checks["store"] == {"ok": True}
    assert checks["plugins"] == {"ok": True, "failed": []}
    assert checks["loop_lag"]["ok"] is True
    assert checks["loop_lag"]["bound"] == 0.75
    assert 0 <= checks["loop_lag"]["seconds"] <= 0.75
    # The store check really wrote.
    row = await daemon.store.read_one("SELECT value FROM meta WHERE key = 'last_write_check'")
    assert row is not None


async def test_status(start_daemon: Any, http: Any, tmp_path: Path) -> None:
    daemon, _ = await start_daemon()
    daemon.bus.publish("some.event")
    async with http(daemon).get("/v1/status") as response:
        assert response.status == 200
        body = await response.json()
    assert body["version"] == __version__
    assert body["pid"] == os.getpid()
    assert body["config"] == "<defaults>"
    assert body["stopping"] is False
    store = body["store"]
    assert (store["path"], store["schema_version"], store["synchronous"]) == (
        str(tmp_path / "data" / "agentd.db"), SCHEMA_VERSION, "normal")
    assert store["bytes"] >= 4096 and store["wal_bytes"] >= 0  # pages may still be in the WAL
    assert store["transactions"] >= 1  # at least the schedules' registration
    # Four rows: the built-in maintenance schedules.
    assert store["tasks_rows"] == 0 and store["events_rows"] >= 0 and store["schedules_rows"] == 4
    assert body["bus"]["published"] >= 2  # daemon.started and some.event
    assert body["bus"]["subscriptions"] >= 1  # the test's capture
    assert body["handlers"] == {"running": 0, "failed": 0, "dropped": 0}
    assert body["plugins"] == []


# --------------------------------------------------------------------------- JSON errors


async def test_unknown_route_is_a_json_404(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon()
    async with http(daemon).get("/no/such/route") as response:
        assert response.status == 404
        assert response.content_type == "application/json"
        message = assert_error(await response.json(), "not_found")
    assert message == "no route for GET /no/such/route"


async def test_wrong_method_is_a_json_405(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon()
    async with http(daemon).post("/healthz", json={}) as response:
        assert response.status == 405
        assert response.content_type == "application/json"
        assert "GET" in response.headers["Allow"]
        message = assert_error(await response.json(), "method_not_allowed")
    assert message.startswith("POST is not allowed on /healthz; allowed: ")
    async with http(daemon).delete("/v1/status") as response:
        assert response.status == 405
        assert_error(await response.json(), "method_not_allowed")


async def test_bodies_over_max_body_bytes_are_a_json_413(start_daemon: Any, http: Any) -> None:
    """Every route that documents a request body refuses one larger than max_body_bytes.

    The routes are taken from the OpenAPI document, so routes added later are covered too.
    Until a route accepting a body exists there is nothing to send one to: skip."""
    limit = 1024
    daemon, _ = await start_daemon(overrides={"server": {"max_body_bytes": limit}})
    client = http(daemon)
    async with client.get("/v1/openapi.json") as response:
        document = await response.json()
    targets = [
        (method, re.sub(r"\{[^}]*\}", "1", path))
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if "requestBody" in operation
    ]
    assert targets, "the OpenAPI document lists no route with a request body"
    oversized = b'{"pad": "' + b"x" * limit + b'"}'
    for method, path in targets:
        async with client.request(
            method.upper(), path, data=oversized, headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 413, (method, path)
            message = assert_error(await response.json(), "request_entity_too_large")
        assert message == f"the request body is larger than {limit} bytes"


# --------------------------------------------------------------------------- bearer token


@pytest.mark.parametrize("source", ["token", "token_file"])
async def test_bearer_token(start_daemon: Any, http: Any, tmp_path: Path, source: str) -> None:
    if source == "token":
        server: dict[str, Any] = {"token": TOKEN}
    else:
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        server = {"token_file": str(token_file)}
    daemon, _ = await start_daemon(overrides={"server": server})

    for token in (None, "wrong", TOKEN + "x", ""):
        async with http(daemon, token=token).get("/v1/status") as response:
            assert response.status == 401, token
            assert_error(await response.json(), "unauthorized")
    async with http(daemon).get("/v1/status", headers={"Authorization": TOKEN}) as response:
        assert response.status == 401  # the "Bearer " scheme is required
    async with http(daemon, token=TOKEN).get("/v1/status") as response:
        assert response.status == 200
        assert (await response.json())["version"] == __version__
    async with http(daemon, token=TOKEN).get("/readyz") as response:
        assert response.status == 200

    # Liveness and the API description need no token.
    anonymous = http(daemon)
    async with anonymous.get("/healthz") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "ok"
    async with anonymous.get("/v1/openapi.json") as response:
        assert response.status == 200


async def test_token_file_uses_its_first_line(start_daemon: Any, http: Any, tmp_path: Path) -> None:
    """agentd.toml: 'Prefer token_file (first line is used)'."""
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n# rotated 2024-01-01 by ops\n")
    token_file.chmod(0o600)
    daemon, _ = await start_daemon(overrides={"server": {"token_file": str(token_file)}})
    async with http(daemon, token=TOKEN).get("/v1/status") as response:
        assert response.status == 200


async def test_no_token_configured_means_no_auth(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon()
    async with http(daemon, token="anything").get("/v1/status") as response:
        assert response.status == 200


# --------------------------------------------------------------------------- OpenAPI


async def test_openapi_lists_the_system_routes(start_daemon: Any, http: Any) -> None:
    daemon, _ = await start_daemon()
    async with http(daemon).get("/v1/openapi.json") as response:
        assert response.status == 200
        document = await response.json()
    assert document["openapi"].startswith("3.")
    assert document["info"] == {"title": "agentd", "version": __version__}
    paths = document["paths"]
    for path in ("/healthz", "/readyz", "/v1/status", "/v1/openapi.json"):
        assert path in paths, path
        assert paths[path]["get"]["summary"], path
    assert paths["/healthz"]["get"]["security"] == []  # public
    assert "security" not in paths["/v1/status"]["get"]  # inherits the bearer requirement
    # Not ready is no error envelope: the same body as ready (the fuzzer found it, when a
    # loaded machine's loop lag made /readyz answer 503).
    readiness = paths["/readyz"]["get"]["responses"]
    assert readiness["503"]["content"] == readiness["200"]["content"]
    assert readiness["503"]["content"]["application/json"]["schema"]["required"] == ["ready", "checks"]
    assert paths["/v1/status"]["get"]["responses"]["200"] == {"description": "OK"}


async def test_openapi_documents_every_route(start_daemon: Any, http: Any) -> None:
    """The document is built from the router itself, and an undocumented handler appears with
    an empty summary: so any route added without @doc fails here."""
    daemon, _ = await start_daemon()
    async with http(daemon).get("/v1/openapi.json") as response:
        document = await response.json()
    assert document["paths"]
    undocumented = [
        f"{method.upper()} {path}"
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        if not operation.get("summary") or not operation.get("tags")
    ]
    assert undocumented == []
    for path, operations in document["paths"].items():
        names = re.findall(r"\{([^}:]+)", path)
        for method, operation in operations.items():
            declared = [p["name"] for p in operation["parameters"] if p["in"] == "path"]
            assert declared == names, (method, path)
            assert operation["responses"], (method, path)
