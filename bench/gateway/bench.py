"""The gateway benchmark: wrk against the HTTP front end, with the back-end pool on and off.

    make bench-gateway                      # or: .venv/bin/python bench/gateway/bench.py --help

For each mode it starts the back end and the front end as their own
processes on loopback, runs ``wrk`` (1,000 connections by default) with
bench/gateway/login.lua for a bounded time, asks the back end how many
connections it accepted, stops both, and prints one summary line per mode:

    pool on: 3120 logins/s, p50 210 ms, p99 480 ms, errors 0, backend connections 64

Errors count non-2xx answers and wrk's socket errors (connect, read,
write, timeout) alike. The database is seeded once and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from examples.gateway import protocol  # noqa: E402  (the checkout's copy, same as the installed one)


@dataclass
class Result:
    mode: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    socket_errors: int
    backend_connections: int
    wrk_output: str

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors

    def summary(self) -> str:
        return (f"pool {self.mode}: {self.rps:.0f} logins/s, p50 {self.p50_ms:.0f} ms, p99 {self.p99_ms:.0f} ms, "
                f"errors {self.errors}, backend connections {self.backend_connections}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seeded_users(db: str) -> int:
    if not os.path.exists(db):
        return 0
    with sqlite3.connect(db) as con:
        try:
            return con.execute("SELECT COUNT(*) FROM users").fetchone()[0]
        except sqlite3.Error:
            return 0


def start(cmd: list[str], ready: str, timeout: float = 30.0) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    assert proc.stderr is not None
    for line in proc.stderr:
        if ready in line:
            os.set_blocking(proc.stderr.fileno(), False)
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"{' '.join(cmd)} did not become ready")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU time the process has used so far (Linux /proc)."""
    with open(f"/proc/{proc.pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_accepted(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        frame = protocol.encode_request(protocol.OP_STATS)
        s.sendall(len(frame).to_bytes(4, "big") + frame)
        data = b""
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            chunk = s.recv(65536)
            if not chunk:
                raise SystemExit("the back end closed the stats connection")
            data += chunk
    reply = protocol.decode_reply(data[4:])
    return json.loads(reply.detail)["accepted"] - 1  # not counting this connection


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency(output: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(output: str) -> tuple[float, float, float, int, int, int]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    socket_errors = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    non2xx = int(m.group(1)) if m else 0
    return rps, _latency(output, "50"), _latency(output, "99"), requests, non2xx, socket_errors


_IN_USE = re.compile(r'^netpool_pool_connections\{[^}]*state="in_use"[^}]*\} ([\d.]+)$', re.M)


def sample_in_use(metrics_port: int, until: float, every: float = 0.2) -> list[int]:
    """The front end's pool connections in use, read from its metrics every ``every`` s until ``until``."""
    import urllib.request

    samples: list[int] = []
    while time.monotonic() < until:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as page:
                found = _IN_USE.search(page.read().decode())
            if found:
                samples.append(int(float(found.group(1))))
        except OSError:
            pass  # a slow scrape under load is skipped, not fatal
        time.sleep(every)  # a sampling period, bounded by ``until``
    return samples


def run_mode(mode: str, args: argparse.Namespace, python: str) -> Result:
    backend_port, http_port, metrics_port = free_port(), free_port(), free_port()
    gateway = [python, "-m", "netpool.examples.gateway"]
    backend = start(gateway + ["backend", "--db", args.db, "--port", str(backend_port), "--log-level", "warning"],
                    "backend ready")
    frontend = None
    try:
        frontend = start(gateway + ["frontend", "--port", str(http_port), "--backend-port", str(backend_port),
                                    "--pool" if mode == "on" else "--no-pool", "--max-open", str(args.max_open),
                                    "--timeout", str(args.timeout), "--log-level", "warning",
                                    "--metrics-port", str(metrics_port)],
                         "frontend ready")
        before = backend_accepted(backend_port)
        cpu_before = cpu_seconds(frontend), cpu_seconds(backend)
        env = dict(os.environ, GATEWAY_USERS=str(args.users))
        cmd = ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{args.duration}s",
               "--timeout", f"{max(1, round(args.wrk_timeout))}s", "--latency", "-s", os.path.join(HERE, "login.lua"),
               f"http://127.0.0.1:{http_port}/login"]
        print(f"== pool {mode}: {' '.join(cmd)}", flush=True)
        load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        # How many pooled back-end connections are busy while the load runs
        # (skipping its first second): a front end that keeps its pool busy
        # has all max_open in use most of the time.
        time.sleep(1.0)  # the load's ramp-up, not measured
        in_use = sample_in_use(metrics_port, time.monotonic() + args.duration - 2) if mode == "on" else []
        output, _ = load.communicate(timeout=args.duration + 60)
        if load.returncode != 0:
            raise SystemExit(f"wrk failed:\n{output}")
        cpu = cpu_seconds(frontend) - cpu_before[0], cpu_seconds(backend) - cpu_before[1]
        accepted = backend_accepted(backend_port) - before - 1
        rps, p50, p99, requests, non2xx, socket_errors = parse_wrk(output)
        result = Result(mode, rps, p50, p99, requests, non2xx, socket_errors, accepted, output)
        print(output.rstrip(), flush=True)
        print(f"   back-end connections opened: {accepted:,} for {requests:,} requests", flush=True)
        if in_use:
            full = sum(1 for n in in_use if n >= args.max_open) / len(in_use)
            print(f"   pooled connections in use: mean {sum(in_use) / len(in_use):.1f} of {args.max_open}, "
                  f"all {args.max_open} in {full:.0%} of {len(in_use)} samples", flush=True)
        print(f"   CPU used during the run: front end {cpu[0]:.1f} s, back end {cpu[1]:.1f} s "
              f"(of {args.duration * (os.cpu_count() or 1)} core-seconds on the machine; wrk and the kernel use the rest)", flush=True)
        return result
    finally:
        if frontend is not None:
            stop(frontend)
        stop(backend)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000, help="seeded users (default 100,000)")
    parser.add_argument("--db", default=os.path.join(ROOT, "build", "gateway", "bench-users.db"))
    parser.add_argument("--duration", type=int, default=15, help="seconds of load per mode")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--wrk-timeout", type=float, default=5.0, help="wrk's per-request timeout, seconds")
    parser.add_argument("--max-open", type=int, default=8, help="back-end pool size with the pool on")
    parser.add_argument("--timeout", type=float, default=5.0, help="front end's back-end deadline, seconds")
    parser.add_argument("--modes", default="on,off", help="comma-separated: on, off")
    args = parser.parse_args(argv)

    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `make bench-gateway` installs it (apt-get install wrk)")
    python = sys.executable
    if seeded_users(args.db) != args.users:
        os.makedirs(os.path.dirname(args.db), exist_ok=True)
        subprocess.run([python, "-m", "netpool.examples.gateway", "seed", "--db", args.db,
                        "--users", str(args.users), "--force"], check=True)
    print(f"{os.cpu_count()} cores; {args.users:,} users in {args.db}; password hash: "
          f"{sqlite3.connect(args.db).execute('SELECT scheme FROM users LIMIT 1').fetchone()[0]}", flush=True)
    results = [run_mode(mode.strip(), args, python) for mode in args.modes.split(",") if mode.strip()]
    print()
    for result in results:
        print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
