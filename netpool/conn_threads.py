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

The invariant that keeps this simple: ``_idle`` counts parked threads no job
has been promised to, ``_queued`` counts jobs no thread has been promised
to, and both only change under ``_lock``. ``submit`` promises a job to a
parked thread by decrementing ``_idle``; a thread that finishes a job takes
a queued one by decrementing ``_queued``; a parked thread only leaves after
checking, under the lock, that no job was put in the queue for it.
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
    """Run callables on reused threads: a parked one if any, else a new one, else in turn."""

    def __init__(self, name: str, *, max_threads: int = 1024, keepalive: float = 30.0,
                 max_parked: int = 256) -> None:
        self._name = name
        self._max_threads = max_threads
        self._keepalive = keepalive
        self._max_parked = max_parked
        self._lock = threading.Lock()
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = 0
        self._queued = 0
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
            if self._idle:
                self._idle -= 1
                self._work.put((fn, args))
                return
            if not urgent and len(self._threads) >= self._max_threads:
                self._queued += 1
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
                del fn  # drop references to the finished connection while parked
                args = ()
                with self._lock:
                    if self._queued:
                        self._queued -= 1
                        item = self._work.get_nowait()  # never empty: it holds at least _queued jobs
                    elif self._closed or self._idle >= self._max_parked:
                        return
                    else:
                        self._idle += 1
                        item = None
                if item is None:
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
                    if self._work.qsize() > self._queued:
                        continue  # a job was promised to a parked thread as we timed out
                    self._idle -= 1
                    return None

    def stop(self, deadline: float) -> int:
        """Release parked threads and join every thread until ``deadline``; returns how many are still running.

        Jobs still queued are run by the threads that finish theirs before
        they leave (each is a connection's pending handler call).
        """
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

    @property
    def queued(self) -> int:
        """Jobs waiting for a thread because ``max_threads`` are busy.

        Read without the lock (an int attribute is read whole): handler
        threads ask it after every read-ahead, and a count a moment old serves.
        """
        return self._queued
