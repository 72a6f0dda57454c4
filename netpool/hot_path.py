"""The two steps every message of a raw-framed connection takes: read it in, send the reply.

An I/O loop spends most of its time here, so both steps have two versions
with the same behaviour: the Python below, which defines it, and the C of
``netpool/_speedups.c``, which is used when it was built (``pip install``
compiles it; without a compiler the install still succeeds, in Python).
The C version runs the same system calls without the interpreter's cost per
bytecode, and without releasing and retaking the GIL around a ``recv`` and
a ``send`` that cannot block (MSG_DONTWAIT); that is what lets one loop
thread keep up with uvloop. Set ``NETPOOL_PURE_PYTHON=1`` to use the Python
version anyway (to compare, or to rule the C out).

``dispatch`` serves a run of epoll events that are plain reads: no PROXY
header or TLS handshake pending, not closing, nothing to flush. It stops at
the first event that needs the loop's full path and says which, so events
are still served strictly in order. Reads of an established TLS session are
plain reads too: the C version calls OpenSSL's ``SSL_read`` and
``SSL_write`` itself once it has their addresses (``install_tls``), under
the same per-session lock as ``tls.TLSTransport``.

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
from time import perf_counter
from typing import Any, Callable, Optional, Union

from .errors import TLSError

__all__ = ["dispatch", "install", "install_tls", "blocked_since_mark", "use_speedups", "speedups_active", "tls_speedups_ready",
           "FINISH", "RECV_ERROR", "HANDLER_ERROR", "TLS_ERROR"]

# What (index, kind, value) from dispatch() asks the loop to do with that
# event's connection: finish it for the reason ``value``, finish it for a
# receive error ``value`` (an OSError), for the handler's exception, or for
# a broken TLS session (a TLSError).
FINISH, RECV_ERROR, HANDLER_ERROR, TLS_ERROR = 0, 1, 2, 3

Outcome = Union[int, tuple[int, int, Any]]

_EPOLLOUT = select.EPOLLOUT

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
    from . import _speedups
except ImportError:  # not compiled: the Python versions serve
    _speedups = None


def dispatch(events: list, i: int, conns: dict, handler: Callable, calls: Optional[list], loop: Any,
             bufsize: int, now: float) -> Outcome:
    """Serve ``events[i:]`` while each is a plain read: recv, count, run the handler.

    Returns the index of the first event the loop must serve itself
    (``len(events)`` when there is none), or ``(index, kind, value)`` when
    that event's connection must finish (see FINISH). ``calls`` is the
    loop's call list in thread mode (None in events mode): each handler call
    is pushed on it and popped after, and an empty list at the pop means the
    loop's monitor handed the call off; then ``loop._handed_off`` is raised.
    In thread mode a call slower than OFFLOAD_AFTER is reported to
    ``loop._call_was_slow``, and offloaded connections are left to the loop.
    """
    n = len(events)
    while i < n:
        fd, ev = events[i]
        if ev & _EPOLLOUT:
            return i
        conn = conns.get(fd)
        if conn is None or conn._setup or conn.close_reason is not None:
            return i
        if conn._offloaded or (calls is not None and not conn._proven and loop._offload_new):
            return i  # its calls run on threads, which read it too: the loop's full path moves it there
        tls = conn._tls
        try:
            if tls is None:
                data = conn._sock.recv(bufsize)  # non-blocking: the loop set it so
            else:
                data = tls.recv_nowait(bufsize)
                if data is None:  # part of a record, or the session must write first
                    i += 1
                    continue
        except BlockingIOError:
            i += 1
            continue
        except OSError as exc:
            return i, RECV_ERROR, exc
        except TLSError as exc:
            return i, TLS_ERROR, exc
        conn._last_read = now
        if not data:
            return i, FINISH, "eof"
        conn.bytes_in += len(data)
        if calls is None:
            try:
                handler(data, conn)
            except Exception as exc:
                return i, HANDLER_ERROR, exc
        else:
            loop._gen += 1
            calls.append(conn)
            started = perf_counter()
            try:
                handler(data, conn)
            except Exception as exc:
                try:
                    calls.pop()
                except IndexError:
                    raise loop._handed_off(conn, error=exc, tls=tls) from None
                return i, HANDLER_ERROR, exc
            except BaseException:  # KeyboardInterrupt and such end the loop: nothing to hand off
                if calls:
                    calls.pop()
                raise
            try:
                calls.pop()
            except IndexError:
                raise loop._handed_off(conn, tls=tls) from None
            took = perf_counter() - started
            if took > OFFLOAD_AFTER:
                loop._call_was_slow(conn, took)
            elif not conn._proven:
                conn._proven = True
        if conn.close_reason is not None:
            return i, FINISH, "error"
        if tls is not None and conn._tls is tls and tls.pending():
            continue  # OpenSSL holds decrypted bytes epoll cannot see: read this event again
        i += 1
    return n


_active: Callable[..., Outcome] = dispatch
_base: Optional[type] = None
_installed: tuple[type, ...] = ()


def install(base: type, classes: tuple[type, ...], recv_size: int) -> None:
    """Use the C ``send_bytes`` on ``classes`` (``base`` and its subclasses), unless told not to.

    Each class that defines ``send_bytes`` keeps its Python version as
    ``_send_bytes_py``, which the C one falls back on for what it does not
    do itself (TLS, a queue to append to, a busy send lock, non-bytes).
    Classes with ``_raw_send = True`` have ``send`` follow ``send_bytes``.
    ``recv_size`` is the largest read the callers make. Called by every
    listener as it is made (nothing is installed by an import); only the
    first call does anything.
    """
    global _base, _installed
    if _base is not None or _speedups is None or recv_size > _speedups.RECV_MAX:
        return  # installed already, not built, or a stale build reading shorter chunks
    _speedups.configure(base, OFFLOAD_AFTER, OFFLOAD_LONG)
    _base, _installed = base, classes
    for cls in classes:
        own = cls.__dict__.get("send_bytes")
        if own is not None and "_send_bytes_py" not in cls.__dict__:
            cls._send_bytes_py = own
    use_speedups(not os.environ.get("NETPOOL_PURE_PYTHON"))


def use_speedups(on: bool) -> bool:
    """Switch between the C and the Python versions; returns whether C is now in use.

    Takes effect for loops started afterwards, and for sends at once; the
    tests run both versions this way.
    """
    global _active, _recv_active
    on = on and _speedups is not None and _base is not None
    _active = _speedups.dispatch if on else dispatch  # type: ignore[union-attr]
    _recv_active = _speedups.recv_nowait if on else _recv_nowait  # type: ignore[union-attr]
    c_send = _speedups.send_method(_base) if on else None  # type: ignore[union-attr]
    for cls in _installed:
        py_send = cls.__dict__.get("_send_bytes_py")
        if py_send is not None:
            cls.send_bytes = c_send if on else py_send
    for cls in _installed:
        if cls.__dict__.get("_raw_send"):
            cls.send = cls.send_bytes
    return on


def install_tls(transport: type, functions: Optional[tuple[int, ...]], eof_reason: int, write_chunk: int) -> bool:
    """Let the C version serve ``transport`` sessions (tls.TLSTransport); returns whether it will.

    ``functions`` are the addresses of OpenSSL's functions in the library
    pyOpenSSL uses (see ``tls._openssl_functions``), or None where they could
    not be found: then TLS takes the Python path, which does the same.
    """
    if _speedups is None or functions is None:
        return False
    if _speedups.tls_configured():
        return True
    _speedups.configure_tls(transport, TLSError, functions, eof_reason, write_chunk)
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
    if _speedups is not None and _active is not dispatch:
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
        return _speedups.since_mark()  # type: ignore[no-any-return]
    wall, cpu, voluntary = _usage()
    then = getattr(_marks, "usage", None) or (wall, cpu, voluntary)
    _marks.usage = wall, cpu, voluntary
    return (wall - then[0]) - (cpu - then[1]), voluntary - then[2]


# What serve_offloaded() returns when the Python path must end the turn:
# (kind, value, calls, slow) with kind FINISH, RECV_ERROR, HANDLER_ERROR or REST.
REST = 4


def offloaded_server() -> Optional[Callable[..., Any]]:
    """The C turn of a handler thread with a plain, raw-framed offloaded connection, or None (see io_loop)."""
    if _active is dispatch:
        return None
    return _speedups.serve_offloaded  # type: ignore[union-attr, no-any-return]


def poller(ep: "select.epoll") -> Callable[[float], list]:
    """The wait of a loop on ``ep``: ``poll(timeout) -> [(fd, events), ...]``."""
    if _active is dispatch:
        return ep.poll
    return functools.partial(_speedups.epoll_wait, ep.fileno())  # type: ignore[union-attr]


def speedups_active() -> bool:
    return _active is not dispatch


def active_dispatch() -> Callable[..., Outcome]:
    return _active
