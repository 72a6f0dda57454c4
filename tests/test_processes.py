"""Several worker processes on one port: clients spread across them, a killed worker comes back."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from .conftest import ask_line, wait_for
from .test_cli import server

PID_HANDLER = '''
import os

def handler(message, conn):
    conn.send(b"%d" % os.getpid())
'''


def await_lines(srv, patterns: dict[str, str], limit: int = 50) -> dict[str, re.Match]:
    """Read log lines until each named pattern has matched once, in whatever order they come."""
    union = re.compile("|".join(f"(?P<{name}>{pattern})" for name, pattern in patterns.items()))
    found: dict[str, re.Match] = {}
    for _ in range(limit):
        if len(found) == len(patterns):
            break
        match = srv.expect(union)
        name = next(n for n in patterns if match.group(n) is not None)
        found[name] = re.search(patterns[name], match.group(name))
    assert len(found) == len(patterns), f"missing log lines: {set(patterns) - set(found)}"
    return found


def await_workers(srv, **more: str) -> tuple[set[int], dict[str, re.Match]]:
    """Wait until both workers started and listen (and ``more`` named patterns matched); their pids, and the matches."""
    lines = await_lines(srv, {
        "w0": r"worker 0 started \(pid (\d+)\)",
        "w1": r"worker 1 started \(pid (\d+)\)",
        "l0": r"\[0\] listening on",
        "l1": r"\[1\] listening on",
        **more,
    })
    return {int(lines["w0"][1]), int(lines["w1"][1])}, lines


def whose(port: int) -> int:
    """One client: which worker process answered it."""
    return int(ask_line(port, b"who")[0])


def seen_pids(port: int, want: set[int], tries: int = 400) -> set[int]:
    """Ask until every pid in ``want`` answered (bounded); return every pid seen."""
    seen: set[int] = set()
    for _ in range(tries):
        seen.add(whose(port))
        if want <= seen:
            break
    return seen


def test_workers_share_the_port_and_a_killed_one_is_restarted(tmp_path: Path):
    (tmp_path / "pidmod.py").write_text(PID_HANDLER)
    with server("run", "pidmod:handler", "--port", "0", "--processes", "2", "--framing", "line",
                cwd=tmp_path) as srv:
        pids, lines = await_workers(srv, serving=r"2 worker processes serving 127\.0\.0\.1:(\d+)")
        port = int(lines["serving"][1])
        assert seen_pids(port, pids) == pids, "the kernel spreads clients over both workers"

        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        restarted = srv.expect(re.compile(r"worker (?P<index>\d) started \(pid (?P<pid>\d+)\)"))
        new_pid = int(restarted["pid"])
        assert new_pid not in pids
        survivor = (pids - {victim}).pop()
        # Served all along: every one of these clients gets an answer.
        answers = [whose(port) for _ in range(30)]
        assert set(answers) <= {survivor, new_pid}
        srv.expect(re.compile(rf"\[{restarted['index']}\] listening on"))
        assert seen_pids(port, {survivor, new_pid}) == {survivor, new_pid}, "the new worker takes clients"

        returncode, stderr = srv.stop(signal.SIGTERM)
        assert returncode == 0, stderr
        assert "was killed by SIGKILL" in stderr
        summary = re.search(r"all workers stopped \(1 restarts, 0 reloads\): accepted (\d+)", stderr)
        assert summary and int(summary[1]) >= 30


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path):
    """SIGKILL of the parent (no chance to pass a stop on): its workers stop by themselves, gracefully."""
    (tmp_path / "pidmod.py").write_text(PID_HANDLER)
    with server("run", "pidmod:handler", "--port", "0", "--processes", "2", "--framing", "line", "--grace", "1",
                cwd=tmp_path) as srv:
        workers, _ = await_workers(srv)
        srv.proc.kill()
        for _ in range(2):
            srv.expect(r"SIGTERM received: stopping")  # each worker's own graceful stop

        def gone(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    return fh.read().split(") ", 1)[1].startswith("Z")  # exited, not yet reaped by init
            except FileNotFoundError:
                return True

        wait_for(lambda: all(gone(pid) for pid in workers), what="the orphaned workers to exit")
        returncode, stderr = srv.stop()  # the parent is dead already: this reads stderr to its end
    assert returncode == -signal.SIGKILL
    assert "Traceback" not in stderr, stderr  # a worker that finds its supervisor gone says nothing more
