"""Concurrent agent streams: N agents each stream one LLM reply to its own SSE client,
through agentd and through a bare aiohttp relay, same run, same machine.

    python3 bench/agent_bench.py [--agents 100,1000,5000] [--tokens 200] [--rate 50]
                                 [--only relay,agentd] [--quick]

Prints one JSON line per (system, agent count) on stdout, then a markdown table on stderr.

Processes (127.0.0.1 only, each started fresh for every agent count):
  llm      an OpenAI-compatible streaming server of this script's own (`--llm-server`): every
           chat completion is answered with --tokens content chunks at --rate chunks/s, one
           ticker writing the next chunk of every open reply each 1/rate s. Each chunk's
           text is `<T>`, T the wall time (time.time()) just before its write.
  agentd   `python -m agentd run` on a temp config: its defaults, `[llm]` pointing at the
           llm server, and the plugin `agentbench` (written to a temp dir): the task
           `agentbench.chat` waits for the event `agentbench.go` (POST /v1/events: not a task,
           which would need a slot the waiting agents hold), then makes one
           `ctx.llm.chat(stream=True)`. Each client follows GET /v1/tasks/{id}/stream.
  relay    the reference (`--relay-server`): one aiohttp handler per client that waits for
           POST /go, calls the llm server (one session, no connection limit) and forwards
           each content delta as an SSE frame, then `event: end`.
  clients  --workers processes (`--worker`), each holding its share of the N SSE clients
           (one aiohttp request each, read line by line) and noting, for every `<T>` read,
           its receive wall time - T.
All agents start together (the go), with every client already connected: what is measured
is N replies streamed at once, not the ramp-up.

Figures per system and N:
  tokens_per_s      tokens read by all clients / (last token read - go)
  p50_ms, p99_ms    token latency: the llm server's write to the client's read (it
                    includes the llm server's and the clients' own delays, alike for both)
  cpu_us_per_token  CPU of the agentd or relay process from the go to the last token, over
                    the tokens read (the llm server's and clients' CPU are not counted)
  rss_per_agent_kb  (the most RSS sampled during the run - RSS before the agents were
                    enqueued or connected) / N
  lost              tokens expected (N x --tokens) - tokens read, and agents whose stream
                    ended without its reply (or never ended within --timeout)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import CpuWatch, repo_revision
from stream_bench import child_env, child_setup, json_object, process_cpu_s, raise_fd_limit, stop_child

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
SYSTEMS = ("relay", "agentd")
STAMP = re.compile(rb"<([0-9]+\.[0-9]+)>")
START_TIMEOUT = 60.0
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
PLUGIN_SOURCE = '''"""agent_bench's agents: each waits for the go, then streams one chat."""
import asyncio
from typing import Any

from agentd import Plugin

plugin = Plugin("agentbench", description="agent_bench.py's agents")
GO = asyncio.Event()


@plugin.task(max_attempts=1)
async def chat(ctx: Any) -> int:
    await GO.wait()
    result = await ctx.llm.chat([{"role": "user", "content": "go"}])
    return len(result.content)


@plugin.on("agentbench.go")
async def go(ctx: Any, event: Any) -> None:
    GO.set()
'''


# -- the llm server ------------------------------------------------------------------------------


async def serve_llm(tokens: int, rate: float) -> None:
    """The OpenAI-compatible chat server: every reply streamed by one shared ticker."""
    from aiohttp import web

    # reply -> [chunks left, the future its handler waits on until the reply is out]
    streams: dict[web.StreamResponse, tuple[list[int], asyncio.Future[None]]] = {}
    wake = asyncio.Event()

    def chunk(text: str | None, finish: str | None) -> bytes:
        delta = {"content": text} if text is not None else {}
        body = {"id": "c", "object": "chat.completion.chunk", "model": "bench",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    async def ticker() -> None:
        interval = 1.0 / rate
        next_at = time.monotonic()
        while True:
            if not streams:
                wake.clear()
                await wake.wait()
                next_at = time.monotonic()
            for response, (left, done) in list(streams.items()):
                try:
                    if left[0] > 0:
                        left[0] -= 1
                        await response.write(chunk(f"<{time.time():.6f}>", None))
                        continue
                    await response.write(chunk(None, "stop") + b"data: [DONE]\n\n")
                except (ConnectionError, RuntimeError):
                    pass
                del streams[response]
                if not done.done():
                    done.set_result(None)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        streams[response] = ([tokens], done)
        wake.set()
        await done
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    await run_app(app, "llm", [ticker()])


async def run_app(app: Any, name: str, background: list[Any]) -> None:
    """Serve `app` on a free loopback port, print `{"event": "<name>.started", "port"}`,
    and run until SIGTERM."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=8192).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [loop.create_task(coro) for coro in background]
    print(json.dumps({"event": f"{name}.started", "port": runner.addresses[0][1]}), flush=True)
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()


# -- the bare relay ------------------------------------------------------------------------------


async def serve_relay(llm_url: str) -> None:
    """One handler per client: wait for the go, call the llm server, forward its deltas."""
    import aiohttp
    from aiohttp import web

    go = asyncio.Event()
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    body = {"model": "bench", "messages": [{"role": "user", "content": "go"}], "stream": True}

    async def relay(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        await response.write(b": connected\n\n")
        await go.wait()
        async with session.post(llm_url, json=body) as upstream:
            async for raw in upstream.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                for choice in json.loads(line[5:])["choices"]:
                    text = choice["delta"].get("content")
                    if text:
                        await response.write(f"data: {text}\n\n".encode())
        await response.write(b"event: end\ndata: {}\n\n")
        return response

    async def start(_: web.Request) -> web.Response:
        go.set()
        return web.json_response({"go": True})

    app = web.Application()
    app.router.add_get("/relay", relay)
    app.router.add_post("/go", start)
    try:
        await run_app(app, "relay", [])
    finally:
        await session.close()


# -- client worker processes ---------------------------------------------------------------------


class ClientWorker:
    """Holds SSE clients; answers one JSON command per stdin line with one JSON stdout line."""

    def __init__(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=None))
        self.latencies: list[float] = []
        self.tokens = 0
        self.last = 0.0
        self.ended = 0
        self.failed: dict[str, int] = {}
        self.clients: list[asyncio.Task[None]] = []

    async def follow(self, url: str, opened: asyncio.Future[None] | None) -> None:
        """One client: read the stream line by line until its end event."""
        try:
            async with self.session.get(url, headers={"Accept": "text/event-stream"}) as response:
                if response.status != 200:
                    raise ConnectionError(f"HTTP {response.status}")
                if opened is not None:
                    opened.set_result(None)
                    opened = None
                async for line in response.content:
                    now = time.time()
                    if line.startswith(b"data:"):
                        stamps = STAMP.findall(line)
                        if stamps:
                            self.tokens += len(stamps)
                            self.last = now
                            self.latencies.extend(now - float(t) for t in stamps)
                    elif line.startswith(b"event: end"):
                        end = json.loads((await response.content.readline())[5:])
                        # agentd's end event names the task's status; the relay's is empty.
                        if end.get("task", {}).get("status", "succeeded") != "succeeded":
                            raise ConnectionError(f"the agent ended {end['task']['status']}")
                        self.ended += 1
                        return
            raise ConnectionError("the stream ended without an end event")
        except Exception as exc:
            key = f"{type(exc).__name__}: {exc}"[:200]
            self.failed[key] = self.failed.get(key, 0) + 1
            if opened is not None and not opened.done():
                opened.set_exception(exc)

    async def open(self, urls: list[str], timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        futures = []
        for url in urls:
            opened: asyncio.Future[None] = loop.create_future()
            futures.append(opened)
            self.clients.append(loop.create_task(self.follow(url, opened)))
        done, pending = await asyncio.wait(futures, timeout=timeout)
        errors = sum(1 for f in done if f.exception() is not None)
        return {"opened": len(done) - errors, "errors": errors, "pending": len(pending)}

    async def wait(self, timeout: float) -> dict[str, Any]:
        if self.clients:
            await asyncio.wait(self.clients, timeout=timeout)
        unfinished = sum(not c.done() for c in self.clients)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"tokens": self.tokens, "last": self.last, "ended": self.ended,
                "unfinished": unfinished, "failed": self.failed,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "latencies": [round(x, 5) for x in self.latencies]}

    async def close(self) -> None:
        for client in self.clients:
            client.cancel()
        await asyncio.gather(*self.clients, return_exceptions=True)
        await self.session.close()


async def worker_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = ClientWorker()
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            try:
                if cmd["op"] == "open":
                    reply = await worker.open(cmd["urls"], cmd["timeout"])
                else:
                    reply = await worker.wait(cmd["timeout"])
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        await worker.close()


# -- the driver ----------------------------------------------------------------------------------


class Proc:
    """A child process of this run: a server that prints `<name>.started` with its port, or
    a client worker driven by JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process, tmp: Path | None = None) -> None:
        self.proc = proc
        self.tmp = tmp
        self.port = 0
        self.lines: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    @classmethod
    async def server(cls, args: list[str], wanted: str, tmp: Path | None = None) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=child_setup, env=child_env(), cwd=str(tmp or HERE), limit=16 << 20)
        server = cls(proc, tmp)
        try:
            await asyncio.wait_for(server._wait_started(wanted), START_TIMEOUT)
        except BaseException:
            await server.stop()
            raise
        server._drain = asyncio.get_running_loop().create_task(server._keep_reading())
        return server

    @classmethod
    async def worker(cls) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--worker", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            preexec_fn=child_setup, env=child_env(), limit=256 << 20)
        return cls(proc)

    async def _wait_started(self, wanted: str) -> None:
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode(errors="replace"):
            self.lines.append(line.strip())
            record = json_object(line)
            if record.get("event") == wanted and record.get("port"):
                self.port = int(record["port"])
                return
        raise RuntimeError(f"exited before it listened: {' | '.join(self.lines[-8:])}")

    async def _keep_reading(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace").strip())
            del self.lines[:-200]

    async def call(self, cmd: dict[str, Any], wait: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), wait)
        if not line:
            raise RuntimeError(f"client worker {self.proc.pid} exited")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"client worker {self.proc.pid}: {reply['error']}")
        return reply

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    async def stop(self) -> None:
        # A client worker (no temp dir, no port) ends with its input.
        await stop_child(self.proc, self._drain, self.tmp,
                         close_stdin=self.tmp is None and self.port == 0)


def agentd_toml(tmp: Path, llm_port: int) -> str:
    return "\n".join([
        "[daemon]", f'data_dir = "{tmp / "data"}"', "stop_timeout = 5.0",
        "[server]", 'host = "127.0.0.1"', "port = 0",
        "[plugins]", f'paths = ["{tmp / "plugins"}"]', "entry_points = false",
        "[llm]", f'base_url = "http://127.0.0.1:{llm_port}/v1"', 'model = "bench"',
        "[log]", 'level = "info"', 'format = "json"', "",
    ])


async def run_level(args: argparse.Namespace, system: str, n: int) -> dict[str, Any]:
    """One system at N agents: start its processes, connect, go, wait, measure."""
    import aiohttp

    started: list[Proc] = []
    try:
        llm = await Proc.server([sys.executable, str(SCRIPT), "--llm-server", "--tokens",
                                 str(args.tokens), "--rate", str(args.rate)], "llm.started")
        started.append(llm)
        llm_url = f"http://127.0.0.1:{llm.port}/v1/chat/completions"
        if system == "agentd":
            tmp = Path(tempfile.mkdtemp(prefix="agent-bench-"))
            (tmp / "plugins").mkdir()
            (tmp / "plugins" / "agentbench.py").write_text(PLUGIN_SOURCE)
            (tmp / "agentd.toml").write_text(agentd_toml(tmp, llm.port))
            server = await Proc.server([sys.executable, "-m", "agentd", "run", "--config",
                                        str(tmp / "agentd.toml")], "daemon.started", tmp)
        else:
            server = await Proc.server([sys.executable, str(SCRIPT), "--relay-server",
                                        "--llm-url", llm_url], "relay.started")
        started.append(server)
        workers = [await Proc.worker() for _ in range(args.workers)]
        started += workers
        base = f"http://127.0.0.1:{server.port}"
        await asyncio.sleep(0.5)  # noqa: sleep - let the fresh server settle before its baseline RSS
        rss0 = server.rss()
        async with aiohttp.ClientSession() as session:
            if system == "agentd":
                ids: list[int] = []
                for start in range(0, n, 1000):
                    batch = {"tasks": [{"name": "agentbench.chat"}] * min(1000, n - start)}
                    async with session.post(f"{base}/v1/tasks/batch", json=batch) as response:
                        if response.status != 201:
                            raise RuntimeError(f"enqueue: HTTP {response.status}: {await response.text()}")
                        ids += [task["id"] for task in (await response.json())["tasks"]]
                urls = [f"{base}/v1/tasks/{task_id}/stream" for task_id in ids]
            else:
                urls = [f"{base}/relay"] * n
            opened = await asyncio.gather(*(
                w.call({"op": "open", "urls": urls[i::len(workers)], "timeout": args.connect_timeout},
                       args.connect_timeout + 30) for i, w in enumerate(workers)))
            if sum(o["opened"] for o in opened) < n:
                raise RuntimeError(f"streams not all open: {opened}")
            cpu0 = process_cpu_s(server.proc.pid)
            pids = [proc.proc.pid for proc in started]
            watch = CpuWatch(ours=lambda: sum(map(process_cpu_s, pids)))
            go = time.time()
            if system == "agentd":
                async with session.post(f"{base}/v1/events", json={"topic": "agentbench.go"}) as response:
                    if response.status >= 300:
                        raise RuntimeError(f"go: HTTP {response.status}: {await response.text()}")
            else:
                async with session.post(f"{base}/go") as response:
                    response.raise_for_status()
            spy = None
            if args.profile is not None:
                # Sampled from the go for as long as the replies would stream unhindered, and 5 s.
                spy = await asyncio.create_subprocess_exec(
                    str(Path(sys.executable).parent / "py-spy"), "record", "-r", "200", "-f", "raw",
                    "-d", str(math.ceil(args.tokens / args.rate) + 5), "-p", str(server.proc.pid),
                    "-o", str(args.profile / f"{system}-{n}.txt"),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rss_peak = 0
            waiting = asyncio.gather(*(w.call({"op": "wait", "timeout": args.timeout},
                                              args.timeout + 60) for w in workers))
            while not waiting.done():
                rss_peak = max(rss_peak, server.rss())
                await asyncio.wait({waiting}, timeout=0.25)
            results = waiting.result()
            cpu = process_cpu_s(server.proc.pid) - cpu0
            if spy is not None:
                await spy.wait()
        tokens = sum(r["tokens"] for r in results)
        latencies = sorted(x for r in results for x in r["latencies"])
        last = max(r["last"] for r in results)
        failed: dict[str, int] = {}
        for r in results:
            for key, count in r["failed"].items():
                failed[key] = failed.get(key, 0) + count
        row: dict[str, Any] = {
            "bench": "agent_streams", "system": system, "agents": n, "tokens_each": args.tokens,
            "rate": args.rate,
            "tokens_per_s": round(tokens / max(1e-9, last - go)) if tokens else 0,
            "all_done_s": round(last - go, 2) if tokens else None,
            **percentiles(latencies),
            "cpu_us_per_token": round(cpu / tokens * 1e6, 1) if tokens else None,
            "rss_per_agent_kb": round((rss_peak - rss0) / n / 1024, 1),
            "rss_peak_mb": round(rss_peak / 2**20, 1),
            "tokens": tokens, "lost_tokens": n * args.tokens - tokens,
            "ended": sum(r["ended"] for r in results),
            "unfinished": sum(r["unfinished"] for r in results),
            "client_cpu_s": round(sum(r["cpu_s"] for r in results), 1),
            "other_load": watch.report(),
        }
        if failed:
            row["failed"] = failed
        return row
    finally:
        for proc in reversed(started):
            await proc.stop()


def percentiles(ordered: list[float]) -> dict[str, Any]:
    if not ordered:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}

    def pct(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"p50_ms": round(pct(50) * 1e3, 2), "p99_ms": round(pct(99) * 1e3, 2),
            "max_ms": round(ordered[-1] * 1e3, 2)}


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.agents:
        for system in args.only:
            try:
                row = await asyncio.wait_for(run_level(args, system, n), args.level_timeout)
            except Exception as exc:
                row = {"bench": "agent_streams", "system": system, "agents": n,
                       "error": f"{type(exc).__name__}: {exc}"[:500]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, elapsed: float) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {args.tokens} tokens per agent at {args.rate:g} tokens/s, "
        f"{args.workers} client processes ({elapsed:.0f} s in all); agentd: {repo_revision()}.",
        "",
        "| agents | system | tokens/s delivered | vs relay | all done | latency p50 | p99 | p99 vs relay "
        "| CPU µs/token | RSS/agent | lost |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    relay = {r["agents"]: r for r in rows if r["system"] == "relay" and "error" not in r}
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['agents']:,} | {row['system']} | error: {row['error'][:120]} "
                         "| | | | | | | | |")
            continue
        ref = relay.get(row["agents"])
        share = (f"{row['tokens_per_s'] / ref['tokens_per_s']:.0%}"
                 if ref and ref["tokens_per_s"] and row["system"] != "relay" else "")
        ratio = (f"{row['p99_ms'] / ref['p99_ms']:.2f}x"
                 if ref and ref["p99_ms"] and row["p99_ms"] and row["system"] != "relay" else "")
        lost = row["lost_tokens"] + row["unfinished"] + (row["agents"] - row["ended"])
        lines.append(
            f"| {row['agents']:,} | {row['system']} | {row['tokens_per_s']:,} | {share} "
            f"| {row['all_done_s']} s | {row['p50_ms']} ms | {row['p99_ms']} ms | {ratio} "
            f"| {row['cpu_us_per_token']} | {row['rss_per_agent_kb']} KB | {lost} |")
    loads = {row["other_load"] for row in rows if "other_load" in row}
    return "\n".join([*lines, "", *sorted(loads)])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", help="comma-separated agent counts (default 100,1000,5000)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per reply (default 200)")
    parser.add_argument("--rate", type=float, default=50.0,
                        help="tokens per second of each reply (default 50)")
    parser.add_argument("--only", default=",".join(SYSTEMS), help="subset of relay,agentd")
    parser.add_argument("--workers", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="seconds to open one level's streams (default 120)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds the replies may take after the go (default 300)")
    parser.add_argument("--level-timeout", type=float, default=600.0,
                        help="seconds one system at one agent count may take (default 600)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample the server measured with py-spy (the bench extra) from the go, "
                             "writing collapsed stacks to DIR/<system>-<N>.txt (needs ptrace rights)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 agents, 20 tokens")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--llm-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--relay-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--llm-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.llm_server or args.relay_server:
        return args
    if args.quick:
        args.agents = args.agents or "50"
        args.tokens = 20
    try:
        args.agents = [int(a.replace("_", "")) for a in (args.agents or "100,1000,5000").split(",")]
    except ValueError:
        parser.error("--agents takes comma-separated whole numbers")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(args.only) - set(SYSTEMS) or not args.only:
        parser.error(f"--only takes a subset of {','.join(SYSTEMS)}")
    if min(args.agents) < 1 or args.tokens < 1 or args.rate <= 0 or args.workers < 1:
        parser.error("--agents, --tokens, --rate and --workers must be positive")
    return args


def main() -> int:
    args = parse_args()
    raise_fd_limit()
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        if args.worker:
            asyncio.run(worker_main())
            return 0
        if args.llm_server:
            asyncio.run(serve_llm(args.tokens, args.rate))
            return 0
        if args.relay_server:
            asyncio.run(serve_relay(args.llm_url))
            return 0
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows = asyncio.run(run_all(args))
    print(markdown(rows, args, time.monotonic() - started), file=sys.stderr)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
