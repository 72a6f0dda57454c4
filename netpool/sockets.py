"""Binding: open the listening socket a config describes, and nothing else.

Kept apart from serving (as trio separates ``open_tcp_listeners`` from
``serve_listeners``) so that suspend/resume can reopen the same address and
tests can bind without starting threads.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from typing import Callable

from .config import ListenerConfig, format_address
from .errors import ListenError

__all__ = ["open_listening_socket", "open_shared_socket", "adopt_listening_socket", "remove_unix_socket",
           "ACCEPT_WAKE"]

# How often an acceptor blocked in accept() on an idle socket wakes to look
# at its listener's state (SO_RCVTIMEO: accept() then fails with EAGAIN).
# A listener that owns its socket wakes its acceptors at once with
# shutdown(); one whose socket is shared (with worker processes, systemd or
# the next generation of a rolling reload) must not, as shutdown() would
# stop the socket for every holder and reset its backlog, so its acceptors
# leave within this long. Four wake-ups a second per acceptor cost nothing
# measurable on an idle server. Accepted sockets inherit the timeout, which
# changes nothing: the loops use them non-blocking.
ACCEPT_WAKE = 0.25


def open_listening_socket(config: ListenerConfig, port: int | None = None) -> socket.socket:
    """Bind and listen as ``config`` says; ``port`` overrides ``config.port`` (used by resume).

    Raises :class:`ListenError` with the address and a hint; never leaks the
    socket on a partial failure.
    """
    if config.unix is not None:
        return _open_unix(config)
    port = config.port if port is None else port
    try:
        infos = socket.getaddrinfo(
            config.host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve listen address {config.host!r}: {exc.strerror}") from None
    family, socktype, proto, _canon, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        # Restart without waiting out TIME_WAIT, as every server does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Request/response protocols (echo, chat) must not wait for Nagle's
        # 40 ms, so Nagle is off, as in Go. Set here once: Linux copies it to
        # every accepted socket, which saves a setsockopt per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if config.reuse_port:
            # Several processes share the port; the kernel spreads connections.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
        sock.listen(config.backlog)
        _wake_acceptors(sock)
    except OSError as exc:
        sock.close()
        raise ListenError(bind_error_message(format_address((config.host, port)), exc)) from None
    return sock


def open_shared_socket(config: ListenerConfig) -> tuple[socket.socket, Callable[[], None]]:
    """Bind as :func:`open_listening_socket` does, for listeners to be given it; and the call that ends it.

    What a supervisor's workers, or the generations of a reload, share: the
    caller owns it, so ``close()`` closes it and removes the UNIX socket file
    it made (unless another server has since replaced it).
    """
    sock = open_listening_socket(config)
    path = config.unix
    inode = os.lstat(path).st_ino if path is not None else None

    def close() -> None:
        sock.close()
        if path is not None and inode is not None:
            remove_unix_socket(path, inode)

    return sock, close


def adopt_listening_socket(sock: socket.socket, config: ListenerConfig) -> socket.socket:
    """A duplicate of an already listening ``sock`` (inherited, or passed by systemd), with ``config``'s options.

    The caller keeps ``sock``; the listener closes only its duplicate. The
    options are those of :func:`open_listening_socket` that can change on a
    listening socket: Nagle off for TCP (copied to accepted sockets), the
    backlog, and the acceptors' wake-up.
    """
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
            raise ListenError(f"cannot serve on {_describe(sock)}: the socket is not listening")
        dup = sock.dup()
    except OSError as exc:
        raise ListenError(f"cannot serve on the given socket: {exc.strerror or exc}") from None
    try:
        if dup.family in (socket.AF_INET, socket.AF_INET6):
            dup.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dup.listen(config.backlog)
        dup.setblocking(True)  # accept() blocks (the kernel wakes one waiter per client); shared O_NONBLOCK would spin
        _wake_acceptors(dup)
    except OSError as exc:
        dup.close()
        raise ListenError(f"cannot serve on {_describe(sock)}: {exc.strerror or exc}") from None
    return dup


def _wake_acceptors(sock: socket.socket) -> None:
    seconds = int(ACCEPT_WAKE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", seconds, int((ACCEPT_WAKE - seconds) * 1_000_000)))


def _describe(sock: socket.socket) -> str:
    try:
        name = sock.getsockname()
    except OSError:
        return f"descriptor {sock.fileno()}"
    return name if isinstance(name, str) else format_address(name[:2])


def bind_error_message(address: str, exc: OSError) -> str:
    hint = ""
    if exc.errno == errno.EADDRINUSE:
        hint = ": address already in use (another server is listening there; pick another port or stop it)"
    elif exc.errno == errno.EACCES:
        hint = ": permission denied (ports below 1024 need privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = ": address not available on this machine"
    else:
        hint = f": {exc.strerror or exc}"
    return f"cannot listen on {address}{hint}"


def _open_unix(config: ListenerConfig) -> socket.socket:
    path = config.unix
    assert path is not None
    _clear_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if config.unix_mode is not None:
            # Before listen(), so no client can connect under the wrong mode.
            os.chmod(path, config.unix_mode)
        sock.listen(config.backlog)
        _wake_acceptors(sock)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def _clear_stale_unix_socket(path: str) -> None:
    """Remove a socket file left by a server that died, but never a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"cannot listen on {path}: the path exists and is not a socket; remove it yourself")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        # Nobody listens there: a stale file from a server that exited uncleanly.
        os.unlink(path)
        return
    except OSError as exc:
        raise ListenError(f"cannot listen on {path}: cannot check the existing socket ({exc.strerror})") from None
    finally:
        probe.close()
    raise ListenError(f"cannot listen on {path}: another server is listening on it")


def remove_unix_socket(path: str, inode: int) -> None:
    """Unlink our socket file on stop, unless another server has since replaced it."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
