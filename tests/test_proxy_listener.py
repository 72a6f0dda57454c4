"""PROXY protocol on a real listener: the handler sees the real client; bad headers close only their connection."""

from __future__ import annotations

import queue
import socket
import ssl

import pytest

from netpool.proxy_protocol import build_v1, build_v2

from .certs import TestCA
from .conftest import connect, recv_exactly, recv_until_closed, serving, wait_for
from .test_cli import STOPPED, server

pytestmark = pytest.mark.io_modes  # every test runs in both I/O modes


def recording_echo():
    seen: queue.Queue = queue.Queue()

    def handler(message, conn):
        seen.put((conn.peer, conn.proxied_by, conn.proxy))
        conn.send(message)

    return seen, handler


@pytest.mark.parametrize("build", [build_v1, build_v2], ids=["v1", "v2"])
def test_handler_sees_the_client_named_by_the_header(build):
    seen, handler = recording_echo()
    with serving(handler=handler, proxy_protocol="any", framing="line") as listener, connect(listener) as sock:
        # Header and first message in one packet: not a byte of the message may be eaten.
        sock.sendall(build(("203.0.113.7", 40001), ("198.51.100.1", 443)) + b"hello\n")
        assert recv_exactly(sock, 6) == b"hello\n"
        peer, proxied_by, header = seen.get(timeout=10)
        assert peer == ("203.0.113.7", 40001)
        assert proxied_by[0] == "127.0.0.1" and proxied_by[1] == sock.getsockname()[1]
        assert header.destination == ("198.51.100.1", 443)


def test_header_trickled_byte_by_byte():
    seen, handler = recording_echo()
    with serving(handler=handler, proxy_protocol="v2") as listener, connect(listener) as sock:
        for byte in build_v2(("2001:db8::5", 1234), ("2001:db8::1", 80)):
            sock.sendall(bytes([byte]))
        sock.sendall(b"x")
        assert recv_exactly(sock, 1) == b"x"
        assert seen.get(timeout=10)[0] == ("2001:db8::5", 1234)


def test_local_command_keeps_the_balancer_as_peer():
    seen, handler = recording_echo()
    with serving(handler=handler, proxy_protocol="v2") as listener, connect(listener) as sock:
        sock.sendall(build_v2(None, None, local=True) + b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        peer, proxied_by, header = seen.get(timeout=10)
        assert peer[0] == "127.0.0.1" and proxied_by is None and header.command == "LOCAL"


def test_missing_or_invalid_header_closes_only_that_connection(caplog):
    with serving(proxy_protocol="v1") as listener:
        good = connect(listener)
        good.sendall(build_v1(("192.0.2.1", 1), ("192.0.2.2", 2)))
        with connect(listener) as bad:
            bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert recv_until_closed(bad) == b""
        good.sendall(b"still fine")
        assert recv_exactly(good, 10) == b"still fine"
        info = wait_for(lambda: (i := listener.info()).closed == 1 and i)
        assert info.closed_by_reason == {"proxy_header_invalid": 1} and info.errors == 1
        assert "proxy_header_invalid" in caplog.text
        good.close()


def test_header_deadline():
    with serving(proxy_protocol="v1", handshake_timeout=0.3) as listener, connect(listener) as sock:
        sock.sendall(b"PROXY TCP4 ")  # and never the rest
        assert recv_until_closed(sock) == b""
        assert wait_for(lambda: listener.info().closed_by_reason == {"proxy_header_invalid": 1})


def test_untrusted_peer_may_not_send_a_header():
    with serving(proxy_protocol="any", proxy_trusted=("10.0.0.0/8",)) as listener, connect(listener) as sock:
        sock.sendall(build_v1(("192.0.2.1", 1), ("192.0.2.2", 2)) + b"x")
        assert recv_until_closed(sock) == b""
        assert wait_for(lambda: listener.info().closed_by_reason == {"proxy_untrusted": 1})


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="needs IPv6 on loopback (::1)")
def test_trusted_networks_through_the_cli_on_a_dual_stack_socket(tmp_path, io_mode):
    """The same rule from the shell: `--host :: --proxy-trusted 127.0.0.0/8`.

    A client on 127.0.0.1 (which a dual-stack socket sees as ::ffff:127.0.0.1)
    is a trusted balancer: its header is taken and its data echoed. One on ::1
    is not (an IPv4 network trusts no IPv6 peer): its header closes it before
    any byte reaches the handler, and the server's summary says why.
    """
    with server("echo", "--host", "::", "--port", "0", "--io", io_mode, "--proxy-protocol", "v1",
                "--proxy-trusted", "127.0.0.0/8", cwd=tmp_path) as srv:
        port = srv.port()
        header = build_v1(("203.0.113.7", 40001), ("198.51.100.1", 443))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as balancer:
            balancer.sendall(header + b"from the balancer")
            assert recv_exactly(balancer, 17) == b"from the balancer"
        with socket.create_connection(("::1", port), timeout=10) as stranger:
            stranger.sendall(header + b"let me in")
            try:
                assert recv_until_closed(stranger) == b"", "the untrusted peer was served"
            except TimeoutError:  # the socket timeout: it was let in, and is waited on
                pytest.fail("a PROXY header from ::1 was taken although only 127.0.0.0/8 is trusted")
        srv.expect(r"\[::1\]:\d+ is not in proxy_trusted; it may not send a PROXY header; closing it \(proxy_untrusted\)")
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr
    summary = next(m["summary"] for line in stderr.splitlines() if (m := STOPPED.search(line)))
    assert "closed 2 (eof 1, proxy_untrusted 1)" in summary, summary


def test_header_before_tls(tmp_path):
    """The header comes before the ClientHello; the TLS bytes after it must stay intact."""
    ca = TestCA(tmp_path)
    cert = ca.issue("localhost", hosts=("localhost",))
    seen, handler = recording_echo()
    settings = {"ssl": {"certfile": str(cert.cert), "keyfile": str(cert.key)}, "proxy_protocol": "v2"}
    with serving(handler=handler, **settings) as listener:
        raw = connect(listener)
        raw.sendall(build_v2(("192.0.2.9", 5555), ("192.0.2.10", 443)))
        ctx = ssl.create_default_context(cafile=str(ca.path))
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(b"secret")
            assert recv_exactly(sock, 6) == b"secret"
        peer, _, _ = seen.get(timeout=10)
        assert peer == ("192.0.2.9", 5555)
