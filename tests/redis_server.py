"""A real redis-server (Debian's) for the tests, on a free loopback port, that a test can stop and start again.

Tests of Redis-backed code need the real server, not a fake: its replies,
its errors, and what a client sees when it goes away. The ``redis_server``
fixture in conftest.py makes one ``RedisServer`` for the whole session;
``stop()`` and ``start()`` let a test simulate Redis going away and coming
back empty on the same address, the way a restarted Redis without
persistence does.

The helper speaks just enough RESP over a plain socket (PING, FLUSHALL,
INFO) so that starting, stopping and flushing do not depend on the client
library under test. Every wait has a deadline; nothing sleeps to let the
server settle.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from .conftest import DEADLINE, wait_for

HOST = "127.0.0.1"

# How many free ports the first start tries: another process may take the
# port between our picking it and redis-server binding it.
PORT_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _read_reply(stream) -> bytes | int | None | list:
    """One RESP reply from a buffered socket file: simple string, error (raised), integer, bulk or array."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"redis closed the connection mid-reply ({line!r})")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body
    if kind == b"-":
        raise RuntimeError(f"redis replied with an error: {body.decode(errors='replace')}")
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = stream.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("redis closed the connection mid-reply")
        return data[:-2]
    if kind == b"*":
        size = int(body)
        return None if size < 0 else [_read_reply(stream) for _ in range(size)]
    raise RuntimeError(f"not a RESP reply: {line!r}")


def command(port: int, *args: str, timeout: float = DEADLINE) -> bytes | int | None | list:
    """Send one command to the redis on 127.0.0.1:port on a fresh connection; return its reply.

    Raises OSError when nothing accepts on the port; the socket timeout bounds every step.
    """
    request = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request)
        with sock.makefile("rb") as stream:
            return _read_reply(stream)


def answers(port: int) -> bool:
    """Whether anything accepts a connection on 127.0.0.1:port right now."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


class RedisServer:
    """One redis-server process, no persistence, working in ``directory``; its port stays the same across restarts."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.directory = Path(directory)
        self.host = HOST
        self.port = 0  # chosen by the first start()
        self.log = self.directory / "redis.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (on the same port as before, if it ran before), empty; return once it answers PING.

        The first start picks a free port, and another one if that port was
        taken before redis-server could bind it. A restart must get the same
        port back: the code under test holds the URL.
        """
        if self.running:
            return
        restart = bool(self.port)
        attempts = 1 if restart else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self.port if restart else free_port()
            try:
                self._proc = self._launch(port)
            except _PortTaken:
                if attempt == attempts:
                    raise
                continue
            self.port = port
            return

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it is still running after the deadline); return once the port is closed."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=DEADLINE)
        wait_for(lambda: not answers(self.port), what=f"port {self.port} to stop answering after redis-server exited")

    def flush(self) -> None:
        """Empty every database (FLUSHALL), so a test starts from nothing."""
        if not self.running:
            raise RuntimeError("redis-server is stopped: start() it before flush()")
        reply = command(self.port, "FLUSHALL")
        assert reply == b"OK", f"FLUSHALL replied {reply!r}"

    def _launch(self, port: int) -> subprocess.Popen:
        """Run redis-server on ``port``; return it once it answers PING there (and is the one answering)."""
        # Without a config file redis-server takes its built-in defaults (log
        # to stdout, kept in self.log for the failure messages); --save "" and
        # --appendonly no turn every kind of persistence off, so a restart
        # comes back empty.
        argv = [self.executable, "--port", str(port), "--bind", HOST, "--dir", str(self.directory),
                "--save", "", "--appendonly", "no", "--daemonize", "no"]
        with open(self.log, "ab") as log:
            since = log.tell()  # this run's lines start here (earlier runs' are above)
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self._ready(proc, port, since), what=f"redis-server to answer PING on port {port}")
            # A PONG proves a redis answers, not that it is ours: after our
            # process failed to bind, another one may hold the port.
            pid = self._info_field(port, "process_id")
            if pid != str(proc.pid):
                raise _PortTaken(f"port {port} is answered by another redis-server (pid {pid}), not ours ({proc.pid})")
        except BaseException:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=DEADLINE)
            raise
        return proc

    def _ready(self, proc: subprocess.Popen, port: int, since: int) -> bool:
        if proc.poll() is not None:
            tail = self._log_tail(since)
            if "Address already in use" in tail:
                raise _PortTaken(f"port {port} was taken before redis-server could bind it:\n{tail}")
            raise RuntimeError(f"redis-server exited with status {proc.returncode}:\n{tail}")
        try:
            return command(port, "PING", timeout=1.0) == b"PONG"
        except (OSError, RuntimeError):  # not listening yet, or still loading
            return False

    def _info_field(self, port: int, name: str) -> str | None:
        info = command(port, "INFO", "server")
        assert isinstance(info, bytes)
        for line in info.decode().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value
        return None

    def _log_tail(self, since: int, lines: int = 20) -> str:
        """The last lines redis-server logged from byte ``since`` of the log on."""
        try:
            with open(self.log, "rb") as log:
                log.seek(since)
                text = log.read().decode(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:]) or "(nothing logged)"


class _PortTaken(RuntimeError):
    """The first start's port was taken by someone else: the first start tries another."""
