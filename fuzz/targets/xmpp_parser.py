"""The XMPP example's StreamParser: only its events or a StreamError, whatever the cut; limits hold.

Properties, for every input (see _common for the control bytes; the config
byte picks the Limits):

- only StreamOpened, StanzaReceived and StreamClosed come out, in that
  grammar (one opening first, a close last), or a StreamError with a
  documented condition and a text; a dead parser raises the same error
  again; any other exception is a bug;
- chunking changes nothing but when things are seen: cut by the seed, the
  events delivered before a failing feed are exactly what the bytes before
  that feed give when fed whole, and those bytes plus the failing feed's,
  fed whole, fail with the same condition and text; a stream that parses
  whole parses the same way cut;
- limits hold for everything delivered: depth, attributes per element and,
  when fed one byte at a time (so each event's last byte is known), each
  stanza's and the header's size in bytes as received;
- each stanza written back by the example's writer reads back the same.

The parser raises as soon as a chunk holds a byte that is not UTF-8 or not
an XML character, before the chunk is parsed; so a chunk holding
``</stream:stream>`` and such a byte after it fails whole, while cut just
after the close the byte is ignored. The check accepts that difference (it
is how the module documents early rejection) and only that one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from xml.etree.ElementTree import Element

if __package__ in (None, ""):  # run as a script: the checkout's root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fuzz.targets import _common  # noqa: E402

with _common.instrumented(__name__, "netpool.examples.xmpp_stub.parser"):
    from netpool.examples.xmpp_stub.parser import (
        Limits,
        StanzaReceived,
        StreamClosed,
        StreamError,
        StreamOpened,
        StreamParser,
    )
    from netpool.examples.xmpp_stub.writer import serialize

CONDITIONS = {"not-well-formed", "restricted-xml", "policy-violation", "invalid-namespace", "unsupported-encoding"}
CHARACTER_ERRORS = ("the stream is not valid UTF-8", "character U+")
# A header binding the prefixes the writer relies on (stream:, the jabber:client default).
HEADER = (b"<stream:stream to='localhost' xmlns='jabber:client' "
          b"xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")
WHITESPACE = b" \t\r\n"


def limits_for(config: int) -> Limits:
    return Limits(
        max_stanza_bytes=(65536, 40, 200, 1000)[config & 3],
        max_header_bytes=(4096, 100)[config >> 2 & 1],
        max_depth=(16, 1, 3, 5)[config >> 3 & 3],
        max_attributes=(32, 1, 6, 2)[config >> 5 & 3],
    )


def shape(element: Element) -> tuple[Any, ...]:
    return (element.tag, tuple(element.attrib.items()), element.text, element.tail, tuple(map(shape, element)))


def describe(event: object) -> tuple[Any, ...]:
    if isinstance(event, StanzaReceived):
        return ("stanza", shape(event.element))
    if isinstance(event, StreamOpened):
        return ("opened", tuple(event.attributes.items()), event.default_namespace)
    assert isinstance(event, StreamClosed), f"not a documented event: {event!r}"
    return ("closed",)


@dataclass
class Run:
    events: list[tuple[Any, ...]] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # bytes fed when each event came out
    error: Optional[StreamError] = None
    fed: int = 0  # bytes fed before the failing feed, or all of them
    failing: int = 0  # the failing feed's length
    elements: list[Element] = field(default_factory=list)


def run(chunks: list[bytes], limits: Limits) -> Run:
    parser = StreamParser(limits)
    out = Run()
    for chunk in chunks:
        try:
            new = parser.feed(chunk)
        except StreamError as exc:
            assert exc.condition in CONDITIONS and exc.text and str(exc) == f"{exc.condition}: {exc.text}", repr(exc)
            try:
                parser.feed(b" ")
            except StreamError as again:
                assert again is exc, "a dead parser raised another error"
            else:
                raise AssertionError("a dead parser accepted more input")
            out.error, out.failing = exc, len(chunk)
            return out
        out.fed += len(chunk)
        for event in new:
            if out.events and out.events[-1][0] == "closed":
                raise AssertionError("an event after StreamClosed")
            described = describe(event)
            if described[0] == "opened":
                assert not out.events, "a second StreamOpened, or one after stanzas"
                assert parser.stream_open or isinstance(new[-1], StreamClosed)
            else:
                assert out.events, f"{described[0]} before StreamOpened"
            if isinstance(event, StanzaReceived):
                out.elements.append(event.element)
            out.events.append(described)
            out.ends.append(out.fed)
    return out


def within_limits(element: Element, limits: Limits, depth: int = 1) -> None:
    assert depth <= limits.max_depth, f"element at depth {depth} passed max_depth={limits.max_depth}"
    assert len(element.attrib) <= limits.max_attributes, element.attrib
    for child in element:
        within_limits(child, limits, depth + 1)


def sizes_hold(stream: bytes, result: Run, limits: Limits) -> None:
    """Fed one byte at a time, each event ends at a known byte: check the bytes each one took."""
    start = 0
    for event, end in zip(result.events, result.ends):
        raw = stream[start:end].lstrip(WHITESPACE)
        if event[0] == "stanza":
            assert len(raw) <= limits.max_stanza_bytes, f"a stanza of {len(raw)} bytes passed the limit"
        elif event[0] == "opened":
            if raw.startswith(b"<?"):
                declaration, _, raw = raw.partition(b"?>")
                assert len(declaration) + 2 <= limits.max_header_bytes, "XML declaration over the header limit"
                raw = raw.lstrip(WHITESPACE)
            assert len(raw) <= limits.max_header_bytes, f"a header of {len(raw)} bytes passed the limit"
        start = end


def written_back(elements: list[Element]) -> None:
    """Each stanza serialised by the writer and parsed again is the same stanza."""
    for element in elements:
        wire = serialize(element)
        parser = StreamParser()
        events = parser.feed(HEADER + wire)
        assert len(events) == 2 and isinstance(events[1], StanzaReceived), (wire, events)
        assert serialize(events[1].element) == wire, (wire, serialize(events[1].element))


def check(data: bytes) -> None:
    seed, config, stream = _common.control(data)
    limits = limits_for(config)
    chunks = _common.pieces(stream, seed)
    whole = run([stream], limits)
    cut = run(chunks, limits)

    if cut.error is None:
        if whole.error is None:
            assert cut.events == whole.events, (cut.events, whole.events)
        else:
            # Only a bad byte after the close, in the same chunk, may fail the whole feed.
            assert cut.events and cut.events[-1][0] == "closed", (whole.error, cut.events)
            assert whole.error.text.startswith(CHARACTER_ERRORS), whole.error
            closed_at = cut.ends[-1]
            before = run([stream[:closed_at]], limits)
            assert before.error is None and before.events == cut.events, (before.events, cut.events)
    else:
        assert whole.error is not None, f"cut fails with {cut.error!r}, whole parses"
        before = run([stream[:cut.fed]], limits)
        assert before.error is None, f"the bytes before the failing feed fail whole: {before.error!r}"
        assert before.events == cut.events, (before.events, cut.events)
        through = run([stream[:cut.fed + cut.failing]], limits)
        assert through.error is not None, "the bytes through the failing feed parse whole"
        assert (through.error.condition, through.error.text) == (cut.error.condition, cut.error.text), (
            through.error, cut.error)

    for result in (whole, cut):
        for element in result.elements:
            within_limits(element, limits)
        for event in result.events:
            if event[0] == "opened":
                assert len(event[1]) <= limits.max_attributes, event
    if all(len(chunk) <= 1 for chunk in chunks):
        sizes_hold(stream, cut, limits)
    written_back(cut.elements)



if __name__ == "__main__":
    _common.fuzz(check)
