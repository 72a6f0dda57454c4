"""TLS from the shell: `netpool cert`, then `netpool echo --certfile ...`, talked to by `openssl s_client`."""

from __future__ import annotations

import queue
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from netpool.tls import TLSConfig, build_server_context

from .conftest import recv_exactly, recv_until_closed
from .test_cli import NETPOOL, STOPPED, assert_one_error_line, run_cli, server

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is installed by `make test` (Debian package)")


@pytest.fixture
def dev_cert(tmp_path: Path) -> tuple[str, str]:
    result = run_cli("cert", "--out", str(tmp_path / "cert"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "development only" in result.stdout
    return str(tmp_path / "cert" / "cert.pem"), str(tmp_path / "cert" / "key.pem")


def s_client(port: int, *extra: str, line: bytes = b"hello over tls\n", timeout: float = 10.0) -> tuple[bytes, str]:
    """Run openssl s_client, send one line, wait for it to come back; return (stdout, stderr)."""
    proc = subprocess.Popen(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-brief", "-ign_eof", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out: queue.Queue = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            out.put(chunk)
        out.put(None)

    threading.Thread(target=pump, daemon=True).start()
    got = b""
    try:
        assert proc.stdin is not None
        proc.stdin.write(line)
        proc.stdin.flush()
        while line not in got:
            chunk = out.get(timeout=timeout)
            if chunk is None:
                break
            got += chunk
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=timeout)
    return got, err.decode(errors="replace")


@needs_openssl
@pytest.mark.parametrize("version_flag, version", [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")])
def test_openssl_s_client_talks_to_netpool_echo(tmp_path, dev_cert, version_flag, version):
    cert, key = dev_cert
    with server("echo", "--port", "0", "--certfile", cert, "--keyfile", key, cwd=tmp_path) as srv:
        match = srv.listening()
        assert "tls=on" in match["settings"] or "tls=on" in srv.stderr
        port = int(match["address"].rpartition(":")[2])
        echoed, info = s_client(port, version_flag)
        assert b"hello over tls\n" in echoed
        assert f"Protocol version: {version}" in info
        assert "Ciphersuite:" in info
        returncode, stderr = srv.stop()
        assert returncode == 0 and "accepted 1" in stderr


@needs_openssl
def test_openssl_s_client_below_min_version_is_refused(tmp_path, dev_cert):
    cert, key = dev_cert
    with server("echo", "--port", "0", "--certfile", cert, "--keyfile", key, "--tls-min-version", "1.3",
                cwd=tmp_path) as srv:
        port = int(srv.listening()["address"].rpartition(":")[2])
        echoed, info = s_client(port, "-tls1_2")
        assert echoed == b""
        assert "alert protocol version" in info or "no protocols available" in info
        srv.stop()


def test_netpool_cert_loads_in_stdlib_and_pyopenssl(dev_cert):
    cert, key = dev_cert
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    build_server_context(TLSConfig(certfile=cert, keyfile=key))
    assert oct(Path(key).stat().st_mode & 0o777) == "0o600"


def test_bad_certificate_on_the_command_line_names_the_file(tmp_path):
    missing = tmp_path / "missing.pem"
    result = subprocess.run(
        [NETPOOL, "echo", "--port", "0", "--certfile", str(missing)],
        cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert_one_error_line(result, f"{missing}: cannot read it")


def test_a_key_that_does_not_match_is_one_error_line(tmp_path, dev_cert):
    from netpool.devcert import write_dev_certificate

    cert, _key = dev_cert
    _other_cert, other_key = write_dev_certificate(str(tmp_path / "other"))
    result = run_cli("echo", "--port", "0", "--certfile", cert, "--keyfile", other_key, cwd=tmp_path)
    assert_one_error_line(result, other_key)


def test_verify_client_without_cafile_is_a_usage_error(tmp_path, dev_cert):
    cert, key = dev_cert
    result = run_cli("echo", "--certfile", cert, "--keyfile", key, "--verify-client", "required", cwd=tmp_path)
    assert_one_error_line(result, "cafile")



@needs_openssl
def test_client_renegotiation_is_refused(tmp_path, dev_cert):
    """s_client's "R" command asks for a TLS 1.2 renegotiation; netpool never allows one."""
    cert, key = dev_cert
    with server("echo", "--port", "0", "--certfile", cert, "--keyfile", key, cwd=tmp_path) as srv:
        port = int(srv.listening()["address"].rpartition(":")[2])
        # Without -ign_eof, s_client reads a line "R" as its renegotiate command.
        proc = subprocess.Popen(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-brief"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"before\n")
            proc.stdin.flush()
            seen = b""
            for _ in range(200):  # bounded: each readline is bounded by the server's echo or exit
                line = proc.stdout.readline()
                seen += line
                if not line or line == b"before\n":
                    break
            assert b"before\n" in seen
            proc.stdin.write(b"R\n")
            proc.stdin.flush()
            rest, _ = proc.communicate(timeout=10)
        finally:
            proc.kill()
        assert b"RENEGOTIATING" in rest and b"no renegotiation" in rest
        srv.expect(re.compile(r"closing it \(tls_error\)"))
        returncode, stderr = srv.stop()
        assert returncode == 0 and "tls_error 1" in stderr


def first_flight(server_hostname: str = "localhost") -> bytes:
    """What a real TLS client (the standard library's) sends first: its ClientHello, as bytes."""
    tls = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                                                server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_handshakes_that_stall_are_cut_at_handshake_timeout_while_a_real_client_is_served(tmp_path, dev_cert):
    """From the shell, `--handshake-timeout 2`: silent clients and one that sent half a ClientHello are cut.

    Each is closed about two seconds after it connected (never much before),
    a real TLS client is served meanwhile, and the server's own summary
    counts them under tls_handshake_timeout.
    """
    cert, key = dev_cert
    timeout = 2.0
    with server("echo", "--port", "0", "--certfile", cert, "--keyfile", key,
                "--handshake-timeout", f"{timeout:g}", cwd=tmp_path) as srv:
        port = srv.port()
        connected = time.monotonic()
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=timeout + 10) for _ in range(5)]
        hello = first_flight()
        stalled[0].sendall(hello[:len(hello) // 2])  # a record header and half a handshake: then nothing
        try:
            context = ssl.create_default_context(cafile=cert)
            with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                     server_hostname="localhost") as tls:
                tls.sendall(b"not kept waiting")
                assert recv_exactly(tls, 16) == b"not kept waiting"
            served = time.monotonic() - connected
            assert served < timeout, f"a real client took {served:.2f}s: it waited behind the stalled handshakes"
            for sock in stalled:
                try:
                    assert recv_until_closed(sock) == b"", "only a close may come back"
                except TimeoutError:  # the socket timeout
                    pytest.fail(f"a stalled handshake was still open {timeout + 10:g}s after it connected")
            cut = time.monotonic() - connected
        finally:
            for sock in stalled:
                sock.close()
        # The sweep may be a quarter of the timeout late; the margin is for a loaded machine.
        assert timeout * 0.8 <= cut < timeout + 8, f"stalled handshakes cut after {cut:.2f}s"
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr
    summary = next(m["summary"] for line in stderr.splitlines() if (m := STOPPED.search(line)))
    assert "closed 6 (eof 1, tls_handshake_timeout 5)" in summary, summary


# -- defaults a scanner finds nothing in ----------------------------------------------------------


@needs_openssl
@pytest.mark.parametrize("cipher", ["ECDHE-RSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA", "AES128-GCM-SHA256",
                                    "AES256-SHA256"],
                         ids=["cbc-rsa", "cbc-ecdsa", "rsa-key-exchange", "rsa-cbc"])
def test_tls12_offers_no_cbc_and_no_rsa_key_exchange(tmp_path, dev_cert, cipher):
    """Mozilla's intermediate profile by default: a client offering only a CBC or RSA-key-exchange suite fails."""
    cert, key = dev_cert
    with server("echo", "--port", "0", "--certfile", cert, "--keyfile", key, cwd=tmp_path) as srv:
        port = int(srv.listening()["address"].rpartition(":")[2])
        echoed, info = s_client(port, "-tls1_2", "-cipher", cipher)
        assert echoed == b"" and ("handshake failure" in info or "no cipher" in info), info
        # The same client with an ECDHE + AEAD suite gets through.
        echoed, info = s_client(port, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")
        assert b"hello over tls\n" in echoed and "GCM" in info
        srv.stop()


def test_stdlib_client_negotiates_an_aead_suite(dev_cert):
    from netpool import ListenerConfig, start_listener

    cert, key = dev_cert
    listener = start_listener(ListenerConfig(handler=lambda m, c: c.send(m), ssl={"certfile": cert, "keyfile": key,
                                                                                  "min_version": "1.2"}))
    try:
        context = ssl.create_default_context(cafile=cert)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with context.wrap_socket(socket.create_connection(("127.0.0.1", listener.port), timeout=10),
                                 server_hostname="localhost") as tls:
            name, version, _ = tls.cipher()
            assert version == "TLSv1.2" and name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
    finally:
        listener.stop()


def test_a_tls_listener_refuses_with_a_clean_close_not_plaintext(dev_cert):
    """At the limit a TLS listener sends no refuse_message: plaintext would be a broken record to the client."""
    from netpool import ListenerConfig, start_listener

    cert, key = dev_cert
    listener = start_listener(ListenerConfig(handler=lambda m, c: c.send(m), max_connections=1,
                                             refuse_message=b"busy\n", ssl={"certfile": cert, "keyfile": key}))
    try:
        context = ssl.create_default_context(cafile=cert)
        first = context.wrap_socket(socket.create_connection(("127.0.0.1", listener.port), timeout=10),
                                    server_hostname="localhost")
        first.sendall(b"hi")
        assert first.recv(10) == b"hi"
        second = socket.create_connection(("127.0.0.1", listener.port), timeout=10)
        assert second.recv(100) == b""  # closed without a byte of plaintext
        second.close()
        # What a TLS client sees: the end of the stream (EOF), never a record it cannot read. (A
        # ClientHello that only arrives after the refusal's close meets the kernel's reset instead.)
        with pytest.raises((ssl.SSLError, ConnectionResetError)) as refused:
            context.wrap_socket(socket.create_connection(("127.0.0.1", listener.port), timeout=10),
                                server_hostname="localhost")
        assert "WRONG_VERSION_NUMBER" not in str(refused.value)
        assert listener.info().refused >= 2
        first.close()
    finally:
        listener.stop()


def test_netpool_cert_keeps_existing_files_unless_forced(tmp_path, dev_cert):
    cert, key = dev_cert
    before = Path(key).read_bytes()
    result = run_cli("cert", "--out", str(Path(cert).parent), cwd=tmp_path)
    assert_one_error_line(result, "already exist", "--force")
    assert Path(key).read_bytes() == before
    result = run_cli("cert", "--out", str(Path(cert).parent), "--force", cwd=tmp_path)
    assert result.returncode == 0 and Path(key).read_bytes() != before


# -- certificates reload on SIGHUP ---------------------------------------------------------------


def _serial(cafile: str, port: int) -> tuple[int, ssl.SSLSocket]:
    """Handshake with the server as a client trusting ``cafile``; the certificate's serial, and the connection."""
    from cryptography import x509

    context = ssl.create_default_context(cafile=cafile)
    tls = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number, tls


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sighup_reloads_the_certificate_and_keeps_live_connections(tmp_path, dev_cert, processes):
    import signal

    from netpool.devcert import write_dev_certificate

    cert, key = dev_cert
    with server("echo", "--port", "0", "--certfile", cert, "--keyfile", key, "--processes", processes,
                cwd=tmp_path) as srv:
        port = int(srv.expect(r"(?:listening on|worker processes serving) 127\.0\.0\.1:(\d+)")[1])
        if processes == "2":
            srv.expect(r"\[1\] listening on")
        first_serial, before = _serial(cert, port)
        before.sendall(b"one\n")
        assert before.recv(10) == b"one\n"

        write_dev_certificate(str(Path(cert).parent), force=True)  # a new key pair, a new serial
        srv.proc.send_signal(signal.SIGHUP)
        srv.expect("reload done" if processes == "2" else "reload 1: the new listener serves")
        second_serial, after = _serial(cert, port)
        assert second_serial != first_serial
        before.sendall(b"still here\n")  # the connection from before the reload goes on
        assert before.recv(20) == b"still here\n"

        second = tmp_path / "second.pem"
        second.write_bytes(Path(cert).read_bytes())
        Path(cert).write_bytes(b"not a certificate\n")  # a broken one: the last good one stays
        srv.proc.send_signal(signal.SIGHUP)
        if processes == "2":
            srv.expect(r"worker 0 cannot start: .*cert\.pem")
            srv.expect("reload stopped: the new worker 0 .* 0 of 2 workers were replaced, the others go on")
        else:
            srv.expect(r"reload failed, so the running server goes on unchanged: .*cert\.pem")
        third_serial, later = _serial(str(second), port)
        assert third_serial == second_serial
        later.sendall(b"and on\n")
        assert later.recv(20) == b"and on\n"
        for sock in (before, after, later):
            sock.close()
        returncode, stderr = srv.stop()
        assert returncode == 0, stderr
