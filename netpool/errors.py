"""The exception tree and the errno sets that sort socket errors.

Every exception a user can meet derives from :class:`NetpoolError`, and each
carries a message that says what to change, not only what went wrong.
"""

from __future__ import annotations

import errno


class NetpoolError(Exception):
    """Base class of every error netpool raises on purpose."""


class ConfigError(NetpoolError, ValueError):
    """A configuration value is missing, of the wrong type or out of range.

    ``field`` names the offending key so a CLI or a config-file loader can
    point at it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class HandlerImportError(ConfigError):
    """A ``module:attribute`` handler spec could not be imported."""


class ListenError(NetpoolError, OSError):
    """The listening socket could not be opened (address in use, permission...)."""


class ConnectionClosed(NetpoolError, ConnectionError):
    """The connection is closed (or closing): nothing more can be sent on it."""


class SendTimeout(ConnectionClosed, TimeoutError):
    """The peer did not take the data within ``send_timeout``; the connection was closed."""


class FramingError(NetpoolError):
    """The peer sent bytes that do not form a valid frame (a remote protocol error)."""

    reason = "framing_error"


class MessageTooLarge(FramingError):
    """A frame is larger than ``max_message_size``."""

    reason = "message_too_large"


class MessageTimeout(FramingError):
    """A message was begun but not finished within ``message_timeout`` (a slow-loris client)."""

    reason = "message_timeout"


class TLSError(NetpoolError):
    """TLS set-up failed (certificate, key or options), or a TLS session broke."""


class TLSHandshakeError(TLSError):
    """A client's TLS handshake failed; the connection closes with ``reason``."""

    reason = "tls_error"


class TLSHandshakeTimeout(TLSHandshakeError):
    """A client did not finish its TLS handshake within ``handshake_timeout``."""

    reason = "tls_handshake_timeout"


# accept() errors that mean "out of a resource, try again later": back off,
# never spin and never let the acceptor die (the EMFILE storms Ranch, trio and
# Thousand Island users reported).
ACCEPT_CAPACITY_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)

# accept() errors caused by the one client that was being accepted (it reset
# before we got to it): skip it and accept the next.
ACCEPT_CLIENT_ERRNOS = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENOPROTOOPT, errno.EINTR}
)


# -- the calling side: client pool, circuit breaker, worker pool, deadlines ----


class DeadlineExceeded(NetpoolError, TimeoutError):
    """A call did not finish before its deadline.

    Raised by pooled connections (``request``, ``send``, ``recv_exactly``)
    and by the pool while waiting for a connection on the caller's deadline.
    A connection that timed out mid-exchange is discarded by the pool: its
    stream may hold half a reply.
    """


class PoolError(NetpoolError):
    """Base class of client-pool errors; ``pool`` is the pool that raised it (urllib3's PoolError)."""

    def __init__(self, pool: object, message: str) -> None:
        super().__init__(message)
        self.pool = pool


class PoolTimeout(PoolError, TimeoutError):
    """No connection became free within ``acquire_timeout`` (or the caller's deadline).

    All ``max_open`` connections stayed in use: raise ``max_open``, make the
    work done while holding a connection shorter, or look for a leak (a
    connection acquired without ``with``).
    """


class PoolClosed(PoolError):
    """The pool was closed: it hands out no more connections."""


class DialError(PoolError, ConnectionError):
    """The pool could not open a connection to its target (refused, unreachable, TLS failure)."""


class ProtocolError(NetpoolError, ConnectionError):
    """The peer sent a reply that breaks the length-prefixed protocol (too large, or the stream ended mid-frame)."""


class CircuitOpen(NetpoolError):
    """The circuit breaker is open: the call was not attempted.

    ``retry_after`` is how many seconds remain until the breaker lets a trial
    call through; a front end can pass it on as an HTTP ``Retry-After``.
    """

    def __init__(self, breaker: object, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.breaker = breaker
        self.retry_after = retry_after


class Overloaded(NetpoolError):
    """The worker pool's queues are all full: the work was rejected, not queued.

    Shed the load (answer "busy"), or give the pool more workers or longer
    queues if the machine has room.
    """


class WorkerPoolStopped(NetpoolError, RuntimeError):
    """Work was submitted to a worker pool that is stopping or stopped."""


class BrokerUnavailable(NetpoolError, ConnectionError):
    """The session broker's shared directory (Redis) cannot be reached now.

    Sessions of this process are still served: deliver to them as usual. What
    lives elsewhere is unknown until the directory is back (the broker
    reconnects by itself and logs when it does); tell the sender its message
    could not be delivered rather than waiting.
    """
