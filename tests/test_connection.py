"""One connection's life: quit, close, timeouts, bad input, handler errors, hooks."""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import struct
import threading

import pytest

import netpool

from .certs import TestCA
from .conftest import connect, recv_exactly, recv_until_closed, run_concurrently, serving, wait_for

pytestmark = pytest.mark.io_modes  # every test runs in both I/O modes


def closed_reasons(listener, total: int) -> dict[str, int]:
    info = wait_for(lambda: (i := listener.info()).closed == total and i, what=f"{total} closures")
    return dict(info.closed_by_reason)


def test_quit_from_another_thread_closes_a_reading_connection():
    """A put on conn.quit wakes a loop blocked in recv and closes that connection only."""
    with serving(idle_timeout=None) as listener:
        a, b = connect(listener), connect(listener)
        conns = wait_for(lambda: len(c := listener.connections()) == 2 and c)
        target = next(c for c in conns if c.peer[1] == a.getsockname()[1])
        threading.Thread(target=target.quit.put, args=("admin said so",)).start()
        assert recv_until_closed(a) == b""
        assert target.closed and target.close_reason == "quit"
        assert target.quit.get_nowait() == "admin said so"
        b.sendall(b"unaffected")
        assert recv_exactly(b, 10) == b"unaffected"
        assert closed_reasons(listener, 1) == {"quit": 1}
        b.close()


def test_handler_close_sends_pending_reply_then_fin():
    def handler(message, conn):
        conn.send(b"bye")
        conn.close()
        conn.close()  # idempotent

    with serving(handler=handler, framing="line") as listener, connect(listener) as sock:
        sock.sendall(b"quit\n")
        assert recv_until_closed(sock) == b"bye\n"
        assert closed_reasons(listener, 1) == {"closed": 1}


def small_window_client(listener) -> socket.socket:
    """A client whose 4 KiB receive window keeps most of a big reply out of the kernel: the server must queue it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
    sock.settimeout(10)
    sock.connect((listener.config.host, listener.port))
    return sock


BIG_REPLY = 4_000_000  # within LOOP_QUEUE_LIMIT, and far more than the kernel holds for a small window


def send_big_then_close(message, conn):
    conn.send_bytes(b"r" * BIG_REPLY)
    conn.close()


def test_a_reply_sent_before_close_arrives_whole_before_the_fin(caplog):
    """Thread mode's send waits for the peer; events mode queues, and its close delivers the queue first."""
    with caplog.at_level(logging.WARNING, logger="netpool.io_loop"), serving(handler=send_big_then_close) as listener:
        with small_window_client(listener) as sock:
            sock.sendall(b"go")
            assert len(recv_until_closed(sock)) == BIG_REPLY
        assert closed_reasons(listener, 1) == {"closed": 1}
        assert listener.info().bytes_out == BIG_REPLY
    assert not [r for r in caplog.records if "not delivered" in r.getMessage()]


def test_over_tls_the_close_notify_comes_after_the_whole_reply(tmp_path):
    """A clean TLS end (close_notify, which the stdlib client reads as EOF) only after every queued byte."""
    ca = TestCA(tmp_path)
    server = ca.issue("localhost", hosts=("localhost", "127.0.0.1"))
    context = ssl.create_default_context(cafile=str(ca.path))
    settings = {"certfile": str(server.cert), "keyfile": str(server.key)}
    with serving(handler=send_big_then_close, ssl=settings) as listener:
        with context.wrap_socket(small_window_client(listener), server_hostname="localhost") as sock:
            sock.sendall(b"go")
            got = 0
            while chunk := sock.recv(65536):  # b"" only on close_notify: a bare FIN raises SSLEOFError
                got += len(chunk)
        assert got == BIG_REPLY
        assert closed_reasons(listener, 1) == {"closed": 1}
        assert listener.info().bytes_out == BIG_REPLY


def test_a_close_gives_up_on_a_peer_that_never_reads_after_send_timeout_and_says_what_was_lost(io_mode, caplog):
    with caplog.at_level(logging.WARNING, logger="netpool.io_loop"), \
            serving(handler=send_big_then_close, send_timeout=0.5) as listener:
        with small_window_client(listener) as sock:
            sock.sendall(b"go")
            closed = closed_reasons(listener, 1)  # without reading a byte
            received = len(recv_until_closed(sock))  # what the kernel had taken: it still arrives
        assert listener.info().bytes_out == received < BIG_REPLY
        lost = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    if io_mode == "threads":
        assert closed == {"send_timeout": 1} and not lost  # the handler's send timed out (SendTimeout)
    else:
        assert closed == {"closed": 1}
        assert len(lost) == 1 and f"with {BIG_REPLY - received} bytes of replies still queued" in lost[0], lost


def test_close_with_a_reason_of_its_own_is_what_on_close_and_the_counters_see():
    """close("kicked") ends the connection at once, and the reason it gave is its close reason everywhere."""
    seen: queue.Queue = queue.Queue()

    def handler(message, conn):
        if message == b"flood":
            conn.close("kicked")
            conn.close("closed")  # the first reason wins
        else:
            conn.send(message)

    with serving(handler=handler, framing="line", on_close=lambda conn, reason: seen.put(reason)) as listener:
        with connect(listener) as other, connect(listener) as sock:
            sock.sendall(b"flood\n")
            assert recv_until_closed(sock) == b""
            assert seen.get(timeout=5) == "kicked"
            other.sendall(b"still here\n")
            assert recv_exactly(other, 11) == b"still here\n"
            assert closed_reasons(listener, 1) == {"kicked": 1}


def test_graceful_close_lets_the_running_handler_send_its_replies_first():
    """close(reason, graceful=True) stops reading only: replies sent after it still arrive, then the FIN."""

    def handler(message, conn):
        conn.close("done", graceful=True)
        conn.send(b"reply one")
        conn.send(b"reply two")

    with serving(handler=handler, framing="line") as listener, connect(listener) as sock:
        sock.sendall(b"last request\n")
        assert recv_until_closed(sock) == b"reply one\nreply two\n"
        assert closed_reasons(listener, 1) == {"done": 1}


def test_close_refuses_a_reason_that_is_not_a_name():
    result: queue.Queue = queue.Queue()

    def handler(message, conn):
        for bad in ("", None, 3):
            try:
                conn.close(bad)
            except TypeError as exc:
                result.put(str(exc))
        conn.send(b"open")

    with serving(handler=handler) as listener, connect(listener) as sock:
        sock.sendall(b"x")
        assert recv_exactly(sock, 4) == b"open"
        assert [result.get(timeout=5) for _ in range(3)] == [
            "close(): the reason must be a non-empty str, not ''",
            "close(): the reason must be a non-empty str, not None",
            "close(): the reason must be a non-empty str, not 3"]


def test_send_after_close_raises_connection_closed():
    result: queue.Queue = queue.Queue()

    def handler(message, conn):
        conn.close()
        try:
            conn.send(b"late")
        except netpool.ConnectionClosed as exc:
            result.put(exc)

    with serving(handler=handler) as listener, connect(listener) as sock:
        sock.sendall(b"x")
        assert "closed" in str(result.get(timeout=10))


def test_idle_timeout_closes_silent_client_only():
    with serving(idle_timeout=0.3) as listener:
        silent = connect(listener)
        chatty = connect(listener)
        # The chatty client keeps talking (every 20 ms) past the silent one's deadline.
        pause = threading.Event()
        for _ in range(500):
            chatty.sendall(b"ping")
            assert recv_exactly(chatty, 4) == b"ping"
            if listener.info().closed:
                break
            pause.wait(0.02)
        assert recv_until_closed(silent) == b""
        assert closed_reasons(listener, 1) == {"idle_timeout": 1}
        chatty.sendall(b"still here")
        assert recv_exactly(chatty, 10) == b"still here"
        chatty.close()
        silent.close()


@pytest.mark.parametrize("framing, payload", [
    ("line", b"x" * 101 + b"\n"),
    ("length", struct.pack(">I", 101) + b"x" * 101),
])
def test_oversized_message_closes_that_connection_with_a_logged_reason(framing, payload, caplog):
    with serving(framing=framing, max_message_size=100) as listener:
        good = connect(listener)
        with connect(listener) as bad:
            bad.sendall(payload)
            assert recv_until_closed(bad) == b""
        assert closed_reasons(listener, 1) == {"message_too_large": 1}
        assert "max_message_size=100" in caplog.text and "message_too_large" in caplog.text
        fits = b"y" * 100
        good.sendall(fits + b"\n" if framing == "line" else struct.pack(">I", 100) + fits)
        assert recv_exactly(good, 101 if framing == "line" else 104).endswith(fits + (b"\n" if framing == "line" else b""))
        info = listener.info()
        assert info.errors == 1 and info.live == 1
        good.close()


def test_truncated_length_frame_at_eof_is_a_framing_error():
    with serving(framing="length") as listener, connect(listener) as sock:
        sock.sendall(struct.pack(">I", 10) + b"abc")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == b""
        assert closed_reasons(listener, 1) == {"framing_error": 1}


def test_handler_exception_is_logged_and_closes_only_that_connection(caplog):
    def handler(message, conn):
        if message == b"boom":
            raise ValueError("handler bug")
        conn.send(message)

    with serving(handler=handler, framing="line") as listener:
        ok = connect(listener)
        with connect(listener) as bad:
            bad.sendall(b"boom\n")
            assert recv_until_closed(bad) == b""
        conn_id = wait_for(lambda: [r for r in caplog.records if "handler raised" in r.getMessage()])[0]
        assert "handler bug" in caplog.text and conn_id.levelno == logging.ERROR
        assert "127.0.0.1:" in conn_id.getMessage(), "the log names the peer"
        ok.sendall(b"fine\n")
        assert recv_exactly(ok, 5) == b"fine\n"
        assert closed_reasons(listener, 1) == {"handler_error": 1}
        ok.close()


def test_messages_reach_the_handler_in_order():
    seen: list[bytes] = []

    def handler(message, conn):
        seen.append(message)
        if message == b"199":
            conn.send(b"done\n")

    with serving(handler=handler, framing="line") as listener, connect(listener) as sock:
        for i in range(200):
            sock.sendall(b"%d\n" % i)
        assert recv_exactly(sock, 5) == b"done\n"
        assert seen == [b"%d" % i for i in range(200)]


def test_peer_that_stops_reading_hits_send_timeout(io_mode):
    """A client that never reads is closed (send_timeout; an event loop, which never waits, send_overflow)."""
    expected = "send_timeout" if io_mode == "threads" else "send_overflow"
    errors: queue.Queue = queue.Queue()

    def flood(message, conn):
        try:
            for _ in range(10_000):
                conn.send(b"z" * 65536)
        except netpool.SendTimeout as exc:
            errors.put(exc)
            raise

    with serving(handler=flood, send_timeout=0.5) as listener:
        sock = connect(listener)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"go")
        exc = errors.get(timeout=15)
        assert expected in str(exc)
        assert closed_reasons(listener, 1) == {expected: 1}
        assert listener.info().live == 0
        sock.close()


def test_hooks_see_connect_and_close_with_reason():
    events: queue.Queue = queue.Queue()

    def on_connect(conn):
        conn.state["greeted"] = True
        conn.send(b"hello")
        events.put(("connect", conn.id))

    def on_close(conn, reason):
        events.put(("close", conn.id, reason, conn.state.get("greeted")))

    with serving(on_connect=on_connect, on_close=on_close, framing="line") as listener:
        with connect(listener) as sock:
            assert recv_exactly(sock, 6) == b"hello\n"
        kind, conn_id = events.get(timeout=10)
        assert kind == "connect"
        assert events.get(timeout=10) == ("close", conn_id, "eof", True)
        # The counter drops after on_close, exactly once.
        assert closed_reasons(listener, 1) == {"eof": 1}


def test_on_connect_error_closes_with_handler_error():
    def on_connect(conn):
        raise RuntimeError("no thanks")

    with serving(on_connect=on_connect) as listener, connect(listener) as sock:
        assert recv_until_closed(sock) == b""
        assert closed_reasons(listener, 1) == {"handler_error": 1}


def test_reset_by_peer_is_its_own_reason():
    with serving() as listener:
        sock = connect(listener)
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        assert closed_reasons(listener, 1) in ({"reset": 1}, {"eof": 1})


def test_send_is_thread_safe_messages_never_interleave():
    """Many threads sending on one connection: every framed message arrives whole."""
    senders, per_sender = 8, 200

    def handler(message, conn):
        def blast(n):
            for i in range(per_sender):
                conn.send(b"%d:%d:" % (n, i) + b"p" * 3000)

        run_concurrently(blast, [(n,) for n in range(senders)], timeout=30)

    with serving(handler=handler, framing="length", max_message_size=1 << 16) as listener, connect(listener) as sock:
        sock.sendall(struct.pack(">I", 2) + b"go")
        last = {}
        for _ in range(senders * per_sender):
            (size,) = struct.unpack(">I", recv_exactly(sock, 4))
            body = recv_exactly(sock, size)
            n, i, pad = body.split(b":", 2)
            assert pad == b"p" * 3000
            assert int(i) == last.get(n, -1) + 1, "each sender's messages stay in order"
            last[n] = int(i)
        assert len(last) == senders
