"""Logs an operator can use, from a real `agentd run`: a line per HTTP request with a request
id that also goes back as a header, and a warning for every task that failed for good or
went dead, all JSON lines (with journald's priority prefix under journald)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

PLUGIN = """
    from agentd import Fail, Plugin

    plugin = Plugin("ops")

    @plugin.task()
    async def refuse(ctx, why: str) -> None:
        raise Fail(why)

    @plugin.task(max_attempts=1)
    async def crash(ctx) -> None:
        raise RuntimeError("the disk is on fire")
"""

TOKEN = "ops-token"


async def _start(agentd_process: Callable[..., Any], config_file: Callable[..., Path],
                 plugin_dir: Callable[..., Path], process_env: Callable[..., dict[str, str]],
                 **env: str) -> tuple[Any, str]:
    plugins = plugin_dir({"ops.py": PLUGIN})
    child = await agentd_process(
        "run", "--config", str(config_file()),
        env=process_env(AGENTD_PLUGINS_PATHS=str(plugins), AGENTD_SERVER_TOKEN=TOKEN,
                        AGENTD_LOG_LEVEL="debug", **env))
    return child, f"http://127.0.0.1:{await child.started()}"


async def _logged(child: Any, request_id: str) -> dict[str, Any]:
    """The access line of the request with this id (it is written once the answer is)."""

    async def scan() -> dict[str, Any]:
        while True:
            found = [r for r in child.records()
                     if r.get("event") == "http.request" and r.get("request_id") == request_id]
            if found:
                return found[0]
            await child.wait_for_log("http.request")

    return await asyncio.wait_for(scan(), 10)


async def test_every_request_gets_an_access_line_and_a_request_id(
    agentd_process: Callable[..., Any], config_file: Callable[..., Path],
    plugin_dir: Callable[..., Path], process_env: Callable[..., dict[str, str]],
) -> None:
    child, url = await _start(agentd_process, config_file, plugin_dir, process_env)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(url) as session:
        async with session.get("/v1/status", headers=auth) as response:
            assert response.status == 200
            made = response.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{16}", made)
        line = await _logged(child, made)
        assert (line["level"], line["method"], line["route"], line["path"], line["status"]) == (
            "info", "GET", "/v1/status", "/v1/status", 200)
        assert line["duration_ms"] >= 0 and line["client"] == "127.0.0.1"

        # A proxy's id is kept, to follow one request through both logs; a bad one is not.
        proxied = {**auth, "X-Request-Id": "lb-7.a_B"}
        async with session.get("/v1/tasks/12345", headers=proxied) as response:
            assert (response.status, response.headers["X-Request-Id"]) == (404, "lb-7.a_B")
        line = await _logged(child, "lb-7.a_B")
        assert (line["route"], line["status"]) == ("/v1/tasks/{id}", 404)
        async with session.get("/v1/status", headers={**auth, "X-Request-Id": "two words"}) as response:
            replaced = response.headers["X-Request-Id"]
        assert re.fullmatch(r"[0-9a-f]{16}", replaced)

        # Refused by auth, and no route at all: still one line each, with the final status.
        async with session.get("/v1/status") as response:
            assert response.status == 401
            refused = response.headers["X-Request-Id"]
        assert (await _logged(child, refused))["status"] == 401
        async with session.post("/nowhere", headers=auth) as response:
            assert response.status == 404
            nowhere = response.headers["X-Request-Id"]
        line = await _logged(child, nowhere)
        assert (line["route"], line["path"], line["status"]) == (None, "/nowhere", 404)

        # A stream has the header from its first byte and its line once it ends; the query
        # string (a stream token may be in it) is never logged.
        scope = {"path": "/v1/stream", "topics": "ops.**"}
        async with session.post("/v1/stream-tokens", headers=auth, json=scope) as response:
            stream_token = (await response.json())["token"]
        query = {"topics": "ops.**", "token": stream_token}
        async with session.get("/v1/stream", params=query) as response:
            assert response.status == 200
            streamed = response.headers["X-Request-Id"]
        line = await _logged(child, streamed)
        assert (line["route"], line["path"], line["status"]) == ("/v1/stream", "/v1/stream", 200)

        # Probes polled every few seconds are logged at debug level.
        async with session.get("/healthz") as response:
            probe = response.headers["X-Request-Id"]
        assert (await _logged(child, probe))["level"] == "debug"
    assert stream_token not in "\n".join(child.lines)
    assert TOKEN not in "\n".join(child.lines)


async def test_a_task_that_fails_for_good_or_goes_dead_is_a_warning(
    agentd_process: Callable[..., Any], config_file: Callable[..., Path],
    plugin_dir: Callable[..., Path], process_env: Callable[..., dict[str, str]],
) -> None:
    child, url = await _start(agentd_process, config_file, plugin_dir, process_env)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(url, headers=auth) as session:
        async with session.post("/v1/tasks", json={"name": "ops.refuse", "args": {"why": "no budget"}}) as r:
            refused = (await r.json())["id"]
        failed = await child.wait_for_log("task.failed_for_good")
        async with session.post("/v1/tasks", json={"name": "ops.crash"}) as r:
            crashed = (await r.json())["id"]
        dead = await child.wait_for_log("task.dead")
    assert (failed["level"], failed["task"], failed["task_id"]) == ("warning", "ops.refuse", refused)
    assert "no budget" in failed["error"]
    assert (dead["level"], dead["task"], dead["task_id"], dead["attempt"]) == ("warning", "ops.crash",
                                                                             crashed, 1)
    assert "the disk is on fire" in dead["error"]


async def test_lines_carry_journald_priorities_under_journald(
    agentd_process: Callable[..., Any], config_file: Callable[..., Path],
    plugin_dir: Callable[..., Path], process_env: Callable[..., dict[str, str]],
) -> None:
    """systemd sets JOURNAL_STREAM for a service whose output goes to the journal: each JSON
    line then starts with <N>, the priority journald files it under (warning 4, info 6)."""
    plugins = plugin_dir({"ops.py": PLUGIN})
    child = await agentd_process(
        "run", "--config", str(config_file()),
        env=process_env(AGENTD_PLUGINS_PATHS=str(plugins), JOURNAL_STREAM="8:12345"))
    assert child.proc.stdout is not None
    priorities: dict[str, int] = {}
    port = None
    while port is None:
        raw = (await asyncio.wait_for(child.proc.stdout.readline(), 30)).decode()
        found = re.fullmatch(r"<(\d)>(\{.*\})\n", raw)
        assert found is not None, raw
        record = json.loads(found[2])
        priorities[record["level"]] = int(found[1])
        if record["event"] == "daemon.started":
            port = record["port"]
    async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session, session.post(
            "/v1/tasks", json={"name": "ops.crash"}) as response:
        assert response.status == 201
    while "warning" not in priorities:
        raw = (await asyncio.wait_for(child.proc.stdout.readline(), 30)).decode()
        found = re.fullmatch(r"<(\d)>(\{.*\})\n", raw)
        assert found is not None, raw
        priorities[json.loads(found[2])["level"]] = int(found[1])
    assert (priorities["info"], priorities["warning"]) == (6, 4)
