"""How a client pool reaches its back end: a ``(host, port[, ssl_context])`` target, or a ``dial()`` function."""

from __future__ import annotations

import socket
import ssl
from typing import Callable, Union

from .config import format_address
from .errors import ConfigError

__all__ = ["Dialer", "Target", "make_dialer"]

# dial() -> a connected socket (plain or TLS). It should bound its own time.
Dialer = Callable[[], socket.socket]
# (host, port) or (host, port, ssl.SSLContext)
Target = Union[tuple, Dialer]


def make_dialer(target: Target, connect_timeout: float) -> tuple[Dialer, str]:
    """``(dial, address)`` for a pool's ``target``; ConfigError for a target that cannot be dialled."""
    if callable(target):
        return target, getattr(target, "__name__", "dial")
    if not isinstance(target, tuple) or len(target) not in (2, 3):
        raise ConfigError("target", f"expected (host, port), (host, port, ssl_context) or a dial() function, got {target!r}")
    host, port = target[0], target[1]
    context = target[2] if len(target) == 3 else None
    if context is not None and not isinstance(context, ssl.SSLContext):
        raise ConfigError("target", f"the third item must be an ssl.SSLContext, got {context!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535:
        raise ConfigError("target", f"port must be 1..65535, got {port!r}")

    def dial() -> socket.socket:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                # The handshake runs here, bounded by connect_timeout.
                sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return sock

    return dial, format_address((host, port))
