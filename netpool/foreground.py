"""Serving in the foreground of a process until SIGINT or SIGTERM, then stopping gracefully.

Shared by the CLI (one process) and by each worker of the multi-process
supervisor.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Any, Callable, Optional

from .config import ListenerConfig
from .errors import ConfigError, ListenError, TLSError
from .listener import Listener, ListenerInfo, start_listener
from .listener_info import combined
from .sd_notify import StatusReporter, notify
from .sockets import open_shared_socket

__all__ = ["run_until_signal", "STOP_SIGNALS", "HELD_SIGNALS", "same_address"]

log = logging.getLogger("netpool.cli")

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# What the serving thread waits for: a stop, a reload, a retire.
HELD_SIGNALS = STOP_SIGNALS | {signal.SIGHUP, signal.SIGQUIT}


def _status(listener: Listener) -> str:
    """What systemd shows for a serving listener (STATUS=)."""
    return f"serving {listener.address}: {listener.info().live} live connections"


def same_address(old: ListenerConfig, new: ListenerConfig) -> Optional[str]:
    """What a reload cannot change without a restart (the socket is kept), or None if nothing of it changed."""
    for key in ("host", "port", "unix", "processes"):
        if getattr(old, key) != getattr(new, key):
            return (f"{key} changed from {getattr(old, key)!r} to {getattr(new, key)!r}, which needs a restart "
                    "(a reload keeps the listening socket)")
    return None


class _Generations:
    """A single process's rolling reloads: each SIGHUP starts a new listener on the same socket and retires the old.

    The new generation (its config read and its handler imported afresh by
    ``reload_config``) accepts before the old one stops, so no client is
    refused; the old one drains on a thread of its own (``Listener.retire``)
    while the main thread goes back to waiting for signals.
    """

    def __init__(self, listener: Listener, sock: socket.socket, grace: float,
                 reload_config: Optional[Callable[[], ListenerConfig]],
                 on_replaced: Optional[Callable[[Listener, Listener], Any]]) -> None:
        self.listener = listener
        self._sock = sock
        self._grace = grace
        self._reload_config = reload_config
        self._on_replaced = on_replaced
        self._retiring: list[threading.Thread] = []
        self.finished: list[ListenerInfo] = []
        self._finished_lock = threading.Lock()
        self.reloads = 0

    def reload(self) -> None:
        notify("RELOADING=1")
        old = self.listener
        started = time.monotonic()
        log.info("SIGHUP received: reloading (%s)", "reading the config and importing the handler afresh"
                 if self._reload_config is not None else "the same config; certificates read again")
        try:
            config = self._reload_config() if self._reload_config is not None else old.config
            problem = same_address(old.config, config)
            if problem is not None:
                raise ConfigError("reload", problem)
            new = Listener(config, sock=self._sock)
            new.take_broker(old)  # users on both generations reach each other while the old one drains
            new.start()
        except (ConfigError, ListenError, TLSError) as exc:
            log.error("reload failed, so the running server goes on unchanged: %s", exc)
            notify("READY=1", f"STATUS={_status(old)}")
            return
        self.reloads += 1
        self.listener = new
        if self._on_replaced is not None:
            try:
                self._on_replaced(old, new)
            except Exception:
                log.exception("reload: the hook for the new listener raised; serving on")
        old.stop_accepting()  # so that once the reload is reported done, every new client gets the new listener
        live = old.info().open
        thread = threading.Thread(target=self._retire, args=(old,), name=f"netpool-retire-{self.reloads}")
        thread.start()
        self._retiring.append(thread)
        log.info("reload %d: the new listener serves %s (started in %.2fs); the old one stopped accepting and "
                 "drains %d connections (grace %gs)", self.reloads, new.address, time.monotonic() - started,
                 live, self._grace)
        notify("READY=1", f"STATUS={_status(new)}")

    def _retire(self, old: Listener) -> None:
        info = old.retire(self._grace)
        with self._finished_lock:
            self.finished.append(info)

    def stop(self, *, retire: bool = False, on_stopped_accepting: Optional[Callable[[], Any]] = None) -> ListenerInfo:
        if retire:
            self.listener.stop_accepting()
            if on_stopped_accepting is not None:
                on_stopped_accepting()
            info = self.listener.retire(self._grace)
        else:
            info = self.listener.stop(self._grace)
        for thread in self._retiring:
            thread.join()
        if self.reloads:
            with self._finished_lock:
                infos = [*self.finished, info]
            log.info("%s: %d reloads; over all generations: %s", info.name, self.reloads,
                     combined(infos).summary())
        return info


def run_until_signal(config: ListenerConfig, grace: float,
                     on_started: Optional[Callable[[Listener], Any]] = None, *,
                     sock: Optional[socket.socket] = None,
                     reload_config: Optional[Callable[[], ListenerConfig]] = None,
                     on_replaced: Optional[Callable[[Listener, Listener], Any]] = None,
                     on_stopped_accepting: Optional[Callable[[], Any]] = None,
                     reloads: bool = True) -> ListenerInfo:
    """Start ``config``'s listener, serve until SIGINT/SIGTERM, stop it within ``grace``.

    ``on_started(listener)`` runs once it is listening (to attach metrics,
    say); if it raises, the listener is stopped and the error propagates.

    ``sock`` is a listening socket to serve (from a supervisor or systemd);
    without it the address of ``config`` is bound here, and closed at the
    end. SIGHUP reloads (``_Generations``): ``reload_config()`` gives the
    new config (``config`` again without it), ``on_replaced(old, new)``
    runs once the new listener serves. SIGQUIT retires the listener as a
    reload's old generation does (``Listener.retire``), which is how a
    supervisor replaces its workers; ``on_stopped_accepting()`` runs once
    it takes no new clients. With ``reloads=False`` (a supervisor's worker:
    the supervisor reloads) SIGHUP is ignored.

    The calling thread takes the signals (they are blocked in every thread
    of the process meanwhile): a SIGTERM sent the moment the server reports
    it is up is still handled gracefully, and signals that come during a
    reload or a stop wait their turn. Call it from the main thread. Raises
    ListenError or TLSError if the listener cannot start.
    """
    # Signals are taken synchronously (sigtimedwait) by this thread, never
    # by handlers: a handler's exception lands wherever the main thread is,
    # and one that landed outside the code meant to catch it (a second
    # SIGHUP as a reload ended) crashed the server. Blocked before the
    # listener starts, so its threads inherit the mask and a signal sent at
    # any moment waits its turn here.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    close_owned: Optional[Callable[[], None]] = None
    try:
        if sock is None:
            # Bound here rather than by the listener, so that the generations
            # of a reload can share it.
            sock, close_owned = open_shared_socket(config)
        listener = start_listener(config, sock=sock)
        if on_started is not None:
            try:
                on_started(listener)
            except BaseException:
                listener.stop(0)
                raise
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if close_owned is not None:
            close_owned()
        raise
    generations = _Generations(listener, sock, grace, reload_config, on_replaced)
    # systemd (Type=notify), if it started us: up now, and what it serves.
    notify("READY=1", f"STATUS={_status(listener)}")
    status = StatusReporter(lambda: _status(generations.listener))
    try:
        signum = _serve(generations, reloads)
        retire = signum == signal.SIGQUIT
        if signum is None:
            log.info("%s was stopped by the program; stopping", generations.listener.config.name)
        elif retire:
            log.info("SIGQUIT received: retiring (no new connections; live ones get %gs to finish)", grace)
        else:
            log.info("%s received: stopping (grace %gs)", signal.Signals(signum).name, grace)
        status.stop()
        notify("STOPPING=1", f"STATUS=stopping: {generations.listener.info().live} live connections get {grace:g} s")
        return _stop_and_wait(lambda: generations.stop(retire=retire, on_stopped_accepting=on_stopped_accepting))
    finally:
        status.stop()
        while signal.sigpending() & HELD_SIGNALS:  # spent: not let through to their default actions
            signal.sigtimedwait(HELD_SIGNALS, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if close_owned is not None:
            close_owned()


# How often the signal wait also looks whether the program stopped the
# listener itself (listener.stop() from a handler, say).
LOOK_EVERY = 0.5


def _serve(generations: _Generations, reloads: bool) -> Optional[int]:
    """Wait for signals, reloading on SIGHUP; the stop signal that ended it, or None if the listener stopped."""
    while True:
        received = signal.sigtimedwait(HELD_SIGNALS, LOOK_EVERY)
        if received is None:
            if generations.listener.wait(0):
                return None
            continue
        if received.si_signo != signal.SIGHUP:
            return received.si_signo
        if reloads:  # a supervisor's worker leaves reloads to the supervisor
            generations.reload()


def _stop_and_wait(stop: Callable[[], ListenerInfo]) -> ListenerInfo:
    """Run ``stop`` on a thread while this one says what becomes of signals that come meanwhile."""
    result: list[ListenerInfo] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(stop())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            failure.append(exc)

    stopper = threading.Thread(target=run, name="netpool-stop")
    stopper.start()
    while stopper.is_alive():
        received = signal.sigtimedwait(HELD_SIGNALS, LOOK_EVERY)
        if received is not None:
            log.warning("%s received while stopping; still waiting for connections (SIGKILL aborts)",
                        signal.Signals(received.si_signo).name)
    stopper.join()
    if failure:
        raise failure[0]
    return result[0]
