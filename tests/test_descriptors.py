"""Running out of file descriptors: EMFILE recovery, and "grow" capped by the open-file limit.

Each test runs the server in a child process that lowers its own
RLIMIT_NOFILE (soft limit only) before starting the listener, so the parent
(pytest) keeps its own descriptors; once in each I/O mode (the io_modes
marker), since each mode has its own read path for what the acceptors admit.
The child speaks the line protocol: every line is echoed, except ``info``,
which answers one JSON line of counters from ``conn.listener.info()``. It
prints its port on stdout, logs to stderr, and stops cleanly (exit 0) on
SIGTERM.

Every wait has a deadline. The one timed wait that is not waiting *for*
something is the CPU-time window, where the wait is the measurement.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import netpool
from netpool.admission import FD_RESERVE

from .conftest import wait_for

pytestmark = [pytest.mark.timeout(60), pytest.mark.io_modes]

HOST = "127.0.0.1"
REPO_ROOT = str(Path(netpool.__file__).resolve().parent.parent)

CHILD_SCRIPT = r'''
import json, logging, resource, signal, sys
import netpool

nofile = int(sys.argv[1])
settings = json.loads(sys.argv[2])
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")


def handler(message, conn):
    if message == b"info":
        i = conn.listener.info()
        conn.send(json.dumps({
            "refused_by_reason": dict(i.refused_by_reason),
            "closed_by_reason": dict(i.closed_by_reason),
            "accepted": i.accepted,
            "admitted": i.admitted,
            "refused": i.refused,
            "closed": i.closed,
            "errors": i.errors,
            "live": i.live,
            "open": i.open,
            "max_connections": i.max_connections,
            "ceiling": i.ceiling,
            "grown": i.grown,
        }).encode())
    else:
        conn.send(message)


# SIGTERM is taken synchronously by the main thread (sigtimedwait below):
# block it before any thread starts, so every thread inherits the mask.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
listener = netpool.start_listener(dict(handler=handler, host="127.0.0.1", port=0, framing="line", **settings))
print(listener.port, flush=True)
# A bounded life: a child the test forgot (it never does) stops by itself.
got = signal.sigtimedwait({signal.SIGTERM}, 60.0)
listener.stop(grace=2.0)
sys.exit(0 if got is not None else 3)
'''

FD_WARNING = "accept() failed"


class ClientsLeftHanging(AssertionError):
    """Clients the server could not hold were neither served nor closed (the known EMFILE bug)."""


class Child:
    """The server subprocess, with its stdout and stderr collected line by line."""

    def __init__(self, tmp_path: Path, nofile: int, **settings: Any) -> None:
        script = tmp_path / "server.py"
        script.write_text(CHILD_SCRIPT)
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(nofile), json.dumps(settings)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._cond = threading.Condition()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), name="child-stdout", daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), name="child-stderr", daemon=True),
        ]
        try:
            for reader in self._readers:
                reader.start()
            self.port = int(self.wait_line(self.stdout, lambda line: line.strip().isdigit(), 10.0, "the child's port"))
        except BaseException:
            self.kill()  # not yet known to the fixture: never leave it running
            raise

    def _read(self, pipe: Any, lines: list[str]) -> None:
        for raw in pipe:  # ends at EOF, when the child exits
            with self._cond:
                lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, lines: list[str], predicate: Callable[[str], bool], timeout: float, what: str, start: int = 0) -> str:
        """The first line (from index ``start``) matching ``predicate``; fail at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines[start:]:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)):
                    raise AssertionError(f"no line for {what} within {timeout}s; stderr:\n" + "\n".join(self.stderr[-30:]))
                self._cond.wait(min(remaining, 0.5))

    def lines_with(self, text: str) -> list[str]:
        with self._cond:
            return [line for line in self.stderr if text in line]

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads), from /proc/PID/stat."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5.0)
        for reader in self._readers:
            if reader.ident is not None:
                reader.join(5.0)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


class Control:
    """One admitted client that asks the child for its counters (the ``info`` line)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5.0)
        self._file = self.sock.makefile("rb")

    def request(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\n")
        reply = self._file.readline()
        assert reply.endswith(b"\n"), f"no reply to {line!r}"
        return reply[:-1]

    def info(self) -> dict[str, Any]:
        return json.loads(self.request(b"info"))

    def wait_info(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 10.0) -> dict[str, Any]:
        box: dict[str, Any] = {}

        def check() -> bool:
            box["info"] = info = self.info()
            return predicate(info)

        try:
            wait_for(check, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last info: {box.get('info')}") from None
        return box["info"]

    def close(self) -> None:
        self._file.close()
        self.sock.close()


@pytest.fixture
def child_factory(tmp_path: Path, io_mode: str) -> Iterator[Callable[..., Child]]:
    """Start server subprocesses in this test's I/O mode; each is killed at teardown whatever happened."""
    children: list[Child] = []

    def start(nofile: int, **settings: Any) -> Child:
        child = Child(tmp_path, nofile, io=io_mode, **settings)
        children.append(child)
        # The child really serves in that mode (its listening line says so).
        child.wait_line(child.stderr, lambda line: " listening on " in line, 10.0, "the listening line")
        assert f"(io={io_mode}," in child.lines_with(" listening on ")[0]
        return child

    try:
        yield start
    finally:
        for child in children:
            child.kill()


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    """Client sockets opened by a test; all closed at teardown."""
    socks: list[socket.socket] = []
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def open_clients(port: int, n: int, into: list[socket.socket]) -> list[socket.socket]:
    """Connect n clients (the kernel completes each handshake into the backlog)."""
    new = []
    for _ in range(n):
        sock = socket.create_connection((HOST, port), timeout=5.0)
        into.append(sock)
        new.append(sock)
    return new


def echoes(port: int, into: list[socket.socket], message: bytes = b"hello") -> bool:
    sock = open_clients(port, 1, into)[0]
    sock.sendall(message + b"\n")
    got = b""
    while not got.endswith(b"\n") and len(got) < 1024:
        chunk = sock.recv(1024)
        if not chunk:
            break
        got += chunk
    sock.close()
    return got == message + b"\n"


def closed_by_server(sock: socket.socket) -> bool:
    """The client (which never sent anything) sees EOF or a reset. Only call on a readable socket."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def collect_closes(socks: list[socket.socket], deadline: float, done: Callable[[int], bool]) -> dict[socket.socket, float]:
    """Wait (until ``deadline``) for the server to close these clients; returns sock -> monotonic time seen.

    Stops early once ``done(number_closed_so_far)`` is true.
    """
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    closed: dict[socket.socket, float] = {}
    while by_fd and not done(len(closed)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for fd, _events in poller.poll(min(remaining, 0.1) * 1000):
            sock = by_fd.pop(fd)
            poller.unregister(fd)
            assert closed_by_server(sock), "the server sent data to a client that never asked for any"
            closed[sock] = time.monotonic()
    return closed


def assert_consistent(info: dict[str, Any]) -> None:
    assert info["accepted"] == info["admitted"] + info["refused"], info
    assert info["refused"] == sum(info["refused_by_reason"].values()), info
    assert info["closed"] + info["live"] == info["admitted"], info


# -- 1. EMFILE ----------------------------------------------------------------

EMFILE_NOFILE = 64
EMFILE_CLIENTS = 120
# "Promptly": a client the server cannot hold must see its connection closed
# within this long, not wait in the backlog until a descriptor frees up.
PROMPT = 3.0


def test_emfile_clients_beyond_the_limit_are_closed_promptly(child_factory, clients):
    child = child_factory(EMFILE_NOFILE, acceptors=4, max_connections=1000)
    control = Control(child.port)
    try:
        control.wait_info(lambda i: i["live"] == 1, "the control connection to be admitted")
        flood = open_clients(child.port, EMFILE_CLIENTS, clients)
        flooded_at = time.monotonic()
        child.wait_line(child.stderr, lambda line: FD_WARNING in line, 5.0, "the EMFILE warning")

        # Every client is either admitted (held open, silent) or closed by the server.
        state: dict[str, Any] = {"info": control.info()}

        def all_accounted(n_closed: int) -> bool:
            state["info"] = info = control.info()
            return n_closed + (info["admitted"] - 1) >= EMFILE_CLIENTS

        closed = collect_closes(flood, flooded_at + PROMPT, all_accounted)
        info = state["info"] = control.info()
        held = info["admitted"] - 1
        hanging = EMFILE_CLIENTS - held - len(closed)
        if hanging or not closed:
            raise ClientsLeftHanging(
                f"{hanging} of the {EMFILE_CLIENTS - held} clients the server could not hold are still waiting "
                f"after {PROMPT}s (closed {len(closed)}, held {held}); info: {info}"
            )
        assert info["refused_by_reason"].get("no_descriptors", 0) >= len(closed), info
        assert max(closed.values()) - flooded_at < PROMPT
    finally:
        control.close()
        for sock in clients:
            sock.close()
        assert child.terminate() == 0


def test_emfile_is_logged_rate_limited_does_not_spin_and_recovers(child_factory, clients):
    child = child_factory(EMFILE_NOFILE, acceptors=4, max_connections=1000)
    control = Control(child.port)
    try:
        control.wait_info(lambda i: i["live"] == 1, "the control connection to be admitted")
        open_clients(child.port, EMFILE_CLIENTS, clients)
        first = child.wait_line(child.stderr, lambda line: FD_WARNING in line, 5.0, "the EMFILE warning")
        assert "Too many open files" in first and "ulimit -n" in first, first
        # Descriptors are exhausted: whatever the server holds now, it can hold no more.
        info = control.info()
        assert info["admitted"] - 1 < EMFILE_CLIENTS, info
        # The control connection is still served while the acceptors cannot accept.
        assert control.request(b"still there?") == b"still there?"

        # (c) No spinning: a client is pending and accept() keeps failing,
        # yet the process uses little CPU. Here the timed wait is the measurement.
        open_clients(child.port, 1, clients)
        window = 1.0
        cpu_before, t_before = child.cpu_seconds(), time.monotonic()
        threading.Event().wait(window)
        cpu_used, elapsed = child.cpu_seconds() - cpu_before, time.monotonic() - t_before
        assert elapsed >= window
        assert cpu_used < 0.3 * elapsed, f"the child used {cpu_used:.2f}s of CPU in {elapsed:.2f}s while out of descriptors"

        # (b) Rate-limited: one line per 5 s interval however many accept() calls
        # fail (4 acceptors backing off at most 0.5 s each fail >= 8 times a second);
        # the next line says how many were held back.
        start = child.stderr.index(first) + 1
        second = child.wait_line(child.stderr, lambda line: FD_WARNING in line, 8.0, "the next EMFILE warning", start)
        suppressed = re.search(r"\((\d+) similar messages suppressed\)", second)
        assert suppressed and int(suppressed.group(1)) >= 10, second
        assert len(child.lines_with(FD_WARNING)) == 2

        # (d) Recovery: the clients leave, descriptors free up, the server serves again.
        for sock in clients:
            sock.close()
        total = 1 + EMFILE_CLIENTS + 1  # control, the flood, the pending one
        # Every client is accepted exactly once: admitted, or closed through the spare.
        info = control.wait_info(
            lambda i: i["accepted"] == total and i["live"] == 1,
            "every client to be accepted and all but the control connection closed",
        )
        assert_consistent(info)
        assert echoes(child.port, clients, b"back in business")
        info = control.wait_info(lambda i: i["live"] == 1, "the echo client to be closed")
        assert info["accepted"] == total + 1, info
        assert_consistent(info)
        assert set(info["refused_by_reason"]) <= {"no_descriptors"}, info
        assert info["errors"] == 0 and set(info["closed_by_reason"]) == {"eof"}, info
    finally:
        control.close()
        for sock in clients:
            sock.close()
        rc = child.terminate()
    assert rc == 0, "\n".join(child.stderr[-20:])
    assert not child.lines_with("Traceback") and not child.lines_with(" ERROR "), "\n".join(child.stderr)


def test_emfile_spare_descriptor_closes_excess_clients_with_one_acceptor(child_factory, clients):
    """The spare-descriptor trick itself works when no other acceptor races it for the freed slot."""
    child = child_factory(EMFILE_NOFILE, acceptors=1, max_connections=1000)
    control = Control(child.port)
    excess = 6
    try:
        control.wait_info(lambda i: i["live"] == 1, "the control connection to be admitted")
        # Fill every descriptor one client at a time, each proven admitted, until
        # the server reports it ran out.
        held = 0
        for _ in range(EMFILE_NOFILE):
            if child.lines_with(FD_WARNING):
                break
            open_clients(child.port, 1, clients)
            held += 1
            control.wait_info(
                lambda i: i["admitted"] == 1 + held or i["refused"] > 0,
                f"client {held} to be admitted or refused",
            )
        info = control.info()
        held = info["admitted"] - 1
        assert child.lines_with(FD_WARNING), info
        assert 0 < held < EMFILE_NOFILE, info
        extra = open_clients(child.port, excess, clients)
        extra_at = time.monotonic()
        closed = collect_closes(extra, extra_at + PROMPT + 2.0, lambda n: n == len(extra))
        assert len(closed) == len(extra), f"only {len(closed)} of {len(extra)} excess clients were closed; {control.info()}"
        info = control.info()
        assert info["admitted"] - 1 == held, "no descriptor freed up, yet a client was admitted"
        assert info["refused_by_reason"] == {"no_descriptors": len(clients) - held}, info
        assert_consistent(info)
    finally:
        control.close()
        for sock in clients:
            sock.close()
        assert child.terminate() == 0


# -- 2. "grow" stops at the ceiling set by the open-file limit -----------------

GROW_NOFILE = 300  # ceiling = 300 - FD_RESERVE - 4 acceptors = 232: reached with ~245 descriptors in use
GROW_ACCEPTORS = 4
GROW_START = 10
GROW_STEP = 128


def test_grow_is_capped_by_the_open_file_limit(child_factory, clients):
    ceiling = GROW_NOFILE - FD_RESERVE - GROW_ACCEPTORS
    first_grow = GROW_START + GROW_STEP
    second_grow = min(first_grow + GROW_STEP, ceiling)
    assert GROW_START < first_grow < ceiling == second_grow < first_grow + GROW_STEP, "pick numbers that hit both cases"

    child = child_factory(GROW_NOFILE, acceptors=GROW_ACCEPTORS, max_connections=GROW_START, overflow="grow", grow_step=GROW_STEP)
    control = Control(child.port)  # connection number 1
    try:
        info = control.wait_info(lambda i: i["live"] == 1, "the control connection to be admitted")
        assert info["ceiling"] == ceiling and info["max_connections"] == GROW_START, info

        def fill_to(total: int) -> dict[str, Any]:
            open_clients(child.port, total - (1 + len(clients)), clients)
            return control.wait_info(lambda i: i["admitted"] == total, f"{total} connections to be admitted")

        info = fill_to(GROW_START)
        assert info["max_connections"] == GROW_START and info["grown"] == 0, info
        info = fill_to(GROW_START + 1)  # one past the limit: grown by exactly the step
        assert info["max_connections"] == first_grow and info["grown"] == 1, info
        info = fill_to(first_grow)
        assert info["max_connections"] == first_grow and info["grown"] == 1, info
        info = fill_to(first_grow + 1)  # past it again: grown to the ceiling, not by a whole step
        assert info["max_connections"] == ceiling and info["grown"] == 2, info
        info = fill_to(ceiling)
        assert info["max_connections"] == ceiling and info["refused"] == 0, info

        # At the ceiling: "grow" can grow no more, so newcomers are refused.
        refused = open_clients(child.port, 2, clients)
        closed = collect_closes(refused, time.monotonic() + 5.0, lambda n: n == len(refused))
        assert len(closed) == len(refused), "clients past the ceiling must be closed, not left waiting"
        info = control.wait_info(lambda i: i["refused"] == 2, "2 refusals")
        assert info["refused_by_reason"] == {"limit": 2}, info
        assert info["max_connections"] == ceiling and info["grown"] == 2 and info["live"] == ceiling, info
        assert_consistent(info)
        # The ceiling kept the server clear of its descriptor limit.
        assert not child.lines_with(FD_WARNING), child.lines_with(FD_WARNING)
        assert control.request(b"ping") == b"ping"
    finally:
        control.close()
        for sock in clients:
            sock.close()
        assert child.terminate() == 0
