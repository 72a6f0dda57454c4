"""Serving in the foreground of a process until SIGINT or SIGTERM, then stopping gracefully.

Shared by the CLI (one process) and by each worker of the multi-process
supervisor.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Callable, Optional

from .config import ListenerConfig
from .listener import Listener, ListenerInfo, start_listener
from .sd_notify import StatusReporter, notify

__all__ = ["run_until_signal", "StopRequested"]

log = logging.getLogger("netpool.cli")

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class StopRequested(BaseException):
    """Raised in the main thread by the SIGINT/SIGTERM handler to leave wait()."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signame = signal.Signals(signum).name


def _on_signal(signum: int, _frame: Any) -> None:
    # From now on further signals only log: the graceful stop must not be
    # interrupted half-way by an impatient second Ctrl-C.
    signal.signal(signal.SIGINT, _already_stopping)
    signal.signal(signal.SIGTERM, _already_stopping)
    raise StopRequested(signum)


def _already_stopping(signum: int, _frame: Any) -> None:
    log.warning("%s received while stopping; still waiting for connections (SIGKILL aborts)",
                signal.Signals(signum).name)


def run_until_signal(config: ListenerConfig, grace: float,
                     on_started: Optional[Callable[[Listener], Any]] = None) -> ListenerInfo:
    """Start ``config``'s listener, serve until SIGINT/SIGTERM, stop it within ``grace``.

    ``on_started(listener)`` runs once it is listening (to attach metrics,
    say); if it raises, the listener is stopped and the error propagates.

    Stop signals are held from before the "listening" line until their
    handlers are in place: a SIGTERM sent the moment the server reports it
    is up is still handled gracefully, not fatal. Raises ListenError or
    TLSError if the listener cannot start.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        listener = start_listener(config)
        if on_started is not None:
            try:
                on_started(listener)
            except BaseException:
                listener.stop(0)
                raise
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        raise
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    # systemd (Type=notify), if it started us: up now, and what it serves.
    notify("READY=1", f"STATUS=serving {listener.address}: 0 live connections")
    status = StatusReporter(lambda: f"serving {listener.address}: {listener.info().live} live connections")
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        listener.wait()
    except StopRequested as stop:
        log.info("%s received: stopping (grace %gs)", stop.signame, grace)
    status.stop()
    notify("STOPPING=1", f"STATUS=stopping: {listener.info().live} live connections get {grace:g} s")
    return listener.stop(grace)
