"""Thread mode's hand-off: a handler that blocks moves its connection to a thread of its own.

Thread mode reads every connection through an event loop and runs handlers
inline; when a call outlives HANDOFF_AFTER, the loop goes to another thread
and the blocked thread carries on with that connection; once the call is
over the connection goes back to the loop, and one that blocks a second time
keeps a thread for good. These tests block handlers and
hooks for real (sleeps, events) and check that the other clients never wait
for them, that nothing framed before the block is lost or reordered, and that
the counters stay exact.
"""

from __future__ import annotations

import ssl
import threading
import time

import pytest

from netpool.io_loop import HANDOFF_AFTER, INLINE_AFTER

from .certs import TestCA
from .conftest import DEADLINE, connect, recv_exactly, serving, wait_for

# Well above HANDOFF_AFTER plus the monitor's idle tick, well below a blocked handler's time.
PROMPT = 0.5
BLOCK = 2.0


def handoffs(listener) -> int:
    return listener.info().handoffs


def slow_echo(message: bytes, conn) -> None:
    """Echo lines; b"slow" first sleeps well past HANDOFF_AFTER."""
    if message == b"slow":
        time.sleep(HANDOFF_AFTER * 50)
    conn.send(message)


def echo_after(release: threading.Event):
    """An echo handler whose b"block" line first waits for ``release`` (at most BLOCK seconds)."""
    def handler(message: bytes, conn) -> None:
        if message == b"block":
            release.wait(BLOCK)
        conn.send(message)

    return handler


def echo_time(listener, payload: bytes = b"ping\n") -> float:
    started = time.monotonic()
    with connect(listener) as sock:
        sock.sendall(payload)
        assert recv_exactly(sock, len(payload)) == payload
    return time.monotonic() - started


def test_a_blocking_handler_does_not_hold_up_other_clients():
    """While one handler sleeps, ten other clients are each echoed promptly; the sleeper then goes on."""
    release = threading.Event()
    handler = echo_after(release)

    with serving(handler=handler, framing="line") as listener:
        with connect(listener) as blocked:
            blocked.sendall(b"block\n")
            wait_for(lambda: handoffs(listener) == 1, what="the loop handed off")
            times = [echo_time(listener) for _ in range(10)]
            assert max(times) < PROMPT, f"other clients waited for a blocked handler: {times}"
            release.set()
            assert recv_exactly(blocked, 6) == b"block\n"
            # Its call over, the connection is back on the loop: it goes on
            # being served, and the thread it borrowed parks again.
            for i in range(20):
                blocked.sendall(b"after %d\n" % i)
                assert recv_exactly(blocked, len(b"after %d\n" % i)) == b"after %d\n" % i
            threads = listener._conn_threads
            wait_for(lambda: threads.threads - threads.parked - listener._loops[0].idle_handler_threads == 1,
                     what="only the loop's own thread busy")
            assert handoffs(listener) == 1
        info = wait_for(lambda: (i := listener.info()).closed == 11 and i, what="11 closures")
        assert info.closed_by_reason == {"eof": 11} and info.live == 0
        assert "handed off 1" in info.summary()


def test_messages_framed_with_the_blocking_one_arrive_in_order():
    """One write holds four lines; the handler blocks on the second: all four come back, in order.

    What is checked is the hand-off path: the blocked call's thread carries
    the two lines framed after it. A first call that a GIL switch slowed
    (the monitor waking mid-call) may instead move the connection to the
    handler threads before the slow line, which keeps the order too but
    tests another path; such a try is repeated on a new connection.
    """
    with serving(handler=slow_echo, framing="line") as listener:
        for attempt in range(5):
            before = handoffs(listener)
            with connect(listener) as sock:
                sock.sendall(b"a\nslow\nb\nc\n")
                assert recv_exactly(sock, 11) == b"a\nslow\nb\nc\n"
                sock.sendall(b"d\n")
                assert recv_exactly(sock, 2) == b"d\n"
            if handoffs(listener) == before + 1:
                break
        else:
            raise AssertionError("the slow line was never handed off in 5 tries")


def test_a_handler_that_blocks_then_raises_closes_only_its_connection(caplog):
    def handler(message: bytes, conn) -> None:
        if message == b"boom":
            time.sleep(HANDOFF_AFTER * 50)
            raise ValueError("handler failed after blocking")
        conn.send(message)

    with serving(handler=handler, framing="line") as listener:
        with connect(listener) as bad, connect(listener) as good:
            bad.sendall(b"boom\n")
            wait_for(lambda: listener.info().closed == 1, what="the failing connection closed")
            good.sendall(b"fine\n")
            assert recv_exactly(good, 5) == b"fine\n"
        info = wait_for(lambda: (i := listener.info()).closed == 2 and i, what="2 closures")
        assert info.closed_by_reason == {"handler_error": 1, "eof": 1}
    assert "handler failed after blocking" in caplog.text


@pytest.mark.parametrize("hook", ["on_connect", "on_close"])
def test_a_blocking_hook_does_not_hold_up_other_clients(hook):
    """on_connect and on_close run on the loop too; a slow one is handed off like a handler."""
    release = threading.Event()
    first = threading.Event()

    def slow_hook(conn, *args) -> None:
        if not first.is_set():
            first.set()
            release.wait(BLOCK)

    with serving(framing="line", **{hook: slow_hook}) as listener:
        slow = connect(listener)
        if hook == "on_close":
            slow.close()
        wait_for(first.is_set, what=f"{hook} to run")
        wait_for(lambda: handoffs(listener) == 1, what="the loop handed off")
        times = [echo_time(listener) for _ in range(5)]
        assert max(times) < PROMPT, f"other clients waited for a blocked {hook}: {times}"
        release.set()
        if hook == "on_connect":
            slow.sendall(b"late\n")
            assert recv_exactly(slow, 5) == b"late\n"
            slow.close()
        info = wait_for(lambda: (i := listener.info()).closed == 6 and i, what="6 closures")
        assert info.closed_by_reason == {"eof": 6} and info.live == 0


def test_fast_handlers_are_never_handed_off():
    """A thousand quick echoes over twenty connections cost no hand-off: they stay on the loop."""
    with serving(framing="line") as listener:
        socks = [connect(listener) for _ in range(20)]
        try:
            for round_ in range(50):
                for sock in socks:
                    sock.sendall(b"%d\n" % round_)
                for sock in socks:
                    assert recv_exactly(sock, len(b"%d\n" % round_)) == b"%d\n" % round_
        finally:
            for sock in socks:
                sock.close()
        # A preempted test process can stretch one quick call past the
        # threshold now and then; a handful at most, never one per message.
        assert handoffs(listener) <= 5


def test_a_tls_connection_blocked_in_its_handler_goes_on_over_tls(tmp_path):
    """Implicit TLS: a handler blocks mid-stream; the others are served, and the blocked one keeps talking TLS."""
    ca = TestCA(tmp_path)
    server = ca.issue("localhost", hosts=("localhost", "127.0.0.1"))
    ctx = ssl.create_default_context(cafile=str(ca.path))
    release = threading.Event()
    handler = echo_after(release)

    def tls_echo(listener, line: bytes) -> float:
        started = time.monotonic()
        with ctx.wrap_socket(connect(listener), server_hostname="localhost") as sock:
            sock.sendall(line)
            assert recv_exactly(sock, len(line)) == line
        return time.monotonic() - started

    settings = {"certfile": str(server.cert), "keyfile": str(server.key)}
    with serving(handler=handler, framing="line", ssl=settings) as listener:
        with ctx.wrap_socket(connect(listener), server_hostname="localhost") as blocked:
            blocked.sendall(b"block\nnext\n")
            wait_for(lambda: handoffs(listener) == 1, what="the loop handed off")
            times = [tls_echo(listener, b"tls ping\n") for _ in range(5)]
            assert max(times) < PROMPT * 2, f"TLS clients waited for a blocked handler: {times}"
            release.set()
            assert recv_exactly(blocked, 11) == b"block\nnext\n"
            blocked.sendall(b"on its own thread\n")
            assert recv_exactly(blocked, 18) == b"on its own thread\n"
            assert blocked.version() is not None
        info = wait_for(lambda: (i := listener.info()).closed == 6 and i, what="6 closures")
        assert info.errors == 0 and info.live == 0


def test_a_connection_that_blocked_runs_its_calls_on_threads_then_comes_back():
    """The first block is handed off; later calls of that connection run on threads, never on the loop.

    While its second slow call sleeps, another client is echoed promptly and
    no second hand-off is needed. After INLINE_AFTER quick calls in a row it
    is served on the loop again (no more threaded calls).
    """
    with serving(handler=slow_echo, framing="line") as listener:
        with connect(listener) as sock:
            sock.sendall(b"slow\n")
            assert recv_exactly(sock, 5) == b"slow\n"
            assert handoffs(listener) == 1 and listener.info().offloads == 1
            sock.sendall(b"slow\n")
            assert echo_time(listener) < PROMPT, "a client waited for an offloaded call"
            assert recv_exactly(sock, 5) == b"slow\n"
            assert handoffs(listener) == 1, "the second slow call ran on a thread, not on the loop"
            assert listener.info().threaded_calls >= 1
            # A preempted test process can stretch a quick call past
            # OFFLOAD_AFTER and restart the count: a few rounds are allowed.
            for _ in range(10):
                threaded = listener.info().threaded_calls
                for i in range(INLINE_AFTER + 10):
                    sock.sendall(b"fast %d\n" % i)
                    assert recv_exactly(sock, len(b"fast %d\n" % i)) == b"fast %d\n" % i
                if listener.info().threaded_calls < threaded + INLINE_AFTER + 10:
                    break
            else:
                raise AssertionError("quick calls never came back to the loop")
        info = wait_for(lambda: (i := listener.info()).closed == 2 and i, what="both connections closed")
        assert info.closed_by_reason == {"eof": 2} and info.live == 0


def test_with_two_loops_each_hands_off_on_its_own():
    """io_threads=2: a blocked call on each loop; clients of both loops are still echoed promptly."""
    release = threading.Event()
    handler = echo_after(release)

    with serving(handler=handler, framing="line", io_threads=2) as listener:
        blocked = [connect(listener), connect(listener)]  # round-robin: one per loop
        try:
            for sock in blocked:
                sock.sendall(b"block\n")
            wait_for(lambda: handoffs(listener) == 2, what="both loops handed off")
            times = [echo_time(listener) for _ in range(6)]
            assert max(times) < PROMPT, f"clients waited for a blocked handler: {times}"
            release.set()
            for sock in blocked:
                assert recv_exactly(sock, 6) == b"block\n"
        finally:
            for sock in blocked:
                sock.close()
        info = wait_for(lambda: (i := listener.info()).closed == 8 and i, what="8 closures")
        assert info.closed_by_reason == {"eof": 8}


# How long the others wait while one handler blocks is the monitor's
# business: it hands the loop off after one tick without a new call
# (HANDOFF_AFTER, 2 ms while busy), so within two ticks. Measured on the
# 2-core test machine, median of nine rounds of the test below: 4-5 ms at its
# usual load (about 8, from other jobs), 8-18 ms with six CPU hogs added
# (load 12; single rounds up to 130 ms, hence the median). A monitor 20
# times slower (HANDOFF_AFTER and its idle tick x20) cannot hand off before
# one whole tick of its own, 40 ms after the call began, in any round: its
# medians were 58-77 ms. 35 ms sits under that floor and about twice above
# the worst median seen under load.
STALL_ROUNDS = 9
STALL_BOUND = 0.035


def test_other_clients_wait_for_a_blocked_handler_only_until_the_monitor_hands_off():
    """While one handler blocks on the loop, another client's round trip stays within a few monitor ticks.

    Each round starts a listener, warms two connections up with quick calls
    (they stay on the loop, and the monitor ticks at its busy pace), then one
    handler blocks and the other client asks for an echo. A round where a
    quick call was offloaded (a preempted test process can make one look
    slow) proves nothing, since the blocking call would then not run on the
    loop: it is done again.
    """
    entered = threading.Event()
    release = threading.Event()

    def handler(message: bytes, conn) -> None:
        if message == b"block":
            entered.set()
            release.wait(BLOCK)
        conn.send(message)

    stalls: list[float] = []
    for _ in range(3 * STALL_ROUNDS):  # bounded: retries of rounds that proved nothing
        if len(stalls) == STALL_ROUNDS:
            break
        entered.clear()
        release.clear()
        with serving(handler=handler) as listener:
            with connect(listener) as blocker, connect(listener) as other:
                for _ in range(10):
                    for sock in (blocker, other):
                        sock.sendall(b"ping")
                        assert recv_exactly(sock, 4) == b"ping"
                if listener.info().offloads:
                    continue  # a quick call was taken for a blocking one: the block would not hold the loop
                started = time.perf_counter()
                blocker.sendall(b"block")
                try:
                    assert entered.wait(DEADLINE), "the blocking handler never ran"
                    other.sendall(b"ping")  # behind the blocked call on the loop
                    assert recv_exactly(other, 4) == b"ping"
                    stalls.append(time.perf_counter() - started)
                finally:
                    release.set()
                assert recv_exactly(blocker, 5) == b"block"
    assert len(stalls) == STALL_ROUNDS, f"only {len(stalls)} of {3 * STALL_ROUNDS} rounds kept every quick call on the loop"
    stalls.sort()
    median = stalls[len(stalls) // 2]
    shown = ", ".join(f"{s * 1000:.1f}" for s in stalls)
    assert median < STALL_BOUND, f"a client waited {median * 1000:.1f} ms (median) behind a blocked handler: {shown} ms"
