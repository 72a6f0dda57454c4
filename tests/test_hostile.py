"""Hostile clients against a live listener: slow loris, non-readers, connect/close and reset floods,
truncated TLS. After each, descriptors and threads are back to where they were and a fresh client
is served."""

from __future__ import annotations

import os
import random
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest

from .certs import TestCA
from .conftest import connect, recv_exactly, recv_until_closed, serving, wait_for

pytestmark = pytest.mark.io_modes  # every test runs in both I/O modes


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def assert_recovered(listener, fds_before: int) -> None:
    """No descriptor leaked, no connection thread stuck, and a fresh client is served."""
    wait_for(lambda: listener.info().open == 0, what="all connections closed")
    # At most the baseline: sockets of earlier tests may still have been closing when it was taken.
    wait_for(lambda: open_fds() <= fds_before, what=f"descriptors back to {fds_before} (now {open_fds()})")
    # In thread mode each event loop runs on a connection thread of its own;
    # every other one (a handed-off connection's) must have ended or parked.
    threads = listener._conn_threads
    loops = sum(loop.handoff for loop in listener._loops)
    # Handler threads waiting for offloaded connections' events are idle too.
    wait_for(lambda: threads.threads - threads.parked - sum(loop.idle_handler_threads for loop in listener._loops)
             == loops, what="every connection thread parked or waiting, none stuck")
    with connect(listener) as sock:
        sock.sendall(b"fresh\n")
        assert recv_exactly(sock, 6) == b"fresh\n"


def test_slow_loris_is_cut_while_real_clients_stay_fast():
    """1,000 clients trickle a byte every 0.4 s and never finish a line; a real client stays fast (median, p99)."""
    slow_count = 1000
    with serving(framing="line", max_connections=1100, acceptors=8,
                 idle_timeout=5.0, message_timeout=2.0) as listener:
        fds_before = open_fds()
        slow = [connect(listener) for _ in range(slow_count)]
        stop = threading.Event()

        def trickle() -> None:
            for _ in range(100):  # bounded: about 40 s at most
                for sock in slow:
                    try:
                        sock.send(b"x")
                    except OSError:
                        pass
                if stop.wait(0.4):
                    return

        trickler = threading.Thread(target=trickle)
        trickler.start()
        rtts = []
        try:
            with connect(listener) as fast:
                deadline = time.monotonic() + 3.0
                pause = threading.Event()
                while time.monotonic() < deadline:
                    started = time.perf_counter()
                    fast.sendall(b"ping\n")
                    assert recv_exactly(fast, 5) == b"ping\n"
                    rtts.append(time.perf_counter() - started)
                    pause.wait(0.005)
                info = wait_for(lambda: (i := listener.info()).closed_by_reason.get("message_timeout") == slow_count
                                and i, timeout=20, what="every slow client cut by message_timeout")
        finally:
            stop.set()
            trickler.join(10)
        rtts.sort()
        median, p99 = rtts[len(rtts) // 2], rtts[int(len(rtts) * 0.99)]
        # The round trips are timed in this process, which also runs the
        # 1,000 trickling clients and the server: on a loaded 2-core machine
        # its scheduling adds tens of milliseconds to a few of them (six CPU
        # hogs added: p99 37-93 ms, so 50 ms failed), not to the typical one
        # (under 1 ms). A loop the slow clients overwhelm (1 ms per partial
        # line: round trips of 1.7 s) fails either bound. A strict latency
        # figure is a benchmark's business, on a quiet machine.
        assert len(rtts) > 100 and median < 0.050 and p99 < 0.250, (
            f"median {median * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms over {len(rtts)} round trips")
        assert info.closed_by_reason == {"message_timeout": slow_count}
        for sock in random.Random(5).sample(slow, 50):
            sock.settimeout(5)
            assert recv_until_closed(sock) == b""
        for sock in slow:
            sock.close()
        assert_recovered(listener, fds_before)


def test_clients_that_never_read_are_cut_and_memory_stays_bounded(io_mode):
    """Thread mode waits send_timeout for them; an event loop never waits and cuts them past its queue limit.

    Either way memory stays bounded and other clients keep being served meanwhile.
    """
    expected = "send_timeout" if io_mode == "threads" else "send_overflow"

    def flood(message, conn):
        if message == b"go":
            while True:
                conn.send(b"z" * 65536)  # until SendTimeout ends it
        conn.send(message)

    with serving(handler=flood, framing="line", send_timeout=1.0) as listener:
        fds_before = open_fds()
        rss_before = rss_mb()
        readers_never = []
        for _ in range(50):
            sock = connect(listener)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"go\n")
            readers_never.append(sock)
        # Served one after another, the bystander would wait behind 50 send
        # timeouts (50 s); 10 s leaves a loaded 2-core machine its margin.
        with connect(listener, timeout=10.0) as bystander:
            bystander.sendall(b"still here\n")
            assert recv_exactly(bystander, 11) == b"still here\n"
        info = wait_for(lambda: (i := listener.info()).closed_by_reason.get(expected) == 50 and i.live == 0 and i,
                        timeout=30, what=f"50 closures by {expected}, and the bystander's")
        assert info.closed_by_reason == {expected: 50, "eof": 1}
        assert rss_mb() - rss_before < 64, "a client that never reads must not grow the server's memory"
        for sock in readers_never:
            sock.close()
        assert_recovered(listener, fds_before)


# The flood runs in its own process, as real clients do: eight client threads
# inside the server's process would mostly measure who gets the interpreter
# lock, not the listener.
FLOOD_CLIENT = """
import socket, struct, sys, threading
port, total, workers = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
errors = []
def flood(n):
    linger = struct.pack("ii", 1, 0)
    for i in range(total // workers):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if (n + i) % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)  # close sends RST
            sock.close()
        except OSError as exc:
            errors.append(repr(exc))
threads = [threading.Thread(target=flood, args=(n,)) for n in range(workers)]
for t in threads: t.start()
for t in threads: t.join(120)
print(len(errors), errors[:3])
"""


def listen_drops() -> int:
    """Connections the kernel completed but dropped before any accept() (a full backlog): TcpExt ListenDrops."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(dict(zip(lines[0], lines[1]))["ListenDrops"])


def test_connect_close_and_reset_floods_leave_exact_counters():
    """10,000 clients that connect and close or reset at once: info() is exact, nothing leaks."""
    total, workers = 10_000, 8
    # Room for all: an open-loop flood (about 15k connections/s here) can run
    # ahead of one event loop's closing for a moment; what is checked is that
    # every connection is counted once and nothing leaks, not the capacity
    # (`make bench` measures that).
    with serving(framing="line", max_connections=total + 100, acceptors=8) as listener:
        fds_before = open_fds()
        drops_before = listen_drops()
        done = subprocess.run([sys.executable, "-c", FLOOD_CLIENT, str(listener.port), str(total), str(workers)],
                              capture_output=True, text=True, timeout=150, check=True)
        assert done.stdout.startswith("0 "), done.stdout
        # A client whose connection the kernel completed while the backlog
        # was full, and then closed, never reaches accept(): the kernel drops
        # it and counts it (seen once in CI: 9,999 accepted, all closed). The
        # server's own counters must still be exact for every one it accepted.
        dropped = listen_drops() - drops_before
        try:
            info = wait_for(lambda: (i := listener.info()).accepted >= total - dropped and i.closed == i.accepted
                            and i.live == 0 and i, timeout=60, what=f"{total} closures, less {dropped} the kernel dropped")
        except AssertionError as exc:  # seen once in CI: say which connections never ended
            stuck = listener.connections()
            raise AssertionError(f"{exc}: {listener.info()}; {len(stuck)} still open, for example "
                                 f"{[(c, c.bytes_in, round(time.time() - c.connected_at, 1)) for c in stuck[:5]]}") from None
        assert total - dropped <= info.accepted <= total
        assert info.accepted == info.admitted == info.closed and info.refused == 0 and info.live == 0
        assert set(info.closed_by_reason) <= {"eof", "reset"} and info.errors == 0
        assert_recovered(listener, fds_before)


def client_hello(server_hostname: str = "localhost") -> bytes:
    """The first flight of a real TLS client (the standard library's), as bytes."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_truncated_handshakes_and_tls_garbage(tmp_path):
    ca = TestCA(tmp_path)
    cert = ca.issue("localhost", hosts=("localhost",))
    settings = {"ssl": {"certfile": str(cert.cert), "keyfile": str(cert.key)}, "handshake_timeout": 2.0}
    with serving(**settings) as listener:
        fds_before = open_fds()
        hello = client_hello()
        for cut in (5, len(hello) // 2, len(hello) - 1):
            with connect(listener) as sock:
                sock.sendall(hello[:cut])  # then hang up mid-handshake
        with connect(listener) as sock:
            # A well-formed handshake record header announcing 300 bytes, then 300 bytes of garbage.
            sock.sendall(b"\x16\x03\x01" + struct.pack(">H", 300) + os.urandom(300))
            answer = recv_until_closed(sock)
            assert answer == b"" or answer[0] == 0x15, f"only a TLS alert may come back, got {answer!r}"
        info = wait_for(lambda: (i := listener.info()).closed == 4 and i)
        assert info.closed_by_reason == {"tls_error": 4}
        wait_for(lambda: open_fds() <= fds_before, what="descriptors back to the baseline")
        ctx = ssl.create_default_context(cafile=str(ca.path))
        with ctx.wrap_socket(connect(listener), server_hostname="localhost") as sock:
            sock.sendall(b"still serving")
            assert recv_exactly(sock, 13) == b"still serving"
