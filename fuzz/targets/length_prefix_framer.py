"""LengthPrefixFramer: any cut gives the frames a reference parse gives, limits hold, encode/decode round trip.

Properties, for every input (see _common for the control bytes):

- fed whole or cut by the seed, the messages delivered after each feed are
  exactly the frames completed so far, and the error (type and message) is
  the same: MessageTooLarge("frame announces N bytes, ...") as soon as a
  header over ``max_message_size`` is complete, FramingError("stream ended
  inside a frame ...") at EOF with a partial frame; any other exception is a bug;
- ``pending`` is exactly the bytes fed since the last complete frame (a read
  header counts), so never more than ``max_message_size`` + 4;
- the stream cut into messages by the seed, encoded and fed back, gives the
  same messages (or the MessageTooLarge of the first one over the limit).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.targets import _common  # noqa: E402

with _common.instrumented(__name__, "netpool.framing"):
    from netpool.errors import FramingError, MessageTooLarge
    from netpool.framing import LengthPrefixFramer

LIMITS = (0, 1, 2, 5, 16, 64, 1000, 65536)


def reference(stream: bytes, limit: int) -> tuple[list[bytes], list[int], Exception | None]:
    """Frames, the offset where each ends, and the error the stream must end in (None: a clean end)."""
    out: list[bytes] = []
    ends: list[int] = []
    pos = 0
    while len(stream) - pos >= 4:
        (need,) = struct.unpack_from(">I", stream, pos)
        if need > limit:
            return out, ends, MessageTooLarge(f"frame announces {need} bytes, max_message_size={limit}")
        if len(stream) - pos - 4 < need:
            break
        out.append(stream[pos + 4:pos + 4 + need])
        pos += 4 + need
        ends.append(pos)
    rest = len(stream) - pos
    if not rest:
        return out, ends, None
    pending = rest - 4 if rest >= 4 else rest  # a read header is no longer in the buffer
    return out, ends, FramingError(f"stream ended inside a frame ({pending} bytes pending)")


def same_error(got: Exception, expected: Exception | None) -> None:
    assert expected is not None, f"unexpected {got!r}"
    assert type(got) is type(expected) and str(got) == str(expected), (got, expected)


def run(chunks: list[bytes], limit: int, expected: list[bytes], ends: list[int], error: Exception | None) -> None:
    framer = LengthPrefixFramer(limit)
    got: list[bytes] = []
    fed = 0
    for chunk in chunks:
        try:
            messages = framer.feed(chunk)
        except FramingError as exc:
            same_error(exc, error)
            assert isinstance(exc, MessageTooLarge), "only a header can fail before EOF"
            return
        assert all(type(m) is bytes for m in messages), messages
        assert messages == expected[len(got):len(got) + len(messages)], (messages, expected)
        got += messages
        fed += len(chunk)
        assert len(ends) == len(got) or ends[len(got)] > fed, f"a frame complete after {fed} bytes was held back"
        since = fed - (ends[len(got) - 1] if got else 0)
        assert framer.pending == since, (framer.pending, since)
        assert since <= limit + 4
    try:
        tail = framer.eof()
    except FramingError as exc:
        same_error(exc, error)
        assert not isinstance(exc, MessageTooLarge)
        return
    assert error is None, f"{error!r} expected, the stream ended cleanly"
    assert tail == [] and got == expected, (got, expected)


def check(data: bytes) -> None:
    seed, config, stream = _common.control(data)
    limit = LIMITS[config & 7]
    expected, ends, error = reference(stream, limit)
    run([stream], limit, expected, ends, error)
    run(_common.pieces(stream, seed), limit, expected, ends, error)

    # Round trip: the input's own pieces as messages.
    messages = _common.pieces(stream, seed ^ 0x5A)
    framer = LengthPrefixFramer(limit)
    wire = b"".join(framer.encode(m) for m in messages)
    assert framer.encode(b"") == b"\0\0\0\0"
    first_too_large = next((i for i, m in enumerate(messages) if len(m) > limit), len(messages))
    expected, ends, error = reference(wire, limit)
    assert expected == messages[:first_too_large], "reference and encode disagree"
    run(_common.pieces(wire, seed), limit, expected, ends, error)
    if error is None:
        assert framer.feed(wire) + framer.eof() == messages


if __name__ == "__main__":
    _common.fuzz(check)
