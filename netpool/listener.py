"""Listener: the running handle that owns the socket, the acceptors and the connections.

Lifecycle::

    new --start()--> running --suspend()--> suspended --resume()--> running
    running or suspended --stop() or retire()--> stopping --> stopped
    running or suspended --stop_accepting()--> draining --stop() or retire()--> stopping --> stopped

Ownership: the listener owns the listening socket, one spare descriptor,
every acceptor thread and every thread it starts for connections (I/O loops,
handler threads, handed-off calls: ``conn_threads``); ``stop()`` joins them
all. The thread serving a connection owns its socket (see ``connection``).
A listener given a socket (``start_listener(config, sock=...)``: inherited
from a supervisor, passed by systemd, or shared by the generations of a
rolling reload) serves a duplicate of it and never shuts it down or removes
its path: the socket, and the clients queued on it, outlive the listener.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Mapping, Optional

from .acceptor import AcceptGate, Acceptor
from .admission import Admission
from .broker import LocalBroker, redact_url
from .broker_url import open_broker, shares_sessions
from .config import ListenerConfig, format_address
from .conn_threads import ConnectionThreads
from .connection import Connection
from .errors import TLSError
from .file_watch import FileWatch
from .framing import RawFramer, framer_factory, with_message_deadline
from . import hot_path
from .io_loop import RECV_SIZE, IOLoop, LoopConnection
from .ratelimit import RateLimitedLog
from .proxy_protocol import parse_networks
from .close_reasons import fault_logs
from .listener_info import ERROR_REASONS, ListenerInfo
from .spare_descriptor import SpareDescriptor
from .worker_dispatch import WorkerDispatch
from .workers import WorkerPool
from .services import ConnectionServices
from .sockets import adopt_listening_socket, open_listening_socket, remove_unix_socket
from .tls_config import TLSConfig
from .transport import PlainTransport

__all__ = ["Listener", "ListenerInfo", "start_listener", "install_hot_path", "ERROR_REASONS"]

log = logging.getLogger("netpool.listener")

# After the grace period, force-closed connections get this long to finish
# their cleanup before stop() gives up joining their threads.
FORCE_CLOSE_WAIT = 1.0


def install_hot_path(*, tls: bool = False) -> None:
    """Put the C hot path (where it was built) in place: for the loops' connections, and for TLS sessions.

    Every Listener calls this as it is made, so importing netpool installs
    nothing; after the first time (the first TLS listener, for TLS) it
    changes nothing. NETPOOL_PURE_PYTHON=1 in the environment keeps the
    Python versions.
    """
    hot_path.install(LoopConnection, RECV_SIZE)
    if tls and not hot_path.tls_speedups_ready():
        from . import tls as tls_module

        tls_module.use_c_path(hot_path.install_tls(*tls_module.c_path_parts()))


class Listener:
    """A running netpool server. Create it with :func:`start_listener`."""

    def __init__(self, config: ListenerConfig, *, sock: Optional[socket.socket] = None) -> None:
        self.config = config
        self._given_sock = sock
        base_factory = framer_factory(config.framing)
        self._raw_framing = base_factory is RawFramer
        # A RawFramer keeps no state: every connection can share one.
        self._raw_framer = RawFramer(config.max_message_size) if self._raw_framing else None
        self._framer_factory = with_message_deadline(base_factory, config.message_timeout)
        self._encode = None if self._raw_framing else base_factory(config.max_message_size).encode
        # Built here, before any socket is bound, so a bad certificate or key
        # fails start_listener with the file named and nothing half-started.
        tls = config.ssl
        assert tls is None or isinstance(tls, TLSConfig)  # ListenerConfig.__post_init__ turned a mapping into one
        self._tls_context = None
        if tls is not None:
            from .tls import build_server_context  # pyOpenSSL is loaded only for TLS listeners

            self._tls_context = build_server_context(tls, config.name)
        install_hot_path(tls=tls is not None)
        self._tls_implicit = tls is not None and tls.mode == "implicit"
        self._proxy_versions = {"off": (), "v1": (1,), "v2": (2,), "any": (1, 2)}[config.proxy_protocol]
        self._proxy_trusted = parse_networks(config.proxy_trusted)
        self._admission = Admission(
            config.max_connections,
            config.overflow,
            config.grow_step,
            alarm_threshold=config.alarm_threshold,
            alarm_cooldown=config.alarm_cooldown,
            acceptors=config.acceptors,
        )
        # Counters and the table of open connections.
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._conns: dict[int, Connection] = {}
        self._conn_threads = ConnectionThreads(config.name)
        self._admitted = 0
        self._refused: collections.Counter[str] = collections.Counter()
        self._closed: collections.Counter[str] = collections.Counter()
        # The gate: lifecycle state, and how many acceptors are inside accept().
        # Acceptors pass it twice per connection through its lock alone (a
        # Condition's with-statement is Python code); they notify only when
        # someone waits for them to leave accept(): stop, suspend or a drain.
        self._gate_lock = threading.Lock()
        self._gate = threading.Condition(self._gate_lock)
        self._state = "new"
        self._in_accept = 0
        self._sock: Optional[socket.socket] = None
        self._unix_inode: Optional[int] = None
        self._unix_path = config.unix
        self.port: Optional[int] = None
        self._stop_event = threading.Event()
        self._stopped = threading.Event()
        self._started_at = 0.0
        gate = AcceptGate(enter=self._enter_accept, leave=self._leave_accept, accepting_on=self._accepting_on,
                          out_of_descriptors=self._out_of_descriptors, admit=self._admit,
                          stopping=self._stop_event, admission=self._admission,
                          wait_for_slot=config.overflow == "wait", client_class=PlainTransport)
        self._acceptors = [Acceptor(gate, i, name=config.name, nice=config.acceptor_nice)
                           for i in range(config.acceptors)]
        self._fault_logs = fault_logs()
        self.workers: Optional[WorkerPool] = None
        handler, after_queued_calls = config.handler, _at_once
        assert not isinstance(handler, str)  # ListenerConfig.__post_init__ imported what a "module:attr" string names
        if config.workers:
            self.workers = WorkerPool(config.workers, name=config.name)
            dispatch = WorkerDispatch(self.workers, config, self._fault_logs)
            handler, after_queued_calls = dispatch.handle, dispatch.after_queued_calls
        services = ConnectionServices(
            config=config, handler=handler, raw_framing=self._raw_framing, raw_framer=self._raw_framer,
            framer_factory=self._framer_factory, tls_context=self._current_tls_context,
            tls_implicit=self._tls_implicit,
            proxy_versions=self._proxy_versions, proxy_trusted=self._proxy_trusted, fault_logs=self._fault_logs,
            threads=self._conn_threads, after_queued_calls=after_queued_calls,
            connection_closed=self._connection_closed, fire_alarm=self._fire_alarm)
        # Both modes read through event loops; in thread mode handlers may
        # block, and a loop held up by one moves to another thread.
        self._loops = [IOLoop(services, i, handoff=config.io == "threads") for i in range(config.io_threads)]
        self._next_loop = 0
        self._spare = SpareDescriptor()  # for clients pending when descriptors run out (_out_of_descriptors)
        # Set while one acceptor drains pending clients through the spare: no
        # acceptor may enter accept() meanwhile (see _out_of_descriptors).
        self._draining = False
        self._bytes_in = self._bytes_out = 0  # of closed connections; open ones add theirs in info()
        self._refusals = RateLimitedLog(log)
        self._fd_log = RateLimitedLog(log)
        self._broker: Optional[LocalBroker] = None
        self._broker_lock = threading.Lock()
        self._broker_handed_on = False
        self._file_watch: Optional[FileWatch] = None

    def __repr__(self) -> str:
        return f"<Listener {self.config.name} {self.address} {self._state}>"

    @property
    def tls_context(self) -> Any:
        """The pyOpenSSL context this listener serves TLS with (implicit or STARTTLS), or None without ``ssl``."""
        return self._tls_context

    def _current_tls_context(self) -> Any:
        return self._tls_context

    def reload_tls(self) -> bool:
        """Read the certificate and key files again: new handshakes use them, live connections go on.

        What SIGHUP does to a CLI server. A new pair that cannot be used (an
        unreadable file, a key that does not match) leaves the old one in
        place and is logged with its reason; returns whether the new one is
        in place (False too without TLS).
        """
        tls = self.config.ssl
        if tls is None:
            return False
        assert isinstance(tls, TLSConfig)  # ListenerConfig.__post_init__ turned a mapping into one
        from .tls import build_server_context

        try:
            context = build_server_context(tls, self.config.name)
        except TLSError as exc:
            log.error("%s: cannot use the new certificate, so the old one stays: %s", self.config.name, exc)
            return False
        self._tls_context = context  # one reference swap: each handshake reads it once, at its start
        log.info("%s: TLS certificate reloaded from %s; new handshakes use it", self.config.name, tls.certfile)
        return True

    @property
    def broker(self) -> LocalBroker:
        """The session broker of ``config.broker`` (in-process by default), opened on first use, closed at stop.

        For handlers that deliver to other connections (``conn.listener.broker``):
        chat rooms, presence, relays. See ``broker.LocalBroker``.
        """
        with self._broker_lock:
            if self._broker is None:
                self._broker = open_broker(self.config.broker)
                if self.config.processes > 1 and not shares_sessions(self.config.broker):
                    log.warning("%s: each of the %d worker processes keeps its own sessions: users on different "
                                "processes cannot see or reach each other; set broker (--broker "
                                "redis://HOST:PORT/DB) to share them", self.config.name, self.config.processes)
            return self._broker

    def take_broker(self, old: "Listener") -> None:
        """Share ``old``'s broker (same ``broker`` setting): a reload's generations then reach each other's users.

        Call before :meth:`start`. The old listener no longer closes it at
        its stop; this one does. Without this, users still on the old
        generation of an in-process broker could not see those on the new.
        """
        if self.config.broker != old.config.broker:
            return
        broker = old.broker  # opened now if no connection needed it yet: both must use the same one
        old._broker_handed_on = True
        with self._broker_lock:
            self._broker = broker

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> "Listener":
        """Bind, then start the acceptors. Returns at once; raises ListenError on bind failure."""
        with self._gate:
            if self._state != "new":
                raise RuntimeError(f"listener {self.config.name} was already started")
            self._open_socket()
            self._spare.open()
            self._state = "running"
        self._started_at = time.monotonic()
        tls = self.config.ssl
        assert tls is None or isinstance(tls, TLSConfig)  # ListenerConfig.__post_init__ turned a mapping into one
        if tls is not None and tls.reload_interval is not None:
            self._file_watch = FileWatch(tls.files(), tls.reload_interval, self.reload_tls,
                                         name=self.config.name).start()
        for loop in self._loops:
            loop.start()
        for acceptor in self._acceptors:
            acceptor.thread.start()
        c = self.config
        log.info(
            "%s listening on %s (io=%s, acceptors=%d, max_connections=%d, overflow=%s, framing=%s, "
            "max_message_size=%d, idle_timeout=%s, tls=%s%s)",
            c.name, self.address, f"{c.io} x{c.io_threads}" if c.io_threads > 1 else c.io,
            c.acceptors, c.max_connections, c.overflow,
            c.framing if isinstance(c.framing, str) else getattr(c.framing, "__name__", "custom"),
            c.max_message_size, "none" if c.idle_timeout is None else f"{c.idle_timeout:g}s",
            "off" if tls is None else f"on ({tls.describe()})",
            f", broker={redact_url(c.broker)}" if shares_sessions(c.broker) else "",
        )
        return self

    def _open_socket(self) -> None:
        if self._given_sock is not None:
            sock = adopt_listening_socket(self._given_sock, self.config)
            name = sock.getsockname()
            if isinstance(name, str):
                self._unix_path = name  # not ours to remove: _unix_inode stays None
            else:
                self._unix_path = None
                self.port = name[1]
            self._sock = sock
            return
        sock = open_listening_socket(self.config, port=self.port)
        self._sock = sock
        if self.config.unix is not None:
            self._unix_inode = os.lstat(self.config.unix).st_ino
        else:
            self.port = sock.getsockname()[1]

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._unix_path is not None and self._unix_inode is not None:
            remove_unix_socket(self._unix_path, self._unix_inode)
            self._unix_inode = None

    @property
    def address(self) -> str:
        """Where it listens: ``host:port`` (with the real port once bound) or the UNIX path."""
        if self._unix_path is not None:
            return self._unix_path
        host = self.config.host
        if self._given_sock is not None and self.port is not None:
            host = self._given_sock.getsockname()[0]
        return format_address((host, self.port if self.port is not None else self.config.port))

    def stop(self, grace: float = 5.0) -> "ListenerInfo":
        """Stop accepting at once, tell live connections to quit, force-close after ``grace``.

        Connections get a quit (their running handler finishes and its replies
        go out); whatever is still open after ``grace`` seconds is aborted.
        Every thread the listener started is joined before this returns
        (except one stuck in user code past the force-close, which is logged).
        Safe to call more than once and from several threads.
        """
        return self._stop(grace, "server_stop", patient=False)

    def retire(self, grace: float = 5.0) -> "ListenerInfo":
        """Stop as one generation of a rolling reload: the next one already accepts on the same socket.

        Stops accepting (a shared socket is left as it is; its queued clients
        go to the next generation), lets live connections end by themselves
        for up to ``grace`` seconds, then closes the rest gracefully with the
        reason ``reload`` (their handlers finish and their replies go out),
        and aborts only what is still open a second later. A connection
        accepted in the moment before the acceptors left is served, not cut.
        """
        return self._stop(grace, "reload", patient=True)

    def stop_accepting(self) -> None:
        """Take no new clients; live connections go on. Returns once every acceptor has left.

        The first step of :meth:`retire` (and of :meth:`stop`), for a caller
        that must know the old generation takes nobody any more before it
        says a reload is done. A shared socket is left as it is.
        """
        with self._gate:
            if self._state not in ("running", "suspended"):
                return
            self._state = "draining"
            self._gate.notify_all()
        self._stop_accepting()
        self._close_socket()

    def _stop(self, grace: float, reason: str, *, patient: bool) -> "ListenerInfo":
        with self._gate:
            first = self._state not in ("stopping", "stopped")
            if first:
                was_running = self._state in ("running", "suspended")
                self._state = "stopping"
                self._gate.notify_all()
        if not first:
            self._stopped.wait()
            return self.info()
        self._stop_event.set()
        self._admission.close()
        if self._file_watch is not None:
            self._file_watch.stop()
        if was_running:
            self._stop_accepting()
        self._close_socket()

        deadline = time.monotonic() + grace
        if patient and not self._wait_drained(deadline):
            deadline = time.monotonic() + FORCE_CLOSE_WAIT
        for conn in self.connections():
            conn.close(reason, graceful=True)
        if not self._wait_drained(deadline):
            stuck = self.connections()
            log.warning("%d connection(s) still open after the %gs grace; forcing them closed", len(stuck), grace)
            for conn in stuck:
                conn.close(reason)
            self._wait_drained(time.monotonic() + FORCE_CLOSE_WAIT)
        for loop in self._loops:
            loop.stop()
        self._join_connection_threads(time.monotonic() + FORCE_CLOSE_WAIT)
        if self.workers is not None:
            self.workers.stop(drain=True, timeout=FORCE_CLOSE_WAIT)
        for loop in self._loops:
            if not loop.join(FORCE_CLOSE_WAIT):
                log.warning("I/O loop %d of %s still running user code after stop", loop.index, self.config.name)

        self._spare.close()
        if self._broker is not None and not self._broker_handed_on:
            self._broker.close()  # after the connections: each on_close could still unregister
        with self._gate:
            self._state = "stopped"
            self._gate.notify_all()
        self._stopped.set()
        info = self.info()
        log.info("%s stopped after %.1fs: %s", self.config.name, self.uptime(), info.summary())
        return info

    def _stop_accepting(self) -> None:
        # shutdown() on a listening socket wakes every thread blocked in its
        # accept() (EINVAL on Linux); close only once they are all out, so the
        # descriptor number cannot be reused under a thread still in accept().
        # A shared socket is not ours to shut down: its acceptors leave within
        # ACCEPT_WAKE (sockets.py).
        self._wake_acceptors()
        current = threading.current_thread()
        for acceptor in self._acceptors:
            if acceptor.thread is not current and acceptor.thread.ident is not None:
                acceptor.thread.join(timeout=5.0)
                if acceptor.thread.is_alive():
                    log.error("acceptor thread %s did not exit", acceptor.thread.name)

    def _wake_acceptors(self) -> None:
        sock = self._sock
        if sock is not None and self._given_sock is None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _wait_drained(self, deadline: float) -> bool:
        with self._drained:
            while self._conns:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._drained.wait(remaining)
        return True

    def _join_connection_threads(self, deadline: float) -> None:
        stuck = self._conn_threads.stop(deadline)
        if stuck:
            log.warning("%d connection thread(s) still running user code after stop; not waiting for them", stuck)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the listener has stopped; True if it has."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def suspend(self) -> None:
        """Stop accepting; live connections go on. New clients are refused by the kernel.

        As Ranch's ``suspend_listener``, the listening socket is closed, so the
        port is free until :meth:`resume` binds it again. A listener given its
        socket closes only its duplicate: clients keep queueing on the socket
        (other holders may take them) until :meth:`resume`.
        """
        with self._gate:
            if self._state != "running":
                return
            self._state = "suspended"
            self._wake_acceptors()
            while self._in_accept or self._draining:
                self._gate.wait()
            self._close_socket()
        log.info("%s suspended: no longer accepting on %s", self.config.name, self.address)

    def resume(self) -> None:
        """Accept again on the same address after :meth:`suspend`."""
        with self._gate:
            if self._state != "suspended":
                return
            self._open_socket()
            self._state = "running"
            self._gate.notify_all()
        log.info("%s resumed: accepting on %s", self.config.name, self.address)

    def set_max_connections(self, n: int) -> None:
        """Change the limit while running. Lowering it never closes live connections."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_connections must be a whole number of at least 1, got {n!r}")
        self._admission.set_max_connections(n)

    @property
    def state(self) -> str:
        return self._state

    def uptime(self) -> float:
        return time.monotonic() - self._started_at if self._started_at else 0.0

    def connections(self) -> list[Connection]:
        """The open connections, counted or not (a snapshot)."""
        with self._lock:
            return list(self._conns.values())

    def info(self) -> ListenerInfo:
        admission = self._admission
        with self._lock:
            refused = dict(self._refused)
            closed = dict(self._closed)
            admitted = self._admitted
            open_count = len(self._conns)
            bytes_in = self._bytes_in + sum(c.bytes_in for c in self._conns.values())
            bytes_out = self._bytes_out + sum(c.bytes_out for c in self._conns.values())
        n_refused = sum(refused.values())
        return ListenerInfo(
            name=self.config.name,
            state=self._state,
            address=self.address,
            live=admission.live,
            open=open_count,
            max_connections=admission.max_connections,
            ceiling=admission.ceiling,
            accepted=admitted + n_refused,
            admitted=admitted,
            refused=n_refused,
            closed=sum(closed.values()),
            errors=sum(v for k, v in closed.items() if k in ERROR_REASONS),
            grown=admission.grown,
            handoffs=sum(loop.handoffs for loop in self._loops),
            offloads=sum(loop.offloads for loop in self._loops),
            threaded_calls=sum(loop.threaded_calls for loop in self._loops),
            refused_by_reason=refused,
            closed_by_reason=closed,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            accepted_by_acceptor=tuple(a.accepted for a in self._acceptors),
        )

    # -- called by acceptors ---------------------------------------------------

    def _enter_accept(self) -> Optional[socket.socket]:
        """Wait while suspended; return the socket to accept on, or None when stopping."""
        with self._gate_lock:
            if self._state == "running" and not self._draining:
                self._in_accept += 1
                return self._sock
        with self._gate:
            while self._state == "suspended" or self._draining:
                self._gate.wait()
            if self._state != "running":
                return None
            self._in_accept += 1
            return self._sock

    def _leave_accept(self) -> None:
        with self._gate_lock:
            self._in_accept -= 1
            # Waiters set the state or _draining before they wait, under this lock.
            if not self._in_accept and (self._state != "running" or self._draining):
                self._gate.notify_all()

    def _accepting_on(self, sock: socket.socket) -> bool:
        return self._state == "running" and self._sock is sock

    def _admit(self, client: socket.socket, peer: Any, acceptor: int, *, reserved: bool) -> None:
        admitted, alarm_due = self._admission.admit(reserved)
        if not admitted:
            self._refuse(client, "limit")
            return
        peer = peer if peer else self._unix_path
        loop = self._loops[self._next_loop % len(self._loops)]
        self._next_loop += 1
        conn = LoopConnection(client, peer, listener=self, acceptor=acceptor, encode=self._encode,
                                      send_timeout=self.config.send_timeout, release=self._admission.release,
                                      loop=loop, alarm_due=alarm_due)
        with self._lock:
            self._conns[conn.id] = conn
            self._admitted += 1
        loop.add(conn)

    def _refuse(self, client: socket.socket, reason: str) -> None:
        message = self.config.refuse_message
        # Never plaintext on a TLS port: a TLS client would read it as a broken
        # record (WRONG_VERSION_NUMBER) instead of a clean close.
        if message and reason == "limit" and not self._tls_implicit:
            # Best effort and never blocking: the acceptor must not wait on a client.
            client.setblocking(False)
            try:
                client.send(message)
            except OSError:
                pass
        # Counted before the close, so a client that sees the close finds it counted.
        with self._lock:
            self._refused[reason] += 1
        if self._tls_implicit:
            # A FIN, then what the client already sent (its ClientHello) read
            # away without waiting: closing over unread bytes would send a
            # reset, and a TLS client should see a clean end of the stream.
            client.setblocking(False)
            try:
                client.shutdown(socket.SHUT_WR)
                while client.recv(65536):
                    pass
            except OSError:
                pass
        client.close()
        if reason == "limit":
            self._refusals(
                logging.WARNING,
                "%s refusing connections: max_connections=%d reached (overflow=%s)",
                self.config.name, self._admission.max_connections, self.config.overflow,
            )

    def _out_of_descriptors(self, sock: socket.socket, exc: OSError) -> int:
        """accept() failed for want of a descriptor: close every pending client through the spare.

        Called by an acceptor *after* it left accept(). While it runs no other
        acceptor may enter accept(): accept() reserves its descriptor before it
        blocks, so one that entered would take the slot the spare frees and the
        spare could not be reopened. Returns how many clients were closed.
        """
        self._fd_log(
            logging.WARNING,
            "%s: accept() failed: %s; closing pending clients until descriptors free up "
            "(raise the open-file limit, ulimit -n, or lower max_connections)",
            self.config.name, exc.strerror or exc,
        )
        with self._gate:
            if self._draining or not self._accepting_on(sock):
                return 0  # another acceptor is already doing this, or we are stopping
            self._draining = True
            # An acceptor still inside accept() either holds a descriptor of its
            # own (it will take the next client itself) or is about to fail too.
            deadline = time.monotonic() + 0.1
            while self._in_accept and (remaining := deadline - time.monotonic()) > 0:
                self._gate.wait(remaining)
            idle = not self._in_accept
        drained = 0
        try:
            if idle:
                # refused: counted before it is closed
                drained = self._spare.drain(sock, self.config.backlog, lambda c: self._refuse(c, "no_descriptors"))
        finally:
            with self._gate:
                self._draining = False
                self._gate.notify_all()
        return drained

    # -- called on the threads serving connections -----------------------------

    def _fire_alarm(self) -> None:
        callback = self.config.on_alarm
        if callback is None:
            return
        assert not isinstance(callback, str)  # ListenerConfig.__post_init__ imported what a "module:attr" string names
        try:
            callback(self, self._admission.live)
        except Exception:
            log.exception("%s: on_alarm callback raised", self.config.name)

    def _connection_closed(self, conn: Connection, reason: str, counted: bool) -> None:
        """``on_close``, the counters, the slot: once per connection, after its descriptor is closed."""
        if self.config.on_close is not None:
            try:
                # Callable: __post_init__ imported what a "module:attr" string names (mypy sees the field's str).
                self.config.on_close(conn, reason)  # type: ignore[operator]
            except Exception:
                log.exception("on_close raised for connection %d", conn.id)
        with self._lock:
            self._conns.pop(conn.id, None)
            self._closed[reason] += 1
            self._bytes_in += conn.bytes_in
            self._bytes_out += conn.bytes_out
            if not self._conns:
                self._drained.notify_all()
        if counted:
            self._admission.release()


def _at_once(conn: Connection, reason: str, then: Callable[[], None]) -> None:
    """Without workers no call is ever queued: a connection closes as soon as its read path ends."""
    then()


def start_listener(config: ListenerConfig | Mapping[str, Any], *, sock: Optional[socket.socket] = None) -> Listener:
    """Validate ``config`` (a ListenerConfig or a dict of the same keys), bind and start serving.

    Returns the running :class:`Listener` at once; its acceptor threads are
    already accepting. Raises ConfigError for a bad setting and ListenError
    when the address cannot be bound, before any thread starts.

    ``sock``, an already listening socket (from a supervisor, from systemd's
    socket activation, or shared with another listener), is served instead
    of binding ``config``'s address; the caller keeps it open and closes it.
    """
    return Listener(ListenerConfig.coerce(config), sock=sock).start()
