"""ProxyHeaderReader (PROXY protocol v1 and v2): any cut reads the same header, no byte more; builders round-trip.

Properties, for every input (see _common for the control bytes; the config
byte picks the accepted versions):

- fed whole or cut by the seed, the outcome is the same: the same header
  and the same count of bytes taken, or the same ProxyHeaderError (type and
  message, with its ``reason``); any other exception is a bug;
- until the header is complete every byte fed is taken; once it is, the
  count taken is the header's length (at most MAX_V1 or MAX_V2) and later
  feeds take nothing;
- a header read from the input, rebuilt with build_v1/build_v2 where they
  can express it, reads back as the same header;
- addresses, ports, TLVs and the LOCAL flag taken from the input, built and
  read back (with the input's tail after them) give the same values, or the
  documented refusal of a v2 header longer than MAX_V2.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: the checkout's root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.targets import _common  # noqa: E402

with _common.instrumented(__name__, "netpool.proxy_protocol"):
    from netpool.proxy_protocol import (
        MAX_V1,
        MAX_V2,
        ProxyHeader,
        ProxyHeaderError,
        ProxyHeaderReader,
        build_v1,
        build_v2,
    )

VERSIONS = ((1, 2), (1, 2), (1,), (2,))

Outcome = tuple[Optional[ProxyHeader], int, Optional[ProxyHeaderError]]


def read(chunks: list[bytes], versions: tuple[int, ...]) -> Outcome:
    """Feed the chunks; (header, bytes taken, error)."""
    reader = ProxyHeaderReader(versions)
    taken = 0
    for chunk in chunks:
        was_done = reader.header is not None
        try:
            took = reader.feed(chunk)
        except ProxyHeaderError as exc:
            assert not was_done, "a complete reader raised"
            assert str(exc) and exc.reason == "proxy_header_invalid", repr(exc)
            return None, taken, exc
        assert 0 <= took <= len(chunk), (took, len(chunk))
        if was_done:
            assert took == 0, "took bytes after the header"
        elif reader.header is None:
            assert took == len(chunk), "a byte fed before the header completed was not taken"
        taken += took
    header = reader.header
    if header is not None:
        assert header.version in versions, header
        assert taken <= (MAX_V1 if header.version == 1 else MAX_V2), (header, taken)
        for address in (header.source, header.destination):
            if address is not None and len(address) == 2:
                assert 0 <= address[1] <= 65535, header
    return header, taken, None


def same(a: Outcome, b: Outcome) -> None:
    """The same header and count taken, or the same error (bytes taken before an error do not matter)."""
    if a[2] is None or b[2] is None:
        assert a == b, (a, b)
    else:
        assert type(a[2]) is type(b[2]) and str(a[2]) == str(b[2]), (a, b)


def rebuild(header: ProxyHeader) -> Optional[bytes]:
    """The header written back by the builders, when they can say it (TCP over IP, or LOCAL)."""
    if header.version == 1 and header.transport in ("TCP4", "TCP6"):
        assert header.source is not None and header.destination is not None
        return build_v1(header.source, header.destination)
    if header.version == 2 and header.command == "LOCAL":
        return build_v2(None, None, header.tlvs, local=True)
    if header.version == 2 and header.transport in ("TCP4", "TCP6"):
        return build_v2(header.source, header.destination, header.tlvs)
    return None


def address(raw: bytes, six: bool) -> str:
    return str(ipaddress.IPv6Address(raw[:16].ljust(16, b"\0")) if six else ipaddress.IPv4Address(raw[:4].ljust(4, b"\0")))


def built_from(stream: bytes, seed: int) -> None:
    """Fields taken from the input, built, then read back with the input's tail behind the header."""
    six = bool(seed & 0x10)
    size = 16 if six else 4
    fields = stream[:2 * size + 4].ljust(2 * size + 4, b"\0")
    src_port, dst_port = struct.unpack_from(">HH", fields, 2 * size)
    src = (address(fields[:size], six), src_port)
    dst = (address(fields[size:2 * size], six), dst_port)
    rest = stream[2 * size + 4:]
    tlvs = []
    while len(rest) >= 2 and len(tlvs) < 8:  # kind, length (one byte here), value
        kind, length = rest[0], rest[1]
        tlvs.append((kind, rest[2:2 + length]))
        rest = rest[2 + length:]
    local = bool(seed & 0x20)
    rest += stream[:8]  # bytes after the header (a ClientHello, a request line) must stay unread

    v1 = build_v1(src, dst)
    header, taken, error = read(_common.pieces(v1 + rest, seed), (1, 2))
    assert error is None and taken == len(v1), (v1, error)
    assert header == ProxyHeader(1, "PROXY", "TCP6" if six else "TCP4", src, dst), (header, src, dst)

    v2 = build_v2(None, None, tlvs, local=True) if local else build_v2(src, dst, tlvs)
    header, taken, error = read(_common.pieces(v2 + rest, seed), (1, 2))
    if len(v2) > MAX_V2:
        assert error is not None and "announces" in str(error), (len(v2), error)
        return
    assert error is None and taken == len(v2), (v2, error)
    assert header is not None and header.tlvs == tuple(tlvs), (header, tlvs)
    if local:
        assert header == ProxyHeader(2, "LOCAL", "UNKNOWN", tlvs=tuple(tlvs)), header
        return
    assert header.command == "PROXY" and header.transport == ("TCP6" if six else "TCP4"), header
    for got, sent in ((header.source, src), (header.destination, dst)):
        assert got is not None and ipaddress.ip_address(got[0]) == ipaddress.ip_address(sent[0]), (got, sent)
        assert got[1] == sent[1], (got, sent)


def check(data: bytes) -> None:
    seed, config, stream = _common.control(data)
    versions = VERSIONS[config & 3]
    whole = read([stream], versions)
    same(read(_common.pieces(stream, seed), versions), whole)
    header, taken, _ = whole
    if header is not None:
        # Exactly the header's bytes, as its own framing says: the CRLF, or v2's length field.
        size = stream.index(b"\r\n") + 2 if header.version == 1 else 16 + struct.unpack_from(">H", stream, 14)[0]
        assert taken == size, (taken, size)
        wire = rebuild(header)
        if wire is not None:
            again = read([wire], (1, 2))
            assert again == (header, len(wire), None), (again, header, wire)
    built_from(stream, seed)


if __name__ == "__main__":
    _common.fuzz(check)
