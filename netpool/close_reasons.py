"""Why a connection closed: the reason every read path records for a fault, and its rate-limited log line.

One place maps a receive error or an exception out of a handler, a framer,
a PROXY header or a TLS session to the close reason that the counters,
``on_close`` and the logs show, so a given fault reads the same whichever
I/O mode, thread or C path served the connection.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from .config import format_address
from .connection import Connection
from .errors import ConnectionClosed, FramingError, TLSError, TLSHandshakeError
from .proxy_protocol import ProxyHeaderError
from .ratelimit import RateLimitedLog

__all__ = ["fault_logs", "reason_for", "recv_failed"]

log = logging.getLogger("netpool.close_reasons")


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
