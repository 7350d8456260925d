"""The two servers stream_bench.py measures, and the publisher they share.

    python3 bench/sse_bare.py [--port 0]      # the bare reference server

The bare reference is the smallest aiohttp SSE fan-out: `GET /stream` holds one
`asyncio.Queue` per client and writes each frame it takes from it; `POST /burst` (a JSON
body with the arguments of `run_burst`) publishes in-process and answers with the
publisher's figures when it is done. No event log, no topic filters, no per-client
serialisation (each event is framed once and the same bytes go to every queue), no write
timeouts. It prints one JSON line `{"event": "bare.started", "port": N}` on stdout once it
listens on 127.0.0.1.

agentd gets the same publisher through `build_agentd_plugin()`: a task
`streambench.burst(**burst arguments)` that publishes on the daemon's own bus (the
PluginContext kept by the plugin's startup hook), so events go through `Bus.publish`, the
event log and each stream's topic filter exactly as any other event does.

Both publishers are the same coroutine, `run_burst`:
  paced (rate > 0): one event every 1/rate s (absolute schedule, no drift) for `seconds`.
  saturated (rate == 0): batches of window/4 events; before each batch it waits (yield,
    then 1 ms sleeps) until no client has more than window - batch events queued, so no
    client buffer ever holds more than `window` events: the server is kept busy without
    letting a bounded buffer overflow. Runs for `seconds` or `max_events`.
Each event's data is {"seq", "sent" (time.time() at publish: wall clock, shared by the
client processes), "pad"}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import resource
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

TOPIC = "bench.tick"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}
BURST_ARGS = ("rate", "seconds", "max_events", "window", "pad")


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def run_burst(
    publish: Callable[[dict[str, Any]], None],
    backlog: Callable[[], int],
    *,
    rate: float,
    seconds: float,
    max_events: int,
    window: int,
    pad: int,
) -> dict[str, Any]:
    """Publish `{"seq", "sent", "pad"}` events paced (rate > 0) or saturated (rate == 0).

    Returns the count published, the wall times of the first and last publish, and (when
    saturated) how many times it had to wait for the slowest client and the largest
    backlog it saw."""
    filler = "x" * pad
    sent = 0
    waits = 0
    peak = 0
    first = last = 0.0
    start = time.monotonic()
    deadline = start + seconds
    if rate > 0:
        interval = 1.0 / rate
        while sent < max_events and time.monotonic() < deadline:
            delay = start + sent * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            last = time.time()
            first = first or last
            publish({"seq": sent, "sent": last, "pad": filler})
            sent += 1
    else:
        batch = max(1, window // 4)
        limit = max(0, window - batch)
        while sent < max_events and time.monotonic() < deadline:
            queued = backlog()
            peak = max(peak, queued)
            if queued > limit:
                waits += 1
                await asyncio.sleep(0 if waits % 2 else 0.001)
                continue
            for _ in range(min(batch, max_events - sent)):
                last = time.time()
                first = first or last
                publish({"seq": sent, "sent": last, "pad": filler})
                sent += 1
            await asyncio.sleep(0)
    return {"published": sent, "first_sent": first, "last_sent": last, "waits": waits,
            "peak_backlog": peak, "publisher_s": round(time.monotonic() - start, 3)}


def burst_arguments(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "rate": float(body["rate"]), "seconds": float(body["seconds"]),
        "max_events": int(body["max_events"]), "window": int(body["window"]),
        "pad": int(body["pad"]),
    }


# -- the bare reference -------------------------------------------------------------------------

CLIENTS: web.AppKey[set[asyncio.Queue[bytes]]] = web.AppKey("clients", set)


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    clients = request.app[CLIENTS]
    clients.add(queue)
    try:
        await response.write(b"retry: 3000\n: connected\n\n")
        while True:
            await response.write(await queue.get())
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        clients.discard(queue)
    return response


async def burst(request: web.Request) -> web.Response:
    clients = request.app[CLIENTS]
    ids = itertools.count(1)

    def publish(data: dict[str, Any]) -> None:
        event_id = next(ids)
        body = json.dumps({"id": event_id, "topic": TOPIC, "time": time.time(), "data": data,
                           "correlation_id": None, "causation_id": None},
                          separators=(",", ":"))
        frame = f"id: {event_id}\nevent: {TOPIC}\ndata: {body}\n\n".encode()
        for queue in clients:
            queue.put_nowait(frame)

    def backlog() -> int:
        return max((q.qsize() for q in clients), default=0)

    result = await run_burst(publish, backlog, **burst_arguments(await request.json()))
    return web.json_response({**result, "clients": len(clients)})


async def serve_bare(port: int) -> None:
    app = web.Application()
    app[CLIENTS] = set()
    app.router.add_get("/stream", stream)
    app.router.add_post("/burst", burst)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(json.dumps({"event": "bare.started", "port": runner.addresses[0][1]}), flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# -- agentd's side of the same publisher ----------------------------------------------------------


def build_agentd_plugin() -> Any:
    """A plugin `streambench` with the task `streambench.burst`: the same publisher on the
    daemon's bus. The backlog is the longest buffer among the SSE subscriptions (`sse:*`)."""
    from agentd import Plugin

    plugin = Plugin("streambench", description="stream benchmark publisher")
    kept: dict[str, Any] = {}

    @plugin.startup
    def keep_context(ctx: Any) -> None:
        # Raw publishes and buffer lengths: the bench reaches into the daemon on purpose
        # (agentd before the public plugin API handed the bus out as `ctx.bus`).
        kept["bus"] = ctx._manager._bus if hasattr(ctx, "_manager") else ctx.bus

    @plugin.task()
    async def burst(ctx: Any, **body: Any) -> dict[str, Any]:
        bus = kept["bus"]

        def publish(data: dict[str, Any]) -> None:
            bus.publish(TOPIC, data)

        def backlog() -> int:
            subs = [s for s in bus._subscriptions if s.name.startswith("sse:")]
            return max((len(s) for s in subs), default=0)

        result = await run_burst(publish, backlog, **burst_arguments(body))
        clients = sum(1 for s in bus._subscriptions if s.name.startswith("sse:"))
        return {**result, "clients": clients}

    return plugin


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_bare(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
