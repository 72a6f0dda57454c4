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
