"""Instructions per echoed message in each server's own process: a figure this machine's noise cannot move.

Throughput on a shared 2-core VM moves 10 to 20% from run to run, more than
the gaps being measured. callgrind counts the instructions a process runs
in user space instead, which repeats run to run. Each server runs under
``valgrind --tool=callgrind``; after a warm-up the counters are zeroed, the
load generator runs closed-loop ping-pong, the counters are dumped, and the
total is divided by the messages echoed. System calls are not counted
(kernel work); ``strace -c`` shows they are the same per message in every
server here (one recv, one send, a share of one epoll_wait).

    python bench/instructions.py [--conns 50] [--seconds 5] [--only NAME ...] [--tls]

With ``--tls`` the servers speak TLS (a development certificate) and each
is measured twice, for ``seconds`` and for four times as long: the
difference is divided by the difference in messages, so the 50 handshakes
of each run cancel out and what is left is the cost of a TLS message.

Needs valgrind (``make bench-tools`` installs it) and bench/loadgen.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS = {
    "netpool-events": (["netpool_server.py", "events"], {}),
    "netpool-threads": (["netpool_server.py", "threads"], {}),
    "netpool-events (pure Python)": (["netpool_server.py", "events"], {"NETPOOL_PURE_PYTHON": "1"}),
    "uvloop": (["uvloop_server.py"], {}),
    "asyncio": (["asyncio_server.py"], {}),
}
TLS_SERVERS = {
    "netpool-events": (["netpool_server.py", "events"], {}),
    "netpool-threads": (["netpool_server.py", "threads"], {}),
    "asyncio+ssl": (["asyncio_server.py"], {}),
}


def measure(name: str, port: int, conns: int, seconds: float, workdir: str,
            cert: tuple[str, str] | None = None) -> tuple[int, int]:
    script, env = (TLS_SERVERS if cert else SERVERS)[name]
    tls = ["tls"] if cert else []
    out = os.path.join(workdir, re.sub(r"\W+", "_", name) + ".cg")
    log_path = os.path.join(workdir, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, script[0], str(port),
             *script[1:], *(cert or ())],
            cwd=os.path.join(HERE, "servers"), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})

    def server_log() -> str:
        with open(log_path) as f:
            return f.read()

    try:
        deadline = time.monotonic() + 120  # valgrind starts Python about 50 times slower
        while "READY" not in server_log():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {server_log()[-2000:]}")
            time.sleep(0.2)
        loadgen = [os.path.join(HERE, "loadgen"), "pingpong", "127.0.0.1", str(port), str(conns), "64"]
        subprocess.run(loadgen + ["1"] + tls, capture_output=True, check=True, timeout=60)  # warm-up
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], capture_output=True, check=True, timeout=60)
        result = subprocess.run(loadgen + [str(seconds)] + tls, capture_output=True, check=True,
                                timeout=seconds + 60)
        subprocess.run(["callgrind_control", "--dump", str(proc.pid)], capture_output=True, check=True, timeout=60)
    finally:
        proc.kill()
        proc.wait(30)
    messages = json.loads(result.stdout)["messages"]
    dump = max(glob.glob(out + ".*"), key=os.path.getmtime)
    with open(dump) as f:
        totals = next(line for line in f if line.startswith(("summary:", "totals:")))
    return int(totals.split()[1]), messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", nargs="*", choices=sorted({*SERVERS, *TLS_SERVERS}))
    parser.add_argument("--port", type=int, default=18950)
    parser.add_argument("--tls", action="store_true", help="TLS ping-pong (netpool and asyncio+ssl)")
    args = parser.parse_args()
    names = args.only or list(TLS_SERVERS if args.tls else SERVERS)
    print(f"{'TLS ' if args.tls else ''}64-byte ping-pong, {args.conns} connections, {args.seconds:g} s under "
          "callgrind; user-space instructions in the server per echoed message")
    with tempfile.TemporaryDirectory(prefix="netpool-cg-") as workdir:
        cert = None
        if args.tls:
            sys.path.insert(0, os.path.dirname(HERE))
            from netpool.devcert import write_dev_certificate

            cert = write_dev_certificate(workdir, ["127.0.0.1", "localhost"])
        for n, name in enumerate(names):
            instructions, messages = measure(name, args.port + 2 * n, args.conns, args.seconds, workdir, cert)
            if cert is None:
                print(f"  {name:30s} {instructions / messages:8,.0f}   ({instructions:,} over {messages:,} messages)",
                      flush=True)
                continue
            more, more_messages = measure(name, args.port + 2 * n + 1, args.conns, 4 * args.seconds, workdir, cert)
            per = (more - instructions) / (more_messages - messages)
            print(f"  {name:30s} {per:8,.0f}   ({more - instructions:,} over the {more_messages - messages:,} "
                  "messages the longer run added)", flush=True)


if __name__ == "__main__":
    main()
