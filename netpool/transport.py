"""The byte stream under a connection: a plain socket, behind the same interface as ``tls.TLSTransport``.

A connection reads and sends through its transport: a
:class:`PlainTransport` from the accept, replaced by a ``tls.TLSTransport``
when an implicit-TLS handshake or ``start_tls()`` finishes (trio's
SocketStream and SSLStream, one interface). One exception, for speed: the
I/O loop asks ``is_tls`` before a read, and reads a plain socket by its
descriptor through ``hot_path.recv_nowait`` (in C, into a reused buffer:
``socket.recv`` allocates the whole requested size per call), and skips
``pending()`` for it. Both have:

- ``socket``: the connected socket (for socket options; never read or
  write it directly: the transport's state would no longer match);
- ``is_tls``: False here, True for TLS;
- ``recv_nowait(size)``: bytes (b"" at the end of the stream), or
  BlockingIOError when nothing can be read without waiting;
- ``send_nowait(data)``: how many bytes were taken now, or BlockingIOError
  when none could be;
- ``send_until(data, deadline)``: all of it by ``deadline`` (monotonic),
  or :class:`SendIncomplete` (a TimeoutError) saying how much went out;
- ``pending()``: bytes already read and decoded that epoll cannot see (0 here);
- ``told_to_close(abort)``: the connection is closing; ``abort``: at once.

A plain stream needs no state of its own, so PlainTransport *is* the socket
(the acceptor makes accepted sockets of this class): its reads and sends are
the socket's own, without a Python call in between, and a connection costs
no extra object. The I/O loop's sockets are non-blocking: nothing here waits
except ``send_until``, which polls.
"""

from __future__ import annotations

import select
import socket

from .deadline import poll_until

__all__ = ["PlainTransport", "SendIncomplete"]


class SendIncomplete(TimeoutError):
    """``send_until``'s deadline passed with ``sent`` bytes of the data gone out (the counters count them)."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"send timed out after {sent} bytes")
        self.sent = sent


class PlainTransport(socket.socket):
    """An accepted plain TCP (or UNIX) stream socket, which is its own transport."""

    __slots__ = ()
    is_tls = False
    recv_nowait = socket.socket.recv
    send_nowait = socket.socket.send

    @property
    def socket(self) -> "PlainTransport":
        return self

    def send_until(self, data: "bytes | memoryview", deadline: float) -> None:
        # poll() + a non-blocking send: a peer that reads one byte now and
        # then cannot stretch the wait past the deadline.
        view = memoryview(data)
        sent = 0
        poller = select.poll()
        poller.register(self, select.POLLOUT)
        while sent < len(view):
            try:
                sent += self.send(view[sent:], socket.MSG_DONTWAIT)
                continue
            except BlockingIOError:
                pass
            if not poll_until(poller, deadline):
                raise SendIncomplete(sent)

    def pending(self) -> int:
        return 0

    def told_to_close(self, abort: bool) -> None:
        """Nothing to do: the connection's socket shutdown is all a plain stream needs."""

    def end_with_fin(self) -> None:
        """Before the close of a connection told to quit: a FIN, then the unread bytes read away (see end_with_fin)."""
        end_with_fin(self)


def end_with_fin(sock: socket.socket) -> None:
    """End a connection told to quit (stop, reload, quit queue) with a FIN, never a reset.

    Closing a TCP socket over unread bytes makes the kernel send a reset
    instead of a FIN: a client whose request crossed our graceful close
    would see "connection reset" where it should see the end of the stream.
    So the FIN goes first (bytes arriving after it can still draw a reset,
    but the client reads its end of stream first), then what the peer sent
    is read away. Bounded: a peer that keeps sending cannot hold the close up.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not sock.recv(65536, socket.MSG_DONTWAIT):
                return
    except OSError:
        pass
