"""`Plugin`: what a plugin module declares. The loader (plugins.py) wires it into the daemon.

    from agentd import Plugin
    plugin = Plugin("news")

    @plugin.task(max_attempts=3)        # durable: async def fn(ctx, **args), or a sync def
    @plugin.schedule(every="30m")       # runs the task below every 30 minutes
    @plugin.on("user.clicked")          # fire-and-forget: async def fn(ctx, event)
    @plugin.startup / @plugin.shutdown  # fn(ctx), sync or async
    plugin.config                       # the [plugins.news] table of agentd.toml
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from agentd.errors import InvalidScheduleError, PluginError
from agentd.events import Event, TopicPattern
from agentd.schedule import ScheduleSpec
from agentd.taskdef import INTERNAL_PREFIX, LimitKey, TaskDef, TokenBucket

if TYPE_CHECKING:
    from agentd.context import Context
    from agentd.embed import Embedder
    from agentd.plugins import PluginContext

# What `@plugin.on` decorates: `ctx` is the plugin's context for a fire-and-forget handler,
# the task's for a durable one (it runs as a task), either when `durable` is not a literal.
EventHandler = Callable[["PluginContext", Event], Coroutine[Any, Any, None]]
DurableHandler = Callable[["Context", Event], Coroutine[Any, Any, None]]
AnyHandler = Callable[["Context | PluginContext", Event], Coroutine[Any, Any, None]]
Hook = Callable[["PluginContext"], Awaitable[None] | None]
# What `@plugin.embedder` decorates: given the plugin's `[plugins.<name>]` table, an embedder.
EmbedderFactory = Callable[[Mapping[str, Any]], "Embedder"]
F = TypeVar("F", bound=Callable[..., Any])
H = TypeVar("H", bound=EventHandler)
D = TypeVar("D", bound=DurableHandler)
A = TypeVar("A", bound=AnyHandler)
E = TypeVar("E", bound=EmbedderFactory)

_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """One `@plugin.on(...)` declaration."""

    pattern: str
    fn: EventHandler
    durable: bool = False
    max_attempts: int | None = None

    @property
    def name(self) -> str:
        return self.fn.__name__


class Plugin:
    """A plugin's declarations. Create one at module level, named like the module. What it
    declared is kept in underscored attributes, for the loader alone.

    Args:
        name: lower-case letters, digits and `_`; it prefixes the plugin's task names and
            names its `[plugins.<name>]` table. Not `agentd`: `agentd.` names the daemon's
            own tasks and schedules, which a plugin's would replace.
    """

    def __init__(self, name: str, *, description: str = "") -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise PluginError(f"plugin name {name!r} must match [a-z][a-z0-9_]*")
        if f"{name}." == INTERNAL_PREFIX:
            raise PluginError(f"plugin name {name!r} is the daemon's own: its tasks and schedules "
                              f"are named {INTERNAL_PREFIX}*; choose another")
        self.name = name
        self.description = description
        # What the plugin declared, read by the loader (plugins.py) when it wires it in.
        self._handlers: list[HandlerSpec] = []
        self._tasks: list[TaskDef] = []
        self._schedules: list[ScheduleSpec] = []
        self._embedders: dict[str, EmbedderFactory] = {}
        self._startup_hooks: list[Hook] = []
        self._shutdown_hooks: list[Hook] = []
        self._config: Mapping[str, Any] = MappingProxyType({})

    def __repr__(self) -> str:
        return f"Plugin({self.name!r})"

    @property
    def config(self) -> Mapping[str, Any]:
        """The `[plugins.<name>]` table (read-only); empty until the plugin is loaded."""
        return self._config

    def _bind_config(self, table: Mapping[str, Any]) -> None:
        """Called by the loader (plugins.py) when the plugin is loaded."""
        self._config = MappingProxyType(dict(table))

    def _configured_schedules(self) -> list[ScheduleSpec]:
        """For the daemon (app.py): the plugin's schedules as
        `[plugins.<name>.schedules.<schedule name>]` tables in agentd.toml retime them: their
        keys replace the declared ones (a new trigger, e.g. `every`, replaces the declared
        `every`/`cron`/`at`).

        Raises:
            InvalidScheduleError: an override is malformed or names no schedule.
        """
        overrides = self.config.get("schedules", {})
        if not isinstance(overrides, Mapping):
            raise InvalidScheduleError(f"[plugins.{self.name}] schedules must be a table of tables")
        by_name = {spec.id.removeprefix(f"{self.name}."): spec for spec in self._schedules}
        unknown = sorted(set(overrides) - set(by_name))
        if unknown:
            raise InvalidScheduleError(f"[plugins.{self.name}.schedules.{unknown[0]}]: plugin {self.name} "
                                       f"has no such schedule; it has {', '.join(sorted(by_name)) or 'none'}")
        specs = []
        for name, spec in by_name.items():
            override = overrides.get(name)
            if override is None:
                specs.append(spec)
                continue
            if not isinstance(override, Mapping):
                raise InvalidScheduleError(f"[plugins.{self.name}.schedules.{name}] must be a table")
            base = spec.to_dict()
            if {"every", "cron", "at"} & set(override):
                for trigger in ("every", "cron", "at"):
                    base.pop(trigger, None)
            try:
                specs.append(ScheduleSpec.from_mapping({**base, **override, "id": spec.id}))
            except InvalidScheduleError as exc:
                raise InvalidScheduleError(f"[plugins.{self.name}.schedules.{name}] {exc}") from None
        return specs

    @overload
    def on(self, pattern: str, *, durable: Literal[False] = False,
           max_attempts: None = None) -> Callable[[H], H]: ...
    @overload
    def on(self, pattern: str, *, durable: Literal[True],
           max_attempts: int | None = None) -> Callable[[D], D]: ...
    @overload
    def on(self, pattern: str, *, durable: bool,
           max_attempts: int | None = None) -> Callable[[A], A]: ...

    def on(
        self, pattern: str, *, durable: bool = False, max_attempts: int | None = None
    ) -> Callable[[F], F]:
        """Run the decorated `async def fn(ctx, event)` for each event matching `pattern`.

        By default each run is fire-and-forget (tracked by the daemon's spawner): the
        publisher does not wait; a failure is logged with the plugin's name and published as
        `handler.failed`; `ctx` is the plugin's context. Delivery is at most once.

        With `durable=True` each matching event becomes a task named `<plugin>.<fn>` (a
        trigger): at least once, retried up to `max_attempts`, surviving restarts; `ctx` is
        the task's context. Events published over HTTP have their trigger tasks committed
        before the request is answered.

        Raises:
            PluginError: `max_attempts` without `durable=True` (a handler run at most once
                has no attempts to count).
        """
        TopicPattern.parse(pattern)
        if max_attempts is not None and not durable:
            raise PluginError(f"plugin {self.name}: @on({pattern!r}) max_attempts needs durable=True: "
                              "a fire-and-forget handler runs at most once")

        def register(fn: F) -> F:
            if not inspect.iscoroutinefunction(fn):
                raise PluginError(f"plugin {self.name}: @on handler {fn.__name__} must be async def")
            self._handlers.append(HandlerSpec(pattern, fn, durable, max_attempts))
            return fn

        return register

    def task(
        self,
        name: str | None = None,
        *,
        queue: str = "default",
        max_attempts: int | None = None,
        timeout: float | None = None,
        priority: int = 0,
        concurrency: int | None = None,
        rate: str | None = None,
        concurrency_key: LimitKey | None = None,
        rate_key: LimitKey | None = None,
        remember: bool | str = False,
        token_budget: int | None = None,
    ) -> Callable[[F], F]:
        """Declare a durable task `fn(ctx, **args)`: async, or sync (run in a thread).

        Args:
            name: the task's name; default `<plugin>.<function name>`.
            queue: the named queue whose workers run it (see `[tasks] queues`).
            max_attempts: attempts before it goes dead; default `[tasks] max_attempts`.
            timeout: seconds an attempt may take; a timeout is a failed attempt.
            priority: higher runs first within its queue.
            concurrency: at most this many of it run at once.
            rate: a token bucket, e.g. "10/s", "100/m", "5/10s".
            concurrency_key: count `concurrency` per key rather than per name: a format over
                the task's arguments ("{user}") or a function of them returning a string.
            rate_key: one `rate` bucket per key ("{model}"); also what an LLM endpoint's
                429 holds back (every task of the name and key) until its Retry-After.
            remember: keep each result in long-term memory (True: in the plugin's
                namespace; a string: in that namespace), with the task's name and id.
            token_budget: LLM tokens (`ctx.llm`) the task may use over all its attempts;
                default `[llm] token_budget`; 0 means no limit.
        """

        def register(fn: F) -> F:
            self._tasks.append(TaskDef(
                name=name or f"{self.name}.{fn.__name__}", fn=fn, queue=queue,
                max_attempts=max_attempts, timeout=timeout, priority=priority,
                concurrency=concurrency, rate=TokenBucket.parse(rate) if rate else None,
                concurrency_key=concurrency_key, rate_key=rate_key,
                plugin=self.name, remember=remember, token_budget=token_budget,
            ))
            return fn

        return register

    def schedule(self, name: str | None = None, **definition: Any) -> Callable[[F], F]:
        """Declare a schedule: a trigger (`every="30m"`, `cron="0 9 * * 1-5"` with `timezone`,
        or `at=` an ISO date), an action (`task=` with `args=`, or `event=` with `data=`) and
        policies (`catch_up`, `catch_up_limit`, `grace`, `overlap`, `jitter`,
        `pause_after_failures`). Without `task` or `event` it decorates a task function and
        runs that task. Its id is `<plugin>.<name>` (name defaults to the task or event).

        Raises:
            InvalidScheduleError: naming the field and the value, when the plugin is imported.
        """

        def declare(table: dict[str, Any], default: str) -> None:
            schedule_id = f"{self.name}.{name or default.removeprefix(self.name + '.')}"
            spec = ScheduleSpec.from_mapping({**table, "id": schedule_id})
            if any(s.id == spec.id for s in self._schedules):
                raise PluginError(f"plugin {self.name}: two schedules are named {spec.id!r}; "
                                  "give each a distinct name=")
            self._schedules.append(spec)

        if definition.get("task") is not None or definition.get("event") is not None:
            declare(definition, str(definition.get("task") or definition.get("event")))
            return lambda fn: fn

        def decorate(fn: F) -> F:
            task_name = f"{self.name}.{fn.__name__}"
            declare({**definition, "task": task_name}, task_name)
            return fn

        return decorate

    def embedder(self, name: str) -> Callable[[E], E]:
        """Register `fn(config) -> Embedder` under `name`, for `[memory] embedder = "<name>"`;
        `config` is the plugin's `[plugins.<name>]` table, as `plugin.config`. An `Embedder`
        has `id`, `dimension` and `async embed(texts) -> list[list[float]]`."""

        def register(fn: E) -> E:
            self._embedders[name] = fn
            return fn

        return register

    def startup(self, fn: F) -> F:
        """Run `fn(ctx)` when the plugin starts; if it raises, the plugin is failed and unloaded."""
        self._startup_hooks.append(fn)
        return fn

    def shutdown(self, fn: F) -> F:
        """Run `fn(ctx)` when the plugin stops (in reverse order of declaration)."""
        self._shutdown_hooks.append(fn)
        return fn
