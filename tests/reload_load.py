"""Load for rolling reloads: long-lived echo clients plus new connections at full rate, counted by outcome.

Used by tests/test_reload_load.py, and from a shell for the figures in
docs/deploy.md::

    python -m tests.reload_load --long-lived 500 --reloads 10 [--processes 2] [--tls]

Long-lived clients each send a line every PAUSE seconds and wait for its
echo; one closed gracefully by the server (the end of the stream) counts as
``graceful`` and connects again. Churn clients connect (and shake hands,
with TLS), send one line, read the echo and close, as fast as they can.
A reset, a refused connection or a failed handshake is counted wherever it
happens; the reloads must leave those at zero.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

PAUSE = 0.25
TIMEOUT = 10.0


class Tally:
    """Outcome counters shared by the client threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        # For each kind of failure, how old its connections were when it
        # happened (seconds since connect): a close after the grace or a
        # handshake timeout says the server stalled or was starved, one at
        # once that it cut a connection it should have served.
        self.ages: dict[str, list[float]] = collections.defaultdict(list)

    def add(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    def fail(self, what: str, since: float) -> None:
        """Count a failure, noting the age of its connection."""
        with self._lock:
            self.counts[what] += 1
            self.ages[what].append(round(time.monotonic() - since, 2))

    def __getitem__(self, what: str) -> int:
        with self._lock:
            return self.counts[what]


class Load:
    """The clients: ``long_lived`` threads holding a connection each, ``churn`` threads connecting over and over."""

    def __init__(self, port: int, *, long_lived: int, churn: int, tls: Optional[ssl.SSLContext]) -> None:
        self.port = port
        self.tls = tls
        self.tally = Tally()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._long_lived, name=f"long-{i}", daemon=True)
                        for i in range(long_lived)]
        self.threads += [threading.Thread(target=self._churn, name=f"churn-{i}", daemon=True) for i in range(churn)]

    def start(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        deadline = time.monotonic() + 2 * TIMEOUT
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self.threads if t.is_alive()]
        if stuck:
            raise AssertionError(f"client threads did not finish: {stuck[:5]}")

    def wait_for(self, what: str, at_least: int, timeout: float = 30.0) -> None:
        """Wait until the ``what`` counter reaches ``at_least`` (load flowing); fail at the deadline."""
        deadline = time.monotonic() + timeout
        while self.tally[what] < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} stayed at {self.tally[what]} (wanted {at_least}): {self.tally.counts}")
            self.stopping.wait(0.02)

    # -- one connection --------------------------------------------------------

    def _connect(self) -> Optional[socket.socket]:
        """A connected (and with TLS, handshaken) socket, or None with the failure counted."""
        since = time.monotonic()
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        except ConnectionRefusedError:
            self.tally.fail("refused", since)
            return None
        except OSError as exc:
            self.tally.fail(f"connect_error:{type(exc).__name__}", since)
            return None
        self.tally.add("connected")
        if self.tls is None:
            return sock
        try:
            return self.tls.wrap_socket(sock, server_hostname="localhost")
        except ConnectionResetError:
            self.tally.fail("reset", since)
        except (ssl.SSLError, OSError) as exc:
            self.tally.add("handshake_failed")
            self.tally.fail(f"handshake_failed:{exc}", since)
        sock.close()
        return None

    def _echo(self, sock: socket.socket, line: bytes) -> str:
        """Send ``line``, read its echo: "ok", "eof" (a graceful close) or "reset"; other failures are named."""
        try:
            sock.sendall(line)
            got = b""
            while not got.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return "eof"
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        except ssl.SSLError as exc:
            return "eof" if "EOF" in str(exc) or "shutdown" in str(exc) else f"tls_error:{exc}"
        except socket.timeout:
            return "timeout"
        return "ok" if got == line else "garbled"

    # -- the two kinds of client ---------------------------------------------

    def _long_lived(self) -> None:
        line = f"{threading.current_thread().name}\n".encode()
        while not self.stopping.is_set():
            since = time.monotonic()
            sock = self._connect()
            if sock is None:
                self.stopping.wait(PAUSE)
                continue
            with sock:
                while True:
                    outcome = self._echo(sock, line)
                    if outcome == "eof":
                        self.tally.add("graceful")
                    elif outcome != "ok":
                        self.tally.fail(outcome, since)
                    if outcome != "ok":
                        break
                    self.tally.add("long_echoes")
                    if self.stopping.wait(PAUSE):
                        self._closed_meanwhile(sock)
                        break

    def _closed_meanwhile(self, sock: socket.socket) -> None:
        """At the end of the load: count a close the server made while this client paused."""
        try:
            if self._closed_by_server(sock):
                self.tally.add("graceful")
        except (ConnectionResetError, BrokenPipeError):
            self.tally.add("reset")

    @staticmethod
    def _closed_by_server(sock: socket.socket) -> bool:
        """Whether the server has already ended this connection (looked at without waiting)."""
        sock.setblocking(False)
        try:
            return not sock.recv(4096)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        except ssl.SSLError:
            return True  # a TLS close_notify or end of stream

    def _churn(self) -> None:
        while not self.stopping.is_set():
            since = time.monotonic()
            sock = self._connect()
            if sock is None:
                continue
            with sock:
                outcome = self._echo(sock, b"churn\n")
                if outcome == "ok" and self._closed_by_server(sock):
                    # Answered, then closed by a retiring generation before
                    # this client closed: the server counts it as its close.
                    self.tally.add("churn_closed_after_answer")
            if outcome == "ok":
                self.tally.add("served")
            else:
                self.tally.fail(f"churn_{outcome}", since)


def run(server_argv: list[str], cwd: Path, *, long_lived: int, churn: int, reloads: int,
        tls: Optional[ssl.SSLContext] = None, log: Callable[[str], None] = lambda line: None) -> dict[str, object]:
    """Start the server, load it, reload it ``reloads`` times, stop it; return the counts of both sides."""
    from .test_cli import Server

    srv = Server(server_argv, cwd=cwd)
    try:
        port = int(srv.expect(r"(?:listening on|worker processes serving) 127\.0\.0\.1:(\d+)")[1])
        processes = "--processes" in server_argv
        if processes:
            for _ in range(2):
                srv.expect(r"\] listening on")
        load = Load(port, long_lived=long_lived, churn=churn, tls=tls).start()
        try:
            load.wait_for("long_echoes", long_lived)
            load.wait_for("served", 50)
            started = time.monotonic()
            for n in range(1, reloads + 1):
                served = load.tally["served"]
                srv.proc.send_signal(signal.SIGHUP)
                srv.expect(r"reload done in .*: 2 of 2 workers replaced" if processes
                           else rf"reload {n}: the new listener serves", timeout=30)
                # The old generation drains (its long-lived clients get their
                # graceful close at the end of the grace) before the next reload.
                for _ in range(2 if processes else 1):
                    srv.expect(r"old worker \d \(pid \d+\) .* after draining" if processes else r"stopped after",
                               timeout=30)
                load.wait_for("served", served + 50)  # new clients served by the new generation
                log(f"reload {n} done; {dict(load.tally.counts)}")
            took = time.monotonic() - started
        finally:
            load.stop()
        returncode, stderr = srv.stop(timeout=60)
    finally:
        srv.kill()
    summary = re.search(r"(?:all workers stopped \(\d+ restarts, (\d+) reloads\)|(\d+) reloads; over all "
                        r"generations): accepted (\d+), refused (\d+)(?: \(([^)]*)\))?, closed (\d+)(?: \(([^)]*)\))?",
                        stderr)
    if summary is None:
        raise AssertionError(f"no summary in the server's log:\n{stderr[-3000:]}")
    closed = dict((k, int(v)) for k, v in (p.rsplit(" ", 1) for p in (summary[7] or "").split(", ") if p))
    return {
        "returncode": returncode,
        "clients": dict(load.tally.counts),
        "failure_ages": dict(load.tally.ages),
        "server_reloads": int(summary[1] or summary[2]),
        "server_accepted": int(summary[3]),
        "server_refused": int(summary[4]),
        "server_closed": closed,
        "seconds": took,
        "stderr": stderr,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-lived", type=int, default=500)
    parser.add_argument("--churn", type=int, default=4)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("--tls", action="store_true")
    args = parser.parse_args()
    netpool = str(Path(sys.executable).with_name("netpool"))
    argv = [netpool, "echo", "--port", "0", "--framing", "line", "--grace", str(args.grace),
            "--max-connections", "4096"]
    if args.processes > 1:
        argv += ["--processes", str(args.processes)]
    context = None
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"reload-load-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    if args.tls:
        from netpool.devcert import write_dev_certificate

        cert, key = write_dev_certificate(str(workdir), force=True)
        argv += ["--certfile", cert, "--keyfile", key]
        context = ssl.create_default_context(cafile=cert)
    result = run(argv, workdir, long_lived=args.long_lived, churn=args.churn, reloads=args.reloads, tls=context,
                 log=print)
    result.pop("stderr")
    print(result)


if __name__ == "__main__":
    main()
