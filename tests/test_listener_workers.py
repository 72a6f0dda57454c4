"""Handlers on a worker pool (workers=N), byte counters, and `--metrics-port` scraped over HTTP."""

from __future__ import annotations

import re
import socket
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import connect, recv_exactly, recv_until_closed, serving, wait_for
from .test_cli import server


@pytest.mark.io_modes
def test_worker_pool_keeps_each_connections_order():
    seen: dict[int, list[bytes]] = {}
    threads: set[str] = set()
    lock = threading.Lock()

    def handler(message, conn):
        with lock:
            seen.setdefault(conn.id, []).append(message)
            threads.add(threading.current_thread().name)
        conn.send(message)

    with serving(handler=handler, framing="line", workers=3) as listener:
        socks = [connect(listener) for _ in range(6)]
        for i in range(50):
            for n, sock in enumerate(socks):
                sock.sendall(b"%d:%d\n" % (n, i))
        for n, sock in enumerate(socks):
            expected = b"".join(b"%d:%d\n" % (n, i) for i in range(50))
            assert recv_exactly(sock, len(expected)) == expected
        assert all(messages == sorted(messages, key=lambda m: int(m.split(b":")[1])) for messages in seen.values())
        assert threads and all(name.startswith("netpool-worker-") for name in threads)
        for sock in socks:
            sock.close()


@pytest.mark.io_modes
def test_a_blocked_handler_does_not_hold_other_connections():
    """With workers, even in events mode a handler may block: other clients are still served."""
    release = threading.Event()

    def handler(message, conn):
        if message == b"block":
            release.wait(10)
        conn.send(message)

    with serving(handler=handler, framing="line", workers=2) as listener:
        blocked = connect(listener)
        blocked.sendall(b"block\n")
        with connect(listener) as other:
            other.sendall(b"free\n")
            assert recv_exactly(other, 5) == b"free\n"
        release.set()
        assert recv_exactly(blocked, 6) == b"block\n"
        blocked.close()


@pytest.mark.io_modes
def test_replies_to_pipelined_messages_go_out_before_close():
    def handler(message, conn):
        conn.send(message.upper())

    with serving(handler=handler, framing="line", workers=2) as listener, connect(listener) as sock:
        sock.sendall(b"a\nb\nc\nd\n")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == b"A\nB\nC\nD\n"
        assert wait_for(lambda: listener.info().closed_by_reason == {"eof": 1})


@pytest.mark.io_modes
def test_handler_error_on_a_worker_closes_only_that_connection():
    def handler(message, conn):
        if message == b"boom":
            raise RuntimeError("worker-side bug")
        conn.send(message)

    with serving(handler=handler, framing="line", workers=2) as listener:
        ok = connect(listener)
        with connect(listener) as bad:
            bad.sendall(b"boom\n")
            assert recv_until_closed(bad) == b""
        ok.sendall(b"fine\n")
        assert recv_exactly(ok, 5) == b"fine\n"
        assert wait_for(lambda: listener.info().closed_by_reason == {"handler_error": 1})
        ok.close()


@pytest.mark.io_modes
def test_bytes_in_and_out_are_counted():
    def handler(message, conn):
        conn.send(message * 2)

    with serving(handler=handler, framing="line") as listener, connect(listener) as sock:
        sock.sendall(b"abc\n")
        assert recv_exactly(sock, 7) == b"abcabc\n"
        # The server counts a send once send() returns, which may be just after we read it.
        assert wait_for(lambda: (listener.info().bytes_in, listener.info().bytes_out) == (4, 7))
    assert (listener.info().bytes_in, listener.info().bytes_out) == (4, 7), "closed connections keep their counts"


def test_metrics_port_serves_prometheus_text(tmp_path):
    with server("echo", "--port", "0", "--metrics-port", "0", "--name", "api", cwd=tmp_path) as srv:
        port = int(srv.listening()["address"].rpartition(":")[2])
        url = srv.expect(re.compile(r"metrics on (?P<url>http://\S+)"))["url"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"hello")
            assert recv_exactly(sock, 5) == b"hello"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("netpool_listener_accepted_total", (("listener", "api"),))] == 1
        assert samples[("netpool_listener_live_connections", (("listener", "api"),))] == 1
        assert samples[("netpool_handler_duration_seconds_count", (("listener", "api"),))] >= 1
        returncode, _ = srv.stop()
        assert returncode == 0
