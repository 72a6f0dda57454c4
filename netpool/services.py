"""ConnectionServices: what the read paths need from the listener that owns them, handed over as one object.

The I/O loops (``io_loop``, with the threads a blocking handler's calls
move to) never see the Listener: they get its settings, the handler
to call, how to frame and secure a connection, the threads to run calls on,
and three callables back (run this after a connection's queued calls; a
connection closed; an alarm is due). The listener
builds one of these and gives it to each loop, as Ranch gives an acceptor
its socket and its connection supervisor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from .config import ListenerConfig
from .conn_threads import ConnectionThreads

__all__ = ["ConnectionServices"]


@dataclass(frozen=True)
class ConnectionServices:
    config: ListenerConfig
    handler: Callable[[Any, Any], None]
    """``handler(message, conn)``: the user's handler, or the hand-over to the worker pool."""
    raw_framing: bool
    """Messages are whatever one read returned (RawFramer): the hot path serves them."""
    raw_framer: Optional[Any]
    """The one stateless RawFramer every raw connection shares (None otherwise)."""
    framer_factory: Callable[[int], Any]
    """``framer_factory(max_message_size)``: a new framer for a connection."""
    tls_context: Callable[[], Any]
    """``tls_context()``: the pyOpenSSL context for TLS now (implicit or STARTTLS), or None; a reload swaps it."""
    tls_implicit: bool
    """TLS from the first byte: every connection shakes hands before its first message."""
    proxy_versions: tuple[int, ...]
    """PROXY protocol versions expected before anything else (empty: none)."""
    proxy_trusted: tuple[Any, ...]
    """Networks allowed to send PROXY headers."""
    fault_logs: Any
    """Rate-limited logs per close reason (``close_reasons.fault_logs``)."""
    threads: ConnectionThreads
    """Reusable threads for loops, handler threads and handed-off calls."""
    after_queued_calls: Callable[[Any, str, Callable[[], None]], None]
    """``after_queued_calls(conn, reason, then)``: run ``then`` once the connection's queued worker calls are over.

    At once without workers. A connection ending for any reason but ``eof``
    drops the calls it still had queued first.
    """
    connection_closed: Callable[[Any, str, bool], None]
    """``connection_closed(conn, reason, counted)``: once per connection, after its descriptor is closed.

    ``on_close``, the counters, and the slot given back if ``counted``.
    """
    fire_alarm: Callable[[], None]
    """Run the listener's alarm hook (due when the connection was admitted)."""

    def new_framer(self) -> Any:
        """A fresh framer for a connection: at its start, and after STARTTLS.

        After ``start_tls()`` whatever the old framer holds (or framed but
        not yet delivered) came in plaintext and must never pass for data
        that came over TLS: every read path drops it by taking a new one.
        """
        return self.framer_factory(self.config.max_message_size)
