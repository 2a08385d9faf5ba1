"""systemd's notify protocol (sd_notify), in pure Python: one datagram per message.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) to a
``Type=notify`` service and, with ``WatchdogSec=``, ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``).
Outside systemd there is no socket and every call is a no-op. A failed send is logged once and
never raised: telling systemd must not take the daemon down.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("tradingd.sdnotify")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_s = self._watchdog_interval(env)
        self._failed = False

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """Half of WATCHDOG_USEC (systemd's advice), if the watchdog is meant for this process."""
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return max(int(usec), 1) / 2e6
        except ValueError:
            log.error("sd_watchdog_usec_invalid", value=usec)
            return None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, **fields: str) -> bool:
        if self._socket is None:
            return False
        message = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.error("sd_notify_failed", socket=self._address.replace("\0", "@"), error=str(exc))
            return False
        return True

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def ready(self, text: str = "running") -> None:
        self.send(READY="1", STATUS=text)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def stopping(self, text: str = "stopping") -> None:
        self.send(STOPPING="1", STATUS=text)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
