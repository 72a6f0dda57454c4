"""The PROXY protocol reader without sockets: v1 and v2, any split, hostile bytes."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netpool.proxy_protocol import (
    MAX_V1,
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyHeaderReader,
    build_v1,
    build_v2,
    parse_networks,
)

ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
# Written as inet_ntop writes them (as a socket's peer address is); random
# bytes alone would almost never give an IPv4-mapped or IPv4-compatible one.
ipv6 = st.one_of(
    st.binary(min_size=16, max_size=16),
    st.binary(min_size=4, max_size=4).map(lambda b: bytes(10) + b"\xff\xff" + b),
    st.binary(min_size=4, max_size=4).map(lambda b: bytes(12) + b),
).map(lambda b: socket.inet_ntop(socket.AF_INET6, b))
ports = st.integers(0, 65535)


def feed_split(reader: ProxyHeaderReader, data: bytes, cuts: list[int]) -> int:
    taken = 0
    start = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]:
        taken += reader.feed(data[start:cut])
        start = cut
    return taken


@settings(max_examples=300, deadline=None)
@given(family=st.sampled_from([4, 6]), data=st.data(), version=st.sampled_from([1, 2]),
       rest=st.binary(max_size=50), cuts=st.lists(st.integers(0, 300), max_size=20))
def test_any_split_reads_the_same_header_and_takes_no_byte_more(family, data, version, rest, cuts):
    addr = ipv4 if family == 4 else ipv6
    src, dst = (data.draw(addr), data.draw(ports)), (data.draw(addr), data.draw(ports))
    header = build_v1(src, dst) if version == 1 else build_v2(src, dst, [(0x01, b"h2"), (0xE0, b"x" * 5)])
    reader = ProxyHeaderReader()
    assert feed_split(reader, header + rest, cuts) == len(header)
    got = reader.header
    assert got is not None and got.version == version and got.command == "PROXY"
    assert got.source == src and got.destination == dst
    if version == 2:
        assert got.tlvs == ((0x01, b"h2"), (0xE0, b"xxxxx"))


@pytest.mark.parametrize("written", ["::ffff:192.0.2.7", "::FFFF:c000:207", "0:0:0:0:0:ffff:192.0.2.7"])
def test_an_ipv4_mapped_source_reads_the_same_in_v1_and_v2_and_as_a_socket_gives_it(written):
    """However v1 spells the address, both versions give the socket layer's form, so one peer has one name."""
    as_socket = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, written))
    assert as_socket == "::ffff:192.0.2.7"
    headers = []
    for data in (f"PROXY TCP6 {written} ::1 5000 443\r\n".encode(),
                 build_v2((written, 5000), ("::1", 443))):
        reader = ProxyHeaderReader()
        assert reader.feed(data) == len(data)
        headers.append(reader.header)
    assert [h.source for h in headers] == [(as_socket, 5000)] * 2
    assert [h.destination for h in headers] == [("::1", 443)] * 2


@settings(max_examples=500, deadline=None)
@given(junk=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=10))
def test_random_bytes_never_crash_and_never_overread(junk, cuts):
    """Fuzz: arbitrary input either yields a header, waits for more, or fails with ProxyHeaderError."""
    reader = ProxyHeaderReader()
    try:
        taken = feed_split(reader, junk, cuts)
    except ProxyHeaderError:
        return
    assert taken <= len(junk)
    if reader.header is None:
        assert taken == len(junk), "until the header completes, every byte fed is header"


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), ver_cmd=st.integers(0, 255), fam=st.integers(0, 255))
def test_fuzzed_v2_headers_fail_cleanly(body, ver_cmd, fam):
    data = V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack(">H", len(body)) + body
    reader = ProxyHeaderReader()
    try:
        assert reader.feed(data) == len(data)
    except ProxyHeaderError:
        return
    assert reader.header is not None


def test_v1_unknown_and_local_v2_keep_no_address():
    reader = ProxyHeaderReader()
    reader.feed(b"PROXY UNKNOWN\r\n")
    assert reader.header.transport == "UNKNOWN" and reader.header.source is None
    reader = ProxyHeaderReader()
    reader.feed(build_v2(None, None, local=True))
    assert reader.header.command == "LOCAL" and reader.header.source is None


@pytest.mark.parametrize("line, message", [
    (b"GET / HTTP/1.1\r\n", "did not start with a PROXY"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", "malformed"),
    (b"PROXY TCP4 1.2.3.999 5.6.7.8 80 81\r\n", "bad address"),
    (b"PROXY TCP4 ::1 5.6.7.8 80 81\r\n", "bad IPv4 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n", "bad port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 81\r\n", "bad port"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 80 81\r\n", "malformed"),
    (b"PROXY " + b"9" * MAX_V1, "longer than"),
    (b"\x16\x03\x01\x02\x00\x01", "did not start with a PROXY"),  # a TLS ClientHello
])
def test_bad_v1_input_is_rejected_with_a_reason(line, message):
    with pytest.raises(ProxyHeaderError, match=message) as info:
        ProxyHeaderReader().feed(line)
    assert info.value.reason == "proxy_header_invalid"


def test_versions_can_be_restricted():
    with pytest.raises(ProxyHeaderError, match="v2 header"):
        ProxyHeaderReader(versions=(2,)).feed(build_v1(("1.1.1.1", 1), ("2.2.2.2", 2)))
    with pytest.raises(ProxyHeaderError, match="v1 header"):
        ProxyHeaderReader(versions=(1,)).feed(build_v2(("1.1.1.1", 1), ("2.2.2.2", 2)))


def test_oversized_v2_is_refused_before_its_body_arrives():
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError, match="announces 60000 bytes"):
        reader.feed(V2_SIGNATURE + b"\x21\x11" + struct.pack(">H", 60000))


def test_trusted_networks_parse_and_name_a_bad_entry():
    assert [str(n) for n in parse_networks(["10.0.0.0/8", "::1"])] == ["10.0.0.0/8", "::1/128"]
    with pytest.raises(ValueError, match="'nope' is not an IP network"):
        parse_networks(["nope"])
