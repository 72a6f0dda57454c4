"""netpool with a handler that does WORK (see work.py: a sleep, or a Redis GET), then echoes."""

import sys

import netpool
from netpool_process import like_netpool_run
from work import make_work


def main(port: int, spec: str, io: str = "threads") -> None:
    like_netpool_run()
    work = make_work(spec)

    def handler(message: bytes, conn: netpool.Connection) -> None:
        work(message)
        conn.send(message)

    settings = dict(handler=handler, port=port, max_connections=20000, backlog=4096)
    if io != "threads":
        settings["io"] = io
    listener = netpool.start_listener(settings)
    print("READY", flush=True)
    listener.wait()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:4])
