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

__all__ = ["run_until_signal", "StopRequested", "STOP_SIGNALS", "HELD_SIGNALS"]

log = logging.getLogger("netpool.cli")

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# Held from before a listener starts until their handlers are in place (a
# SIGHUP's default action would end the process).
HELD_SIGNALS = STOP_SIGNALS | {signal.SIGHUP}


class ReloadRequested(BaseException):
    """Raised in the main thread by the SIGHUP handler to leave wait() and reload."""


def _on_reload(signum: int, _frame: Any) -> None:
    raise ReloadRequested()


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


def _reload(listener: Listener) -> None:
    notify("RELOADING=1")
    if listener.config.ssl is None:
        log.info("SIGHUP received: nothing to reload (no TLS certificate)")
    else:
        log.info("SIGHUP received: reloading the TLS certificate")
        listener.reload_tls()
    notify("READY=1", f"STATUS={_status(listener)}")


def _status(listener: Listener) -> str:
    """What systemd shows for a serving listener (STATUS=)."""
    return f"serving {listener.address}: {listener.info().live} live connections"


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
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        listener = start_listener(config)
        if on_started is not None:
            try:
                on_started(listener)
            except BaseException:
                listener.stop(0)
                raise
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        raise
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    # SIGHUP reloads what can change under a running listener: today the TLS
    # certificate (new handshakes take it; live connections go on).
    signal.signal(signal.SIGHUP, _on_reload)
    # systemd (Type=notify), if it started us: up now, and what it serves.
    notify("READY=1", f"STATUS={_status(listener)}")
    status = StatusReporter(lambda: _status(listener))
    try:
        held = True
        while True:
            try:
                if held:  # a signal held until now is handled right here, inside this try
                    held = False
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
                listener.wait()
                break
            except ReloadRequested:
                # One at a time: a SIGHUP meanwhile waits, then reloads again.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
                try:
                    _reload(listener)
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    except StopRequested as stop:
        log.info("%s received: stopping (grace %gs)", stop.signame, grace)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # stopping: a reload now would only get in the way
    status.stop()
    notify("STOPPING=1", f"STATUS=stopping: {listener.info().live} live connections get {grace:g} s")
    return listener.stop(grace)
