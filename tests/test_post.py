"""conn.post: a message handed to a connection from elsewhere, written by its loop, never making the poster wait.

What a chat server's fan-out relies on: posted messages arrive whole, in
order, framed like send's, between the connection's own sends; a peer that
stops reading is closed (outbox_overflow) once its outbox passes the
listener's outbox_limit, and nobody else is held up or loses anything.
Every test runs in both I/O modes, with the C hot path and without.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from typing import Any, Iterator

import pytest

import netpool

from .conftest import DEADLINE, connect, recv_exactly, serving, wait_for

pytestmark = pytest.mark.io_modes
NL = b"\n"


def read_lines(sock: socket.socket, count: int) -> list[bytes]:
    """``count`` lines from ``sock`` (its timeout bounds each read)."""
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise AssertionError(f"closed after {data.count(NL)} of {count} lines")
        data += chunk
    lines = data.split(b"\n")
    assert lines[count] == b"", "more arrived than expected"
    return lines[:count]


class Room:
    """Connections by id, and on_close's reasons: the smallest fan-out server."""

    def __init__(self) -> None:
        self.conns: dict[int, netpool.Connection] = {}
        self.reasons: dict[int, str] = {}
        self.lock = threading.Lock()

    def joined(self, conn: netpool.Connection) -> None:
        with self.lock:
            self.conns[conn.id] = conn

    def left(self, conn: netpool.Connection, reason: str) -> None:
        with self.lock:
            self.conns.pop(conn.id, None)
            self.reasons[conn.id] = reason

    def others(self, conn: netpool.Connection) -> list[netpool.Connection]:
        with self.lock:
            return [c for c in self.conns.values() if c is not conn]

    def settings(self, handler: Any, **extra: Any) -> dict[str, Any]:
        return {"handler": handler, "framing": "line", "on_connect": self.joined, "on_close": self.left, **extra}


def test_posted_messages_arrive_framed_and_in_order(version):
    room = Room()

    def broadcast(message: bytes, conn: netpool.Connection) -> None:
        for other in room.others(conn):
            assert other.post(b"from %d: %s" % (conn.id, message))
        conn.send(b"sent " + message)

    with serving(**room.settings(broadcast)) as listener:
        sender, *readers = [connect(listener) for _ in range(4)]
        wait_for(lambda: len(room.conns) == 4, what="four connections")
        for i in range(200):
            sender.sendall(b"m%d\n" % i)
        assert read_lines(sender, 200) == [b"sent m%d" % i for i in range(200)]
        for reader in readers:
            lines = read_lines(reader, 200)
            assert [line.partition(b": ")[2] for line in lines] == [b"m%d" % i for i in range(200)]
        for sock in (sender, *readers):
            sock.close()


def test_a_peer_that_stops_reading_is_closed_and_holds_nobody_up(version):
    room = Room()
    slowest = [0.0]
    payload = b"x" * 8000

    def broadcast(message: bytes, conn: netpool.Connection) -> None:
        started = time.monotonic()
        for other in room.others(conn):
            other.post(payload + message)
        slowest[0] = max(slowest[0], time.monotonic() - started)
        conn.send(b"ok")

    def joined(conn: netpool.Connection) -> None:
        # Small kernel buffers, so that the kernel does not absorb megabytes for the stalled peer first.
        conn.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        room.joined(conn)

    settings = {**room.settings(broadcast, outbox_limit=128 * 1024), "on_connect": joined}
    with serving(**settings) as listener:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", listener.port))  # joins, then never reads
        sender, reader = connect(listener), connect(listener)
        wait_for(lambda: len(room.conns) == 3, what="three connections")
        stalled_id = next(c.id for c in room.conns.values() if c.peer == stalled.getsockname())
        rounds = 0
        while stalled_id not in room.reasons:
            assert rounds < 200, "the stalled peer was never closed"
            sender.sendall(b"%d\n" % rounds)
            assert read_lines(sender, 1) == [b"ok"]
            assert read_lines(reader, 1) == [payload + b"%d" % rounds]  # the reader misses nothing
            rounds += 1
        assert room.reasons[stalled_id] == "outbox_overflow"
        assert slowest[0] < 0.5, f"a post waited {slowest[0]:.2f}s for a peer"
        assert listener.info().closed_by_reason.get("outbox_overflow") == 1
        sender.sendall(b"after\n")  # the others go on as before
        assert read_lines(sender, 1) == [b"ok"] and read_lines(reader, 1) == [payload + b"after"]
        for sock in (stalled, sender, reader):
            sock.close()


def test_posts_and_own_sends_never_cut_into_each_other(version):
    """Large posted messages from other threads and large replies of its own: every line arrives whole."""
    room = Room()
    size = 50_000

    def reply(message: bytes, conn: netpool.Connection) -> None:
        conn.send(b"R" * size)  # larger than the kernel takes at once while the peer is slow

    # Room for all 40 posts at once: the client reads only after asking for its own replies.
    with serving(**room.settings(reply, outbox_limit=8 << 20)) as listener:
        client = connect(listener)
        wait_for(lambda: len(room.conns) == 1, what="the connection")
        conn = next(iter(room.conns.values()))
        posters = [threading.Thread(target=lambda k=k: [conn.post(bytes([k]) * size) for _ in range(20)])
                   for k in (ord("A"), ord("B"))]
        for thread in posters:
            thread.start()
        for _ in range(20):
            client.sendall(b"go\n")
        lines = read_lines(client, 60)
        for thread in posters:
            thread.join(DEADLINE)
        assert sorted(line[:1] for line in lines) == [b"A"] * 20 + [b"B"] * 20 + [b"R"] * 20
        assert all(len(line) == size and line == line[:1] * size for line in lines)
        client.close()


@contextlib.contextmanager
def one_client(room: Room) -> Iterator[tuple[socket.socket, netpool.Connection]]:
    """A listener that ignores what it reads, one client of it, and the client's connection."""
    with serving(**room.settings(lambda m, c: None)) as listener:
        client = connect(listener)
        wait_for(lambda: len(room.conns) == 1, what="the connection")
        yield client, next(iter(room.conns.values()))
        client.close()


def test_post_on_a_closed_connection_is_refused(version):
    room = Room()
    with one_client(room) as (client, conn):
        client.close()
        wait_for(lambda: room.reasons, what="the close")
        assert conn.post(b"too late") is False


def test_posted_then_closed_gracefully_arrives_before_the_end(version):
    """A last word through the outbox (an XMPP stream error on timeout): graceful close lets it out first."""
    room = Room()
    with one_client(room) as (client, conn):
        assert conn.post(b"goodbye")
        conn.close("kicked", graceful=True)
        assert recv_exactly(client, len(b"goodbye\n")) == b"goodbye\n"
        assert client.recv(10) == b""
        wait_for(lambda: room.reasons, what="the close")
        assert room.reasons[conn.id] == "kicked"


def test_outbox_limit_is_validated():
    with pytest.raises(netpool.ConfigError, match="outbox_limit"):
        netpool.ListenerConfig(handler=lambda m, c: None, outbox_limit=0)


def test_posts_from_another_thread_are_written_at_once_not_at_the_next_sweep(version):
    """Every post wakes the loop: none waits for the loop's next timer (a second here) to be written.

    Posts come from a thread of their own, to connections picked at random,
    back to back or a little apart, as a broker's inbox thread posts.
    """
    room = Room()
    with serving(**room.settings(lambda m, c: None)) as listener:
        clients = [connect(listener) for _ in range(10)]
        wait_for(lambda: len(room.conns) == 10, what="ten connections")
        conns = sorted(room.conns.values(), key=lambda c: c.id)
        by_peer = {c.peer: c for c in conns}
        order = [conns[(i * 7) % 10] for i in range(300)]
        pause = threading.Event()

        def post_all() -> None:
            for i, conn in enumerate(order):
                assert conn.post(b"%.6f" % time.monotonic())
                if i % 3:
                    pause.wait(0.0005 * (i % 3))

        expected = {client: order.count(by_peer[client.getsockname()]) for client in clients}
        poster = threading.Thread(target=post_all)
        poster.start()
        slowest, pending = 0.0, {client: b"" for client in clients}
        with selectors.DefaultSelector() as selector:
            for client in clients:
                selector.register(client, selectors.EVENT_READ)
            deadline = time.monotonic() + DEADLINE
            while any(expected.values()) and time.monotonic() < deadline:
                for key, _ in selector.select(0.1):
                    client = key.fileobj
                    data = pending[client] + client.recv(65536)
                    *lines, pending[client] = data.split(NL)
                    for line in lines:
                        slowest = max(slowest, time.monotonic() - float(line))
                        expected[client] -= 1
        poster.join(DEADLINE)
        assert not any(expected.values()), "some posted messages never arrived"
        assert slowest < 0.5, f"a posted message waited {slowest:.2f}s for the loop"
        for client in clients:
            client.close()
