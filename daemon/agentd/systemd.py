"""sd_notify without a dependency: READY, RELOADING, STATUS, WATCHDOG and STOPPING datagrams.

Everything here is a no-op when the process was not started by systemd with
`NotifyAccess`/`Type=notify` (no `$NOTIFY_SOCKET`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    """Sends state lines to the socket named by `NOTIFY_SOCKET` in `env`."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # An address starting with "@" is in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        applies = not watchdog_pid or watchdog_pid == str(os.getpid())
        usable = watchdog_usec.isascii() and watchdog_usec.isdigit() and applies
        self.watchdog_interval: float | None = int(watchdog_usec) / 1_000_000 / 2 if usable else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **state: str) -> None:
        """Send `KEY=value` lines, e.g. `notify(READY="1", STATUS="serving")`."""
        if not self._address:
            return
        payload = "\n".join(f"{key}={value}" for key, value in state.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(self._address)
            sock.sendall(payload)

    def ready(self, status: str) -> None:
        self.notify(READY="1", STATUS=status)

    def reloading(self, status: str) -> None:
        """RELOADING=1, with the CLOCK_MONOTONIC time systemd (253+) needs to tell this
        reload from an earlier one; `ready` ends it."""
        self.notify(RELOADING="1", STATUS=status, MONOTONIC_USEC=str(time.monotonic_ns() // 1000))

    def stopping(self, status: str, within: float | None = None) -> None:
        """STOPPING=1; with `within`, ask systemd to wait that many seconds for the stop
        even past `TimeoutStopSec` (EXTEND_TIMEOUT_USEC, systemd 236 and later)."""
        if within is None:
            self.notify(STOPPING="1", STATUS=status)
        else:
            self.notify(STOPPING="1", STATUS=status, EXTEND_TIMEOUT_USEC=str(round(within * 1_000_000)))

    def watchdog(self) -> None:
        self.notify(WATCHDOG="1")
