"""The plugins shipped in the repository's plugins/ directory work end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agentd.testing import EventCapture

REPO_PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


async def test_hello_greets_over_http_and_its_handler_reacts(start_daemon: Any, http: Any) -> None:
    daemon, events = await start_daemon(
        plugin_dirs=[REPO_PLUGINS], overrides={"plugins": {"hello": {"greeting": "hi"}}})
    handled = EventCapture(daemon.bus, "task.succeeded")
    client = http(daemon)
    async with client.post("/v1/tasks", json={"name": "hello.greet", "args": {"name": "Ada"}}) as r:
        assert r.status == 201
        task = await r.json()
    async with client.get(f"/v1/tasks/{task['id']}", params={"wait": "5"}) as r:
        done = await r.json()
    assert (done["status"], done["result"]) == ("succeeded", "hi, Ada")
    progress = await events.wait_for("task.progress", task_id=task["id"])
    assert progress.data["data"] == {"to": "Ada"}
    await handled.wait_for("task.succeeded", task_id=task["id"])
    await daemon.spawner.idle()
    assert daemon.spawner.failed == 0
    assert {p["name"]: p["state"] for p in daemon.plugins.states()}["hello"] == "started"
