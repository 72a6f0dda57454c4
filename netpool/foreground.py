"""Serving in the foreground of a process until SIGINT or SIGTERM, then stopping gracefully.

Shared by the CLI (one process) and by each worker of the multi-process
supervisor.
"""

from __future__ import annotations

import logging
import os
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
from .sockets import open_listening_socket, remove_unix_socket

__all__ = ["run_until_signal", "StopRequested", "STOP_SIGNALS", "HELD_SIGNALS", "same_address"]

log = logging.getLogger("netpool.cli")

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# Held from before a listener starts until their handlers are in place (the
# default action of SIGHUP or SIGQUIT would end the process).
HELD_SIGNALS = STOP_SIGNALS | {signal.SIGHUP, signal.SIGQUIT}


class ReloadRequested(BaseException):
    """Raised in the main thread by the SIGHUP handler to leave wait() and reload."""


def _on_reload(signum: int, _frame: Any) -> None:
    raise ReloadRequested()


class StopRequested(BaseException):
    """Raised in the main thread by the SIGINT/SIGTERM (or SIGQUIT: retire) handler to leave wait()."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signame = signal.Signals(signum).name


def _on_signal(signum: int, _frame: Any) -> None:
    # From now on further signals only log: the graceful stop must not be
    # interrupted half-way by an impatient second Ctrl-C.
    for held in STOP_SIGNALS | {signal.SIGQUIT}:
        signal.signal(held, _already_stopping)
    raise StopRequested(signum)


def _already_stopping(signum: int, _frame: Any) -> None:
    # Written straight to stderr: a signal handler can run in the middle of
    # a logging call's write, and the stream refuses to be entered twice.
    os.write(2, f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING netpool.cli: {signal.Signals(signum).name} "
                "received while stopping; still waiting for connections (SIGKILL aborts)\n".encode())


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

    Stop signals are held from before the "listening" line until their
    handlers are in place: a SIGTERM sent the moment the server reports it
    is up is still handled gracefully, not fatal. Raises ListenError or
    TLSError if the listener cannot start.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    owned: Optional[socket.socket] = None
    owned_inode: Optional[int] = None
    try:
        if sock is None:
            # Bound here rather than by the listener, so that the generations
            # of a reload can share it.
            sock = owned = open_listening_socket(config)
            if config.unix is not None:
                owned_inode = os.lstat(config.unix).st_ino
        listener = start_listener(config, sock=sock)
        if on_started is not None:
            try:
                on_started(listener)
            except BaseException:
                listener.stop(0)
                raise
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        if owned is not None:
            _close_owned(owned, config, owned_inode)
        raise
    generations = _Generations(listener, sock, grace, reload_config, on_replaced)
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGQUIT, _on_signal)
    signal.signal(signal.SIGHUP, _on_reload if reloads else signal.SIG_IGN)
    # systemd (Type=notify), if it started us: up now, and what it serves.
    notify("READY=1", f"STATUS={_status(listener)}")
    status = StatusReporter(lambda: _status(generations.listener))
    retire = False
    try:
        held = True
        while True:
            try:
                if held:  # a signal held until now is handled right here, inside this try
                    held = False
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
                generations.listener.wait()
                break
            except ReloadRequested:
                # One at a time: a SIGHUP meanwhile waits, then reloads again.
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
                try:
                    generations.reload()
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    except StopRequested as stop:
        retire = stop.signame == "SIGQUIT"
        if retire:
            log.info("SIGQUIT received: retiring (no new connections; live ones get %gs to finish)", grace)
        else:
            log.info("%s received: stopping (grace %gs)", stop.signame, grace)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # stopping: a reload now would only get in the way
    status.stop()
    notify("STOPPING=1", f"STATUS=stopping: {generations.listener.info().live} live connections get {grace:g} s")
    try:
        return generations.stop(retire=retire, on_stopped_accepting=on_stopped_accepting)
    finally:
        if owned is not None:
            _close_owned(owned, config, owned_inode)


def _close_owned(sock: socket.socket, config: ListenerConfig, inode: Optional[int]) -> None:
    sock.close()
    if config.unix is not None and inode is not None:
        remove_unix_socket(config.unix, inode)
