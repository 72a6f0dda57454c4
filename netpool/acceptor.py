"""The accept loop, and only that: accept -> admit -> hand off.

Each acceptor thread blocks in ``accept()`` on the one listening socket (the
kernel wakes one waiter per connection, so there is no herd and no polling).
It never runs anything slow: a TLS handshake, a handler or an alarm callback
all run on the I/O loop that serves the connection (or, in thread mode, on
the threads it gives blocking calls to), never on an acceptor.

Errors are sorted by errno (``errors.ACCEPT_*``): running out of descriptors
backs off and drains the pending client through a spare descriptor, a client
that vanished before we took it is skipped, and the listening socket being
shut down (stop or suspend) sends the acceptor back to the listener's gate.
On an idle socket accept() also returns every ``sockets.ACCEPT_WAKE``
seconds (EAGAIN), so that a listener whose socket is shared, and so may not
be shut down, still sees its acceptors leave when it stops.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .admission import Admission
from .errors import ACCEPT_CAPACITY_ERRNOS, ACCEPT_CLIENT_ERRNOS
from .ratelimit import RateLimitedLog

__all__ = ["Acceptor", "AcceptGate"]

log = logging.getLogger("netpool.acceptor")

# Back-off after accept() reports a resource shortage: start small so a brief
# shortage costs little, cap it so recovery is noticed within half a second.
MIN_BACKOFF = 0.01
MAX_BACKOFF = 0.5


@dataclass(frozen=True)
class AcceptGate:
    """What an acceptor needs from its listener, handed over as callables (as Ranch hands its acceptor a socket and a supervisor).

    ``enter()`` waits while the listener is suspended and returns the socket
    to accept on, or None when the acceptor should end; ``leave()`` follows
    every ``enter()`` that returned a socket, as soon as ``accept()`` is
    over. ``accepting_on(sock)`` says whether an error on ``sock`` matters
    (no: it was closed by a suspend or stop). ``out_of_descriptors(sock,
    exc)`` drains the backlog after EMFILE; ``admit(client, peer, index,
    reserved=...)`` takes an accepted client over. ``stopping`` is set when
    the listener stops (back-off waits end early). With ``wait_for_slot``
    (overflow="wait") a slot of ``admission`` is reserved before each accept.
    Accepted sockets are made of ``client_class`` (a ``socket.socket``
    subclass: the listener's is ``transport.PlainTransport``).
    """

    enter: Callable[[], Optional[socket.socket]]
    leave: Callable[[], None]
    accepting_on: Callable[[socket.socket], bool]
    out_of_descriptors: Callable[[socket.socket, OSError], Any]
    admit: Callable[..., None]
    stopping: threading.Event
    admission: Admission
    wait_for_slot: bool
    client_class: type = socket.socket


class Acceptor:
    """One acceptor thread of a listener."""

    def __init__(self, gate: AcceptGate, index: int, *, name: str, nice: int = 0) -> None:
        self.gate = gate
        self.index = index
        self.accepted = 0
        self.thread = threading.Thread(target=self.run, name=f"netpool-acceptor-{name}-{index}", daemon=True)
        self._nice = nice
        self._errors = RateLimitedLog(log)

    def run(self) -> None:
        gate = self.gate
        self._lower_priority(self._nice)
        admission = gate.admission
        wait_for_slot = gate.wait_for_slot
        enter, leave, admit = gate.enter, gate.leave, gate.admit  # per connection: bound once
        client_class = gate.client_class
        backoff = MIN_BACKOFF
        listening: Optional[socket.socket] = None
        kind: tuple[int, int, int] = (0, 0, 0)
        while True:
            # overflow="wait": hold a free slot *before* accepting, so that at
            # the limit nobody is in accept() and clients queue in the backlog.
            if wait_for_slot and not admission.reserve():
                return
            sock = enter()
            if sock is None:
                if wait_for_slot:
                    admission.unreserve()
                return
            if sock is not listening:
                # What accepted sockets are, as plain ints: socket.accept()
                # would ask the listening socket each time through properties
                # that build enum members, a sixth of the Python work per
                # connection (callgrind). Asked again only for a new socket
                # (after a resume).
                listening, kind = sock, (int(sock.family), int(sock.type), sock.proto)
            try:
                # socket.accept() without its per-call property lookups.
                fd, peer = sock._accept()  # type: ignore[attr-defined]  # _socket.socket's, not in typeshed
                try:
                    client = client_class(*kind, fileno=fd)
                except OSError:
                    os.close(fd)  # not yet owned by a socket object: close it here or it leaks
                    raise
            except OSError as exc:
                error: OSError | None = exc
            else:
                error = None
            finally:
                leave()
            if error is not None:
                if wait_for_slot:
                    admission.unreserve()
                if not gate.accepting_on(sock) or error.errno == errno.EAGAIN:
                    continue  # suspended, stopping or just woken: the gate decides what next
                if error.errno in ACCEPT_CAPACITY_ERRNOS:
                    # Out of this acceptor's accept(): it must not hold a slot
                    # while the spare is down.
                    gate.out_of_descriptors(sock, error)
                    gate.stopping.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                elif error.errno not in ACCEPT_CLIENT_ERRNOS:
                    self._errors(logging.ERROR, "acceptor %d: accept() failed: %s", self.index, error)
                    gate.stopping.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = MIN_BACKOFF
            self.accepted += 1
            admit(client, peer, self.index, reserved=wait_for_slot)

    def _lower_priority(self, increment: int) -> None:
        """Run this thread ``increment`` nice steps below the process (see ListenerConfig.acceptor_nice).

        Linux keeps a nice value per thread, and setpriority() on a thread id
        changes only that thread. Relative to the current value, so a server
        started under ``nice`` keeps its acceptors below its loops; lowering
        priority needs no privilege.
        """
        if not increment or not hasattr(os, "setpriority"):
            return
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        except OSError as exc:
            log.debug("acceptor %d: cannot lower its priority: %s", self.index, exc)
