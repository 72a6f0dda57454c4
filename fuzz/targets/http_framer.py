"""The gateway's HttpFramer: the same requests whatever the cut, limits on what it holds, errors as error requests.

Properties, for every input (see _common for the control bytes; the config
byte picks the head limit and max_message_size, the body limit):

- fed whole or cut by the seed, the same list of requests comes out;
  ``feed`` never raises (bad input becomes an error request: 400, 411,
  413, 431, 501 or 505, with keep_alive off), an error request is the last
  thing delivered and nothing is read after it;
- checked against the bytes: each request's head is at most the head
  limit, ends at the first CRLF CRLF, and its request line is what the head
  says; its body is the next Content-Length bytes, at most the body limit;
  a 431 comes only for a head over the limit;
- what the framer is left holding is bounded: an unterminated head of at
  most the limit (plus up to 3 bytes that may begin the CRLF CRLF), or a
  head whose body is still incomplete and within the body limit.

The real head limit is 16 KiB, more than libFuzzer's inputs; the target
swaps frontend.MAX_HEAD for smaller limits while it runs so the 431 paths
are reached, and puts it back after.
"""

from __future__ import annotations

import sys
from dataclasses import astuple
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the checkout's root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.targets import _common  # noqa: E402

with _common.instrumented(__name__, "netpool.examples.gateway.frontend"):
    from netpool.examples.gateway import frontend
    from netpool.examples.gateway.frontend import HttpFramer, HttpRequest

HEAD_LIMITS = (frontend.MAX_HEAD, 8, 40, 200)
BODY_LIMITS = (0, 1, 2, 10, 100, 1000, 16384, 65536)
ERROR_STATUSES = {400, 411, 413, 431, 501, 505}
END = b"\r\n\r\n"


def run(chunks: list[bytes], max_body: int) -> list[HttpRequest]:
    framer = HttpFramer(max_body)
    out: list[HttpRequest] = []
    for chunk in chunks:
        requests = framer.feed(chunk)
        if out and out[-1].error is not None:
            assert requests == [], "requests after an error request"
        for request in requests:
            assert not out or out[-1].error is None, "an error request that was not the last"
            out.append(request)
    assert framer.eof() == []
    return out


def against_the_bytes(stream: bytes, requests: list[HttpRequest], head_limit: int, max_body: int) -> None:
    pos = 0
    for request in requests:
        end = stream.find(END, pos)
        if request.error is not None:
            status, code = request.error
            assert status in ERROR_STATUSES and code and not request.keep_alive, request
            if status == 431:
                head = len(stream) - pos if end < 0 else end - pos
                assert head > head_limit, f"431 for a head of {head} bytes, limit {head_limit}"
                return
            assert end >= 0 and end - pos <= head_limit, (request, end - pos)
            if status == 413:
                assert request.content_length > max_body, request
            return
        assert end >= 0, f"a request without its head's end: {request}"
        assert end - pos <= head_limit, f"a head of {end - pos} bytes passed the limit {head_limit}"
        line, *fields = stream[pos:end].decode("latin-1").split("\r\n")
        assert [request.method, request.path, request.version] == line.split(" "), (request, line)
        declared = {name.lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
        size = request.content_length
        assert size == int(declared.get("content-length", "0")), f"Content-Length {declared} read as {size}"
        assert 0 <= size <= max_body, f"a body of {size} bytes passed max_message_size={max_body}"
        body = stream[end + 4:end + 4 + size]
        assert request.body == body and len(body) == size, (request.body, body)
        pos = end + 4 + size
    # Not broken: what is left is held, and must be within the limits.
    rest = stream[pos:]
    end = rest.find(END)
    if end < 0:
        assert len(rest) <= head_limit + 3, f"{len(rest)} bytes of head held, limit {head_limit}"
        return
    # The head held with its body incomplete: padded to the body limit, it must come out whole.
    pending = HttpFramer(max_body).feed(rest[:end + 4] + bytes(max_body))[0]
    assert pending.error is None and len(rest) - end - 4 < pending.content_length <= max_body, pending


def check(data: bytes) -> None:
    seed, config, stream = _common.control(data)
    head_limit = HEAD_LIMITS[config & 3]
    max_body = BODY_LIMITS[config >> 2 & 7]
    real = frontend.MAX_HEAD
    frontend.MAX_HEAD = head_limit
    try:
        whole = run([stream], max_body)
        cut = run(_common.pieces(stream, seed), max_body)
        assert list(map(astuple, cut)) == list(map(astuple, whole)), (cut, whole)
        against_the_bytes(stream, whole, head_limit, max_body)
    finally:
        frontend.MAX_HEAD = real


if __name__ == "__main__":
    _common.fuzz(check)
