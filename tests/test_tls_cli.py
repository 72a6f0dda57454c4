"""TLS from the shell: `netpool cert`, then `netpool echo --certfile ...`, talked to by `openssl s_client`."""

from __future__ import annotations

import queue
import re
import shutil
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from netpool.tls import TLSConfig, build_server_context

from .test_cli import NETPOOL, assert_clean_usage_error, run_cli, server

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
    assert result.returncode == 1, result.stderr
    assert f"{missing}: cannot read it" in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_client_without_cafile_is_a_usage_error(tmp_path, dev_cert):
    cert, key = dev_cert
    result = run_cli("echo", "--certfile", cert, "--keyfile", key, "--verify-client", "required", cwd=tmp_path)
    assert_clean_usage_error(result, "cafile")



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
