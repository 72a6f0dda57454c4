"""TLS with real handshakes: the standard library's ssl client against netpool's pyOpenSSL server."""

from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import threading
import time

import pytest

import netpool
from netpool import ListenerConfig, TLSError

from .certs import TestCA
from .conftest import connect, netpool_threads, recv_exactly, recv_until_closed, serving, wait_for

pytestmark = pytest.mark.io_modes  # every test runs in both I/O modes


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = TestCA(d)
    other_ca = TestCA(d, "untrusted CA")
    return {
        "ca": ca,
        "server": ca.issue("localhost", hosts=("localhost", "127.0.0.1")),
        "alt": ca.issue("alt.example", hosts=("alt.example",)),
        "client": ca.issue("alice", client=True),
        "stranger": other_ca.issue("mallory", client=True),
        "locked": ca.issue("locked", hosts=("localhost",), password=b"s3cret"),
    }


def tls_settings(pki, **extra):
    ssl_opts = {"certfile": str(pki["server"].cert), "keyfile": str(pki["server"].key)}
    ssl_opts.update(extra.pop("ssl", {}))
    return {"ssl": ssl_opts, **extra}


def client_context(pki, *, version=None, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"].path))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def recording_echo():
    """An echo handler that also records each connection's conn.tls; returns (records, handler)."""
    seen: queue.Queue = queue.Queue()

    def handler(message, conn):
        seen.put(conn.tls)
        conn.send(message)

    return seen, handler


def tls_connect(listener, ctx, server_hostname="localhost", **kw) -> ssl.SSLSocket:
    raw = connect(listener)
    return ctx.wrap_socket(raw, server_hostname=server_hostname, **kw)


@pytest.mark.parametrize("version, name", [
    (ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
    (ssl.TLSVersion.TLSv1_3, "TLSv1.3"),
])
def test_echo_over_tls_12_and_13(pki, version, name):
    seen, handler = recording_echo()

    with serving(handler=handler, framing="line", **tls_settings(pki)) as listener:
        with tls_connect(listener, client_context(pki, version=version)) as sock:
            assert sock.version() == name
            sock.sendall(b"secret hello\n")
            assert recv_exactly(sock, 13) == b"secret hello\n"
            info = seen.get(timeout=10)
            assert info.version == name and info.cipher == sock.cipher()[0]
            assert info.server_name == "localhost" and info.peer_subject is None


def test_below_min_version_is_refused(pki):
    with serving(**tls_settings(pki, ssl={"min_version": "1.3"})) as listener:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            tls_connect(listener, client_context(pki, version=ssl.TLSVersion.TLSv1_2))
        info = wait_for(lambda: (i := listener.info()).closed == 1 and i)
        assert info.closed_by_reason == {"tls_error": 1}
        with tls_connect(listener, client_context(pki)) as ok:
            assert ok.version() == "TLSv1.3"


def test_one_mebibyte_each_way_over_tls(pki):
    big = os.urandom(1 << 20)

    def handler(message, conn):
        assert message == big
        conn.send(message[::-1])

    settings = tls_settings(pki, framing="length", max_message_size=2 << 20)
    with serving(handler=handler, **settings) as listener:
        with tls_connect(listener, client_context(pki)) as sock:
            sock.sendall(len(big).to_bytes(4, "big") + big)
            assert recv_exactly(sock, 4) == len(big).to_bytes(4, "big")
            assert recv_exactly(sock, len(big)) == big[::-1]


def test_client_certificate_required(pki):
    seen, handler = recording_echo()

    settings = tls_settings(pki, ssl={"cafile": str(pki["ca"].path), "verify_client": "required"})
    with serving(handler=handler, **settings) as listener:
        with tls_connect(listener, client_context(pki, cert=pki["client"])) as sock:
            sock.sendall(b"id?")
            assert recv_exactly(sock, 3) == b"id?"
            assert "CN=alice" in seen.get(timeout=10).peer_subject
        for refused in (None, pki["stranger"]):
            with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
                with tls_connect(listener, client_context(pki, cert=refused)) as sock:
                    # TLS 1.3 reports a missing certificate after the client's handshake ends.
                    sock.sendall(b"x")
                    if not sock.recv(1):
                        raise ConnectionResetError("closed by the server")
        info = wait_for(lambda: (i := listener.info()).closed == 3 and i)
        assert info.closed_by_reason.get("tls_error") == 2


def test_client_certificate_optional(pki):
    seen, handler = recording_echo()

    settings = tls_settings(pki, ssl={"cafile": str(pki["ca"].path), "verify_client": "optional"})
    with serving(handler=handler, **settings) as listener:
        for cert, expected in ((None, None), (pki["client"], "alice")):
            with tls_connect(listener, client_context(pki, cert=cert)) as sock:
                sock.sendall(b"?")
                assert recv_exactly(sock, 1) == b"?"
                subject = seen.get(timeout=10).peer_subject
                assert (subject is None) if expected is None else (expected in subject)


def test_alpn_and_sni_choose_protocol_and_certificate(pki):
    seen, handler = recording_echo()

    settings = tls_settings(pki, ssl={
        "alpn": ["xmpp-client", "echo"],
        "sni": {"alt.example": {"certfile": str(pki["alt"].cert), "keyfile": str(pki["alt"].key)}},
    })
    with serving(handler=handler, **settings) as listener:
        ctx = client_context(pki)
        ctx.set_alpn_protocols(["echo"])
        with tls_connect(listener, ctx, server_hostname="alt.example") as sock:
            assert sock.selected_alpn_protocol() == "echo"
            assert ("commonName", "alt.example") in sock.getpeercert()["subject"][0]
            sock.sendall(b"a")
            assert recv_exactly(sock, 1) == b"a"
            info = seen.get(timeout=10)
            assert (info.alpn, info.server_name) == ("echo", "alt.example")
        with tls_connect(listener, client_context(pki)) as sock:
            assert ("commonName", "localhost") in sock.getpeercert()["subject"][0]


def test_encrypted_key_with_password(pki):
    locked = pki["locked"]
    settings = {"ssl": {"certfile": str(locked.cert), "keyfile": str(locked.key), "password": "s3cret"}}
    with serving(**settings) as listener, tls_connect(listener, client_context(pki)) as sock:
        sock.sendall(b"k")
        assert recv_exactly(sock, 1) == b"k"
    with pytest.raises(TLSError, match="password"):
        netpool.start_listener({"handler": lambda m, c: None, "ssl": {**settings["ssl"], "password": "wrong"}})


def test_session_resumption_tls12(pki):
    with serving(**tls_settings(pki)) as listener:
        ctx = client_context(pki, version=ssl.TLSVersion.TLSv1_2)
        with tls_connect(listener, ctx) as first:
            first.sendall(b"1")
            recv_exactly(first, 1)
            session = first.session
        with tls_connect(listener, ctx, session=session) as second:
            second.sendall(b"2")
            recv_exactly(second, 1)
            assert second.session_reused


def test_close_sends_close_notify(pki):
    """A server-side close is a clean TLS close, not a truncation the client must guess at."""

    def handler(message, conn):
        conn.send(b"bye")
        conn.close()

    with serving(handler=handler, **tls_settings(pki)) as listener:
        with tls_connect(listener, client_context(pki), suppress_ragged_eofs=False) as sock:
            sock.sendall(b"x")
            assert recv_exactly(sock, 3) == b"bye"
            assert sock.recv(10) == b""  # close_notify; a bare FIN would raise SSLEOFError


def test_a_half_close_without_close_notify_still_gets_its_replies_and_a_clean_end(pki):
    """A client that ends its side with a bare FIN (no close_notify) reads every reply, then a clean close.

    OpenSSL 3 would otherwise answer the bare FIN with a decode_error alert,
    which the client reads where its close_notify should be.
    """
    with serving(handler=lambda message, conn: conn.send(message), framing="line", **tls_settings(pki)) as listener:
        with tls_connect(listener, client_context(pki), suppress_ragged_eofs=False) as sock:
            sock.sendall(b"one\ntwo\n")
            # The FIN goes out on the TCP socket under the TLS session, which
            # stays open for reading.
            with socket.socket(fileno=os.dup(sock.fileno())) as raw:
                raw.shutdown(socket.SHUT_WR)
            assert recv_exactly(sock, 8) == b"one\ntwo\n"
            assert sock.recv(10) == b""  # close_notify: an alert would raise SSLError here
        assert wait_for(lambda: listener.info().closed_by_reason) == {"eof": 1}


def test_silent_and_garbage_clients_hit_the_deadline_and_do_not_slow_others(pki):
    """50 silent TCP clients and a garbage sender; a real TLS client is still served at once."""
    with serving(handshake_timeout=3.0, acceptors=4, **tls_settings(pki)) as listener:
        silent = [connect(listener) for _ in range(50)]
        garbage = connect(listener)
        garbage.sendall(b"GET / HTTP/1.0\r\n\r\n" + os.urandom(200))
        assert recv_until_closed(garbage) == b""
        started = time.monotonic()
        with tls_connect(listener, client_context(pki)) as sock:
            sock.sendall(b"served")
            assert recv_exactly(sock, 6) == b"served"
        elapsed = time.monotonic() - started
        # Served before any silent client's deadline: nobody waited behind them.
        assert elapsed < 2.5 and listener.info().closed_by_reason.get("tls_handshake_timeout", 0) == 0
        info = wait_for(lambda: (i := listener.info()).closed == 52 and i, timeout=15, what="silent clients cut")
        assert info.closed_by_reason == {"tls_error": 1, "tls_handshake_timeout": 50, "eof": 1}
        for s in silent:
            assert recv_until_closed(s) == b""
            s.close()
        garbage.close()


def test_plaintext_to_tls_port_is_a_tls_error(pki, caplog):
    caplog.set_level(logging.INFO, "netpool")
    with serving(**tls_settings(pki)) as listener, connect(listener) as sock:
        sock.sendall(b"hello in plaintext\n")
        assert recv_until_closed(sock) == b""
        wait_for(lambda: listener.info().closed_by_reason.get("tls_error") == 1)
        assert "TLS handshake failed" in caplog.text


def test_starttls_upgrade_mid_stream(pki):
    """A small line protocol: STARTTLS -> PROCEED -> handshake -> lines arrive decrypted.

    Plaintext the client pipelines after STARTTLS must be discarded (CVE-2011-0411 style injection).
    """
    seen: list[bytes] = []

    def handler(message, conn):
        seen.append(message)
        if message == b"STARTTLS":
            conn.send(b"PROCEED")
            conn.start_tls()
        else:
            conn.send(b"%s over %s" % (message, b"tls" if conn.tls else b"plain"))

    settings = tls_settings(pki, framing="line", ssl={"mode": "starttls"})
    with serving(handler=handler, **settings) as listener:
        raw = connect(listener)
        raw.sendall(b"hi\n")
        assert recv_exactly(raw, 14) == b"hi over plain\n"
        raw.sendall(b"STARTTLS\nINJECTED\n")
        assert recv_exactly(raw, 8) == b"PROCEED\n"
        with client_context(pki).wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"hello\n")
            assert recv_exactly(sock, 15) == b"hello over tls\n"
        assert seen == [b"hi", b"STARTTLS", b"hello"]


def test_starttls_client_that_never_sends_a_client_hello_is_cut_at_the_handshake_timeout(pki, io_mode):
    """A client that asks for STARTTLS and then goes silent: closed (tls_handshake_timeout) at the deadline.

    The STARTTLS handshake runs inside the handler (Connection.start_tls),
    not in the loop's swept set-up, so its deadline is the only thing that
    ends it. Meanwhile another client is served, upgrade included.
    """
    timeout = 2.0
    closed: queue.Queue = queue.Queue()

    def handler(message, conn):
        if message == b"STARTTLS":
            conn.send(b"PROCEED")
            try:
                conn.start_tls()
            except TLSError:
                return  # the connection is closed already; its reason says why
        else:
            conn.send(b"%s over %s" % (message, b"tls" if conn.tls else b"plain"))

    # Events mode runs the handshake on the loop thread, which it holds (an
    # event-loop handler must not block): the bystander gets the second loop.
    # Thread mode has one loop, which the waiting handshake must hand off.
    settings = tls_settings(pki, framing="line", handshake_timeout=timeout, ssl={"mode": "starttls"},
                            io_threads=2 if io_mode == "events" else 1,
                            on_close=lambda conn, reason: closed.put((conn.id, reason)))
    with serving(handler=handler, **settings) as listener:
        silent = connect(listener, timeout=timeout + 10)
        silent.sendall(b"STARTTLS\n")
        assert recv_exactly(silent, 8) == b"PROCEED\n"
        asked = time.monotonic()  # the server's deadline started just before its PROCEED left

        with connect(listener) as raw:
            raw.sendall(b"hi\n")
            assert recv_exactly(raw, 14) == b"hi over plain\n"
            raw.sendall(b"STARTTLS\n")
            assert recv_exactly(raw, 8) == b"PROCEED\n"
            with client_context(pki).wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"hello\n")
                assert recv_exactly(sock, 15) == b"hello over tls\n"
        served = time.monotonic() - asked
        # Served while the silent client still waits: nobody queued behind its handshake.
        assert served < timeout, f"the bystander took {served:.2f}s, past the other's {timeout}s handshake deadline"

        try:
            assert recv_until_closed(silent) == b""  # bounded by the socket timeout
        except TimeoutError:
            pytest.fail(f"the silent STARTTLS client was still open {timeout + 10:g}s after its PROCEED "
                        f"(handshake_timeout {timeout:g}s)")
        cut_after = time.monotonic() - asked
        silent.close()
        ends = sorted(closed.get(timeout=10)[1] for _ in range(2))
        assert ends == ["eof", "tls_handshake_timeout"]
        # Not before the deadline; after it, within a wide margin for a loaded machine.
        assert timeout * 0.8 <= cut_after < timeout + 8, f"cut after {cut_after:.2f}s (handshake_timeout {timeout}s)"
        assert listener.info().closed_by_reason == {"eof": 1, "tls_handshake_timeout": 1}


def test_start_tls_without_certificate_is_a_clear_error():
    errors: queue.Queue = queue.Queue()

    def handler(message, conn):
        try:
            conn.start_tls()
        except TLSError as exc:
            errors.put(exc)
            conn.send(b"no tls here")

    with serving(handler=handler) as listener, connect(listener) as sock:
        sock.sendall(b"STARTTLS")
        assert recv_exactly(sock, 11) == b"no tls here"
        assert "needs a certificate" in str(errors.get(timeout=10))


@pytest.mark.parametrize("problem", ["missing", "garbage", "mismatch", "key_missing"])
def test_bad_certificate_files_fail_at_start_naming_the_file(pki, tmp_path, problem):
    cert, key = str(pki["server"].cert), str(pki["server"].key)
    if problem == "missing":
        cert = str(tmp_path / "nope.pem")
        expected = "nope.pem: cannot read it"
    elif problem == "garbage":
        (tmp_path / "junk.pem").write_text("not a certificate")
        cert = str(tmp_path / "junk.pem")
        expected = "junk.pem: not a PEM certificate"
    elif problem == "mismatch":
        key = str(pki["alt"].key)
        expected = "does not match the certificate"
    else:
        key = str(tmp_path / "gone.key")
        expected = "gone.key: cannot read it"
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(TLSError, match=expected):
        netpool.start_listener(ListenerConfig(handler=lambda m, c: None, port=port,
                                              ssl={"certfile": cert, "keyfile": key}))
    assert not netpool_threads()
    # Nothing was bound: the port is still free.
    again = socket.socket()
    again.bind(("127.0.0.1", port))
    again.close()


def test_dev_certificate_loads_in_pyopenssl_and_stdlib(tmp_path):
    from netpool.devcert import write_dev_certificate

    cert, key = write_dev_certificate(str(tmp_path), ["localhost", "127.0.0.1"])
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    stdlib_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stdlib_server.load_cert_chain(cert, key)
    with serving(ssl={"certfile": cert, "keyfile": key}) as listener:
        ctx = ssl.create_default_context(cafile=cert)
        with tls_connect(listener, ctx, server_hostname="127.0.0.1") as sock:
            sock.sendall(b"dev")
            assert recv_exactly(sock, 3) == b"dev"


def test_quit_wakes_a_tls_reader(pki):
    with serving(idle_timeout=None, **tls_settings(pki)) as listener:
        with tls_connect(listener, client_context(pki)) as sock:
            conn = wait_for(lambda: listener.connections() and listener.connections()[0].tls and listener.connections()[0])
            threading.Thread(target=conn.quit.put, args=(1,)).start()
            assert sock.recv(10) == b""
            assert wait_for(lambda: listener.info().closed_by_reason == {"quit": 1})


def test_tls_idle_timeout(pki):
    with serving(idle_timeout=0.3, **tls_settings(pki)) as listener:
        with tls_connect(listener, client_context(pki)) as sock:
            assert sock.recv(10) == b""
            assert listener.info().closed_by_reason == {"idle_timeout": 1} or wait_for(
                lambda: listener.info().closed_by_reason == {"idle_timeout": 1})
