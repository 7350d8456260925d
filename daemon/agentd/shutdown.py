"""How the process learns it must stop, and the bound on how long it may take to: the
stop's stages and their deadlines, OS signals relayed to the event loop so that none is
lost, and a last-resort exit once the staged stop's bound has passed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType

from agentd.config import DaemonConfig
from agentd.log import get_logger

# SIGTERM (systemd, kill) and SIGINT (Ctrl-C) stop; SIGHUP (a reload, elsewhere) is logged.
RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# The stages of a stop, in order, with each one's deadline in multiples of [daemon]
# stop_timeout: twice that where running code gets stop_timeout and more must follow
# (the tasks still running are then put back; plugins' shutdown hooks, one after another).
STOP_STAGES: dict[str, int] = {
    "drain handlers": 1, "stop background loops": 1, "stop workers": 2, "stop scheduler": 1,
    "stop plugins": 2, "close HTTP clients": 1, "close server": 1, "flush event log": 1,
    "close memory": 1, "close store": 1,
}
# The least a stage is given: with stop_timeout = 0 (do not wait for running work) tasks
# must still be put back and the store closed.
MIN_STAGE_DEADLINE = 1.0
# Seconds after the staged stop for the process to exit (the loop closing, the interpreter
# ending) before `ExitDeadline` ends it.
EXIT_MARGIN = 5.0
# Seconds `ExitDeadline` waits for its last line to be written before it exits anyway.
EXIT_LOG_WAIT = 1.0
# The exit code of a process ended by `ExitDeadline`: the stop did not finish (cli.EXIT_FAILED).
EXIT_STOP_OVERRAN = 1


def stage_deadline(stage: str, stop_timeout: float) -> float:
    """How long stop stage `stage` may take with `[daemon] stop_timeout`."""
    return max(STOP_STAGES[stage] * stop_timeout, MIN_STAGE_DEADLINE)


def stop_bound(config: DaemonConfig) -> float:
    """The longest a staged stop can take: every stage's deadline, one after another."""
    return sum(stage_deadline(stage, config.stop_timeout) for stage in STOP_STAGES)


class SignalRelay:
    """While entered, calls `handler(signal)` on the event loop for every SIGTERM, SIGINT
    and SIGHUP, none lost however busy the loop is. Enter it in the main thread.
    `on_arrival(signal)`, if given, is called at once in the signal handler, even while
    synchronous code blocks the loop: it must only do what a signal handler may.

    Not `loop.add_signal_handler`: asyncio learns which signal came from a byte that the C
    signal handler writes to the loop's self-pipe, a non-blocking socket which every
    `call_soon_threadsafe` also writes to (each aiosqlite result, each `to_thread`). When a
    flood of those fills it, the byte is dropped ("Exception ignored when trying to write
    to the signal wakeup fd: BlockingIOError") and the handler never runs: a SIGTERM was
    ignored in 2 of 6 flooded runs. A Python-level handler cannot be lost that way:
    CPython marks the signal as tripped before it tries any wakeup fd, and runs the handler
    in the main thread at its next bytecode. Ours only queues `handler` with
    `call_soon_threadsafe`, an append to the loop's ready queue that needs no byte either
    (a full self-pipe is a readable one: the loop turns at once). Its own wakeup socket,
    written to by nothing but signals, wakes the loop's `select()` when a signal lands on
    another thread than the main one.
    """

    def __init__(self, handler: Callable[[signal.Signals], None],
                 on_arrival: Callable[[signal.Signals], None] | None = None) -> None:
        self._handler = handler
        self._on_arrival = on_arrival
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None] = {}
        self._previous_wakeup_fd = -1
        self._wakeup: tuple[socket.socket, socket.socket] | None = None

    def __enter__(self) -> SignalRelay:
        self._loop = asyncio.get_running_loop()
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = reader, writer
        self._loop.add_reader(reader.fileno(), self._drain_wakeup)
        self._previous_wakeup_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        for signum in RELAYED_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        if self._wakeup is not None and self._loop is not None:
            self._loop.remove_reader(self._wakeup[0].fileno())
            for sock in self._wakeup:
                sock.close()
        self._wakeup = self._loop = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._loop is None:
            return  # a signal already pending as the relay closed: the stop has run
        if self._on_arrival is not None:
            self._on_arrival(signal.Signals(signum))
        with contextlib.suppress(RuntimeError):  # the loop closed: the process is exiting anyway
            self._loop.call_soon_threadsafe(self._handler, signal.Signals(signum))

    def _drain_wakeup(self) -> None:
        # The bytes only woke the loop up; `_on_signal` is what relays the signal.
        if self._wakeup is not None:
            with contextlib.suppress(BlockingIOError):
                while self._wakeup[0].recv(4096):
                    pass


class ExitDeadline:
    """Ends the process with exit code `code` unless it has ended `seconds` after `arm()`:
    whatever holds it then (a thread stuck in a library call, a loop blocked by a plugin's
    synchronous code), the staged stop that should have ended it is over.

    Its thread, started at once, waits to be armed: `arm()` only sets a flag and an event,
    so a signal handler may call it (starting a thread there could deadlock on the lock of
    a thread start it interrupted). A daemon thread, so it never holds the process itself.
    It logs what still runs and flushes the standard streams first; `os._exit` skips
    atexit hooks, which is the point: `concurrent.futures` joins its threads in one.
    """

    def __init__(self, seconds: float, code: int) -> None:
        self.seconds = seconds
        self._code = code
        self._log = get_logger("daemon")
        self._armed = False
        self._arming = threading.Event()
        threading.Thread(target=self._wait_then_exit, name="agentd-exit-deadline", daemon=True).start()

    def arm(self) -> None:
        """Start the count (again: a no-op). Safe in a signal handler."""
        # The flag first: a second signal handled inside the first one's `set()` (handlers
        # nest) must not take the event's lock again.
        if not self._armed:
            self._armed = True
            self._arming.set()

    def _wait_then_exit(self) -> None:
        self._arming.wait()
        time.sleep(self.seconds)
        # Said from a thread of its own, waited for a while only: a stdout that no one reads
        # (a stuck journal) blocks a write, and the logging lock with it, which must not
        # hold the exit.
        alive = sorted(t.name for t in threading.enumerate()
                       if t is not threading.current_thread() and t.is_alive())
        farewell = threading.Thread(target=self._say_what_held, args=(alive,),
                                    name="agentd-exit-log", daemon=True)
        farewell.start()
        farewell.join(EXIT_LOG_WAIT)
        os._exit(self._code)

    def _say_what_held(self, alive: list[str]) -> None:
        self._log.critical("daemon.stop_overran", bound=self.seconds, threads=alive,
                           exit_code=self._code)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
