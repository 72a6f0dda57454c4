"""netpool's echo server as a user runs it: the bundled example, nothing tuned by hand."""

import sys

import netpool
from netpool_process import like_netpool_run
from netpool.examples.echo.handler import echo


def main(port: int, io: str = "threads", certfile: str = "", keyfile: str = "", framing: str = "raw") -> None:
    like_netpool_run()
    settings = dict(handler=echo, port=port, max_connections=20000, backlog=4096)
    if framing != "raw":
        settings["framing"] = framing
    if io != "threads":
        settings["io"] = io
    if certfile:
        settings["ssl"] = {"certfile": certfile, "keyfile": keyfile}
    listener = netpool.start_listener(settings)
    print("READY", flush=True)
    listener.wait()


if __name__ == "__main__":
    # argv: PORT [IO] [line] [CERTFILE KEYFILE]: "line" frames messages by line, as a chat server does.
    args = sys.argv[2:]
    framing = "line" if "line" in args else "raw"
    main(int(sys.argv[1]), *[a for a in args if a != "line"][:3], framing=framing)
