"""Echo round trips over real sockets: every framer, many clients, IPv4, IPv6, UNIX."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading

import pytest

from .conftest import connect, recv_exactly, recv_until_closed, run_concurrently, serving, wait_for

pytestmark = pytest.mark.io_modes  # every test runs in both I/O modes


def test_raw_echo_returns_every_byte():
    with serving() as listener, connect(listener) as sock:
        payload = os.urandom(200_000)
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload)) == payload
        sender.join()


def test_line_echo():
    with serving(framing="line") as listener, connect(listener) as sock:
        sock.sendall(b"one\r\ntwo\nthr")
        sock.sendall(b"ee\n")
        assert recv_exactly(sock, len(b"one\ntwo\nthree\n")) == b"one\ntwo\nthree\n"


def test_length_prefixed_echo():
    with serving(framing="length", max_message_size=1 << 20) as listener, connect(listener) as sock:
        messages = [b"", b"x", os.urandom(70_000)]
        wire = b"".join(struct.pack(">I", len(m)) + m for m in messages)
        sock.sendall(wire)
        assert recv_exactly(sock, len(wire)) == wire


def test_custom_framer_object():
    """Any factory returning an object with feed/eof/encode is a framer."""

    class Upper:
        def __init__(self, max_message_size: int) -> None:
            self.buf = b""

        def feed(self, data: bytes) -> list[bytes]:
            self.buf += data
            *done, self.buf = self.buf.split(b";")
            return done

        def eof(self) -> list[bytes]:
            return []

        def encode(self, message: bytes) -> bytes:
            return message.upper() + b";"

    with serving(framing=Upper) as listener, connect(listener) as sock:
        sock.sendall(b"ab;c")
        sock.sendall(b"d;")
        assert recv_exactly(sock, 6) == b"AB;CD;"


def test_200_clients_100_messages_each_in_order():
    """200 concurrent clients each get all 100 of their own messages back, in order."""
    clients, per_client = 200, 100
    with serving(framing="line", acceptors=8, max_connections=300) as listener:
        errors: list[str] = []
        start = threading.Barrier(clients, timeout=30)

        def client(n: int) -> None:
            try:
                with connect(listener) as sock:
                    start.wait()
                    expected = b"".join(b"client %d message %d\n" % (n, i) for i in range(per_client))
                    # Send in bursts of 10 so requests and replies overlap.
                    for i in range(0, per_client, 10):
                        sock.sendall(b"".join(b"client %d message %d\n" % (n, j) for j in range(i, i + 10)))
                    got = recv_exactly(sock, len(expected))
                    if got != expected:
                        errors.append(f"client {n}: wrong bytes")
            except Exception as exc:  # collected and asserted below
                errors.append(f"client {n}: {exc!r}")

        run_concurrently(client, [(n,) for n in range(clients)], timeout=60)
        assert errors == []
        info = wait_for(lambda: (i := listener.info()).closed == clients and i, what="all clients closed")
        assert info.accepted == info.admitted == clients
        assert info.closed_by_reason == {"eof": clients}
        assert info.live == 0 and info.refused == 0 and info.errors == 0


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("::1 is not configured on this machine")
    with serving(host="::1") as listener:
        assert listener.address == f"[::1]:{listener.port}"
        with socket.create_connection(("::1", listener.port), timeout=10) as sock:
            sock.sendall(b"six")
            assert recv_exactly(sock, 3) == b"six"
            conn = wait_for(listener.connections)[0]
            assert conn.peer[0] == "::1"
            assert conn.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), "Nagle is off over IPv6 too"


def test_accepted_connections_have_nagle_off():
    # Set once on the listening socket; Linux copies it to accepted sockets.
    with serving() as listener, connect(listener) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        conn = wait_for(listener.connections)[0]
        assert conn.transport.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_unix_socket_with_mode_and_cleanup(tmp_path):
    path = str(tmp_path / "echo.sock")
    with serving(unix=path, unix_mode=0o600) as listener:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with connect(listener) as sock:
            sock.sendall(b"unix")
            assert recv_exactly(sock, 4) == b"unix"
    assert not os.path.exists(path), "the socket file is removed on stop"


def test_unix_stale_socket_is_replaced_but_live_one_is_not(tmp_path):
    from netpool import ListenError

    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # leaves the file behind, with nobody listening: a crashed server
    with serving(unix=path) as listener:
        with connect(listener) as sock:
            sock.sendall(b"ok")
            assert recv_exactly(sock, 2) == b"ok"
        with pytest.raises(ListenError, match="another server is listening"):
            with serving(unix=path):
                pass
    regular = tmp_path / "file"
    regular.write_text("precious")
    with pytest.raises(ListenError, match="not a socket"):
        with serving(unix=str(regular)):
            pass
    assert regular.read_text() == "precious"


def test_last_line_without_newline_is_delivered_at_eof():
    with serving(framing="line") as listener, connect(listener) as sock:
        sock.sendall(b"tail")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == b"tail\n"
