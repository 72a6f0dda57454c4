"""Framers without sockets: bytes in, messages out, limits enforced."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netpool import FramingError, LengthPrefixFramer, LineFramer, MessageTooLarge, RawFramer
from netpool.framing import framer_factory


def feed_in_pieces(framer, stream: bytes, cuts: list[int]) -> list[bytes]:
    """Feed ``stream`` cut at the given offsets, then EOF; collect every message."""
    out: list[bytes] = []
    start = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(stream))) + [len(stream)]:
        out.extend(framer.feed(stream[start:cut]))
        start = cut
    out.extend(framer.eof())
    return out


lines = st.lists(st.binary(max_size=50).map(lambda b: b.replace(b"\n", b"").rstrip(b"\r")), max_size=30)
payloads = st.lists(st.binary(max_size=200), max_size=30)
cuts = st.lists(st.integers(min_value=0, max_value=6000), max_size=40)


@settings(max_examples=300, deadline=None)
@given(messages=lines, cuts=cuts, crlf=st.booleans())
def test_line_framer_any_split_gives_same_lines(messages, cuts, crlf):
    """However TCP cuts the stream, the same lines come out, in order."""
    sep = b"\r\n" if crlf else b"\n"
    stream = b"".join(m + sep for m in messages)
    assert feed_in_pieces(LineFramer(1000), stream, cuts) == messages


@settings(max_examples=300, deadline=None)
@given(messages=payloads, cuts=cuts)
def test_length_framer_any_split_gives_same_messages(messages, cuts):
    framer = LengthPrefixFramer(1000)
    stream = b"".join(framer.encode(m) for m in messages)
    assert feed_in_pieces(LengthPrefixFramer(1000), stream, cuts) == messages


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=3000), cuts=cuts)
def test_raw_framer_delivers_every_byte_in_order(stream, cuts):
    assert b"".join(feed_in_pieces(RawFramer(1 << 16), stream, cuts)) == stream


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=2000), cuts=cuts)
def test_line_framer_random_bytes_never_crash_or_exceed_limit(stream, cuts):
    """Arbitrary input either yields lines within the limit or raises MessageTooLarge."""
    framer = LineFramer(64)
    try:
        out = feed_in_pieces(framer, stream, cuts)
    except MessageTooLarge:
        return
    assert all(len(m) <= 64 for m in out)


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=2000), cuts=cuts)
def test_length_framer_random_bytes_fail_cleanly(stream, cuts):
    framer = LengthPrefixFramer(64)
    try:
        out = feed_in_pieces(framer, stream, cuts)
    except FramingError:  # MessageTooLarge included
        return
    assert all(len(m) <= 64 for m in out)


def test_line_framer_strips_terminators_and_encodes_newline():
    framer = LineFramer(100)
    assert framer.feed(b"a\r\nb\nc") == [b"a", b"b"]
    assert framer.feed(b"d\n") == [b"cd"]
    assert framer.encode(b"x") == b"x\n"


def test_line_framer_delivers_unterminated_last_line_at_eof():
    framer = LineFramer(100)
    assert framer.feed(b"hello") == []
    assert framer.eof() == [b"hello"]
    assert framer.eof() == []


def test_line_framer_rejects_long_line_before_newline_arrives():
    """A line over the limit fails as soon as the limit is passed, not at the newline."""
    framer = LineFramer(10)
    assert framer.feed(b"0123456789") == []
    with pytest.raises(MessageTooLarge, match="max_message_size=10"):
        framer.feed(b"x")


def test_line_framer_limit_counts_line_without_terminator():
    framer = LineFramer(3)
    assert framer.feed(b"abc\r\n") == [b"abc"]
    with pytest.raises(MessageTooLarge):
        framer.feed(b"abcd\n")


def test_length_framer_rejects_oversized_header_before_body():
    framer = LengthPrefixFramer(100)
    with pytest.raises(MessageTooLarge, match="announces 101 bytes"):
        framer.feed(struct.pack(">I", 101))


def test_length_framer_truncated_frame_at_eof_is_an_error():
    framer = LengthPrefixFramer(100)
    assert framer.feed(struct.pack(">I", 5) + b"ab") == []
    with pytest.raises(FramingError, match="inside a frame"):
        framer.eof()


def test_length_framer_zero_length_message():
    framer = LengthPrefixFramer(10)
    assert framer.feed(framer.encode(b"") + framer.encode(b"x")) == [b"", b"x"]


def test_framer_factory_resolves_names_and_passes_callables():
    assert framer_factory("line") is LineFramer
    custom = lambda size: RawFramer(size)  # noqa: E731
    assert framer_factory(custom) is custom
    with pytest.raises(FramingError, match="unknown framing"):
        framer_factory("xml")
