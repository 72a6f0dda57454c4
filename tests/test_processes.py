"""Several worker processes on one port: clients spread across them, a killed worker comes back."""

from __future__ import annotations

import collections
import os
import re
import signal
import time
from datetime import datetime
from pathlib import Path

from .conftest import ask_line, wait_for
from .test_cli import assert_one_error_line, run_cli, server

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


# A module the supervisor imports without trouble, but which no forked child
# survives (as with a library that is not fork-safe): every worker dies at
# start, before it listens, with exit status 3.
DIES_IN_EVERY_WORKER = '''
import os

os.register_at_fork(after_in_child=lambda: os._exit(3))


def handler(message, conn):
    conn.send(message)
'''

# "2026-01-02 03:04:05,678 WARNING netpool.supervisor: ..." (logging's default asctime)
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
STARTED = re.compile(r"worker (?P<index>\d) started \(pid \d+\)")
FAILED = re.compile(r"worker (?P<index>\d) \(pid \d+\) (?P<how>exited with status \d+|was killed by \w+) "
                    r"after [\d.]+s(?P<early> before it listened)?; restarting it(?: in (?P<delay>[\d.]+)s)?")


def stamp(line: str) -> float:
    match = STAMP.match(line)
    assert match, f"no timestamp on {line!r}"
    return datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_a_worker_that_dies_at_every_start_is_restarted_with_a_back_off_not_a_fork_storm(tmp_path: Path):
    """Each death is one log line with the exit status and the delay; the delays double; SIGTERM still stops it."""
    (tmp_path / "unforkable.py").write_text(DIES_IN_EVERY_WORKER)
    with server("run", "unforkable:handler", "--port", "0", "--processes", "2", cwd=tmp_path) as srv:
        srv.expect(r"2 worker processes serving")
        # Until each slot's restarts are a second or more apart (about 3 s
        # into the back-off), bounded: a tight loop never gets there.
        slow_enough = re.compile(r"worker (\d) .* restarting it in (\d+\.\d+)s")
        waiting: set[str] = {"0", "1"}
        deadline = time.monotonic() + 30
        while waiting:
            match = srv.expect(slow_enough, timeout=max(0.1, deadline - time.monotonic()))
            if float(match[2]) >= 1.6:
                waiting.discard(match[1])
        asked = time.monotonic()
        returncode, stderr = srv.stop(signal.SIGTERM)
        took = time.monotonic() - asked
    assert returncode == 0, stderr
    # Waiting out a back-off must not make the supervisor deaf to a stop.
    assert took < 5.0, f"the supervisor took {took:.1f}s to stop"
    assert "SIGTERM received: stopping" in stderr

    lines = stderr.splitlines()
    starts: dict[str, list[float]] = collections.defaultdict(list)
    failures: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for line in lines:
        if match := STARTED.search(line):
            starts[match["index"]].append(stamp(line))
        elif match := FAILED.search(line):
            # One line per death that says why: the exit status, before it ever listened, and the delay.
            assert match["how"] == "exited with status 3" and match["early"] and match["delay"], line
            failures[match["index"]].append((stamp(line), float(match["delay"])))
    assert set(starts) == set(failures) == {"0", "1"}
    for index in ("0", "1"):
        delays = [delay for _, delay in failures[index]]
        # Each failure of a slot doubles its delay, from 0.1 s up to a few seconds.
        assert delays[0] <= 0.2 and all(b == min(2 * a, 5.0) for a, b in zip(delays, delays[1:])), delays
        # The delay is kept: the next fork of that slot comes no sooner (10 ms for the log's rounding).
        for (failed_at, delay), restarted_at in zip(failures[index], starts[index][1:]):
            assert restarted_at - failed_at >= delay - 0.01, (index, failed_at, delay, restarted_at)
    forks = sum(len(times) for times in starts.values())
    span = max(max(times) for times in starts.values()) - min(min(times) for times in starts.values())
    # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s: about six forks per slot in the first 3 s, then one per 3.2 s and more.
    assert forks <= 2 * (7 + span / 3.2), f"{forks} forks in {span:.1f}s: a fork storm"


def test_a_certificate_the_workers_could_not_load_stops_the_start_with_one_line(tmp_path: Path):
    """With --processes the parent checks the certificate before forking: one Error line and status 2."""
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    result = run_cli("echo", "--port", "0", "--processes", "2", "--certfile", "cert.pem", cwd=tmp_path)
    assert_one_error_line(result, "ssl.certfile cert.pem: not a PEM certificate")
    assert "worker" not in result.stderr  # nothing was forked
