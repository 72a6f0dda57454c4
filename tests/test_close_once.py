"""on_close runs exactly once for every connection, whichever way it ends, in both I/O modes.

The counters (info().closed) are kept apart from the hook, so they cannot
show a hook that ran twice or never: here a hook records each connection's
id, and every id accepted must be there exactly once.
"""

from __future__ import annotations

import collections
import queue
import socket
import struct
import threading
import time
from typing import Any

import pytest

from .conftest import connect, recv_exactly, recv_until_closed, run_concurrently, serving, wait_for

pytestmark = pytest.mark.io_modes  # every test runs in both I/O modes

PER_WAY = 8  # connections ended each way


class Ledger:
    """on_connect and on_close hooks that record connection ids (and close reasons), from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connected: list[int] = []
        self.closed: list[tuple[int, str]] = []

    def on_connect(self, conn: Any) -> None:
        with self._lock:
            self.connected.append(conn.id)

    def on_close(self, conn: Any, reason: str) -> None:
        with self._lock:
            self.closed.append((conn.id, reason))

    def check(self, listener: Any, expected_reasons: dict[str, int]) -> None:
        with self._lock:
            connected, closed = list(self.connected), list(self.closed)
        times = collections.Counter(conn_id for conn_id, _ in closed)
        twice = {conn_id: n for conn_id, n in times.items() if n != 1}
        assert not twice, f"on_close ran more than once for these connections (id: times): {twice}"
        assert len(set(connected)) == len(connected) == listener.info().admitted
        missing = set(connected) - set(times)
        assert not missing, f"on_close never ran for {len(missing)} connection(s): {sorted(missing)}"
        assert set(times) == set(connected), f"on_close for connections never accepted: {set(times) - set(connected)}"
        assert dict(collections.Counter(reason for _, reason in closed)) == expected_reasons
        assert dict(listener.info().closed_by_reason) == expected_reasons


def make_handler(blocked: "queue.Queue[int]", release: threading.Event):
    def handler(message: bytes, conn: Any) -> None:
        if message == b"close":
            conn.send(b"bye")
            conn.close()
        elif message == b"raise":
            raise RuntimeError("this handler fails on purpose")
        elif message == b"slow":
            time.sleep(0.02)  # blocks: thread mode moves the connection's calls to its threads
            conn.send(b"slow")
        elif message == b"block":
            blocked.put(conn.id)
            release.wait(30)  # until the test has begun the stop
            conn.send(b"late")
        else:
            conn.send(message)

    return handler


def ask(sock: socket.socket, line: bytes) -> None:
    sock.sendall(line + b"\n")
    assert recv_exactly(sock, len(line) + 1) == line + b"\n"


def closed_by_server(sock: socket.socket) -> None:
    """The server ends it: whatever comes first, then EOF (the socket timeout bounds the wait)."""
    recv_until_closed(sock)
    sock.close()


def test_on_close_once_per_connection_however_it_ends():
    blocked: "queue.Queue[int]" = queue.Queue()
    release = threading.Event()
    ledger = Ledger()
    with serving(handler=make_handler(blocked, release), framing="line", idle_timeout=None, acceptors=4,
                 on_connect=ledger.on_connect, on_close=ledger.on_close) as listener:

        def client_eof() -> None:
            with connect(listener) as sock:
                ask(sock, b"ping")

        def client_reset() -> None:
            sock = connect(listener)
            ask(sock, b"ping")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # an RST, not a FIN

        def handler_closes() -> None:
            sock = connect(listener)
            sock.sendall(b"close\n")
            assert recv_exactly(sock, 4) == b"bye\n"
            closed_by_server(sock)

        def told_to_quit() -> None:
            sock = connect(listener)
            ask(sock, b"ping")
            port = sock.getsockname()[1]
            conn = wait_for(lambda: next((c for c in listener.connections() if c.peer[1] == port), None),
                            what="the server side of the client")
            conn.quit.put("go")  # from this thread, not the one serving it
            closed_by_server(sock)

        def handler_raises() -> None:
            sock = connect(listener)
            sock.sendall(b"raise\n")
            closed_by_server(sock)

        def offloaded_eof() -> None:
            with connect(listener) as sock:
                sock.sendall(b"slow\n")
                assert recv_exactly(sock, 5) == b"slow\n"
                ask(sock, b"ping")

        ways = [client_eof, client_reset, handler_closes, told_to_quit, handler_raises, offloaded_eof]
        run_concurrently(lambda way: way(), [(way,) for way in ways for _ in range(PER_WAY)], timeout=60)
        wait_for(lambda: listener.info().closed == len(ways) * PER_WAY, what="every client to be closed")

        # Live when the listener stops: idle ones, and ones whose handler is
        # running (on a loop thread in events mode, which holds only one).
        idle = [connect(listener) for _ in range(PER_WAY)]
        for sock in idle:
            ask(sock, b"ping")
        busy = 3 if listener.config.io == "threads" else 1
        running = [connect(listener) for _ in range(busy)]
        for sock in running:
            sock.sendall(b"block\n")
        ids = {blocked.get(timeout=10) for _ in range(busy)}
        stopper = threading.Thread(target=listener.stop, kwargs={"grace": 10.0})
        stopper.start()
        try:
            wait_for(lambda: all(c.closed for c in listener.connections() if c.id in ids),
                     what="the stop to reach the connections whose handler runs")
        finally:
            release.set()
        stopper.join(30)
        assert not stopper.is_alive(), "the listener did not stop"
        for sock in idle + running:
            closed_by_server(sock)

        ledger.check(listener, {"eof": 2 * PER_WAY, "reset": PER_WAY, "closed": PER_WAY, "quit": PER_WAY,
                                "handler_error": PER_WAY, "server_stop": PER_WAY + busy})


def test_on_close_once_for_idle_timeouts():
    """Connections cut by the idle sweep, including (thread mode) ones whose calls had moved to threads."""
    ledger = Ledger()
    with serving(handler=make_handler(queue.Queue(), threading.Event()), framing="line", idle_timeout=0.5,
                 on_connect=ledger.on_connect, on_close=ledger.on_close) as listener:

        def goes_quiet(first: bytes) -> None:
            sock = connect(listener)
            sock.sendall(first + b"\n")
            assert recv_exactly(sock, len(first) + 1) == first + b"\n"
            closed_by_server(sock)

        run_concurrently(goes_quiet, [(line,) for line in (b"ping", b"slow") for _ in range(PER_WAY)], timeout=60)
        wait_for(lambda: listener.info().closed == 2 * PER_WAY, what="every client to be closed")
        ledger.check(listener, {"idle_timeout": 2 * PER_WAY})
