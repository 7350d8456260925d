"""`GET /metrics`: the daemon's figures in Prometheus' text format (0.0.4).

Counters and histograms are kept where the events happen (the queue's task events, the
workers' attempts, the access middleware, memory's recalls, the LLM client, the
scheduler's events) and only read here. Gauges are read now: the store's per-queue counts
(one indexed query), memory's counts (memory's `stats`), the database files' sizes, the
loop's lag and the process's CPU and memory. A part whose figures cannot be read within
`READ_TIMEOUT` (the store away) leaves its families without samples and sets
`agentd_scrape_failed{part}`, so the rest still goes out. docs/operations.md lists every
family.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from agentd import __version__
from agentd.log import get_logger
from agentd.memory import SqliteMemory
from agentd.metrics import CONTENT_TYPE, Exposition, Labels
from agentd.taskqueue import QueueFigures
from agentd.web.openapi import doc
from agentd.web.server import DAEMON, HTTP_METRICS, SOCKETS, STREAMS

if TYPE_CHECKING:
    from agentd.app import Daemon

T = TypeVar("T")
routes = web.RouteTableDef()
READ_TIMEOUT = 5.0  # seconds a scrape waits for one part's figures from a store
_log = get_logger("metrics")

# Task events (TaskQueue.published) → the counter family that counts them.
_TASK_COUNTERS = (
    ("task.queued", "agentd_tasks_enqueued_total",
     "Tasks put in the queue by this daemon: enqueued, requeued by hand, or recovered after a crash."),
    ("task.started", "agentd_tasks_started_total", "Attempts started on this daemon."),
    ("task.retrying", "agentd_tasks_retried_total", "Attempts that failed and were scheduled again."),
    ("task.succeeded", "agentd_tasks_succeeded_total", "Tasks that succeeded."),
    ("task.failed", "agentd_tasks_failed_total", "Tasks that failed for good (no retry)."),
    ("task.dead", "agentd_tasks_dead_total", "Tasks that failed their last attempt (dead letters)."),
    ("task.cancelled", "agentd_tasks_cancelled_total", "Tasks cancelled."),
)


@routes.get("/metrics")
@doc("Prometheus metrics: tasks, queues, HTTP, streams, bus, handlers, schedules, memory, LLM "
     "tokens, database files, loop lag and the process (the bearer token, or `[metrics] token`)",
     tag="system", scrape=True, media_type="text/plain; version=0.0.4",
     responses={200: "The metrics in Prometheus' text exposition format 0.0.4"},
     schemas={200: {"type": "string"}})
async def metrics(request: web.Request) -> web.Response:
    text = await scrape(request.app)
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


async def scrape(app: web.Application) -> str:
    """The text of one scrape of the daemon serving `app`."""
    daemon = app[DAEMON]
    out = Exposition()
    failed: dict[Labels, int] = {}
    now = time.time()
    figures, stores, memory = await asyncio.gather(
        _read("tasks", daemon.queue.tasks.by_queue(now), failed),
        _read("store", _store_sizes(daemon), failed),
        _read("memory", daemon.memory.stats(), failed) if daemon.memory is not None else _none(),
    )
    _tasks(out, daemon, figures or [], now)
    _http(out, app)
    _events(out, daemon)
    _memory(out, daemon, memory)
    _llm(out, daemon)
    out.gauge("agentd_database_bytes", "Size of each database (SQLite: its main file's pages).",
              ("database",), {(name,): size for name, (size, _) in (stores or {}).items()})
    out.gauge("agentd_database_wal_bytes", "Size of each SQLite database's write-ahead log.",
              ("database",), {(name,): wal for name, (_, wal) in (stores or {}).items() if wal is not None})
    out.gauge("agentd_event_loop_lag_seconds", "How late the event loop ran a timer (the worst of "
              "the last two seconds).", (), {(): daemon.lag.lag})
    _process(out, daemon)
    out.gauge("agentd_build_info", "The running agentd's version (always 1).", ("version",),
              {(__version__,): 1})
    out.gauge("agentd_scrape_failed", "1 for each part whose figures could not be read for this "
              "scrape (its families have no samples): tasks, store, memory.", ("part",), failed)
    return out.text()


async def _read(part: str, reading: Awaitable[T], failed: dict[Labels, int]) -> T | None:
    """What `reading` gives, or None (noted in `failed`) when it fails or takes too long."""
    try:
        return await asyncio.wait_for(reading, READ_TIMEOUT)
    except Exception as exc:
        _log.warning("metrics.part_failed", part=part, error=f"{type(exc).__name__}: {exc}")
        failed[(part,)] = 1
        return None


async def _none() -> None:
    return None


async def _store_sizes(daemon: Daemon) -> dict[str, tuple[int, int | None]]:
    """Each database's name → its size and its WAL's size (None: no WAL to measure)."""
    stores: list[Any] = [daemon.store]
    if isinstance(daemon.memory, SqliteMemory):
        stores.append(daemon.memory.store)
    sizes = {}
    for store in stores:
        stats = await store.stats(())
        wal = stats.get("wal_bytes")
        sizes[store.name] = (int(stats["bytes"] or 0), None if wal is None else int(wal))
    return sizes


def _tasks(out: Exposition, daemon: Daemon, figures: list[QueueFigures], now: float) -> None:
    queues = daemon.config.tasks.queues
    by_state: dict[Labels, int] = {(queue, state): 0 for queue in queues for state in ("queued", "running")}
    depth: dict[Labels, int] = {(queue,): 0 for queue in queues}
    oldest: dict[Labels, float] = {(queue,): 0.0 for queue in queues}
    for figure in figures:
        by_state[figure.queue, figure.status] = figure.tasks
        if figure.status == "queued":
            depth[(figure.queue,)] = figure.due
            oldest[(figure.queue,)] = 0.0 if figure.oldest_due is None else max(0.0, now - figure.oldest_due)
    out.gauge("agentd_tasks", "Tasks in the store by queue and state (every daemon's; succeeded "
              "tasks are not counted: see agentd_tasks_succeeded_total).", ("queue", "state"), by_state)
    out.gauge("agentd_queue_depth", "Queued tasks whose time has come, by queue.", ("queue",), depth)
    out.gauge("agentd_queue_oldest_age_seconds", "How long the longest-waiting due task of each "
              "queue has been due (0: none is).", ("queue",), oldest)
    names = daemon.registry.names()
    published = daemon.queue.published
    for topic, family, help_text in _TASK_COUNTERS:
        counts: dict[Labels, int] = {(name,): 0 for name in names}
        counts.update(((name,), n) for (counted, name), n in published.items() if counted == topic)
        out.counter(family, help_text, ("task",), counts)
    out.histogram("agentd_task_run_seconds", "How long attempts' code ran on this daemon, by task.",
                  ("task",), daemon.workers.run_seconds.by_labels)
    out.histogram("agentd_task_dispatch_latency_seconds", "How long a due task waited for its "
                  "attempt to start on this daemon (claim and free slot), by task.", ("task",),
                  daemon.workers.dispatch_seconds.by_labels)
    out.gauge("agentd_worker_running_tasks", "Attempts running on this daemon now.", (),
              {(): len(daemon.workers.running)})


def _http(out: Exposition, app: web.Application) -> None:
    http = app[HTTP_METRICS]
    out.counter("agentd_http_requests_total", "HTTP requests answered, by method, route (its "
                "template; unmatched: no route) and status (499: the client left first).",
                ("method", "route", "status"), http.requests)
    out.histogram("agentd_http_request_duration_seconds", "How long HTTP requests took to answer, "
                  "by method and route (a stream: its whole life).", ("method", "route"),
                  http.seconds.by_labels)
    out.gauge("agentd_stream_clients", "Open SSE and WebSocket stream subscriptions.", (),
              {(): len(app[STREAMS])})
    out.gauge("agentd_websockets", "Open WebSocket connections.", (), {(): len(app[SOCKETS])})


def _events(out: Exposition, daemon: Daemon) -> None:
    buses = {"daemon": daemon.bus}
    if daemon.eventlog.streams is not daemon.bus:  # PostgreSQL: stream clients' own bus
        buses["streams"] = daemon.eventlog.streams
    stats = {(name,): bus.stats() for name, bus in buses.items()}
    out.counter("agentd_bus_published_total", "Events delivered by each bus (daemon: this "
                "daemon's; streams: what stream clients read, on PostgreSQL).", ("bus",),
                {labels: figures["published"] for labels, figures in stats.items()})
    out.counter("agentd_bus_dropped_total", "Events dropped by full subscriber buffers (a slow "
                "stream client's), by bus.", ("bus",),
                {labels: figures["dropped"] for labels, figures in stats.items()})
    out.gauge("agentd_bus_subscriptions", "Subscriptions to each bus.", ("bus",),
              {labels: figures["subscriptions"] for labels, figures in stats.items()})
    spawner = daemon.spawner
    out.counter("agentd_handler_failures_total", "Event handlers that raised.", (), {(): spawner.failed})
    out.counter("agentd_handlers_dropped_total", "Event handlers not run: the handler backlog was "
                "full, or the daemon was stopping.", (), {(): spawner.dropped})
    out.gauge("agentd_handlers_running", "Event handlers running or waiting for a place.", (),
              {(): len(spawner)})
    outcomes = daemon.schedule_outcomes
    ids = _zeros(daemon.scheduler.schedules)
    out.counter("agentd_schedule_fires_total", "Schedule fires on this daemon, by schedule id.",
                ("schedule",), {**ids, **outcomes.fires})
    out.counter("agentd_schedule_misses_total", "Schedule fires missed (late, or refused by the "
                "overlap policy), by schedule id.", ("schedule",), {**ids, **outcomes.misses})


def _memory(out: Exposition, daemon: Daemon, stats: Mapping[str, Any] | None) -> None:
    namespaces: Mapping[str, int] = stats["namespaces"] if stats else {}
    out.gauge("agentd_memories", "Long-term memories (current versions), by namespace.",
              ("namespace",), {(name,): count for name, count in namespaces.items()})
    out.gauge("agentd_memory_sessions", "Conversation sessions kept.", (),
              {(): stats["sessions"]} if stats else {})
    out.gauge("agentd_memory_messages", "Messages of the sessions kept.", (),
              {(): stats["messages"]} if stats else {})
    memory = daemon.memory
    out.histogram("agentd_memory_recall_duration_seconds", "How long recalls took (embedding the "
                  "query and searching).", (), {(): memory.recall_seconds} if memory is not None else {})
    batcher = memory.batcher if memory is not None else None
    out.counter("agentd_memory_embed_calls_total", "Calls to the embedding model (each embeds the "
                "texts of every caller waiting at the time).", (),
                {(): batcher.model_calls} if batcher else {})
    out.counter("agentd_memory_embedded_texts_total", "Texts embedded (divided by the calls: the "
                "mean batch).", (), {(): batcher.texts_embedded} if batcher else {})
    out.gauge("agentd_memory_embed_queued", "Texts waiting for the embedding model.", (),
              {(): batcher.queued} if batcher else {})
    out.gauge("agentd_memory_remembers_in_flight", "remember() calls not answered yet (waiting "
              "for their group, being embedded or written).", (),
              {(): memory.grouped.unanswered} if memory is not None else {})


def _llm(out: Exposition, daemon: Daemon) -> None:
    llm = daemon.services.llm
    out.counter("agentd_llm_tokens_total", "LLM tokens spent by tasks, by model, task and kind "
                "(prompt or completion; estimated where the server reported none).",
                ("model", "task", "kind"), llm.tokens)
    out.counter("agentd_llm_calls_total", "LLM chat calls made by tasks, by model and task.",
                ("model", "task"), llm.calls)


def _process(out: Exposition, daemon: Daemon) -> None:
    times = os.times()
    out.counter("process_cpu_seconds_total", "CPU time the process used (user and system).", (),
                {(): times.user + times.system})
    rss = _resident_bytes()
    out.gauge("process_resident_memory_bytes", "Resident memory of the process.", (),
              {(): rss} if rss is not None else {})
    fds = _open_fds()
    out.gauge("process_open_fds", "Open file descriptors of the process.", (),
              {(): fds} if fds is not None else {})
    started = time.time() - (time.monotonic() - daemon.started_monotonic)
    out.gauge("process_start_time_seconds", "When the daemon started (Unix time).", (), {(): started})


def _resident_bytes() -> int | None:
    """The process's resident set size, from /proc (None where there is none)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _zeros(ids: Iterable[str]) -> Counter[Labels]:
    return Counter({(name,): 0 for name in ids})
