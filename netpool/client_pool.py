"""The calling side: a pool of reusable client connections to one back end.

A front end that opens a TCP connection per request pays a handshake each
time and leaves thousands of sockets in TIME_WAIT; one that keeps a single
connection serialises every request. The pool keeps up to ``max_open``
connections, hands each to one user at a time, and takes it back for the
next one::

    pool = netpool.ConnectionPool(("127.0.0.1", 5555), max_open=64)
    reply = pool.request(b"ping", deadline=2.0)       # length-prefixed exchange
    with pool.acquire() as conn:                       # or hold one for several calls
        conn.send_message(b"a"); conn.recv_message()

Model: urllib3's pool and Go's ``database/sql``. Idle connections sit on a
LIFO stack (the warmest one is reused first, so the cold ones age out);
callers that find none free and the pool at ``max_open`` queue first come,
first served, and get :class:`PoolTimeout` at their deadline. A returned
connection goes straight to the first waiter. A slot freed by a closed
connection goes to the first waiter as a right to dial.

Ownership: the pool owns every connection it dialled. A connection is
either idle (on the stack), checked out (owned by exactly one caller until
``release``), or closed; ``open`` counts idle + checked out + being dialled
and never exceeds ``max_open``. One lock guards all of it; sockets are
dialled, checked and closed outside the lock.

Staleness: a connection is never handed out if its peer has closed it
(one ``poll`` on checkout sees the FIN), if it is older than
``max_lifetime`` or idle longer than ``idle_timeout``; it is replaced by a
fresh dial for the same caller. A background thread runs the same checks
(and the optional ``health_check(conn)`` ping) on idle connections every
``health_check_interval`` seconds. Lifetime is never enforced mid-use.

This module is the pool's bookkeeping (checkout, release, dialling on a
free slot, the breaker around a request, the background checks, stats). The
rest has a module of its own: one connection and its length-prefixed I/O
(``pool_connection``), the queue of callers waiting for one
(``pool_waiters``), and turning a target into a dial function (``dialer``).
"""

from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from .checks import seconds, whole_number
from .deadline import Deadline, DeadlineLike, to_deadline
from .dialer import Dialer, Target, make_dialer
from .errors import ConfigError, DeadlineExceeded, DialError, PoolClosed, PoolTimeout, ProtocolError
from .pool_connection import PoolConnection
from .pool_waiters import Waiter, WaiterQueue

if TYPE_CHECKING:  # pragma: no cover
    from .breaker import CircuitBreaker

__all__ = ["ConnectionPool", "PoolConnection", "PoolStats", "Dialer", "Target", "CLOSE_REASONS"]

log = logging.getLogger("netpool.client_pool")

# Why the pool closed a connection (the keys of ``stats().closed_by_reason``).
CLOSE_REASONS = (
    "max_lifetime",  # older than max_lifetime when returned or checked
    "idle_timeout",  # idle longer than idle_timeout
    "max_idle",  # returned to a pool that already held max_idle idle connections
    "stale",  # the peer had closed it (or sent unasked-for bytes) while it was idle
    "health_check",  # the user's health_check(conn) said no
    "error",  # the user's code raised while holding it, or its I/O failed
    "pool_closed",  # pool.close()
)


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of a pool (the questions Go's ``sql.DBStats`` answers)."""

    name: str
    max_open: int
    open: int
    """Idle + in use + being dialled."""
    idle: int
    in_use: int
    waiting: int
    """Callers queued for a connection right now."""
    dialled: int
    """Connections opened successfully, ever."""
    dial_errors: int
    acquired: int
    """Successful checkouts, ever."""
    reused: int
    """Checkouts served by a connection that had been used before."""
    timeouts: int
    """Checkouts that gave up (PoolTimeout)."""
    wait_count: int
    """Checkouts that had to queue."""
    wait_seconds: float
    """Total time spent queued."""
    closed: int
    closed_by_reason: Mapping[str, int] = field(default_factory=dict)


class _Lease:
    """``with pool.acquire() as conn``: released on exit, discarded if the block raised."""

    __slots__ = ("_pool", "_deadline", "_conn")

    def __init__(self, pool: "ConnectionPool", deadline: DeadlineLike) -> None:
        self._pool = pool
        self._deadline = deadline
        self._conn: Optional[PoolConnection] = None

    def __enter__(self) -> PoolConnection:
        self._conn = self._pool.checkout(self._deadline)
        return self._conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn, discard=exc_type is not None)


class ConnectionPool:
    """A thread-safe pool of client connections to one back end.

    :param target: ``(host, port)``, ``(host, port, ssl_context)``, or a
        ``dial()`` function returning a connected socket.
    :param max_open: hard cap on connections open at once (idle + in use + dialling).
    :param max_idle: how many idle connections to keep; more are closed on return.
        Defaults to ``max_open``.
    :param max_lifetime: seconds after which a connection is closed and replaced
        when next returned or checked (never mid-use); None = forever. Keeps
        connections from outliving a server's own limits (golang/go#9851).
    :param idle_timeout: seconds an idle connection is kept; None = forever.
    :param acquire_timeout: seconds a caller waits for a free connection
        before :class:`PoolTimeout`, unless its own deadline is sooner.
    :param connect_timeout: seconds a dial may take (target tuples only).
    :param read_timeout: seconds a single read may make no progress,
        whatever the call's deadline.
    :param write_timeout: the same for a single write.
    :param health_check_interval: seconds between background checks of idle
        connections; None = only check on checkout.
    :param health_check: optional ``health_check(conn) -> bool`` (a ping) run
        on idle connections by the background check; False or an exception
        closes the connection.
    :param breaker: a :class:`~netpool.CircuitBreaker` guarding dials and
        :meth:`request`: while it is open they fail fast with CircuitOpen.
    """

    def __init__(
        self,
        target: Target,
        *,
        max_open: int = 10,
        max_idle: Optional[int] = None,
        max_lifetime: Optional[float] = 1800.0,
        idle_timeout: Optional[float] = 300.0,
        acquire_timeout: Optional[float] = 10.0,
        connect_timeout: float = 5.0,
        read_timeout: Optional[float] = 30.0,
        write_timeout: Optional[float] = 30.0,
        health_check_interval: Optional[float] = 30.0,
        health_check: Optional[Callable[[PoolConnection], bool]] = None,
        max_message_size: int = 16 * 1024 * 1024,
        breaker: Optional["CircuitBreaker"] = None,
        name: Optional[str] = None,
    ) -> None:
        self._dial_fn, self.address = make_dialer(target, connect_timeout)
        whole_number("max_open", max_open)
        max_idle = max_open if max_idle is None else max_idle
        whole_number("max_idle", max_idle, minimum=0)
        for key, value in (
            ("max_lifetime", max_lifetime), ("idle_timeout", idle_timeout), ("acquire_timeout", acquire_timeout),
            ("read_timeout", read_timeout), ("write_timeout", write_timeout),
            ("health_check_interval", health_check_interval), ("connect_timeout", connect_timeout),
        ):
            seconds(key, value, optional=key != "connect_timeout")
        whole_number("max_message_size", max_message_size)
        if health_check is not None and not callable(health_check):
            raise ConfigError("health_check", f"expected a callable health_check(conn) -> bool, got {health_check!r}")
        self.name = name or self.address
        self.max_open = max_open
        self.max_idle = min(max_idle, max_open)
        self.max_lifetime = max_lifetime
        self.idle_timeout = idle_timeout
        self.acquire_timeout = acquire_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.health_check_interval = health_check_interval
        self.health_check = health_check
        self.max_message_size = max_message_size
        self.breaker = breaker

        self._lock = threading.Lock()
        self._idle: collections.deque[PoolConnection] = collections.deque()  # right end = most recent
        self._in_use: dict[int, PoolConnection] = {}
        self._waiters = WaiterQueue()
        self._open = 0
        self._closed = False
        self._dialled = 0
        self._dial_errors = 0
        self._acquired = 0
        self._reused = 0
        self._timeouts = 0
        self._wait_count = 0
        self._wait_seconds = 0.0
        self._closed_by: collections.Counter[str] = collections.Counter()
        self._wait_observers: list[Callable[[float], None]] = []
        self._stop = threading.Event()
        self._health_thread: Optional[threading.Thread] = None

    def __repr__(self) -> str:
        return f"<ConnectionPool {self.name} open={self._open}/{self.max_open}{' closed' if self._closed else ''}>"

    # -- checkout and release ---------------------------------------------

    def acquire(self, deadline: DeadlineLike = None) -> _Lease:
        """``with pool.acquire() as conn:``; a block that raises discards the connection.

        ``deadline`` bounds the wait for a connection (default
        ``acquire_timeout``); pass the same :class:`Deadline` to the calls
        inside to bound the whole exchange.
        """
        return _Lease(self, deadline)

    def checkout(self, deadline: DeadlineLike = None) -> PoolConnection:
        """Take a connection; give it back with :meth:`release`. Prefer :meth:`acquire`.

        Raises :class:`PoolTimeout` when none frees up in time,
        :class:`PoolClosed`, :class:`DialError`, or CircuitOpen (with a breaker).
        """
        return self._checkout(self._acquire_deadline(deadline), guard_dial=True)

    def release(self, conn: PoolConnection, *, discard: bool = False) -> None:
        """Give ``conn`` back: to the first waiter, to the idle stack, or closed.

        ``discard=True`` (or a connection whose I/O failed) closes it and
        frees its slot. Releasing a connection that is not checked out is a
        bug in the caller and raises ValueError.
        """
        self._release(conn, discard, touch=True)

    def _release(self, conn: PoolConnection, discard: bool, touch: bool) -> None:
        now = time.monotonic()
        with self._lock:
            if self._in_use.pop(conn.id, None) is None:
                raise ValueError(f"{conn!r} is not checked out of pool {self.name} (released twice?)")
            if self._closed:
                reason = "pool_closed"
            elif discard or conn.broken:
                reason = "error"
            elif self.max_lifetime is not None and now - conn.created_at >= self.max_lifetime:
                reason = "max_lifetime"
            else:
                if touch:
                    conn.last_used = now
                if self._waiters:
                    self._hand_off_locked(conn)
                    return
                if len(self._idle) < self.max_idle:
                    self._idle.append(conn)
                    return
                reason = "max_idle"
            self._closed_by[reason] += 1
            self._slot_freed_locked()
        conn.close()

    def _acquire_deadline(self, deadline: DeadlineLike) -> Deadline:
        if deadline is None:
            return Deadline.after(self.acquire_timeout)
        return to_deadline(deadline).sooner(self.acquire_timeout)

    def _checkout(self, deadline: Deadline, guard_dial: bool) -> PoolConnection:
        waiter = None
        conn = None
        dial = False
        waited_since: Optional[float] = None
        with self._lock:
            if self._closed:
                raise PoolClosed(self, f"pool {self.name} is closed")
            # Queued callers come first (FIFO): a newcomer may take an idle
            # connection or a free slot only when nobody is waiting.
            if self._idle and not self._waiters:
                conn = self._idle.pop()
                self._in_use[conn.id] = conn
            elif self._open < self.max_open and not self._waiters:
                self._open += 1
                dial = True
            else:
                waiter = self._waiters.join()
                waited_since = time.monotonic()
        if waiter is not None:
            conn, dial = self._wait(waiter, deadline)
        if not dial:
            assert conn is not None
            reason = self._stale_reason(conn)
            if reason is None:
                return self._checked_out(conn, waited_since, reused=True)
            # Never hand out a stale connection: replace it for this caller,
            # its slot becoming our dial (so the caller keeps its turn).
            with self._lock:
                self._in_use.pop(conn.id, None)
                self._closed_by[reason] += 1
            log.debug("pool %s: %r not reusable (%s); dialling a replacement", self.name, conn, reason)
            conn.close()
        conn = self._dial_new(guard_dial)
        return self._checked_out(conn, waited_since, reused=False)

    def _checked_out(self, conn: PoolConnection, waited_since: Optional[float], reused: bool) -> PoolConnection:
        waited = 0.0 if waited_since is None else time.monotonic() - waited_since
        conn.uses += 1
        with self._lock:
            self._acquired += 1
            if reused:
                self._reused += 1
            if waited_since is not None:
                self._wait_count += 1
                self._wait_seconds += waited
        for observe in self._wait_observers:
            observe(waited)
        return conn

    def _wait(self, waiter: Waiter, deadline: Deadline) -> tuple[Optional[PoolConnection], bool]:
        waiter.wait(deadline.remaining())
        with self._lock:
            if waiter.granted:
                if waiter.closed:
                    raise PoolClosed(self, f"pool {self.name} was closed while waiting for a connection")
                return waiter.conn, waiter.dial
            self._waiters.leave(waiter)  # not granted
            self._timeouts += 1
            in_use, waiting = len(self._in_use), len(self._waiters)
        raise PoolTimeout(
            self,
            f"pool {self.name}: no connection free within the deadline "
            f"({in_use} in use of max_open={self.max_open}, {waiting} other callers waiting); "
            "raise max_open, hold connections for less time, or look for a connection never released",
        )

    def _hand_off_locked(self, conn: PoolConnection) -> None:
        self._in_use[conn.id] = conn
        self._waiters.grant_connection(conn)

    def _slot_freed_locked(self) -> None:
        self._open -= 1
        if self._waiters and self._open < self.max_open and not self._closed:
            self._open += 1
            self._waiters.grant_dial()

    def _stale_reason(self, conn: PoolConnection, now: Optional[float] = None) -> Optional[str]:
        now = time.monotonic() if now is None else now
        if self.max_lifetime is not None and now - conn.created_at >= self.max_lifetime:
            return "max_lifetime"
        if self.idle_timeout is not None and now - conn.last_used >= self.idle_timeout:
            return "idle_timeout"
        if not conn.is_alive():
            return "stale"
        return None

    # -- dialling -------------------------------------------------------------

    def _dial_new(self, guard_dial: bool) -> PoolConnection:
        """Dial on a slot already counted in ``_open``; give the slot back if it fails."""
        try:
            breaker = self.breaker if guard_dial else None
            if breaker is not None:
                sock = breaker.call(self._dial_once)
            else:
                sock = self._dial_once()
        except BaseException:
            with self._lock:
                self._slot_freed_locked()
            raise
        conn = PoolConnection(
            sock,
            self.address,
            read_timeout=self.read_timeout,
            write_timeout=self.write_timeout,
            max_message_size=self.max_message_size,
        )
        with self._lock:
            self._dialled += 1
            self._in_use[conn.id] = conn
            closed = self._closed
            if not closed and self._health_thread is None and self.health_check_interval is not None:
                self._start_health_thread()
        if closed:
            self.release(conn)  # counts it as pool_closed and frees the slot
            raise PoolClosed(self, f"pool {self.name} was closed while dialling")
        return conn

    def _dial_once(self) -> socket.socket:
        try:
            return self._dial_fn()
        except OSError as exc:
            with self._lock:
                self._dial_errors += 1
            raise DialError(self, f"pool {self.name}: cannot connect to {self.address}: {exc}") from exc

    # -- one exchange, with the breaker ----------------------------------------

    def request(self, payload: bytes, deadline: DeadlineLike = None) -> bytes:
        """Send one length-prefixed message on a pooled connection and return the reply.

        ``deadline`` (seconds or a :class:`Deadline`) bounds the whole call:
        the wait for a connection, a dial, the send and the reply. With a
        breaker, the call fails fast with CircuitOpen while it is open; dial
        and I/O failures count against it, a full pool (PoolTimeout) does not.
        """
        d = to_deadline(deadline)
        breaker = self.breaker
        token = breaker.allow() if breaker is not None else None
        try:
            conn = self._checkout(d.sooner(self.acquire_timeout), guard_dial=False)
        except BaseException as exc:
            if token is not None:
                token.failure(exc) if isinstance(exc, DialError) else token.ignore()
            raise
        try:
            reply = conn.request(payload, d)
        except BaseException as exc:
            self.release(conn, discard=True)
            if token is not None:
                backend_fault = isinstance(exc, (OSError, DeadlineExceeded, ProtocolError))
                token.failure(exc) if backend_fault else token.ignore()
            raise
        self.release(conn)
        if token is not None:
            token.success()
        return reply

    # -- observation ---------------------------------------------------------

    def stats(self) -> PoolStats:
        """Counts right now, taken under the lock so they add up."""
        with self._lock:
            closed_by = dict(self._closed_by)
            return PoolStats(
                name=self.name,
                max_open=self.max_open,
                open=self._open,
                idle=len(self._idle),
                in_use=len(self._in_use),
                waiting=len(self._waiters),
                dialled=self._dialled,
                dial_errors=self._dial_errors,
                acquired=self._acquired,
                reused=self._reused,
                timeouts=self._timeouts,
                wait_count=self._wait_count,
                wait_seconds=self._wait_seconds,
                closed=sum(closed_by.values()),
                closed_by_reason=closed_by,
            )

    def observe_waits(self, callback: Callable[[float], None]) -> None:
        """Call ``callback(seconds)`` with the queueing time of every checkout (0.0 when none); for metrics."""
        self._wait_observers.append(callback)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- background checks -------------------------------------------------

    def _start_health_thread(self) -> None:
        thread = threading.Thread(target=self._health_loop, name=f"netpool-pool-{self.name}-health", daemon=True)
        self._health_thread = thread
        thread.start()

    def _health_loop(self) -> None:
        interval = self.health_check_interval
        assert interval is not None
        while not self._stop.wait(interval):
            try:
                self.check_idle()
            except Exception:  # the checker must outlive any one bad check
                log.exception("pool %s: background health check failed", self.name)

    def check_idle(self) -> int:
        """Run the idle checks now (the background thread calls this); returns how many were closed.

        Lifetime, idle time and the ``poll`` liveness check run under the
        lock (no I/O beyond one ``poll``); the user's ``health_check`` runs
        outside it, one connection at a time taken off the idle stack.
        """
        now = time.monotonic()
        dead: list[PoolConnection] = []
        with self._lock:
            keep: collections.deque[PoolConnection] = collections.deque()
            for conn in self._idle:
                reason = self._stale_reason(conn, now)
                if reason is None:
                    keep.append(conn)
                else:
                    self._closed_by[reason] += 1
                    dead.append(conn)
            self._idle = keep
            for _ in dead:
                self._slot_freed_locked()
            ping = list(keep) if self.health_check is not None else []
        for conn in dead:
            conn.close()
        closed = len(dead)
        for conn in ping:
            with self._lock:
                try:
                    self._idle.remove(conn)
                except ValueError:
                    continue  # checked out meanwhile
                self._in_use[conn.id] = conn
            try:
                healthy = bool(self.health_check(conn))  # type: ignore[misc]
            except Exception as exc:
                log.info("pool %s: health check of %r raised %s; closing it", self.name, conn, exc)
                healthy = False
            if healthy:
                # A ping is not use: idle_timeout still counts from the last caller.
                self._release(conn, False, touch=False)
            else:
                with self._lock:
                    self._in_use.pop(conn.id, None)
                    self._closed_by["health_check"] += 1
                    self._slot_freed_locked()
                conn.close()
                closed += 1
        if closed:
            log.debug("pool %s: background check closed %d idle connection(s)", self.name, closed)
        return closed

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Close idle connections now and the rest as they come back; waiters get PoolClosed.

        Safe to call more than once. Joins the background checker.
        """
        with self._lock:
            if self._closed:
                idle: list[PoolConnection] = []
            else:
                self._closed = True
                idle = list(self._idle)
                self._idle.clear()
                self._open -= len(idle)
                self._closed_by["pool_closed"] += len(idle)
                self._waiters.close_all()
            thread = self._health_thread
        for conn in idle:
            conn.close()
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)

    def __enter__(self) -> "ConnectionPool":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
