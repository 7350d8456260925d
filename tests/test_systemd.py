"""sd_notify: datagrams to a path or an abstract socket, no-op without systemd, watchdog;
and the unit file agrees with the daemon (systemd waits longer for a stop than agentd can
take, so a stop is never cut short by SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agentd.app import Daemon
from agentd.config import DaemonConfig, load_config
from agentd.shutdown import EXIT_MARGIN, stop_bound
from agentd.systemd import Notifier
from agentd.testing import make_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def test_no_notify_socket_is_a_no_op() -> None:
    notifier = Notifier(env={})
    assert notifier.enabled is False
    assert notifier.watchdog_interval is None
    notifier.ready("serving")  # nothing to send to, nothing raised
    notifier.stopping("stopping")
    notifier.watchdog()


def test_defaults_to_the_process_environment(
    monkeypatch: pytest.MonkeyPatch, path_socket: tuple[socket.socket, str]
) -> None:
    sock, path = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier().ready("from os.environ")
    assert sock.recv(4096) == b"READY=1\nSTATUS=from os.environ"


def test_sends_to_a_path_socket(path_socket: tuple[socket.socket, str]) -> None:
    sock, path = path_socket
    notifier = Notifier(env={"NOTIFY_SOCKET": path})
    assert notifier.enabled is True
    notifier.ready("serving on 127.0.0.1:1")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving on 127.0.0.1:1"
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.stopping("bye")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=bye"
    notifier.notify(RELOADING="1", STATUS="reloading")
    assert sock.recv(4096) == b"RELOADING=1\nSTATUS=reloading"


def test_sends_to_an_abstract_socket() -> None:
    name = f"agentd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        Notifier(env={"NOTIFY_SOCKET": "@" + name}).ready("abstract")
        assert sock.recv(4096) == b"READY=1\nSTATUS=abstract"


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "3000000"}, 1.5),  # pinged at half the systemd timeout
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert Notifier(env=env).watchdog_interval == interval


async def test_daemon_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, path_socket: tuple[socket.socket, str]
) -> None:
    sock, path = path_socket
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def receive() -> bytes:
        return await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)

    notifier = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"})
    async with Daemon(make_config(tmp_path), notifier=notifier) as daemon:
        assert await receive() == f"READY=1\nSTATUS=serving on 127.0.0.1:{daemon.port}".encode()
        # The first ping goes out at once, with what the daemon is doing.
        assert re.fullmatch(rb"WATCHDOG=1\nSTATUS=0 running, 0 queued, 0 streams, lag \d+ ms",
                            await receive())
    # 12 stages of 5 s at most, 5 s more before agentd ends itself: systemd is told so.
    assert await receive() == b"STOPPING=1\nSTATUS=stopping (within 60 s)\nEXTEND_TIMEOUT_USEC=65000000"


async def test_daemon_without_watchdog_sends_no_pings(
    tmp_path: Path, path_socket: tuple[socket.socket, str]
) -> None:
    sock, path = path_socket
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    async with Daemon(make_config(tmp_path), notifier=Notifier(env={"NOTIFY_SOCKET": path})):
        assert (await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)).startswith(b"READY=1")
        # The status line goes out without a watchdog too (systemctl status shows it).
        assert re.fullmatch(rb"STATUS=0 running, 0 queued, 0 streams, lag \d+ ms",
                            await asyncio.wait_for(loop.sock_recv(sock, 4096), 5))
    received = []
    while True:
        try:
            received.append(sock.recv(4096))
        except BlockingIOError:
            break
    # Nothing after STOPPING=1 says the daemon is serving (status lines end with the stop).
    assert [r.split(b"\n")[0] for r in received if not r.startswith(b"STATUS=")][-1:] == [b"STOPPING=1"]
    assert received[-1].startswith(b"STOPPING=1")
    assert not any(b"WATCHDOG" in r for r in received)


def hold_the_loop(seconds: float) -> None:
    """The stall under test: called from a coroutine, it holds the event loop."""
    time.sleep(seconds)  # noqa: sleep - the blocking call under test


async def test_the_watchdog_pings_only_while_the_loop_keeps_its_lag_within_max_loop_lag(
    tmp_path: Path, path_socket: tuple[socket.socket, str]
) -> None:
    """A loop that runs, but too late to serve anyone, must let systemd restart the daemon:
    the ping is held back while the lag is over [server] max_loop_lag, and comes back once
    the lag has passed. Every datagram says the lag it judged by."""
    sock, path = path_socket
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    line = re.compile(rb"(WATCHDOG=1\n)?STATUS=(\d+) running, (\d+|\?) queued, (\d+) streams, "
                      rb"lag (\d+) ms(; watchdog withheld: lag over 0.1 s)?")

    async def receive() -> re.Match[bytes]:
        datagram = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
        found = line.fullmatch(datagram)
        assert found is not None, datagram
        return found

    # Ticks every 0.1 s (a quarter of the timeout).
    notifier = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    config = make_config(tmp_path, overrides={"server": {"max_loop_lag": 0.1}})
    with capture_logs() as logs:
        async with Daemon(config, notifier=notifier):
            assert (await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)).startswith(b"READY=1")
            assert (await receive())[1]  # pinged while healthy
            hold_the_loop(0.4)
            seen = []
            while not (seen and seen[-1][1] and any(not s[1] for s in seen)):
                seen.append(await receive())  # until a ping came back after one was withheld
    withheld = [found for found in seen if not found[1]]
    assert withheld, "no tick held the ping back"
    for found in seen:  # a ping only with the lag within the bound; withheld only past it
        pinged, lag_ms = bool(found[1]), int(found[5])
        assert pinged == (found[6] is None)
        assert (lag_ms <= 100) if pinged else (lag_ms >= 100), found[0]
    assert [e["event"] for e in logs if e["event"].startswith("watchdog.")] == [
        "watchdog.withheld", "watchdog.resumed"]


# --------------------------------------------------------------------------- the unit file


def _unit_setting(name: str) -> str:
    text = (REPO / "systemd" / "agentd.service").read_text()
    (value,) = re.findall(rf"^{name}=(.*)$", text, flags=re.MULTILINE)
    return value.strip()


def test_timeout_stop_sec_exceeds_the_longest_stop_of_the_default_config() -> None:
    """The longest stop is the staged stop's bound, then EXIT_MARGIN s before agentd ends
    itself; the shipped agentd.toml and the built-in defaults give the same one."""
    timeout_stop = float(_unit_setting("TimeoutStopSec"))
    shipped = load_config(REPO / "agentd.toml", env={}).daemon
    assert shipped.stop_timeout == DaemonConfig().stop_timeout
    longest = stop_bound(shipped) + EXIT_MARGIN
    assert timeout_stop > longest, f"TimeoutStopSec={timeout_stop:g} but a stop may take {longest:g} s"


def test_the_unit_reloads_with_sighup() -> None:
    """`systemctl reload agentd` sends the SIGHUP that reloads agentd.toml (tests/test_reload.py)."""
    assert _unit_setting("ExecReload") == "/bin/kill -HUP $MAINPID"
