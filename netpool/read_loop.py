"""The thread-per-connection read path: recv -> framer -> handler, in order.

One call of :func:`serve_connection` runs on the connection's own thread for
the connection's whole life. Whatever happens (EOF, a reset, a quit, a
handler that raises, a framing error, the listener stopping), the ``finally``
hands the connection to ``service.connection_finished`` exactly once, as
gevent's ``_handle_and_close_when_done`` and trio's ``_run_handler`` do.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import logging
import select
import socket
import time
from typing import TYPE_CHECKING, Callable, Optional

from .config import format_address
from .connection import Connection, set_socket_timeout
from .errors import ConnectionClosed, FramingError, TLSError, TLSHandshakeError
from .ratelimit import RateLimitedLog
from .proxy_protocol import MAX_V2, ProxyHeaderError, ProxyHeaderReader, ProxyUntrusted

if TYPE_CHECKING:  # pragma: no cover
    from .listener import Listener

__all__ = ["serve_connection"]

log = logging.getLogger("netpool.connection")

# Receive at most this much per recv: large enough for bulk transfers, small
# enough that an idle-but-chatty connection does not pin a large buffer.
RECV_SIZE = 65536


def prepare_socket(sock: socket.socket, idle_timeout: Optional[float], send_timeout: float) -> None:
    """Per-connection socket options, set on the connection's thread (not the acceptor's)."""
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


def serve_connection(conn: Connection, service: "Listener", alarm_due: bool) -> None:
    """Run one connection to its end on the calling thread."""
    config = service.config
    handler = service._handler
    reason = "error"
    try:
        prepare_socket(conn._sock, config.idle_timeout, config.send_timeout)
        if service._proxy_versions:
            check_proxy_source(conn, service._proxy_trusted)
            read_proxy_header(conn, ProxyHeaderReader(service._proxy_versions), config.handshake_timeout)
        if service._tls_implicit:
            conn._handshake(service._tls_context, config.handshake_timeout)
        if alarm_due:
            service._fire_alarm()
        if config.on_connect is not None:
            config.on_connect(conn)
        framer = service._framer_factory(config.max_message_size)
        feed = framer.feed
        raw = service._raw_framing
        tls = conn._tls
        recv = _reader(conn, config.idle_timeout)
        bufsize = min(RECV_SIZE, config.max_message_size) if raw else RECV_SIZE
        while True:
            if conn.close_reason is not None:
                break
            try:
                data = recv(bufsize)
            except BlockingIOError:  # nothing from the peer for idle_timeout
                reason = "idle_timeout"
                break
            except ConnectionResetError:
                reason = "reset"
                break
            except OSError as exc:
                reason = "error"
                if conn.close_reason is None:
                    log.warning("connection %d from %s: receive failed: %s", conn.id, format_address(conn.peer), exc)
                break
            conn.bytes_in += len(data)
            if not data:
                reason = "eof"
                messages = framer.eof()
                for message in messages:
                    handler(message, conn)
                break
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
                framer = service._framer_factory(config.max_message_size)
                feed = framer.feed
                recv = _reader(conn, config.idle_timeout)
    except Exception as exc:
        reason = reason_for(conn, exc)
    finally:
        service._connection_ended(conn, reason)


def fault_logs() -> "collections.defaultdict[str, RateLimitedLog]":
    """Per-listener fault loggers, one per close reason.

    A storm of one kind of bad client (a slow loris, a scanner) logs about
    once a second with a count of what it held back, and cannot hide a
    different fault or another listener's. The counters stay exact.
    """
    return collections.defaultdict(lambda: RateLimitedLog(log, interval=1.0))


def reason_for(conn: Connection, exc: Exception) -> str:
    """The close reason for an exception that ended a connection's loop; logs it (rate-limited).

    Shared by every read path so a given fault reads the same in the logs
    and counters whichever I/O mode served the connection.
    """
    if isinstance(exc, ConnectionClosed):
        # A send inside the handler found the connection closed (send
        # timeout, reset, quit): its own reason is already recorded.
        return "error"
    peer = format_address(conn.peer)
    logs = conn.listener._fault_logs
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


def read_proxy_header(conn: Connection, reader: ProxyHeaderReader, timeout: float) -> None:
    """Blocking version for the thread-per-connection path, bounded by ``timeout`` in all."""
    sock = conn._sock
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    deadline = time.monotonic() + timeout
    while reader.header is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000))):
            raise ProxyHeaderError(f"no complete PROXY header within {timeout:g}s")
        peeked = sock.recv(MAX_V2, socket.MSG_PEEK)
        if not peeked:
            raise ProxyHeaderError("connection closed before its PROXY header was complete")
        taken = reader.feed(peeked)  # until the header is complete it takes every byte fed
        if taken:
            sock.recv(taken)
    _apply_proxy_header(conn, reader)


def _apply_proxy_header(conn: Connection, reader: ProxyHeaderReader) -> None:
    header = reader.header
    assert header is not None
    conn.proxy = header
    if header.command == "PROXY" and header.source is not None and header.transport in ("TCP4", "TCP6"):
        conn.proxied_by = conn.peer
        conn.peer = header.source
