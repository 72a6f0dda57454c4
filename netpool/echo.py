"""The echo handler that ``netpool echo`` serves: every message goes straight back.

It lives in the library so the command line needs nothing from the
examples; ``examples/echo`` shows the same handler as a user writes it.
"""

from __future__ import annotations

from .connection import Connection

__all__ = ["echo"]


def echo(message: bytes, conn: Connection) -> None:
    """Send ``message`` back (with line framing ``send`` puts the newline back)."""
    conn.send(message)
