"""Instructions per echoed message in each server's own process: a figure this machine's noise cannot move.

Throughput on a shared 2-core VM moves 10 to 20% from run to run, more than
the gaps being measured. callgrind counts the instructions a process runs
in user space instead, which repeats run to run. Each server runs under
``valgrind --tool=callgrind``; after a warm-up the counters are zeroed, the
load generator runs closed-loop ping-pong, the counters are dumped, and the
total is divided by the messages echoed. System calls are not counted
(kernel work); ``strace -c`` shows they are the same per message in every
server here (one recv, one send, a share of one epoll_wait).

    python bench/instructions.py [--conns 50] [--seconds 5] [--only NAME ...]

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


def measure(name: str, port: int, conns: int, seconds: float, workdir: str) -> tuple[int, int]:
    script, env = SERVERS[name]
    out = os.path.join(workdir, re.sub(r"\W+", "_", name) + ".cg")
    log_path = os.path.join(workdir, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, script[0], str(port),
             *script[1:]],
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
        subprocess.run(loadgen + ["1"], capture_output=True, check=True, timeout=60)  # warm-up
        subprocess.run(["callgrind_control", "--zero", str(proc.pid)], capture_output=True, check=True, timeout=60)
        result = subprocess.run(loadgen + [str(seconds)], capture_output=True, check=True, timeout=seconds + 60)
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
    parser.add_argument("--only", nargs="*", default=list(SERVERS), choices=list(SERVERS))
    parser.add_argument("--port", type=int, default=18950)
    args = parser.parse_args()
    print(f"64-byte ping-pong, {args.conns} connections, {args.seconds:g} s under callgrind; "
          "user-space instructions in the server per echoed message")
    with tempfile.TemporaryDirectory(prefix="netpool-cg-") as workdir:
        for n, name in enumerate(args.only):
            instructions, messages = measure(name, args.port + n, args.conns, args.seconds, workdir)
            print(f"  {name:30s} {instructions / messages:8,.0f}   ({instructions:,} over {messages:,} messages)",
                  flush=True)


if __name__ == "__main__":
    main()
