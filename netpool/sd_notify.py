"""systemd's notify protocol, without depending on systemd: READY=1, STOPPING=1, STATUS=... to $NOTIFY_SOCKET.

Under a unit with ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` to a
datagram socket and waits for ``READY=1`` before it counts the service as
started (and starts what depends on it); ``STATUS=`` is what ``systemctl
status`` shows; ``STOPPING=1`` says a stop has begun. The protocol is one
datagram of newline-separated ``KEY=VALUE`` lines (sd_notify(3)); an
address starting with ``@`` is in the abstract namespace. Without
``NOTIFY_SOCKET`` every call does nothing, so the CLI calls it always.

Only the process systemd started may talk (``NotifyAccess=main``, the
default): worker processes forget the variable (:func:`forget`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable, Optional

__all__ = ["notify", "forget", "StatusReporter"]

log = logging.getLogger("netpool.sd_notify")

ENV = "NOTIFY_SOCKET"
# How often STATUS= is refreshed with the live counts while serving.
STATUS_EVERY = 5.0


def notify(*lines: str) -> bool:
    """Send ``lines`` (``READY=1``, ``STATUS=...``) to systemd if it asked for them; True if sent."""
    address = os.environ.get(ENV)
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), target)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc.strerror or exc)
        return False
    return True


def forget() -> None:
    """In a worker process: leave the notifications to the process systemd started."""
    os.environ.pop(ENV, None)


class StatusReporter:
    """Refreshes ``STATUS=`` every STATUS_EVERY seconds with what ``status()`` says, until stopped.

    No thread at all unless systemd asked for notifications.
    """

    def __init__(self, status: Callable[[], str]) -> None:
        self._status = status
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if os.environ.get(ENV):
            self._thread = threading.Thread(target=self._run, name="netpool-sd-status", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(STATUS_EVERY):
            notify(f"STATUS={self._status()}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STATUS_EVERY)
