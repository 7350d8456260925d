"""Fire-and-forget, tracked: every short-lived background coroutine of the daemon starts here.

`Spawner.spawn()` keeps a strong reference to each task (the loop keeps only weak ones),
names it, bounds how many run at once and how many may wait, logs a failure and publishes
it as a `handler.failed` event, and at shutdown drains with a deadline, then cancels.

Which owner a task has. No task of the daemon is left without one, to fail unseen:

- a coroutine that runs once in the background (an event handler, a digest's enqueue):
  `Spawner.spawn` here;
- a loop that runs for the daemon's life (the lag monitor, the WAL checkpoints, the
  scheduler, the watchdog, the claim loops and the lease heartbeat):
  `agentd.supervise.Supervisor.start`, which reports a failure and restarts the loop;
- a task that lives within one object or one call (a WebSocket's requests and pumps, a
  running task attempt of the worker pool, a scheduler recording an outcome, a helper
  future raced in one `asyncio.wait`): that object or call owns it. It keeps the task,
  cancels and awaits it when it is done with it, and sees its failure: it awaits its
  result or logs its exception in a done-callback (never "Task exception was never
  retrieved", never an exception dropped by `gather(..., return_exceptions=True)`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any

from agentd.bus import Bus
from agentd.errors import describe
from agentd.log import get_logger


class Spawner:
    """Owner of the daemon's fire-and-forget tasks.

    Args:
        bus: where `handler.failed` and `handler.dropped` events are published.
        max_running: how many spawned coroutines run at once; the rest wait their turn.
        max_waiting: how many may wait; past that `spawn` drops the coroutine and says so.
    """

    def __init__(self, bus: Bus, max_running: int = 100, max_waiting: int = 1000) -> None:
        self._bus = bus
        self._slots = asyncio.Semaphore(max_running)
        self._limit = max_running + max_waiting
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._log = get_logger("spawn")
        self.failed = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(
        self,
        coro: Coroutine[Any, Any, Any],
        *,
        name: str,
        context: Mapping[str, Any] | None = None,
    ) -> asyncio.Task[None] | None:
        """Run `coro` in the background; return its task, or None if it was refused.

        It is refused (closed without running, logged and published as `handler.dropped`)
        when the spawner is draining or already tracks `max_running + max_waiting` tasks.
        """
        context = dict(context or {})
        if self._closed or len(self._tasks) >= self._limit:
            coro.close()
            self.dropped += 1
            reason = "stopping" if self._closed else "too many handlers waiting"
            self._log.warning("handler.dropped", handler=name, reason=reason, **context)
            self._bus.publish("handler.dropped", {"handler": name, "reason": reason, **context})
            return None
        task = asyncio.get_running_loop().create_task(self._run(coro, name, context), name=name)
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._forget)
        return task

    async def idle(self) -> None:
        """Return once no spawned task is pending (tests use it to wait for quiescence)."""
        await self._idle.wait()

    async def drain(self, deadline: float) -> list[str]:
        """Refuse new work, wait up to `deadline` s, then cancel what is left; return its names."""
        self._closed = True
        if not self._tasks:
            return []
        _, pending = await asyncio.wait(set(self._tasks), timeout=deadline)
        names = sorted(task.get_name() for task in pending)
        if pending:
            self._log.warning("spawn.cancelled_at_stop", handlers=names)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return names

    async def _run(self, coro: Coroutine[Any, Any, Any], name: str, context: dict[str, Any]) -> None:
        started = False
        try:
            async with self._slots:
                started = True
                await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed += 1
            self._log.exception("handler.failed", handler=name, **context)
            self._bus.publish(
                "handler.failed",
                {"handler": name, "error": describe(exc), **context},
            )
        finally:
            if not started:
                coro.close()  # cancelled while waiting for a slot: it never ran

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()
