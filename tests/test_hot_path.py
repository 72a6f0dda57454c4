"""The hot path (netpool.hot_path): the C version and the Python version must behave alike.

Every test runs once per version, once per I/O mode and (where the wire
matters) once over plain TCP and once over TLS, against a real listener on
loopback with the standard library's client: what the loop reads, what the
handler gets, what is sent back and in which order, the byte counters, and
why a connection closed. The rest of the suite runs with whichever version is installed (C
where it compiled), so this module is where the Python version is held to
the same behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import shutil
import socket
import ssl
import struct
import sysconfig
import threading
import tracemalloc
from typing import Any

import pytest

import netpool
from netpool import hot_path
from netpool.io_loop import RECV_SIZE

from .certs import TestCA
from .conftest import DEADLINE, connect, recv_exactly, recv_until_closed, serving, wait_for

pytestmark = pytest.mark.io_modes


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    return {"ca": ca, "server": ca.issue("localhost", hosts=("localhost", "127.0.0.1"))}


class Wire:
    """How the test talks to the listener: plain TCP, or TLS (a pyOpenSSL server, an ``ssl`` client)."""

    def __init__(self, kind: str, pki: dict[str, Any]) -> None:
        self.tls = kind == "tls"
        self._pki = pki
        self.context = ssl.create_default_context(cafile=str(pki["ca"].path))

    def serving(self, **settings: Any) -> contextlib.AbstractContextManager[netpool.Listener]:
        if self.tls:
            server = self._pki["server"]
            settings["ssl"] = {"certfile": str(server.cert), "keyfile": str(server.key)}
        return serving(**settings)

    def connect(self, listener: netpool.Listener) -> socket.socket:
        sock = connect(listener)
        return self.context.wrap_socket(sock, server_hostname="localhost") if self.tls else sock


@pytest.fixture(params=["plain", "tls"])
def wire(request: pytest.FixtureRequest, pki: dict[str, Any]) -> Wire:
    return Wire(request.param, pki)


def test_the_install_compiled_the_c_version_where_a_compiler_exists():
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here: the Python version serves")
    assert hot_path._speedups is not None, "pip install did not build netpool._speedups; see its build log"
    # An editable install whose rebuild failed keeps the old module beside
    # the new source (the extension is optional, so pip only warns): then the
    # C tests would run yesterday's code.
    built = pathlib.Path(hot_path._speedups.__file__)
    source = built.parent / "_speedups.c"
    if source.exists():
        assert built.stat().st_mtime >= source.stat().st_mtime, (
            f"{built.name} is older than _speedups.c: its rebuild failed (pip install -v -e . shows why)")


def test_echoes_many_clients_exactly_and_counts_every_byte(version, wire):
    assert hot_path.speedups_active() == (version == "c")
    sizes = [1, 7, 64, 1000, 3000, 16000]
    with wire.serving() as listener:
        clients = [wire.connect(listener) for _ in range(20)]
        expected = 0
        try:
            for round_ in range(30):
                for n, sock in enumerate(clients):
                    payload = bytes([(n + round_) % 251]) * sizes[(n + round_) % len(sizes)]
                    sock.sendall(payload)
                    assert recv_exactly(sock, len(payload)) == payload
                    expected += len(payload)
        finally:
            for sock in clients:
                sock.close()
        wait_for(lambda: listener.info().closed == 20, what="all 20 connections to close")
        info = listener.info()
    assert (info.bytes_in, info.bytes_out) == (expected, expected)
    assert info.closed_by_reason == {"eof": 20}


def big_reply(message: bytes, conn: netpool.Connection) -> None:
    # 1 MiB per byte received (the requests may arrive in one read or
    # several): more than the kernel takes at once, so the rest is queued
    # (events) or waited for (threads) behind the partial send.
    for letter in message:
        conn.send(bytes([letter]) * (1 << 20))


def test_replies_larger_than_the_socket_buffer_arrive_whole_and_in_order(version, wire):
    with wire.serving(handler=big_reply) as listener, wire.connect(listener) as sock:
        for letter in b"abc":
            sock.sendall(bytes([letter]))
        for letter in b"abc":
            assert recv_exactly(sock, 1 << 20) == bytes([letter]) * (1 << 20)
        wait_for(lambda: listener.info().bytes_out == 3 << 20, what="3 MiB counted out")


def test_sends_from_other_threads_never_interleave_with_the_handlers(version, wire):
    # Four threads send fixed-size records while the handler echoes records
    # of the same size: every record must arrive intact, none cut into.
    record = 512
    started = threading.Event()
    conns: list[netpool.Connection] = []

    def on_connect(conn: netpool.Connection) -> None:
        conns.append(conn)
        started.set()

    def blast(k: int) -> None:
        for i in range(300):
            conns[0].send(struct.pack("!II", k, i).ljust(record, b"t"))

    with wire.serving(on_connect=on_connect) as listener, wire.connect(listener) as sock:
        assert started.wait(DEADLINE)
        senders = [threading.Thread(target=blast, args=(k,)) for k in range(4)]
        for thread in senders:
            thread.start()
        echoed = [struct.pack("!II", 99, i).ljust(record, b"e") for i in range(300)]
        received = bytearray()
        for rec in echoed:  # the client's own records go out one by one, the echo comes back among the rest
            sock.sendall(rec)
            received += sock.recv(65536)
        for thread in senders:
            thread.join(DEADLINE)
            assert not thread.is_alive()
        total = (4 * 300 + 300) * record
        received += recv_exactly(sock, total - len(received))
    records = [bytes(received[i:i + record]) for i in range(0, total, record)]
    seen: dict[int, list[int]] = {}
    for rec in records:
        k, i = struct.unpack("!II", rec[:8])
        assert rec[8:] == (b"e" if k == 99 else b"t") * (record - 8), f"record {k}:{i} was cut into"
        seen.setdefault(k, []).append(i)
    assert seen == {k: list(range(300)) for k in (0, 1, 2, 3, 99)}


def raise_on_boom(message: bytes, conn: netpool.Connection) -> None:
    if message == b"boom":
        raise ValueError("the handler cannot take boom")
    conn.send(message)


def test_a_handler_that_raises_closes_only_its_connection_and_logs_why(version, wire, caplog):
    with wire.serving(handler=raise_on_boom) as listener, \
            wire.connect(listener) as bad, wire.connect(listener) as good:
        good.sendall(b"before")
        assert recv_exactly(good, 6) == b"before"
        with caplog.at_level(logging.ERROR, logger="netpool"):
            bad.sendall(b"boom")
            assert recv_until_closed(bad) == b""
            wait_for(lambda: listener.info().closed == 1, what="the raising connection to close")
        good.sendall(b"after")
        assert recv_exactly(good, 5) == b"after"
        assert listener.info().closed_by_reason == {"handler_error": 1}
    record = next(r for r in caplog.records if "handler raised" in r.getMessage())
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert "raise_on_boom" in caplog.text  # the traceback reaches the handler's own frame


def close_on_bye(message: bytes, conn: netpool.Connection) -> None:
    conn.send(b"bye!" if message == b"bye" else message)
    if message == b"bye":
        conn.close()


def test_close_in_the_handler_sends_the_reply_first_then_ends_the_connection(version, wire):
    with wire.serving(handler=close_on_bye) as listener, wire.connect(listener) as sock:
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
        sock.sendall(b"bye")
        assert recv_until_closed(sock) == b"bye!"
        wait_for(lambda: listener.info().closed == 1, what="the connection to close")
        assert listener.info().closed_by_reason == {"closed": 1}


def test_a_reset_and_an_orderly_close_are_told_apart(version, wire):
    with wire.serving() as listener:
        with wire.connect(listener) as sock:  # a FIN (over TLS: without close_notify, as browsers do)
            sock.sendall(b"x")
            assert recv_exactly(sock, 1) == b"x"
        expected = {"eof": 1, "reset": 1}
        if wire.tls:
            polite = wire.connect(listener)
            polite.sendall(b"z")
            assert recv_exactly(polite, 1) == b"z"
            polite.unwrap().close()  # close_notify, then the FIN
            expected["eof"] += 1
        rude = wire.connect(listener)
        rude.sendall(b"y")
        assert recv_exactly(rude, 1) == b"y"
        rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rude.close()  # RST instead of FIN
        wait_for(lambda: listener.info().closed == sum(expected.values()), what="every connection to close")
        assert listener.info().closed_by_reason == expected

def send_buffers(message: bytes, conn: netpool.Connection) -> None:
    # Not bytes: the C send leaves these to the Python path.
    conn.send(bytearray(message))
    conn.send(memoryview(message.upper()))


def test_bytearray_and_memoryview_replies_go_out_too(version, wire):
    with wire.serving(handler=send_buffers) as listener, wire.connect(listener) as sock:
        sock.sendall(b"abc")
        assert recv_exactly(sock, 6) == b"abcABC"
        # Counted just after the send() that the client may already have read.
        wait_for(lambda: listener.info().bytes_out == 6, what="6 bytes counted out")


def test_a_handler_that_blocks_is_handed_off_and_the_rest_go_on(version, wire, io_mode):
    if io_mode != "threads":
        pytest.skip("hand-off is thread mode's")
    release = threading.Event()

    def slow_on_wait(message: bytes, conn: netpool.Connection) -> None:
        if message == b"wait":
            release.wait(DEADLINE)
        conn.send(message)

    with wire.serving(handler=slow_on_wait) as listener, \
            wire.connect(listener) as slow, wire.connect(listener) as fast:
        slow.sendall(b"wait")
        wait_for(lambda: listener.info().handoffs == 1, what="the blocked call to be handed off")
        fast.sendall(b"quick")
        assert recv_exactly(fast, 5) == b"quick"
        release.set()
        assert recv_exactly(slow, 4) == b"wait"
        slow.sendall(b"again")  # given back to the loop: served as before
        assert recv_exactly(slow, 5) == b"again"


def test_a_send_waits_while_another_thread_holds_the_send_lock(version, wire):
    # The C send must not slip past a sender that holds the lock (a worker
    # thread in the middle of a long send): the reply waits for its turn.
    conns: list[netpool.Connection] = []
    with wire.serving(on_connect=conns.append) as listener, wire.connect(listener) as sock:
        wait_for(lambda: conns, what="on_connect")
        lock = conns[0]._send_lock
        assert lock.acquire(timeout=DEADLINE)
        try:
            sock.sendall(b"held")
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(16)  # nothing may arrive while the lock is held
        finally:
            lock.release()
        sock.settimeout(DEADLINE)
        assert recv_exactly(sock, 4) == b"held"


class RecordClient:
    """A TLS client over memory BIOs (``ssl.SSLObject``): the test decides how records meet TCP segments."""

    def __init__(self, listener: netpool.Listener, context: ssl.SSLContext) -> None:
        self.sock = connect(listener)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname="localhost")
        for _ in range(20):  # a handshake is a few round trips
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                self._receive()
        self._send_pending()

    def _send_pending(self) -> None:
        out = self._out.read()
        if out:
            self.sock.sendall(out)

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise AssertionError("the server closed the connection")
        self._in.write(data)

    def records(self, *payloads: bytes) -> bytes:
        """The wire bytes of one TLS record per payload, not sent."""
        for payload in payloads:
            self.tls.write(payload)
        return self._out.read()

    def read(self, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            try:
                got += self.tls.read(n - len(got))
            except ssl.SSLWantReadError:
                self._receive()
        return bytes(got)


def recording(seen: list[bytes]) -> Any:
    def handler(message: bytes, conn: netpool.Connection) -> None:
        seen.append(message)
        conn.send(message)

    return handler


def test_tls_records_cut_across_segments_or_packed_in_one_are_each_served(version, pki):
    # Half a record: SSL_read wants more and nothing is delivered. Three
    # records in one segment: each is read in turn (epoll says readable
    # again for what OpenSSL left in the socket).
    seen: list[bytes] = []
    wire = Wire("tls", pki)
    with wire.serving(handler=recording(seen)) as listener:
        client = RecordClient(listener, wire.context)
        client.sock.sendall(client.records(b"zero"))  # a round trip: session tickets are read by now
        assert client.read(4) == b"zero"
        record = client.records(b"one")
        client.sock.sendall(record[:7])
        client.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.sock.recv(1)  # nothing comes back for half a record
        client.sock.settimeout(DEADLINE)
        client.sock.sendall(record[7:])
        assert client.read(3) == b"one"
        client.sock.sendall(client.records(b"two", b"three", b"four"))
        assert client.read(12) == b"twothreefour"
        client.sock.close()
        wait_for(lambda: listener.info().closed == 1, what="the connection to close")
        info = listener.info()
    assert seen == [b"zero", b"one", b"two", b"three", b"four"]
    assert (info.bytes_in, info.bytes_out) == (19, 19)


def test_a_tls_record_larger_than_a_message_is_read_in_message_sized_pieces(version, pki):
    # With max_message_size=1000 a read takes 1,000 bytes of a 5,000-byte
    # record; the other 4,000 wait inside OpenSSL where epoll cannot see them.
    seen: list[bytes] = []
    wire = Wire("tls", pki)
    with wire.serving(handler=recording(seen), max_message_size=1000) as listener:
        client = RecordClient(listener, wire.context)
        payload = bytes(range(250)) * 20
        client.sock.sendall(client.records(payload))
        assert client.read(5000) == payload
    assert [len(m) for m in seen] == [1000] * 5


def test_a_corrupt_tls_record_closes_only_its_connection_as_a_tls_error(version, pki, caplog):
    wire = Wire("tls", pki)
    with wire.serving() as listener, wire.connect(listener) as good:
        bad = RecordClient(listener, wire.context)
        bad.sock.sendall(bad.records(b"fine"))
        assert bad.read(4) == b"fine"
        forged = bytearray(bad.records(b"forged"))
        forged[-1] ^= 0xFF  # the record no longer authenticates
        with caplog.at_level(logging.WARNING, logger="netpool"):
            bad.sock.sendall(bytes(forged))
            assert recv_until_closed(bad.sock) != b"forged"
            wait_for(lambda: listener.info().closed == 1, what="the forged record's connection to close")
        good.sendall(b"still here")
        assert recv_exactly(good, 10) == b"still here"
        assert listener.info().closed_by_reason == {"tls_error": 1}
    logged = [r.getMessage() for r in caplog.records if "tls_error" in r.getMessage()]
    assert len(logged) == 1 and "TLS error: " in logged[0], logged
    assert "bad record mac" in logged[0] or "decrypt" in logged[0], logged  # OpenSSL's own reason


@pytest.mark.parametrize("version", ["c"], indirect=True)  # what the C version leaves out
def test_the_c_version_serves_tls_without_the_python_transport(version, pki, monkeypatch):
    # Over TLS the C path calls OpenSSL itself: the Python transport's recv
    # and send are not used for an echo (they still are for the handshake
    # and for what C leaves to Python, like bytearray sends).
    from netpool.tls import TLSTransport

    used: list[str] = []
    for name in ("recv_nowait", "send_nowait", "send_until", "pending"):
        original = getattr(TLSTransport, name)
        monkeypatch.setattr(TLSTransport, name, lambda self, *a, _n=name, _f=original: used.append(_n) or _f(self, *a))
    wire = Wire("tls", pki)
    with wire.serving() as listener, wire.connect(listener) as sock:
        assert hot_path.tls_speedups_ready()  # the TLS listener installed it
        # In thread mode a call slowed by something else (this process's own
        # client thread taking the GIL, a collection) offloads the connection
        # to a thread, which reads through the Python transport for a while:
        # what is checked is a run of 50 echoes served on the loop.
        for _ in range(10):
            used.clear()
            before = listener.info()
            for n in range(50):
                sock.sendall(b"%d" % n)
                assert recv_exactly(sock, len(b"%d" % n)) == b"%d" % n
            after = listener.info()
            if after.threaded_calls == before.threaded_calls and after.offloads == before.offloads:
                break
        else:
            raise AssertionError("no run of 50 echoes was served on the loop")
    assert used == []


def test_a_read_allocates_only_the_bytes_it_returns(wire, monkeypatch):
    # With line framing every read takes the loop's Python path (or a
    # handler thread's). socket.recv and pyOpenSSL's recv allocate all of
    # the 64 KiB asked for on every call; thousands of such short-lived
    # blocks a second, between long-lived ones, fragmented malloc's heaps
    # for hours (bench/soak-report.md). The C reads use one buffer.
    if not hot_path.speedups_active():
        pytest.skip("the Python version reads with os.read and pyOpenSSL, which allocate the whole buffer")
    # pyOpenSSL's buffer comes from cffi's allocator, which tracemalloc does not see: count its calls instead.
    from OpenSSL import SSL

    pyopenssl_reads: list[int] = []
    original = SSL.Connection.recv
    monkeypatch.setattr(SSL.Connection, "recv", lambda self, *a: pyopenssl_reads.append(1) or original(self, *a))
    with wire.serving(framing="line") as listener, wire.connect(listener) as sock:
        sock.sendall(b"warm up\n")
        assert recv_exactly(sock, 8) == b"warm up\n"
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for n in range(200):
                line = b"line %d\n" % n
                sock.sendall(line)
                assert recv_exactly(sock, len(line)) == line
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
    # Below one whole buffer: the old reads peaked at 64 KiB and more. Other
    # allocations are not the reads' (CI once saw 55 KB in TLS thread mode,
    # where a loaded machine made the monitor move the loop to a new thread).
    assert peak < RECV_SIZE, f"serving 200 short lines took a peak of {peak} bytes: a read allocated its whole buffer"
    assert not pyopenssl_reads, f"{len(pyopenssl_reads)} reads went through pyOpenSSL's recv"


def test_the_c_epoll_wait_reports_what_select_epoll_reports():
    if hot_path._speedups is None:
        pytest.skip("netpool._speedups was not compiled")
    import select
    import time

    wait = hot_path._speedups.epoll_wait
    pairs = [socket.socketpair() for _ in range(5)]
    ep = select.epoll()
    try:
        for reader, _ in pairs:
            ep.register(reader.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        assert wait(ep.fileno(), 0) == [] == ep.poll(0)
        started = time.monotonic()
        assert wait(ep.fileno(), 0.05) == []
        assert time.monotonic() - started >= 0.045  # waited out its timeout, rounded up
        pairs[1][1].sendall(b"x")
        pairs[3][1].sendall(b"y")
        pairs[4][1].close()  # EOF: EPOLLIN | EPOLLRDHUP
        assert sorted(wait(ep.fileno(), 1.0)) == sorted(ep.poll(1.0))
        assert {fd for fd, _ in wait(ep.fileno(), 0)} == {pairs[i][0].fileno() for i in (1, 3, 4)}
        with pytest.raises(OSError):
            wait(pairs[0][0].fileno(), 0)  # not an epoll descriptor: EINVAL, as select.epoll would say
    finally:
        ep.close()
        for a, b in pairs:
            a.close()
            b.close()
