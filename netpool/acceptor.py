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
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import TYPE_CHECKING

from .errors import ACCEPT_CAPACITY_ERRNOS, ACCEPT_CLIENT_ERRNOS
from .ratelimit import RateLimitedLog

if TYPE_CHECKING:  # pragma: no cover
    from .listener import Listener

__all__ = ["Acceptor"]

log = logging.getLogger("netpool.acceptor")

# Back-off after accept() reports a resource shortage: start small so a brief
# shortage costs little, cap it so recovery is noticed within half a second.
MIN_BACKOFF = 0.01
MAX_BACKOFF = 0.5


class Acceptor:
    """One acceptor thread of a listener."""

    def __init__(self, listener: "Listener", index: int) -> None:
        self.listener = listener
        self.index = index
        self.accepted = 0
        self.thread = threading.Thread(
            target=self.run, name=f"netpool-acceptor-{listener.config.name}-{index}", daemon=True
        )
        self._errors = RateLimitedLog(log)

    def run(self) -> None:
        listener = self.listener
        self._lower_priority(listener.config.acceptor_nice)
        admission = listener._admission
        wait_for_slot = listener.config.overflow == "wait"
        backoff = MIN_BACKOFF
        while True:
            # overflow="wait": hold a free slot *before* accepting, so that at
            # the limit nobody is in accept() and clients queue in the backlog.
            if wait_for_slot and not admission.reserve():
                return
            sock = listener._enter_accept()
            if sock is None:
                if wait_for_slot:
                    admission.unreserve()
                return
            try:
                # socket.accept() without its per-call property lookups.
                fd, peer = sock._accept()
                try:
                    client = socket.socket(*listener._client_kind, fileno=fd)
                except OSError:
                    os.close(fd)  # not yet owned by a socket object: close it here or it leaks
                    raise
            except OSError as exc:
                error: OSError | None = exc
            else:
                error = None
            finally:
                listener._leave_accept()
            if error is not None:
                if wait_for_slot:
                    admission.unreserve()
                if not listener._accepting_on(sock):
                    continue  # suspended or stopping: the gate decides what next
                if error.errno in ACCEPT_CAPACITY_ERRNOS:
                    # Out of this acceptor's accept(): it must not hold a slot
                    # while the spare is down.
                    listener._out_of_descriptors(sock, error)
                    listener._stop_event.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                elif error.errno not in ACCEPT_CLIENT_ERRNOS:
                    self._errors(logging.ERROR, "acceptor %d: accept() failed: %s", self.index, error)
                    listener._stop_event.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            backoff = MIN_BACKOFF
            self.accepted += 1
            listener._admit(client, peer, self.index, reserved=wait_for_slot)

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
