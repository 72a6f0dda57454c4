"""What a new connection goes through before its handler: the PROXY header, then the TLS handshake.

Both are optional (a listener with ``proxy_protocol`` expects a header from
a trusted balancer; one with implicit TLS runs a handshake), both are read
without blocking, event by event, on the I/O loop, and both must be over
within ``handshake_timeout`` of the accept. A connection that needs neither
gets no :class:`Handshake` at all, which is the common case and costs
nothing.

The loop makes one Handshake per connection and calls :meth:`Handshake.step`
at each of its events until it returns 0; the loop then gives the
connection its TLS session (``session``) and lets the handler in. The loop's
sweep asks :meth:`Handshake.timed_out` for the error to close it with once
``deadline`` has passed.
"""

from __future__ import annotations

import ipaddress
import select
import socket
from typing import TYPE_CHECKING, Any, Optional

from .config import format_address
from .proxy_protocol import MAX_V2, ProxyHeaderError, ProxyHeaderReader, ProxyUntrusted

if TYPE_CHECKING:  # pragma: no cover
    from OpenSSL import SSL

__all__ = ["Handshake", "check_proxy_source"]


class Handshake:
    """One connection's set-up in progress: its PROXY header (if expected), then its TLS handshake (if any)."""

    __slots__ = ("conn", "deadline", "session", "_sock", "_proxy", "_tls_context")

    def __init__(self, conn: Any, sock: socket.socket, *, proxy_versions: Any, proxy_trusted: tuple,
                 tls_context: Any, deadline: float) -> None:
        """Start the set-up of ``conn`` (its ``peer``, ``proxy`` and ``proxied_by`` are filled in from the header).

        Raises :class:`ProxyUntrusted` at once if the listener expects a
        PROXY header and the peer is not a trusted balancer.
        """
        self.conn = conn
        self.deadline = deadline
        # The TLS session, an SSL.Connection: set when the handshake starts
        # (after the PROXY header), finished when step() returns 0.
        self.session: Optional["SSL.Connection"] = None
        self._sock = sock
        self._proxy: Optional[ProxyHeaderReader] = None
        if proxy_versions:
            check_proxy_source(conn.peer, proxy_trusted)
            self._proxy = ProxyHeaderReader(proxy_versions)
        self._tls_context = tls_context

    def step(self) -> int:
        """Go as far as the bytes that arrived allow: 0 when done, else the poll event to wait for.

        Raises :class:`ProxyHeaderError` for a bad header and
        :class:`TLSHandshakeError` for a failed handshake.
        """
        if self._proxy is not None:
            if not _read_proxy_header_nowait(self._sock, self._proxy):
                return select.POLLIN
            _apply_proxy_header(self.conn, self._proxy)
            self._proxy = None
        if self._tls_context is not None:
            from .tls import start_server_session  # pyOpenSSL only when TLS is used

            self.session = start_server_session(self._sock, self._tls_context)
            self._tls_context = None
        if self.session is not None:
            from .tls import handshake_step

            return handshake_step(self.session)
        return 0

    def timed_out(self, timeout: float) -> Exception:
        """The error to close the connection with once ``deadline`` has passed."""
        if self._proxy is not None:
            return ProxyHeaderError(f"no complete PROXY header within {timeout:g}s")
        from .tls import handshake_timed_out

        return handshake_timed_out(timeout)


def check_proxy_source(peer: Any, trusted: tuple) -> None:
    """Only a trusted balancer may tell us who the client is: anyone else is refused (:class:`ProxyUntrusted`)."""
    if isinstance(peer, tuple):
        address = ipaddress.ip_address(peer[0].split("%", 1)[0])
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in trusted):
            return
    elif not peer or str(peer).startswith("/"):
        return  # a UNIX socket: trusted through its file mode
    raise ProxyUntrusted(f"{format_address(peer)} is not in proxy_trusted; it may not send a PROXY header")


def _read_proxy_header_nowait(sock: socket.socket, reader: ProxyHeaderReader) -> bool:
    """Consume what has arrived of the header without blocking; True once it is complete.

    Peeks first and then takes exactly the header's bytes, so whatever
    follows (a TLS ClientHello, the first message) stays in the socket.
    """
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
    return True


def _apply_proxy_header(conn: Any, reader: ProxyHeaderReader) -> None:
    header = reader.header
    assert header is not None
    conn.proxy = header
    if header.command == "PROXY" and header.source is not None and header.transport in ("TCP4", "TCP6"):
        conn.proxied_by = conn.peer
        conn.peer = header.source
