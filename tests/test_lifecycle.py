"""The listener's life: acceptor threads, stop with live clients, suspend/resume, exact counters."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import pytest

import netpool
from netpool.examples.echo.handler import echo

from .conftest import DEADLINE, connect, netpool_threads, recv_exactly, recv_until_closed, run_concurrently, serving, wait_for

pytestmark = pytest.mark.io_modes  # every test runs in both I/O modes


def test_all_acceptor_threads_block_in_accept_and_share_the_work():
    with serving(acceptors=6) as listener:
        names = [n for n in netpool_threads() if n.startswith("netpool-acceptor-")]
        assert len(names) == 6
        # All six are parked in accept() (no polling loop): the gate counts them.
        wait_for(lambda: listener._in_accept == 6, what="6 acceptors in accept()")
        barrier = threading.Barrier(40, timeout=20)
        socks: list[socket.socket] = []
        lock = threading.Lock()

        def client():
            barrier.wait()
            s = connect(listener)
            with lock:
                socks.append(s)

        run_concurrently(client, [() for _ in range(40)], timeout=20)
        info = wait_for(lambda: (i := listener.info()).accepted == 40 and i, what="40 accepts")
        per_acceptor = info.accepted_by_acceptor
        assert sum(per_acceptor) == 40
        assert sum(1 for n in per_acceptor if n) > 1, f"one acceptor took everything: {per_acceptor}"
        for s in socks:
            s.close()


def _nice(thread: threading.Thread) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread.native_id)


@pytest.mark.parametrize("increment, started_under", [(0, 0), (3, 0), (3, 2), (19, 0)])
def test_acceptors_run_acceptor_nice_steps_below_the_loops(increment, started_under, io_mode):
    # Start the listener from a thread already niced by `started_under` (a
    # server run under `nice`): threads inherit it, acceptors go below it.
    started: list[netpool.Listener] = []

    def start():
        if started_under:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + started_under)
        started.append(netpool.start_listener(dict(handler=echo, port=0, io=io_mode, acceptors=2,
                                                  acceptor_nice=increment)))

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + started_under
    run_concurrently(start, [()], timeout=DEADLINE)
    listener = started[0]
    try:
        # Each acceptor lowers itself as it starts, before its first accept().
        wait_for(lambda: listener._in_accept == 2, what="2 acceptors in accept()")
        wait_for(lambda: all(loop.thread.native_id for loop in listener._loops), what="loops running")
        assert [_nice(a.thread) for a in listener._acceptors] == [min(19, base + increment)] * 2
        assert [_nice(loop.thread) for loop in listener._loops] == [base]
        with connect(listener) as s:  # and they still accept and serve
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
    finally:
        listener.stop(grace=2.0)


def test_port_zero_reports_the_bound_port():
    with serving(port=0) as listener:
        assert isinstance(listener.port, int) and listener.port > 0
        assert listener.address == f"127.0.0.1:{listener.port}"


def test_port_in_use_is_a_clear_listen_error():
    with serving() as listener:
        with pytest.raises(netpool.ListenError, match="address already in use"):
            netpool.start_listener({"handler": lambda m, c: None, "port": listener.port})


def test_stop_with_1000_idle_clients_returns_within_2_seconds():
    with serving(acceptors=8, max_connections=1100) as listener:
        socks = []
        try:
            for _ in range(1000):
                socks.append(connect(listener))
            wait_for(lambda: listener.info().live == 1000, timeout=30, what="1000 live")
            started = time.monotonic()
            info = listener.stop(grace=5.0)
            elapsed = time.monotonic() - started
            assert elapsed < 2.0, f"stop took {elapsed:.2f}s"
            assert info.closed_by_reason == {"server_stop": 1000}
            assert info.live == 0 and info.open == 0
            assert not netpool_threads(), "every listener thread was joined"
            for s in socks[:50]:
                assert recv_until_closed(s) == b""
        finally:
            for s in socks:
                s.close()


def test_stop_lets_a_running_handler_finish_its_reply():
    started = threading.Event()
    release = threading.Event()

    def slow(message, conn):
        started.set()
        release.wait(10)
        conn.send(b"finished")

    with serving(handler=slow) as listener:
        sock = connect(listener)
        sock.sendall(b"work")
        assert started.wait(10)
        (conn,) = listener.connections()
        stopper = threading.Thread(target=listener.stop, kwargs={"grace": 5.0})
        stopper.start()
        # The connection has been told to quit while its handler still runs...
        wait_for(lambda: conn.close_reason == "server_stop", what="the quit to reach the connection")
        release.set()  # ...and the reply the handler then sends still goes out.
        assert recv_until_closed(sock) == b"finished"
        stopper.join(10)
        assert listener.info().closed_by_reason == {"server_stop": 1}
        sock.close()


def test_stop_force_closes_after_grace(io_mode):
    """A connection stuck sending to a client that never reads is aborted at the grace deadline.

    In events mode a loop handler never waits for a peer: there the reply
    sits queued (1 MiB, below the 4 MiB send_overflow limit) when stop comes.
    """

    def flood(message, conn):
        if io_mode == "events":
            conn.send(b"z" * (1 << 20))
            return
        while True:
            conn.send(b"z" * 65536)

    with serving(handler=flood, send_timeout=60) as listener:
        sock = connect(listener)
        sock.sendall(b"go")
        wait_for(lambda: listener.info().live == 1 and listener.info().bytes_out > 0, what="the handler sending")
        started = time.monotonic()
        info = listener.stop(grace=0.3)
        assert time.monotonic() - started < 3.0
        assert info.closed_by_reason == {"server_stop": 1}
        sock.close()


def test_stop_is_idempotent_and_wait_returns():
    listener = netpool.start_listener({"handler": lambda m, c: None, "port": 0, "acceptors": 2})
    assert not listener.wait(0.01)
    done = threading.Thread(target=listener.stop)
    done.start()
    assert listener.wait(10)
    listener.stop()
    done.join(10)
    assert listener.state == "stopped"


def test_context_manager_stops():
    with netpool.start_listener({"handler": lambda m, c: None, "port": 0, "acceptors": 2}) as listener:
        assert listener.state == "running"
    assert listener.state == "stopped"


def test_suspend_refuses_new_clients_keeps_live_ones_and_resume_accepts_again():
    with serving() as listener:
        port = listener.port
        live = connect(listener)
        live.sendall(b"a")
        assert recv_exactly(live, 1) == b"a"
        listener.suspend()
        assert listener.state == "suspended"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        live.sendall(b"b")
        assert recv_exactly(live, 1) == b"b", "live connections go on while suspended"
        listener.resume()
        assert listener.port == port
        with connect(listener) as fresh:
            fresh.sendall(b"c")
            assert recv_exactly(fresh, 1) == b"c"
        live.close()


def test_stop_while_suspended():
    with serving() as listener:
        listener.suspend()
    assert listener.state == "stopped"


def test_counters_are_exact_after_a_storm():
    """Mixed clean closes, resets, quits and refusals: info() equals what the clients saw."""
    quit_marker = b"Q"

    def handler(message, conn):
        if message.startswith(quit_marker):
            conn.quit.put(True)
        else:
            conn.send(message)

    rng = random.Random(1234)
    plan = [rng.choice(["eof", "reset", "quit"]) for _ in range(300)]
    seen = {"eof": 0, "reset": 0, "quit": 0, "refused": 0}
    lock = threading.Lock()

    with serving(handler=handler, max_connections=40, overflow="refuse", acceptors=8) as listener:
        # Admitted clients hold their slot until every client has tried, so
        # exactly 40 get in and the other 260 must be refused.
        everyone_tried = threading.Barrier(len(plan), timeout=60)

        def client(kind: str) -> None:
            try:
                sock = connect(listener)
            except OSError:
                with lock:
                    seen["refused"] += 1  # never happens with a 1024 backlog; counted if it does
                everyone_tried.wait()
                return
            with sock:
                try:
                    sock.sendall(b"hello")
                    if recv_exactly(sock, 5) != b"hello":
                        raise AssertionError("bad echo")
                except (ConnectionError, AssertionError):
                    with lock:
                        seen["refused"] += 1  # closed without an echo: the server refused us
                    everyone_tried.wait()
                    return
                everyone_tried.wait()
                if kind == "quit":
                    sock.sendall(quit_marker)
                    recv_until_closed(sock)
                elif kind == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                with lock:
                    seen[kind] += 1

        run_concurrently(client, [(k,) for k in plan], timeout=60)
        served = seen["eof"] + seen["reset"] + seen["quit"]
        info = wait_for(lambda: (i := listener.info()).closed == served and i.live == 0 and i,
                        what="all served clients closed")
        assert info.accepted == len(plan)
        assert info.refused == seen["refused"] == info.refused_by_reason.get("limit", 0)
        assert info.admitted == served
        by = info.closed_by_reason
        assert by.get("quit", 0) == seen["quit"]
        # A reset that races the server's read can surface as a plain EOF.
        assert by.get("reset", 0) + by.get("eof", 0) == seen["reset"] + seen["eof"]
        assert info.errors == 0
        assert (info.admitted, info.refused) == (40, 260)
