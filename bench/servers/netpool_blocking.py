"""netpool with a handler that blocks MS milliseconds per message (a stand-in for a database call), then echoes.

WHICH is "all" (every message blocks) or "mixed" (only messages starting with B: loadgen's mixed mode).
"""

import sys
import time

import netpool


def main(port: int, ms: str, which: str = "all", io: str = "threads") -> None:
    seconds = float(ms) / 1000
    every = which == "all"

    def handler(message: bytes, conn: netpool.Connection) -> None:
        if seconds and (every or message[:1] == b"B"):
            time.sleep(seconds)
        conn.send(message)

    settings = dict(handler=handler, port=port, max_connections=20000, backlog=4096)
    if io != "threads":
        settings["io"] = io
    listener = netpool.start_listener(settings)
    print("READY", flush=True)
    listener.wait()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:5])
