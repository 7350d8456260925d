"""Streaming benchmark: agentd's SSE fan-out against a bare aiohttp SSE loop, same run, same machine.

    python3 bench/stream_bench.py [--clients 100,1000,10000] [--only bare,agentd]
                                  [--seconds 5] [--paced-seconds 5] [--rate 10] [--quick]
                                  [--profile DIR]

Prints one JSON line per (server, client count) on stdout, then a markdown table on stderr.
See bench/README.md ("stream_bench.py") for what each figure means and how it is measured.

Servers (each in its own process, started fresh for every client count, 127.0.0.1 only):
  agentd        `python -m agentd run` on a temp config: port 0, event log on (default
                rules: bench.tick is a `ring` event, stored in SQLite), clients filtered by
                `/v1/stream?topics=bench.*`, default [streams] client_buffer, keepalive 300 s.
                The publisher is the task `streambench.burst` of a plugin written to a temp
                plugin dir (bench/sse_bare.py: build_agentd_plugin), publishing on the
                daemon's own bus; the bench enqueues it over HTTP and long-polls its result.
  bare-aiohttp  bench/sse_bare.py: one asyncio.Queue per client, frames serialised once per
                event, no log, no filters; publisher behind POST /burst.
Clients: --workers processes (default 2), each holding its share of the connections as raw
asyncio protocols (HTTP/1.1 GET, no client library), counting `"sent":` occurrences in whole
SSE frames and, in the paced phase, recording receive wall time - `sent` for every delivery.
Every process raises RLIMIT_NOFILE to its hard limit.

Per server and client count N:
  saturated   the publisher runs `--seconds` flat out, in batches of window/4 events, never
              letting any client's queue pass the window (sse_bare.run_burst): --window (256),
              lowered to --inflight / N (50,000 / N) but not under --min-window (16), so the
              tail left to deliver after the publisher stops stays short at 10,000 clients;
              deliveries/s = deliveries received by all clients / (last receive - first publish).
  paced       one event every 1/rate s for max(--paced-seconds, 10 events); rate is --rate,
              lowered to --paced-deliveries / N (10,000 / N): 10/s up to 1,000 clients, 1/s
              at 10,000, i.e. the issue's 1,000 x 10/s load; p50/p99 of publish -> receive.
  rss         server VmRSS with 0 clients, with N idle clients, and after both phases
              (still connected); per client = (after - 0 clients) / N.
  lost        `lagged` control events, unexpected disconnects, and deliveries missing
              (published x connected - received); lost clients are reconnected before the
              paced phase.
Other sessions' work on the machine skews every figure: each run first waits (up to
--quiet-wait s) for the CPU used outside the bench to drop under 25 % of a core, reports what
was used outside it during the run (`other_cpu_pct`), and is measured again (up to
--retries times) when that passed --max-other. --repeat N runs each pair N times; the table
shows medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import repo_revision

SCRIPT = Path(__file__).resolve()
HERE = SCRIPT.parent
REPO = HERE.parent
SERVERS = ("bare", "agentd")
SERVER_NAME = {"bare": "bare-aiohttp", "agentd": "agentd"}
PLUGIN_SOURCE = "from sse_bare import build_agentd_plugin\n\nplugin = build_agentd_plugin()\n"
SENT = re.compile(rb'"sent":([0-9.eE+-]+)')
START_TIMEOUT = 60.0
CALL_TIMEOUT = 30.0


# -- client worker processes -------------------------------------------------------------------


class Counters:
    """What one worker's connections saw since the last reset."""

    def __init__(self) -> None:
        self.reset(record=False)

    def reset(self, *, record: bool) -> None:
        self.received = 0
        self.first = 0.0
        self.last = 0.0
        self.lagged = 0
        self.lost = 0
        self.record = record
        self.latencies: list[float] = []


class SseClient:
    """One SSE connection as a bare asyncio protocol: headers, then whole frames only."""

    def __init__(self, request: bytes, counters: Counters, ready: asyncio.Future[None],
                 open_set: set[SseClient]) -> None:
        self.request = request
        self.counters = counters
        self.ready = ready
        self.open_set = open_set
        self.transport: asyncio.Transport | None = None
        self.head: bytes | None = b""
        self.tail = b""
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.head is not None:
            head = self.head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self.head = head
                return
            status = head[:head.find(b"\r\n")]
            if not status.startswith(b"HTTP/1.1 200"):
                self._fail(f"server answered {status.decode(errors='replace')!r}")
                return
            self.head = None
            data = head[end + 4:]
        buf = self.tail + data if self.tail else data
        if not self.ready.done() and b": connected\n" in buf:
            self.open_set.add(self)
            self.ready.set_result(None)
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.tail = buf
            if b"\r\n0\r\n\r\n" in buf:
                self._ended()
            return
        done, self.tail = buf[:cut], buf[cut + 2:]
        counters = self.counters
        n = done.count(b'"sent":')
        if n:
            counters.received += n
            counters.last = now
            counters.first = counters.first or now
            if counters.record:
                counters.latencies.extend(now - float(sent) for sent in SENT.findall(done))
        if b"event: lagged" in done:
            counters.lagged += done.count(b"event: lagged")
        if b"\r\n0\r\n\r\n" in self.tail:
            self._ended()

    def _ended(self) -> None:
        """The last chunk came: the server ended the stream (after `lagged`, say) and kept the
        connection; close it, and connection_lost counts it as lost."""
        self.tail = b""
        if self.transport is not None:
            self.transport.close()

    def _fail(self, reason: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before the stream opened: {exc}"))
        elif self in self.open_set:
            self.open_set.discard(self)
            if not self.closing:
                self.counters.lost += 1

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class ClientWorker:
    """Holds connections; answers one JSON command per stdin line with one JSON stdout line."""

    def __init__(self) -> None:
        self.counters = Counters()
        self.open: set[SseClient] = set()
        self.stuck: list[socket.socket] = []

    async def connect_stuck(self, host: str, port: int, path: str, count: int, rcvbuf: int,
                            timeout: float) -> dict[str, Any]:
        """Open `count` streams that send their request and then never read a byte: bare
        sockets the event loop does not watch."""
        loop = asyncio.get_running_loop()
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   "Accept: text/event-stream\r\n\r\n").encode()
        async with asyncio.timeout(timeout):
            for _ in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                if rcvbuf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                self.stuck.append(sock)
                await loop.sock_connect(sock, (host, port))
                await loop.sock_sendall(sock, request)
        return {"stuck": len(self.stuck)}

    def close_stuck(self) -> dict[str, Any]:
        for sock in self.stuck:
            sock.close()
        closed, self.stuck = len(self.stuck), []
        return {"closed": closed}

    async def connect(self, host: str, port: int, path: str, count: int, batch: int,
                      timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n").encode()
        deadline = time.monotonic() + timeout
        errors: dict[str, int] = {}

        async def open_one() -> None:
            ready: asyncio.Future[None] = loop.create_future()
            client = SseClient(request, self.counters, ready, self.open)
            remaining = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(loop.create_connection(lambda: client, host, port), remaining)
                await asyncio.wait_for(ready, max(0.1, deadline - time.monotonic()))
            except BaseException:
                if client.transport is not None:
                    client.closing = True
                    client.transport.close()
                raise

        done = 0
        while done < count and time.monotonic() < deadline:
            size = min(batch, count - done)
            results = await asyncio.gather(*(open_one() for _ in range(size)),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    key = f"{type(result).__name__}: {result}"[:200]
                    errors[key] = errors.get(key, 0) + 1
            done += size
            if errors:
                break
        return {"open": len(self.open), "errors": errors}

    def stats(self, latencies: bool) -> dict[str, Any]:
        c = self.counters
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out: dict[str, Any] = {"received": c.received, "first": c.first, "last": c.last,
                               "lagged": c.lagged, "lost": c.lost, "open": len(self.open),
                               "cpu_s": usage.ru_utime + usage.ru_stime}
        if latencies:
            out["latencies"] = [round(x, 6) for x in c.latencies]
        return out

    async def close(self) -> dict[str, Any]:
        clients = list(self.open)
        for client in clients:
            client.closing = True
            if client.transport is not None:
                client.transport.close()
        self.open.clear()
        await asyncio.sleep(0.1)
        return {"closed": len(clients)}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "connect":
            return await self.connect(cmd["host"], cmd["port"], cmd["path"], cmd["count"],
                                      cmd["batch"], cmd["timeout"])
        if op == "reset":
            self.counters.reset(record=cmd["record"])
            return {"ok": True}
        if op == "stats":
            return self.stats(cmd.get("latencies", False))
        if op == "close":
            return await self.close()
        if op == "stuck":
            return await self.connect_stuck(cmd["host"], cmd["port"], cmd["path"], cmd["count"],
                                            cmd["rcvbuf"], cmd["timeout"])
        if op == "close_stuck":
            return self.close_stuck()
        raise ValueError(f"unknown op {op!r}")


async def worker_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = ClientWorker()
    while line := await reader.readline():
        try:
            reply = await worker.handle(json.loads(line))
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    await worker.close()
    worker.close_stuck()


# -- the driver: processes ---------------------------------------------------------------------


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def child_setup() -> None:
    """In each child before exec: die with the driver (PR_SET_PDEATHSIG), same fd limit."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    raise_fd_limit()


def child_env(agentd_src: Path | None = None) -> dict[str, str]:
    """The environment without AGENTD_* overrides; bench/ (and --agentd-src) importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    paths = [str(HERE), str(agentd_src or ""), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return env


class Worker:
    """One client worker process, driven by JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lock = asyncio.Lock()

    @classmethod
    async def start(cls) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--worker",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=child_setup,
            env=child_env(), limit=64 << 20)
        return cls(proc)

    async def call(self, cmd: dict[str, Any], wait: float = CALL_TIMEOUT) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self.lock:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), wait)
        if not line:
            raise RuntimeError(f"client worker {self.proc.pid} exited (code {self.proc.returncode})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"client worker {self.proc.pid}: {reply['error']}")
        return reply

    async def stop(self) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class Server:
    """A server under test in its own process: its pid, port, and the stdout it logged."""

    def __init__(self, kind: str, proc: asyncio.subprocess.Process, tmp: Path | None) -> None:
        self.kind = kind
        self.proc = proc
        self.tmp = tmp
        self.port = 0
        self.lines: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stream_path(self) -> str:
        return "/v1/stream?topics=bench.*" if self.kind == "agentd" else "/stream"

    @classmethod
    async def start(cls, kind: str, profile: Path | None, label: str,
                    agentd_src: Path | None = None, send_timeout: float | None = None) -> Server:
        tmp: Path | None = None
        prefix = [sys.executable]
        if profile is not None:
            prefix += ["-m", "pyinstrument", "-r", "pstats", "-o", str(profile / f"{label}.pstats")]
        if kind == "agentd":
            tmp = Path(tempfile.mkdtemp(prefix="stream-bench-"))
            (tmp / "plugins").mkdir()
            (tmp / "plugins" / "streambench.py").write_text(PLUGIN_SOURCE)
            config = tmp / "agentd.toml"
            config.write_text(agentd_toml(tmp, send_timeout))
            args = [*prefix, "-m", "agentd", "run", "--config", str(config)]
        else:
            args = [*prefix, str(HERE / "sse_bare.py"), "--port", "0"]
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=child_setup, env=child_env(agentd_src), cwd=str(tmp or HERE),
            limit=16 << 20)
        server = cls(kind, proc, tmp)
        try:
            await asyncio.wait_for(server._wait_started(), START_TIMEOUT)
        except BaseException:
            await server.stop()
            raise
        server._drain = asyncio.get_running_loop().create_task(server._keep_reading())
        return server

    async def _wait_started(self) -> None:
        assert self.proc.stdout is not None
        wanted = "daemon.started" if self.kind == "agentd" else "bare.started"
        while True:
            line = (await self.proc.stdout.readline()).decode(errors="replace")
            if not line:
                raise RuntimeError(f"{self.kind} exited before it listened (code "
                                   f"{await self.proc.wait()}): {' | '.join(self.lines[-8:])}")
            self.lines.append(line.strip())
            record = json_object(line)
            if record.get("event") == wanted and record.get("port"):
                self.port = int(record["port"])
                return

    async def _keep_reading(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace").strip())
            del self.lines[:-200]

    def rss(self) -> int:
        """VmRSS in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)

    async def stop(self) -> None:
        await stop_child(self.proc, self._drain, self.tmp)


async def stop_child(proc: asyncio.subprocess.Process, drain: asyncio.Task[None] | None,
                     tmp: Path | None, *, close_stdin: bool = False) -> None:
    """End a child of the run: close its input (`close_stdin`: a client worker ends with
    it) or send SIGTERM, kill it past 30 s; stop the task reading its output (`drain`);
    remove its temp dir."""
    if proc.returncode is None:
        if close_stdin and proc.stdin is not None:
            proc.stdin.close()
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    if drain is not None:
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores spent on anything but idle and iowait (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def agentd_toml(tmp: Path, send_timeout: float | None = None) -> str:
    return "\n".join([
        "[daemon]", f'data_dir = "{tmp / "data"}"', "stop_timeout = 5.0",
        "[server]", 'host = "127.0.0.1"', "port = 0",
        "[streams]", "keepalive = 300.0",
        *([f"send_timeout = {send_timeout}"] if send_timeout is not None else []),
        "[plugins]", f'paths = ["{tmp / "plugins"}"]', "entry_points = false",
        "[log]", 'level = "info"', 'format = "json"', "",
    ])


def json_object(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- the driver: one level -----------------------------------------------------------------------


class Level:
    """One server at one client count: connect, saturate, pace, measure memory."""

    def __init__(self, args: argparse.Namespace, server: Server, workers: list[Worker],
                 session: Any, clients: int) -> None:
        self.args = args
        self.server = server
        self.workers = workers
        self.session = session
        self.clients = clients

    async def all(self, wait: float = CALL_TIMEOUT, **cmd: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(w.call(cmd, wait) for w in self.workers)))

    async def connect(self, count: int) -> int:
        """Open `count` more connections spread over the workers; return how many are open."""
        shares = [count // len(self.workers) + (i < count % len(self.workers))
                  for i in range(len(self.workers))]
        timeout = self.args.connect_timeout
        replies = await asyncio.gather(*(
            w.call({"op": "connect", "host": "127.0.0.1", "port": self.server.port,
                    "path": self.server.stream_path, "count": share,
                    "batch": self.args.connect_batch, "timeout": timeout}, timeout + 10)
            for w, share in zip(self.workers, shares, strict=True) if share))
        errors: dict[str, int] = {}
        for reply in replies:
            for key, n in reply["errors"].items():
                errors[key] = errors.get(key, 0) + n
        if errors:
            raise RuntimeError(f"could not open {count} streams: {errors}")
        return sum(r["open"] for r in await self.all(op="stats"))

    @property
    def window(self) -> int:
        """Per-client queue bound while saturating: --window, lowered so that all clients
        together hold at most --inflight undelivered events, but not under --min-window
        (with fewer, a client takes one event per wake-up and the figure is wake-up cost)."""
        scaled = min(self.args.window, self.args.inflight // self.clients)
        return max(1, min(self.args.window, max(self.args.min_window, scaled)))

    async def burst(self, rate: float, seconds: float, max_events: int) -> dict[str, Any]:
        body = {"rate": rate, "seconds": seconds, "max_events": max_events,
                "window": self.window, "pad": self.args.pad}
        timeout = seconds + 120
        if self.server.kind == "bare":
            async with self.session.post(f"{self.server.base}/burst", json=body,
                                         timeout=timeout_of(timeout)) as response:
                response.raise_for_status()
                result: dict[str, Any] = await response.json()
                return result
        request = {"name": "streambench.burst", "args": body, "max_attempts": 1}
        async with self.session.post(f"{self.server.base}/v1/tasks", json=request,
                                     timeout=timeout_of(30)) as response:
            task = await response.json()
            if response.status >= 400:
                raise RuntimeError(f"enqueue streambench.burst: HTTP {response.status}: {task}")
        deadline = time.monotonic() + timeout
        while task["status"] not in ("succeeded", "failed", "dead", "cancelled"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"streambench.burst still {task['status']} after {timeout:.0f} s")
            async with self.session.get(f"{self.server.base}/v1/tasks/{task['id']}?wait=30",
                                        timeout=timeout_of(60)) as response:
                task = await response.json()
        if task["status"] != "succeeded":
            raise RuntimeError(f"streambench.burst {task['status']}: {task.get('error')}")
        result = task["result"]
        return result

    async def settle(self, expected: int) -> bool:
        """Wait until the clients received `expected` deliveries (True), or nothing came for
        5 s, or 180 s passed (False: the next phase may still see this one's tail)."""
        deadline = time.monotonic() + 180
        last_total, last_change = -1, time.monotonic()
        while True:
            total = sum(s["received"] for s in await self.all(op="stats"))
            if total >= expected:
                return True
            if total != last_total:
                last_total, last_change = total, time.monotonic()
            if time.monotonic() - last_change > 5 or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)

    async def phase(self, rate: float, seconds: float, record: bool) -> dict[str, Any]:
        """One publisher run against the connected clients: its figures and the clients'."""
        await self.all(op="reset", record=record)
        open_before = sum(s["open"] for s in await self.all(op="stats"))
        pids = [self.server.pid, os.getpid(), *(w.proc.pid for w in self.workers)]
        ours0, busy0 = sum(map(process_cpu_s, pids)), machine_busy_s()
        cpu0, wall0 = self.server.cpu_s(), time.monotonic()
        client_cpu0 = sum(s["cpu_s"] for s in await self.all(op="stats"))
        pub = await self.burst(rate, seconds, self.args.max_events)
        settled = await self.settle(pub["published"] * open_before)
        cpu1, wall1 = self.server.cpu_s(), time.monotonic()
        ours1, busy1 = sum(map(process_cpu_s, pids)), machine_busy_s()
        final = await self.all(120, op="stats", latencies=record)
        received = sum(s["received"] for s in final)
        last = max(s["last"] for s in final)
        out: dict[str, Any] = {
            "settled": settled,
            "published": pub["published"], "received": received,
            "expected": pub["published"] * open_before,
            "missing": max(0, pub["published"] * open_before - received),
            "lagged": sum(s["lagged"] for s in final), "lost": sum(s["lost"] for s in final),
            "elapsed_s": max(1e-9, last - pub["first_sent"]) if received else 0.0,
            "server_cpu_pct": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 1),
            "client_cpu_s": round(sum(s["cpu_s"] for s in final) - client_cpu0, 2),
            # CPU the machine spent outside the bench's processes, in % of one core: other
            # work on the machine (and kernel time not charged to a process) skews figures.
            "other_cpu_pct": round(100 * max(0.0, (busy1 - busy0) - (ours1 - ours0))
                                   / (wall1 - wall0), 1),
            "publisher": pub,
        }
        if record:
            out["latencies"] = [x for s in final for x in s.get("latencies", ())]
        return out

    async def run(self) -> dict[str, Any]:
        args, n = self.args, self.clients
        await asyncio.sleep(0.5)
        rss0 = self.server.rss()
        opened = await self.connect(n)
        if opened < n:
            raise RuntimeError(f"only {opened} of {n} streams stayed open")
        await asyncio.sleep(0.5)
        rss_idle = self.server.rss()
        warm = await self.phase(0.0, args.warmup, record=False)  # warm-up, not counted
        reopened_warm = await self.reopen(n)
        sat = await self.phase(0.0, args.seconds, record=False)
        reopened = await self.reopen(n)
        rate = min(args.rate, args.paced_deliveries / n)
        paced_seconds = max(args.paced_seconds, 10 / rate)
        paced = await self.phase(rate, paced_seconds, record=True)
        rss_after = self.server.rss()
        await self.all(op="close")
        lat = paced.pop("latencies")
        row: dict[str, Any] = {
            "saturated_deliveries_per_s": round(sat["received"] / sat["elapsed_s"])
            if sat["received"] else 0,
            "paced_rate": round(rate, 3),
            **latency_figures(lat),
            "rss_per_client_bytes": round((rss_after - rss0) / n),
            "rss_mb": round(rss_after / 2**20, 1),
            "dropped_or_lagged": sat["missing"] + sat["lagged"] + paced["missing"] + paced["lagged"],
            "lagged": sat["lagged"] + paced["lagged"],
            "disconnected": sat["lost"] + paced["lost"],
            "missing": sat["missing"] + paced["missing"],
            "reconnected": reopened,
            "warmup_lagged": warm["lagged"], "warmup_reconnected": reopened_warm,
            "other_cpu_pct": max(sat["other_cpu_pct"], paced["other_cpu_pct"]),
            "rss_idle_per_client_bytes": round((rss_idle - rss0) / n),
            "rss_base_mb": round(rss0 / 2**20, 1),
            "saturated": {k: sat[k] for k in ("published", "received", "server_cpu_pct",
                                              "client_cpu_s", "other_cpu_pct")}
            | {"elapsed_s": round(sat["elapsed_s"], 3), "window": self.window,
               "settled": sat["settled"],
               "publisher_waits": sat["publisher"]["waits"],
               "peak_backlog": sat["publisher"]["peak_backlog"],
               "events_per_s": round(sat["published"] / max(sat["elapsed_s"], 1e-9), 1)},
            "paced": {"published": paced["published"], "received": paced["received"],
                      "seconds": round(paced_seconds, 1), "deliveries": len(lat),
                      "settled": paced["settled"],
                      "server_cpu_pct": paced["server_cpu_pct"],
                      "other_cpu_pct": paced["other_cpu_pct"]},
        }
        return row

    async def reopen(self, n: int) -> int:
        """Reconnect clients that were closed (lagged) so the next phase has all n again."""
        open_now = sum(s["open"] for s in await self.all(op="stats"))
        if open_now < n:
            await self.connect(n - open_now)
        return max(0, n - open_now)


class StuckLevel:
    """A few normal clients' paced latency without, beside, and again without `--stuck`
    clients that never read (one agentd process): what a stuck client costs the others."""

    def __init__(self, args: argparse.Namespace, server: Server, workers: list[Worker],
                 session: Any) -> None:
        self.args = args
        self.server = server
        self.workers = workers
        self.session = session
        # The normal clients' phases, with events the size of --stuck-pad.
        self.level = Level(argparse.Namespace(**{**vars(args), "pad": args.stuck_pad}), server,
                           workers, session, args.stuck_normal)

    async def subscriptions(self) -> int:
        async with self.session.get(f"{self.server.base}/v1/status") as response:
            response.raise_for_status()
            return int((await response.json())["bus"]["subscriptions"])

    async def until_subscriptions(self, count: int, timeout: float = 10.0) -> tuple[int, float]:
        """Wait (up to `timeout` s) until the server has at most `count` bus subscriptions;
        return how many it has and how long that took."""
        started = time.monotonic()
        while (now := await self.subscriptions()) > count and time.monotonic() - started < timeout:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return now, round(time.monotonic() - started, 2)

    async def measured(self) -> dict[str, Any]:
        args = self.args
        figures = await self.level.phase(args.stuck_rate, args.stuck_seconds, record=True)
        latencies = figures.pop("latencies")
        return {**latency_figures(latencies), "deliveries": len(latencies),
                "missing": figures["missing"], "lagged": figures["lagged"], "lost": figures["lost"],
                "server_cpu_pct": figures["server_cpu_pct"], "other_cpu_pct": figures["other_cpu_pct"]}

    async def run(self) -> dict[str, Any]:
        args, n = self.args, self.args.stuck
        await asyncio.sleep(0.5)
        baseline = await self.subscriptions()
        if await self.level.connect(args.stuck_normal) < args.stuck_normal:
            raise RuntimeError("the normal clients did not all stay open")
        rss0 = self.server.rss()
        before = await self.measured()
        shares = [n // len(self.workers) + (i < n % len(self.workers)) for i in range(len(self.workers))]
        await asyncio.gather(*(
            w.call({"op": "stuck", "host": "127.0.0.1", "port": self.server.port,
                    "path": self.server.stream_path, "count": share, "rcvbuf": args.stuck_rcvbuf,
                    "timeout": args.connect_timeout}, args.connect_timeout + 10)
            for w, share in zip(self.workers, shares, strict=True) if share))
        deadline = time.monotonic() + args.connect_timeout
        while await self.subscriptions() < baseline + args.stuck_normal + n:
            if time.monotonic() > deadline:
                raise RuntimeError("the stuck clients' streams did not all open")
            await asyncio.sleep(0.1)
        # Enough to fill every stuck client's socket buffers: from here on a write to one waits.
        fill = await self.level.phase(args.stuck_fill_rate, args.stuck_fill_seconds, record=False)
        beside = await self.measured()
        held = await self.subscriptions() - baseline - args.stuck_normal
        rss_beside = self.server.rss()
        await self.all(op="close_stuck")
        # Closed by their clients, the stuck streams should be released at once.
        left, release_s = await self.until_subscriptions(baseline + args.stuck_normal)
        reopened = await self.level.reopen(args.stuck_normal)
        after = await self.measured()
        await self.all(op="close")
        without = [x for x in (before["p99_ms"], after["p99_ms"]) if x is not None]
        return {
            "stuck": n, "normal": args.stuck_normal, "rate": args.stuck_rate,
            "seconds": args.stuck_seconds, "pad": args.stuck_pad,
            "p99_without_ms": round(statistics.mean(without), 2) if without else None,
            "p99_beside_ms": beside["p99_ms"],
            "p99_ratio": round(beside["p99_ms"] / statistics.mean(without), 2)
            if without and beside["p99_ms"] is not None else None,
            "stuck_held_after_beside": held,
            "fill_normal_lagged": fill["lagged"], "fill_normal_lost": fill["lost"],
            "normal_reopened": reopened,
            "stuck_left_after_close": max(0, left - baseline - args.stuck_normal),
            "stuck_release_s": release_s,
            "rss_stuck_mb": round((rss_beside - rss0) / 2**20, 1),
            "fill_events": fill["published"],
            "before": before, "beside": beside, "after": after,
            "other_cpu_pct": max(before["other_cpu_pct"], beside["other_cpu_pct"], after["other_cpu_pct"]),
        }

    async def all(self, **cmd: Any) -> list[dict[str, Any]]:
        return await self.level.all(**cmd)


async def run_stuck(args: argparse.Namespace, run: int, workers: list[Worker],
                    servers: list[Server], session: Any) -> dict[str, Any]:
    """The stuck-clients scenario on a fresh agentd, from its start to its stop."""
    row: dict[str, Any] = {"bench": "stream-stuck", "server": "agentd"}
    if args.repeat > 1:
        row["run"] = run + 1
    started = time.monotonic()
    try:
        row["other_cpu_before_pct"] = await wait_quiet(args.quiet_wait, workers)
        server = await Server.start("agentd", args.profile, f"agentd-stuck-{run + 1}", args.agentd_src,
                                    send_timeout=args.stuck_send_timeout)
        servers.append(server)
        try:
            row.update(await asyncio.wait_for(StuckLevel(args, server, workers, session).run(),
                                              args.level_timeout))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.gather(*(w.call({"op": "close"}) for w in workers))
                await asyncio.gather(*(w.call({"op": "close_stuck"}) for w in workers))
            await server.stop()
            servers.remove(server)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["level_s"] = round(time.monotonic() - started, 1)
    return row


def timeout_of(seconds: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


def latency_figures(latencies: list[float]) -> dict[str, Any]:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {"p50_ms": round(pct(50) * 1e3, 2), "p99_ms": round(pct(99) * 1e3, 2),
            "max_ms": round(ordered[-1] * 1e3, 2)}


# -- the driver: the whole run -------------------------------------------------------------------


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    import aiohttp

    rows: list[dict[str, Any]] = []
    limit = raise_fd_limit()
    workers: list[Worker] = []
    servers: list[Server] = []
    try:
        workers = [await Worker.start() for _ in range(args.workers)]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            levels = [] if args.stuck_only else itertools.product(args.clients, range(args.repeat), args.only)
            for n, run, kind in levels:
                discarded: list[float] = []
                while True:
                    row = await run_one(args, kind, n, run, limit, workers, servers, session)
                    other = row.get("other_cpu_pct", 0.0)
                    if other <= args.max_other or len(discarded) >= args.retries:
                        break
                    discarded.append(other)  # another process took CPU: measure again
                if discarded:
                    row["discarded_runs_other_cpu_pct"] = discarded
                rows.append(row)
                print(json.dumps(row), flush=True)
            for run in range(args.repeat if args.stuck and "agentd" in args.only else 0):
                row = await run_stuck(args, run, workers, servers, session)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                await server.stop()
        for worker in workers:
            with contextlib.suppress(Exception):
                await worker.stop()
    return rows


async def run_one(args: argparse.Namespace, kind: str, n: int, run: int, limit: int,
                  workers: list[Worker], servers: list[Server], session: Any) -> dict[str, Any]:
    """One server at one client count, from a fresh server process to its stop."""
    row: dict[str, Any] = {"bench": "stream", "server": SERVER_NAME[kind], "clients": n}
    if args.repeat > 1:
        row["run"] = run + 1
    started = time.monotonic()
    try:
        row["other_cpu_before_pct"] = await wait_quiet(args.quiet_wait, workers)
        if n + 200 > limit or n // args.workers + 200 > limit:
            raise RuntimeError(f"RLIMIT_NOFILE is {limit} (after raising the soft limit to the hard "
                               f"one): too few descriptors for {n} streams")
        label = f"{kind}-{n}" + (f"-{run + 1}" if args.repeat > 1 else "")
        server = await Server.start(kind, args.profile, label, args.agentd_src)
        servers.append(server)
        try:
            level = Level(args, server, workers, session, n)
            row.update(await asyncio.wait_for(level.run(), args.level_timeout))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.gather(*(w.call({"op": "close"}) for w in workers))
            await server.stop()
            servers.remove(server)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["level_s"] = round(time.monotonic() - started, 1)
    return row


async def wait_quiet(patience: float, workers: list[Worker]) -> float:
    """Wait (up to `patience` s) until the machine spends under 25 % of a core outside this
    bench for 2 s in a row; return the last such figure (other sessions' tests skew a run)."""
    deadline = time.monotonic() + patience
    pids = [os.getpid(), *(w.proc.pid for w in workers)]
    while True:
        ours0, busy0, t0 = sum(map(process_cpu_s, pids)), machine_busy_s(), time.monotonic()
        await asyncio.sleep(2.0)
        ours1, busy1 = sum(map(process_cpu_s, pids)), machine_busy_s()
        other = 100 * max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (time.monotonic() - t0)
        if other < 25 or time.monotonic() > deadline:
            return round(other, 1)


def summarize(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """One row per (server, clients): with --repeat, the median of each top-level figure over
    the runs that did not fail (the error of the last run when all failed)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["server"], row["clients"]), []).append(row)
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for key, group in groups.items():
        good = [r for r in group if "error" not in r]
        if not good:
            out[key] = group[-1]
            continue
        merged: dict[str, Any] = {}
        for field in good[0]:
            values = [r.get(field) for r in good]
            numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            merged[field] = statistics.median(numbers) if len(numbers) == len(values) else values[0]
        out[key] = merged
    return out


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, elapsed: float) -> str:
    import aiohttp

    stuck_rows = [r for r in rows if r["bench"] == "stream-stuck"]
    rows = [r for r in rows if r["bench"] == "stream"]
    if not rows:
        return stuck_table(stuck_rows, args)
    by = summarize(rows)
    lines = [
        f"stream_bench: {platform.python_implementation()} {platform.python_version()}, aiohttp "
        f"{aiohttp.__version__}, {os.cpu_count()} cores, {args.workers} client processes on the "
        f"same cores, window {args.window}, pad {args.pad} B, saturated {args.seconds:g} s, "
        f"{elapsed:.0f} s in all, load average {os.getloadavg()[0]:.2f} at the end, agentd "
        f"{agentd_origin(args.agentd_src)}",
        "",
        "| clients | bare sat. deliv/s | agentd sat. deliv/s | agentd/bare (≥ 0.8) | paced ev/s "
        "| bare p50 / p99 ms | agentd p50 / p99 ms | agentd/bare p99 (≤ 1.5) "
        "| RSS/client bare / agentd | agentd RSS MB | agentd lagged / missing "
        "| other CPU % bare / agentd |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.clients:
        bare, agentd = by.get(("bare-aiohttp", n), {}), by.get(("agentd", n), {})

        def num(row: dict[str, Any], key: str) -> Any:
            return row.get(key) if "error" not in row else None

        def ratio(a: Any, b: Any) -> str:
            return f"{a / b:.2f}" if isinstance(a, int | float) and isinstance(b, int | float) and b \
                else "-"

        def show(value: Any) -> str:
            if value is None:
                return "-"
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"

        def lat(row: dict[str, Any]) -> str:
            if "error" in row:
                return "error"
            return f"{show(row.get('p50_ms'))} / {show(row.get('p99_ms'))}"

        def rss(row: dict[str, Any]) -> str:
            value = num(row, "rss_per_client_bytes")
            return "-" if value is None else f"{value / 1024:.1f} KiB"

        lines.append(
            f"| {n:,} | {show(num(bare, 'saturated_deliveries_per_s'))} "
            f"| {show(num(agentd, 'saturated_deliveries_per_s'))} "
            f"| {ratio(num(agentd, 'saturated_deliveries_per_s'), num(bare, 'saturated_deliveries_per_s'))} "
            f"| {show(num(agentd, 'paced_rate') or num(bare, 'paced_rate'))} "
            f"| {lat(bare)} | {lat(agentd)} | {ratio(num(agentd, 'p99_ms'), num(bare, 'p99_ms'))} "
            f"| {rss(bare)} / {rss(agentd)} | {show(num(agentd, 'rss_mb'))} "
            f"| {show(num(agentd, 'lagged'))} / {show(num(agentd, 'missing'))} "
            f"| {show(num(bare, 'other_cpu_pct'))} / {show(num(agentd, 'other_cpu_pct'))} |")
    errors = [r for r in rows if "error" in r]
    for row in errors:
        lines.append(f"\n{row['server']} at {row['clients']:,} clients: {row['error']}")
    if stuck_rows:
        lines += ["", stuck_table(stuck_rows, args)]
    return "\n".join(lines)


def stuck_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The stuck-clients scenario, one line per run."""
    lines = [
        f"stuck clients: {args.stuck} that never read beside {args.stuck_normal} normal ones, "
        f"{args.stuck_rate:g} events/s of {args.stuck_pad} B for {args.stuck_seconds:g} s per phase, "
        f"send_timeout {args.stuck_send_timeout:g} s",
        "",
        "| run | p99 ms before / beside / after | beside / without (≤ 1.5) | p50 ms before / beside "
        "/ after | stuck held | server RSS for them MB | other CPU % |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in enumerate(rows, 1):
        if "error" in row:
            lines.append(f"| {n} | error: {row['error']} | | | | | |")
            continue
        phases = [row[k] for k in ("before", "beside", "after")]
        lines.append(
            f"| {n} | {' / '.join(str(p['p99_ms']) for p in phases)} | {row['p99_ratio']} "
            f"| {' / '.join(str(p['p50_ms']) for p in phases)} | {row['stuck_held_after_beside']} "
            f"| {row['rss_stuck_mb']} | {' / '.join(str(p['other_cpu_pct']) for p in phases)} |")
    return "\n".join(lines)


def agentd_origin(agentd_src: Path | None) -> str:
    """Which agentd the servers imported: --agentd-src, else PYTHONPATH's, else this checkout's."""
    if agentd_src is not None:
        return str(agentd_src)
    spec = importlib.util.find_spec("agentd")
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if origin is not None and origin.is_relative_to(REPO):
        return repo_revision()
    return str(origin.parent if origin is not None else "not importable")


def print_profiles(profile: Path) -> None:
    """The 25 functions with the most own time in each server profile pyinstrument wrote."""
    import pstats

    for path in sorted(profile.glob("*.pstats")):
        print(f"\n## {path.name}: top functions by own time", file=sys.stderr)
        try:
            stats = pstats.Stats(str(path), stream=sys.stderr)
        except Exception as exc:
            print(f"cannot read {path}: {exc}", file=sys.stderr)
            continue
        stats.sort_stats("tottime").print_stats(25)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", help="comma-separated client counts (default 100,1000,10000)")
    parser.add_argument("--only", default=",".join(SERVERS),
                        help="comma-separated subset of bare,agentd (default both, in that order)")
    parser.add_argument("--seconds", type=float, help="saturated publishing time (default 5)")
    parser.add_argument("--paced-seconds", type=float, help="paced publishing time (default 5)")
    parser.add_argument("--rate", type=float, default=10.0, help="paced events/s (default 10)")
    parser.add_argument("--paced-deliveries", type=float, default=10_000.0,
                        help="cap on rate x clients in the paced phase (default 10000)")
    parser.add_argument("--window", type=int, default=256,
                        help="most events a client may have queued while saturating (default 256; "
                             "agentd's client_buffer is 1000: a larger window makes it lag)")
    parser.add_argument("--inflight", type=int, default=50_000,
                        help="most undelivered events all clients together may have queued while "
                             "saturating: the window is lowered to inflight / clients "
                             "(default 50000)")
    parser.add_argument("--min-window", type=int, default=16,
                        help="floor of the lowered window (default 16: batches of 4 events)")
    parser.add_argument("--agentd-src", type=Path, metavar="DIR",
                        help="import agentd from DIR (a checkout's daemon/ directory, e.g. from "
                             "`git archive`) instead of the installed one")
    parser.add_argument("--pad", type=int, default=64, help="filler bytes in each event (default 64)")
    parser.add_argument("--max-events", type=int, default=1_000_000,
                        help="most events one publisher run sends (default 1000000)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="saturated seconds before the measured run (default 0.5)")
    parser.add_argument("--workers", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--connect-batch", type=int, default=250,
                        help="connections each worker opens at once (default 250)")
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="seconds to open a level's connections (default 120)")
    parser.add_argument("--level-timeout", type=float, default=600.0,
                        help="seconds one server at one client count may take (default 600)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run the servers under pyinstrument; write DIR/<server>-<N>.pstats "
                             "and print their top functions (slows the servers)")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="before each run, wait up to this many seconds for the machine's other "
                             "CPU use to drop under 25%% of a core (default 60; 0: do not wait)")
    parser.add_argument("--max-other", type=float, default=50.0,
                        help="a run during which other processes used more than this %% of a core "
                             "is measured again (default 50)")
    parser.add_argument("--retries", type=int, default=2,
                        help="how many times a run is measured again for --max-other (default 2)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each server at each client count, alternating servers; the "
                             "table shows medians (default 1)")
    parser.add_argument("--stuck", type=int, default=200,
                        help="stuck-clients scenario: streams that never read, opened beside "
                             "--stuck-normal normal ones (default 200; 0: skip the scenario)")
    parser.add_argument("--stuck-only", action="store_true",
                        help="run only the stuck-clients scenario")
    parser.add_argument("--stuck-normal", type=int, default=10,
                        help="normal clients whose latency is measured (default 10)")
    parser.add_argument("--stuck-rate", type=float, default=20.0,
                        help="paced events/s in each measured phase (default 20)")
    parser.add_argument("--stuck-seconds", type=float, default=10.0,
                        help="seconds of each measured phase (default 10)")
    parser.add_argument("--stuck-pad", type=int, default=1024,
                        help="filler bytes per event in the scenario (default 1024)")
    parser.add_argument("--stuck-fill-rate", type=float, default=500.0,
                        help="events/s that fill the stuck clients' buffers first (default 500)")
    parser.add_argument("--stuck-fill-seconds", type=float, default=2.0,
                        help="seconds of that fill (default 2)")
    parser.add_argument("--stuck-rcvbuf", type=int, default=0,
                        help="SO_RCVBUF of the stuck clients' sockets (default 0: the system's)")
    parser.add_argument("--stuck-send-timeout", type=float, default=60.0,
                        help="agentd's [streams] send_timeout in the scenario, long enough that "
                             "the stuck clients are held through the measured phase (default 60)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 50 clients, 1 s phases, unless given")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return args
    default_clients = "50" if args.quick else "100,1000,10000"
    try:
        args.clients = [int(c.replace("_", "")) for c in (args.clients or default_clients).split(",")]
    except ValueError:
        parser.error("--clients takes comma-separated whole numbers")
    args.seconds = args.seconds or (1.0 if args.quick else 5.0)
    args.paced_seconds = args.paced_seconds or (1.0 if args.quick else 5.0)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if set(args.only) - set(SERVERS) or not args.only:
        parser.error(f"--only takes a subset of {','.join(SERVERS)}")
    if min(args.clients) < 1 or min(args.workers, args.window, args.repeat) < 1 or args.rate <= 0:
        parser.error("--clients, --workers, --window, --repeat and --rate must be positive")
    return args


def main() -> int:
    args = parse_args()
    raise_fd_limit()
    if args.worker:
        with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
            asyncio.run(worker_main())
        return 0
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows = asyncio.run(run_all(args))
    print(markdown(rows, args, time.monotonic() - started), file=sys.stderr)
    if args.profile is not None:
        print_profiles(args.profile)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
