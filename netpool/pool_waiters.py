"""The callers queued for a pooled connection, first come first served.

A caller that finds no connection free (and no room to dial one) joins the
queue and sleeps on its own one-shot lock. Whoever frees something grants
it to the first in line: a connection, the right to dial one (a slot freed
by a closed connection), or the news that the pool closed. Every method
runs under the pool's lock; waiting does not.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Optional

__all__ = ["Waiter", "WaiterQueue"]


class Waiter:
    """One queued caller: granted either a connection or the right to dial one.

    The wake-up is a bare lock used as a one-shot semaphore (held at
    creation, released by the grant): under contention every checkout may
    queue, and an Event costs a Condition and two locks more.
    """

    __slots__ = ("lock", "conn", "dial", "granted", "closed")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.conn: Any = None
        self.dial = False
        self.granted = False
        self.closed = False

    def wake(self) -> None:
        self.lock.release()

    def wait(self, timeout: Optional[float]) -> None:
        if timeout is None:
            self.lock.acquire()
        elif timeout > 0:
            self.lock.acquire(timeout=timeout)


class WaiterQueue:
    """The queue itself (the pool's lock held for every call)."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: collections.deque[Waiter] = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def join(self) -> Waiter:
        """A new waiter at the back of the line."""
        waiter = Waiter()
        self._queue.append(waiter)
        return waiter

    def leave(self, waiter: Waiter) -> None:
        """Take a waiter that gave up out of the line (a grant after this cannot reach it)."""
        try:
            self._queue.remove(waiter)
        except ValueError:  # pragma: no cover - granted, and so already out of the line
            pass

    def grant_connection(self, conn: Any) -> None:
        """Hand ``conn`` to the first in line."""
        waiter = self._queue.popleft()
        waiter.conn = conn
        waiter.granted = True
        waiter.wake()

    def grant_dial(self) -> None:
        """Give the first in line the right to dial a connection of its own."""
        waiter = self._queue.popleft()
        waiter.dial = True
        waiter.granted = True
        waiter.wake()

    def close_all(self) -> None:
        """Wake everyone in line with the news that the pool closed."""
        for waiter in self._queue:
            waiter.granted = waiter.closed = True
            waiter.wake()
        self._queue.clear()
