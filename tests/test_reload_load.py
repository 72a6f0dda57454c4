"""Ten rolling reloads under load, one process and two: no reset, refusal or failed handshake; the counts add up.

Real processes and signals: ``netpool echo`` (with TLS) in a subprocess,
500 long-lived clients echoing every 0.25 s and churn clients connecting,
shaking hands, echoing once and closing as fast as they can
(tests/reload_load.py). Each reload waits for the old generation to drain
before the next, so every generation's long-lived clients meet their
graceful close.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from netpool.devcert import write_dev_certificate

from .reload_load import run
from .test_cli import NETPOOL

LONG_LIVED = 500
RELOADS = 10


@pytest.mark.parametrize("processes", [1, 2])
def test_ten_rolling_reloads_under_load_lose_nothing(tmp_path: Path, processes: int):
    cert, key = write_dev_certificate(str(tmp_path / "cert"))
    argv = [NETPOOL, "echo", "--port", "0", "--framing", "line", "--grace", "2", "--max-connections", "4096",
            "--certfile", cert, "--keyfile", key]
    if processes > 1:
        argv += ["--processes", str(processes)]
    result = run(argv, tmp_path, long_lived=LONG_LIVED, churn=4, reloads=RELOADS,
                 tls=ssl.create_default_context(cafile=cert))
    clients = result["clients"]
    assert isinstance(clients, dict)
    failures = {k: v for k, v in clients.items()
                if k not in ("connected", "long_echoes", "served", "graceful", "churn_closed_after_answer")}
    if failures:
        # What the server logged around them tells which generation and which step.
        (tmp_path / "server.log").write_text(str(result["stderr"]))
    assert failures == {}, (f"resets, refusals, failed handshakes, TLS alerts or lost answers: {failures}; "
                            f"the age of their connections (s): {result['failure_ages']}; "
                            f"the server's log ends with:\n{str(result['stderr'])[-6000:]}")
    assert result["returncode"] == 0
    assert result["server_reloads"] == RELOADS
    # Every connection a client made was accepted by some generation, and none refused.
    assert result["server_accepted"] == clients["connected"]
    assert result["server_refused"] == 0
    closed = result["server_closed"]
    assert isinstance(closed, dict) and sum(closed.values()) == clients["connected"]
    # Each generation's long-lived clients were closed gracefully (the end of
    # the stream, never a reset), as the server counted them: its reload
    # closes are the clients' graceful closes, plus churn connections it
    # closed after answering them but before they closed (seen by most of
    # those clients; one that closed in the same instant cannot tell).
    assert clients["graceful"] >= RELOADS * LONG_LIVED // 2
    unseen = closed.get("reload", 0) - clients["graceful"] - clients.get("churn_closed_after_answer", 0)
    assert 0 <= unseen <= clients["served"] // 100, (closed, clients)
    assert clients["served"] >= RELOADS * 50
