"""Long-lived loops, supervised: every loop that runs for the daemon's life starts here.

A loop (the lag monitor, the WAL checkpoints, the scheduler, the systemd watchdog, the
workers' claim loops and heartbeat) is to run until its owner stops it. One that ends by
itself — it raises, returns, or is cancelled by someone else — is logged (`loop.failed`,
with the traceback) and published (`daemon.loop_failed`: `loop`, `error`,
`failures_in_row`, `restart_in`), then started again from its factory after a backoff
(`loop.restarted`, `daemon.loop_restarted`: `loop`, `restarts`):
`first_backoff` s, doubled at each crash in a row up to `max_backoff` s, so a loop that
crashes at once costs one start per `max_backoff` s, not the CPU. A run that lasted
`max_backoff` s or more ends the row: its crash is backed off `first_backoff` s again.

While a loop waits to be started again it is down: `Supervisor.down` names it, and
`/readyz` answers 503 with those names. Stopping a loop (`Loop.stop`) cancels it, or lets
it end by itself when its owner has told it to, and logs an exception it ends with
(`loop.failed_at_stop`) rather than dropping it; a loop still running when the wait for
it is cancelled (the stop stage's deadline passed) is named (`loop.not_stopped`).

Supervising costs one task per loop and a done-callback; nothing runs per iteration.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from agentd.bus import Bus
from agentd.errors import describe
from agentd.log import get_logger

LoopFactory = Callable[[], Coroutine[Any, Any, None]]

_LOG = get_logger("loop")
_MAX_DOUBLINGS = 30


class Loop:
    """One supervised loop: the task running it now, how often it was restarted, and how
    its last run ended. Made by `Supervisor.start`."""

    def __init__(self, supervisor: Supervisor, name: str, factory: LoopFactory) -> None:
        self.name = name
        self.task: asyncio.Task[None] | None = None
        self.restarts = 0
        self.failures_in_row = 0
        self.last_error: str | None = None
        self._supervisor = supervisor
        self._factory = factory
        self._started_at = 0.0
        self._restart: asyncio.TimerHandle | None = None
        self._stopping = False

    @property
    def state(self) -> str:
        """`running`, `restarting` (it failed and waits for its backoff), or `stopped`."""
        if self._stopping:
            return "stopped"
        return "restarting" if self.task is None else "running"

    def describe(self, details: bool = True) -> dict[str, Any]:
        """The loop as /healthz and /v1/status show it; its last error only with `details`
        (an error text can name files)."""
        described: dict[str, Any] = {"name": self.name, "state": self.state, "restarts": self.restarts}
        if details:
            described["last_error"] = self.last_error
        return described

    def stop(self, *, cancel: bool = True) -> Awaitable[None]:
        """Stop the loop: from this call on it is not restarted (even if the caller does
        not await at once). Cancel it, or with `cancel=False` let it end by itself (its
        owner has told it to: the claim loops). Awaiting the result waits for the end and
        logs an exception the loop ended with."""
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        task = self.task
        if task is not None and cancel:
            task.cancel()
        return self._end_of(task)

    async def _end_of(self, task: asyncio.Task[None] | None) -> None:
        if task is None:
            return
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            # The stop's deadline passed: say which loop holds it (it caught its cancellation).
            if not task.done():
                _LOG.warning("loop.not_stopped", loop=self.name)
            raise
        if not task.cancelled() and (exc := task.exception()) is not None:
            _LOG.error("loop.failed_at_stop", loop=self.name, error=describe(exc), exc_info=exc)

    def _start(self) -> None:
        self._restart = None
        if self._stopping:
            return
        self._started_at = asyncio.get_running_loop().time()
        try:
            coro = self._factory()
        except Exception as exc:
            self._failed(exc, describe(exc))
            return
        self.task = asyncio.get_running_loop().create_task(coro, name=self.name)
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task is not self.task:
            return
        self.task = None
        if self._stopping:
            return  # `stop` reports how it ended
        if task.cancelled():
            self._failed(None, "cancelled by something other than its owner")
            return
        exc = task.exception()
        self._failed(exc, "ended without being stopped" if exc is None else describe(exc))

    def _failed(self, exc: BaseException | None, error: str) -> None:
        supervisor = self._supervisor
        loop = asyncio.get_running_loop()
        if loop.time() - self._started_at >= supervisor.max_backoff:
            self.failures_in_row = 0
        # The exponent is capped: 2 ** 1100 is no float, and a loop failing every 30 s gets there.
        doubled = supervisor.first_backoff * 2 ** min(self.failures_in_row, _MAX_DOUBLINGS)
        delay = min(doubled, supervisor.max_backoff)
        self.failures_in_row += 1
        self.last_error = error
        _LOG.error("loop.failed", loop=self.name, error=error, failures_in_row=self.failures_in_row,
                   restart_in=delay, exc_info=exc)
        supervisor.bus.publish("daemon.loop_failed", {
            "loop": self.name, "error": error, "failures_in_row": self.failures_in_row,
            "restart_in": delay})
        self._restart = loop.call_later(delay, self._restarted)

    def _restarted(self) -> None:
        self.restarts += 1
        self._start()
        if self.task is not None:  # else its factory failed, and that was reported
            _LOG.warning("loop.restarted", loop=self.name, restarts=self.restarts)
            self._supervisor.bus.publish("daemon.loop_restarted", {"loop": self.name,
                                                                   "restarts": self.restarts})


class Supervisor:
    """Owner of the daemon's long-lived loops; see the module docstring.

    Args:
        bus: where `daemon.loop_failed` and `daemon.loop_restarted` are published.
        first_backoff: seconds before a loop that failed is started again, the first time.
        max_backoff: the most it waits, however often the loop failed in a row.
    """

    def __init__(self, bus: Bus, first_backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        self.bus = bus
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.loops: dict[str, Loop] = {}

    def start(self, name: str, factory: LoopFactory) -> Loop:
        """Run `factory()` as the loop `name` (its task's name too) until stopped; it is
        called again for each restart.

        Raises:
            ValueError: a loop of that name runs already (or waits to restart).
        """
        known = self.loops.get(name)
        if known is not None and known.state != "stopped":
            raise ValueError(f"a loop named {name!r} is running already")
        loop = Loop(self, name, factory)
        self.loops[name] = loop
        loop._start()
        return loop

    @property
    def down(self) -> list[str]:
        """The loops that failed and wait to be started again."""
        return sorted(name for name, loop in self.loops.items() if loop.state == "restarting")

    def describe(self, details: bool = True) -> list[dict[str, Any]]:
        """Every loop's name, state and restarts (and last error, with `details`)."""
        return [loop.describe(details) for loop in self.loops.values()]
