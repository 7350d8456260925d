"""The spawner: strong references, names, failures, bounds, drain with a deadline."""

from __future__ import annotations

import asyncio
import gc
import inspect
import weakref
from collections.abc import Coroutine
from typing import Any

from structlog.testing import capture_logs

from agentd.bus import Bus
from agentd.spawn import Spawner
from agentd.testing import EventCapture


async def test_spawned_task_completes_without_a_caller_reference() -> None:
    spawner = Spawner(Bus())
    done: list[str] = []
    handles: list[weakref.ref[asyncio.Future[None]]] = []

    async def orphan() -> None:
        # Wait on a future only this coroutine holds: without the spawner's reference the
        # task, its coroutine and the future form a garbage cycle that gc would collect.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        handles.append(weakref.ref(future))
        await future
        done.append("finished")

    task = spawner.spawn(orphan(), name="orphan")
    assert task is not None
    task_ref = weakref.ref(task)
    del task
    await asyncio.sleep(0)  # let it start and park on its future
    gc.collect()
    assert task_ref() is not None, "the spawner must hold a strong reference"
    future = handles[0]()
    assert future is not None
    future.set_result(None)
    del future
    await asyncio.wait_for(spawner.idle(), 5)
    assert done == ["finished"]
    assert len(spawner) == 0


async def test_task_is_named() -> None:
    spawner = Spawner(Bus())
    gate = asyncio.Event()

    async def work() -> None:
        await gate.wait()

    task = spawner.spawn(work(), name="news.on_click")
    assert task is not None
    assert task.get_name() == "news.on_click"
    assert len(spawner) == 1
    gate.set()
    await asyncio.wait_for(spawner.idle(), 5)
    assert task.done()
    assert task.exception() is None


async def test_failure_is_logged_and_published() -> None:
    bus = Bus()
    capture = EventCapture(bus, "handler.*")
    with capture_logs() as logs:
        spawner = Spawner(bus)

        async def broken() -> None:
            raise ValueError("boom")

        task = spawner.spawn(broken(), name="p.broken", context={"plugin": "p", "topic": "x"})
        assert task is not None
        event = await capture.wait_for("handler.failed", handler="p.broken")
    await asyncio.wait_for(task, 5)  # the task itself ends cleanly: the failure was handled
    assert event.data == {"handler": "p.broken", "error": "ValueError: boom", "plugin": "p", "topic": "x"}
    assert spawner.failed == 1
    failures = [e for e in logs if e["event"] == "handler.failed"]
    assert len(failures) == 1
    assert failures[0]["handler"] == "p.broken"
    assert failures[0]["plugin"] == "p"
    assert failures[0]["log_level"] == "error"
    assert failures[0]["exc_info"] is True


async def test_max_running_is_honoured() -> None:
    spawner = Spawner(Bus(), max_running=2, max_waiting=10)
    gate = asyncio.Event()
    two_running = asyncio.Event()
    running = 0
    peak = 0
    finished = 0

    async def work() -> None:
        nonlocal running, peak, finished
        running += 1
        peak = max(peak, running)
        if running == 2:
            two_running.set()
        await gate.wait()
        running -= 1
        finished += 1

    tasks = [spawner.spawn(work(), name=f"w{i}") for i in range(6)]
    assert all(t is not None for t in tasks)
    await asyncio.wait_for(two_running.wait(), 5)
    # Every task has had its first step by now; only two may have entered `work`.
    assert running == 2
    assert len(spawner) == 6
    gate.set()
    await asyncio.wait_for(spawner.idle(), 5)
    assert peak == 2
    assert finished == 6


async def test_over_the_backlog_is_dropped_and_published() -> None:
    bus = Bus()
    capture = EventCapture(bus, "handler.dropped")
    spawner = Spawner(bus, max_running=1, max_waiting=1)
    gate = asyncio.Event()

    async def work() -> None:
        await gate.wait()

    accepted = [spawner.spawn(work(), name=f"ok{i}") for i in range(2)]
    refused_coro = work()
    refused = spawner.spawn(refused_coro, name="late", context={"plugin": "p"})
    assert all(t is not None for t in accepted)
    assert refused is None
    assert inspect.getcoroutinestate(refused_coro) == inspect.CORO_CLOSED  # no "never awaited"
    assert spawner.dropped == 1
    assert [e.data for e in capture.events] == [
        {"handler": "late", "reason": "too many handlers waiting", "plugin": "p"}
    ]
    gate.set()
    await asyncio.wait_for(spawner.idle(), 5)
    assert spawner.spawn(work(), name="again") is not None  # room again once idle
    await asyncio.wait_for(spawner.idle(), 5)


async def test_drain_waits_for_quick_tasks_and_cancels_stuck_ones() -> None:
    bus = Bus()
    capture = EventCapture(bus, "handler.dropped")
    spawner = Spawner(bus)
    finished: list[str] = []
    cancelled: list[str] = []
    quick_gate = asyncio.Event()

    async def quick(name: str) -> None:
        await quick_gate.wait()
        finished.append(name)

    async def stuck(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    for name in ("q1", "q2"):
        spawner.spawn(quick(name), name=name)
    for name in ("s2", "s1"):
        spawner.spawn(stuck(name), name=name)
    quick_gate.set()  # the quick ones finish during the drain
    names = await asyncio.wait_for(spawner.drain(0.2), 5)
    assert names == ["s1", "s2"]
    assert sorted(finished) == ["q1", "q2"]
    assert sorted(cancelled) == ["s1", "s2"]
    assert len(spawner) == 0

    # Once draining, new work is refused (and closed, so no "never awaited" warning).
    late = quick("late")
    assert spawner.spawn(late, name="late") is None
    assert inspect.getcoroutinestate(late) == inspect.CORO_CLOSED
    assert capture.events[-1].data == {"handler": "late", "reason": "stopping"}


async def test_drain_with_nothing_running_returns_at_once() -> None:
    spawner = Spawner(Bus())
    assert await asyncio.wait_for(spawner.drain(30), 1) == []


async def test_drain_cancels_tasks_still_waiting_for_a_slot() -> None:
    spawner = Spawner(Bus(), max_running=1, max_waiting=5)
    started: list[str] = []
    coros: list[Coroutine[Any, Any, None]] = []

    async def stuck(name: str) -> None:
        started.append(name)
        await asyncio.Event().wait()

    for name in ("a", "b", "c"):
        coros.append(stuck(name))
        spawner.spawn(coros[-1], name=name)
    names = await asyncio.wait_for(spawner.drain(0.1), 5)
    assert names == ["a", "b", "c"]
    assert started == ["a"]  # b and c never got a slot
    assert all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in coros)
