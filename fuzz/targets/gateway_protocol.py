"""The gateway's back-end protocol: decoders refuse with ProtocolViolation only; encode/decode round trips.

Properties, for every input (see _common for the control bytes):

- decode_request on the bytes gives a Request within the documented field
  limits, which encode_request turns back into the same bytes, or raises
  ProtocolViolation with a message; decode_reply gives a Reply (the same
  bytes back through encode_reply when the detail is UTF-8) or, for an
  empty frame only, ProtocolViolation; any other exception is a bug;
- a username and password taken from the input as any Python text (lone
  surrogates included: json.loads makes them from "\\ud800", and the
  front end passes JSON strings straight in) either encode and decode back
  to themselves, or encode_request refuses them with ProtocolViolation,
  which the front end answers with 422;
- a status and a UTF-8 detail encode and decode back to themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.targets import _common  # noqa: E402

with _common.instrumented(__name__, "netpool.examples.gateway.protocol"):
    from netpool.examples.gateway import protocol as p


def decoders(frame: bytes) -> None:
    try:
        request = p.decode_request(frame)
    except p.ProtocolViolation as exc:
        assert str(exc), "a refusal without a message"
    else:
        assert request.op in p.OPS, request
        assert len(request.username.encode()) <= p.MAX_USERNAME, request
        assert len(request.password.encode()) <= p.MAX_PASSWORD, request
        assert p.encode_request(*request) == frame, (request, frame)
    try:
        reply = p.decode_reply(frame)
    except p.ProtocolViolation as exc:
        assert str(exc) and frame == b"", (exc, frame)
    else:
        assert reply.status == frame[0], (reply, frame)
        try:
            frame[1:].decode()
        except UnicodeDecodeError:
            return  # decoded with replacement characters: lossy on purpose
        assert p.encode_reply(*reply) == frame, (reply, frame)


def check(data: bytes) -> None:
    seed, config, stream = _common.control(data)
    decoders(stream)

    # Any text, as json.loads can produce it: UTF-16 code units, lone surrogates included.
    text = stream[:len(stream) & ~1].decode("utf-16-le", "surrogatepass")
    split = seed % (len(text) + 1)
    username, password = text[:split], text[split:]
    op = tuple(p.OPS)[config & 3] if config & 4 == 0 else config
    try:
        frame = p.encode_request(op, username, password)
    except p.ProtocolViolation as exc:
        assert str(exc), "a refusal without a message"
        try:
            fits = len(username.encode()) <= p.MAX_USERNAME and len(password.encode()) <= p.MAX_PASSWORD
        except UnicodeEncodeError:
            fits = False
        assert not fits, f"refused fields within the limits: {exc}"
    else:
        if op in p.OPS:
            assert p.decode_request(frame) == (op, username, password), (frame, op, username, password)
        else:
            try:
                p.decode_request(frame)
            except p.ProtocolViolation as exc:
                assert "unknown operation" in str(exc), exc
            else:
                raise AssertionError(f"operation {op} decoded")

    detail = text.encode("utf-8", "replace").decode()
    assert p.decode_reply(p.encode_reply(seed, detail)) == (seed, detail)


if __name__ == "__main__":
    _common.fuzz(check)
