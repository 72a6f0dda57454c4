"""One descriptor held in reserve, so that a process out of descriptors can still turn clients away.

When accept() fails with EMFILE the clients waiting in the backlog can be
neither served nor refused: each needs a descriptor to be closed. Holding
one spare (Twisted's reserved descriptor, libuv's EMFILE trick) lets an
acceptor give it up, accept and close every pending client at once, and
take it back, instead of spinning on the error or leaving clients to hang.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Callable, Optional

__all__ = ["SpareDescriptor"]


class SpareDescriptor:
    """The reserve: opened with the listener, spent and taken back by :meth:`drain`."""

    def __init__(self) -> None:
        self._fd: Optional[int] = None
        self._lock = threading.Lock()

    def open(self) -> None:
        with self._lock:
            if self._fd is None:
                self._fd = _open_spare()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def drain(self, sock: socket.socket, most: int, refuse: Callable[[socket.socket], None]) -> int:
        """Accept and ``refuse`` up to ``most`` pending clients on ``sock`` through the spare; how many.

        The caller makes sure no other thread is in accept() on ``sock``.
        """
        with self._lock:
            if self._fd is None:
                self._fd = _open_spare()
                if self._fd is None:
                    return 0
            os.close(self._fd)
            self._fd = None
            drained = 0
            # Nobody else is in accept(): non-blocking is safe, and the loop
            # ends as soon as the backlog is empty (bounded by its size).
            sock.setblocking(False)
            try:
                while drained < most:
                    try:
                        client, _ = sock.accept()
                    except OSError:  # BlockingIOError: none left
                        break
                    refuse(client)
                    drained += 1
            finally:
                sock.setblocking(True)
                self._fd = _open_spare()
            return drained


def _open_spare() -> Optional[int]:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
