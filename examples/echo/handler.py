"""An echo server, as a user of netpool writes it.

Run it with ``netpool echo --port 5555`` (or ``netpool run
netpool.examples.echo.handler:echo``) and talk to it with
``nc 127.0.0.1 5555``.
"""

from __future__ import annotations

import netpool


def echo(message: bytes, conn: netpool.Connection) -> None:
    """Send every message straight back.

    With raw framing (the default) a message is whatever one read returned;
    with ``--framing line`` it is one line, and ``send`` puts the newline back.
    """
    conn.send(message)


if __name__ == "__main__":
    # Also runnable as a plain script: python examples/echo/handler.py
    listener = netpool.start_listener(netpool.ListenerConfig(handler=echo, port=5555))
    try:
        listener.wait()
    except KeyboardInterrupt:
        print(listener.stop().summary())
