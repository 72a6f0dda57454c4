"""Several worker processes on one port (SO_REUSEPORT), supervised by their parent.

One CPython process runs Python code on one core, so ``processes=N`` forks N
workers that each bind the same address with SO_REUSEPORT (the kernel
spreads new connections across them), each with its own acceptors, counter
and ``max_connections``. The parent only supervises:

- it reserves the port first (so ``port=0`` gives every worker the same port),
- restarts a worker that dies, with a back-off if it keeps dying at once,
- forwards SIGINT/SIGTERM for a graceful stop of all, and
- logs one summary across all workers, which each report through a pipe.

The parent forks before it starts any thread, the only time fork is safe.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import Any, Optional

from .config import ListenerConfig, format_address
from .errors import ListenError
from .foreground import HELD_SIGNALS, StopRequested, run_until_signal
from .listener_info import ListenerInfo
from .sd_notify import forget as forget_notify_socket
from .sd_notify import notify
from .sockets import bind_error_message

__all__ = ["serve_processes"]

log = logging.getLogger("netpool.supervisor")

# A worker that dies within this long of starting counts as a crash loop:
# restarts slow down, up to MAX_RESTART_DELAY between tries.
FAST_DEATH = 1.0
MAX_RESTART_DELAY = 5.0
# How long stopped workers get beyond their own grace before SIGKILL.
KILL_MARGIN = 5.0
# What a worker writes to its report pipe once it listens, and how long the
# parent waits for every worker's before telling systemd it is ready.
LISTENING = b"+"
READY_WAIT = 30.0


@dataclasses.dataclass
class _Worker:
    index: int
    pid: int
    report_fd: int
    started: float


def _reserve_port(config: ListenerConfig) -> Optional[socket.socket]:
    """Bind (never listen) with SO_REUSEPORT so every worker gets the same port, even for port 0."""
    if config.unix is not None:
        return None
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((config.host, config.port))
    except OSError as exc:
        holder.close()
        raise ListenError(bind_error_message(format_address((config.host, config.port)), exc)) from None
    return holder


def serve_processes(config: ListenerConfig, processes: int, grace: float) -> int:
    """Run ``processes`` workers of ``config`` until SIGINT/SIGTERM; returns the exit status."""
    holder = _reserve_port(config)
    if holder is not None:
        config = config.replace(port=holder.getsockname()[1], reuse_port=True)
    elif config.unix is not None:
        raise ValueError("processes > 1 needs a TCP address: UNIX sockets cannot be shared with SO_REUSEPORT")
    workers: dict[int, _Worker] = {}
    reports: list[dict[str, Any]] = []
    restarts = 0
    delay = 0.0
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        for index in range(processes):
            _spawn(config, index, grace, workers)
        log.info("%s: %d worker processes serving %s (max_connections=%d each)",
                 config.name, processes, config.address, config.max_connections)
        _wait_listening(workers.values(), time.monotonic() + READY_WAIT)
        notify("READY=1", f"STATUS={processes} worker processes serving {config.address}")
        signal.signal(signal.SIGINT, _raise_stop)
        signal.signal(signal.SIGTERM, _raise_stop)
        # SIGHUP: each worker reloads (today its TLS certificate; see foreground).
        signal.signal(signal.SIGHUP, lambda signum, frame: _forward(workers, signum))
        try:
            # Inside the try: a SIGTERM held until now raises right here, and
            # must stop the workers like any other (it once orphaned them).
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
            while True:
                pid, status = os.waitpid(-1, 0)
                worker = workers.pop(pid, None)
                if worker is None:
                    continue
                reports.extend(_read_report(worker))
                lived = time.monotonic() - worker.started
                log.warning("%s: worker %d (pid %d) %s after %.1fs; restarting it", config.name, worker.index,
                            pid, _describe(status), lived)
                delay = min(MAX_RESTART_DELAY, max(0.1, delay * 2)) if lived < FAST_DEATH else 0.0
                if delay:
                    time.sleep(delay)  # a crash loop must not become a fork storm
                signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
                _spawn(config, worker.index, grace, workers)
                restarts += 1
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
        except StopRequested as stop:
            log.info("%s received: stopping %d workers (grace %gs)", stop.signame, len(workers), grace)
            notify("STOPPING=1", f"STATUS=stopping {len(workers)} workers (grace {grace:g} s)")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        reports.extend(_stop_all(workers, grace))
    finally:
        if holder is not None:
            holder.close()
    log.info("%s: all workers stopped (%d restarts): %s", config.name, restarts, _summary(reports))
    return 0


def _forward(workers: dict[int, _Worker], signum: int) -> None:
    log.info("%s received: passing it to %d workers", signal.Signals(signum).name, len(workers))
    for worker in list(workers.values()):
        _kill(worker.pid, signum)


def _raise_stop(signum: int, _frame: Any) -> None:
    raise StopRequested(signum)


def _spawn(config: ListenerConfig, index: int, grace: float, workers: dict[int, _Worker]) -> None:
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker
        status = 1
        try:
            os.close(read_fd)
            forget_notify_socket()  # systemd hears from the parent only (NotifyAccess=main)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            worker_config = config.replace(name=f"{config.name}[{index}]")
            # One byte once listening, for the parent's READY=1; the report follows at the end.
            info = run_until_signal(worker_config, grace, on_started=lambda _: os.write(write_fd, LISTENING))
            os.write(write_fd, json.dumps(dataclasses.asdict(info)).encode())
            status = 0
        except BaseException:  # noqa: BLE001 - a worker must never return into the parent's code
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(status)
    os.close(write_fd)
    workers[pid] = _Worker(index, pid, read_fd, time.monotonic())
    log.info("%s: worker %d started (pid %d)", config.name, index, pid)


def _wait_listening(workers: Any, deadline: float) -> None:
    """Wait (until ``deadline``) for each worker's byte saying it listens; a worker that died says nothing.

    The byte is read here; one not read (a worker started later) is dropped
    from the front of its report (_read_report).
    """
    for worker in workers:
        ready, _, _ = select.select([worker.report_fd], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            os.read(worker.report_fd, 1)


def _read_report(worker: _Worker) -> list[dict[str, Any]]:
    chunks = []
    try:
        while chunk := os.read(worker.report_fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(worker.report_fd)
    data = b"".join(chunks).removeprefix(LISTENING)  # a JSON report never starts with it
    if not data:
        return []  # killed before it could report
    try:
        return [json.loads(data)]
    except ValueError:
        return []


def _stop_all(workers: dict[int, _Worker], grace: float) -> list[dict[str, Any]]:
    for worker in workers.values():
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


def _summary(reports: list[dict[str, Any]]) -> str:
    totals: collections.Counter[str] = collections.Counter()
    closed: collections.Counter[str] = collections.Counter()
    refused: collections.Counter[str] = collections.Counter()
    for report in reports:
        for key in ("accepted", "refused", "closed"):
            totals[key] += report.get(key, 0)
        closed.update(report.get("closed_by_reason", {}))
        refused.update(report.get("refused_by_reason", {}))
    info = ListenerInfo(name="all", state="stopped", address="", live=0, open=0, max_connections=0, ceiling=0,
                        accepted=totals["accepted"], admitted=0, refused=totals["refused"],
                        closed=totals["closed"], errors=0, grown=0, refused_by_reason=dict(refused),
                        closed_by_reason=dict(closed))
    return info.summary()
