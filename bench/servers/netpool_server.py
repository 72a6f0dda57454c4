"""netpool's echo server as a user runs it: the bundled example, nothing tuned by hand."""

import sys

import netpool
from netpool.examples.echo.handler import echo


def main(port: int, io: str = "threads", certfile: str = "", keyfile: str = "") -> None:
    settings = dict(handler=echo, port=port, max_connections=20000, backlog=4096)
    if io != "threads":
        settings["io"] = io
    if certfile:
        settings["ssl"] = {"certfile": certfile, "keyfile": keyfile}
    listener = netpool.start_listener(settings)
    print("READY", flush=True)
    listener.wait()


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:5])
