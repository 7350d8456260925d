"""Helpers for tests of agentd and of plugins: a real daemon on a temp dir, captured events.

    async with running_daemon(tmp_path, plugin_dirs=[my_plugins]) as daemon:
        async with aiohttp.ClientSession(daemon_url(daemon)) as http: ...
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agentd.app import Daemon
from agentd.bus import Bus
from agentd.config import Config, load_config
from agentd.events import Event, TopicPattern


def make_config(
    tmp_path: Path,
    plugin_dirs: Sequence[Path] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """A configuration with state under `tmp_path`, an OS-chosen port and no entry points."""
    tables: dict[str, dict[str, Any]] = {
        "daemon": {"data_dir": str(tmp_path / "data"), "stop_timeout": 5.0},
        "server": {"port": 0},
        "plugins": {"paths": [str(p) for p in plugin_dirs], "entry_points": False},
    }
    for section, table in (overrides or {}).items():
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
    With `clock`, the scheduler runs on that clock instead of the system's."""
    async with Daemon(make_config(tmp_path, plugin_dirs, overrides), clock=clock) as daemon:
        yield daemon


class ManualClock:
    """A scheduler clock that moves only when told: `advance(seconds)` or `set(timestamp)`.

    Schedules then fire as if that much time had passed, at once, so tests of intervals,
    cron and missed fires need not wait.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._moved = asyncio.Event()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self.set(self._now + seconds)

    def set(self, timestamp: float) -> None:
        self._now = timestamp
        self._moved.set()

    async def sleep_until(self, deadline: float | None, wake: asyncio.Event) -> None:
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
    return f"http://127.0.0.1:{daemon.port}"


class EventCapture:
    """Collects the bus events matching a pattern; `wait_for` waits for one with a timeout."""

    def __init__(self, bus: Bus, pattern: str = "**") -> None:
        self.events: list[Event] = []
        self._pattern = TopicPattern.parse(pattern)
        self._changed = asyncio.Event()
        self._subscription = bus.subscribe(pattern, self._record, name=f"capture:{pattern}")

    def _record(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def topics(self) -> list[str]:
        return [e.topic for e in self.events]

    async def wait_for(self, topic_pattern: str, timeout: float = 5.0, **data: Any) -> Event:
        """The first captured event matching `topic_pattern` whose data has these items."""
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
        self._subscription.unsubscribe()
