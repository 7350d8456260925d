"""Every long-lived loop has an owner: a loop that fails is reported (a `daemon.loop_failed`
event, a `loop.failed` log line), started again after a bounded backoff, and shown down in
/readyz meanwhile; a loop that fails at stop is logged. Tasks owned by their caller (a
WebSocket's requests and pumps, a task run, a scheduler's outcome, the handler drain) do
not lose their failures either."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from agentd.app import Daemon
from agentd.bus import Bus
from agentd.schedule import ScheduleSpec
from agentd.scheduler import Scheduler
from agentd.shutdown import stop_bound
from agentd.supervise import Supervisor
from agentd.systemd import Notifier
from agentd.testing import EventCapture, ManualClock, daemon_url, make_config
from agentd.web import ws as ws_module

# Short enough that a test waits on restarts for milliseconds, long enough to be seen.
FAST = {"first_backoff": 0.01, "max_backoff": 0.04}

PLUGIN = """
import asyncio

from agentd import Plugin

plugin = Plugin("sv")


@plugin.task()
async def echo(ctx, value=None):
    return value


@plugin.task(max_attempts=1)
async def two_fail_at_once(ctx):
    loop = asyncio.get_running_loop()
    first, second = loop.create_future(), loop.create_future()
    loop.call_soon(first.set_exception, ValueError("first"))
    loop.call_soon(second.set_exception, ValueError("second"))
    await ctx.gather(first, second)


@plugin.task()
async def gather_a_non_awaitable(ctx):
    async def waiting():
        await asyncio.Event().wait()

    try:
        await ctx.gather(waiting(), 42)
    except TypeError:
        pass
    return [t.get_name() for t in asyncio.all_tasks()
            if not t.done() and "waiting" in t.get_coro().__qualname__]
"""


@asynccontextmanager
async def supervised_daemon(tmp_path: Path, *, first_backoff: float = FAST["first_backoff"],
                            max_backoff: float = FAST["max_backoff"],
                            patch: Any = None, overrides: dict[str, Any] | None = None,
                            **kwargs: Any) -> AsyncIterator[tuple[Daemon, EventCapture]]:
    """A real daemon whose supervisor restarts after `first_backoff` s (doubling up to
    `max_backoff`); `patch(daemon)` runs before it starts."""
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "sv.py").write_text(PLUGIN)
    daemon = Daemon(make_config(tmp_path, [plugins], overrides), **kwargs)
    daemon.supervisor.first_backoff, daemon.supervisor.max_backoff = first_backoff, max_backoff
    if patch is not None:
        patch(daemon)
    events = EventCapture(daemon.bus, "daemon.*")
    async with daemon:
        yield daemon, events


class LogLines:
    """The structlog lines logged while `watching_logs` is active; `wait_for` waits for one."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def signal(self, logger: Any, method: str, event_dict: Any) -> Any:
        self._changed.set()
        return event_dict

    def named(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["event"] == event]

    async def wait_for(self, event: str, timeout: float = 5.0, **items: Any) -> dict[str, Any]:
        async def first() -> dict[str, Any]:
            while True:
                for line in self.named(event):
                    if all(line.get(k) == v for k, v in items.items()):
                        return line
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(first(), timeout)


@contextmanager
def watching_logs() -> Iterator[LogLines]:
    logs = LogLines()
    with capture_logs(processors=[logs.signal]) as lines:
        logs.lines = lines
        yield logs


def failing_once(method: Any, error: BaseException, called: asyncio.Event | None = None) -> Any:
    """`method`, raising `error` at its first call; `called` is set at each later call."""
    calls = 0

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise error
        if called is not None:
            called.set()
        return await method(*args, **kwargs)

    return wrapper


async def restarted(daemon: Daemon, events: EventCapture, name: str) -> asyncio.Task[None]:
    """Wait for loop `name` to run again after its first restart; its new task."""
    await events.wait_for("daemon.loop_restarted", loop=name, restarts=1)
    task = daemon.supervisor.loops[name].task
    assert task is not None
    return task


def cancel_from_outside(daemon: Daemon, name: str) -> asyncio.Task[None]:
    task = daemon.supervisor.loops[name].task
    assert task is not None and not task.done()
    task.cancel()
    return task


# --------------------------------------------------------------------------- failing loops


async def test_a_failed_checkpoint_is_reported_and_checkpointing_goes_on(tmp_path: Path) -> None:
    """The bug this fixes: a checkpoint raising something `run_checkpoints` does not catch
    ended WAL checkpointing for the daemon's life, without a log line."""
    checkpointed = asyncio.Event()

    def patch(daemon: Daemon) -> None:
        store = daemon.store
        # Every 10 ms, whatever the WAL's size, so that a test need not write 4 MB.
        store.run_checkpoints = partial(store.run_checkpoints, interval=0.01, wal_limit=0)  # type: ignore[method-assign]
        store.checkpoint = failing_once(  # type: ignore[method-assign]
            store.checkpoint, RuntimeError("injected"), checkpointed)

    with watching_logs() as logs:
        async with supervised_daemon(tmp_path, patch=patch) as (daemon, events):
            event = await events.wait_for("daemon.loop_failed", loop="wal-checkpoints")
            await asyncio.wait_for(checkpointed.wait(), 5)  # a checkpoint after the restart
            assert daemon.supervisor.loops["wal-checkpoints"].restarts == 1
    assert event.data == {"loop": "wal-checkpoints", "error": "RuntimeError: injected",
                          "failures_in_row": 1, "restart_in": 0.01}
    (line,) = logs.named("loop.failed")
    assert line["loop"] == "wal-checkpoints"
    assert line["error"] == "RuntimeError: injected"
    assert line["log_level"] == "error"
    assert isinstance(line["exc_info"], RuntimeError)  # the traceback goes to the log
    assert [line["loop"] for line in logs.named("loop.restarted")] == ["wal-checkpoints"]


@pytest.mark.parametrize("name", ["lag-monitor", "memory-wal-checkpoints", "task-heartbeat"])
async def test_a_loop_cancelled_from_outside_is_reported_and_restarted(
    tmp_path: Path, name: str
) -> None:
    async with supervised_daemon(tmp_path) as (daemon, events):
        killed = cancel_from_outside(daemon, name)
        event = await events.wait_for("daemon.loop_failed", loop=name)
        task = await restarted(daemon, events, name)
        assert task is not killed and not task.done()
    assert event.data["error"] == "cancelled by something other than its owner"


async def test_a_failed_claim_loop_claims_again(tmp_path: Path) -> None:
    async with supervised_daemon(tmp_path) as (daemon, events):
        assert await daemon.queue.result((await daemon.queue.enqueue("sv.echo", {"value": 1})).id,
                                         timeout=5) == 1
        cancel_from_outside(daemon, "claim:default")
        await events.wait_for("daemon.loop_failed", loop="claim:default")
        await restarted(daemon, events, "claim:default")
        task = await daemon.queue.enqueue("sv.echo", {"value": 2})
        assert await daemon.queue.result(task.id, timeout=5) == 2


async def test_a_failed_scheduler_loop_fires_again(tmp_path: Path) -> None:
    clock = ManualClock()

    def patch(daemon: Daemon) -> None:
        daemon.scheduler.run = failing_once(  # type: ignore[method-assign]
            daemon.scheduler.run, ValueError("scheduler down"))

    async with supervised_daemon(tmp_path, patch=patch, clock=clock) as (daemon, events):
        fired = EventCapture(daemon.bus, "schedule.fired")
        event = await events.wait_for("daemon.loop_failed", loop="scheduler")
        assert event.data["error"] == "ValueError: scheduler down"
        await restarted(daemon, events, "scheduler")
        await daemon.scheduler.create(ScheduleSpec.from_mapping(
            {"id": "tick", "every": 60, "task": "sv.echo", "args": {"value": 3}}))
        clock.advance(61)
        await fired.wait_for("schedule.fired", schedule_id="tick")


async def test_a_failed_watchdog_pings_again(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()

        async def receive() -> bytes:
            return await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)

        # A ping a minute: a second one comes only from a restart (a ping goes out at once).
        notifier = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "120000000"})
        async with supervised_daemon(tmp_path, notifier=notifier) as (daemon, events):
            assert (await receive()).startswith(b"READY=1")
            # Each ping carries the daemon's status line after it (see agentd.watchdog).
            assert (await receive()).split(b"\n")[0] == b"WATCHDOG=1"
            cancel_from_outside(daemon, "watchdog")
            await events.wait_for("daemon.loop_failed", loop="watchdog")
            assert (await receive()).split(b"\n")[0] == b"WATCHDOG=1"
            assert daemon.supervisor.loops["watchdog"].restarts == 1


# --------------------------------------------------------------------------- readiness


async def test_a_loop_waiting_to_restart_makes_the_daemon_not_ready(tmp_path: Path) -> None:
    async with supervised_daemon(tmp_path, first_backoff=60.0, max_backoff=60.0) as (daemon, events), \
            aiohttp.ClientSession(daemon_url(daemon)) as http:
        async with http.get("/readyz") as response:
            assert response.status == 200
            assert (await response.json())["checks"]["loops"] == {"ok": True, "down": []}
        cancel_from_outside(daemon, "lag-monitor")
        await events.wait_for("daemon.loop_failed", loop="lag-monitor")
        async with http.get("/readyz") as response:
            assert response.status == 503
            body = await response.json()
        assert body["ready"] is False
        assert body["checks"]["loops"] == {"ok": False, "down": ["lag-monitor"]}
        async with http.get("/healthz") as response:
            health = await response.json()
        assert health["status"] == "degraded"
        lag = next(loop for loop in health["loops"] if loop["name"] == "lag-monitor")
        assert lag == {"name": "lag-monitor", "state": "restarting", "restarts": 0,
                       "last_error": "cancelled by something other than its owner"}
        async with http.get("/v1/status") as response:
            status = await response.json()
        assert {loop["name"] for loop in status["loops"]} >= {
            "lag-monitor", "wal-checkpoints", "memory-wal-checkpoints", "scheduler",
            "claim:default", "task-heartbeat"}
    # The stop cancelled the restart it was waiting for: nothing runs on.
    assert daemon.supervisor.loops["lag-monitor"].task is None
    assert daemon.supervisor.loops["lag-monitor"].state == "stopped"


async def test_healthz_tells_an_anonymous_caller_no_loop_error(tmp_path: Path) -> None:
    token = "s3cret-token"
    async with supervised_daemon(tmp_path, first_backoff=60.0, max_backoff=60.0,
                                 overrides={"server": {"token": token}}) as (daemon, events):
        cancel_from_outside(daemon, "lag-monitor")
        await events.wait_for("daemon.loop_failed", loop="lag-monitor")
        seen = {}
        for caller, headers in (("anonymous", {}), ("token", {"Authorization": f"Bearer {token}"})):
            async with aiohttp.ClientSession(daemon_url(daemon), headers=headers) as http, \
                    http.get("/healthz") as response:
                health = await response.json()
            seen[caller] = next(loop for loop in health["loops"] if loop["name"] == "lag-monitor")
    assert seen["anonymous"] == {"name": "lag-monitor", "state": "restarting", "restarts": 0}
    assert seen["token"]["last_error"] == "cancelled by something other than its owner"


async def test_ready_again_once_the_loop_restarted(tmp_path: Path) -> None:
    async with supervised_daemon(tmp_path) as (daemon, events), \
            aiohttp.ClientSession(daemon_url(daemon)) as http:
        cancel_from_outside(daemon, "scheduler")
        await events.wait_for("daemon.loop_failed", loop="scheduler")
        await restarted(daemon, events, "scheduler")
        async with http.get("/readyz") as response:
            assert response.status == 200
            assert (await response.json())["checks"]["loops"] == {"ok": True, "down": []}
        async with http.get("/healthz") as response:
            health = await response.json()
        scheduler = next(loop for loop in health["loops"] if loop["name"] == "scheduler")
        assert scheduler["state"] == "running"
        assert scheduler["restarts"] == 1


# --------------------------------------------------------------------------- the backoff


async def test_a_loop_failing_at_once_is_restarted_ever_later_up_to_the_bound() -> None:
    bus = Bus()
    events = EventCapture(bus, "daemon.loop_failed")
    supervisor = Supervisor(bus, first_backoff=0.01, max_backoff=0.04)
    starts = 0

    async def broken() -> None:
        nonlocal starts
        starts += 1
        raise OSError("no")

    loop = supervisor.start("broken", broken)
    await failures(events, 5)
    await loop.stop()
    assert [e.data["restart_in"] for e in events.events[:5]] == [0.01, 0.02, 0.04, 0.04, 0.04]
    assert [e.data["failures_in_row"] for e in events.events[:5]] == [1, 2, 3, 4, 5]
    assert starts == len(events.events)
    assert loop.restarts == starts - 1
    assert loop.state == "stopped"


async def failures(events: EventCapture, count: int) -> list[Any]:
    """Wait until `count` loop failures were published; their data."""
    async def enough() -> None:
        while len(events.events) < count:
            await events.wait_for("daemon.loop_failed", failures_in_row=len(events.events) + 1)

    await asyncio.wait_for(enough(), 5)
    return [event.data for event in events.events]


async def test_a_loop_that_returns_is_a_failure_and_a_long_run_resets_the_backoff() -> None:
    bus = Bus()
    events = EventCapture(bus, "daemon.loop_failed")
    supervisor = Supervisor(bus, first_backoff=0.01, max_backoff=0.02)
    gate = asyncio.Event()

    async def short_lived() -> None:
        if len(events.events) == 2:
            await gate.wait()  # the third run lasts longer than max_backoff

    loop = supervisor.start("short", short_lived)
    await failures(events, 2)
    await asyncio.sleep(0.05)  # noqa: sleep - the third run must last longer than max_backoff
    gate.set()
    third = (await failures(events, 3))[2]
    await loop.stop()
    assert events.events[0].data["error"] == "ended without being stopped"
    assert third == {"loop": "short", "error": "ended without being stopped",
                     "failures_in_row": 1, "restart_in": 0.01}


async def test_a_loop_name_is_unique() -> None:
    supervisor = Supervisor(Bus())
    forever = asyncio.Event()
    loop = supervisor.start("one", forever.wait)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'one' is running already"):
        supervisor.start("one", forever.wait)  # type: ignore[arg-type]
    await loop.stop()
    supervisor.start("one", forever.wait)  # type: ignore[arg-type]
    await supervisor.loops["one"].stop()


# --------------------------------------------------------------------------- stopping


class _FailingAtStop(ManualClock):
    """A scheduler clock whose sleep, once cancelled, raises instead of ending cancelled."""

    async def sleep_until(self, deadline: float | None, wake: asyncio.Event) -> None:
        try:
            await super().sleep_until(deadline, wake)
        except asyncio.CancelledError:
            raise RuntimeError("failed while stopping") from None


async def test_a_loop_failing_at_stop_is_logged(tmp_path: Path) -> None:
    with watching_logs() as logs:
        async with supervised_daemon(tmp_path, clock=_FailingAtStop()):
            pass
    (line,) = logs.named("loop.failed_at_stop")
    assert line["loop"] == "scheduler"
    assert line["error"] == "RuntimeError: failed while stopping"
    assert isinstance(line["exc_info"], RuntimeError)
    assert not logs.named("loop.failed")  # a stop is no crash


async def test_a_failing_handler_drain_fails_its_stage_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with watching_logs() as logs:
        async with supervised_daemon(tmp_path) as (daemon, _):
            async def drain(deadline: float) -> list[str]:
                raise RuntimeError("drain broke")

            monkeypatch.setattr(daemon.spawner, "drain", drain)
    (line,) = logs.named("daemon.stop_stage_failed")
    assert line["stage"] == "drain handlers"


# --------------------------------------------------------------------------- caller-owned tasks


async def test_a_websocket_request_failing_to_reply_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: seen.append(context))
    send = ws_module._Session.send
    calls = 0

    async def send_failing_once(self: Any, message: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("reply broke")
        await send(self, message)

    monkeypatch.setattr(ws_module._Session, "send", send_failing_once)
    with watching_logs() as logs:
        async with supervised_daemon(tmp_path) as (daemon, _), \
                aiohttp.ClientSession(daemon_url(daemon)) as http, http.ws_connect("/v1/ws") as ws:
            await ws.send_json({"id": 1, "type": "ping"})
            line = await logs.wait_for("ws.reply_failed")
            await ws.send_json({"id": 2, "type": "ping"})
            assert (await asyncio.wait_for(ws.receive_json(), 5))["id"] == 2
    gc.collect()
    assert line["error"] == "RuntimeError: reply broke"
    assert isinstance(line["exc_info"], RuntimeError)
    assert not [c for c in seen if "never retrieved" in str(c.get("message"))]


async def test_a_failing_websocket_pump_is_logged_and_drops_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def send_text(self: Any, text: str) -> None:
        raise RuntimeError("pump broke")

    with watching_logs() as logs:
        async with supervised_daemon(tmp_path) as (daemon, _), \
                aiohttp.ClientSession(daemon_url(daemon)) as http, http.ws_connect("/v1/ws") as ws:
            await ws.send_json({"id": 1, "type": "subscribe", "patterns": ["sv.*"]})
            assert (await asyncio.wait_for(ws.receive_json(), 5))["ok"] is True
            monkeypatch.setattr(ws_module._Session, "send_text", send_text)
            daemon.bus.publish("sv.hello", {})
            closed = await asyncio.wait_for(ws.receive(), 5)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                   aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR)
    (line,) = logs.named("ws.pump_failed")
    assert line["subscription"] == "s1"


async def test_a_task_run_whose_outcome_cannot_be_recorded_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with watching_logs() as logs:
        async with supervised_daemon(tmp_path) as (daemon, _):
            def settle(record: Any, outcome: Any) -> None:
                raise RuntimeError("settle broke")

            monkeypatch.setattr(daemon.workers, "_end_attempt", settle)
            task = await daemon.queue.enqueue("sv.echo", {"value": 1})
            line = await logs.wait_for("tasks.run_failed")
            monkeypatch.undo()
    assert line["task_id"] == task.id
    assert line["error"] == "RuntimeError: settle broke"
    assert line["exc_info"] is True  # logged with its traceback


async def test_a_schedule_outcome_that_cannot_be_recorded_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    with watching_logs() as logs:
        async with supervised_daemon(tmp_path, clock=clock) as (daemon, _):
            async def record_outcome(self: Scheduler, state: Any, outcome: str) -> None:
                raise RuntimeError("outcome broke")

            monkeypatch.setattr(Scheduler, "_record_outcome", record_outcome)
            await daemon.scheduler.create(ScheduleSpec.from_mapping(
                {"id": "once", "every": 60, "task": "sv.echo", "args": {"value": 4}}))
            clock.advance(61)
            line = await logs.wait_for("schedule.outcome_failed", task="schedule-outcome:once")
    assert line["error"] == "RuntimeError: outcome broke"


async def test_the_backoff_stays_bounded_after_very_many_failures_in_row() -> None:
    bus = Bus()
    events = EventCapture(bus, "daemon.loop_failed")
    supervisor = Supervisor(bus, first_backoff=0.01, max_backoff=0.02)

    async def broken() -> None:
        raise OSError("no")

    loop = supervisor.start("broken", broken)
    await failures(events, 1)
    loop.failures_in_row = 5000  # as after a day and more of failing every max_backoff s
    again = await events.wait_for("daemon.loop_failed", failures_in_row=5001)
    await loop.stop()
    assert again.data["restart_in"] == 0.02


# --------------------------------------------------------------------------- found by review


@pytest.mark.parametrize("part", ["eventlog", "digests"])
async def test_a_start_failing_early_stops_the_loops_it_had_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    """The lag monitor and the WAL checkpoints start right after the store opens; a start
    failing before the plugins (the event log's first read, the digests' first write on a
    full disk) closed the store under them and left them running: the stall-watch thread
    on, the checkpoint loop failing every 30 s for the process's life."""
    (tmp_path / "plugins").mkdir()
    daemon = Daemon(make_config(tmp_path, [tmp_path / "plugins"]))

    async def start() -> None:
        raise RuntimeError(f"{part} broke")

    monkeypatch.setattr(getattr(daemon, part), "start", start)
    with pytest.raises(RuntimeError, match=f"{part} broke"):
        await daemon.start()
    loops = daemon.supervisor.loops
    assert {"lag-monitor", "wal-checkpoints"} <= set(loops)
    assert {name: loop.state for name, loop in loops.items()} == dict.fromkeys(loops, "stopped")
    assert all(loop.task is None or loop.task.done() for loop in loops.values())
    assert not [t for t in threading.enumerate() if t.name == "agentd-stall-watch"]


async def test_a_loop_that_will_not_stop_holds_the_stop_only_its_stage_deadline_and_is_named(
    tmp_path: Path
) -> None:
    """A loop that catches its cancellation and goes on (plugin-like code in the scheduler's
    clock, a bug) cannot hold the stop past `stop background loops`' deadline; the log says
    which loop did not end, not only the stage's list of every loop."""
    released = asyncio.Event()
    started = asyncio.Event()

    async def stubborn() -> None:
        started.set()
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    def patch(daemon: Daemon) -> None:
        daemon.lag.run = stubborn  # type: ignore[method-assign]

    with watching_logs() as logs:
        async with supervised_daemon(tmp_path, patch=patch,
                                     overrides={"daemon": {"stop_timeout": 0.1}}) as (daemon, _):
            await asyncio.wait_for(started.wait(), 5)
            task = daemon.supervisor.loops["lag-monitor"].task
            assert task is not None
            began = asyncio.get_running_loop().time()
        took = asyncio.get_running_loop().time() - began
    released.set()
    await asyncio.wait_for(task, 5)
    # The stage's deadline (MIN_STAGE_DEADLINE), not the loop, ended the wait.
    assert took < stop_bound(daemon.config.daemon)
    (timed_out,) = logs.named("daemon.stop_stage_timed_out")
    assert timed_out["stage"] == "stop background loops"
    (line,) = logs.named("loop.not_stopped")
    assert line["loop"] == "lag-monitor"
    assert not logs.named("loop.failed")


async def test_a_loop_whose_factory_raises_is_reported_and_started_again() -> None:
    bus = Bus()
    events = EventCapture(bus, "daemon.*")
    supervisor = Supervisor(bus, **FAST)
    forever = asyncio.Event()
    calls = 0

    def factory() -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise LookupError("no such thing")
        return forever.wait()

    loop = supervisor.start("made", factory)
    assert loop.state == "restarting"
    assert supervisor.down == ["made"]
    restarted_event = await events.wait_for("daemon.loop_restarted", loop="made")
    assert loop.state == "running" and supervisor.down == []
    await loop.stop()
    assert events.events[0].data == {"loop": "made", "error": "LookupError: no such thing",
                                     "failures_in_row": 1, "restart_in": 0.01}
    assert restarted_event.data == {"loop": "made", "restarts": 1}


async def test_a_task_run_failing_before_its_code_starts_is_logged_and_frees_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the task's context and publishing `task.started` came before `_run`'s
    `try`: a failure there left its slot taken for good (a one-worker queue then ran
    nothing more), the task counted running, and the failure unlogged."""
    with watching_logs() as logs:
        async with supervised_daemon(tmp_path, overrides={"tasks": {"queues": {"default": 1}}}) \
                as (daemon, _):
            EventCapture(daemon.bus, "task.started")  # so that task.started is published
            publish = daemon.queue.publish

            def publish_failing_once(topic: str, record: Any, **extra: Any) -> None:
                if topic == "task.started" and not logs.named("tasks.run_failed"):
                    raise RuntimeError("publish broke")
                publish(topic, record, **extra)

            monkeypatch.setattr(daemon.queue, "publish", publish_failing_once)
            first = await daemon.queue.enqueue("sv.echo", {"value": 1})
            line = await logs.wait_for("tasks.run_failed")
            second = await daemon.queue.enqueue("sv.echo", {"value": 2})
            assert await daemon.queue.result(second.id, timeout=5) == 2
            assert first.id not in daemon.workers.running
            monkeypatch.undo()
    assert line["task_id"] == first.id
    assert line["error"] == "RuntimeError: publish broke"


async def test_gather_logs_the_failures_it_does_not_raise(tmp_path: Path) -> None:
    """`ctx.gather` raises the first failure, as `asyncio.gather` does; another call that
    failed meanwhile was dropped with the calls it cancelled (`return_exceptions=True`)."""
    with watching_logs() as logs:
        async with supervised_daemon(tmp_path) as (daemon, _):
            task = await daemon.queue.enqueue("sv.two_fail_at_once", {})
            finished = await daemon.queue.wait(task.id, timeout=5)
    assert finished.status == "dead"
    assert "first" in (finished.error or "")
    (line,) = logs.named("task.gather_failed_too")
    assert line["count"] == 1
    assert line["errors"] == ["ValueError: second"]
    assert line["task_id"] == task.id


async def test_gather_given_a_non_awaitable_leaves_no_call_running(tmp_path: Path) -> None:
    """The calls before one `ensure_future` refuses were wrapped in tasks that nobody
    cancelled or awaited: they ran on, unowned, past the gather that raised."""
    async with supervised_daemon(tmp_path) as (daemon, _):
        task = await daemon.queue.enqueue("sv.gather_a_non_awaitable", {})
        assert await daemon.queue.result(task.id, timeout=5) == []


async def test_a_durable_publish_failing_after_its_caller_left_is_logged() -> None:
    """`dispatch_once_committed` shields the commit from a caller that is cancelled (a
    WebSocket that closed); when the commit then failed, its failure went nowhere: the
    event was released unpublished and not a line said so."""
    bus = Bus()
    committing, gate = asyncio.Event(), asyncio.Event()

    async def commit() -> None:
        committing.set()  # its caller awaits it now
        await gate.wait()
        raise RuntimeError("commit broke")

    event = bus.reserve_event("sv.durable", {})
    with watching_logs() as logs:
        caller = asyncio.create_task(bus.dispatch_once_committed(event, commit()))
        await asyncio.wait_for(committing.wait(), 5)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        gate.set()
        line = await logs.wait_for("bus.publish_failed")
    assert line["topic"] == "sv.durable"
    assert line["event_id"] == event.id
    assert line["error"] == "RuntimeError: commit broke"
    assert isinstance(line["exc_info"], RuntimeError)


async def test_loop_failures_are_kept_in_the_event_log_like_other_daemon_events(
    tmp_path: Path
) -> None:
    """A stream client that resumes (`since`) learns of a loop that failed while it was away."""
    async with supervised_daemon(tmp_path) as (daemon, events):
        cancel_from_outside(daemon, "lag-monitor")
        await restarted(daemon, events, "lag-monitor")
        await daemon.eventlog.flush()
        rows = await daemon.store.read(
            "SELECT topic, data FROM events WHERE topic LIKE 'daemon.loop_%' ORDER BY id")
    assert [row["topic"] for row in rows] == ["daemon.loop_failed", "daemon.loop_restarted"]
    assert json.loads(rows[0]["data"])["loop"] == "lag-monitor"


async def test_a_stop_while_every_loop_waits_to_restart_leaves_none_to_start_later(
    tmp_path: Path
) -> None:
    """Every loop down at once, its restart due after the stop: the stop cancels each
    restart, so no loop starts once the store is closed."""
    async with supervised_daemon(tmp_path, first_backoff=0.3, max_backoff=0.3) as (daemon, events):
        names = [name for name, loop in daemon.supervisor.loops.items() if loop.task is not None]
        for name in names:
            cancel_from_outside(daemon, name)
        for name in names:
            await events.wait_for("daemon.loop_failed", loop=name)
        assert daemon.supervisor.down == sorted(names)
    restarts = EventCapture(daemon.bus, "daemon.loop_restarted")
    await asyncio.sleep(0.5)  # noqa: sleep - past the restarts the stop cancelled
    assert restarts.events == []
    assert {loop.state for loop in daemon.supervisor.loops.values()} == {"stopped"}
    assert all(loop.task is None for loop in daemon.supervisor.loops.values())
