"""The composition root: `Daemon` builds every part from the configuration, starts them
all-or-nothing and stops them in stages, each with a deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from agentd import __version__, maintenance
from agentd.bus import Bus
from agentd.config import Config, check_serving_rules, unused_settings
from agentd.digests import SCHEDULE_PREFIX as DIGEST_SCHEDULE_PREFIX
from agentd.digests import Digests
from agentd.embed import BUILT_IN_EMBEDDERS, build_embedder
from agentd.errors import AgentdError, ConfigError, InvalidScheduleError
from agentd.eventlog import EventLog
from agentd.events import Event
from agentd.health import LagMonitor
from agentd.hooks import InboundHooks
from agentd.log import get_logger
from agentd.memory import MemoryStore, SqliteMemory
from agentd.metrics import ScheduleOutcomes
from agentd.plugins import PluginManager
from agentd.reload import Reloader
from agentd.safemode import SafeMode, StartJournal
from agentd.schedule import ScheduleSpec
from agentd.scheduler import Clock, DeclaredSource, Scheduler
from agentd.services import Services
from agentd.shutdown import (
    EXIT_MARGIN,
    EXIT_STOP_OVERRAN,
    ExitDeadline,
    SignalRelay,
    stage_deadline,
    stop_bound,
)
from agentd.spawn import Spawner
from agentd.storage import open_memory, open_storage
from agentd.store import Database
from agentd.supervise import Loop, LoopFactory, Supervisor
from agentd.systemd import Notifier
from agentd.task_warnings import warn_on_bad_ends
from agentd.taskdef import TaskRegistry
from agentd.taskqueue import TaskQueue
from agentd.throughput import ThroughputHistory
from agentd.waits import Waits
from agentd.watchdog import ServiceWatchdog
from agentd.web import (
    dashboard,
    events_api,
    memory_api,
    metrics_api,
    reload_api,
    schedules_api,
    streams,
    system,
    tasks_api,
    ws,
)
from agentd.web.server import STREAMS, HttpServer, build_app
from agentd.worker import WorkerPool

T = TypeVar("T")


class Daemon:
    """One agentd process: store → bus → handlers → plugins → workers → HTTP server.

    Use as `async with Daemon(config) as daemon: await daemon.wait_stopped()`. Entering
    starts everything or, if any part fails, stops what had started and re-raises.
    Leaving runs the staged stop.

    With `safe_mode` (what `StartJournal.begin` decided; may be set until `start`), it
    starts without plugins, workers and scheduler: the API, streams, memory and status
    serve, so an operator can look and fix, but nothing that may have crashed the previous
    starts runs. `starts` is the start record that `clear_safe_mode` clears (by default,
    the one of `config`).
    """

    def __init__(self, config: Config, notifier: Notifier | None = None,
                 clock: Clock | None = None, safe_mode: SafeMode | None = None,
                 starts: StartJournal | None = None) -> None:
        check_serving_rules(config)
        self.config = config
        self.safe_mode = safe_mode
        self.starts = starts or StartJournal(config)
        self.notifier = notifier or Notifier()
        self.storage = open_storage(config)
        self.store: Database = self.storage.database
        self.bus = Bus()
        self.spawner = Spawner(
            self.bus, config.daemon.handler_concurrency, config.daemon.handler_backlog
        )
        self.supervisor = Supervisor(self.bus)
        self.registry = TaskRegistry()
        self.queue = TaskQueue(self.storage.tasks, self.bus, self.registry, config.tasks,
                               steps=self.storage.steps)
        self.services = Services.from_config(config)
        self.waits = Waits(self.storage.waits, self.queue, self.bus)
        self.hooks = InboundHooks.from_config(config, self.storage.hook_deliveries)
        self.workers = WorkerPool(
            self.storage.tasks, self.queue, self.registry, config.tasks, config.plugins.settings,
            services=self.services, waits=self.waits)
        self.plugins = PluginManager(config, self.bus, self.spawner, self.queue, self.services)
        self.eventlog = EventLog(self.storage.events, self.bus, config.events)
        self.scheduler = Scheduler(self.storage.schedules, self.queue, self.bus, self.registry,
                                   self.plugins.enqueue_triggers, clock=clock)
        self.schedule_outcomes = ScheduleOutcomes(self.bus)  # for /metrics
        builtin_queue = maintenance.builtin_queue(config)
        self._maintenance = maintenance.register(
            self.registry, config, store=self.store, queue=self.queue, eventlog=self.eventlog,
            memory=lambda: self.services.memory, version=__version__)
        self.services.mailer.register(self.registry, builtin_queue)
        self.services.webhooks.register(self.registry, builtin_queue)
        self.digests = Digests(
            config.digests.settings, store=self.storage.digests, bus=self.bus, queue=self.queue,
            eventlog=self.eventlog, mailer=self.services.mailer, spawner=self.spawner)
        try:
            self.digests.check_persistence()
        except ValueError as exc:
            raise ConfigError(f"{config.source}: {exc}") from None
        self._maintenance += self.digests.register(self.registry, builtin_queue)
        warn_on_bad_ends(self.bus)
        self.lag = LagMonitor(stall_warning=config.daemon.stall_warning,
                              owner_of=self.plugins.owner_of)
        self.throughput = ThroughputHistory(self.queue.counts)
        self.server: HttpServer | None = None
        self.web_app: web.Application | None = None
        self.reloader = Reloader(self)
        self.serving = asyncio.Event()  # set once the start is over
        self.stopping = False
        self.plugins_started = False
        self.started_monotonic = time.monotonic()
        self._stop_requested = asyncio.Event()
        self._stop_reason: str | None = None
        self._hurried = asyncio.Event()
        self._services: list[Loop] = []
        self._log = get_logger("daemon")

    @property
    def port(self) -> int:
        """The bound HTTP port (differs from the configured one when that is 0)."""
        if self.server is None:
            raise RuntimeError("the daemon is not serving")
        return self.server.port

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start every part in dependency order; on any failure undo what started and raise."""
        for unused in unused_settings(self.config):
            self._log.warning("config.unused", message=unused)
        async with AsyncExitStack() as rollback:
            await self.store.open()
            rollback.push_async_callback(self.store.close)
            self._start_service(self.lag.run, "lag-monitor")
            if self.storage.sqlite is not None:
                self._start_service(self.storage.sqlite.run_checkpoints, "wal-checkpoints")
            if self.storage.postgres is not None:
                self._start_service(self.storage.postgres.run_listener, "pg-listener")
            self._start_service(self.throughput.run, "throughput")
            # Undone before the store closes: every later step may fail (a full disk).
            rollback.push_async_callback(self._stop_services)
            await self.eventlog.start()
            rollback.push_async_callback(self.eventlog.stop)
            rollback.push_async_callback(self.services.close)
            await self.digests.start()
            rollback.callback(self.digests.stop)
            if self.safe_mode is None:  # in safe mode, plugins are the first suspects
                await self.plugins.start_all(self.config.daemon.stop_timeout)
                rollback.push_async_callback(self.plugins.stop_all, self.config.daemon.stop_timeout)
            self.plugins_started = True
            if self.safe_mode is None or self.config.memory.embedder in BUILT_IN_EMBEDDERS:
                await self._open_memory(rollback)
            else:  # memory answers 503 rather than safe mode not starting at all
                self._log.warning("memory.closed_in_safe_mode", embedder=self.config.memory.embedder,
                                  reason="the embedder is a plugin's, and plugins are off")
            # Undone first on a failed start: the checkpoint loop must stop before memory closes.
            rollback.push_async_callback(self._stop_services)
            await self.waits.start()
            if self.safe_mode is None:  # a task, or what a schedule fires, may be the crash
                self._start_service(self.waits.run_timers, "wait-timers")
                await self.workers.start(self.supervisor)
                rollback.push_async_callback(self.workers.stop, self.config.daemon.stop_timeout)
                await self._start_scheduler()
                rollback.push_async_callback(self.scheduler.stop)
                self._start_service(self.scheduler.run, "scheduler")
            else:  # shown, and pausable, for the operator to stop one that crashes it
                await self.scheduler.load_stored()
                rollback.push_async_callback(self.scheduler.stop)
            web_app = build_app(self, system.routes, tasks_api.routes, events_api.routes,
                                streams.routes, ws.routes, schedules_api.routes, memory_api.routes,
                                reload_api.routes, metrics_api.routes, dashboard.routes)
            server = HttpServer(web_app, self.config.server.host, self.config.server.port)
            await server.start()
            self.server, self.web_app = server, web_app
            rollback.pop_all()
        if self.notifier.enabled:
            self._start_service(self._service_watchdog(web_app).run, "watchdog")
        safe = self.safe_mode is not None
        self.bus.publish("daemon.started", {"version": __version__, "port": self.port,
                                            "safe_mode": safe})
        self._log.info("daemon.started", version=__version__, host=self.config.server.host,
                       port=self.port, database=self.store.location, safe_mode=safe)
        self.notifier.ready(f"serving on {self.config.server.host}:{self.port}"
                            + (" in safe mode" if safe else ""))
        self.serving.set()

    async def _open_memory(self, rollback: AsyncExitStack) -> None:
        """Open memory with the configured embedder (closed by `rollback` on a failed start)."""
        embedder = build_embedder(self.config, self.plugins.embedders())
        memory = open_memory(self.config, embedder)
        await memory.open()
        rollback.push_async_callback(memory.close)
        self.services.memory = memory
        if isinstance(memory, SqliteMemory):
            # memory.db's WAL grows like the main file's (to hundreds of MB under bulk
            # remember(), with recall three times slower) unless it is checkpointed too.
            self._start_service(memory.store.run_checkpoints, "memory-wal-checkpoints")

    async def _start_scheduler(self) -> None:
        """Start the scheduler with the built-in, agentd.toml and plugin schedules (re-synced
        at every start)."""
        await self.scheduler.start(self._declared_schedules(), outcomes=self.eventlog.streams)

    def check_config_schedules(self, config: Config) -> None:
        """Check `config`'s `[[schedules]]` as a start would, against the tasks registered
        now (a reload's check, before anything changes).

        Raises:
            ConfigError: as `_declared_schedules`.
        """
        self._declared_schedules(config)

    async def redeclare_schedules(self) -> list[str]:
        """Re-sync the declared schedules with the configuration and the plugins as they
        are now (after a reload); the ids added, changed or removed.

        Raises:
            ConfigError: as `_declared_schedules` (then the schedules stay as they were).
            InvalidScheduleError: likewise.
        """
        self._maintenance = [spec for spec in self._maintenance
                             if not spec.id.startswith(DIGEST_SCHEDULE_PREFIX)]
        self._maintenance += self.digests.schedules()
        return await self.scheduler.redeclare(self._declared_schedules())

    def _declared_schedules(self, config: Config | None = None) -> list[tuple[ScheduleSpec, DeclaredSource]]:
        """The built-in, plugin and agentd.toml schedules (of `config`, by default the
        daemon's), each checked against the registered tasks. A bad plugin schedule fails
        its plugin alone, and the daemon runs on.

        Raises:
            ConfigError: an agentd.toml schedule would fail at every fire (checked after the
                plugins, so a task of a plugin that failed counts as missing), or has the id
                of a loaded plugin's schedule (the scheduler keeps one schedule per id: one of
                the two would be lost without a word).
        """
        declared: list[tuple[ScheduleSpec, DeclaredSource]] = [
            (spec, maintenance.SOURCE) for spec in self._maintenance]
        by_plugin: dict[str, str] = {}  # a plugin schedule's id → its plugin
        for record in list(self.plugins.plugins.values()):
            if record.state not in ("loaded", "started") or record.plugin is None:
                continue
            try:
                specs = record.plugin._configured_schedules()
                for spec in specs:
                    self.scheduler.check(spec, "plugin")
            except InvalidScheduleError as exc:
                self.plugins.fail(record.name, exc)
                continue
            declared += [(spec, "plugin") for spec in specs]
            by_plugin.update((spec.id, record.name) for spec in specs)
        config = config or self.config
        for number, spec in enumerate(config.schedules, start=1):
            if spec.id in by_plugin:
                name = by_plugin[spec.id]
                raise ConfigError(f"{config.source}: [[schedules]] #{number} ({spec.id}): id "
                                  f"{spec.id!r} is plugin {name}'s schedule; choose another id, or "
                                  f"retime the plugin's in [plugins.{name}.schedules."
                                  f"{spec.id.removeprefix(name + '.')}]")
            try:
                self.scheduler.check(spec, "config")
            except InvalidScheduleError as exc:
                raise ConfigError(f"{config.source}: {exc}") from None
            declared.append((spec, "config"))
        return declared

    async def check(self) -> None:
        """What `agentd check-config` runs: build what `start` builds, short of opening the
        store, running plugin startup hooks, starting loops and serving. It loads the
        plugins (their failures are recorded in `plugins`, as `run` records them), checks
        every schedule against the registered tasks and builds the memory embedder.

        Raises:
            ConfigError: what would stop `agentd run`, naming the file and key.
        """
        self.plugins.load_all()
        self._declared_schedules()
        build_embedder(self.config, self.plugins.embedders())

    async def publish_durably(self, topic: str, data: Mapping[str, Any], *,
                              alongside: Callable[[Any], object] | None = None) -> Event:
        """Publish, after committing the event to the log and the tasks of the durable
        handlers it triggers, in one transaction: what the caller is told was published
        cannot be lost by a crash, and a write the store refuses (StoreWriteError) refuses
        the publish, leaving neither, before anyone sees the event. `alongside`, a write op
        of the caller's (of the store's engine), commits in that transaction too, before
        the event's row; an exception it raises refuses the publish likewise."""
        await self.eventlog.ahead_of_durable()
        event = self.bus.reserve_event(topic, data)
        try:
            commit = self.plugins.enqueue_triggers(
                event, alongside=_in_turn(alongside, self.eventlog.row_writer(event)))
        except BaseException:  # the row could not be made (data that cannot be encoded)
            self.bus.release(event)
            raise
        await self.bus.dispatch_once_committed(event, commit)
        return event

    async def clear_safe_mode(self) -> SafeMode | None:
        """Forget the recorded safe mode and crashes: the next start is a normal one. A
        daemon serving in safe mode stays in it until restarted (its plugins, workers and
        scheduler were never started; its routes are fixed): its `safe_mode` is marked
        cleared. Return the safe mode that was recorded (None: none was)."""
        previous = await asyncio.to_thread(self.starts.clear)
        if self.safe_mode is not None:
            self.safe_mode = dataclasses.replace(self.safe_mode, cleared=True)
        if previous is not None or self.safe_mode is not None:
            self._log.warning("daemon.safe_mode_cleared", by="POST /v1/safe-mode/clear",
                              restart_needed=self.safe_mode is not None)
        return previous

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the daemon to stop (signal handlers call this; it only sets a flag)."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stop_requested.set()

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was asked for (it may not have begun: the start finishes first)."""
        return self._stop_requested.is_set()

    def hurry(self, reason: str = "requested again") -> None:
        """Ask a stop under way (or to come) to stop waiting for running handlers and
        tasks: they are cancelled at once, the tasks put back. The stages that close
        things still run, each within its deadline."""
        if not self._hurried.is_set():
            self._log.warning("daemon.stop_hurried", reason=reason)
        self._hurried.set()

    async def wait_stopped(self) -> None:
        """Return once a stop was requested."""
        await self._stop_requested.wait()

    async def stop(self) -> None:
        """Stop in the stages of `STOP_STAGES`, each within its deadline, so that the whole
        stop takes at most `stop_bound(config.daemon)`. Each stage logs what it waits for;
        `daemon.stopped` says how long it all took and how many tasks went back to the
        queue (null if the workers' stage ran out of time). Idempotent."""
        if self.stopping:
            return
        self.stopping = True  # stage 1: intake closed (HTTP refuses new work)
        self._stop_requested.set()
        self.reloader.cancel()
        began = time.monotonic()
        timeout = self.config.daemon.stop_timeout
        bound = stop_bound(self.config.daemon)
        # systemd then waits as long as agentd may take, whatever TimeoutStopSec says.
        self.notifier.stopping(f"stopping (within {bound:g} s)", within=bound + EXIT_MARGIN)
        self._log.info("daemon.stopping", reason=self._stop_reason or "requested", bound=bound)
        self.bus.publish("daemon.stopping", {})
        self.digests.stop()
        timed_out: list[str] = []
        await self._stage("drain handlers", self._drain_handlers(timeout), timed_out,
                          f"{len(self.spawner)} handlers running or waiting")
        # The scheduler fires nothing more.
        await self._stage("stop background loops", self._stop_services(), timed_out,
                          ", ".join(loop.name for loop in self._services))
        put_back = await self._stage(
            "stop workers", self.workers.stop(timeout, self._hurried), timed_out,
            self.workers.describe_running())
        await self._stage("stop scheduler", self.scheduler.stop(), timed_out,
                          "the schedule outcomes being recorded")
        hooked = [name for name, record in self.plugins.plugins.items()
                  if record.state == "started" and record.plugin is not None
                  and record.plugin._shutdown_hooks]
        await self._stage("stop plugins", self.plugins.stop_all(timeout), timed_out,
                          f"shutdown hooks of {', '.join(hooked) or 'no plugin'}")
        await self._stage("close HTTP clients", self.services.close(), timed_out,
                          "outbound connections (LLM, mail, webhooks)")
        if self.server is not None:
            await self._stage("close server", self.server.close(), timed_out,
                              "open HTTP requests, streams and WebSockets")
        await self._stage("flush event log", self.eventlog.stop(), timed_out,
                          "events recorded but not yet committed")
        self.bus.close()
        if self.memory is not None:
            await self._stage("close memory", self.memory.close(), timed_out,
                              f"{self.memory.location}'s last writes and connections")
        await self._stage("close store", self.store.close(), timed_out,
                          f"{self.store.name}'s last writes and connections")
        self._log.info("daemon.stopped", took=round(time.monotonic() - began, 3),
                       put_back=put_back, timed_out=timed_out)

    async def _drain_handlers(self, timeout: float) -> None:
        """Let running handlers finish for `timeout` s, or until `hurry()`; cancel the rest."""
        draining = asyncio.ensure_future(self.spawner.drain(timeout))
        hurried = asyncio.ensure_future(self._hurried.wait())
        try:
            done, _ = await asyncio.wait({draining, hurried}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurried.cancel()
            draining.cancel()  # a no-op once drained; else hurried, or the stage ran out of time
        if draining not in done:  # hurried: cancel the handlers now
            await asyncio.wait({draining})
            await self.spawner.drain(0)
        if not draining.cancelled():
            draining.result()  # a failure of the drain itself fails the stage, which logs it

    @property
    def memory(self) -> MemoryStore | None:
        """Sessions and long-term memory; None until it opens (after plugins start)."""
        return self.services.memory

    async def _stage(self, name: str, work: Awaitable[T], timed_out: list[str],
                     waits_for: str) -> T | None:
        """Run one stop stage within its deadline (`stage_deadline`); its result, or None
        when it timed out (its name then added to `timed_out`) or failed."""
        deadline = stage_deadline(name, self.config.daemon.stop_timeout)
        self._log.info("daemon.stop_stage", stage=name, deadline=deadline, waits_for=waits_for)
        try:
            return await asyncio.wait_for(work, deadline)
        except TimeoutError:
            self._log.warning("daemon.stop_stage_timed_out", stage=name, deadline=deadline)
            timed_out.append(name)
        except Exception:
            self._log.exception("daemon.stop_stage_failed", stage=name)
        return None

    def _start_service(self, factory: LoopFactory, name: str) -> None:
        """Run one of the daemon's own loops under the supervisor (restarted if it fails)."""
        self._services.append(self.supervisor.start(name, factory))

    async def _stop_services(self) -> None:
        """Cancel the daemon's own loops; one that ends with an exception is logged."""
        stopping = [loop.stop() for loop in self._services]
        self._services.clear()
        await asyncio.gather(*stopping)

    def _service_watchdog(self, web_app: web.Application) -> ServiceWatchdog:
        """What systemd hears while the daemon serves (see agentd/watchdog.py)."""

        async def queued() -> int:
            return (await self.queue.counts()).get("queued", 0)

        return ServiceWatchdog(
            self.notifier, lag=lambda: self.lag.lag, max_lag=self.config.server.max_loop_lag,
            running=lambda: len(self.workers.running), queued=queued,
            streams=lambda: len(web_app[STREAMS]), stopping=lambda: self.stopping,
            safe_mode=lambda: self.safe_mode is not None, reloading=lambda: self.reloader.busy)


async def serve(config: Config, leave_safe_mode: bool = False) -> None:
    """Run a daemon until SIGTERM or SIGINT, then stop it in stages; reload agentd.toml at
    each SIGHUP (`Reloader`). A second SIGTERM or SIGINT hurries the stop (`Daemon.hurry`).

    The start is recorded first of all once the configuration is accepted (`StartJournal`),
    and decides whether the daemon serves in safe mode; `leave_safe_mode` (`agentd run
    --no-safe-mode`) clears the record first. The start is marked survived once the
    daemon has served `[daemon] safe_mode_after` seconds, stopped when SIGTERM or SIGINT
    asks for a stop, failed when the start fails with an error it reports.

    For the process's main thread: from the first SIGTERM or SIGINT (during the start
    too, which finishes first) the process ends within `stop_bound` + `EXIT_MARGIN` s, by
    `os._exit` if anything still holds it then (a sync startup hook blocking the loop).
    """
    log = get_logger("daemon")
    starts = StartJournal(config)
    daemon = Daemon(config, starts=starts)  # a configuration it refuses touches no state
    daemon.safe_mode = safe_mode = starts.begin(leave_safe_mode=leave_safe_mode)
    if safe_mode is not None:
        log.warning("daemon.safe_mode", **safe_mode.to_dict(),
                    clear="fix the cause, then `agentd run --no-safe-mode`, or POST "
                          "/v1/safe-mode/clear and restart")
    try:
        await _serve(daemon, starts)
    except (AgentdError, OSError):  # reported by the caller: an orderly end, not a crash
        await asyncio.to_thread(starts.ended, "failed")
        raise


async def _serve(daemon: Daemon, starts: StartJournal) -> None:
    """`serve`'s daemon, started, served until a stop is asked for, and stopped."""
    config = daemon.config
    log = get_logger("daemon")
    deadline = ExitDeadline(stop_bound(config.daemon) + EXIT_MARGIN, EXIT_STOP_OVERRAN)

    def on_arrival(signum: signal.Signals) -> None:
        if signum is not signal.SIGHUP:
            deadline.arm()

    def on_signal(signum: signal.Signals) -> None:
        if signum is signal.SIGHUP:
            log.info("daemon.reload_requested", trigger=signum.name)
            daemon.reloader.request(signum.name)
        elif daemon.stop_requested:
            daemon.hurry(signum.name)
        else:
            daemon.request_stop(signum.name)
            # At once, on the loop (one small write): a kill during a slow start or stop
            # that follows is no crash of the start.
            starts.ended("stopped")

    async def survive() -> None:
        await asyncio.sleep(config.daemon.safe_mode_after)
        if await asyncio.to_thread(starts.survived):
            log.info("daemon.start_survived", after=config.daemon.safe_mode_after)

    # Relayed from before the start: READY=1 and "daemon.started" may be acted on at once.
    with SignalRelay(on_signal, on_arrival):
        async with daemon:
            surviving = asyncio.create_task(survive(), name="start-survival")
            try:
                await daemon.wait_stopped()
            finally:
                surviving.cancel()
            deadline.arm()


def _in_turn(first: Callable[[Any], object] | None,
             then: Callable[[Any], object] | None) -> Callable[[Any], object] | None:
    """Two write ops (None: none) as one, run in turn on one connection: awaited where they
    are coroutine functions (PostgreSQL's), called where they are plain ones (SQLite's)."""
    if first is None or then is None:
        return then if first is None else first

    def both(conn: Any) -> object:
        done = first(conn)
        if not inspect.isawaitable(done):
            return then(conn)

        async def rest() -> None:
            await done
            after = then(conn)
            if inspect.isawaitable(after):
                await after

        return rest()

    return both
