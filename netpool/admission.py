"""Admission: the live-connection counter and the overflow strategies.

One lock guards the count, the limit and the waiting acceptors, in the spirit
of Ranch's ``ranch_conns_sup``. Acceptors only ask for a decision and act on
it; every release (a connection closing or leaving the count) wakes one
acceptor waiting for a slot.

With ``overflow="wait"`` an acceptor *reserves* a slot before it calls
``accept()``, so at the limit no acceptor sits in ``accept()`` and new clients
queue in the kernel backlog, served in turn as slots free. The live count can
therefore never exceed the limit, not even by the number of acceptors (a
looseness Ranch documents for its own limit).
"""

from __future__ import annotations

import logging
import resource
import threading
import time

__all__ = ["Admission", "fd_ceiling", "FD_RESERVE"]

log = logging.getLogger("netpool.admission")

# Descriptors kept back from "grow" for the listening socket, the spare
# descriptor, log files, the handler's own files and outgoing connections.
FD_RESERVE = 64


def fd_ceiling(acceptors: int = 0) -> int:
    """The most connections this process can hold: its open-file limit less a reserve.

    Each acceptor blocked in accept() already holds a descriptor slot (Linux
    reserves it before waiting), so those come off too.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - FD_RESERVE - acceptors)


class Admission:
    """Counts live connections and applies the overflow strategy at the limit."""

    def __init__(
        self,
        max_connections: int,
        overflow: str,
        grow_step: int,
        *,
        alarm_threshold: int | None = None,
        alarm_cooldown: float = 5.0,
        ceiling: int | None = None,
        acceptors: int = 0,
    ) -> None:
        # Every connection passes admit() and release(): they take the plain
        # lock (a Condition's with-statement and notify() are Python code)
        # and notify only when an acceptor waits in reserve().
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0
        self.max_connections = max_connections
        self.overflow = overflow
        self.grow_step = grow_step
        self.ceiling = ceiling if ceiling is not None else fd_ceiling(acceptors)
        self.live = 0
        self.grown = 0
        self._reserved = 0
        self._closed = False
        self._alarm_threshold = alarm_threshold
        self._alarm_cooldown = alarm_cooldown
        self._last_alarm = -float("inf")

    # -- acceptor side -------------------------------------------------------

    def reserve(self) -> bool:
        """For overflow="wait": block until a slot is free and hold it for the next accept.

        Returns False when the admission is closed (the listener is stopping).
        """
        with self._cond:
            while not self._closed and self.live + self._reserved >= self.max_connections:
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
            if self._closed:
                return False
            self._reserved += 1
            return True

    def unreserve(self) -> None:
        """Give back a slot reserved for an accept that produced no connection."""
        with self._lock:
            self._reserved -= 1
            if self._waiting:
                self._cond.notify()

    def admit(self, reserved: bool = False) -> tuple[bool, bool]:
        """Decide about one accepted socket: ``(admitted, alarm_due)``.

        ``reserved`` says the acceptor holds a slot from :meth:`reserve`, which
        this turns into a live connection.
        """
        with self._lock:
            if reserved:
                self._reserved -= 1
            elif self.live >= self.max_connections:
                if self.overflow != "grow" or not self._grow():
                    return False, False
            self.live += 1
            return True, self._alarm_threshold is not None and self._alarm_due()

    def _grow(self) -> bool:
        if self.max_connections >= self.ceiling:
            return False
        old = self.max_connections
        self.max_connections = min(old + self.grow_step, self.ceiling)
        self.grown += 1
        log.info("max_connections grown from %d to %d (ceiling %d)", old, self.max_connections, self.ceiling)
        return True

    def _alarm_due(self) -> bool:
        if self._alarm_threshold is None or self.live < self._alarm_threshold:
            return False
        now = time.monotonic()
        if now - self._last_alarm < self._alarm_cooldown:
            return False
        self._last_alarm = now
        return True

    # -- connection side -----------------------------------------------------

    def release(self) -> None:
        """One counted connection closed or left the count: free its slot."""
        with self._lock:
            self.live -= 1
            if self._waiting:
                self._cond.notify()

    # -- listener side -------------------------------------------------------

    def set_max_connections(self, n: int) -> None:
        """Change the limit at once. Lowering it never closes live connections."""
        with self._cond:
            self.max_connections = n
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every waiting acceptor for good (the listener is stopping)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
