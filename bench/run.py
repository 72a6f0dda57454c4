"""The benchmark driver behind `make bench`: netpool against asyncio, uvloop, gevent and socketserver.

Each server runs pinned to CPU 0 and the C load generator (bench/loadgen.c)
to CPU 1. Servers are interleaved round by round (A B C ... A B C ...) so
noise on the machine hits all of them alike; each figure is the median of
the rounds with the min-max spread beside it, and netpool's figures are
given as ratios to each reference measured in the same run. Results go to
bench/results.md (and bench/results.json), with a bar chart under each table
(bench/charts/, drawn by bench/charts.py).

Every run is bounded: the load generator stops itself after its duration,
servers are killed after each run, and only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVERS_DIR = HERE / "servers"
LOADGEN = HERE / "loadgen"
PY = sys.executable
SERVER_CPU, CLIENT_CPU = "0", "1"


@dataclass(frozen=True)
class Server:
    name: str
    argv: tuple[str, ...]
    tls: bool = False
    netpool_tree: str | None = None  # another checkout of netpool to import (--against), else the installed one

    def command(self, port: int, cert: tuple[str, str] | None, redis_port: int | None = None) -> list[str]:
        extra = list(cert) if (self.tls and cert) else []
        args = [a.replace("{redis}", str(redis_port)) for a in self.argv[1:]]
        return ["taskset", "-c", SERVER_CPU, PY, str(SERVERS_DIR / self.argv[0]), str(port), *args, *extra]


PLAIN_SERVERS = [
    Server("netpool-threads", ("netpool_server.py", "threads")),
    Server("netpool-events", ("netpool_server.py", "events")),
    Server("asyncio", ("asyncio_server.py",)),
    Server("uvloop", ("uvloop_server.py",)),
    Server("gevent", ("gevent_server.py",)),
    Server("socketserver", ("socketserver_server.py",)),
]
TLS_SERVERS = [
    Server("netpool-threads", ("netpool_server.py", "threads"), tls=True),
    Server("netpool-events", ("netpool_server.py", "events"), tls=True),
    Server("asyncio+ssl", ("asyncio_server.py",), tls=True),
]
# A line protocol, as chat servers speak: netpool's line framing against
# asyncio streams (readline, write, drain), the way asyncio users write one.
LINE_SERVERS = [
    Server("netpool-threads", ("netpool_server.py", "threads", "line")),
    Server("netpool-events", ("netpool_server.py", "events", "line")),
    Server("asyncio", ("asyncio_lines_server.py",)),
    Server("uvloop", ("asyncio_lines_server.py", "uvloop")),
]
REFERENCES = ("asyncio", "uvloop", "gevent", "socketserver", "asyncio+ssl", "threads")


def blocking_servers(work: str) -> list[Server]:
    """The same handler doing ``work`` (bench/servers/work.py) in netpool and in the two threaded references.

    ``work`` is sleep:MS (every message blocks), mixed:MS (only the messages
    of loadgen's mixed mode that start with B: half the connections), or
    redis:{redis} (a GET from the run's redis-server).
    """
    return [
        Server("netpool-threads", ("netpool_blocking.py", work, "threads")),
        Server("threads", ("threads_blocking.py", work)),
        Server("gevent", ("gevent_blocking.py", work)),
    ]


@dataclass
class Config:
    key: str
    title: str
    mode: str  # pingpong | connrate | idle
    n: int  # connections or slots
    metric: str  # the JSON field compared
    unit: str
    servers: list[Server]
    tls: bool = False
    line: bool = False  # each message ends with a newline (the servers frame by line)
    mixed: bool = False  # loadgen's mixed mode: half the connections' messages make the handler block
    threaded_refs: bool = False  # compared with the better of a thread per connection and gevent
    redis: bool = False  # the servers call a Redis the run starts
    higher_is_better: bool = True
    results: dict[str, list[dict]] = field(default_factory=dict)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of the server process (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(server: Server, port: int, cert: tuple[str, str] | None, redis_port: int | None) -> subprocess.Popen:
    env = None
    if server.netpool_tree is not None:
        env = {**os.environ, "PYTHONPATH": server.netpool_tree}  # ahead of the installed netpool
    proc = subprocess.Popen(server.command(port, cert, redis_port), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    deadline = time.monotonic() + 20
    assert proc.stdout is not None
    line = proc.stdout.readline()  # servers print READY once listening
    if line.strip() != "READY" or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"{server.name} did not start: {line!r}")
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # the benchmark needs no graceful stop, only a bounded one
    proc.wait(timeout=10)


def run_one(cfg: Config, server: Server, seconds: float, cert: tuple[str, str] | None,
            redis_port: int | None = None) -> dict:
    port = free_port()
    proc = start_server(server, port, cert, redis_port)
    try:
        base = ["taskset", "-c", CLIENT_CPU, str(LOADGEN)]
        if cfg.mode == "pingpong":
            extra = (["tls"] if cfg.tls else ["mixed"] if cfg.mixed else []) + (["line"] if cfg.line else [])
            argv = base + ["pingpong", "127.0.0.1", str(port), str(cfg.n), "64", str(seconds)] + extra
            # Warm up every server alike before measuring: a fresh asyncio
            # server, for one, runs its first burst of connections at a third
            # of its steady speed (seen here: 35k then 120k msg/s at 50).
            warm = [*argv[:-1 - len(extra)], "1"] + extra
            subprocess.run(warm, capture_output=True, text=True, timeout=90)
            out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 90)
            result = json.loads(out.stdout.strip().splitlines()[-1])
        elif cfg.mode == "connrate":
            argv = base + ["connrate", "127.0.0.1", str(port), str(cfg.n), str(seconds)]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
            result = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            argv = base + ["idle", "127.0.0.1", str(port), str(cfg.n), "120"]
            gen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert gen.stdout is not None and gen.stdin is not None
            try:
                holding = gen.stdout.readline().strip()
                if holding != "HOLDING":
                    raise RuntimeError(f"idle load generator: {holding!r}")
                # Let the server finish setting up the last connections before measuring.
                time.sleep(1.0)
                rss = rss_mb(proc.pid)
                gen.stdin.close()
                result = json.loads(gen.stdout.readline())
                result["rss_mb"] = round(rss, 1)
            finally:
                gen.kill()
                gen.wait(timeout=10)
        result["command"] = shlex.join(argv)
        return result
    finally:
        stop_server(proc)


def describe_machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    versions = {}
    for module in ("netpool", "uvloop", "gevent"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - report what is missing
            versions[module] = "missing"
    return (f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python {platform.python_version()}, "
            + ", ".join(f"{k} {v}" for k, v in versions.items()))


def make_cert(tmp: str) -> tuple[str, str]:
    from netpool.devcert import write_dev_certificate

    return write_dev_certificate(tmp, ["127.0.0.1", "localhost"])


def configs(args: argparse.Namespace) -> list[Config]:
    out: list[Config] = []
    for n in args.pingpong:
        out.append(Config(f"pingpong-{n}", f"64-byte ping-pong, {n} connections", "pingpong", n, "rate", "msg/s",
                          PLAIN_SERVERS))
    for n in args.connrate:
        out.append(Config(f"connrate-{n}", f"connection rate, {n} slots", "connrate", n, "rate", "conn/s",
                          PLAIN_SERVERS))
    for n in args.idle:
        servers = [s for s in PLAIN_SERVERS if n <= 10_000 or s.name not in args.idle_skip_threads]
        out.append(Config(f"idle-{n}", f"{n:,} idle connections", "idle", n, "rss_mb", "MB RSS", servers,
                          higher_is_better=False))
    for n in args.line:
        out.append(Config(f"line-{n}", f"64-byte lines, echoed line by line, {n} connections", "pingpong", n, "rate",
                          "msg/s", LINE_SERVERS, line=True))
    for spec in args.blocking:
        ms, n = spec.split(":")
        out.append(Config(f"blocking-{ms}ms-{n}", f"64-byte ping-pong, handler blocks {ms} ms, {n} connections",
                          "pingpong", int(n), "rate", "msg/s", blocking_servers(f"sleep:{ms}"), threaded_refs=True))
    for spec in args.mixed:
        ms, n = spec.split(":")
        out.append(Config(f"mixed-{ms}ms-{n}", f"mixed ping-pong, half the connections block {ms} ms, {n} connections",
                          "pingpong", int(n), "rate", "msg/s", blocking_servers(f"mixed:{ms}"), mixed=True,
                          threaded_refs=True))
    for n in args.redis:
        out.append(Config(f"redis-{n}", f"64-byte ping-pong, handler does a redis-py GET, {n} connections",
                          "pingpong", n, "rate", "msg/s", blocking_servers("redis:{redis}"), threaded_refs=True,
                          redis=True))
    for n in args.tls:
        out.append(Config(f"tls-{n}", f"TLS 64-byte ping-pong, {n} connections", "pingpong", n, "rate", "msg/s",
                          TLS_SERVERS, tls=True))
    return out


def summarise(cfg: Config) -> list[str]:
    lines = [f"### {cfg.title}", "", f"| server | median {cfg.unit} | min-max | extra |", "| --- | --- | --- | --- |"]
    medians: dict[str, float] = {}
    for name, runs in cfg.results.items():
        values = [r[cfg.metric] for r in runs if cfg.metric in r]
        if not values:
            lines.append(f"| {name} | failed | | {runs[-1].get('error', '')} |")
            continue
        med = statistics.median(values)
        medians[name] = med
        extra = ""
        if cfg.mode == "pingpong":
            extra = "p50/p99/p999 {}/{}/{} µs, errors {}".format(
                int(statistics.median(r["p50_us"] for r in runs)), int(statistics.median(r["p99_us"] for r in runs)),
                int(statistics.median(r["p999_us"] for r in runs)), sum(r["errors"] for r in runs))
            if cfg.mixed:
                extra += ", non-blocking half p50/p99 {}/{} µs".format(
                    int(statistics.median(r["fast_p50_us"] for r in runs if "fast_p50_us" in r)),
                    int(statistics.median(r["fast_p99_us"] for r in runs if "fast_p99_us" in r)))
        elif cfg.mode == "connrate":
            extra = f"errors {sum(r['errors'] for r in runs)}"
        else:
            extra = "opened {}, fresh echo p99 {} µs, held sample ok {}/{}".format(
                min(r["opened"] for r in runs), int(statistics.median(r["fresh_p99_us"] for r in runs)),
                min(r["sample_ok"] for r in runs), runs[0]["sample"])
        lines.append(f"| {name} | {med:,.1f} | {min(values):,.1f} - {max(values):,.1f} | {extra} |")
    ratio_lines = []
    for ours in ("netpool-threads", "netpool-events"):
        if ours not in medians:
            continue
        parts = []
        for ref in [*REFERENCES, *(name for name in medians if name.startswith(ours + "@"))]:
            if ref in medians and medians[ref]:
                ratio = medians[ours] / medians[ref]
                if not cfg.higher_is_better:
                    ratio = medians[ref] / medians[ours]  # > 1 means netpool uses less memory
                parts.append(f"{ratio:.2f}x {ref}")
        if cfg.threaded_refs and "threads" in medians and "gevent" in medians:
            better = max(medians["threads"], medians["gevent"])
            parts.append(f"**{medians[ours] / better:.2f}x the better reference**")
        ratio_lines.append(f"- **{ours}**: " + ", ".join(parts))
    lines += ["", *ratio_lines, ""]
    if not cfg.higher_is_better:
        lines.insert(len(lines) - 1, "(memory ratios are reference/netpool: above 1.00x netpool uses less)")
    return lines


class LocalRedis:
    """A redis-server on a free loopback port, pinned with the load generator (``cpu``), for the redis runs.

    ``cpu=None`` leaves it unpinned (bench/chat.py, where servers and clients share both cores).
    """

    def __init__(self, cpu: str | None = CLIENT_CPU) -> None:
        self.port = free_port()
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> "LocalRedis":
        import redis

        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed: make bench installs it (Debian's redis-server)")
        pin = ["taskset", "-c", self.cpu] if self.cpu is not None else []
        self.proc = subprocess.Popen(
            [*pin, server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--maxclients", "10000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.set("netpool-bench", b"v" * 64)
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)  # bounded by the deadline above
        client.close()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def mixed_summary(plan: list[Config]) -> list[str]:
    """The mixed runs' question: how much slower do the non-blocking half's answers get when the other half blocks?"""
    quiet = {cfg.n: cfg for cfg in plan if cfg.mixed and cfg.key.startswith("mixed-0ms-")}
    lines = []
    for cfg in plan:
        base = quiet.get(cfg.n)
        if not cfg.mixed or base is None or cfg is base:
            continue
        for name, runs in cfg.results.items():
            before = [r["fast_p99_us"] for r in base.results.get(name, []) if "fast_p99_us" in r]
            after = [r["fast_p99_us"] for r in runs if "fast_p99_us" in r]
            if before and after:
                b, a = statistics.median(before), statistics.median(after)
                lines.append(f"- **{name}**, {cfg.n} connections: non-blocking half p99 {b:,.0f} µs with nothing "
                             f"blocking, {a:,.0f} µs with {cfg.key.split('-')[1]} blocks: {a / b:.2f}x")
    return ["### Non-blocking connections beside blocking ones", "", *lines, ""] if lines else []


def against_tree(rev: str) -> tuple[str, str]:
    """A checkout of netpool at ``rev`` under build/, its C module built in place: (short commit, directory)."""
    repo = HERE.parent
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=repo, capture_output=True, text=True, check=True)
    short = commit.stdout.strip()
    tree = repo / "build" / f"against-{short}"
    if not (tree / "netpool").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", short], cwd=repo, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    built = subprocess.run([PY, "setup.py", "build_ext", "--inplace"], cwd=tree, capture_output=True, text=True)
    if not list((tree / "netpool").glob("_speedups*.so")):
        raise SystemExit(f"could not build netpool._speedups at {short} in {tree}:\n{built.stdout}{built.stderr}")
    return short, str(tree)


def with_against(plan: list[Config], short: str, tree: str) -> None:
    """Each netpool server of each configuration also runs from ``tree``, interleaved with the rest."""
    for cfg in plan:
        old = [Server(f"{s.name}@{short}", s.argv, s.tls, tree) for s in cfg.servers if s.name.startswith("netpool")]
        cfg.servers = [*cfg.servers, *old]


def draw_charts(results: dict[str, dict[str, list[dict]]], out: Path, machine: str, started: float) -> dict[str, str]:
    """One bar chart per table (bench/charts.py) beside the report: bench/charts/ for bench/results.md, else
    REPORT-charts/. Returns each table's chart as a link relative to the report; none, with a warning, if they
    cannot be drawn: the run's numbers are written either way.
    """
    try:
        import charts  # bench/charts.py (matplotlib, from the bench extra); not needed by bench/chat.py

        drawn = charts.draw_charts(results, charts.default_outdir(out.with_suffix(".json")),
                                   charts.run_facts(machine, time.strftime("%Y-%m-%d", time.gmtime(started))))
    except Exception as exc:  # noqa: BLE001 - a missing chart must not lose a finished run
        print(f"charts not drawn: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {}
    return {chart.key: os.path.relpath(chart.path, out.parent) for chart in drawn}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each ping-pong / rate run")
    ap.add_argument("--pingpong", type=int, nargs="*", default=[1, 50, 1000])
    ap.add_argument("--connrate", type=int, nargs="*", default=[50])
    ap.add_argument("--idle", type=int, nargs="*", default=[10_000, 19_000])
    ap.add_argument("--tls", type=int, nargs="*", default=[50])
    ap.add_argument("--line", type=int, nargs="*", default=[50],
                    help="line-framed ping-pong (chat-like) with these connection counts")
    ap.add_argument("--mixed", nargs="*", default=["0:50", "1:50"],
                    help="MS:CONNECTIONS pairs: half the connections' messages block MS, the other half's "
                         "p99 is reported (0 gives the same run with nothing blocking)")
    ap.add_argument("--redis", type=int, nargs="*", default=[50, 1000],
                    help="connections for the runs whose handler does a redis-py GET against a local redis-server")
    ap.add_argument("--blocking", nargs="*", default=["0.1:50", "0.1:1000", "1:50", "1:1000", "5:50", "5:1000"],
                    help="MS:CONNECTIONS pairs: a handler that sleeps MS per message, against a thread per "
                         "connection and gevent")
    ap.add_argument("--only", nargs="*", help="run only these servers (names as in the tables)")
    ap.add_argument("--idle-skip-threads", nargs="*", default=[],
                    help="servers to leave out of idle runs above 10,000 connections")
    ap.add_argument("--against", metavar="REV",
                    help="also run netpool as of this git revision (built under build/), interleaved, and give "
                         "ratios to it: to tell a change from this machine's noise")
    ap.add_argument("--out", help="where the report goes (default bench/results.md; with --against, "
                                  "build/bench-against-REV.md)")
    args = ap.parse_args()
    if not LOADGEN.exists():
        print("build the load generator first: make bench-tools", file=sys.stderr)
        return 2
    started = time.time()
    plan = configs(args)
    out = Path(args.out) if args.out else HERE / "results.md"
    if args.against:
        short, tree = against_tree(args.against)
        with_against(plan, short, tree)
        out = Path(args.out) if args.out else HERE.parent / "build" / f"bench-against-{short}.md"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        cert = make_cert(tmp)
        redis_port = stack.enter_context(LocalRedis()).port if any(cfg.redis for cfg in plan) else None
        for cfg in plan:
            servers = [s for s in cfg.servers if not args.only or s.name.split("@")[0] in args.only]
            for rnd in range(args.rounds):
                for server in servers:
                    try:
                        result = run_one(cfg, server, args.seconds, cert, redis_port)
                    except Exception as exc:  # noqa: BLE001 - a failed run is reported, not fatal
                        result = {"error": f"{type(exc).__name__}: {exc}"}
                    cfg.results.setdefault(server.name, []).append(result)
                    shown = result.get(cfg.metric, result.get("error"))
                    print(f"[{cfg.key} round {rnd + 1}/{args.rounds}] {server.name}: {shown}", flush=True)
    elapsed = time.time() - started
    machine = describe_machine()
    results = {cfg.key: cfg.results for cfg in plan}
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    drawn = draw_charts(results, out, machine, started)
    lines = [
        "# netpool benchmark results",
        "",
        f"Machine: {machine}.",
        f"Run: `{shlex.join([Path(PY).name, 'bench/run.py', *sys.argv[1:]])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, {elapsed:.0f} s; "
        f"{args.rounds} interleaved rounds, {args.seconds:g} s per run; servers pinned to CPU {SERVER_CPU}, "
        f"the load generator (bench/loadgen.c) to CPU {CLIENT_CPU}.",
        "Each server is the few lines in bench/servers/; netpool runs the bundled echo example unchanged. "
        "Before each ping-pong run the server is warmed up with 1 s of the same load, which is not measured.",
        "",
    ]
    for cfg in plan:
        lines += summarise(cfg)
        example = next((r["command"] for runs in cfg.results.values() for r in runs if "command" in r), "")
        lines += [f"Load generator: `{example}`", ""]
        if cfg.key in drawn:
            lines += [f"![{cfg.title}]({drawn[cfg.key]})", ""]
    lines += mixed_summary(plan)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
