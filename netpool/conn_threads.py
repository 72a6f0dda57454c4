"""Thread mode's threads (loop owners, blocking handler calls), reused instead of started each time.

Starting a thread costs tens of microseconds and a fresh stack. In thread
mode a loop moves to a new thread whenever a handler blocks, and handler
calls of connections that block run here, off their loop; a thread then
parks for a while and takes the next job, the way a goroutine scheduler
reuses its Ms.

Bounded: at most ``max_threads`` run jobs at once. A job submitted when all
of them are busy waits in a queue for the first one to finish, in the order
submitted (a database with 50 connections serves 50 queries at once however
many clients ask; more threads would only queue on the interpreter lock).
A loop's new owner is never queued behind handler calls (``urgent``): it
gets a thread of its own at once.

Parked threads form a stack: a job goes to the one parked last. A thread
not needed for ``keepalive`` thus leaves, and a peak's extra threads leave
after it. (Waiting together on one queue, they were woken in turn, first
parked first: a job every keepalive / parked seconds kept every thread of
the highest peak alive for good, and an hour's soak crept from 38 to 46
threads.)

The invariant that keeps this simple: a parked thread is on ``_parked``
until a job is handed to it or it leaves, and both happen under ``_lock``;
``_queue`` holds jobs no thread has been handed yet, and a thread that
finishes a job looks there before it parks.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from typing import Any, Callable, Optional

__all__ = ["ConnectionThreads"]

log = logging.getLogger("netpool.listener")

_STOP = (None, ())


class _Parked:
    """One parked thread's slot: a job is put in ``job`` and ``ready`` released, under the pool's lock."""

    __slots__ = ("ready", "job")

    def __init__(self) -> None:
        self.ready = threading.Lock()
        self.ready.acquire()
        self.job: Optional[tuple[Any, tuple]] = None


class ConnectionThreads:
    """Run callables on reused threads: the last parked one if any, else a new one, else in turn."""

    def __init__(self, name: str, *, max_threads: int = 1024, keepalive: float = 30.0,
                 max_parked: int = 256) -> None:
        self._name = name
        self._max_threads = max_threads
        self._keepalive = keepalive
        self._max_parked = max_parked
        self._lock = threading.Lock()
        self._parked: list[_Parked] = []
        self._queue: collections.deque[tuple[Any, tuple]] = collections.deque()
        self._closed = False
        self._threads: set[threading.Thread] = set()
        self._numbers = itertools.count(1)

    def submit(self, fn: Callable[..., None], *args: Any, urgent: bool = False) -> None:
        """Run ``fn(*args)`` on a thread, or queue it when ``max_threads`` are busy (never if ``urgent``).

        Raises RuntimeError if a thread is needed and none can be started.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("connection threads are stopped")
            if self._parked:
                slot = self._parked.pop()
                slot.job = (fn, args)
                slot.ready.release()
                return
            if not urgent and len(self._threads) >= self._max_threads:
                self._queue.append((fn, args))
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

    def _run(self, fn: Optional[Callable[..., None]], args: tuple) -> None:
        try:
            while fn is not None:
                try:
                    fn(*args)
                except BaseException:  # the connection loop handles its own errors; this is a last guard
                    log.exception("connection thread %s: unexpected error", threading.current_thread().name)
                del fn  # drop references to the finished connection while parked
                args = ()
                with self._lock:
                    if self._queue:
                        fn, args = self._queue.popleft()
                        continue
                    if self._closed or len(self._parked) >= self._max_parked:
                        return
                    slot = _Parked()
                    self._parked.append(slot)
                fn, args = self._park(slot)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _park(self, slot: _Parked) -> tuple[Any, tuple]:
        """Wait for a job handed to ``slot``; _STOP after ``keepalive`` with none."""
        if not slot.ready.acquire(timeout=self._keepalive):
            with self._lock:
                if slot in self._parked:  # nobody handed it a job: leave
                    self._parked.remove(slot)
                    return _STOP
            # A job was handed to it as it timed out (ready is released under the lock).
            slot.ready.acquire()
        assert slot.job is not None
        return slot.job

    def stop(self, deadline: float) -> int:
        """Release parked threads and join every thread until ``deadline``; returns how many are still running.

        Jobs still queued are run by the threads that finish theirs before
        they leave (each is a connection's pending handler call).
        """
        with self._lock:
            self._closed = True
            for slot in self._parked:
                slot.job = _STOP
                slot.ready.release()
            self._parked.clear()
            threads = list(self._threads)
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
            return len(self._parked)

    @property
    def queued(self) -> int:
        """Jobs waiting for a thread because ``max_threads`` are busy.

        Read without the lock (a deque's length is read whole): handler
        threads ask it after every read-ahead, and a count a moment old serves.
        """
        return len(self._queue)
