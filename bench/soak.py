"""`make soak`: mixed traffic against one netpool listener for a while, then a report.

The server runs as its own process (bench/soak_handler.py through `netpool
run`), a line protocol with STARTTLS. Against it, for --minutes (10 by
default), all on 127.0.0.1:

- echo clients on long-lived connections, checking every reply in order;
- TLS clients that upgrade with STARTTLS, echo, and reconnect now and then;
- churn: connect, one echo, close (half of them with a reset);
- hostile clients: slow loris (a byte now and then, never a full line),
  clients that ask for a flood and never read, and garbage senders.

At the end the report gives the server's RSS, threads and descriptors at the
start, after the warm-up and at the end, with their slope per hour after the
warm-up (a least-squares fit over the samples); with tracemalloc on (the
default) the server traces its allocations from the start, the RSS slope is
also given without tracemalloc's own memory, and the report names the
largest allocation sites after the warm-up and at the end, and those that
grew most in between. Every sample also asks the server for what
tracemalloc cannot see (soak_handler's MALLOC): its RSS by kind of mapping
(glibc's main heap, its per-thread arenas, the interpreter's object arenas,
thread stacks, files) and glibc's own account of its heaps (in use, free,
mmapped); the report gives each row's slope. Its live objects by type
(CENSUS) are counted after the warm-up and at the end only, and the report
names the types whose count grew. Then its counters against what the
clients counted, and whether anything was lost: every line a client sent
and the server answered must have come back, in order. The run stops by
itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterable

HERE = Path(__file__).resolve().parent
NETPOOL = str(Path(sys.executable).parent / "netpool")


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n


def proc_status(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024
    threads = int(re.search(r"Threads:\s+(\d+)", status)[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_mb": round(rss, 1), "threads": threads, "fds": fds}


class LineSocket:
    """A blocking line-protocol client with a deadline on every read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def request(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\n")
        return self.read_line()

    def read_line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def exchange(client: LineSocket, lines: Iterable[bytes], stop: threading.Event, stats: Stats) -> int:
    """Send each line and check its echo, in order, until done or stopped; returns how many were sent."""
    sent = 0
    for line in lines:
        if stop.is_set():
            break
        stats.add("sent")
        sent += 1
        stats.add("echoed" if client.request(line) == line else "mismatched")
    return sent


def echo_client(port: int, stop: threading.Event, stats: Stats, name: str) -> None:
    seq = 0
    while not stop.is_set():
        try:
            client = LineSocket(connect(port))
            stats.add("connects")
            lines = (f"{name} {seq + i} {'x' * random.randint(0, 200)}".encode()
                     for i in range(random.randint(200, 2000)))
            seq += exchange(client, lines, stop, stats)
            client.sock.close()
        except OSError as exc:
            stats.add(f"echo error {type(exc).__name__}")


def tls_client(port: int, stop: threading.Event, stats: Stats, cafile: str) -> None:
    ctx = ssl.create_default_context(cafile=cafile)
    while not stop.is_set():
        try:
            plain = LineSocket(connect(port))
            stats.add("connects")
            if plain.request(b"STARTTLS") != b"PROCEED":
                stats.add("starttls refused")
                continue
            client = LineSocket(ctx.wrap_socket(plain.sock, server_hostname="localhost"))
            stats.add("tls upgrades")
            lines = (f"tls {i} {'y' * random.randint(0, 1000)}".encode() for i in range(random.randint(50, 500)))
            exchange(client, lines, stop, stats)
            client.sock.close()
        except (OSError, ssl.SSLError) as exc:
            stats.add(f"tls error {type(exc).__name__}")


def churn_client(port: int, stop: threading.Event, stats: Stats) -> None:
    linger = struct.pack("ii", 1, 0)
    while not stop.is_set():
        try:
            client = LineSocket(connect(port))
            stats.add("connects")
            stats.add("sent")
            if client.request(b"churn") == b"churn":
                stats.add("echoed")
            if random.random() < 0.5:
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            client.sock.close()
        except OSError as exc:
            stats.add(f"churn error {type(exc).__name__}")


def hostile_client(port: int, stop: threading.Event, stats: Stats) -> None:
    """Slow loris, never-readers and garbage, one after another."""
    pause = threading.Event()
    while not stop.is_set():
        kind = random.choice(["loris", "flood", "garbage", "oversize"])
        try:
            sock = connect(port)
            stats.add("connects")
            stats.add(f"hostile {kind}")
            if kind == "loris":
                for _ in range(40):  # a byte every 0.25 s: message_timeout cuts it
                    sock.send(b"z")
                    if pause.wait(0.25) or stop.is_set():
                        break
            elif kind == "flood":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(b"FLOOD\n")
                sock.settimeout(15)
                try:
                    sock.recv(1, socket.MSG_PEEK)
                    # Never read: the server's send_timeout must cut us. Each send
                    # gets send_timeout; filling the socket buffers first takes a while.
                    pause.wait(20)
                except OSError:
                    pass
            elif kind == "garbage":
                sock.sendall(os.urandom(random.randint(1, 4096)))
            else:
                sock.sendall(b"a" * 70_000)  # past max_message_size without a newline
            sock.close()
        except OSError as exc:
            stats.add(f"hostile error {type(exc).__name__}")


CONTROL_CONNECTIONS = Counter()


def control(port: int, line: bytes) -> dict:
    """One control connection (counted, so the server's accepted count still adds up): INFO or TRACEMALLOC ..."""
    CONTROL_CONNECTIONS["control"] += 1
    with connect(port) as sock:
        return json.loads(LineSocket(sock).request(line))


def server_info(port: int) -> dict:
    return control(port, b"INFO")


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour; 0 with fewer than two."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 0.0 if not var else 3600 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


# The rows of the samples (soak_handler's MALLOC and CENSUS) in the report: where the RSS is,
# by kind of mapping, and glibc's account of its heaps.
CENSUS_ROWS = {
    "rss main heap mb": "RSS in glibc's main heap",
    "rss thread heaps and other mb": "RSS in glibc's thread arenas (and other anonymous maps)",
    "rss pymalloc arenas mb": "RSS in the interpreter's object arenas",
    "rss thread stacks mb": "RSS in thread stacks",
    "rss files mb": "RSS in files (code, libraries)",
    "malloc_heap_mb": "malloc heaps (all arenas)",
    "malloc_in_use_mb": "malloc in use",
    "malloc_free_mb": "malloc free (held, unused)",
    "malloc_mmapped_mb": "malloc mmapped blocks",
}


def grown_types_table(start: dict, end: dict, rows: int = 12) -> list[str]:
    """Object types whose live count grew from the warm-up to the end (a leak of any size shows here)."""
    grown = sorted(((end.get(t, 0) - start.get(t, 0), t) for t in set(start) | set(end)), reverse=True)[:rows]
    lines = ["Live objects by type that grew most from the warm-up to the end (gc census):", "",
             "| type | after warm-up | end | grew |", "| --- | --- | --- | --- |"]
    lines += [f"| {t} | {start.get(t, 0)} | {end.get(t, 0)} | {d:+} |" for d, t in grown if d > 0]
    return lines + [""]


def sites_table(title: str, sites: list[dict]) -> list[str]:
    lines = [f"{title}:", "", "| site | KiB | blocks |", "| --- | --- | --- |"]
    lines += [f"| {s['site'].replace(str(HERE.parent), '.')} | {s['kib']} | {s['blocks']} |" for s in sites]
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10, help="how long the traffic runs")
    ap.add_argument("--seconds", type=float, default=None, help="the same in seconds (short runs)")
    ap.add_argument("--warmup", type=float, default=5,
                    help="minutes before the slopes are measured (at most a third of the run)")
    ap.add_argument("--every", type=float, default=30, help="seconds between samples (at least 20 per run)")
    ap.add_argument("--tracemalloc", action=argparse.BooleanOptionalAction, default=True,
                    help="trace allocations in the server, to name where memory went")
    ap.add_argument("--io", choices=["threads", "events"], default="threads")
    ap.add_argument("--echo", type=int, default=16)
    ap.add_argument("--tls", type=int, default=8)
    ap.add_argument("--churn", type=int, default=4)
    ap.add_argument("--hostile", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "soak-report.md"))
    ap.add_argument("--wrap", default="",
                    help="a command to run the server under, such as heaptrack (attaching to it kills it);"
                         " the samples then read the wrapper's process")
    args = ap.parse_args()
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    warmup = min(args.warmup * 60, seconds / 3)
    every = min(args.every, seconds / 20)

    tmp = tempfile.mkdtemp(prefix="netpool-soak-")
    from netpool.devcert import write_dev_certificate

    cert, key = write_dev_certificate(tmp, ["localhost", "127.0.0.1"])
    log_path = Path(tmp) / "server.log"
    log_file = open(log_path, "w")
    server = subprocess.Popen(
        [*shlex.split(args.wrap), NETPOOL, "run", "soak_handler:handler", "--port", "0", "--framing", "line",
         "--io", args.io, "--certfile", cert, "--keyfile", key, "--tls-mode", "starttls", "--max-connections", "3000",
         "--idle-timeout", "30", "--message-timeout", "5", "--send-timeout", "3", "--grace", "5"],
        cwd=HERE, stderr=log_file, stdout=subprocess.DEVNULL,
        # Its own process group: a --wrap tool (heaptrack) does not pass a signal on to the server.
        start_new_session=True,
        env={**os.environ, **({"PYTHONTRACEMALLOC": "1"} if args.tracemalloc else {})},
    )
    try:
        port = 0
        deadline = time.monotonic() + 20
        while not port and time.monotonic() < deadline and server.poll() is None:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())
            port = int(match[1]) if match else 0
            threading.Event().wait(0.05)
        if not port:
            print(log_path.read_text(), file=sys.stderr)
            return 1
        before = proc_status(server.pid)
        stats = Stats()
        stop = threading.Event()
        threads = (
            [threading.Thread(target=echo_client, args=(port, stop, stats, f"e{i}")) for i in range(args.echo)]
            + [threading.Thread(target=tls_client, args=(port, stop, stats, cert)) for _ in range(args.tls)]
            + [threading.Thread(target=churn_client, args=(port, stop, stats)) for _ in range(args.churn)]
            + [threading.Thread(target=hostile_client, args=(port, stop, stats)) for _ in range(args.hostile)]
        )
        started = time.monotonic()
        for t in threads:
            t.start()
        samples = []
        start_sites: dict = {}
        start_census: dict = {}
        while time.monotonic() - started < seconds:
            stop.wait(min(every, max(0.0, seconds - (time.monotonic() - started))))
            elapsed = time.monotonic() - started
            if args.tracemalloc and not start_sites and elapsed >= warmup:
                # Before this sample, the first measured: taking the baseline snapshot adds some
                # 20 MB to the server's RSS for good (also when the server kept only per-site
                # totals of it: the memory the snapshot's objects grew stays), and would count
                # as growth if it came after.
                start_sites = control(port, b"TRACEMALLOC START")
            # The object census (gc.get_objects) only once, at the end of the warm-up: its lists of
            # every object are megabytes of short-lived allocations, and taken at every sample they
            # fragmented the very heaps being measured.
            take_census = not start_census and elapsed >= warmup
            census = control(port, b"CENSUS" if take_census else b"MALLOC")
            status = proc_status(server.pid)
            if args.tracemalloc:
                # tracemalloc's own bookkeeping is in the RSS: the slope is taken without it.
                status["trace_mb"] = round(control(port, b"TRACEMALLOC MEM")["overhead_kib"] / 1024, 1)
            status.update({f"malloc_{k}_mb": round(kib / 1024, 1) for k, kib in census["malloc"].items()})
            status.update({f"rss {k} mb": round(kib / 1024, 1) for k, kib in census["rss"].items()})
            if take_census:
                start_census = census
            samples.append((round(elapsed), status))
            print(f"[{samples[-1][0]:>4}s] server {status}, clients {dict(stats.counts)}", flush=True)
        end_sites = control(port, b"TRACEMALLOC TOP") if args.tracemalloc else {}
        end_census = control(port, b"CENSUS")
        stop.set()
        for t in threads:
            t.join(60)
        # Let the server close what the clients left (send timeouts, loris cuts).
        deadline = time.monotonic() + 30
        info = server_info(port)
        while info["live"] > 1 and time.monotonic() < deadline:
            threading.Event().wait(0.5)
            info = server_info(port)
        after = proc_status(server.pid)
        info = server_info(port)  # this control connection is the last one counted
        counts = stats.counts
        client_connects = counts["connects"]
        lost = counts["sent"] - counts["echoed"] - counts["mismatched"]
        measured = [(t, st) for t, st in samples if t >= warmup]
        slopes = {
            "rss": slope_per_hour([(t, st["rss_mb"]) for t, st in measured]),
            "rss_less": slope_per_hour([(t, st["rss_mb"] - st.get("trace_mb", 0.0)) for t, st in measured]),
            "threads": slope_per_hour([(t, st["threads"]) for t, st in measured]),
            "fds": slope_per_hour([(t, st["fds"]) for t, st in measured]),
            **{k: slope_per_hour([(t, st[k]) for t, st in measured if k in st]) for k in CENSUS_ROWS},
        }
        first = measured[0][1] if measured else before
        report = [
            "# netpool soak report",
            "",
            f"{seconds / 60:g} minutes of mixed traffic against one listener (io={args.io}, line framing, STARTTLS, "
            f"max_connections=3000, idle 30 s, message 5 s, send 3 s), on {os.cpu_count()} CPUs"
            + (", the server tracing its allocations (tracemalloc)." if args.tracemalloc else "."),
            "",
            f"Slopes are least-squares fits over the samples after a warm-up of {warmup / 60:g} minutes."
            + (" The allocation snapshot taken at its end adds some 20 MB to the RSS at once, before the"
               " first sample fitted." if args.tracemalloc else ""),
            "",
            "| | start | after warm-up | end | slope per hour after warm-up |",
            "| --- | --- | --- | --- | --- |",
            f"| server RSS (MB) | {before['rss_mb']} | {first['rss_mb']} | {after['rss_mb']} | {slopes['rss']:+.2f} |",
            *([f"| server RSS less tracemalloc's own (MB) | | {first['rss_mb'] - first.get('trace_mb', 0):.1f} | "
               f"{samples[-1][1]['rss_mb'] - samples[-1][1]['trace_mb']:.1f} | {slopes['rss_less']:+.2f} |"]
              if args.tracemalloc and samples else []),
            f"| server threads | {before['threads']} | {first['threads']} | {after['threads']} | "
            f"{slopes['threads']:+.2f} |",
            f"| server descriptors | {before['fds']} | {first['fds']} | {after['fds']} | {slopes['fds']:+.2f} |",
            *[f"| {title} (MB) | | {first.get(k, '')} | {samples[-1][1].get(k, '') if samples else ''} | "
              f"{slopes[k]:+.2f} |" for k, title in CENSUS_ROWS.items()],
            "",
            *grown_types_table(start_census.get("objects", {}), end_census.get("objects", {})),
            "Samples (s, RSS MB, threads, fds, malloc in use MB, malloc free MB"
            + (", tracemalloc MB" if args.tracemalloc else "") + "): " + "; ".join(
                f"{t}: {s['rss_mb']}/{s['threads']}/{s['fds']}/{s.get('malloc_in_use_mb')}/{s.get('malloc_free_mb')}"
                + (f"/{s['trace_mb']}" if "trace_mb" in s else "")
                for t, s in samples),
            "",
            *(sites_table("Largest allocation sites after the warm-up", start_sites.get("largest", []))
              + sites_table("Largest allocation sites at the end", end_sites.get("largest", []))
              + sites_table("Sites that grew most from the warm-up to the end", end_sites.get("grown", []))
              if args.tracemalloc else []),
            f"Clients: {dict(sorted(counts.items()))}",
            "",
            f"Server info: accepted {info['accepted']}, admitted {info['admitted']}, refused {info['refused']}, "
            f"closed {info['closed']}, live {info['live']}, errors {info['errors']}",
            f"Closed by reason: {dict(sorted(info['closed_by_reason'].items()))}",
            f"Refused by reason: {dict(sorted(info['refused_by_reason'].items()))}",
            "",
            f"- client connections {client_connects} + {CONTROL_CONNECTIONS['control']} control connections "
            f"= {client_connects + CONTROL_CONNECTIONS['control']}; server accepted {info['accepted']}",
            f"- lines sent {counts['sent']}, echoed intact {counts['echoed']}, mismatched {counts['mismatched']}, "
            f"lost {lost} (a line whose connection failed before its answer counts as lost)",
            f"- closed + live = {info['closed'] + info['live']} vs admitted {info['admitted']}",
        ]
        text = "\n".join(report) + "\n"
        Path(args.out).write_text(text)
        print(text)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        print(log_path.read_text().strip().splitlines()[-1])
        ok = (counts["mismatched"] == 0 and info["closed"] + info["live"] == info["admitted"]
              and info["accepted"] == client_connects + CONTROL_CONNECTIONS["control"])
        return 0 if ok else 1
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log_file.close()


if __name__ == "__main__":
    sys.exit(main())
