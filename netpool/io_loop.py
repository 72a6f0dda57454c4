"""The read path of both I/O modes: a few epoll loops read many connections, and run their handlers.

Acceptors stay blocking threads, as the design says; what changes is who
reads. Each admitted connection goes to one of ``io_threads`` loops, which
waits on epoll for every connection it owns and runs the handler inline, in
order per connection, on the loop thread. No thread per connection, so tens
of thousands of mostly idle clients cost a few hundred bytes each.

The handler's view does not change: the same :class:`Connection` API,
``send`` still whole-message-or-error and thread-safe. A send the kernel
cannot take at once is queued and flushed when the socket turns writable. A
sender on another thread (a worker, say) waits, up to ``send_timeout``, once
more than ``HIGH_WATER`` bytes are queued; a handler on the loop thread never
waits for a peer: past ``LOOP_QUEUE_LIMIT`` queued bytes its connection is
closed (``send_overflow``). Either way a client that stops reading cannot
grow memory without bound, and in the loop's case cannot stall the others.

In events mode (``io="events"``) handlers run on the loop thread, so a
handler that blocks (sleeps, long computation) holds up every connection of
its loop: such handlers belong in thread mode (below) or on a worker pool
(``workers=N``).

Every event is served by ``_serve_events`` (recv, framer, handler; new
connections, their PROXY header and TLS handshake (``handshake``), flushing),
in the order the events came in. That Python defines the behaviour. Where
the C hot path was built (``hot_path``), plain reads of raw-framed
connections (over TLS or not, nothing queued) take it instead: recv or
SSL_read, the handler, its send, in a few thousand machine instructions
(about 15,000 over TLS), stopping at the first event that needs the rest.

Timeouts (idle, send, TLS handshake) are swept by each loop about four times
per shortest timeout, so they fire within a quarter of their length late.

Thread mode (``io="threads"``, the default) runs on the same loop with one
difference, the one Go's scheduler makes for goroutines: handlers may block.
Every inline call is timed. One slower than OFFLOAD_AFTER (50 µs) whose
thread gave the CPU up for that long (it slept or waited), or one that ran
on the CPU for OFFLOAD_LONG (250 µs, a hash computed without the GIL, say), has its
connection *offloaded*: it moves from the loop's epoll to a second, one-shot
epoll that the loop's handler threads wait on, one event each
(``handler_threads``: only as many threads as calls run at once). The
thread that takes a connection's event reads it, runs its calls in order,
reads on while data is there (as a connection thread would), then arms it
again (``IOLoop._run_calls``), so a message costs one thread wake-up. After INLINE_AFTER
quick calls in a row the connection comes back inline. While the latest
timed call says the handler blocks, connections without a quick call of
their own are offloaded at their first event, so many connections blocking
at once run concurrently instead of each holding the loop once.

The bound on holding the loop up: a connection's first blocking call (or
its first after it came back) runs inline, for its own length, and no
longer than HANDOFF_AFTER plus a monitor tick: a monitor thread watches for
a call still running after HANDOFF_AFTER, takes its connection out of the
loop and hands the loop to another thread; a call about to wait on its
peer (a full send window, a STARTTLS handshake) hands off at once. The
thread stuck in the call finishes it (``IOLoop._carry_on``) and gives the
connection back, offloaded. Sends in thread mode block while the
peer's window is full (``send_timeout``), as a connection thread's would.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import select
import socket
import threading
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any, Optional

from . import hot_path
from .connection import Connection
from .deadline import poll_until
from .errors import ConnectionClosed, SendTimeout, TLSError
from .handshake import Handshake
from .handler_threads import ARMED, HANDLER_THREADS, HandlerThreads
from .hot_path import OFFLOAD_AFTER, blocked_since_mark, mark, recv_nowait, wait_for_client
from .close_reasons import reason_for, recv_failed
from .config import format_address

if TYPE_CHECKING:  # pragma: no cover
    from .services import ConnectionServices

__all__ = ["IOLoop", "LoopConnection", "HIGH_WATER", "HANDOFF_AFTER", "RECV_SIZE"]

log = logging.getLogger("netpool.io_loop")

# Receive at most this much per recv: large enough for bulk transfers, small
# enough that an idle-but-chatty connection does not pin a large buffer.
RECV_SIZE = 65536

# Bytes queued in user space (beyond what the kernel holds) before a sender
# has to wait for the peer to read.
HIGH_WATER = 256 * 1024

# What a handler running on the loop thread may queue for one peer before
# the connection is closed (send_overflow): the loop cannot wait for a peer.
LOOP_QUEUE_LIMIT = 4 * 1024 * 1024

# Thread mode: how long a handler call may hold its loop before the loop
# moves to another thread. Short enough that a blocking handler delays the
# other connections by a few milliseconds. Each tick wakes the monitor for
# the GIL; whether 500 a second cost a busy loop measurable throughput was
# not settled within this machine's 10-20% run-to-run noise.
HANDOFF_AFTER = 0.002
# An idle loop is checked less often: the first blocking call after a quiet
# spell is caught within about twice this.
HANDOFF_IDLE_TICK = 0.02

# A monitor tick this late means the whole process stood still (no CPU, or
# one call held the interpreter lock), which is logged: handshakes and
# clients time out meanwhile, and the log should say it was not their fault.
STALL_WARNING = 1.0

# Calls in a row that are all quicker than OFFLOAD_AFTER bring an offloaded
# connection back to its loop, so a handler that blocked once (a cold cache)
# does not pay a thread switch per message for ever. Each time a connection
# that came back blocks again, it must prove itself twice as long.
INLINE_AFTER = 16
# How many times an offloaded connection's thread reads on by itself before
# it arms the connection again and takes the next event (_run_calls).
READ_AHEAD = 64
# Once its calls are over, an offloaded connection's thread waits up to STICK
# seconds for the client's next message (as a thread per connection would:
# one wake-up, no epoll round trip), while another handler thread covers the
# other connections; the wait ends as soon as another connection's event
# finds no thread waiting, so with more connections than threads each takes
# its turn. A client slower than STICK is not waited on for its next
# STICK_SKIP chances (about one a message).
STICK = 0.002
STICK_SKIP = 16
# While the loop serves connections of its own (it had one's event within
# LOOP_QUIET seconds), a thread waits on its client STICK_WAITS times a turn
# at most: the threads then leave the loop more of the CPU and of the GIL
# (with no cap, the quick half of the mixed benchmark had twice the p99:
# 6.4 against 3.0 ms, median of 14 runs). With every connection offloaded
# a turn lasts up to READ_AHEAD reads (0.1 ms handlers on 50 connections:
# 20% more messages a second than with the cap).
STICK_WAITS = 8
LOOP_QUIET = 0.01
# A connection with quick calls behind it is offloaded at its second slow
# call within this many seconds (one alone may be a wait for the GIL).
SECOND_STRIKE = 0.1
_EPOLLOUT = select.EPOLLOUT
READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_IN = select.EPOLLIN | select.EPOLLRDHUP
_IN_OUT = _IN | select.EPOLLOUT
# Reasons a connection ends without its queued replies: its peer cannot or will not take them.
NO_LINGER = frozenset(("reset", "tls_error", "send_error", "send_timeout", "send_overflow", "outbox_overflow"))


class LoopConnection(Connection):
    """The Connection an :class:`IOLoop` serves, the one class the listener builds: non-blocking socket, the loop's bookkeeping.

    The I/O modes differ in what a send does with bytes the kernel cannot
    take at once, and that is the loop's policy (``IOLoop.handoff``): events
    mode queues them, flushed when the socket turns writable (the loop
    thread never waits for a peer); thread mode waits for the peer, up to
    ``send_timeout``, on whatever thread sends, as a connection thread's
    send would, and first hands the loop to another thread when that is the
    loop thread (``_about_to_wait``). Framed or raw is the ``encode`` it was
    given (None: a message is its bytes).
    """

    __slots__ = ("_loop", "_out", "_out_deadline", "_framer", "_last_read", "_setup", "_alarm_due", "_fd",
                 "_offloaded", "_busy", "_quick", "_proven", "_inline_after", "_away", "_struck", "_stick_skip",
                 "_posted", "_posted_bytes", "_post_due")

    def __init__(self, *args: Any, loop: "IOLoop", alarm_due: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop = loop
        sock = self.transport.socket
        sock.setblocking(False)  # TCP_NODELAY it has from the listening socket
        self._fd = sock.fileno()  # what the loop's epoll and table know it by
        self._out: Optional[bytearray] = None
        self._out_deadline = 0.0
        self._framer: Any = None
        self._last_read = 0.0
        # Not talking yet: its PROXY header or TLS handshake is being read (a handshake.Handshake).
        self._setup: Optional[Handshake] = None
        self._alarm_due = alarm_due  # admitting it crossed the alarm threshold: on_alarm runs before on_connect
        # Thread mode: its handler calls run on the listener's threads, not on
        # the loop (_offloaded); one is running or queued there now (_busy),
        # and so many in a row were quick (_quick).
        self._offloaded = False
        self._busy = False
        self._quick = 0
        # A call of its own ran inline and was quick: it stays on the loop
        # whatever other connections' calls do (see IOLoop.offload_new).
        self._proven = False
        self._inline_after = INLINE_AFTER  # quick calls on threads before it comes back (grows if it flaps)
        self._away = False  # registered with the handler threads' epoll, not the loop's
        self._struck = 0.0  # when a slow call of this (proven) connection was last let pass
        self._stick_skip = 0  # chances left before a handler thread waits on it again (STICK_SKIP)
        # The outbox (post): messages posted and not yet moved to _out by the
        # loop, their size, and whether the loop has it in its pump queue;
        # all three under the loop's post lock.
        self._posted: Optional[list[bytes]] = None
        self._posted_bytes = 0
        self._post_due = False

    send = Connection.send  # the C hot path replaces both (hot_path.install)

    def post(self, message: bytes) -> bool:
        encode = self._encode
        data = encode(message) if encode is not None else message
        loop = self._loop
        with loop._post_lock:
            if self._wr_closed or loop._wake_fd < 0:
                return False
            out = self._out
            if self._posted_bytes + len(data) + (len(out) if out else 0) <= loop._outbox_limit:
                posted = self._posted
                if posted is None:
                    self._posted = [data]
                else:
                    posted.append(data)
                self._posted_bytes += len(data)
                if not self._post_due:
                    self._post_due = True
                    to_pump = loop._to_pump
                    first = not to_pump  # one wake-up for a whole fan-out
                    # Queued before the wake-up: a loop woken in between must find it.
                    to_pump.append(self)
                    if first:
                        os.eventfd_write(loop._wake_fd, 1)
                return True
        if self._request_close("outbox_overflow", socket.SHUT_RDWR):
            log.warning("%s: connection %d from %s left more than %d bytes of posted messages unread; "
                        "closed (outbox_overflow)", loop.services.config.name, self.id,
                        format_address(self.peer), loop._outbox_limit)
        return False

    def _pump(self) -> Optional[bool]:
        """Move what was posted behind the queue (_out) and send what the kernel takes, never waiting (loop thread).

        True once everything is written; False if the peer must read first
        (the rest waits in _out, within ``send_timeout`` like any queued
        send); None if a sender held the send lock (a thread-mode send
        waiting for this same peer, a worker's send): the loop tries again.
        The send lock keeps posted messages whole between the connection's
        own sends.
        """
        lock = self._send_lock
        got = lock.acquire(blocking=False)
        with self._loop._post_lock:
            posted = self._posted
            if not got:
                return None  # stays due, and queued
            self._posted = None
            self._posted_bytes = 0
            self._post_due = False
        try:
            if self._wr_closed:
                return True
            if posted:
                data = posted[0] if len(posted) == 1 else b"".join(posted)
                self.bytes_out += len(data)  # counted once queued; _finish takes back what never went out
                out = self._out
                if out:
                    out += data
                else:
                    self._out = bytearray(data)
                    self._out_deadline = time.monotonic() + self._send_timeout
            return self._flush()
        except ConnectionClosed:
            return True  # the reason is recorded; its reads end it
        finally:
            lock.release()

    def send_bytes(self, data: bytes) -> None:
        with self._send_lock:
            if self._wr_closed:
                raise ConnectionClosed(f"connection {self.id} is closed ({self.close_reason})")
            if self._out:
                self._send_later(data, 0)  # keep order behind what is already queued
                return
            # The common case: one send the kernel takes whole (_send_now,
            # inlined: the pure-Python build's busiest call).
            try:
                sent = self.transport.send_nowait(data)
            except BlockingIOError:
                sent = 0
            except TLSError as exc:
                self._tls_send_failed(exc)
            except OSError as exc:
                self._send_failed(exc)
            if sent == len(data):
                self.bytes_out += len(data)
            else:
                self._send_later(data, sent)

    _send_bytes_py = send_bytes  # what the C send_bytes falls back on

    def _send_later(self, data: bytes, sent: int) -> None:
        """What the kernel (or, for TLS, SSL_write) did not take at once (lock held): wait for it, or queue it."""
        if self._loop.handoff:
            # Thread mode: wait for the peer on this thread, behind whatever
            # posted messages the loop could not write yet (_out).
            self.bytes_out += sent  # gone already, whatever happens to the rest
            if self._out:
                self._about_to_wait()
                self._drain_to(0)
            self._send_rest(memoryview(data)[sent:])  # counts what went out if it times out
            self.bytes_out += len(data) - sent
            return
        # Events mode: the loop flushes the queue when the socket turns writable.
        self.bytes_out += len(data)  # counted once queued; _finish takes back what never went out
        out = self._out
        if out:
            out += memoryview(data)[sent:]
        else:
            self._out = out = bytearray(memoryview(data)[sent:])
            self._out_deadline = time.monotonic() + self._send_timeout
            self._loop.watch_writable(self, True)
        if len(out) > HIGH_WATER:
            if threading.current_thread() is not self._loop.thread:
                self._drain_to(HIGH_WATER)  # another thread may wait for the peer
            elif len(out) > LOOP_QUEUE_LIMIT:
                # The loop thread must never wait on one peer (every other
                # connection of the loop would wait with it): past the
                # limit the connection goes, not the loop's time.
                self._request_close("send_overflow", socket.SHUT_RDWR)
                raise SendTimeout(
                    f"connection {self.id}: peer {self.peer!r} left more than {LOOP_QUEUE_LIMIT} bytes "
                    "unread; closed (send_overflow: an event-loop handler cannot wait for it)"
                )

    def _send_now(self, data: "bytes | memoryview") -> int:
        """Send what the kernel takes now; 0 if nothing. Closes the connection on an error."""
        try:
            return self.transport.send_nowait(data)
        except BlockingIOError:
            return 0
        except TLSError as exc:
            self._tls_send_failed(exc)
            raise  # unreachable: _tls_send_failed raises
        except OSError as exc:
            self._send_failed(exc)
            raise  # unreachable: _send_failed raises

    def _flush(self) -> bool:
        """Send queued bytes (lock held by the caller); True when the queue is empty."""
        out = self._out
        if not out:
            return True
        view = memoryview(out)
        total = 0
        try:
            while total < len(out):
                sent = self._send_now(view[total:])
                if not sent:
                    break
                total += sent
        except BaseException:
            if total:  # what did go out leaves the queue (for _finish's count), as a copy: see below
                self._out = out[total:]
            raise
        finally:
            view.release()
        # Not in the finally: a send that failed has closed the connection, so nothing queued
        # goes out any more, and the traceback on its way up still holds slices of the view (in
        # the frames it passed through, pyOpenSSL's among them), which keep ``out`` from being
        # resized: the BufferError would replace the ConnectionClosed and end the loop thread.
        if total:
            del out[:total]
            self._out_deadline = time.monotonic() + self._send_timeout
        if out:
            return False
        self._out = None
        return True

    def _start_setup(self, services: "ConnectionServices", deadline: float) -> None:
        """Begin the PROXY header and TLS handshake the listener asks of it (handshake.Handshake), if any."""
        context = services.tls_context() if services.tls_implicit else None
        if services.proxy_versions or context is not None:
            self._setup = Handshake(self, self.transport.socket, proxy_versions=services.proxy_versions,
                                    proxy_trusted=services.proxy_trusted, tls_context=context, deadline=deadline)

    def _setup_step(self) -> int:
        """Take the set-up as far as the bytes that came allow: 0 once it can talk, else the poll event to wait for."""
        setup = self._setup
        assert setup is not None
        try:
            wanted = setup.step()
        except BaseException:
            self._setup = None
            raise
        if wanted:
            return wanted
        self._setup = None
        if setup.session is not None:
            self._use_tls(setup.session)
        return 0

    def _request_close(self, reason: str, how: int) -> bool:
        """As Connection's, except in events mode with replies queued: they go out before the FIN.

        send() took them (the kernel had no room yet), so close() must not
        drop them: reads stop now and no send is taken any more, but the FIN
        (and a TLS close_notify) waits until the loop has delivered the queue,
        within send_timeout (IOLoop._linger). A second close() aborts.
        """
        if (how == socket.SHUT_RDWR and self._out and not self._wr_closed and not self._loop.handoff
                and reason not in NO_LINGER):
            first = super()._request_close(reason, socket.SHUT_RD)
            self._stop_taking_sends(reason)
            return first
        return super()._request_close(reason, how)

    def _stop_taking_sends(self, reason: str) -> None:
        """No send is taken any more; ``reason`` becomes the close reason unless there is one (IOLoop._linger).

        Recorded now rather than by _finish: the C dispatch leaves a closing connection to the loop.
        """
        with self._state_lock:
            self._wr_closed = True
            if self.close_reason is None:
                self.close_reason = reason

    def _flush_last(self) -> None:
        """Last chance for queued replies and posted messages (a handler that sent, then closed), unless a sender is at it."""
        if self._out or self._posted:
            self._pump()

    def _flush_writable(self) -> bool:
        """The socket turned writable: send what is queued; True once nothing is (a sender at it: False)."""
        if not self._send_lock.acquire(blocking=False):
            return False  # a sender holding the lock is flushing already; never wait for it here
        try:
            return self._flush()
        except ConnectionClosed:
            return False  # the reason is recorded; the read side ends it
        finally:
            self._send_lock.release()

    def _finish(self, reason: str) -> Optional[tuple[str, bool]]:
        """The owner's last step (its loop's, or the thread the loop left it to): close the descriptor, once.

        Returns the final reason and whether the connection still held a slot
        (the caller gives it back after ``on_close``), or None if the
        connection had already finished.
        """
        with self._state_lock:
            if self._finished:
                return None
            self._finished = True
            self._wr_closed = True
            if self.close_reason is None:
                self.close_reason = reason
            reason = self.close_reason
            counted, self._counted = self._counted, False
        sock = self.transport.socket
        if reason not in ("reset", "tls_error"):
            self.transport.told_to_close(True)  # TLS: close_notify, without waiting for the peer's
            if self._quitting:
                self.transport.end_with_fin()
        # Nobody may be inside send() when the descriptor goes. A sender
        # holding the lock may be waiting for the peer: shutdown() wakes it,
        # and it lets go. With the lock free, close() alone does (one system
        # call fewer per connection).
        lock = self._send_lock
        if not lock.acquire(blocking=False):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            lock.acquire()
        try:
            sock.close()
            unsent = len(self._out) if self._out else 0
            self._out = None
        finally:
            lock.release()
        if unsent:
            # Events mode: replies queued for a peer that had not read them go with the
            # connection. They were counted as sent when queued; the count is made true and the
            # loss said, unless the reason says it already (a peer that stopped reading or left).
            self.bytes_out -= unsent
            if reason not in NO_LINGER:
                log.warning("connection %d from %s: closed (%s) with %d bytes of replies still queued for a peer "
                            "that had not read them; they were not delivered", self.id, format_address(self.peer),
                            reason, unsent)
        return reason, counted

    def _about_to_wait(self) -> None:
        # Thread mode: a wait on the peer is coming (a full window, a
        # STARTTLS handshake). When this runs inside the loop's current call,
        # hand the loop off now instead of holding it until the monitor's
        # next tick, as Go's entersyscallblock does.
        loop = self._loop
        calls = loop._calls
        if loop.handoff and calls and calls[-1] is self and loop.thread is threading.current_thread():
            loop._hand_off(loop.call_count, by_monitor=False)

    def _drain_to(self, limit: int) -> None:
        """Wait (lock held) until at most ``limit`` bytes are queued, or time out."""
        poller = select.poll()
        poller.register(self.transport.socket, select.POLLOUT)
        deadline = time.monotonic() + self._send_timeout
        while self._out and len(self._out) > limit:
            if self._flush():
                break
            if self._wr_closed:
                raise ConnectionClosed(f"connection {self.id} is closed ({self.close_reason})")
            if not poll_until(poller, deadline):
                raise self._send_timed_out()


class _HandedOff(BaseException):
    """Raised on a thread whose user call outlived HANDOFF_AFTER: another thread owns the loop now.

    It carries what that thread needs to go on serving the connection alone:
    messages framed but not yet handled, whether the stream had ended, the
    handler's exception if it raised, or ``done`` if nothing is left to do.
    A BaseException so that no ``except Exception`` on the way stops it.
    """

    def __init__(self, conn: LoopConnection, *, error: Optional[Exception] = None, pending: Any = (),
                 eof: bool = False, transport: Any = None, done: bool = False) -> None:
        super().__init__(conn.id)
        self.conn = conn
        self.error = error
        self.pending = pending
        self.eof = eof
        self.transport = transport
        self.done = done


class IOLoop:
    """One loop thread: epoll over the connections it owns, handlers inline.

    ``call_count``, ``offload_new``, ``stopping``, ``threaded_calls``,
    ``handed_off()`` and ``call_was_slow()`` are public because the C hot
    path (``hot_path``) uses them, as the Python here does.
    """

    def __init__(self, services: "ConnectionServices", index: int, *, handoff: bool = False) -> None:
        self.services = services
        self.index = index
        self.handoff = handoff
        # The user call (handler, hook) running on the loop thread: its
        # connection while it runs, and a count that changes with each call.
        # The loop pushes before and pops after; the monitor takes over by
        # popping first. list.append/pop are atomic, so exactly one wins.
        # Each owner brings a new list (see _serve).
        self._calls: list[LoopConnection] = []
        self.call_count = 0
        self._takeover_lock = threading.Lock()
        self.handoffs = 0
        self.offloads = 0  # connections moved to threads because a call held the loop up
        self.threaded_calls = 0  # handler and hook calls run on threads for offloaded connections
        # Whether connections with no quick inline call of their own yet
        # (not _proven: new ones, or ones that have not spoken) go to threads
        # at once: the latest call timed was slow on the loop (set by
        # call_was_slow), not quick on a thread (cleared by _calls_done).
        # So when many connections block at once, only the first call holds
        # the loop up, not one per connection.
        self.offload_new = False
        self._monitor: Optional[threading.Thread] = None
        self._ep = select.epoll()
        self._conns: dict[int, LoopConnection] = {}
        self._pending: collections.deque[LoopConnection] = collections.deque()
        # Thread mode: handed-off connections whose blocking call is over,
        # given back by their thread to be read by the loop again.
        self._returned: collections.deque[LoopConnection] = collections.deque()
        # Offloaded connections whose calls are over and that the loop must
        # finish, with the reason given (a handler thread leaves that to the
        # loop, which owns its table of connections and the on_close call).
        self._later: collections.deque[tuple[LoopConnection, str]] = collections.deque()
        # Thread mode: the threads that serve offloaded connections, and the
        # one-shot epoll they wait on (see "offloaded connections" below).
        self._crew: Optional[HandlerThreads] = None
        if handoff:
            self._crew = HandlerThreads(
                services.threads, most=max(1, HANDLER_THREADS // services.config.io_threads),
                name=f"{services.config.name}: I/O loop {index}", take_turn=self._take_turn,
                connections=self._conns.__len__)
        self._crew_fd = self._crew.fileno() if self._crew is not None else -1
        # Plain reads of raw-framed connections: a handler thread's whole turn in C.
        self._fast_turn = hot_path.offloaded_server() if services.raw_framing else None
        self._inline_at = 0.0  # when the loop last had an event of a connection of its own (STICK_WAITS)
        # An eventfd wakes the loop for new connections and for stop; epoll
        # watches it like any socket.
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, select.EPOLLIN)
        # The outboxes (post): connections with messages posted, for the loop
        # to write (_pump); those whose sender held the send lock, tried
        # again within a millisecond; and those waiting for the peer to read,
        # in an epoll of their own (one-shot EPOLLOUT) that the loop's epoll
        # watches like a socket, in both I/O modes and wherever the
        # connection is read (the loop, or its handler threads).
        self._post_lock = threading.Lock()
        self._to_pump: collections.deque[LoopConnection] = collections.deque()
        self._pump_retry: list[LoopConnection] = []
        self._outbox_ep = select.epoll()
        self._outbox_fd = self._outbox_ep.fileno()
        self._ep.register(self._outbox_fd, select.EPOLLIN)
        self._pumping: dict[int, LoopConnection] = {}
        # Events mode: connections that are ending while the loop delivers what is still queued
        # before the FIN (_linger), by descriptor, with their reason. Here, not in a slot: few
        # connections ever linger, and a slot would cost every idle one.
        self._lingering: dict[int, str] = {}
        self._outbox_limit = services.config.outbox_limit
        self.stopping = False
        config = services.config
        timeouts = [t for t in (config.idle_timeout, config.send_timeout, config.handshake_timeout) if t]
        self._sweep_every = max(0.01, min(1.0, min(timeouts) / 4))
        self._handler = services.handler
        self._raw = services.raw_framing
        # With raw framing a read is a message: no larger than a message may be.
        self._bufsize = min(RECV_SIZE, config.max_message_size) if services.raw_framing else RECV_SIZE
        self.thread = threading.Thread(target=self.run, name=f"netpool-io-{config.name}-{index}", daemon=True)
        if handoff:
            self._monitor = threading.Thread(target=self._watch, name=f"netpool-handoff-{config.name}-{index}",
                                             daemon=True)

    def start(self) -> None:
        if self._monitor is None:
            self.thread.start()
            return
        # Thread mode: the loop runs on a reusable connection thread, since
        # the thread running it may become a connection's own at any time.
        self.services.threads.submit(self.run)
        self._monitor.start()

    @property
    def idle_handler_threads(self) -> int:
        """Thread mode: handler threads waiting for offloaded connections' events (none of them busy)."""
        return self._crew.waiting() if self._crew is not None else 0

    def join(self, timeout: float) -> bool:
        """Wait for the loop's own threads (not handed-off connection threads); True if they ended."""
        thread = self._monitor if self._monitor is not None else self.thread
        if thread.ident is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # -- called from other threads ---------------------------------------------

    def add(self, conn: LoopConnection) -> None:
        """Hand a newly admitted connection to this loop (from an acceptor)."""
        self._pending.append(conn)
        os.eventfd_write(self._wake_fd, 1)

    def give_back(self, conn: LoopConnection) -> bool:
        """A handed-off connection's thread is done blocking: the loop reads it again. False if the loop is ending."""
        with self._takeover_lock:
            if self.stopping or self._wake_fd < 0:
                return False
            self._returned.append(conn)
            os.eventfd_write(self._wake_fd, 1)
        return True

    def stop(self) -> None:
        with self._takeover_lock:
            self.stopping = True
            if self._wake_fd >= 0:  # not yet closed by a loop that ended
                os.eventfd_write(self._wake_fd, 1)
        if self._crew is not None:
            self._crew.stop()  # idle handler threads leave at once

    def watch_writable(self, conn: LoopConnection, on: bool) -> None:
        try:
            self._ep.modify(conn._fd, _IN_OUT if on else _IN)
        except (OSError, ValueError):
            pass  # closing: the loop finishes it anyway

    # -- the loop ----------------------------------------------------------------

    def run(self) -> None:
        """The loop, on whichever thread owns it; in thread mode owners change at hand-offs."""
        self.thread = threading.current_thread()
        try:
            self._serve()
        except _HandedOff as handed:
            # Another thread runs the loop now; this one finishes with the
            # connection whose call held it, then gives it back.
            if not handed.done:
                self._carry_on(handed)
            return
        except BaseException:
            log.exception("%s: I/O loop %d failed; closing its connections", self.services.config.name, self.index)
            self._close()
            raise
        self._close()

    def _carry_on(self, handed: _HandedOff) -> None:
        """On the thread whose call outlived HANDOFF_AFTER: run the rest of its connection's calls, then give it back.

        As Go puts a goroutine back on its run queue after a blocking call:
        what was already framed runs here, in order, and the connection goes
        back to the loop, offloaded (its later calls run on the handler
        threads). If the loop is ending, the connection ends here instead.
        Whatever happens, it goes back or ends exactly once.
        """
        conn, transport = handed.conn, handed.transport
        reason: Optional[str] = None
        try:
            if handed.error is not None:
                raise handed.error
            handler = self.services.handler
            for message in handed.pending:
                if conn.close_reason is not None or conn.transport is not transport:
                    break
                handler(message, conn)
            self._started_tls(conn, transport)
            if handed.eof:
                reason = "eof"
            elif conn.close_reason is not None:
                reason = "error"
        except Exception as exc:
            reason = self._reason(conn, exc)
        if reason is None and self.give_back(conn):
            return
        self._wind_up(conn, reason or "server_stop")

    def _serve(self) -> None:
        services = self.services
        handler = services.handler
        # Raw framing, over TLS or not: reads may take the C hot path. Other
        # framers need the full path for every event, and asking dispatch
        # first would only cost.
        dispatch = hot_path.active_dispatch() if services.raw_framing else None
        bufsize = self._bufsize
        conns = self._conns
        poll = hot_path.poller(self._ep)
        serve_events = self._serve_events
        # This owner's own call list: after a hand-off the old owner still
        # pops its list when its handler returns, and must find it empty.
        calls: list[LoopConnection]
        self._calls = calls = []
        handoff_calls = calls if self.handoff else None
        next_sweep = time.monotonic() + self._sweep_every
        if self._pending or self._returned or self._later:  # left by an owner handed off while taking them in
            self._take_new(time.monotonic())
        handoff = self.handoff
        wake_fd = self._wake_fd
        while not (self.stopping and not conns and not self._pending and not self._returned and not self._later):
            if self._to_pump or self._pump_retry:
                # Here, not where the wake-up is read: a hand-off can end an
                # owner's turn between the two, and the next owner starts here.
                self._pump_posted()
            events = poll(0.001 if self._pump_retry else self._sweep_every)
            now = time.monotonic()
            if handoff:
                mark()  # what a slow call in this batch did with the CPU (call_was_slow)
                if events and (len(events) > 1 or events[0][0] != wake_fd):
                    self._inline_at = now  # it serves connections of its own (STICK_WAITS)
            if dispatch is not None:  # raw framing on the C path; as cheap a test as a bool (POP_JUMP_IF_NONE)
                # Plain reads go through the C dispatch; it stops at the
                # first event that needs the full path, served here in turn.
                i, n = 0, len(events)
                while i < n:
                    r = dispatch(events, i, conns, handler, handoff_calls, self, bufsize, now)
                    if r.__class__ is int:
                        if r >= n:
                            break
                        serve_events((events[r],), now)
                        i = r + 1
                    else:
                        # A tuple (dispatch returns an exact int or a tuple): mypy cannot rule out an int subclass.
                        i, kind, value = r  # type: ignore[misc]
                        self._finish_dispatched(conns[events[i][0]], kind, value)
                        i += 1
            else:
                serve_events(events, now)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + self._sweep_every

    def _serve_events(self, events: Any, now: float) -> None:
        """Epoll events, in order, the full path: new connections, set-up, flushing, TLS, framing, handlers.

        The one Python read path: every event is served here, a batch at a
        time (no call per event), unless the C dispatch took it first.
        """
        conns = self._conns
        handler = self._handler
        raw = self._raw
        handoff = self.handoff
        bufsize = self._bufsize
        lingering = self._lingering
        for fd, ev in events:
            conn = conns.get(fd)
            if conn is None:
                if fd == self._wake_fd:
                    self._take_new(now)
                elif fd == self._outbox_fd:
                    self._pump_writable()
                continue
            if conn._setup is not None:
                self._advance_setup(conn)
                continue
            if lingering and fd in lingering:
                self._linger_step(conn, ev)
                continue
            if conn._offloaded or (self.offload_new and not conn._proven and handoff):
                if not conn._away and not conn._busy:
                    # Its calls run on threads: from now on they read it too.
                    conn._offloaded = True
                    self._hand_to_threads(conn)
                continue
            if ev & _EPOLLOUT:
                self._writable(conn)
                if not ev & READ_EVENTS:
                    continue
            if conn.close_reason is not None:
                self._end(conn, "error")
                continue
            transport = conn.transport
            try:
                # A plain read through hot_path: in C it reads into a reused
                # buffer, where socket.recv allocates all of bufsize per call.
                data = transport.recv_nowait(bufsize) if transport.is_tls else recv_nowait(conn._fd, bufsize)
            except BlockingIOError:
                continue
            except OSError as exc:
                self._finish_dispatched(conn, hot_path.RECV_ERROR, exc)
                continue
            except TLSError as exc:
                self._end(conn, self._reason(conn, exc))
                continue
            if data is None:  # nothing there (a plain read)
                continue
            conn._last_read = now
            framer = conn._framer
            try:
                while True:  # more than once only while OpenSSL holds decrypted bytes epoll cannot see
                    conn.bytes_in += len(data)
                    eof = not data
                    # With raw framing the chunk is the message: no framer call.
                    messages = framer.eof() if eof else None if raw else framer.feed(data)
                    if handoff:
                        left = self._handle_each(conn, handler, (data,) if messages is None else messages, transport,
                                                 eof)
                        if left is not None and conn.close_reason is None:
                            # A call blocked: the rest on a thread.
                            self._move_out_with_job(conn, left, transport, eof, False)
                            break
                    elif messages is None:  # events mode: nothing to time, nothing to hand off
                        handler(data, conn)
                    else:
                        for message in messages:
                            handler(message, conn)
                            if conn.close_reason is not None or conn.transport is not transport:
                                break
                    if eof:
                        self._end(conn, "eof")
                        break
                    if conn.close_reason is not None:
                        self._end(conn, "error")
                        break
                    if conn.transport is not transport:
                        self._started_tls(conn, transport)
                        break
                    if not transport.is_tls or not transport.pending():
                        break
                    try:
                        data = transport.recv_nowait(bufsize)
                    except BlockingIOError:
                        break
            except Exception as exc:
                self._end(conn, self._reason(conn, exc))

    def _finish_dispatched(self, conn: LoopConnection, kind: int, value: Any) -> None:
        """End a connection as the C dispatch said: its reason, a receive error, or an exception."""
        reason = self._outcome_reason(conn, kind, value)
        assert reason is not None  # dispatch returns no REST
        self._end(conn, reason)

    def _outcome_reason(self, conn: LoopConnection, kind: int, value: Any) -> Optional[str]:
        """The close reason for what the C path reported (hot_path.FINISH and the rest); None for REST."""
        if kind == hot_path.FINISH:
            return value
        if kind == hot_path.RECV_ERROR:
            return recv_failed(conn, value)
        if kind in (hot_path.HANDLER_ERROR, hot_path.TLS_ERROR):
            return self._reason(conn, value)
        return None

    def _close(self) -> None:
        """The loop has ended (stopped, or failed): finish what it still holds, release its descriptors."""
        with self._takeover_lock:
            self.stopping = True  # no hand-off from here on, and threads finish their own connections
        while self._later:  # calls over, left for the loop: finished below with the rest
            self._later.popleft()[0]._busy = False
        for conn in list(self._conns.values()):
            conn.close("server_stop")
            if conn._away and not self._claim(conn) or conn._busy and not conn._away:
                continue  # its call is running on a thread, which finishes it (_calls_done)
            self._end(conn, "server_stop")
        self._ep.close()
        self._outbox_ep.close()
        if self._crew is not None:
            self._crew.close()  # every handler thread wakes and leaves; the last releases its epoll
        with self._takeover_lock, self._post_lock:  # no give_back or post writes to a closed eventfd
            os.close(self._wake_fd)
            self._wake_fd = -1

    def _user_call(self, conn: LoopConnection, fn: Any, *args: Any, **handed: Any) -> None:
        """Run user code (a handler, a hook) for ``conn``; raises _HandedOff if it outlived the loop's patience."""
        self.call_count += 1
        calls = self._calls
        calls.append(conn)
        started = perf_counter()
        try:
            fn(*args)
        except Exception as exc:
            try:
                calls.pop()
            except IndexError:
                raise self.handed_off(conn, error=exc, **handed) from None
            raise
        try:
            calls.pop()
        except IndexError:
            raise self.handed_off(conn, **handed) from None
        took = perf_counter() - started
        if took > OFFLOAD_AFTER:
            if self.handoff:
                self.call_was_slow(conn, took)
        elif not conn._proven:
            conn._proven = True

    def handed_off(self, conn: LoopConnection, **handed: Any) -> _HandedOff:
        # The monitor popped our call: wait until it has taken the connection
        # out of the loop and started the next owner, then leave the loop.
        with self._takeover_lock:
            pass
        return _HandedOff(conn, **handed)

    def _started_tls(self, conn: LoopConnection, transport: Any) -> bool:
        """Whether start_tls() ran in a handler since ``transport`` was the transport; if so, reset the framer.

        What the framer framed or buffered after the STARTTLS request came in
        plaintext: it must never pass for data that came over TLS.
        """
        if conn.transport is transport:
            return False
        conn._framer = self.services.new_framer()
        return True

    def _handle_each(self, conn: LoopConnection, handler: Any, messages: Any, transport: Any,
                     eof: bool = False) -> Optional[list]:
        """Thread mode: the handler on each message in order, timed, until the connection closes or turns to TLS.

        Returns the messages left when a call turned out to block (the
        connection is offloaded: the rest go to a thread), else None.
        """
        rest = iter(messages)
        for message in rest:
            # If this call is handed off, its thread takes the rest along.
            self._user_call(conn, handler, message, conn, pending=rest, eof=eof, transport=transport)
            if conn.close_reason is not None or conn.transport is not transport:
                break
            if conn._offloaded:
                return list(rest)
        return None

    def _take_new(self, now: float) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        while self._returned:
            conn = self._returned.popleft()
            conn._last_read = now
            try:
                self._hold(conn)
            except OSError as exc:
                self._end(conn, self._reason(conn, exc))
                continue
            if conn.transport.is_tls and conn.transport.pending():
                self._hand_to_threads(conn)  # bytes OpenSSL holds raise no event: a thread reads them now
        while self._later:
            conn, reason = self._later.popleft()
            # Out of the handler threads' epoll before it stops being busy: a
            # thread may hold an event for it that was taken while its last
            # turn ran (a hang-up gets through a disarmed one-shot
            # registration), and would read it again as it ends.
            self._forget(conn)
            conn._busy = False
            self._end(conn, reason)
        services = self.services
        raw_framer = services.raw_framer
        handshake_timeout = services.config.handshake_timeout
        while self._pending:
            conn = self._pending.popleft()
            conn._last_read = now
            conn._framer = raw_framer or services.new_framer()
            try:
                self._hold(conn)
                conn._start_setup(services, now + handshake_timeout)
                if conn._setup is not None:
                    self._advance_setup(conn)
                else:
                    self._ready(conn)
            except Exception as exc:
                conn._setup = None
                self._end(conn, self._reason(conn, exc))

    def _ready(self, conn: LoopConnection) -> None:
        """The connection can talk: alarm, on_connect (on this loop thread or offloaded, never an acceptor)."""
        services = self.services
        if self.offload_new and not conn._offloaded:
            conn._offloaded = True  # the handler blocks: start where its calls will run
        hook = conn._alarm_due or services.config.on_connect is not None
        if conn._offloaded:
            if hook:
                # Not read until on_connect is over, as on a connection thread.
                self._move_out_with_job(conn, (), conn.transport, False, True)
            else:
                self._hand_to_threads(conn)
            return
        if hook:
            self._user_call(conn, self._connected, conn, transport=conn.transport)
        if conn.close_reason is not None:
            self._end(conn, "error")

    def _connected(self, conn: LoopConnection) -> None:
        services = self.services
        if conn._alarm_due:
            services.fire_alarm()
        if services.config.on_connect is not None:
            # Callable: __post_init__ imported what a "module:attr" string names (mypy sees the field's str).
            services.config.on_connect(conn)  # type: ignore[operator]

    def _advance_setup(self, conn: LoopConnection) -> None:
        """Take the PROXY header and the TLS handshake as far as they go (handshake.py); then let the handler in."""
        try:
            wanted = conn._setup_step()
            if wanted:
                self._ep.modify(conn._fd, _IN if wanted == select.POLLIN else select.EPOLLOUT)
                return
            if conn.transport.is_tls:
                self._ep.modify(conn._fd, _IN)  # the handshake may have left it waiting to write
            self._ready(conn)
        except Exception as exc:
            self._end(conn, self._reason(conn, exc))

    def _writable(self, conn: LoopConnection) -> None:
        if conn._flush_writable():
            self.watch_writable(conn, False)

    # -- the outboxes (Connection.post) -------------------------------------------

    def _pump_posted(self) -> None:
        """Write what was posted since the last turn (loop thread): each connection's messages in one send."""
        retry, self._pump_retry = self._pump_retry, []
        to_pump = self._to_pump
        while to_pump:
            self._pump(to_pump.popleft())
        for conn in retry:
            self._pump(conn)

    def _pump_writable(self) -> None:
        """Peers that read again: write more of what they were posted."""
        for fd, _ in self._outbox_ep.poll(0):
            conn = self._pumping.pop(fd, None)
            if conn is not None:
                self._pump(conn)

    def _pump(self, conn: LoopConnection) -> None:
        """Write ``conn``'s outbox as far as its peer takes it now (LoopConnection._pump); then retry or wait."""
        written = conn._pump()
        if written:
            return
        if written is None:
            self._pump_retry.append(conn)  # a sender holds its lock: again within a millisecond
            return
        self._pumping[conn._fd] = conn
        try:
            self._outbox_ep.register(conn._fd, select.EPOLLOUT | select.EPOLLONESHOT)
        except FileExistsError:
            self._outbox_ep.modify(conn._fd, select.EPOLLOUT | select.EPOLLONESHOT)
        except (OSError, ValueError):
            self._pumping.pop(conn._fd, None)  # closed meanwhile

    def _sweep(self, now: float) -> None:
        """Idle, send and handshake deadlines: checked a few times per shortest timeout."""
        config = self.services.config
        idle = config.idle_timeout
        for conn in list(self._conns.values()):
            if conn._busy:
                continue  # a call of its own is running on a thread: not idle, and not sending here
            setup = conn._setup
            if setup is not None:
                if now >= setup.deadline:
                    conn._setup = None
                    self._end(conn, self._reason(conn, setup.timed_out(config.handshake_timeout)))
                continue
            if conn._out and now >= conn._out_deadline:
                conn.close("send_timeout")
                self._end(conn, "send_timeout")
            elif idle and now - conn._last_read >= idle and conn._fd not in self._lingering:
                if conn._away and not self._claim(conn):
                    continue  # a handler thread has just taken it: not idle
                self._end(conn, "idle_timeout")

    def _end(self, conn: LoopConnection, reason: str) -> None:
        """End a connection this loop holds (loop thread): its queue flushed, out of the loop, then wound up."""
        conn._flush_last()
        # A dict lookup only while some connection lingers: every connection ends here.
        lingered = bool(self._lingering) and self._lingering.pop(conn._fd, None) is not None
        if conn._out and not lingered and not self.handoff and reason not in NO_LINGER:
            self._linger(conn, reason)
            return
        self._forget(conn)
        if self.stopping:  # no hand-off any more: the loop is closing
            self._wind_up(conn, reason)
        else:
            self._user_call(conn, self._wind_up, conn, reason, done=True)

    def _linger(self, conn: LoopConnection, reason: str) -> None:
        """Events mode: keep a connection that is ending until its peer has taken the queued replies.

        Reads are over; the loop only waits for the socket to take more
        (_linger_step), and ends the connection once the queue is empty, the
        peer is gone, or send_timeout passes without progress (the sweep).
        No send is taken meanwhile, so the queue only shrinks.
        """
        conn._stop_taking_sends(reason)
        self._lingering[conn._fd] = reason
        try:
            self._ep.modify(conn._fd, select.EPOLLOUT)
        except OSError:
            self._end(conn, reason)  # the descriptor is gone: end it now (it lingers already, so at once)

    def _linger_step(self, conn: LoopConnection, ev: int) -> None:
        if ev & _EPOLLOUT:
            conn._flush_writable()
        if not conn._out or ev & (select.EPOLLERR | select.EPOLLHUP):
            self._end(conn, self._lingering[conn._fd])

    def _wind_up(self, conn: LoopConnection, reason: str) -> None:
        """The way every connection ends, once out of its loop (any thread): close it, then report it.

        The descriptor is closed once the connection's queued worker calls
        are over (``workers=N``; at once without), since they may still
        send; then the listener runs ``on_close``, counts it and gives its
        slot back (``services.connection_closed``), exactly once.
        """
        self.services.after_queued_calls(conn, reason, functools.partial(self._close_and_report, conn, reason))

    def _close_and_report(self, conn: LoopConnection, reason: str) -> None:
        if self._pumping.get(conn._fd) is conn:
            del self._pumping[conn._fd]  # its descriptor leaves the outbox epoll as it closes
        result = conn._finish(reason)
        if result is not None:
            self.services.connection_closed(conn, *result)

    def _hold(self, conn: LoopConnection) -> None:
        """Have this loop read ``conn`` (new, given back, or kept after a refused hand-off)."""
        self._conns[conn._fd] = conn
        self._ep.register(conn._fd, _IN)  # an offloaded one moves to the threads at its first event

    def _forget(self, conn: LoopConnection) -> None:
        """Take ``conn`` out of this loop (it is finishing, or handed off); its descriptor stays open."""
        fd = conn._fd
        if self._conns.get(fd) is conn:
            del self._conns[fd]
            try:
                if conn._away:
                    assert self._crew is not None  # only thread mode, which has _crew, moves connections away
                    conn._away = False
                    self._crew.unregister(fd)
                else:
                    self._ep.unregister(fd)
            except (OSError, ValueError):
                pass

    # -- thread mode: offloaded connections -----------------------------------------
    #
    # An offloaded connection is registered in the handler threads' one-shot
    # epoll (_crew) instead of the loop's (_away). They wait on it, one event
    # each: the thread that takes a connection's event runs its turn here
    # (_take_turn: reads it, runs its calls, reads on, and arms it again). A
    # message thus costs one thread wake-up, as on a thread per connection,
    # while the threads are only as many as calls run at once. Whoever takes an offloaded
    # connection (a handler thread, the sweep, the loop's close) claims it
    # first (_claim): a one-shot event can be taken by a thread just as the
    # loop decides to finish the connection.

    def call_was_slow(self, conn: LoopConnection, took: float) -> None:
        """An inline call held the loop past OFFLOAD_AFTER: this connection's calls go to threads.

        Called on the loop thread right after the call (by ``_user_call`` or
        the hot path). Connections with no quick call of their own follow,
        until a call on a thread turns out quick (``_calls_done``): a handler
        that blocked on one connection is likely to block on the next. The
        connection moves to the threads at its next event, or with the rest of
        its messages (both in ``_serve_events``).
        """
        if not blocked_since_mark(took):  # since the loop's mark, once per batch of events
            return  # a short collection, or preempted: it did not wait on anything
        if conn._offloaded or conn.close_reason is not None or self._conns.get(conn._fd) is not conn:
            return
        if conn._proven:
            # It was quick inline before. One slow call may be the loop waiting
            # for the GIL (other threads asked for it mid-call), which looks
            # just like blocking: a second one within SECOND_STRIKE decides.
            now = time.monotonic()
            if now - conn._struck > SECOND_STRIKE:
                conn._struck = now
                return
            # It blocks now and then: it proves itself longer before it comes
            # back (up to 16 times longer).
            conn._inline_after = min(conn._inline_after * 2, INLINE_AFTER * 16)
        self.offload_new = True
        conn._offloaded = True
        conn._quick = 0
        self.offloads += 1

    def _hand_to_threads(self, conn: LoopConnection) -> None:
        """Move an offloaded connection to the handler threads; what OpenSSL already holds goes with it.

        Decrypted bytes waiting inside OpenSSL raise no event, so a connection
        holding some is not armed to wait for one: a thread reads them now.
        """
        transport = conn.transport
        if transport.is_tls and transport.pending():
            self._move_out_with_job(conn, (), transport, False, False)
        else:
            self._move_out(conn, armed=True)

    def _move_out(self, conn: LoopConnection, *, armed: bool) -> None:
        """Register ``conn`` with the handler threads instead of the loop (loop thread only).

        ``armed``: its next event goes to a handler thread at once; otherwise
        the caller has claimed it and runs a job for it, which arms it.
        """
        assert self._crew is not None  # only thread mode, which has _crew, offloads
        fd = conn._fd
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass
        conn._away = True
        try:
            self._crew.register(fd, armed=armed)
        except OSError as exc:
            conn._away = False
            self._end(conn, self._reason(conn, exc))
            return
        self._crew.ensure()

    def _move_out_with_job(self, conn: LoopConnection, messages: Any, transport: Any, eof: bool, connected: bool) -> None:
        """Move ``conn`` to the handler threads with work already in hand (loop thread only).

        The rest of a chunk whose call blocked, an on_connect, or bytes that
        OpenSSL holds: it is claimed and registered disarmed, and a job runs
        that work and then arms it (``_run_calls``).
        """
        conn._busy = True  # claimed: it is still the loop's alone
        self._move_out(conn, armed=False)
        if conn._away:
            self._submit(conn, messages, transport, eof, connected)

    def _claim(self, conn: LoopConnection) -> bool:
        """Take an offloaded connection for a job, unless someone already has (see above)."""
        with self._takeover_lock:
            if conn._busy:
                return False
            conn._busy = True
            return True

    def _take_turn(self, fd: int) -> None:
        """On a handler thread that took ``fd``'s event: serve that offloaded connection, unless it is taken."""
        conn = self._conns.get(fd)
        if conn is None or not conn._away or not self._claim(conn):
            return
        transport = conn.transport
        fast = self._fast_turn
        if fast is not None and not transport.is_tls:
            turn = fast(self, self._crew, conn, self._handler, self._crew_fd, self._bufsize, READ_AHEAD, ARMED,
                        STICK, self._stick_waits(), STICK_SKIP)
            if turn is not None:
                self._end_turn(conn, transport, *turn)
        else:
            self._run_calls(conn, (), transport, False, False)

    def _end_turn(self, conn: LoopConnection, transport: Any, kind: int, value: Any, calls: int, slow: bool) -> None:
        """What the C turn (hot_path.offloaded_server) left to Python: finish the connection, or the rest."""
        reason = self._outcome_reason(conn, kind, value)
        self._calls_done(conn, reason, reason == "eof", transport, slow, calls)

    def _submit(self, conn: LoopConnection, messages: Any, transport: Any, eof: bool, connected: bool) -> None:
        """Run a claimed connection's calls on a thread (on_connect, or messages framed on the loop)."""
        try:
            self.services.threads.submit(self._run_calls, conn, messages, transport, eof, connected)
        except RuntimeError as exc:  # no thread can be started (a system limit, or stopping)
            log.error("%s: I/O loop %d cannot start a thread for connection %d (%s); running its call "
                      "on the loop", self.services.config.name, self.index, conn.id, exc)
            self._run_calls(conn, messages, transport, eof, connected)

    def _run_calls(self, conn: LoopConnection, messages: Any, transport: Any, eof: bool, connected: bool) -> None:
        """On a thread: a claimed connection's hook or handler calls, in order; then arm it again.

        Like a connection thread, it reads on once its calls are over: a
        client that answers each reply has often answered by then, and its
        next call runs here without another wake-up; when it has not, the
        thread may wait for it a little (``_may_stick``). At most READ_AHEAD
        reads, and none while jobs wait for a thread. The C turn
        (hot_path.offloaded_server) does the same for plain raw framing.
        """
        services = self.services
        handler = services.handler
        raw = services.raw_framing
        threads = services.threads
        reason: Optional[str] = None
        data: Optional[bytes]
        slow = False
        calls = 0
        # A call longer than OFFLOAD_AFTER is slow only if it blocked or ran
        # long (blocked_since_mark, as inline), not if it was preempted; the
        # mark is taken again after each wait for the client.
        mark()
        try:
            if connected:
                started = perf_counter()
                self._connected(conn)
                took = perf_counter() - started
                slow = took > OFFLOAD_AFTER and blocked_since_mark(took)
                calls = 1
            reads = waits = 0
            most = self._stick_waits()
            while True:
                for message in messages:
                    if conn.close_reason is not None or conn.transport is not transport:
                        break  # closing, or start_tls() ran: plaintext framed after the request is dropped
                    started = perf_counter()
                    handler(message, conn)
                    took = perf_counter() - started
                    if took > OFFLOAD_AFTER and not slow:
                        slow = blocked_since_mark(took)
                calls += len(messages)
                if eof or conn.close_reason is not None or conn.transport is not transport or reads > READ_AHEAD or (
                        reads and threads.queued) or (not slow and conn._quick + calls >= conn._inline_after
                                                      and not (transport.is_tls and transport.pending())):
                    # The last: quick long enough to go back to the loop (_calls_done). Not while
                    # OpenSSL holds decrypted bytes: epoll would never say so, _calls_done hands
                    # the connection straight back here, and a turn that stopped before reading
                    # would do the same again, for ever.
                    break
                reads += 1
                if calls and waits < most and (not transport.is_tls or not transport.pending()) and self._may_stick(conn):
                    # As the C turn does: wait for this client's next message,
                    # but not past another connection's event finding no thread.
                    client = wait_for_client(conn._fd, self._crew_fd, STICK)
                    if not client:
                        if client is None:
                            conn._stick_skip = STICK_SKIP  # its client is slower than that
                        break
                    waits += 1
                    if not slow:  # once one call was slow the turn is judged: no need to measure more
                        mark()
                try:
                    if transport.is_tls:
                        data = transport.recv_nowait(self._bufsize)
                    else:  # in C this recv keeps the GIL, which a busy handler thread would wait to get back
                        data = recv_nowait(conn._fd, self._bufsize)
                except BlockingIOError:
                    data = None
                except OSError as exc:
                    reason = recv_failed(conn, exc)
                    break
                if data is None:
                    break
                conn._last_read = time.monotonic()
                conn.bytes_in += len(data)
                if data:
                    messages = [data] if raw else conn._framer.feed(data)
                else:
                    messages, eof = conn._framer.eof(), True
        except Exception as exc:
            reason = self._reason(conn, exc)
        self._calls_done(conn, reason, eof, transport, slow, calls)

    def _stick_waits(self) -> int:
        """How many times this turn may wait on its client: fewer while the loop has connections of its own."""
        return STICK_WAITS if time.monotonic() - self._inline_at < LOOP_QUIET else READ_AHEAD

    def _may_stick(self, conn: LoopConnection) -> bool:
        """Whether this handler thread should wait on ``conn`` for its next message (STICK).

        Not while the connection sits out after a wait that timed out, and
        only while another handler thread is there for the other connections'
        events; the wait itself ends when one of them finds no thread free (a
        thread counted idle may not have taken its event yet: it waits for the
        GIL; the handler threads' epoll knows).
        """
        if conn._stick_skip:
            conn._stick_skip -= 1
            return False
        # Thread mode, which has _crew: an assert would cost a check per message read ahead.
        return self._crew.idle > 0  # type: ignore[union-attr]

    def _calls_done(self, conn: LoopConnection, reason: Optional[str], eof: bool, transport: Any, slow: bool,
                    calls: int) -> None:
        """On the thread that ran them: arm the connection again, bring it back inline, or have it finished."""
        if reason is None:
            if eof:
                reason = "eof"
            elif conn.close_reason is not None:
                reason = "error"
            else:
                self._started_tls(conn, transport)
        if calls:
            conn._quick = 0 if slow else conn._quick + calls
            if not slow:
                # The latest evidence says the handler does not block (a slow
                # call was a one-off: a cold cache, a collection): connections
                # without a quick call of their own stay on the loop again.
                self.offload_new = False
        if reason is None and conn.transport.is_tls and conn.transport.pending():
            # OpenSSL holds decrypted bytes epoll cannot see: read them on.
            self._submit(conn, (), conn.transport, False, False)
            return
        with self._takeover_lock:
            self.threaded_calls += calls
            if not self.stopping:
                if reason is not None:
                    self._later.append((conn, reason))  # busy until the loop finishes it
                    os.eventfd_write(self._wake_fd, 1)
                    return
                assert self._crew is not None  # offloaded: thread mode, which has _crew
                fd = conn._fd
                try:
                    if conn._quick >= conn._inline_after:
                        # Back to the loop: quick calls cost less there.
                        self._crew.unregister(fd)
                        conn._away = conn._offloaded = conn._busy = False
                        conn._proven = True
                        self._ep.register(fd, _IN)
                    else:
                        conn._busy = False
                        self._crew.rearm(fd)
                except (OSError, ValueError):
                    conn._busy = False  # being closed: the loop finishes it
                return
        # The loop has ended (it left this connection to us because it was busy).
        self._wind_up(conn, reason or "server_stop")

    # -- thread mode: the monitor and the hand-off ---------------------------------

    def _watch(self) -> None:
        """The monitor: hand the loop off when one user call has run for a whole tick.

        It also starts a handler thread when every one has been busy for
        HANDLERS_STUCK with none finishing a turn (all blocked, say, in sends
        to clients that do not read): the event of another offloaded
        connection may be waiting for a thread, and only a new one takes it.
        """
        last = -1
        tick = HANDOFF_AFTER
        crew = self._crew
        assert crew is not None  # the monitor runs in thread mode, which has _crew
        slept = time.monotonic()
        while not self.stopping:
            time.sleep(tick)  # one system call; Event.wait would run a Condition's Python per tick
            # One clock read per tick: this wake-up is also the next sleep's start (the few
            # microseconds of the tick's own work count as lateness, far below STALL_WARNING).
            woke = time.monotonic()
            if woke - slept - tick >= STALL_WARNING:
                self._stalled(woke - slept - tick)
            slept = woke
            crew.unstick()
            gen = self.call_count
            if gen != last:
                last, tick = gen, HANDOFF_AFTER
            elif self._calls:
                if self._hand_off(gen):
                    last = -1
            else:
                tick = min(tick * 2, HANDOFF_IDLE_TICK)  # quiet: look less often

    def _stalled(self, late: float) -> None:
        """Say that no Python ran here for ``late`` seconds: the timeouts that fired meanwhile were not the clients'."""
        log.warning("%s: I/O loop %d's monitor woke %.1fs late: the process got no CPU for that long (an "
                    "overloaded or paused machine) or one call held the interpreter lock; deadlines that passed "
                    "meanwhile (handshakes, idle connections) are enforced now, and clients may have given up",
                    self.services.config.name, self.index, late)

    def _hand_off(self, gen: int, *, by_monitor: bool = True) -> bool:
        """Take the stuck call's connection out of the loop and start the loop's next owner.

        Run by the monitor, or by the loop thread itself just before it waits
        on a peer (LoopConnection._about_to_wait).
        """
        with self._takeover_lock:
            if self.stopping or self.call_count != gen:
                return False
            try:
                conn = self._calls.pop()
            except IndexError:
                return False  # the call ended as we looked
            self._forget(conn)
            try:
                self.services.threads.submit(self.run)
                started = True
            except RuntimeError as exc:  # no thread can be started (system limit, or stopping)
                if not by_monitor:
                    # The loop's own thread asked: it stays the owner and waits
                    # in place, as if it had not asked.
                    self._hold(conn)
                    self._calls.append(conn)
                    return False
                log.error("%s: I/O loop %d cannot start a thread (%s); the monitor runs the loop "
                          "from now on, so a blocking handler will hold up its connections",
                          self.services.config.name, self.index, exc)
                started = False
            self.handoffs += 1
            # Its calls run on threads from now on (it comes back to this loop
            # for reading when this one is over), and so do new connections'.
            conn._offloaded = True
            self.offload_new = True
            self.offloads += 1
        if started:
            return True
        self.run()  # this thread, the monitor, becomes the owner; no more hand-offs for this loop
        return False

    def _reason(self, conn: LoopConnection, exc: Exception) -> str:
        """The close reason for ``exc``, logged at most so often (close_reasons.reason_for)."""
        return reason_for(conn, exc, self.services.fault_logs)
