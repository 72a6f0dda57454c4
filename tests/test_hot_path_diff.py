"""The C hot path against the Python one on random client scripts (fuzz/hot_path_diff.py): they must agree.

Each seed is a script of a few connections over real loopback sockets (plain
TCP or TLS, thread or events mode, raw or line framing, read sizes from 1
byte to 64 KiB), sending rounds cut at random boundaries, interleaved, and
ending in every way a connection ends: half-close, close, reset, close_notify,
a forged TLS record, a handler that raises or closes, a line too long, a
reply the client resets on, a server stop. Each runs on a new listener with
the C hot path, then with the Python one; the echo, how each stream ended,
what the handler got, the close reasons, the byte counts and the listener's
counters must be the same, and the Python run must match the script's model.
A failure shows the first differences and the command that replays the seed.

``python fuzz/hot_path_diff.py --scripts 2000`` runs more seeds by hand.
Below: the harness notices a C path that goes wrong (as
tests/test_fuzz_corpus.py breaks each parser on purpose), and the bugs it
found in the loop stay fixed.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from typing import Any, Callable, Iterator

import pytest

import netpool
from fuzz.differential import script as scripts
from fuzz.hot_path_diff import Harness
from netpool import hot_path, io_loop

from .certs import TestCA
from .conftest import DEADLINE, recv_exactly, serving, wait_for

SEEDS = range(80)  # about 8 s on a two-core machine with the other core busy


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    if hot_path._speedups is None:
        pytest.skip("netpool._speedups was not compiled (no C compiler at install time): no C hot path to compare")
    with Harness() as harness:
        yield harness


def test_the_c_and_python_hot_paths_agree_on_random_scripts(harness):
    for seed in SEEDS:
        outcome = harness.check(scripts.from_seed(seed))
        if not outcome.ok:
            pytest.fail(outcome.report(), pytrace=False)


# -- the harness notices a C path that goes wrong ---------------------------------------------


def break_close_reason(monkeypatch: pytest.MonkeyPatch) -> tuple[str, Callable[[scripts.Script], bool]]:
    # An end of stream the C dispatch reports is taken for "closed" (the Python path never reports
    # one through _outcome_reason: it ends the connection itself).
    outcome_reason = io_loop.IOLoop._outcome_reason

    def misread(self: io_loop.IOLoop, conn: Any, kind: int, value: Any) -> Any:
        return "closed" if (kind, value) == (hot_path.FINISH, "eof") else outcome_reason(self, conn, kind, value)

    monkeypatch.setattr(io_loop.IOLoop, "_outcome_reason", misread)
    return "server.reason", lambda s: s.framing == "raw" and s.io == "events" and s.plans[0].ending == "fin"


def break_send(monkeypatch: pytest.MonkeyPatch) -> tuple[str, Callable[[scripts.Script], bool]]:
    # The C send loses the last byte of every reply longer than one byte.
    send_methods = hot_path._speedups.send_methods

    def lossy_methods(cls: type) -> tuple[Any, Any]:
        send, send_bytes = send_methods(cls)
        return (lambda self, message: send(self, message[:-1] if len(message) > 1 else message)), send_bytes

    monkeypatch.setattr(hot_path._speedups, "send_methods", lossy_methods)
    # One round that ends with the handler closing: the short echo ends at the server's FIN, not at
    # the client's deadline for the bytes that never come.
    return "client.echoes", lambda s: (s.framing == "raw" and s.io == "threads" and len(s.plans) == 1
                                       and s.plans[0].ending == "handler_close" and len(s.plans[0].rounds) == 1)


@pytest.mark.parametrize("breaker", [break_close_reason, break_send], ids=lambda f: f.__name__)
def test_the_harness_notices_a_c_path_that_goes_wrong(harness, monkeypatch, breaker):
    where, fits = breaker(monkeypatch)
    script = next(s for s in map(scripts.from_seed, range(1000)) if fits(s))
    try:
        outcome = harness.check(script)
    finally:
        monkeypatch.undo()
        hot_path.use_speedups(hot_path.speedups_active())  # the class's send methods, unbroken
    assert any(line.startswith(f"conns[0].{where}") for line in outcome.disagreements), outcome.report()
    assert not outcome.off_model, outcome.report()  # the Python run was not touched
    assert harness.check(script).ok  # and the C path as built agrees on the same script


# -- what the harness found (in the Python both paths share) -----------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return {"ca": ca, "server": ca.issue("localhost", hosts=("localhost", "127.0.0.1"))}


def tls_serving(pki: dict[str, Any], **settings: Any) -> Any:
    server = pki["server"]
    return serving(ssl={"certfile": str(server.cert), "keyfile": str(server.key)}, **settings)


def tls_connect(listener: netpool.Listener, pki: dict[str, Any], *, receive_buffer: int = 0) -> ssl.SSLSocket:
    sock = socket.socket()
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(DEADLINE)
    sock.connect(("127.0.0.1", listener.port))
    context = ssl.create_default_context(cafile=str(pki["ca"].path))
    return context.wrap_socket(sock, server_hostname="localhost")


def test_a_reset_while_the_loop_flushes_a_queue_ends_only_that_connection(version, pki):
    # Events mode queues a TLS reply the client's window cannot take; the client reads a little of
    # it and resets. A send that failed part-way through the flush left slices of the queue in the
    # traceback, so trimming the queue raised BufferError over the ConnectionClosed and ended the
    # loop thread, with every other connection it served.
    def handler(message: bytes, conn: netpool.Connection) -> None:
        conn.send(b"B" * (3 << 20) if message == b"big" else message)

    with tls_serving(pki, handler=handler, io="events") as listener, tls_connect(listener, pki) as other:
        for n in range(1, 11):
            rude = tls_connect(listener, pki, receive_buffer=16384)
            rude.sendall(b"big")
            for _ in range(n % 4 + 1):
                rude.recv(16384)
            rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            rude.close()
            wait_for(lambda: listener.info().closed_by_reason.get("reset") == n, what=f"reset {n} to be counted")
            other.sendall(b"ping %d" % n)
            assert recv_exactly(other, len(b"ping %d" % n)) == b"ping %d" % n
        assert listener.info().closed_by_reason == {"reset": 10}


def test_an_offloaded_tls_connection_is_read_on_while_openssl_holds_its_bytes(version, pki):
    # Thread mode, one-byte reads: a 300-byte record leaves 299 bytes inside OpenSSL, where epoll
    # cannot see them. The connection is offloaded (its handler slept), and after INLINE_AFTER
    # quick calls its turn ended to go back to the loop, which _calls_done refused while bytes
    # were pending, handing it straight back to a turn that again stopped before reading: the
    # echo stopped at 16 bytes, and a handler thread spun for ever.
    def handler(message: bytes, conn: netpool.Connection) -> None:
        if message == b"~":
            time.sleep(0.05)  # a first call that blocks: the connection is offloaded
        conn.send(message)

    with tls_serving(pki, handler=handler, io="threads", max_message_size=1) as listener, \
            tls_connect(listener, pki) as sock:
        sock.sendall(b"~")
        assert recv_exactly(sock, 1) == b"~"
        wait_for(lambda: listener.info().offloads, what="the connection to be offloaded")
        payload = bytes(range(32, 132)) * 3
        sock.sendall(payload)  # one record
        assert recv_exactly(sock, len(payload)) == payload

