"""Thread mode's handler threads: the crew that takes offloaded connections' events, one at a time.

An I/O loop moves a connection whose handler blocks off its own epoll to a
second, one-shot epoll (``io_loop``: the connection is *offloaded*). The
threads here wait on that epoll, take one event each and run the loop's
turn for that connection (``take_turn(fd)``: read it, run its calls in
order, arm it again). A message thus costs one thread wake-up, as on a
thread per connection, while the threads are only as many as calls run at
once: MIN_HANDLERS at first (connections offloaded together find a thread
each), one more whenever an event is taken with none left waiting while
the process leaves CPU idle or the loop has few connections, and one more
whenever all have been stuck for HANDLERS_STUCK (``unstick``, from the
loop's monitor). A thread with nothing to do for HANDLER_KEEPALIVE leaves,
unless it is the last one waiting.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from typing import Callable

from .conn_threads import ConnectionThreads
from .hot_path import rearm

__all__ = ["HandlerThreads", "HANDLER_THREADS", "ARMED"]

log = logging.getLogger("netpool.handler_threads")

# Threads that run offloaded connections' calls, per listener (shared by its
# loops); past that, offloaded connections wait for a running one.
HANDLER_THREADS = 1024
# A handler thread with nothing to do for this long leaves (but the last).
HANDLER_KEEPALIVE = 10.0
# Handler threads are added while the process used less than CPU_BUSY of a
# core over the last CPU_WINDOW seconds (the interpreter runs Python on one
# core at a time), and always up to MIN_HANDLERS, or up to one per connection
# while a loop has at most FEW_CONNECTIONS: then each busy client keeps a
# thread waiting on it (io_loop's STICK), as on a thread per connection,
# which costs less CPU per message than taking turns on fewer threads.
MIN_HANDLERS = 16
FEW_CONNECTIONS = 64
CPU_BUSY = 0.85
CPU_WINDOW = 0.01
# Every handler thread busy and none done with a turn for this long: the
# monitor starts one more (they are blocked, not short of CPU).
HANDLERS_STUCK = 0.01

# An offloaded connection is read once per event, then disarmed until its
# calls are over: like a connection thread, the loop never reads ahead of the
# handler (backpressure through TCP, and STARTTLS has the socket to itself).
ARMED = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT


class HandlerThreads:
    """One loop's handler threads and the one-shot epoll they wait on."""

    def __init__(self, threads: ConnectionThreads, *, most: int, name: str,
                 take_turn: Callable[[int], None], connections: Callable[[], int]) -> None:
        """``take_turn(fd)`` serves the connection whose event a thread took (on that thread);
        ``connections()`` is how many the loop has; ``most`` caps the threads; ``name`` is for logs."""
        self._threads = threads
        self._most = most
        self._name = name
        self._take_turn = take_turn
        self._connections = connections
        self._ep = select.epoll()
        # An eventfd wakes every waiting thread at stop.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake, select.EPOLLIN)
        self._lock = threading.Lock()
        self._running = 0
        # Threads waiting for an event (none of them busy). Read without the
        # lock by the loop (and its C turn) to decide whether a thread may
        # wait on one client: another is there for the rest.
        self.idle = 0
        self._stopping = False
        self._closed = False
        self._cpu_at, self._cpu_used, self._cpu_room = time.monotonic(), time.process_time(), True
        self._turn_ended = time.monotonic()  # when a thread last finished a turn

    def fileno(self) -> int:
        """The one-shot epoll's descriptor (the C turn arms connections in it)."""
        return self._ep.fileno()

    def register(self, fd: int, *, armed: bool) -> None:
        """Take ``fd`` (an offloaded connection): its next event goes to a thread at once if ``armed``."""
        self._ep.register(fd, ARMED if armed else select.EPOLLONESHOT)

    def unregister(self, fd: int) -> None:
        self._ep.unregister(fd)

    def rearm(self, fd: int) -> None:
        """Let ``fd``'s next event through again (its turn is over)."""
        rearm(self._ep, fd, ARMED)

    def waiting(self) -> int:
        """How many threads wait for an event now (a consistent count)."""
        with self._lock:
            return self.idle

    def ensure(self) -> None:
        """Make sure some thread waits for events; the first time, MIN_HANDLERS start at once.

        Connections offloaded together (many clients blocking at the same
        moment) then find a thread each, instead of waiting for threads
        started one by one.
        """
        with self._lock:
            if self.idle or self._running >= self._most or self._stopping:
                return
            start = max(1, min(MIN_HANDLERS, self._most) - self._running)
            self._running += start
            self.idle += start
        for _ in range(start):
            self._start()

    def unstick(self) -> None:
        """One more thread if every one has been busy for HANDLERS_STUCK with none finishing a turn.

        They may all be blocked (in sends to clients that do not read, say)
        while another connection's event waits for a thread: only a new one
        takes it. Called by the loop's monitor at each tick.
        """
        if not self._running or self.idle:
            return  # the common case, seen without the lock: nobody is stuck
        with self._lock:
            if (not self._running or self.idle or self._running >= self._most or self._stopping
                    or time.monotonic() - self._turn_ended < HANDLERS_STUCK):
                return
            self._running += 1
            self.idle += 1
            self._turn_ended = time.monotonic()  # one more per HANDLERS_STUCK at most
        self._start()

    def stop(self) -> None:
        """Waiting threads leave at once; busy ones as their turn ends."""
        with self._lock:
            self._stopping = True
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """The loop has ended: stop, and release the epoll once the last thread has left."""
        with self._lock:
            self._stopping = self._closed = True
            # Under the lock: the last thread to leave may release the
            # eventfd (_release) the moment _closed is set.
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)
        self._release()

    def _start(self) -> None:
        try:
            self._threads.submit(self._serve, urgent=True)
        except RuntimeError as exc:  # no thread can be started (a system limit, or stopping)
            with self._lock:
                self._running -= 1
                self.idle -= 1
            if not self._stopping:
                log.error("%s: cannot start a handler thread (%s); offloaded connections wait for the ones running",
                          self._name, exc)

    def _serve(self) -> None:
        """A handler thread: take one event at a time and have its connection served.

        It counts as idle while it waits; when it takes an event and no other
        is idle, it starts one more (up to ``most``), so the next event never
        waits for a call to end.
        """
        poll = self._ep.poll
        lock = self._lock
        take_turn = self._take_turn
        while True:
            try:
                events = poll(HANDLER_KEEPALIVE, 1)
            except (OSError, ValueError):  # closed: the loop has ended
                events = None
            with lock:
                if events is None or self._stopping or (not events and self.idle > 1):
                    self.idle -= 1
                    self._running -= 1
                    last = not self._running
                    break
                if not events:
                    continue
                self.idle -= 1
                more = not self.idle and self._running < self._most and (
                    self._running < MIN_HANDLERS or self._connections() <= FEW_CONNECTIONS or self._cpu_has_room())
                if more:
                    self._running += 1
                    self.idle += 1
            if more:
                self._start()
            take_turn(events[0][0])
            with lock:
                self.idle += 1
                self._turn_ended = time.monotonic()
        if last and self._stopping:
            self._release()

    def _cpu_has_room(self) -> bool:
        """Whether the process left the CPU idle lately (lock held): then another thread helps.

        Events waiting with no thread free mean either that all are blocked
        (another thread helps) or that the interpreter is the limit (another
        thread only lengthens the queue for the GIL: with 1,000 threads a
        message cost twice as much CPU as with 64). The process's CPU time
        over the last CPU_WINDOW tells which.
        """
        now = time.monotonic()
        if now - self._cpu_at < CPU_WINDOW:
            return self._cpu_room
        used = time.process_time()
        self._cpu_room = (used - self._cpu_used) / (now - self._cpu_at) < CPU_BUSY
        self._cpu_at, self._cpu_used = now, used
        return self._cpu_room

    def _release(self) -> None:
        """Close the epoll and the eventfd once the loop has ended and the last thread has left."""
        with self._lock:
            if self._wake < 0 or self._running or not self._closed:
                return
            self._ep.close()
            os.close(self._wake)
            self._wake = -1
