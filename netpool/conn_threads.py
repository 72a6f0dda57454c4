"""Thread mode's threads (loop owners, handed-off connections), reused instead of started each time.

Starting a thread costs tens of microseconds and a fresh stack. In thread
mode a loop moves to a new thread whenever a handler blocks, and the blocked
thread stays with its connection until the call is over (until the
connection ends, for one that blocks again); such a thread then parks for a
while and takes the next job, the way a goroutine scheduler reuses its Ms.

The invariant that keeps this simple: ``idle`` counts parked threads and is
only changed under ``_lock``; ``submit`` hands work to a parked thread only
by decrementing ``idle`` and queueing the work under that same lock, and a
parked thread only leaves after checking, under the lock, that no work was
queued for it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

__all__ = ["ConnectionThreads"]

log = logging.getLogger("netpool.listener")

_STOP = object()


class ConnectionThreads:
    """Run callables on reused threads: a parked one if any, else a new one."""

    def __init__(self, name: str, *, keepalive: float = 30.0, max_parked: int = 256) -> None:
        self._name = name
        self._keepalive = keepalive
        self._max_parked = max_parked
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = 0
        self._closed = False
        self._threads: set[threading.Thread] = set()
        self._numbers = itertools.count(1)

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on a thread. Raises RuntimeError if no thread can be started."""
        with self._lock:
            if self._closed:
                raise RuntimeError("connection threads are stopped")
            if self._idle:
                self._idle -= 1
                self._work.put((fn, args))
                return
            thread = threading.Thread(
                target=self._run, args=(fn, args), name=f"netpool-conn-{self._name}-{next(self._numbers)}", daemon=True
            )
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._threads.discard(thread)
            raise

    def _run(self, fn: Callable[..., None], args: tuple) -> None:
        try:
            while True:
                try:
                    fn(*args)
                except BaseException:  # the connection loop handles its own errors; this is a last guard
                    log.exception("connection thread %s: unexpected error", threading.current_thread().name)
                fn = None  # drop references to the finished connection while parked
                args = ()
                with self._lock:
                    if self._closed or self._idle >= self._max_parked:
                        return
                    self._idle += 1
                item = self._park()
                if item is _STOP or item is None:
                    return
                fn, args = item
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _park(self) -> Any:
        """Wait for work; None after ``keepalive`` with nothing queued for us."""
        while True:
            try:
                return self._work.get(timeout=self._keepalive)
            except queue.Empty:
                with self._lock:
                    if not self._work.empty():
                        continue  # work was queued for a parked thread as we timed out
                    self._idle -= 1
                    return None

    def stop(self, deadline: float) -> int:
        """Release parked threads and join every thread until ``deadline``; returns how many are still running."""
        with self._lock:
            self._closed = True
            parked, self._idle = self._idle, 0
            threads = list(self._threads)
        for _ in range(parked):
            self._work.put(_STOP)
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(max(0.0, deadline - time.monotonic()))
        return sum(1 for t in threads if t.is_alive() and t is not current)

    @property
    def threads(self) -> int:
        with self._lock:
            return len(self._threads)

    @property
    def parked(self) -> int:
        with self._lock:
            return self._idle
