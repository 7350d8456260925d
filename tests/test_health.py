"""A blocked event loop is reported while it is blocked, naming what blocks it, by a real
daemon process whose plugin blocks its loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

BLOCKER = """
    import time

    from agentd import Plugin

    plugin = Plugin("blocker")

    @plugin.task()
    async def block(ctx, seconds: float) -> None:
        time.sleep(seconds)  # noqa: sleep - the blocking call under test: it holds the event loop

    @plugin.on("blocker.block")
    async def block_on_event(ctx, event) -> None:
        time.sleep(event.data["seconds"])  # noqa: sleep - the blocking call under test
"""

BLOCK_SECONDS = 1.5


async def _start(agentd_process: Callable[..., Any], config_file: Callable[..., Path],
                 plugin_dir: Callable[..., Path], process_env: Callable[..., dict[str, str]]
                 ) -> tuple[Any, int, Path]:
    plugins = plugin_dir({"blocker.py": BLOCKER})
    env = process_env(AGENTD_PLUGINS_PATHS=str(plugins), AGENTD_DAEMON_STALL_WARNING="0.3")
    child = await agentd_process("run", "--config", str(config_file()), env=env)
    return child, await child.started(), plugins / "blocker.py"


async def test_a_task_blocking_the_loop_is_logged_while_it_blocks_and_when_it_ends(
    agentd_process: Callable[..., Any], config_file: Callable[..., Path],
    plugin_dir: Callable[..., Path], process_env: Callable[..., dict[str, str]],
) -> None:
    child, port, source = await _start(agentd_process, config_file, plugin_dir, process_env)
    async with aiohttp.ClientSession() as session, session.post(
        f"http://127.0.0.1:{port}/v1/tasks",
        json={"name": "blocker.block", "args": {"seconds": BLOCK_SECONDS}},
    ) as response:
        assert response.status == 201
        task_id = (await response.json())["id"]
    stalled = await child.wait_for_log("loop.stalled")
    assert stalled["level"] == "warning"
    assert stalled["task"] == f"task:blocker.block:{task_id}"
    assert stalled["plugin"] == "blocker"
    assert stalled["at"].startswith(f"{source}:")
    assert stalled["at"].endswith(" in block")
    assert 0.3 <= stalled["seconds"] < BLOCK_SECONDS
    ended = await child.wait_for_log("loop.stall_ended")
    assert (ended["task"], ended["plugin"]) == (stalled["task"], "blocker")
    # From the last heartbeat before the block (at most one 0.25 s interval earlier).
    assert BLOCK_SECONDS - 0.3 <= ended["seconds"] < BLOCK_SECONDS + 1.0
    assert [r["event"] for r in child.records()].count("loop.stalled") == 1


async def test_a_handler_blocking_the_loop_is_named(
    agentd_process: Callable[..., Any], config_file: Callable[..., Path],
    plugin_dir: Callable[..., Path], process_env: Callable[..., dict[str, str]],
) -> None:
    child, port, _ = await _start(agentd_process, config_file, plugin_dir, process_env)
    async with aiohttp.ClientSession() as session, session.post(
        f"http://127.0.0.1:{port}/v1/events",
        json={"topic": "blocker.block", "data": {"seconds": BLOCK_SECONDS}},
    ) as response:
        assert response.status == 202
    stalled = await child.wait_for_log("loop.stalled")
    assert (stalled["task"], stalled["plugin"]) == ("blocker.block_on_event", "blocker")
    assert stalled["at"].endswith(" in block_on_event")
    await child.wait_for_log("loop.stall_ended")
