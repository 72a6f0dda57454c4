"""Connection: what a handler holds for one client.

A Connection owns one accepted socket, under its transport (plain, or TLS
once a handshake is over: ``transport``). Exactly one thread, its *owner*
(the I/O loop serving it, or the thread its calls were left to), ever
closes the descriptor; every other path (``close()`` from a handler or
another thread, ``quit.put()``, the listener stopping, a send that timed
out) only records a reason and shuts the socket down, which wakes the
owner at once. The owner then closes the descriptor and the listener hears
of it exactly once. This is why a descriptor number is never closed under a
thread still using it, and why the counter stays exact.

This module holds what every connection has: the handler's API, the
transport and the close requests. The one class the listener builds is
``io_loop.LoopConnection``: it adds how the I/O mode sends (queue or wait),
the owner's last step (``_finish``) and the loop's bookkeeping, which stay
with the loop that keeps them.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from .errors import ConnectionClosed, SendTimeout, TLSError, TLSHandshakeError
from .tls_config import TLSInfo
from .transport import PlainTransport, SendIncomplete

if TYPE_CHECKING:  # pragma: no cover
    from .tls import TLSTransport

__all__ = ["Connection", "QuitQueue"]

_ids = itertools.count(1)


class QuitQueue(queue.SimpleQueue[Any]):
    """The connection's ``quit`` queue: anything put here closes the connection.

    It behaves as a queue (the items stay readable, for instance by
    ``on_close``) and every put wakes the connection's loop, even when it is
    blocked in a read, from any thread.
    """

    def __init__(self, conn: "Connection") -> None:
        super().__init__()
        self._conn = conn

    def put(self, item: Any, block: bool = True, timeout: Optional[float] = None) -> None:
        super().put(item, block, timeout)
        self._conn._request_close("quit", socket.SHUT_RD)

    def put_nowait(self, item: Any) -> None:
        self.put(item)


class Connection:
    """One client connection: send to it, close it, keep per-client state in it.

    Attributes a handler uses:

    - ``id``: unique in the process, for logs and lookups.
    - ``peer``: the client's address (``(host, port)``; the socket path for UNIX sockets).
    - ``state``: a dict for the handler's own per-connection data.
    - ``quit``: a queue; putting anything there closes the connection.
    - ``closed``: True once the connection is closing or closed.
    - ``close_reason``: why it closed (eof, reset, quit, closed, idle_timeout, ...).
    - ``tls``: what TLS negotiated (:class:`TLSInfo`), None for plain TCP.
    - ``proxied_by``: the balancer's address when a PROXY header named the
      real client (then ``peer`` is the client's); None otherwise.
    - ``proxy``: the whole PROXY header (TLVs included), or None.
    - ``transport``: the byte stream under it (``transport.PlainTransport``, or
      ``tls.TLSTransport`` once TLS is on); ``transport.socket`` for socket
      options, never for reading or writing.
    """

    __slots__ = (
        "id",
        "peer",
        "state",
        "listener",
        "acceptor",
        "connected_at",
        "close_reason",
        "tls",
        "proxied_by",
        "proxy",
        "bytes_in",
        "bytes_out",
        "transport",
        "_encode",
        "_send_lock",
        "_state_lock",
        "_send_timeout",
        "_quit",
        "_counted",
        "_finished",
        "_wr_closed",
        "_quitting",
        "_release",
        "__weakref__",
    )

    def __init__(
        self,
        sock: PlainTransport,
        peer: Any,
        *,
        listener: Any = None,
        acceptor: int = -1,
        encode: Optional[Callable[[bytes], bytes]] = None,
        send_timeout: float = 30.0,
        release: Optional[Callable[[], None]] = None,
    ) -> None:
        self.id = next(_ids)
        self.peer = peer
        self.state: dict[str, Any] = {}
        self.listener = listener
        self.acceptor = acceptor
        self.connected_at = time.time()
        self.close_reason: Optional[str] = None
        self.tls: Optional[TLSInfo] = None
        self.proxied_by: Any = None
        self.proxy: Any = None
        # Application bytes received and sent (after TLS), for metrics.
        self.bytes_in = 0
        self.bytes_out = 0
        self.transport: "PlainTransport | TLSTransport" = sock  # an accepted socket is its own plain transport
        self._encode = encode
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._send_timeout = send_timeout
        self._quit: Optional[QuitQueue] = None
        # Whether the connection still counts against max_connections, and
        # the callback that gives its slot back (exactly once).
        self._counted = release is not None
        self._release = release
        self._finished = False
        # The write side is gone (close(), an abort, or finished). A quit or a
        # server stop only shuts reads: the handler already running may still
        # send its replies.
        self._wr_closed = False
        # Told to quit (SHUT_RD): at its end, what the peer sent meanwhile is
        # read away before the descriptor closes, or the kernel would answer
        # the close with a reset (_finish).
        self._quitting = False

    def __repr__(self) -> str:
        status = f"closed:{self.close_reason}" if self.close_reason else "open"
        return f"<Connection {self.id} peer={self.peer!r} {status}>"

    # -- the handler's API ---------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    @property
    def quit(self) -> QuitQueue:
        # Created on first use: most connections never need one, and idle
        # connections are where memory per connection matters.
        q = self._quit
        if q is None:
            with self._state_lock:
                if self._quit is None:
                    self._quit = QuitQueue(self)
                q = self._quit
        return q

    def send(self, message: bytes) -> None:
        """Send one message, framed by the listener's framer; whole or not at all.

        Thread-safe: sends from several threads never interleave. Blocks while
        the peer's window is full, at most ``send_timeout`` in all; then the
        connection is closed (reason send_timeout) and :class:`SendTimeout` is
        raised. Raises :class:`ConnectionClosed` once the write side is closed
        (``close()``, an abort, or the end of the connection); after a quit
        or a graceful stop the running handler may still send its replies.
        """
        encode = self._encode
        self.send_bytes(encode(message) if encode is not None else message)

    def send_bytes(self, data: bytes) -> None:
        """Send bytes as they are, bypassing the framer (same guarantees as :meth:`send`)."""
        raise NotImplementedError  # io_loop.LoopConnection's, per I/O mode

    def post(self, message: bytes) -> bool:
        """Hand this connection a message from elsewhere (another client's handler, another process); never waits.

        For fan-out and relays: the message is framed like :meth:`send`'s,
        queued in the connection's outbox and written by its I/O loop as the
        peer reads, whole and in order of posting, between the connection's
        own sends (never inside one). Safe from any thread. Returns False if
        it was not taken: the connection is closing, or its outbox would
        pass the listener's ``outbox_limit``, and then the connection is
        closed (``outbox_overflow``): a peer that stops reading never holds
        up the poster, and cannot grow memory.
        """
        raise NotImplementedError  # io_loop.LoopConnection's

    def close(self, reason: str = "closed", *, graceful: bool = False) -> None:
        """Close the connection; safe to call from any thread, any number of times (the first reason wins).

        ``reason`` is what ``close_reason``, ``on_close`` and the listener's
        closed-by-reason counters show: ``closed`` unless you name your own
        (``kicked``, say). By default the connection stops at once: reads
        end, a send waiting for the peer is aborted, and data ``send`` has
        already taken is still delivered before the FIN (in events mode,
        where send queues what the kernel cannot take yet, the queue goes out
        first, as long as the peer keeps reading within ``send_timeout``;
        what it never takes is logged and not counted in ``bytes_out``). With
        ``graceful=True`` only reads stop: a handler running now may still
        send its replies, and the connection ends once it returns (what a
        ``quit`` and a listener's stop do).
        """
        if not isinstance(reason, str) or not reason:
            raise TypeError(f"close(): the reason must be a non-empty str, not {reason!r}")
        self._request_close(reason, socket.SHUT_RD if graceful else socket.SHUT_RDWR)

    def start_tls(self) -> TLSInfo:
        """Upgrade this plain connection to TLS in place (STARTTLS), and return what was negotiated.

        Call it from the handler right after sending the protocol's "proceed":
        the handshake runs here, on the thread running the handler, within the
        listener's ``handshake_timeout``; the following messages arrive
        decrypted through the same framer. Bytes the client sent in plaintext
        after its STARTTLS request are discarded, never read as if they had
        come over TLS. Raises :class:`TLSError` if the listener has no
        certificate or the connection is already TLS; a failed handshake
        closes the connection (tls_error or tls_handshake_timeout) and raises.
        """
        listener = self.listener
        context = getattr(listener, "tls_context", None)
        if context is None:
            raise TLSError(
                "start_tls() needs a certificate: give the listener ssl options "
                "(certfile/keyfile, mode='starttls')"
            )
        if self.transport.is_tls:
            raise TLSError(f"connection {self.id} is already using TLS")
        with self._send_lock:
            if self.close_reason is not None:
                raise ConnectionClosed(f"connection {self.id} is closed ({self.close_reason})")
            self._handshake(context, listener.config.handshake_timeout)
        assert self.tls is not None
        return self.tls

    def _handshake(self, context: Any, timeout: float) -> None:
        from .tls import server_handshake  # pyOpenSSL only when TLS is used

        self._about_to_wait()  # a handshake is round trips with the peer

        try:
            ssl_conn = server_handshake(self.transport.socket, context, timeout)
        except TLSHandshakeError as exc:
            self._request_close(exc.reason, socket.SHUT_RDWR)
            raise
        self._use_tls(ssl_conn)

    def _use_tls(self, ssl_conn: Any) -> None:
        """Carry the connection over ``ssl_conn``, a finished handshake's session (implicit TLS or STARTTLS)."""
        from .tls import TLSTransport, negotiated

        self.transport = TLSTransport(self.transport.socket, ssl_conn)
        self.tls = negotiated(ssl_conn)

    def uncount(self) -> None:
        """Take this connection out of the listener's live count while it stays open.

        For long-lived, mostly idle connections (presence sockets) that should
        not hold a slot against ``max_connections`` (Ranch's
        ``remove_connection``). Calling it again does nothing.
        """
        with self._state_lock:
            if not self._counted:
                return
            self._counted = False
            release = self._release
        if release is not None:
            release()

    @property
    def counted(self) -> bool:
        """Whether the connection still counts against ``max_connections``."""
        return self._counted

    def fileno(self) -> int:
        return self.transport.socket.fileno()

    # -- sending, slow path --------------------------------------------------

    def _about_to_wait(self) -> None:
        """Called before waiting on the peer; thread mode's loop connections hand their loop off here."""

    def _send_rest(self, data: "bytes | memoryview") -> None:
        """Wait for the peer to take ``data`` (send lock held): at most send_timeout in all, then close and raise.

        A peer that reads one byte now and then cannot hold the sender
        longer. Thread mode's loop hands itself off first (``_about_to_wait``).
        """
        self._about_to_wait()
        try:
            self.transport.send_until(data, time.monotonic() + self._send_timeout)
        except SendIncomplete as exc:
            self.bytes_out += exc.sent  # what went out before the deadline: the peer can still read it
            raise self._send_timed_out() from None
        except TLSError as exc:
            self._tls_send_failed(exc)
        except OSError as exc:
            self._send_failed(exc)

    def _send_timed_out(self) -> SendTimeout:
        self._request_close("send_timeout", socket.SHUT_RDWR)
        return SendTimeout(
            f"connection {self.id}: peer {self.peer!r} did not take the data within "
            f"{self._send_timeout:g} s (send_timeout); closed"
        )

    def _tls_send_failed(self, exc: TLSError) -> None:
        self._request_close("tls_error", socket.SHUT_RDWR)
        raise ConnectionClosed(f"connection {self.id} is closed (tls_error): {exc}") from None

    def _send_failed(self, exc: OSError) -> None:
        reason = self.close_reason
        if reason is None:
            reason = "reset" if isinstance(exc, (ConnectionResetError, BrokenPipeError)) else "send_error"
            self._request_close(reason, socket.SHUT_RDWR)
            reason = self.close_reason
        raise ConnectionClosed(f"connection {self.id} is closed ({reason}): {exc}") from exc

    # -- close requests (from any thread) -------------------------------------

    def _request_close(self, reason: str, how: int) -> bool:
        """Record why the connection closes (first reason wins) and wake its owner.

        SHUT_RD ("tell it to quit") lets a handler that is running finish and
        its replies go out; SHUT_RDWR also aborts a blocked send.
        """
        with self._state_lock:
            first = self.close_reason is None
            if first:
                self.close_reason = reason
            if how == socket.SHUT_RDWR:
                self._wr_closed = True
            else:
                self._quitting = True
            finished = self._finished
        if not finished:
            self.transport.told_to_close(how == socket.SHUT_RDWR)
            try:
                self.transport.socket.shutdown(how)
            except OSError:
                pass  # already shut down or reset by the peer: the owner wakes anyway
        return first
