"""systemd's notify protocol, heard on a real datagram socket as systemd would: who said what, and when.

The socket passes the sender's credentials (SO_PASSCRED), so a test can
check that only the process systemd started speaks (NotifyAccess=main).
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from pathlib import Path
from typing import Iterator

import pytest

from .test_cli import server

DEADLINE = 10.0
UCRED = struct.Struct("3i")  # pid, uid, gid


class NotifySocket:
    """systemd's end: a datagram socket that records (sender pid, lines) per notification."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(DEADLINE)
        self.heard: list[tuple[int, list[str]]] = []

    def until(self, line: str) -> tuple[int, list[str]]:
        """The next notification holding ``line`` (each wait bounded by the socket timeout)."""
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            pid = next(UCRED.unpack(d[:UCRED.size])[0] for level, kind, d in ancillary
                       if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            self.heard.append((pid, data.decode().split("\n")))
            if line in self.heard[-1][1]:
                return self.heard[-1]
        raise AssertionError(f"never heard {line!r}; heard {self.heard}")  # pragma: no cover

    def until_status(self, pattern: str, timeout: float) -> str:
        """The next STATUS= line matching ``pattern`` (a regular expression), within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, _ = self.sock.recvfrom(4096)
            except socket.timeout:
                break
            for line in data.decode().split("\n"):
                if line.startswith("STATUS=") and re.search(pattern, line):
                    return line
        raise AssertionError(f"no STATUS= matching {pattern!r} within {timeout}s")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[NotifySocket, str]]:
    path = str(tmp_path / "notify.sock")
    listener = NotifySocket(path)
    try:
        yield listener, path
    finally:
        listener.close()


def test_ready_status_and_stopping_from_a_single_process(tmp_path, notify_socket):
    heard, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path}
    with server("echo", "--port", "0", cwd=tmp_path, env=env) as srv:
        port = srv.port()
        pid, lines = heard.until("READY=1")
        assert pid == srv.proc.pid
        assert any(line.startswith("STATUS=serving 127.0.0.1:") and str(port) in line for line in lines), lines
        returncode, _ = srv.stop()
        pid, lines = heard.until("STOPPING=1")
        assert pid == srv.proc.pid and returncode == 0


def test_an_abstract_notify_address_works(tmp_path):
    name = f"netpool-test-{os.getpid()}-{time.monotonic_ns()}"
    heard = NotifySocket(b"\0" + name.encode())
    try:
        with server("echo", "--port", "0", cwd=tmp_path, env={**os.environ, "NOTIFY_SOCKET": "@" + name}) as srv:
            srv.port()
            assert heard.until("READY=1")[0] == srv.proc.pid
            srv.stop()
    finally:
        heard.close()


def test_with_worker_processes_only_the_parent_speaks_once_they_listen(tmp_path, notify_socket):
    heard, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path}
    with server("echo", "--port", "0", "--processes", "2", cwd=tmp_path, env=env) as srv:
        pid, lines = heard.until("READY=1")
        assert pid == srv.proc.pid and "STATUS=2 worker processes serving" in " ".join(lines)
        # READY=1 came after both workers were listening: both said so before it.
        for _ in range(2):
            srv.expect(r"\[\d\] listening on", timeout=1.0)
        returncode, _ = srv.stop()
        assert heard.until("STOPPING=1")[0] == srv.proc.pid and returncode == 0
        assert {pid for pid, _ in heard.heard} == {srv.proc.pid}, "a worker spoke to systemd"


def test_sighup_reloads_and_says_so_instead_of_ending_the_process(tmp_path, notify_socket):
    """SIGHUP's default is to end a process; a netpool server reloads instead (RELOADING=1, then READY=1)."""
    import signal

    heard, path = notify_socket
    with server("echo", "--port", "0", cwd=tmp_path, env={**os.environ, "NOTIFY_SOCKET": path}) as srv:
        port = srv.port()
        heard.until("READY=1")
        srv.proc.send_signal(signal.SIGHUP)
        heard.until("RELOADING=1")
        heard.until("READY=1")
        srv.expect("reload 1: the new listener serves")
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as client:
            client.sendall(b"still serving\n")
            assert client.recv(100) == b"still serving\n"
        returncode, _ = srv.stop()
        assert returncode == 0


def test_worker_processes_status_counts_the_connections_of_all_of_them(tmp_path, notify_socket):
    """The parent serves no connection itself; the workers' counts reach its STATUS= through shared memory."""
    heard, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path}
    with server("echo", "--port", "0", "--processes", "2", cwd=tmp_path, env=env) as srv:
        port = int(srv.expect(r"worker processes serving 127\.0\.0\.1:(\d+)")[1])
        heard.until("READY=1")
        clients = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(3)]
        try:
            for client in clients:
                client.sendall(b"x")
                assert client.recv(10) == b"x"
            # The parent refreshes STATUS= every 5 s; the workers write their counts every second.
            line = heard.until_status(r": 3 live connections$", timeout=3 * 5.0)
            assert line.startswith("STATUS=2 worker processes serving 127.0.0.1:")
        finally:
            for client in clients:
                client.close()
        heard.until_status(r": 0 live connections$", timeout=3 * 5.0)
        returncode, _ = srv.stop()
        assert returncode == 0
