"""Testing plugins against a real daemon: `harness` starts agentd on a temporary directory
with your plugin directories loaded, and hands back a `Harness` to drive it with.

    from agentd.testing import harness

    async def test_greet(tmp_path):
        async with harness(tmp_path, plugin_dirs=[PLUGINS]) as agentd:
            assert await agentd.run("hello.greet", {"name": "Ada"}) == "hello, Ada"

Everything is real: the SQLite files under `tmp_path`, the task queue and its workers, the
bus, the scheduler, memory, and HTTP on 127.0.0.1 (an OS-chosen port, `agentd.url`). The
tests are async (pytest-asyncio, or any asyncio runner). Nothing needs sleeping: `run` and
`wait` wake when the task ends, `agentd.events.wait_for` when an event comes, and a
`ManualClock` fires schedules when the test moves it.

The plugin-facing names are `harness`, `Harness`, `EventCapture` and `ManualClock`, with the
types of `agentd`. `running_daemon`, `make_config` and `daemon_url` serve agentd's own test
suite: they hand out the daemon's internal `Daemon` and may change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agentd import protocols as api
from agentd.app import Daemon
from agentd.bus import Bus
from agentd.config import Config, load_config
from agentd.errors import TaskFailedError
from agentd.events import Event, TopicPattern, check_event_data, check_publishable

__all__ = ["EventCapture", "Harness", "ManualClock", "harness"]

WAIT = 10.0  # seconds `run` and `wait` give a task unless told otherwise


@asynccontextmanager
async def harness(
    tmp_path: Path,
    plugin_dirs: Sequence[Path] = (),
    config: Mapping[str, Mapping[str, Any]] | None = None,
    clock: ManualClock | None = None,
) -> AsyncIterator[Harness]:
    """Run a daemon for the block's length, loading the plugins in `plugin_dirs`.

    Args:
        tmp_path: where its databases go (pytest's `tmp_path` fixture).
        plugin_dirs: directories of plugin modules or packages, as `[plugins] paths`.
        config: agentd.toml tables over the defaults, e.g.
            `{"plugins": {"hello": {"greeting": "hi"}}, "tasks": {"queues": {"default": 1}}}`.
        clock: a `ManualClock` to run the scheduler on instead of the system's.

    A plugin that fails to load does not stop the start (as in production): check
    `agentd.plugin_states()`. Events are captured from before the start, so those of
    startup hooks are in `agentd.events`.
    """
    daemon = Daemon(make_config(tmp_path, plugin_dirs, config), clock=clock)
    events = EventCapture(daemon.bus)
    try:
        async with daemon:
            yield Harness(daemon, events)
    finally:
        events.close()


class Harness:
    """A daemon under test, driven the way its clients and plugins drive it. Made by
    `harness`."""

    def __init__(self, daemon: Daemon, events: EventCapture) -> None:
        self._daemon = daemon
        self._events = events

    @property
    def url(self) -> str:
        """The HTTP API's base URL, e.g. `http://127.0.0.1:41234` (no token is set)."""
        return daemon_url(self._daemon)

    @property
    def events(self) -> EventCapture:
        """Every event published on the bus since before the start."""
        return self._events

    @property
    def memory(self) -> api.MemoryStore:
        """The daemon's memory, as a task's `ctx.memory`: to seed it, or to check what a
        plugin remembered."""
        memory = self._daemon.services.memory
        if memory is None:
            raise RuntimeError("the daemon's memory is not open")
        return memory

    def plugin_states(self) -> dict[str, str]:
        """Each plugin's state by name: `started`, or `failed: <the error>`."""
        return {p["name"]: p["state"] if p["error"] is None else f"{p['state']}: {p['error']}"
                for p in self._daemon.plugins.states()}

    async def submit(self, name: str, args: Mapping[str, Any] | None = None, *,
                     queue: str | None = None, priority: int | None = None,
                     delay: float | None = None, run_at: float | None = None,
                     idempotency_key: str | None = None, max_attempts: int | None = None,
                     timeout: float | None = None) -> api.TaskRecord:
        """Enqueue task `name`, as `POST /v1/tasks` does; return it, queued. The options
        are `PluginContext.submit`'s.

        Raises:
            UnknownTaskError: no task is registered under `name`.
            InvalidTaskError: (a ValueError) an argument or option is wrong.
        """
        return await self._daemon.queue.enqueue(
            name, args or {}, queue=queue, priority=priority, delay=delay, run_at=run_at,
            idempotency_key=idempotency_key, max_attempts=max_attempts, timeout=timeout)

    async def wait(self, task_id: int, timeout: float = WAIT) -> api.TaskRecord:
        """Task `task_id` once it has finished, however it ended.

        Raises:
            TimeoutError: it did not finish within `timeout` seconds.
        """
        return await self._daemon.queue.wait(task_id, timeout)

    async def run(self, name: str, args: Mapping[str, Any] | None = None, *,
                  timeout: float = WAIT) -> Any:
        """Enqueue task `name`, wait for it, and return its result.

        Raises:
            TaskFailedError: it ended failed, dead or cancelled (`error` says why).
            TimeoutError: it did not finish within `timeout` seconds.
        """
        record = await self.wait((await self.submit(name, args)).id, timeout)
        if record.status != "succeeded":
            raise TaskFailedError(record.id, record.name, record.status, record.error)
        return record.result

    def publish(self, topic: str, data: Mapping[str, Any] | None = None) -> Event:
        """Publish an event, as a client's `POST /v1/events` does: the plugins' handlers
        react to it (a durable handler's task is enqueued).

        Raises:
            PatternError: (a ValueError) the topic is malformed or reserved.
            TypeError, ValueError: `data` is not a mapping, or nests too deep (as a plugin's).
        """
        return self._daemon.bus.publish(check_publishable(topic), check_event_data(data))


# agentd's own periodic tasks (purges, the event sweep, store maintenance) every 3e9 s:
# their fires are anchored at the epoch, so the next is in 2065. At the defaults the event
# sweep fires at every minute's turn, and a test that counted tasks across one saw a task
# it never made. A test of maintenance sets its intervals, or runs a schedule now.
_MAINTENANCE_AWAY: Mapping[str, Mapping[str, float]] = {
    "tasks": {"purge_interval": 3e9},
    "events": {"sweep_interval": 3e9},
    "store": {"maintenance_interval": 3e9},
    "memory": {"purge_interval": 3e9},
}


def make_config(
    tmp_path: Path,
    plugin_dirs: Sequence[Path] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """A configuration with state under `tmp_path`, an OS-chosen port, no entry points and
    agentd's own periodic tasks out of the way (`harness`, and agentd's own tests); the
    `overrides` tables go over it."""
    tables: dict[str, dict[str, Any]] = {
        "daemon": {"data_dir": str(tmp_path / "data"), "stop_timeout": 5.0},
        "server": {"port": 0},
        "plugins": {"paths": [str(p) for p in plugin_dirs], "entry_points": False},
    }
    for section, table in (*_MAINTENANCE_AWAY.items(), *(overrides or {}).items()):
        tables.setdefault(section, {}).update(table)
    return load_config(None, env={}, overrides=tables)


@asynccontextmanager
async def running_daemon(
    tmp_path: Path,
    plugin_dirs: Sequence[Path] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    clock: ManualClock | None = None,
) -> AsyncIterator[Daemon]:
    """Start a real daemon (store, bus, plugins, HTTP on 127.0.0.1) and stop it afterwards.
    With `clock`, the scheduler runs on that clock instead of the system's. For agentd's own
    tests, which reach into the `Daemon`; a plugin's tests use `harness`."""
    async with Daemon(make_config(tmp_path, plugin_dirs, overrides), clock=clock) as daemon:
        yield daemon


class ManualClock:
    """A scheduler clock that moves only when told: `advance(seconds)` or `set(timestamp)`.
    Pass it to `harness(clock=)`.

    Schedules then fire as if that much time had passed, at once, so tests of intervals,
    cron and missed fires need not wait. A schedule's fire is a task: wait for it with
    `agentd.events.wait_for("task.succeeded", name=...)`.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._moved = asyncio.Event()

    def now(self) -> float:
        """The clock's time, in Unix seconds (it starts at `start`, or the real time)."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward: the schedules due by then fire."""
        self.set(self._now + seconds)

    def set(self, timestamp: float) -> None:
        """Move the clock to `timestamp` (Unix seconds)."""
        self._now = timestamp
        self._moved.set()

    async def sleep_until(self, deadline: float | None, wake: asyncio.Event) -> None:
        """For the scheduler: return once the clock reaches `deadline` or `wake` is set."""
        while (deadline is None or self._now < deadline) and not wake.is_set():
            self._moved.clear()
            moved = asyncio.ensure_future(self._moved.wait())
            woken = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait({moved, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()
                woken.cancel()


def daemon_url(daemon: Daemon) -> str:
    """The daemon's HTTP base URL (agentd's own tests)."""
    return f"http://127.0.0.1:{daemon.port}"


class EventCapture:
    """Collects the bus events matching a pattern, every one, in order (it is called inside
    each publish); `wait_for` waits for one with a timeout. A `Harness` has one for every
    event (`agentd.events`)."""

    def __init__(self, bus: Bus, pattern: str = "**") -> None:
        self.events: list[Event] = []
        self._pattern = TopicPattern.parse(pattern)
        self._changed = asyncio.Event()
        self._subscription = bus.subscribe(pattern, self._record, name=f"capture:{pattern}")

    def _record(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def topics(self) -> list[str]:
        """The topics captured so far, in order."""
        return [e.topic for e in self.events]

    async def wait_for(self, topic_pattern: str, timeout: float = 5.0, **data: Any) -> Event:
        """The first captured event (already captured, or to come) matching `topic_pattern`
        whose data has these items: `wait_for("task.succeeded", name="hello.greet")`.

        Raises:
            TimeoutError: none came within `timeout` seconds.
        """
        wanted = TopicPattern.parse(topic_pattern)

        async def first_match() -> Event:
            while True:
                for event in self.events:
                    if wanted.matches(event.topic) and all(
                        event.data.get(k) == v for k, v in data.items()
                    ):
                        return event
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(first_match(), timeout)

    def close(self) -> None:
        """Stop capturing (`harness` does it at the end)."""
        self._subscription.unsubscribe()
