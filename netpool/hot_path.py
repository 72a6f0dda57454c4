"""The C version of the loop's commonest work: read a raw-framed message, run the handler, send the reply.

``io_loop`` serves every epoll event in Python, and that Python is what
defines the behaviour. Where ``netpool/_speedups.c`` was built (``pip
install`` compiles it; without a compiler the install still succeeds, in
Python) this module hands the loop C versions of its three busiest steps,
which run the same system calls without the interpreter's cost per bytecode
and without releasing and retaking the GIL around a ``recv`` and a ``send``
that cannot block (MSG_DONTWAIT); that is what lets one loop thread keep up
with uvloop. Set ``NETPOOL_PURE_PYTHON=1`` to use the Python anyway (to
compare, or to rule the C out); the tests run every read-path test both ways.

- ``dispatch(events, i, conns, handler, calls, loop, bufsize, now)`` serves
  ``events[i:]`` while each is a plain read of an established connection (no
  PROXY header or TLS handshake pending, not closing, nothing to flush, not
  offloaded): recv or SSL_read, count, run the handler. It returns the index
  of the first event the loop must serve itself (``len(events)`` when there
  is none), or ``(index, kind, value)`` when that event's connection must
  finish (see FINISH), so events are still served strictly in order. In
  thread mode (``calls`` is the loop's call list) it times each call as
  ``IOLoop.user_call`` does and reports slow ones to the loop.
- ``send_bytes``, installed on the connection classes (``install``).
- ``serve_offloaded``: a handler thread's turn on an offloaded connection
  (``offloaded_server``), as ``IOLoop.run_calls`` does it.
- ``recv_nowait`` and ``tls_recv`` (``TLSTransport.c_recv``): the reads of
  the Python path (other framers than raw, set-up, handler threads), into a
  reused buffer, so a read allocates only the bytes it returns.

Reads and writes of an established TLS session take the C path too once it
has OpenSSL's ``SSL_read`` and ``SSL_write`` (``install_tls``), under the
same per-session lock as ``tls.TLSTransport``.

Nothing here is installed by importing a module: each listener calls
``listener.install_hot_path`` as it is made, which hands this module the
connection classes (``install``) and, for a TLS listener, what ``tls``
found in OpenSSL (``install_tls``); only the first call of each does
anything.
"""

from __future__ import annotations

import functools
import os
import resource
import select
import threading
import time
from typing import Any, Callable, Optional, Union

from .errors import TLSError
from .transport import PlainTransport

__all__ = ["install", "install_tls", "blocked_since_mark", "use_speedups", "speedups_active", "tls_speedups_ready",
           "FINISH", "RECV_ERROR", "HANDLER_ERROR", "TLS_ERROR"]

# What (index, kind, value) from dispatch() asks the loop to do with that
# event's connection: finish it for the reason ``value``, finish it for a
# receive error ``value`` (an OSError), for the handler's exception, or for
# a broken TLS session (a TLSError).
FINISH, RECV_ERROR, HANDLER_ERROR, TLS_ERROR = 0, 1, 2, 3

Outcome = Union[int, tuple[int, int, Any]]

# Thread mode: an inline handler or hook call that takes longer than this
# (wall clock) held up its loop, and its connection's calls move to threads
# (io_loop's _call_was_slow). 50 µs is about the shortest blocking call worth
# a thread switch: a switch costs a few microseconds, a local Redis GET 50.
OFFLOAD_AFTER = 50e-6
# A call that ran on the CPU this long is offloaded even if its thread never
# gave the CPU up (one only preempted for that long is not): it may have
# computed without the GIL (a password hash, zlib), which runs in parallel on
# a thread, and if it held the GIL the loop loses little by waiting for it
# there instead.
OFFLOAD_LONG = 250e-6

try:
    # A C module without a stub: to mypy it is Any, so its uses below need no narrowing.
    from . import _speedups
except ImportError:  # not compiled: the Python versions serve
    _speedups = None


# The C dispatch while the C version is in use, else None (the loop serves every event itself).
_active: Optional[Callable[..., Outcome]] = None
_conn_class: Optional[type[Any]] = None  # type[Any]: use_speedups sets its send methods
_tls_class: Optional[type[Any]] = None  # tls.TLSTransport once install_tls ran: use_speedups sets its c_recv
_python_sends: tuple[Any, Any] = (None, None)


def install(conn_class: type, recv_size: int) -> None:
    """Use the C ``send`` and ``send_bytes`` on ``conn_class`` (io_loop.LoopConnection), unless told not to.

    The class's own Python methods are kept here to switch back to; the C
    ``send_bytes`` falls back on the class's ``_send_bytes_py`` for what it
    does not do itself (a TLS session only Python drives, a queue to join, a
    busy send lock, non-bytes). ``recv_size`` is the largest read the
    callers make. Called by every listener as it is made (nothing is
    installed by an import); only the first call does anything.
    """
    global _conn_class, _python_sends
    if _conn_class is not None or _speedups is None or recv_size > _speedups.RECV_MAX:
        return  # installed already, not built, or a stale build reading shorter chunks
    _speedups.configure(conn_class, PlainTransport, OFFLOAD_AFTER, OFFLOAD_LONG)
    _conn_class = conn_class
    _python_sends = conn_class.__dict__["send"], conn_class.__dict__["send_bytes"]
    use_speedups(not os.environ.get("NETPOOL_PURE_PYTHON"))


def use_speedups(on: bool) -> bool:
    """Switch between the C and the Python versions; returns whether C is now in use.

    Takes effect for loops started afterwards, and for sends at once; the
    tests run both versions this way.
    """
    global _active, _recv_active
    on = on and _speedups is not None and _conn_class is not None
    _active = _speedups.dispatch if on else None
    _recv_active = _speedups.recv_nowait if on else _recv_nowait
    if _conn_class is not None:
        send, send_bytes = _speedups.send_methods(_conn_class) if on else _python_sends
        _conn_class.send = send
        _conn_class.send_bytes = send_bytes
    if _tls_class is not None:
        _tls_class.c_recv = _speedups.tls_recv if on else None
    return on


def install_tls(transport: type[Any], functions: Optional[tuple[int, ...]], eof_reason: int, write_chunk: int) -> bool:
    """Let the C version serve ``transport`` sessions (tls.TLSTransport); returns whether it will.

    While the C version is in use (``use_speedups``) the class's ``c_recv``
    is the C module's ``tls_recv``, which its ``recv_nowait`` then calls.

    ``functions`` are the addresses of OpenSSL's functions in the library
    pyOpenSSL uses (see ``tls._openssl_functions``), or None where they could
    not be found: then TLS takes the Python path, which does the same.
    """
    global _tls_class
    if _speedups is None or functions is None:
        return False
    if _speedups.tls_configured():
        return True
    _speedups.configure_tls(transport, TLSError, functions, eof_reason, write_chunk)
    _tls_class = transport
    transport.c_recv = _speedups.tls_recv if _active is not None else None
    return True


def tls_speedups_ready() -> bool:
    """Whether the C version, when active, serves TLS sessions too."""
    return _speedups is not None and _speedups.tls_configured()


def _recv_nowait(fd: int, bufsize: int) -> Optional[bytes]:
    """recv without waiting on a connection's socket: bytes (b"" at EOF), or None if nothing is there."""
    try:
        return os.read(fd, bufsize)  # a loop's sockets are non-blocking
    except BlockingIOError:
        return None


def recv_nowait(fd: int, bufsize: int) -> Optional[bytes]:
    """Thread mode's read-ahead on a handler thread (see io_loop); in C it keeps the GIL, which it cannot wait for."""
    return _recv_active(fd, bufsize)


def wait_for_client(fd: int, others: int, timeout: float) -> Optional[bool]:
    """Wait up to ``timeout`` seconds, without the GIL, for data or a hang-up on ``fd``, unless ``others`` (an epoll
    descriptor) turns readable first: True for the client, False for the others, None if neither came in time."""
    waiter = select.poll()
    waiter.register(fd, select.POLLIN | select.POLLRDHUP)
    waiter.register(others, select.POLLIN)
    ready = dict(waiter.poll(timeout * 1000.0))
    return (fd in ready) if ready else None


def rearm(ep: "select.epoll", fd: int, events: int) -> None:
    """epoll_ctl(MOD) from a handler thread; in C it keeps the GIL (see recv_nowait)."""
    if _speedups is not None and _active is not None:
        _speedups.rearm(ep.fileno(), fd, events)
    else:
        ep.modify(fd, events)


_recv_active: Callable[[int, int], Optional[bytes]] = _recv_nowait

_marks = threading.local()


def _usage() -> tuple[float, float, int]:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return time.monotonic(), ru.ru_utime + ru.ru_stime, ru.ru_nvcsw


def mark() -> None:
    """Note this thread's CPU time and voluntary context switches (see since_mark); once per batch of events."""
    if _speedups is not None:
        _speedups.mark()
    else:
        _marks.usage = _usage()


def blocked_since_mark(took: float) -> bool:
    """Whether a call that took ``took`` seconds blocked, judged by this thread's usage since mark(); marks again.

    It did if the thread gave the CPU up (slept or waited on something) for
    OFFLOAD_AFTER, or ran on it for OFFLOAD_LONG (a hash computed without
    the GIL, say). The time off the CPU covers everything since the mark, so
    ``took`` minus it is at most the call's own time on the CPU: a call the
    scheduler merely preempted does not pass.
    """
    off_cpu, gave_up = since_mark()
    return (off_cpu >= OFFLOAD_AFTER and gave_up > 0) or took - off_cpu >= OFFLOAD_LONG


def since_mark() -> tuple[float, int]:
    """(seconds off the CPU, voluntary context switches) of this thread since mark(); marks again.

    How thread mode tells a call that blocked (it slept or waited: it gave
    the CPU up) from one that was only long (a garbage collection, a
    computation) or was preempted.
    """
    if _speedups is not None:
        return _speedups.since_mark()
    wall, cpu, voluntary = _usage()
    then = getattr(_marks, "usage", None) or (wall, cpu, voluntary)
    _marks.usage = wall, cpu, voluntary
    return (wall - then[0]) - (cpu - then[1]), voluntary - then[2]


# What serve_offloaded() returns when the Python path must end the turn:
# (kind, value, calls, slow) with kind FINISH, RECV_ERROR, HANDLER_ERROR or REST.
REST = 4


def offloaded_server() -> Optional[Callable[..., Any]]:
    """The C turn of a handler thread with a plain, raw-framed offloaded connection, or None (see io_loop)."""
    if _active is None:
        return None
    return _speedups.serve_offloaded


def poller(ep: "select.epoll") -> Callable[[float], list]:
    """The wait of a loop on ``ep``: ``poll(timeout) -> [(fd, events), ...]``."""
    if _active is None:
        return ep.poll
    return functools.partial(_speedups.epoll_wait, ep.fileno())


def speedups_active() -> bool:
    return _active is not None


def active_dispatch() -> Optional[Callable[..., Outcome]]:
    """The C dispatch (see above), or None while the Python version is in use."""
    return _active
