"""LineFramer: any cut gives the lines a reference split gives, limits hold, rejections are MessageTooLarge.

Properties, for every input (see _common for the control bytes):

- fed whole, cut by the seed, or one line per feed (the framer's fast path),
  the messages delivered after each feed are exactly the complete lines so
  far, as a plain ``split(b"\\n")`` with one ``\\r`` stripped gives them;
- ``pending`` is exactly the bytes after the last newline, and never more
  than ``max_message_size`` + 1 (a ``\\r`` waiting for its ``\\n``);
- a line longer than ``max_message_size`` is never returned: the stream is
  rejected with MessageTooLarge("line of N bytes or more ..."), N a true
  lower bound of the offending line; any other exception is a bug;
- encode then feed gives the message back (for messages not ending in ``\\r``,
  which the framer documents as stripped).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.targets import _common  # noqa: E402

with _common.instrumented(__name__, "netpool.framing"):
    from netpool.errors import MessageTooLarge
    from netpool.framing import LineFramer

LIMITS = (1, 2, 3, 10, 64, 100, 1000, 65536)
_TOO_LARGE = re.compile(r"line of (\d+) bytes or more exceeds max_message_size=(\d+)")


def reference(stream: bytes, limit: int) -> tuple[list[bytes], int | None]:
    """The lines before the first one over ``limit`` (the unterminated tail included), and that one's length."""
    *lines, tail = stream.split(b"\n")
    out = []
    for line in lines + [tail]:
        line = line[:-1] if line.endswith(b"\r") else line
        if len(line) > limit:
            return out, len(line)
        out.append(line)
    if not tail:
        out.pop()  # nothing after the last newline: no last line at EOF
    return out, None


def run(chunks: list[bytes], limit: int, expected: list[bytes], bad: int | None) -> None:
    framer = LineFramer(limit)
    got: list[bytes] = []
    lines = 0  # newlines fed so far
    held = 0  # bytes fed since the last newline
    for chunk in chunks:
        try:
            messages = framer.feed(chunk)
        except MessageTooLarge as exc:
            assert bad is not None, f"rejected a stream whose lines all fit {limit}: {exc}"
            match = _TOO_LARGE.fullmatch(str(exc))
            assert match is not None, f"unexpected message {exc!r}"
            assert limit < int(match[1]) <= bad and int(match[2]) == limit, (str(exc), bad, limit)
            # Lines completed by earlier feeds came out; this feed's are lost with the stream.
            assert got == expected[:lines], (got, expected)
            return
        assert all(type(m) is bytes for m in messages), messages
        assert messages == expected[len(got):len(got) + len(messages)], (messages, expected)
        got += messages
        newline = chunk.rfind(b"\n")
        lines += chunk.count(b"\n")
        held = len(chunk) - newline - 1 if newline >= 0 else held + len(chunk)
        assert len(got) == lines, (len(got), lines)
        assert framer.pending == held, (framer.pending, held)
        assert framer.pending <= limit + 1, (framer.pending, limit)
    assert bad is None, f"a line of {bad} bytes passed max_message_size={limit}"
    got += framer.eof()
    assert got == expected, (got, expected)
    assert framer.pending == 0 and framer.eof() == []


def check(data: bytes) -> None:
    seed, config, stream = _common.control(data)
    limit = LIMITS[config & 7]
    expected, bad = reference(stream, limit)
    run([stream], limit, expected, bad)
    run(_common.pieces(stream, seed), limit, expected, bad)
    by_line = [line + b"\n" for line in stream.split(b"\n")]
    by_line[-1] = by_line[-1][:-1]
    run(by_line, limit, expected, bad)

    messages = [m for m in expected if not m.endswith(b"\r")]
    framer = LineFramer(limit)
    wire = b"".join(framer.encode(m) for m in messages)
    assert framer.feed(wire) + framer.eof() == messages


if __name__ == "__main__":
    _common.fuzz(check)
