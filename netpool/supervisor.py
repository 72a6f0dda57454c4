"""Several worker processes on one listening socket, supervised by their parent.

One CPython process runs Python code on one core, so ``processes=N`` forks N
workers, each with its own acceptors, counter and ``max_connections``. The
parent binds the socket once (or takes it from systemd) and every worker
accepts on it: the kernel wakes one blocked accept() per client, and a
client queued on the socket waits there for whichever worker takes it, so a
worker that dies or is replaced never takes queued clients down with it
(with a socket per worker, SO_REUSEPORT, its backlog was reset). The parent
only supervises:

- it binds first (so ``port=0`` gives every worker the same port),
- restarts a worker that dies, with a back-off per worker if it keeps dying at start,
- on SIGHUP replaces the workers one at a time (a rolling reload): the new
  one listens before the old one is told to retire (SIGQUIT), so capacity
  never drops, and a config or handler that cannot load changes nothing,
- forwards SIGINT/SIGTERM for a graceful stop of all, and
- logs one summary across all workers, which each report through a pipe.

The parent forks before it starts any thread, the only time fork is safe.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import Any, Callable, Optional

from .config import ListenerConfig, format_address
from .errors import ConfigError, NetpoolError
from .foreground import run_until_signal, same_address
from .listener_info import ListenerInfo, combined
from .live_board import LiveBoard
from .sd_notify import forget as forget_notify_socket
from .sd_notify import STATUS_EVERY, notify
from .sockets import open_shared_socket

__all__ = ["serve_processes"]

log = logging.getLogger("netpool.supervisor")

PR_SET_PDEATHSIG = 1  # prctl(2)
# What the parent waits for: a worker's end, a reload, a stop.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
PARENT_SIGNALS = STOP_SIGNALS | {signal.SIGCHLD, signal.SIGHUP}
# A worker that dies before it listened, or within FAST_DEATH of its start,
# is failing at start (a module no forked child survives, a certificate only
# workers load): its restart waits, twice as long each time, from
# MIN_RESTART_DELAY up to MAX_RESTART_DELAY, so a crash loop costs a fork
# every few seconds instead of a fork storm. One that served for longer is
# restarted at once and its delay starts over. The parent keeps taking
# signals while a restart waits (it is due, not slept on): a stop or a
# reload is never held up by a back-off.
FAST_DEATH = 5.0
MIN_RESTART_DELAY = 0.1
MAX_RESTART_DELAY = 5.0
# How long stopped workers get beyond their own grace before SIGKILL.
KILL_MARGIN = 5.0
# What a worker writes to its report pipe once it listens, and how long the
# parent waits for it (before READY=1, or before retiring an old worker).
LISTENING = b"+"
READY_WAIT = 30.0
# What a retiring worker writes once it takes no new clients (its acceptors
# leave within sockets.ACCEPT_WAKE), and how long a reload waits for it.
STOPPED_ACCEPTING = b"-"
RETIRE_WAIT = 5.0


@dataclasses.dataclass
class _Worker:
    index: int
    pid: int
    report_fd: int
    started: float
    slot: int
    """Its counter on the live board (the slot its predecessor did not use, so the two never share one)."""
    retiring: bool = False
    """Told to retire (a reload replaced it): its exit is expected, not restarted."""
    listened: bool = False
    """It said LISTENING: it got as far as serving."""


@dataclasses.dataclass
class _Supervisor:
    """What the parent keeps while workers run; the config is the one new workers get."""

    config: ListenerConfig
    asked: ListenerConfig
    """The config as given (port 0 stays 0), to tell what a reload changed."""
    sock: socket.socket
    grace: float
    reload_config: Optional[Callable[[], ListenerConfig]]
    address: str
    """Where the shared socket listens (the socket's own address: systemd may have bound it)."""
    board: LiveBoard
    workers: dict[int, _Worker] = dataclasses.field(default_factory=dict)
    reports: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    restarts: int = 0
    reloads: int = 0
    delays: dict[int, float] = dataclasses.field(default_factory=dict)
    """Per worker index: the wait before its last restart (0: it did not fail at start)."""
    due: dict[int, tuple[float, int]] = dataclasses.field(default_factory=dict)
    """Per worker index waiting out its back-off: (when it restarts, monotonic; its live board slot)."""


def serve_processes(config: ListenerConfig, processes: int, grace: float, *,
                    sock: Optional[socket.socket] = None,
                    reload_config: Optional[Callable[[], ListenerConfig]] = None) -> int:
    """Run ``processes`` workers of ``config`` until SIGINT/SIGTERM; returns the exit status.

    ``sock`` is a listening socket to share (from systemd); without it the
    parent binds ``config``'s address. SIGHUP replaces the workers with ones
    built from ``reload_config()`` (``config`` again without it).
    """
    close_owned: Optional[Callable[[], None]] = None
    if sock is None:
        sock, close_owned = open_shared_socket(config)
    asked = config
    name = sock.getsockname()
    if not isinstance(name, str):
        config = config.replace(port=name[1])
    state = _Supervisor(config=config, asked=asked, sock=sock, grace=grace, reload_config=reload_config,
                        address=name if isinstance(name, str) else format_address(name[:2]),
                        board=LiveBoard(processes))
    workers = state.workers
    # The parent takes its signals synchronously (sigwaitinfo) instead of in
    # handlers: a handler's exception can land anywhere, and one that landed
    # between waitpid() and its bookkeeping once lost a worker's death or
    # cut a reload in half. Blocked from before the first fork, so a signal
    # sent at startup waits its turn instead of being missed.
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, PARENT_SIGNALS)
    try:
        for index in range(processes):
            _spawn(state, config, index, state.board.slot(index, 0))
        log.info("%s: %d worker processes serving %s (max_connections=%d each)", config.name, processes,
                 state.address, config.max_connections)
        for worker in list(workers.values()):
            _wait_for(worker, LISTENING, time.monotonic() + READY_WAIT)
        notify("READY=1", f"STATUS={_status(state)}")
        next_status = time.monotonic() + STATUS_EVERY
        while True:
            wake = min([next_status, *(when for when, _ in state.due.values())])
            received = signal.sigtimedwait(PARENT_SIGNALS, max(0.0, wake - time.monotonic()))
            if received is None:
                _restart_due(state)
                if time.monotonic() >= next_status:
                    notify(f"STATUS={_status(state)}")
                    next_status = time.monotonic() + STATUS_EVERY
                continue
            signum = received.si_signo
            if signum == signal.SIGCHLD:
                _reap(state)
            elif signum == signal.SIGHUP:
                _roll(state)
            else:
                break
        log.info("%s received: stopping %d workers (grace %gs)", signal.Signals(signum).name, len(workers), grace)
        notify("STOPPING=1", f"STATUS=stopping {len(workers)} workers (grace {grace:g} s)")
        state.reports.extend(_stop_all(workers, grace))
    finally:
        # Signals that came while stopping are spent: taken here, not let
        # through to their default actions (a second SIGTERM would kill us).
        while signal.sigpending() & PARENT_SIGNALS:
            signal.sigtimedwait(PARENT_SIGNALS, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if close_owned is not None:
            close_owned()
    infos = [ListenerInfo(**report) for report in state.reports]
    log.info("%s: all workers stopped (%d restarts, %d reloads): %s", state.config.name, state.restarts,
             state.reloads, combined(infos).summary())
    return 0


def _reap(state: _Supervisor) -> None:
    """Take every worker that ended: a retired one is done; any other is restarted, after a back-off if it failed at start."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        worker = state.workers.pop(pid, None)
        if worker is None:
            continue
        state.reports.extend(_read_report(worker))
        state.board.write(worker.slot, 0)  # a killed worker could not clear its own
        lived = time.monotonic() - worker.started
        if worker.retiring:
            log.info("%s: old worker %d (pid %d) %s after draining", state.config.name, worker.index, pid,
                     _describe(status))
            continue
        if worker.listened and lived >= FAST_DEATH:
            delay = 0.0
        else:
            delay = min(MAX_RESTART_DELAY, max(MIN_RESTART_DELAY, state.delays.get(worker.index, 0.0) * 2))
        state.delays[worker.index] = delay
        log.warning("%s: worker %d (pid %d) %s after %.1fs%s; restarting it%s", state.config.name,
                    worker.index, pid, _describe(status), lived, "" if worker.listened else " before it listened",
                    f" in {delay:.1f}s (back-off: it keeps failing at start)" if delay else "")
        state.due[worker.index] = (time.monotonic() + delay, worker.slot)
    _restart_due(state)


def _restart_due(state: _Supervisor) -> None:
    """Start the workers whose back-off is over (the main loop wakes for the next one)."""
    now = time.monotonic()
    for index, (when, slot) in sorted(state.due.items()):
        if when <= now:
            del state.due[index]
            _spawn(state, state.config, index, slot)
            state.restarts += 1


def _stop_pending() -> bool:
    return bool(signal.sigpending() & STOP_SIGNALS)


def _roll(state: _Supervisor) -> None:
    """A rolling reload: for each worker, start its successor, wait until it listens, then retire the old one."""
    notify("RELOADING=1")
    started = time.monotonic()
    current = sorted((w for w in state.workers.values() if not w.retiring), key=lambda w: w.index)
    log.info("SIGHUP received: reloading %d workers one at a time (config read and handler imported afresh)",
             len(current))
    try:
        config = state.reload_config() if state.reload_config is not None else state.asked
        problem = same_address(state.asked, config)
        if problem is not None:
            raise ConfigError("reload", problem)
    except ConfigError as exc:
        log.error("reload failed, so the running workers go on unchanged: %s", exc)
        notify("READY=1", f"STATUS={_status(state)}")
        return
    config = config.replace(port=state.config.port)
    replaced = 0
    for old in current:
        if _stop_pending():
            log.warning("reload interrupted by a stop signal after %d of %d workers", replaced, len(current))
            break
        new = _spawn(state, config, old.index, old.slot ^ 1)
        if not _wait_for(new, LISTENING, time.monotonic() + READY_WAIT):
            new.retiring = True  # not to be restarted: its old worker still serves
            _kill(new.pid, signal.SIGTERM)
            log.error("reload stopped: the new worker %d (pid %d) did not start listening (its error is logged "
                      "above); %d of %d workers were replaced, the others go on unchanged",
                      old.index, new.pid, replaced, len(current))
            break
        old.retiring = True
        _kill(old.pid, signal.SIGQUIT)  # the worker's run_until_signal: Listener.retire
        # Next, or done, only once the old one takes nobody: after that every
        # new client meets the new code.
        if not _wait_for(old, STOPPED_ACCEPTING, time.monotonic() + RETIRE_WAIT):
            log.warning("reload: the old worker %d (pid %d) did not say it stopped accepting within %gs",
                        old.index, old.pid, RETIRE_WAIT)
        replaced += 1
        log.info("reload: worker %d replaced (new pid %d listening; old pid %d draining, grace %gs)",
                 old.index, new.pid, old.pid, state.grace)
    if replaced:
        state.config = config
        state.reloads += 1
    log.info("reload done in %.2fs: %d of %d workers replaced", time.monotonic() - started, replaced, len(current))
    notify("READY=1", f"STATUS={_status(state)}")


def _status(state: _Supervisor) -> str:
    """What systemd shows (STATUS=): the workers, the address, and the connections all of them hold."""
    serving = sum(1 for worker in state.workers.values() if not worker.retiring)
    return f"{serving} worker processes serving {state.address}: {state.board.total()} live connections"


def _die_with(parent: int) -> None:
    """In a worker: be sent SIGTERM (a graceful stop) if the supervisor dies without stopping us.

    A supervisor killed outright (SIGKILL, the OOM killer) cannot pass its
    stop on; without this its workers went on serving, orphaned, holding the
    port. Linux's PR_SET_PDEATHSIG does it; elsewhere nothing happens.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)  # held until run_until_signal handles it


def _spawn(state: _Supervisor, config: ListenerConfig, index: int, slot: int) -> _Worker:
    parent = os.getpid()
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker
        status = 1
        try:
            os.close(read_fd)
            _die_with(parent)
            for other in state.workers.values():
                os.close(other.report_fd)  # the parent's ends: a worker holds only its own pipe
            forget_notify_socket()  # systemd hears from the parent only (NotifyAccess=main)
            # The parent's blocked signals are inherited: run_until_signal
            # takes over the stop and reload ones, SIGCHLD is the worker's own.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            worker_config = config.replace(name=f"{config.name}[{index}]")
            # One byte once listening, for the parent's READY=1 and reloads; the report follows at the end.
            def started(listener: Any) -> None:
                state.board.keep_writing(slot, lambda: listener.info().live, listener.wait)
                _tell(write_fd, LISTENING)

            info = run_until_signal(worker_config, state.grace, on_started=started, sock=state.sock, reloads=False,
                                    on_stopped_accepting=lambda: _tell(write_fd, STOPPED_ACCEPTING))
            _tell(write_fd, json.dumps(dataclasses.asdict(info)).encode())
            status = 0
        except NetpoolError as exc:  # a certificate, an address: the message says what to change
            log.error("%s: worker %d cannot start: %s", config.name, index, exc)
        except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(status)
    os.close(write_fd)
    worker = state.workers[pid] = _Worker(index, pid, read_fd, time.monotonic(), slot)
    log.info("%s: worker %d started (pid %d)", config.name, index, pid)
    return worker


def _tell(report_fd: int, data: bytes) -> None:
    """In a worker: write to the supervisor's end of the report pipe, unless the supervisor is gone."""
    try:
        os.write(report_fd, data)
    except BrokenPipeError:
        pass  # killed outright: nobody to tell, and the worker stops anyway (_die_with)


def _wait_for(worker: _Worker, byte: bytes, deadline: float) -> bool:
    """Wait (until ``deadline``) for the worker's ``byte`` (LISTENING, STOPPED_ACCEPTING); False if it died or took too long.

    The byte is read here; one not read (a worker restarted later) is
    dropped from the front of its report (_read_report).
    """
    while True:
        ready, _, _ = select.select([worker.report_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        got = os.read(worker.report_fd, 1)
        if got == LISTENING:
            worker.listened = True
        if got != LISTENING or byte == LISTENING:
            return got == byte
        # A LISTENING nobody waited for (a restarted worker's): skip it.


def _read_report(worker: _Worker) -> list[dict[str, Any]]:
    chunks = []
    try:
        while chunk := os.read(worker.report_fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(worker.report_fd)
    data = b"".join(chunks)
    if data.startswith(LISTENING):  # nobody waited for it (a restarted worker's)
        worker.listened = True
    data = data.lstrip(LISTENING + STOPPED_ACCEPTING)  # a JSON report never starts with them
    if not data:
        return []  # killed before it could report
    try:
        return [json.loads(data)]
    except ValueError:
        return []


def _stop_all(workers: dict[int, _Worker], grace: float) -> list[dict[str, Any]]:
    worker: Optional[_Worker]  # None too: what waitpid reaped may be no worker of ours
    for worker in workers.values():
        if not worker.retiring:  # those are draining already, within the same grace
            _kill(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace + KILL_MARGIN
    reports: list[dict[str, Any]] = []
    while workers:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            for worker in workers.values():
                log.warning("worker %d (pid %d) did not stop in time; killing it", worker.index, worker.pid)
                _kill(worker.pid, signal.SIGKILL)
            deadline = time.monotonic() + KILL_MARGIN
        pid, _status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(min(0.05, max(remaining, 0.0)))  # bounded poll while workers drain
            continue
        worker = workers.pop(pid, None)
        if worker is not None:
            reports.extend(_read_report(worker))
    return reports


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
