"""Discovering, loading, starting and unloading plugins, each isolated from the others.

Sources, in this order: every `*.py` module and every package (a folder with
`__init__.py`) in the configured plugin directories, then the `agentd.plugins`
entry-point group. A module declares `plugin = Plugin("name")`. `[plugins] enabled`
(when not empty) and `disabled` filter by plugin name and, before import, by module name.

Loading (import, then registering the plugin's tasks) is what `agentd check-config`
checks too; starting (subscribing its handlers, running its startup hooks) is `run`'s alone.
A plugin that fails to import or to start is recorded as `failed` with its error, its
registrations are removed, and the daemon runs on. Everything a plugin registers is
undone when it is unloaded. A configured plugin directory that does not exist is a
warning (in `warnings`, shown by `/healthz`), not an error.

Reloading one plugin (`reload`) imports its file again as a new module, and only once that
worked swaps it in: the old code's shutdown hooks run, its registrations are undone and the
new code's made in one step (no moment without the plugin's tasks), then its startup hooks
run. A task already running keeps the function it started with; new tasks get the new code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import structlog

from agentd import protocols as api
from agentd.bus import Bus
from agentd.config import Config
from agentd.embed import Embedder
from agentd.errors import PluginError, PluginNotFoundError, describe
from agentd.events import Event, TopicPattern, check_event_data, check_publishable
from agentd.log import get_logger
from agentd.mail import MailSender
from agentd.plugin import HandlerSpec, Hook, Plugin
from agentd.services import Services
from agentd.spawn import Spawner
from agentd.store import Connection
from agentd.taskdef import TaskDef
from agentd.taskqueue import TaskQueue, TaskRecord, TaskRequest
from agentd.webhooks import WebhookSender

ENTRY_POINT_GROUP = "agentd.plugins"
_MODULE_PREFIX = "agentd_plugins"

State = Literal["loaded", "started", "failed", "stopped"]

# The event a fire-and-forget handler is running for: set around its spawn, so its task
# (and any task it starts) copies it, and each run sees its own event even across awaits
# and among runs handled concurrently. None in startup and shutdown hooks.
_HANDLING: ContextVar[Event | None] = ContextVar("agentd_handling", default=None)


class PluginContext:
    """What a plugin's fire-and-forget handlers and its startup and shutdown hooks receive
    as `ctx`: the plugin's configuration, a logger, the daemon's memory, mail and outgoing
    webhooks, and the verbs `publish` (an event) and `submit` (a task). A durable handler
    runs as a task and gets the task's `Context` instead.

    Made by the plugin manager, one per plugin; what it reaches is private to it.
    """

    __slots__ = ("_log", "_manager", "_plugin")

    def __init__(self, plugin: Plugin, manager: PluginManager) -> None:
        self._plugin = plugin
        self._manager = manager
        self._log: structlog.stdlib.BoundLogger = get_logger("plugin", plugin=plugin.name)

    @property
    def config(self) -> Mapping[str, Any]:
        """The `[plugins.<name>]` table of agentd.toml (read-only)."""
        return self._plugin.config

    @property
    def log(self) -> structlog.stdlib.BoundLogger:
        """A logger bound to the plugin's name."""
        return self._log

    @property
    def memory(self) -> api.MemoryStore:
        """The daemon's memory: sessions and long-term memory, as in a task's `ctx.memory`.

        Raises:
            RuntimeError: asked for in a startup hook (memory opens after them).
        """
        memory = self._manager.services.memory
        if memory is None:
            raise RuntimeError("memory is not open yet (it opens after plugin startup hooks)")
        return memory

    @property
    def mail(self) -> api.Mail:
        """`await ctx.mail.send(to, subject, text, html=None, idempotency_key=None)`, as a
        durable task (give a key, e.g. from the event id, to send once per event)."""
        return MailSender(self._manager.services.mailer, self._enqueue)

    @property
    def webhook(self) -> api.Webhook:
        """`await ctx.webhook.post(url, json, idempotency_key=None)`, as a durable task."""
        return WebhookSender(self._enqueue)

    def publish(self, topic: str, data: Mapping[str, Any] | None = None) -> Event:
        """Publish an event on the bus (not a daemon topic: `task.*`, `plugin.*`...), as a
        task's `ctx.publish` does. Published by a handler while it handles event E, its
        `causation_id` is E's id and its `correlation_id` E's (None when E has none: a
        correlation is a root task's id, never an event's); from a startup or shutdown
        hook it has neither.

        Raises:
            PatternError: (a ValueError) the topic is malformed or reserved.
            TypeError: `data` is not a mapping.
            ValueError: `data` nests more than 32 deep, or contains itself.
        """
        topic, data = check_publishable(topic), check_event_data(data)
        cause = _HANDLING.get()
        if cause is None:
            return self._manager._bus.publish(topic, data)
        return self._manager._bus.publish(topic, data, correlation_id=cause.correlation_id,
                                          causation_id=str(cause.id))

    async def submit(self, name: str, args: Mapping[str, Any] | None = None, *,
                     queue: str | None = None, priority: int | None = None,
                     delay: float | None = None, run_at: float | None = None,
                     idempotency_key: str | None = None, max_attempts: int | None = None,
                     timeout: float | None = None) -> api.TaskRecord:
        """Enqueue task `name` and return it once committed, without waiting for it to run.
        With an `idempotency_key`, the same key within `[tasks] idempotency_window` returns
        the task it made instead of a new one (a handler that may see an event twice keys
        by its id).

        The options are a task's `Context.submit`'s, keyword-only; None takes the task's
        declaration, then the `[tasks]` default:

            queue            the queue that runs it (a configured one)
            priority         higher runs first
            delay            seconds from now before it is due (not with run_at)
            run_at           the Unix time it is due (not with delay; default: now)
            idempotency_key  enqueueing the same key returns the same task
            max_attempts     attempts before it is dead
            timeout          seconds an attempt may run

        Raises:
            UnknownTaskError: no task is registered under `name`.
            InvalidTaskError: (a ValueError) an argument or option is wrong; the message
                names it.
        """
        return await self._manager._queue.enqueue(
            name, args or {}, queue=queue, priority=priority, delay=delay, run_at=run_at,
            idempotency_key=idempotency_key, max_attempts=max_attempts, timeout=timeout)

    async def _enqueue(self, name: str, args: Mapping[str, Any], key: str | None) -> TaskRecord:
        return await self._manager._queue.enqueue(name, args, idempotency_key=key)


@dataclass(slots=True)
class LoadedPlugin:
    """One plugin's record: where it came from, its state, and how to undo its registrations."""

    name: str
    source: str
    state: State
    error: str | None = None
    module: str = ""  # the Python module it was imported as ("" when its import failed)
    plugin: Plugin | None = None
    registrations: ExitStack = field(default_factory=ExitStack)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "state": self.state, "error": self.error}


@dataclass(frozen=True, slots=True)
class _Candidate:
    module_name: str
    source: str
    load: Callable[[], Any]
    module: str  # the name it is imported as


class PluginManager:
    """Loads the configured plugins and owns their lifecycles."""

    def __init__(self, config: Config, bus: Bus, spawner: Spawner, queue: TaskQueue,
                 services: Services) -> None:
        self._config = config
        self._bus = bus
        self._spawner = spawner
        self._queue = queue
        self._log = get_logger("plugins")
        self.plugins: dict[str, LoadedPlugin] = {}
        self.services = services
        self.warnings: list[dict[str, str]] = []
        self._seen_names: set[str] = set()  # module and plugin names found, for enabled/disabled
        self._triggers: list[tuple[TopicPattern, str]] = []
        self._enqueued: set[tuple[int, str]] = set()

    def states(self) -> list[dict[str, Any]]:
        return [p.to_dict() for p in self.plugins.values()]

    @property
    def failed(self) -> list[str]:
        return [p.name for p in self.plugins.values() if p.state == "failed"]

    def load_all(self) -> None:
        """Import every enabled plugin and register its tasks (the durable handlers' too),
        without starting anything. Failures are recorded, never raised."""
        for candidate in self._discover():
            record = self._import(candidate)
            if record is not None and record.state == "loaded":
                self._register_tasks(record)
        unknown = {*self._config.plugins.enabled, *self._config.plugins.disabled} - self._seen_names
        if unknown:
            # A misspelt name in enabled/disabled silently does nothing otherwise.
            self._log.warning("plugins.unknown_names", names=sorted(unknown),
                              found=sorted(self._seen_names))

    async def start_all(self, deadline: float) -> None:
        """Load every enabled plugin, then start each: subscribe its handlers, run its
        startup hooks. Failures are recorded, never raised."""
        self.load_all()
        for record in list(self.plugins.values()):
            if record.state == "loaded":
                await self._start(record, deadline)

    async def stop_all(self, deadline: float) -> None:
        """Run shutdown hooks of started plugins, last started first, then unload them all."""
        for record in reversed(list(self.plugins.values())):
            if record.state == "started" and record.plugin is not None:
                await self._run_shutdown_hooks(record, deadline)
                record.state = "stopped"
            record.registrations.close()

    def embedders(self) -> dict[str, Callable[[], Embedder]]:
        """The embedders registered by loaded or started plugins, by name, each to be made
        by calling it (with its plugin's configuration table, not the daemon's)."""
        found: dict[str, Callable[[], Embedder]] = {}
        for record in self.plugins.values():
            if record.state in ("loaded", "started") and record.plugin is not None:
                table = record.plugin.config
                found.update({name: functools.partial(make, table)
                              for name, make in record.plugin._embedders.items()})
        return found

    def owner_of(self, module: str) -> str | None:
        """The plugin whose code `module` is (its module or one inside its package), or
        None. Safe to call from another thread: the stall watch does, to name a culprit."""
        for record in list(self.plugins.values()):
            if record.module and (module == record.module or module.startswith(record.module + ".")):
                return record.name
        return None

    def reconfigure(self, config: Config) -> None:
        """Take `config` (a reload) for the `[plugins.<name>]` tables of plugins loaded or
        reloaded from now on; what plugins are found (paths, enabled, disabled) stays."""
        self._config = config

    async def reload(self, name: str, deadline: float) -> LoadedPlugin:
        """Import plugin `name` again from its file, with its `[plugins.<name>]` table as the
        configuration holds it now, and put the new code in the old one's place (see the
        module docstring). A plugin that had failed is loaded afresh the same way. Each
        hook gets `deadline` s. Returns the new record: `started`, or `failed` when its
        tasks clash or a startup hook failed (then it is unloaded, as at the daemon's start).

        Raises:
            PluginNotFoundError: no plugin of that name was found.
            PluginError: it comes from an entry point (its package is not reloaded), or its
                file fails to import or declares another plugin: the old code runs on.
        """
        old = self.plugins.get(name)
        if old is None:
            known = ", ".join(sorted(self.plugins)) or "none"
            raise PluginNotFoundError(f"no plugin named {name!r} (plugins found: {known})")
        plugin, module = self._import_again(old)
        if old.state == "started" and old.plugin is not None:
            await self._run_shutdown_hooks(old, deadline)
        old.registrations.close()
        old.state = "stopped"
        plugin._bind_config(self._config.plugins.settings.get(name, {}))
        record = LoadedPlugin(name, old.source, "loaded", plugin=plugin, module=module)
        self.plugins[name] = record
        self._register_tasks(record)
        if record.state == "loaded":
            await self._start(record, deadline)
        self._log.info("plugin.reloaded", plugin=name, source=record.source, state=record.state)
        return record

    def _import_again(self, record: LoadedPlugin) -> tuple[Plugin, str]:
        """Execute the plugin's file as a new module (a package's submodules afresh too);
        its `Plugin` and module name. On failure the modules of the old code stay in
        `sys.modules` (its imports made later still find them).

        Raises:
            PluginError: as `reload` says.
        """
        path = Path(record.source)
        if path.suffix == ".py" and path.is_file():
            stem, package_dir, init = path.stem, None, path
        elif path.is_dir() and (path / "__init__.py").is_file():
            stem, package_dir, init = path.name, path, path / "__init__.py"
        elif record.source.startswith("entry point "):
            raise PluginError(f"plugin {record.name!r} comes from an {record.source}: restart "
                              "agentd to load a new version of its package")
        else:
            raise PluginError(f"plugin {record.name!r}: its file {record.source} is gone")
        _forget_bytecode(path)
        module = f"{_MODULE_PREFIX}.{stem}"
        kept = {key: value for key, value in sys.modules.items()
                if key == module or key.startswith(module + ".")}
        for key in kept:
            del sys.modules[key]
        try:
            loaded = _path_loader(stem, init, package_dir)()
            plugin = getattr(loaded, "plugin", None)
            if not isinstance(plugin, Plugin):
                raise PluginError(f"{record.source} defines no `plugin = Plugin(...)`")
            if plugin.name != record.name:
                raise PluginError(f"{record.source} now declares plugin {plugin.name!r}, not "
                                  f"{record.name!r}: restart agentd to rename a plugin")
        except (Exception, SystemExit) as exc:
            for key in [key for key in sys.modules if key == module or key.startswith(module + ".")]:
                del sys.modules[key]
            sys.modules.update(kept)
            if isinstance(exc, PluginError):
                raise
            raise PluginError(f"{record.source} failed to import: {_describe(exc)}") from exc
        return plugin, module

    async def _run_shutdown_hooks(self, record: LoadedPlugin, deadline: float) -> None:
        """Run a started plugin's shutdown hooks, last declared first; a failure is logged."""
        assert record.plugin is not None
        ctx = self.context(record.plugin)
        for hook in reversed(record.plugin._shutdown_hooks):
            try:
                await asyncio.wait_for(_call_hook(hook, ctx), deadline)
            except (Exception, SystemExit) as exc:
                self._log.error("plugin.shutdown_failed", plugin=record.name, error=_describe(exc))

    def unload(self, name: str) -> None:
        """Remove everything `name` registered; its record stays, marked stopped."""
        record = self.plugins[name]
        record.registrations.close()
        if record.state != "failed":
            record.state = "stopped"

    def context(self, plugin: Plugin) -> PluginContext:
        return PluginContext(plugin, self)

    def _discover(self) -> Iterator[_Candidate]:
        for directory in self._config.plugin_dirs:
            if not directory.is_dir():
                self._log.warning("plugins.directory_missing", path=str(directory))
                self.warnings.append({"warning": "plugin_directory_missing", "path": str(directory),
                                      "message": f"plugin directory {directory} does not exist"})
                continue
            for path in sorted(directory.iterdir()):
                if path.name.startswith(("_", ".")):
                    continue
                if path.suffix == ".py" and path.is_file():
                    yield _Candidate(path.stem, str(path), _path_loader(path.stem, path, None),
                                     f"{_MODULE_PREFIX}.{path.stem}")
                elif path.is_dir() and (path / "__init__.py").is_file():
                    yield _Candidate(
                        path.name, str(path), _path_loader(path.name, path / "__init__.py", path),
                        f"{_MODULE_PREFIX}.{path.name}")
        if self._config.plugins.entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                yield _Candidate(ep.name, f"entry point {ep.value}", ep.load, ep.module)

    def _wanted(self, name: str) -> bool:
        enabled, disabled = self._config.plugins.enabled, self._config.plugins.disabled
        return name not in disabled and (not enabled or name in enabled)

    def _import(self, candidate: _Candidate) -> LoadedPlugin | None:
        self._seen_names.add(candidate.module_name)
        if not self._wanted(candidate.module_name):
            return None
        try:
            loaded = candidate.load()
            plugin = loaded if isinstance(loaded, Plugin) else getattr(loaded, "plugin", None)
            if not isinstance(plugin, Plugin):
                raise PluginError(f"{candidate.source} defines no `plugin = Plugin(...)`")
        except (Exception, SystemExit) as exc:  # sys.exit("pip install x") is a common idiom
            return self._record_failure(candidate.module_name, candidate.source, exc)
        self._seen_names.add(plugin.name)
        if not self._wanted(plugin.name):
            return None
        if plugin.name in self.plugins:
            return self._record_failure(
                plugin.name, candidate.source,
                PluginError(f"plugin name {plugin.name!r} is already used by "
                            f"{self.plugins[plugin.name].source}"),
                register_as=f"{plugin.name}@{candidate.source}",
            )
        plugin._bind_config(self._config.plugins.settings.get(plugin.name, {}))
        record = LoadedPlugin(plugin.name, candidate.source, "loaded", plugin=plugin,
                              module=candidate.module)
        self.plugins[plugin.name] = record
        self._log.info("plugin.loaded", plugin=plugin.name, source=candidate.source)
        return record

    def _record_failure(
        self, name: str, source: str, exc: BaseException, register_as: str | None = None
    ) -> LoadedPlugin:
        record = LoadedPlugin(name, source, "failed", error=_describe(exc))
        self.plugins[register_as or name] = record
        self._log.error("plugin.failed", plugin=name, source=source, error=record.error,
                        traceback="".join(traceback.format_exception(exc)[-3:]))
        self._bus.publish("plugin.failed", {"plugin": name, "error": record.error})
        return record

    def _register_tasks(self, record: LoadedPlugin) -> None:
        """Register the plugin's tasks and its durable handlers' tasks; fail it on a clash."""
        plugin = record.plugin
        if plugin is None:
            return
        try:
            for definition in plugin._tasks:
                record.registrations.callback(self._queue.registry.add(definition))
                if definition.queue not in self._config.tasks.queues:
                    self._log.warning(
                        "plugin.task_queue_unconfigured", plugin=plugin.name, task=definition.name,
                        queue=definition.queue, hint=f"add {definition.queue} to [tasks] queues")
            for spec in plugin._handlers:
                if spec.durable:
                    record.registrations.callback(
                        self._queue.registry.add(_trigger_task(record.name, spec)))
        except Exception as exc:
            self._fail_started(record, exc)

    async def _start(self, record: LoadedPlugin, deadline: float) -> None:
        plugin = record.plugin
        if plugin is None:
            return
        ctx = self.context(plugin)
        try:
            for spec in plugin._handlers:
                callback = (self._trigger(record, spec) if spec.durable
                            else self._handler_callback(ctx, spec))
                sub = self._bus.subscribe(spec.pattern, callback, name=f"{plugin.name}.{spec.name}")
                record.registrations.callback(sub.unsubscribe)
        except Exception as exc:
            self._fail_started(record, exc)
            return
        try:
            for hook in plugin._startup_hooks:
                await asyncio.wait_for(_call_hook(hook, ctx), deadline)
        except (Exception, SystemExit) as exc:
            self._fail_started(record, exc)
            return
        record.state = "started"
        self._bus.publish("plugin.started", {"plugin": plugin.name})

    def fail(self, name: str, exc: BaseException) -> None:
        """Mark a loaded or started plugin failed (a problem found after its start, such as
        a bad schedule) and unload it."""
        self._fail_started(self.plugins[name], exc)

    def _fail_started(self, record: LoadedPlugin, exc: BaseException) -> None:
        record.registrations.close()
        record.state, record.error = "failed", _describe(exc)
        self._log.error("plugin.failed", plugin=record.name, source=record.source, stage="startup",
                        error=record.error)
        self._bus.publish("plugin.failed", {"plugin": record.name, "error": record.error})

    def _trigger(self, record: LoadedPlugin, spec: HandlerSpec) -> Callable[[Event], None]:
        """The bus callback that enqueues a durable handler's task (registered at load)."""
        task_name = f"{record.name}.{spec.name}"
        pattern = TopicPattern.parse(spec.pattern)
        trigger = (pattern, task_name)
        self._triggers.append(trigger)
        record.registrations.callback(lambda: self._triggers.remove(trigger))

        def on_event(event: Event) -> None:
            if (event.id, task_name) in self._enqueued:
                self._enqueued.discard((event.id, task_name))  # publish_durably committed it
                return
            self._spawner.spawn(
                self._queue.enqueue_many([_trigger_request(task_name, event)]),
                name=f"trigger:{task_name}", context={"plugin": record.name, "event_id": event.id})

        return on_event

    async def enqueue_triggers(self, event: Event, key: str | None = None, *,
                               alongside: Callable[[Connection], object] | None = None) -> None:
        """Commit the tasks of every durable handler `event` matches (before it is published).
        With `key`, each task's idempotency key is `<key>:<task name>`, kept for good: the
        same key finds the tasks already committed instead of making more. `alongside` (the
        event's own row) commits in the same transaction, even when no handler matches."""
        names = [name for pattern, name in self._triggers if pattern.matches(event.topic)]
        if names:
            await self._queue.enqueue_many([_trigger_request(name, event, key) for name in names],
                                           alongside=alongside)
            self._enqueued.update((event.id, name) for name in names)
        elif alongside is not None:
            await self._queue.store.write(alongside)

    def _handler_callback(self, ctx: PluginContext, spec: HandlerSpec) -> Callable[[Event], None]:
        plugin_name = ctx._plugin.name
        handler_name = f"{plugin_name}.{spec.name}"

        def on_event(event: Event) -> None:
            # A handler reacting to its own failure or drop would loop forever.
            if event.topic in ("handler.failed", "handler.dropped") and (
                event.data.get("handler") == handler_name
            ):
                return
            handling = _HANDLING.set(event)  # the spawned task copies it; this caller's is restored
            try:
                self._spawner.spawn(
                    spec.fn(ctx, event),
                    name=handler_name,
                    context={"plugin": plugin_name, "topic": event.topic, "event_id": event.id},
                )
            finally:
                _HANDLING.reset(handling)

        return on_event


def _trigger_task(plugin_name: str, spec: HandlerSpec) -> TaskDef:
    """The task that runs a durable handler with the event it was enqueued for."""
    handler = spec.fn

    async def run_trigger(ctx: Any, event: dict[str, Any]) -> None:
        await handler(ctx, Event(**event))

    run_trigger.__name__ = spec.name
    return TaskDef(name=f"{plugin_name}.{spec.name}", fn=run_trigger,
                   max_attempts=spec.max_attempts, plugin=plugin_name)


def _trigger_request(task_name: str, event: Event, key: str | None = None) -> TaskRequest:
    return TaskRequest(
        task_name, {"event": event.to_dict()},
        idempotency_key=f"event:{event.id}:{task_name}" if key is None else f"{key}:{task_name}",
        correlation_id=event.correlation_id, dedupe_window=None if key is None else float("inf"))


def _path_loader(module_name: str, path: Path, package_dir: Path | None) -> Callable[[], ModuleType]:
    def load() -> ModuleType:
        qualified = f"{_MODULE_PREFIX}.{module_name}"
        spec = importlib.util.spec_from_file_location(
            qualified, path,
            submodule_search_locations=[str(package_dir)] if package_dir else None,
        )
        if spec is None or spec.loader is None:
            raise PluginError(f"{path}: not importable")
        module = importlib.util.module_from_spec(spec)
        sys.modules[qualified] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(qualified, None)
            raise
        return module

    return load


def _forget_bytecode(path: Path) -> None:
    """Delete the cached bytecode of the plugin's files (`path`, or every module of the
    package at `path`): Python trusts a `.pyc` whose recorded source mtime, in whole
    seconds, and size match, so a file rewritten within the second of its last import,
    at the same length, would be imported as its old code. Where the cache cannot be
    deleted (a read-only install), that narrow case stays."""
    sources = path.rglob("*.py") if path.is_dir() else [path]
    for source in sources:
        with contextlib.suppress(OSError, ValueError):
            Path(importlib.util.cache_from_source(str(source))).unlink(missing_ok=True)


async def _call_hook(hook: Hook, ctx: PluginContext) -> None:
    result = hook(ctx)
    if inspect.isawaitable(result):
        await result


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "TimeoutError: did not finish in time"
    return describe(exc)
