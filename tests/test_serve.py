"""netpool.serve(): a script that serves as the CLI does, stopped by real signals in a real process."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from .test_cli import connect, round_trip, server

SCRIPT = '''
import netpool

def handler(message, conn):
    conn.send(message)

netpool.serve({"handler": handler, "port": 0}, grace=1)
print("serve returned", flush=True)
'''


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_script_serves_until_a_signal_then_stops_gracefully_with_a_summary(tmp_path: Path, signum: int):
    script = tmp_path / "myserver.py"
    script.write_text(SCRIPT)
    with server(str(script), cwd=tmp_path, argv0=[sys.executable]) as srv:
        with connect(srv.port()) as sock:
            round_trip(sock, b"hello")
        returncode, stderr = srv.stop(signum)
    assert returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert f"{signal.Signals(signum).name} received: stopping (grace 1s)" in stderr
    assert "stopped after" in stderr and "accepted 1" in stderr


def test_serve_returns_after_the_stop(tmp_path: Path):
    import subprocess

    script = tmp_path / "myserver.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for _ in range(50):  # bounded: the listening line comes among the first few
            if "listening on" in proc.stderr.readline():
                break
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert stdout.strip() == "serve returned"
