"""RawFramer: each non-empty chunk is one message, unchanged; nothing is held; encode is the identity.

Trivial by design (the read loop never hands it more than max_message_size),
so the target mostly guards against the framer ever starting to buffer.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.targets import _common  # noqa: E402

with _common.instrumented(__name__, "netpool.framing"):
    from netpool.framing import RawFramer


def check(data: bytes) -> None:
    seed, _, stream = _common.control(data)
    chunks = _common.pieces(stream, seed)
    framer = RawFramer(max(1, max(map(len, chunks), default=1)))
    got: list[bytes] = []
    for chunk in chunks:
        messages = framer.feed(chunk)
        assert messages == ([chunk] if chunk else []), (chunk, messages)
        got += messages
    assert framer.eof() == []
    assert b"".join(got) == stream
    assert framer.encode(stream) == stream


if __name__ == "__main__":
    _common.fuzz(check)
