"""Outbox: what other threads send one stream, in a bounded queue with a writer thread of its own.

Why it exists: a message from alice to bob is routed on alice's connection
thread. If that thread wrote to bob's socket itself, a bob who stops reading
would hold alice for up to ``send_timeout``, and a broadcast would hold the
sender once per slow recipient. Instead alice puts the bytes in bob's outbox
and returns at once; bob's writer thread does any waiting.

The queue is bounded in bytes. A recipient that falls that far behind is
not worth more memory: the outbox closes and ``on_overflow`` runs (the
stream is then disconnected), and ``put`` tells the sender the stanza was
not taken.

The writer thread runs only while there is something to write and lingers
briefly for the next burst, so thousands of idle streams cost no threads.

Ownership: the outbox owns its writer thread; ``close()`` makes it exit
after the write in progress (which fails fast once the connection closes).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Optional, Union

from netpool import ConnectionClosed, SendTimeout

__all__ = ["Outbox"]

log = logging.getLogger("netpool.xmpp")

Item = Union[bytes, Callable[[], None]]


class Outbox:
    """A bounded FIFO of bytes (and actions) for one stream; every method is thread-safe and never blocks.

    ``write(data)`` is called on the writer thread, in order; it may block
    (the peer's window is full) and raise ConnectionClosed or SendTimeout,
    which close the outbox.
    """

    def __init__(self, write: Callable[[bytes], None], *, name: str, max_bytes: int,
                 on_overflow: Callable[[], None], linger: float = 2.0) -> None:
        self._write = write
        self._name = name
        self._max_bytes = max_bytes
        self._on_overflow = on_overflow
        self._linger = linger
        self._cond = threading.Condition(threading.Lock())
        self._items: collections.deque[Item] = collections.deque()
        self._queued = 0  # bytes taken and not yet written, the batch being written included
        self._writer: Optional[threading.Thread] = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, data: bytes) -> bool:
        """Queue ``data`` for the stream; False if it was not taken (closed, or full: then the outbox closes)."""
        with self._cond:
            if self._closed:
                return False
            if self._queued + len(data) <= self._max_bytes:
                self._items.append(data)
                self._queued += len(data)
                if self._wake():
                    return True
            self._close_locked()
        self._on_overflow()
        return False

    def call(self, action: Callable[[], None]) -> bool:
        """Run ``action`` on the writer thread after everything queued before it; False if closed.

        For work that may block on the peer but must not block the caller
        (sending a last stream error from a timer thread).
        """
        with self._cond:
            if self._closed:
                return False
            self._items.append(action)
            if self._wake():
                return True
            self._close_locked()
        self._on_overflow()
        return False

    def close(self) -> None:
        """Drop what is queued and refuse more; the writer exits after its current write."""
        with self._cond:
            self._close_locked()

    def _close_locked(self) -> None:
        self._closed = True
        self._items.clear()
        self._queued = 0
        self._cond.notify_all()

    def _wake(self) -> bool:
        """Make sure a writer will see the new item (lock held); False if no thread could be started."""
        if self._writer is not None:
            self._cond.notify()
            return True
        thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        try:
            thread.start()
        except RuntimeError:  # the system's thread limit: treat the stream as unservable
            log.error("%s: cannot start a writer thread; closing the stream", self._name)
            return False
        self._writer = thread
        return True

    # -- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._items and not self._closed:
                    self._cond.wait(self._linger)
                if self._closed or not self._items:
                    # Nothing came while lingering: exit. A put that comes later
                    # sees _writer is None (under the same lock) and starts a new one.
                    self._writer = None
                    return
                batch, self._items = self._items, collections.deque()
            if not self._drain(batch):
                self.close()

    def _drain(self, batch: collections.deque[Item]) -> bool:
        """Write a batch in order, joining adjacent bytes into one send; False once the stream is gone."""
        chunk: list[bytes] = []
        try:
            for item in batch:
                if isinstance(item, bytes):
                    chunk.append(item)
                    continue
                if chunk:
                    self._send(chunk)
                    chunk = []
                item()
            if chunk:
                self._send(chunk)
        except (ConnectionClosed, SendTimeout):
            return False
        except Exception:
            # Never die silently: log, and stop writing to this stream.
            log.exception("%s: writing to the stream failed", self._name)
            return False
        return True

    def _send(self, chunk: list[bytes]) -> None:
        data = b"".join(chunk)
        try:
            self._write(data)
        finally:
            with self._cond:
                if not self._closed:
                    self._queued -= len(data)
