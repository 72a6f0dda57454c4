"""The byte stream under a connection: a plain socket, behind the same interface as ``tls.TLSTransport``.

A connection reads and sends through its transport and never asks which
kind it has: a :class:`PlainTransport` from the accept, replaced by a
``tls.TLSTransport`` when an implicit-TLS handshake or ``start_tls()``
finishes (trio's SocketStream and SSLStream, one interface). Both have:

- ``socket``: the connected socket (for socket options; never read or
  write it directly: the transport's state would no longer match);
- ``is_tls``: False here, True for TLS;
- ``recv_nowait(size)``: bytes, b"" at the end of the stream, or None when
  nothing can be read without waiting;
- ``send_nowait(data)``: how many bytes were taken now (0 if none);
- ``sendall(data, deadline)``: everything by ``deadline`` (monotonic), or
  TimeoutError;
- ``pending()``: bytes already read and decoded that epoll cannot see (0 here);
- ``told_to_close(abort)``: the connection is closing; ``abort``: at once.

The sockets an I/O loop serves are non-blocking: reads and sends never
wait here except in ``sendall``, which polls.
"""

from __future__ import annotations

import select
import socket
from typing import Optional

from .deadline import poll_until

__all__ = ["PlainTransport"]


class PlainTransport:
    """A plain TCP (or UNIX) stream socket, as a transport."""

    __slots__ = ("socket",)
    is_tls = False

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock

    def recv_nowait(self, size: int) -> Optional[bytes]:
        try:
            return self.socket.recv(size)
        except BlockingIOError:
            return None

    def send_nowait(self, data: "bytes | memoryview") -> int:
        try:
            return self.socket.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0

    def sendall(self, data: "bytes | memoryview", deadline: float) -> None:
        # poll() + a non-blocking send: a peer that reads one byte now and
        # then cannot stretch the wait past the deadline.
        view = memoryview(data)
        sent = 0
        poller = select.poll()
        poller.register(self.socket, select.POLLOUT)
        while sent < len(view):
            try:
                sent += self.socket.send(view[sent:], socket.MSG_DONTWAIT)
                continue
            except BlockingIOError:
                pass
            if not poll_until(poller, deadline):
                raise TimeoutError("send timed out")

    def pending(self) -> int:
        return 0

    def told_to_close(self, abort: bool) -> None:
        """Nothing to do: the connection's socket shutdown is all a plain stream needs."""
