"""systemd's notify protocol (sd_notify), with the standard library: a few datagrams.

Under a ``Type=notify`` unit systemd sets $NOTIFY_SOCKET: the program sends READY=1 once its
sockets are set up, STATUS=... lines when something changes (``systemctl status`` shows the last),
WATCHDOG=1 from its event loop when the unit sets WatchdogSec (a stuck loop then gets the
program restarted), and STOPPING=1 when it exits.  Without $NOTIFY_SOCKET every call does nothing.
"""
import logging
import os
import socket
from typing import Optional

from .loop import EventLoop

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.address: Optional[str] = os.environ.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):  # the abstract namespace
            self.address = "\0" + self.address[1:]
        self.sock: Optional[socket.socket] = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)

    def notify(self, message: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError as exc:  # systemd gone or busy: nothing to do about it here
            log.debug("systemd notification %r not sent: %s", message, exc)

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={_one_line(status)}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def keep_watchdog_fed(self, loop: EventLoop) -> None:
        """WATCHDOG=1 twice per WatchdogSec, from the loop itself: only a loop that runs feeds it."""
        try:
            interval = int(os.environ.get("WATCHDOG_USEC", "0")) / 1_000_000
        except ValueError:
            interval = 0
        if self.sock is not None and interval > 0:
            loop.call_every(interval / 2, lambda: self.notify("WATCHDOG=1"))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _one_line(text: str) -> str:
    return text.replace("\n", " ")[:200]
