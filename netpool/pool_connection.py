"""One pooled client connection: length-prefixed requests and replies within deadlines, and a liveness check.

The framing is netpool's "length" framing seen from the client: a 4-byte
big-endian length, then the payload. Every call takes a deadline (seconds
from now or a shared :class:`~netpool.Deadline`); each step is also bounded
by a per-read or per-write timeout, so a back end that stops answering
mid-reply is noticed within that timeout, not at the end of the deadline.
"""

from __future__ import annotations

import itertools
import select
import socket
import ssl
import struct
import time
from typing import Optional

from .deadline import Deadline, DeadlineLike, to_deadline
from .errors import ConnectionClosed, DeadlineExceeded, ProtocolError

__all__ = ["PoolConnection", "HEADER"]

HEADER = struct.Struct(">I")
_IDS = itertools.count(1)
# poll() events that mean an idle connection must not be handed out.
DEAD_EVENTS = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | select.POLLNVAL


class PoolConnection:
    """One pooled connection: a socket plus length-prefixed I/O with deadlines.

    Every call takes ``deadline`` (seconds from now, or a shared
    :class:`~netpool.Deadline`); each step is also bounded by the pool's
    ``read_timeout``/``write_timeout``. Any I/O error or timeout marks the
    connection ``broken`` and the pool discards it on release: after a
    timeout the stream may still hold half a reply, and reusing it would
    hand that half to the next caller.

    ``sock`` is the raw socket for protocols of your own; a caller who uses
    it directly and leaves unread bytes behind should ``release(conn,
    discard=True)`` (the checkout check would discard it anyway).
    """

    __slots__ = (
        "sock", "id", "address", "created_at", "last_used", "uses", "broken",
        "read_timeout", "write_timeout", "max_message_size", "_rbuf", "_poll",
    )

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        *,
        read_timeout: Optional[float],
        write_timeout: Optional[float],
        max_message_size: int,
    ) -> None:
        self.sock = sock
        self.id = next(_IDS)
        self.address = address
        self.created_at = self.last_used = time.monotonic()
        self.uses = 0
        self.broken = False
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_message_size = max_message_size
        self._rbuf = bytearray()
        self._poll: Optional[select.poll] = None

    def __repr__(self) -> str:
        return f"<PoolConnection {self.id} to {self.address}{' broken' if self.broken else ''}>"

    # -- the exchange -------------------------------------------------------

    def request(self, payload: bytes, deadline: DeadlineLike = None) -> bytes:
        """Send one length-prefixed message and return the one reply, both within ``deadline``."""
        d = to_deadline(deadline)
        self.send_message(payload, d)
        return self.recv_message(d)

    def send_message(self, payload: bytes, deadline: DeadlineLike = None) -> None:
        """Send ``payload`` with a 4-byte big-endian length prefix (netpool's "length" framing)."""
        self.send(HEADER.pack(len(payload)) + payload, deadline)

    def recv_message(self, deadline: DeadlineLike = None) -> bytes:
        """Receive one length-prefixed message; larger than ``max_message_size`` is a ProtocolError."""
        d = to_deadline(deadline)
        (size,) = HEADER.unpack(self.recv_exactly(4, d))
        if size > self.max_message_size:
            self.broken = True
            raise ProtocolError(
                f"{self.address} announced a {size}-byte reply, more than max_message_size={self.max_message_size}"
            )
        return self.recv_exactly(size, d)

    def send(self, data: bytes, deadline: DeadlineLike = None) -> None:
        """Send all of ``data`` before the deadline (and within ``write_timeout``)."""
        d = to_deadline(deadline)
        sock = self.sock
        try:
            sock.settimeout(self._step_timeout(d, self.write_timeout, "sending"))
            sock.sendall(data)
        except TimeoutError:
            self.broken = True
            raise self._timed_out(d, self.write_timeout, f"sending {len(data)} bytes") from None
        except OSError:
            self.broken = True
            raise

    def recv_exactly(self, n: int, deadline: DeadlineLike = None) -> bytes:
        """Receive exactly ``n`` bytes before the deadline; each read within ``read_timeout``."""
        d = to_deadline(deadline)
        buf = self._rbuf
        sock = self.sock
        try:
            while len(buf) < n:
                sock.settimeout(self._step_timeout(d, self.read_timeout, "receiving"))
                chunk = sock.recv(max(65536, n - len(buf)))
                if not chunk:
                    self.broken = True
                    raise ConnectionClosed(
                        f"{self.address} closed the connection with {n - len(buf)} of {n} bytes still expected"
                    )
                buf += chunk
        except TimeoutError:
            self.broken = True
            raise self._timed_out(d, self.read_timeout, f"waiting for {n - len(buf)} more bytes") from None
        except OSError:
            self.broken = True
            raise
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def _step_timeout(self, d: Deadline, limit: Optional[float], what: str) -> Optional[float]:
        left = d.remaining()
        if left is not None and left <= 0:
            self.broken = True
            raise DeadlineExceeded(f"deadline passed before {what} on {self.address}")
        if limit is None:
            return left
        return limit if left is None else min(left, limit)

    def _timed_out(self, d: Deadline, limit: Optional[float], what: str) -> DeadlineExceeded:
        if d.expired or limit is None:
            return DeadlineExceeded(f"deadline passed while {what} on {self.address}")
        return DeadlineExceeded(f"no progress for {limit:g} s while {what} on {self.address} (read/write timeout)")

    # -- liveness -----------------------------------------------------------

    def is_alive(self) -> bool:
        """Cheap check for an idle connection: no error, nothing buffered, nothing readable.

        An idle request/response connection has nothing to read; if the
        socket is readable, the peer closed it (EOF, reset) or sent bytes
        nobody asked for. Either way it must not be handed out. One
        ``poll`` with a zero timeout, no read: works the same for TLS.
        """
        if self.broken or self._rbuf:
            return False
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        poller = self._poll
        if poller is None:
            try:
                poller = self._poll = select.poll()
                poller.register(sock.fileno(), DEAD_EVENTS)
            except (OSError, ValueError):
                return False
        try:
            return not poller.poll(0)
        except OSError:
            return False

    def close(self) -> None:
        """Close the socket (the pool does this; call it only on a connection you took out of a pool's hands)."""
        self.broken = True
        self._poll = None
        try:
            self.sock.close()
        except OSError:
            pass
