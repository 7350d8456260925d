"""Stopping `agentd run` as systemd does: a SIGTERM is never lost, however busy the daemon
is; SIGHUP is logged and ignored; a stop is bounded as a whole, even by a sync task stuck in
its thread, whose task goes back to the queue and runs at the next start.

Every daemon here is a real `agentd run` process; the load is real WebSocket requests from
the test, answered by the daemon out of its SQLite file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from agentd.config import load_config
from agentd.shutdown import EXIT_MARGIN, STOP_STAGES, stop_bound

# The flood: this many WebSockets, each keeping this many `result` requests in flight.
# Each request is a read in an aiosqlite thread, whose answer reaches the loop through its
# self-pipe: the load that made the loop drop signals (asyncio's handlers, at this load,
# lost one of the first ten signals in six runs out of six).
FLOOD_SOCKETS = 16
FLOOD_DEPTH = 100
# Answers to wait for before signalling: the flood is at full strength by then.
FLOOD_WARM = 4 * FLOOD_DEPTH
# Daemons flooded, each sent SIGHUPS_EACH SIGHUPs, one after the other, then a SIGTERM:
# fifty signals, and ten stops. (Ten processes rather than fifty keep the test short.)
FLOODED_DAEMONS = 10
SIGHUPS_EACH = 4
SIGNAL_SEEN = 10.0  # seconds a flooded daemon may take to log a signal
# Each stop stage may take 2 s: the whole bound is 24 s, far above a stop's real length.
STOP_TIMEOUT = 2.0


class Flood:
    """WebSocket clients keeping the daemon's loop and its SQLite readers busy."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answered = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._clients: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Flood:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        self._clients = [asyncio.create_task(self._client()) for _ in range(FLOOD_SOCKETS)]
        await self.more(FLOOD_WARM)
        return self

    async def more(self, count: int) -> None:
        """Return once `count` more requests were answered: the flood is on."""
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.answered + count, arrived))
        await asyncio.wait_for(arrived, 30)

    async def __aexit__(self, *exc_info: object) -> None:
        for client in self._clients:
            client.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._session.close()

    async def _client(self) -> None:
        # The daemon closing the socket at its stop ends the client.
        with contextlib.suppress(aiohttp.ClientError, ConnectionError):
            async with self._session.ws_connect(f"http://127.0.0.1:{self.port}/v1/ws") as ws:
                request = json.dumps({"type": "result", "task_id": 10**9, "timeout": 0})
                while True:
                    for _ in range(FLOOD_DEPTH):
                        await ws.send_str(request)
                    for _ in range(FLOOD_DEPTH):
                        if (await ws.receive()).type is not aiohttp.WSMsgType.TEXT:
                            return
                        self.answered += 1
                    for waiter in [w for w in self._waiters if w[0] <= self.answered]:
                        self._waiters.remove(waiter)
                        if not waiter[1].done():
                            waiter[1].set_result(None)


def staged_stop_events(records: list[dict[str, Any]]) -> list[str]:
    """The stop's lines in order: stopping, each stage's, stopped."""
    return [r["event"] if r["event"] != "daemon.stop_stage" else r["stage"] for r in records
            if r["event"] in ("daemon.stopping", "daemon.stop_stage", "daemon.stopped")]


async def test_no_signal_is_lost_under_a_flood(
    agentd_process: Callable[..., Any], config_file: Callable[..., Path]
) -> None:
    """Under a flood of WebSocket requests one SIGTERM was ignored in 2 of 6 runs. Here
    each daemon, flooded, logs every SIGHUP it is sent (none is lost, none kills it), and
    the SIGTERM that follows stops it, in stages, within its bound."""
    config = config_file()
    config.write_text(config.read_text().replace("stop_timeout = 5.0", f"stop_timeout = {STOP_TIMEOUT}"))
    bound = stop_bound(load_config(config).daemon)
    for _ in range(FLOODED_DAEMONS):
        child = await agentd_process("run", "--config", str(config))
        async with Flood(await child.started()) as flood:
            for _ in range(SIGHUPS_EACH):
                await flood.more(FLOOD_DEPTH)
                child.proc.send_signal(signal.SIGHUP)
                record = await child.wait_for_log("daemon.sighup_ignored", timeout=SIGNAL_SEEN)
                assert "reload" in record["reason"]
            await flood.more(FLOOD_DEPTH)
            signalled = time.monotonic()
            child.proc.send_signal(signal.SIGTERM)
            code = await child.finish(timeout=bound + EXIT_MARGIN)
        took = time.monotonic() - signalled
        assert code == 0, child.stderr
        assert took < bound
        assert "signal wakeup fd" not in child.stderr
        assert staged_stop_events(child.records()) == ["daemon.stopping", *STOP_STAGES, "daemon.stopped"]
        stopping = next(r for r in child.records() if r["event"] == "daemon.stopping")
        assert stopping["reason"] == "SIGTERM"
        assert stopping["bound"] == bound
