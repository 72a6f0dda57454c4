"""A connection's own thread: recv -> framer -> handler, in order, with blocking calls.

Every connection starts on an event loop (``io_loop``). In thread mode, a
handler that blocks hands the loop to another thread and carries on with its
connection: :func:`serve_handed_off` is what that thread runs, until it gives
the connection back to the loop (offloaded: its later calls run on the
loop's handler threads) or, when the loop cannot take it back (it is
stopping, or OpenSSL holds bytes epoll cannot see), until the connection
ends. Whatever happens (EOF, a reset, a quit, a handler that
raises, a framing error, the listener stopping), a connection that ends here
goes to ``services.connection_ended`` exactly once, as gevent's
``_handle_and_close_when_done`` and trio's ``_run_handler`` do.

The helpers every read path shares live here too: close reasons and their
rate-limited logs, and the PROXY protocol header checks.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import logging
import socket
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from .config import format_address
from .connection import Connection, set_socket_timeout
from .errors import ConnectionClosed, FramingError, TLSError, TLSHandshakeError
from .ratelimit import RateLimitedLog
from .proxy_protocol import MAX_V2, ProxyHeaderError, ProxyHeaderReader, ProxyUntrusted

if TYPE_CHECKING:  # pragma: no cover
    from .services import ConnectionServices

__all__ = ["serve_handed_off", "reason_for", "recv_failed", "fault_logs", "check_proxy_source", "read_proxy_header_nowait",
           "RECV_SIZE"]

log = logging.getLogger("netpool.read_loop")

# Receive at most this much per recv: large enough for bulk transfers, small
# enough that an idle-but-chatty connection does not pin a large buffer.
RECV_SIZE = 65536


def prepare_socket(sock: socket.socket, idle_timeout: Optional[float], send_timeout: float) -> None:
    """Per-connection socket options, set by the thread serving it (not the acceptor)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Request/response protocols (echo, chat) must not wait for Nagle's
        # 40 ms: Go and most servers turn it off by default.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if idle_timeout:
        set_socket_timeout(sock, socket.SO_RCVTIMEO, idle_timeout)
    set_socket_timeout(sock, socket.SO_SNDTIMEO, send_timeout)


def _reader(conn: Connection, idle_timeout: Optional[float]) -> Callable[[int], bytes]:
    """The receive function for the connection's current transport."""
    tls = conn._tls
    if tls is None:
        return conn._sock.recv  # idle_timeout is the socket's SO_RCVTIMEO
    return functools.partial(tls.recv, timeout=idle_timeout)


def serve_handed_off(conn: Any, services: "ConnectionServices", framer: Any, pending: Iterable[bytes] = (),
                     eof: bool = False, error: Optional[Exception] = None, tls: Any = None,
                     give_back: Optional[Callable[[Any], bool]] = None) -> None:
    """Go on serving, on this thread, a connection whose handler outlived its event loop's patience.

    In thread mode an event loop runs handlers inline; when one blocks, the
    loop moves to another thread (``io_loop``) and the thread stuck in the
    handler carries on with that connection. Here it delivers what was
    already framed (``pending``, the stream's end if ``eof``). Then, as Go
    puts a goroutine back on its run queue after a blocking call, the
    connection goes back to the loop (``give_back``), which hands it to its
    handler threads; only if it cannot is it read here with blocking calls,
    as a connection thread would.
    """
    config = services.config
    handler = services.handler
    reason = "error"
    returned = False
    try:
        if error is not None:
            raise error
        if conn._tls is not tls:
            # start_tls() ran in the handler: plaintext framed after the
            # request must not pass for data that came over TLS.
            framer, pending = services.new_framer(), ()
        for message in pending:
            if conn.close_reason is not None:
                break
            handler(message, conn)
        if eof:
            reason = "eof"
        elif conn.close_reason is None:
            conn._framer = framer
            # Decrypted bytes OpenSSL already holds are invisible to epoll:
            # such a connection is read here instead.
            if give_back is not None and (conn._tls is None or not conn._tls.pending()):
                returned = give_back(conn)
                if returned:
                    return
            if conn._tls is None:
                # The loop's socket was non-blocking; a connection thread
                # blocks in recv, with the kernel keeping the idle timeout.
                conn._sock.setblocking(True)
                prepare_socket(conn._sock, config.idle_timeout, config.send_timeout)
            reason = _read_messages(conn, services, framer)
    except Exception as exc:
        reason = reason_for(conn, exc, services.fault_logs)
    finally:
        if not returned:
            services.connection_ended(conn, reason)


def _read_messages(conn: Connection, services: "ConnectionServices", framer: Any) -> str:
    """recv -> framer -> handler until the connection ends; returns why it ended."""
    config = services.config
    handler = services.handler
    feed = framer.feed
    raw = services.raw_framing
    tls = conn._tls
    recv = _reader(conn, config.idle_timeout)
    bufsize = min(RECV_SIZE, config.max_message_size) if raw else RECV_SIZE
    while True:
        if conn.close_reason is not None:
            return "error"
        try:
            data = recv(bufsize)
        except BlockingIOError:  # nothing from the peer for idle_timeout
            return "idle_timeout"
        except OSError as exc:
            return recv_failed(conn, exc)
        conn.bytes_in += len(data)
        if not data:
            for message in framer.eof():
                handler(message, conn)
            return "eof"
        if raw:
            # The Go original's framing needs no framer call per chunk.
            handler(data, conn)
            messages = ()
        else:
            messages = feed(data)
        for message in messages:
            handler(message, conn)
            if conn.close_reason is not None or conn._tls is not tls:
                break
        if conn._tls is not tls:
            # start_tls() ran in the handler. Plaintext that arrived after
            # the STARTTLS request (already framed or still buffered) must
            # never pass for data that came over TLS: drop it with the framer.
            tls = conn._tls
            framer = services.new_framer()
            feed = framer.feed
            recv = _reader(conn, config.idle_timeout)


def fault_logs() -> "collections.defaultdict[str, RateLimitedLog]":
    """Per-listener fault loggers, one per close reason.

    A storm of one kind of bad client (a slow loris, a scanner) logs about
    once a second with a count of what it held back, and cannot hide a
    different fault or another listener's. The counters stay exact.
    """
    return collections.defaultdict(lambda: RateLimitedLog(log, interval=1.0))


def recv_failed(conn: Connection, exc: OSError) -> str:
    """The close reason for a receive that failed: ``reset``, else ``error``, logged unless it was closing anyway."""
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if conn.close_reason is None:
        log.warning("connection %d from %s: receive failed: %s", conn.id, format_address(conn.peer), exc)
    return "error"


def reason_for(conn: Connection, exc: Exception, logs: Any) -> str:
    """The close reason for an exception that ended a connection's loop; logs it on ``logs`` (``fault_logs()``).

    Shared by every read path so a given fault reads the same in the logs
    and counters whichever I/O mode served the connection.
    """
    if isinstance(exc, ConnectionClosed):
        # A send inside the handler found the connection closed (send
        # timeout, reset, quit): its own reason is already recorded.
        return "error"
    peer = format_address(conn.peer)
    if isinstance(exc, (TLSHandshakeError, ProxyHeaderError, FramingError)):
        reason = exc.reason
        level = logging.INFO if isinstance(exc, TLSHandshakeError) else logging.WARNING
        logs[reason](level, "connection %d from %s: %s; closing it (%s)", conn.id, peer, exc, reason)
        return reason
    if isinstance(exc, TLSError):
        logs["tls_error"](logging.WARNING, "connection %d from %s: %s; closing it (tls_error)",
                                 conn.id, peer, exc)
        return "tls_error"
    logs["handler_error"](logging.ERROR, "handler raised on connection %d from %s; closing it",
                                 conn.id, peer, exc_info=exc)
    return "handler_error"


# -- the PROXY protocol header, read before TLS and before the handler ----------


def check_proxy_source(conn: Connection, trusted: tuple) -> None:
    """Only a trusted balancer may tell us who the client is: anyone else is refused."""
    peer = conn.peer
    if isinstance(peer, tuple):
        address = ipaddress.ip_address(peer[0].split("%", 1)[0])
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in trusted):
            return
    elif not peer or str(peer).startswith("/"):
        return  # a UNIX socket: trusted through its file mode
    raise ProxyUntrusted(f"{format_address(peer)} is not in proxy_trusted; it may not send a PROXY header")


def read_proxy_header_nowait(conn: Connection, reader: ProxyHeaderReader) -> bool:
    """Consume what has arrived of the header without blocking; True once it is complete.

    Peeks first and then takes exactly the header's bytes, so whatever
    follows (a TLS ClientHello, the first message) stays in the socket.
    """
    sock = conn._sock
    while reader.header is None:
        try:
            peeked = sock.recv(MAX_V2, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        if not peeked:
            raise ProxyHeaderError("connection closed before its PROXY header was complete")
        taken = reader.feed(peeked)
        if taken:
            sock.recv(taken)
        if reader.header is None and taken == len(peeked):
            return False  # everything there was header: wait for the rest
    _apply_proxy_header(conn, reader)
    return True


def _apply_proxy_header(conn: Connection, reader: ProxyHeaderReader) -> None:
    header = reader.header
    assert header is not None
    conn.proxy = header
    if header.command == "PROXY" and header.source is not None and header.transport in ("TCP4", "TCP6"):
        conn.proxied_by = conn.peer
        conn.peer = header.source
