"""Deadlines: per-stream timeouts, kept by one thread for all streams.

netpool's ``idle_timeout`` is one number per listener (a kernel receive
timeout). XMPP wants two: a stream that has not logged in gets tens of
seconds, a logged-in one gets well over the five minutes between client
keepalives. So each stream carries its own ``deadline`` (a
``time.monotonic()`` value) and this keeper calls its ``expire()`` once the
deadline passes.

Moving a deadline later is a plain attribute store, with no lock and no heap
operation, because it happens on every read: the heap keeps one entry per
stream, and an entry that pops early is simply pushed again with the
stream's current deadline. Deadlines only ever move later.

The thread runs only while some stream is watched, so a server with no
clients (or a stopped one) has none.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Optional, Protocol

__all__ = ["Deadlines", "Expiring"]

log = logging.getLogger("netpool.xmpp")


class Expiring(Protocol):
    """What the keeper needs from a stream."""

    deadline: float
    """``time.monotonic()`` after which the stream expires; may be moved later at any time."""

    def expire(self) -> None:
        """Called once on the keeper's thread when the deadline has passed; must not block."""


class Deadlines:
    """Calls ``expire()`` on watched objects whose ``deadline`` has passed."""

    def __init__(self, name: str = "netpool-xmpp-deadlines") -> None:
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Expiring]] = []
        self._watched: set[Expiring] = set()
        self._order = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def watch(self, item: Expiring) -> None:
        """Start watching ``item`` (its ``deadline`` must already be set)."""
        with self._cond:
            self._watched.add(item)
            heapq.heappush(self._heap, (item.deadline, next(self._order), item))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0][2] is item:
                self._cond.notify()  # it is due before whatever the thread is waiting for

    def unwatch(self, item: Expiring) -> None:
        """Stop watching ``item``; safe to call more than once."""
        with self._cond:
            self._watched.discard(item)
            if not self._watched:
                self._heap.clear()
                self._cond.notify()  # let the thread exit now
            elif len(self._heap) > 2 * len(self._watched) + 64:
                # Entries of closed streams wait for their deadline to be
                # dropped; under heavy churn, rebuild instead of letting them pile up.
                self._heap = [entry for entry in self._heap if entry[2] in self._watched]
                heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._watched)

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._collect_due()
                if not due:
                    if not self._watched:
                        self._thread = None
                        return
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                    continue
            for item in due:
                try:
                    item.expire()
                except Exception:  # one stream's failure must not stop the clock for the others
                    log.exception("expiring %r failed", item)

    def _collect_due(self) -> list[Expiring]:
        """Pop the entries that are due (lock held); re-push those whose deadline moved."""
        now = time.monotonic()
        due = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, item = heapq.heappop(heap)
            if item not in self._watched:
                continue
            if item.deadline > now:
                heapq.heappush(heap, (item.deadline, next(self._order), item))
                continue
            self._watched.discard(item)
            due.append(item)
        return due
