"""sd_notify: datagrams to a path or an abstract socket, no-op without systemd, watchdog;
and the unit file agrees with the daemon (systemd waits longer for a stop than agentd can
take, so a stop is never cut short by SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

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
        assert await receive() == b"WATCHDOG=1"  # the first ping goes out at once
    # 12 stages of 5 s at most, 5 s more before agentd ends itself: systemd is told so.
    assert await receive() == b"STOPPING=1\nSTATUS=stopping (within 60 s)\nEXTEND_TIMEOUT_USEC=65000000"


async def test_daemon_without_watchdog_sends_no_pings(
    tmp_path: Path, path_socket: tuple[socket.socket, str]
) -> None:
    sock, path = path_socket
    sock.setblocking(False)
    async with Daemon(make_config(tmp_path), notifier=Notifier(env={"NOTIFY_SOCKET": path})):
        pass
    received = []
    while True:
        try:
            received.append(sock.recv(4096))
        except BlockingIOError:
            break
    assert [r.split(b"\n")[0] for r in received] == [b"READY=1", b"STOPPING=1"]


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


def test_the_unit_has_no_reload() -> None:
    """SIGHUP reloads nothing (it is logged and ignored), so the unit offers no reload."""
    assert "ExecReload" not in (REPO / "systemd" / "agentd.service").read_text()
