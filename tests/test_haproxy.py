"""A real HAProxy in front of two netpool listeners, with the PROXY protocol v2, on loopback ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from .conftest import ask_line, serving, wait_for

HAPROXY = shutil.which("haproxy")
pytestmark = [
    pytest.mark.io_modes,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is installed by `make test` (Debian package)"),
]


def who_handler(name: str):
    """Answers each line with the back end's name and the client address it sees."""

    def handler(message, conn):
        host, port = conn.peer[0], conn.peer[1]
        conn.send(f"{name} {host}:{port} {message.decode()}".encode())

    return handler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def balanced(tmp_path: Path) -> Iterator[tuple[int, list]]:
    """Two netpool back ends behind HAProxy; yields (front port, [listener1, listener2])."""
    settings = dict(framing="line", proxy_protocol="v2", proxy_trusted=("127.0.0.1/32",))
    with serving(handler=who_handler("b1"), name="b1", **settings) as b1, \
            serving(handler=who_handler("b2"), name="b2", **settings) as b2:
        front = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(f"""
global
    maxconn 2000
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    retries 3
    option redispatch
frontend front
    bind 127.0.0.1:{front}
    default_backend netpool
backend netpool
    balance roundrobin
    server b1 127.0.0.1:{b1.port} send-proxy-v2 check check-send-proxy inter 100ms fall 1 rise 1
    server b2 127.0.0.1:{b2.port} send-proxy-v2 check check-send-proxy inter 100ms fall 1 rise 1
""")
        check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(lambda: _accepts(front), what="HAProxy to listen")
            # Health checks (sent with their own PROXY header) reach both back ends.
            wait_for(lambda: b1.info().accepted and b2.info().accepted, what="health checks on both back ends")
            yield front, [b1, b2]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def ask(front: int, text: str) -> tuple[str, str, tuple[str, int]]:
    """One client: send a line through HAProxy; return (back end, address it saw, our address)."""
    reply, ours = ask_line(front, text.encode())
    backend, seen, echoed = reply.decode().split(" ", 2)
    assert echoed == text
    return backend, seen, ours


def test_echo_through_haproxy_reaches_both_back_ends_with_the_real_client_address(balanced):
    front, _ = balanced
    backends = set()
    for i in range(20):
        backend, seen, ours = ask(front, f"hello {i}")
        backends.add(backend)
        assert seen == f"{ours[0]}:{ours[1]}", "the handler sees the client, not HAProxy"
    assert backends == {"b1", "b2"}


def test_stopping_one_back_end_moves_all_traffic_to_the_other_with_no_failed_client(balanced):
    front, (b1, b2) = balanced
    assert {ask(front, f"warm {i}")[0] for i in range(6)} == {"b1", "b2"}
    b2.stop(grace=1.0)
    answers = [ask(front, f"after {i}") for i in range(40)]  # any failure raises here
    assert {backend for backend, _, _ in answers[-20:]} == {"b1"}
