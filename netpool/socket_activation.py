"""systemd socket activation without libsystemd: the sockets systemd passed, checked and named.

With a ``.socket`` unit, systemd (or ``systemd-socket-activate`` by hand)
binds the listening sockets itself and starts the service with them already
open, so the port is held across restarts and the service can start at the
first connection. The protocol is three environment variables and a
descriptor range (sd_listen_fds(3)):

``LISTEN_PID``
    the process the sockets are for. A child that inherited the variables
    by mistake sees another PID and must ignore them.
``LISTEN_FDS``
    how many sockets were passed; they are descriptors 3, 4, ... 3+n-1
    (``SD_LISTEN_FDS_START``), in the order of the ``Listen*=`` lines.
``LISTEN_FDNAMES``
    optional, colon-separated: one name per descriptor
    (``FileDescriptorName=``, or ``--fdname`` of systemd-socket-activate).

This module replaces sd_listen_fds(3) and sd_listen_fds_with_names(3): it
reads those variables, marks the descriptors close-on-exec, removes the
variables so child processes do not take them for theirs, and checks that
each descriptor is a listening stream socket, the only kind netpool serves.
:func:`choose_socket` picks the socket a listener's configured address
names; :func:`describe` writes a socket's address for log lines.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .config import format_address
from .errors import ListenError

__all__ = [
    "SD_LISTEN_FDS_START",
    "SocketActivationError",
    "ActivatedSocket",
    "inherited_sockets",
    "activated_sockets",
    "choose_socket",
    "describe",
]

SD_LISTEN_FDS_START = 3
ENV_PID = "LISTEN_PID"
ENV_FDS = "LISTEN_FDS"
ENV_NAMES = "LISTEN_FDNAMES"

# Host values that name no address, only (at most) a family: a config with
# one of these accepts whichever socket of that family systemd passed.
_WILDCARD_FAMILIES: dict[str, tuple[int, ...]] = {
    "": (socket.AF_INET, socket.AF_INET6),
    "0.0.0.0": (socket.AF_INET,),
    "::": (socket.AF_INET6,),
}

# What each non-stream socket type is, and why it cannot be served, for the
# error message: systemd's directive is named so the unit can be fixed.
_SOCKET_TYPES: dict[int, str] = {  # int keys: getsockopt(SO_TYPE) gives a plain int
    socket.SOCK_DGRAM: "a datagram socket",
    socket.SOCK_SEQPACKET: "a SOCK_SEQPACKET socket",
    socket.SOCK_RAW: "a raw socket",
}


class SocketActivationError(ListenError):
    """The sockets systemd passed cannot be used: malformed variables, or not listening stream sockets.

    The message names the descriptor or variable and the ``.socket`` unit
    setting to change.
    """


@dataclass(frozen=True)
class ActivatedSocket:
    """One socket systemd passed: the socket, its ``LISTEN_FDNAMES`` name (None if unnamed) and its address."""

    sock: socket.socket
    name: Optional[str]
    address_text: str


def inherited_sockets(*, unset_environment: bool = True) -> list[socket.socket]:
    """The listening stream sockets systemd passed to this process, in order (fd 3 first); [] if none.

    ``unset_environment`` removes ``LISTEN_PID``, ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` from ``os.environ`` (as sd_listen_fds(3) does when
    asked), so
    that processes started from here do not take the sockets for theirs.
    Raises :class:`SocketActivationError` if the variables are malformed or
    a descriptor is not a listening stream socket.
    """
    return [activated.sock for activated in activated_sockets(unset_environment=unset_environment)]


def activated_sockets(*, unset_environment: bool = True) -> list[ActivatedSocket]:
    """As :func:`inherited_sockets`, with each socket's ``LISTEN_FDNAMES`` name and address text."""
    try:
        count = _listen_fds()
        if count == 0:
            return []
        names = _names(count)
    finally:
        # Whatever the outcome, the variables were meant for this process
        # alone (or for another one, never for our children): like
        # sd_listen_fds(3), forget them even when they were malformed.
        if unset_environment:
            for key in (ENV_PID, ENV_FDS, ENV_NAMES):
                os.environ.pop(key, None)
    sockets: list[socket.socket] = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
            sockets.append(_adopt(fd))
    except BaseException:
        # Leave the descriptors open as they came: a caller that reports the
        # error and falls back must not find fd 3 closed under it.
        for sock in sockets:
            sock.detach()
        raise
    return [ActivatedSocket(sock, name, describe(sock)) for sock, name in zip(sockets, names)]


def choose_socket(sockets: Sequence[socket.socket], *, host: str, port: int,
                  unix: Optional[str]) -> socket.socket:
    """The one socket a listener configured for ``unix`` (or ``host``:``port``) should serve.

    One socket is served whatever the configured address says: the unit
    decides where the service listens. Among several, the one bound to
    ``unix`` (or to ``host``:``port``; a host of ``""``, ``0.0.0.0`` or
    ``::`` matches any address of its family, port 0 any port) is chosen;
    none or more than one raises :class:`SocketActivationError` listing both
    sides. The caller closes the sockets it does not serve.
    """
    if not sockets:
        raise SocketActivationError("systemd passed no sockets (LISTEN_FDS); nothing to choose from")
    if len(sockets) == 1:
        return sockets[0]
    if unix is not None:
        wanted = unix
        matches = [sock for sock in sockets if _is_unix_path(sock, unix)]
    else:
        wanted = format_address((host, port))
        addresses = _host_addresses(host)
        matches = [sock for sock in sockets if _is_host_port(sock, host, addresses, port)]
    if len(matches) == 1:
        return matches[0]
    passed = ", ".join(f"{describe(sock)} (fd {sock.fileno()})" for sock in sockets)
    if not matches:
        raise SocketActivationError(
            f"systemd passed {len(sockets)} sockets ({passed}) and none is the configured {wanted}: "
            "set host/port (or unix) to one of them, or leave only that one in the .socket unit")
    raise SocketActivationError(
        f"systemd passed {len(sockets)} sockets ({passed}) and {len(matches)} of them match the configured "
        f"{wanted}: name one address exactly (a host that is not a wildcard, a port that is not 0)")


def describe(sock: socket.socket) -> str:
    """A socket's address as people write it: ``127.0.0.1:8080``, ``[::1]:8080``, a path, ``@abstract``."""
    try:
        address: Any = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    if isinstance(address, tuple):
        # IPv6 names carry flow info and scope id too: host and port are the address.
        return format_address(address[:2])
    if isinstance(address, bytes):
        # Python gives abstract UNIX names as bytes starting with NUL;
        # systemd writes them with a leading "@", and so do we.
        text = address.decode(errors="backslashreplace")
        return "@" + text[1:] if text.startswith("\0") else text
    return address or "unnamed UNIX socket"


# -- reading the environment -------------------------------------------------


def _listen_fds() -> int:
    """How many sockets are for this process: 0 without LISTEN_PID/LISTEN_FDS or for another PID."""
    pid_text = os.environ.get(ENV_PID)
    if pid_text is None:
        return 0
    pid = _whole_number(ENV_PID, pid_text)
    if pid == 0:
        raise SocketActivationError(f"{ENV_PID}=0 is not a process ID; systemd sets the service's own PID")
    if pid != os.getpid():
        return 0  # set for a parent (or an earlier exec) and inherited: not ours
    fds_text = os.environ.get(ENV_FDS)
    if fds_text is None:
        return 0
    # 0 is "no sockets": nothing to do, as with no variables at all.
    return _whole_number(ENV_FDS, fds_text)


def _whole_number(key: str, text: str) -> int:
    # int() would take " 3", "+3" and "3_0"; the protocol is plain digits.
    if not text.isascii() or not text.isdigit():
        raise SocketActivationError(
            f"{key}={text!r} is not a whole number >= 0: the variable is malformed; "
            "it is systemd's to set (remove it from the service's Environment= if set by hand)")
    return int(text)


def _names(count: int) -> list[Optional[str]]:
    text = os.environ.get(ENV_NAMES)
    if text is None:
        return [None] * count
    names = text.split(":")
    # A count mismatch means names cannot be paired with descriptors: the
    # order is all that ties them, so guessing would misname sockets.
    if len(names) != count:
        raise SocketActivationError(
            f"{ENV_NAMES} has {len(names)} names ({text!r}) for {ENV_FDS}={count} sockets: "
            "there must be one per socket (FileDescriptorName= names may not contain ':')")
    return [name or None for name in names]


# -- checking each descriptor ------------------------------------------------


def _adopt(fd: int) -> socket.socket:
    """The socket object for ``fd``, close-on-exec, once it is known to be a listening stream socket."""
    try:
        # Not for processes started from here: a worker that kept the
        # listening socket would keep the port open after we stop.
        os.set_inheritable(fd, False)
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise SocketActivationError(
                f"fd {fd} is not open, yet {ENV_FDS} counts it: the variables do not match the "
                "descriptors this process got (were they set by hand, or inherited past an exec?)") from None
        raise SocketActivationError(f"fd {fd}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise SocketActivationError(
            f"fd {fd} is {_file_kind(mode)}, not a socket; netpool serves stream sockets: "
            "use ListenStream= in the .socket unit")
    sock = socket.socket(fileno=fd)
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if kind != socket.SOCK_STREAM:
            what = _SOCKET_TYPES.get(kind, f"a socket of type {kind}")
            raise SocketActivationError(
                f"fd {fd} is {what}; netpool serves stream sockets: use ListenStream= in the .socket unit")
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
            raise SocketActivationError(
                f"fd {fd} is a stream socket that is not listening ({describe(sock)}), as with Accept=yes, "
                "which passes one connection per service instance; netpool accepts connections itself: "
                "set Accept=no in the .socket unit")
        # systemd may hand over O_NONBLOCK sockets; socket(fileno=) does not
        # look, and would call a non-blocking socket blocking. Tell the
        # object the truth rather than changing a flag systemd shares.
        if not os.get_blocking(fd):
            sock.setblocking(False)
    except BaseException:
        sock.detach()  # the descriptor stays open: see activated_sockets
        raise
    return sock


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (ListenFIFO=)"
    if stat.S_ISCHR(mode):
        return "a character device (ListenSpecial=)"
    if stat.S_ISREG(mode):
        return "a regular file (ListenSpecial=)"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a socket"


# -- matching a configured address ---------------------------------------------


def _is_unix_path(sock: socket.socket, path: str) -> bool:
    if sock.family != socket.AF_UNIX:
        return False
    bound = describe(sock)
    # systemd binds absolute paths (units require them); a config may be
    # relative to the working directory.
    return bound == path or (not path.startswith("@") and bound == os.path.abspath(path))


def _host_addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses a non-wildcard ``host`` stands for (a literal, or what a name resolves to)."""
    if host in _WILDCARD_FAMILIES:
        return set()
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return set()  # matches nothing: the error lists what systemd passed
    return {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}


def _is_host_port(sock: socket.socket, host: str,
                  addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address], port: int) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    bound_host, bound_port = sock.getsockname()[:2]
    if port != 0 and bound_port != port:
        return False
    if host in _WILDCARD_FAMILIES:
        return sock.family in _WILDCARD_FAMILIES[host]
    # A socket systemd bound to a wildcard does not match a specific host:
    # a config asking for 127.0.0.1 must not end up serving every interface.
    return ipaddress.ip_address(bound_host.split("%")[0]) in addresses
