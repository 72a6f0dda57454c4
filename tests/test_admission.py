"""Admission at max_connections: refuse, grow, wait; the limit changed live; uncount; alarms."""

from __future__ import annotations

import socket
import threading

import pytest

from .conftest import connect, recv_exactly, recv_until_closed, serving, wait_for

pytestmark = pytest.mark.io_modes  # every test runs in both I/O modes


def open_echoing(listener, n: int) -> list[socket.socket]:
    """Open n clients and prove each is admitted (an echo comes back)."""
    socks = []
    for i in range(n):
        sock = connect(listener)
        sock.sendall(b"%d;" % i)
        assert recv_exactly(sock, len(b"%d;" % i)) == b"%d;" % i
        socks.append(sock)
    return socks


def assert_closed_by_server(sock: socket.socket) -> bytes:
    """The server closed this client without serving it; returns what it sent first."""
    sock.sendall(b"anyone?")  # may fail if the close already arrived
    return recv_until_closed(sock)


def close_all(socks):
    for s in socks:
        s.close()


def test_refuse_closes_extra_clients_and_counts_them():
    with serving(max_connections=3, overflow="refuse") as listener:
        held = open_echoing(listener, 3)
        extra = [connect(listener) for _ in range(4)]
        for sock in extra:
            try:
                got = assert_closed_by_server(sock)
            except (BrokenPipeError, ConnectionResetError):
                got = b""
            assert got == b"", "a refused client must never be echoed"
        info = wait_for(lambda: (i := listener.info()).refused == 4 and i, what="4 refusals")
        assert info.refused_by_reason == {"limit": 4}
        assert info.accepted == 7 and info.admitted == 3 and info.live == 3
        close_all(held + extra)
        wait_for(lambda: listener.info().live == 0, what="live back to 0")
        # Slots freed: new clients are admitted again.
        close_all(open_echoing(listener, 3))


def test_refuse_message_is_sent_before_closing():
    with serving(max_connections=1, overflow="refuse", refuse_message=b"busy, try later\r\n") as listener:
        held = open_echoing(listener, 1)
        with connect(listener) as extra:
            assert recv_until_closed(extra) == b"busy, try later\r\n"
        close_all(held)


def test_grow_raises_limit_by_exactly_the_step():
    with serving(max_connections=2, overflow="grow", grow_step=3) as listener:
        held = open_echoing(listener, 2)
        assert listener.info().max_connections == 2
        held += open_echoing(listener, 1)
        info = listener.info()
        assert (info.max_connections, info.grown, info.live) == (5, 1, 3)
        held += open_echoing(listener, 3)  # 4 and 5 fit; the 6th grows again
        info = listener.info()
        assert (info.max_connections, info.grown, info.refused) == (8, 2, 0)
        close_all(held)


def test_wait_serves_queued_clients_once_slots_free():
    """At the limit clients wait in the backlog and are served, in turn, as others leave."""
    with serving(max_connections=2, overflow="wait") as listener:
        held = open_echoing(listener, 2)
        waiting = [connect(listener) for _ in range(3)]  # the kernel completes the handshake
        for i, sock in enumerate(waiting):
            sock.sendall(b"queued %d;" % i)
        # Nobody is served while the limit holds: no acceptor is even in accept().
        assert wait_for(lambda: listener._in_accept == 0, what="acceptors parked")
        assert listener.info().accepted == 2
        for sock in waiting:
            sock.settimeout(0.2)
            with pytest.raises(socket.timeout):
                sock.recv(1)
            sock.settimeout(10)
        # Each client leaving lets exactly one waiting client in.
        held[0].close()
        first_served = wait_for(lambda: listener.info().accepted == 3, what="one waiter admitted")
        assert first_served and listener.info().live <= 2
        held[1].close()
        served = []
        for i, sock in enumerate(waiting):
            if i >= 2:
                waiting[0].close()  # make room for the last one
            served.append(recv_exactly(sock, len(b"queued %d;" % i)))
        assert served == [b"queued 0;", b"queued 1;", b"queued 2;"]
        info = listener.info()
        assert info.refused == 0 and info.accepted == 5
        close_all(waiting)


def test_set_max_connections_up_admits_and_down_keeps_live():
    with serving(max_connections=2, overflow="wait") as listener:
        held = open_echoing(listener, 2)
        waiter = connect(listener)
        waiter.sendall(b"let me in")
        listener.set_max_connections(3)  # raising wakes a parked acceptor
        assert recv_exactly(waiter, 9) == b"let me in"
        held.append(waiter)
        listener.set_max_connections(1)  # lowering never kills live connections
        for sock in held:
            sock.sendall(b"still")
            assert recv_exactly(sock, 5) == b"still"
        assert listener.info().live == 3 and listener.info().max_connections == 1
        late = connect(listener)
        late.sendall(b"x")
        held[0].close()
        held[1].close()
        # Two left, live is 1: at the limit of 1, the late client still waits.
        wait_for(lambda: listener.info().live == 1, what="live down to 1")
        late.settimeout(0.2)
        with pytest.raises(socket.timeout):
            late.recv(1)
        late.settimeout(10)
        held[2].close()
        assert recv_exactly(late, 1) == b"x"
        late.close()
    with pytest.raises(ValueError, match="at least 1"):
        listener.set_max_connections(0)


def test_set_max_connections_with_refuse():
    with serving(max_connections=1, overflow="refuse") as listener:
        held = open_echoing(listener, 1)
        listener.set_max_connections(2)
        held += open_echoing(listener, 1)
        with connect(listener) as extra:
            assert recv_until_closed(extra) == b""
        assert listener.info().refused == 1
        close_all(held)


def test_uncount_frees_the_slot_but_keeps_the_connection():
    """Ranch's remove_connection: a presence socket stops counting against the limit."""

    def handler(message, conn):
        if message == b"uncount":
            conn.uncount()
            conn.uncount()  # a second call changes nothing
        conn.send(message)

    with serving(handler=handler, max_connections=1, overflow="refuse") as listener:
        presence = connect(listener)
        presence.sendall(b"uncount")
        assert recv_exactly(presence, 7) == b"uncount"
        info = listener.info()
        assert (info.live, info.open) == (0, 1)
        other = open_echoing(listener, 1)  # admitted: the slot is free
        presence.sendall(b"alive")
        assert recv_exactly(presence, 5) == b"alive"
        presence.close()
        close_all(other)
        info = wait_for(lambda: (i := listener.info()).closed == 2 and i, what="both closed")
        assert (info.live, info.open, info.refused) == (0, 0, 0)


def test_uncount_wakes_a_waiting_acceptor():
    def handler(message, conn):
        conn.uncount()
        conn.send(message)

    with serving(handler=handler, max_connections=1, overflow="wait") as listener:
        first = connect(listener)
        second = connect(listener)
        second.sendall(b"2")
        first.sendall(b"1")
        assert recv_exactly(first, 1) == b"1"
        assert recv_exactly(second, 1) == b"2"
        close_all([first, second])


def test_alarm_fires_past_threshold_once_per_cooldown():
    calls: list[int] = []
    fired = threading.Event()

    def on_alarm(listener, live):
        calls.append(live)
        fired.set()

    with serving(alarm_threshold=3, on_alarm=on_alarm, alarm_cooldown=60) as listener:
        held = open_echoing(listener, 2)
        assert calls == []
        held += open_echoing(listener, 3)
        assert fired.wait(10)
        assert calls == [3], "one alarm within the cool-down, at the crossing"
        close_all(held)


def test_alarm_callback_error_does_not_hurt_the_connection(caplog):
    def on_alarm(listener, live):
        raise RuntimeError("pager down")

    with serving(alarm_threshold=1, on_alarm=on_alarm, alarm_cooldown=0.001) as listener:
        held = open_echoing(listener, 2)
        assert "on_alarm callback raised" in caplog.text
        close_all(held)
