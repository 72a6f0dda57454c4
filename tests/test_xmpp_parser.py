"""The XMPP example's stream parser and writer, without sockets: bytes in, events out.

Every class of hostile input the parser must refuse has a test here, each
checking the stream error condition and that the refusal comes as soon as
the bytes show the problem (not when some later ``>`` would arrive).
"""

from __future__ import annotations

import base64
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netpool.examples.xmpp_stub.parser import (
    Limits,
    StanzaReceived,
    StreamClosed,
    StreamError,
    StreamOpened,
    StreamParser,
)
from netpool.examples.xmpp_stub.stanzas import element, qname
from netpool.examples.xmpp_stub.writer import escape_attribute, escape_text, serialize

STREAM = b"http://etherx.jabber.org/streams"
HEADER = (b"<stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='" + STREAM
          + b"' version='1.0' xml:lang='en'>")
DECLARATION = b"<?xml version='1.0' encoding='UTF-8'?>"

# What a client sends to log in, in order (each restart begins a new parser in
# the server; here the three streams are parsed one after another).
LOGIN = [
    DECLARATION + HEADER,
    HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
    + base64.b64encode(b"\0alice\0secret") + b"</auth>",
    HEADER + b"<iq type='set' id='bind_1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
    b"<resource>laptop</resource></bind></iq>"
    b" \n\t "  # a whitespace keepalive
    b"<presence><show>chat</show><status>caf\xc3\xa9 &amp; &#x2615; <![CDATA[<ok>]]></status></presence>"
    b"<message to='bob@localhost' type='chat' id='m1'><body>hi &lt;bob&gt;</body>"
    b"<active xmlns='http://jabber.org/protocol/chatstates'/></message>"
    b"</stream:stream>",
]


def describe(events: list) -> list:
    """Events as comparable values (elements serialised)."""
    out = []
    for event in events:
        if isinstance(event, StanzaReceived):
            out.append(("stanza", serialize(event.element)))
        elif isinstance(event, StreamOpened):
            out.append(("opened", dict(event.attributes), event.default_namespace))
        else:
            out.append(("closed",))
    return out


def feed_all(data: bytes, chunks: list[int] | None = None) -> list:
    parser = StreamParser()
    if chunks is None:
        return describe(parser.feed(data))
    events, pos = [], 0
    for size in chunks:
        events += parser.feed(data[pos:pos + size])
        pos += size
    events += parser.feed(data[pos:])
    return describe(events)


def refused(data: bytes, limits: Limits | None = None, *, prefix: bytes = b"") -> StreamError:
    """Feed ``prefix`` (must be fine) then ``data`` in one chunk; return the StreamError it raises."""
    parser = StreamParser(limits or Limits())
    parser.feed(prefix)
    with pytest.raises(StreamError) as info:
        parser.feed(data)
    return info.value


# -- a real login, whole and one byte at a time ----------------------------------------


def test_login_one_byte_at_a_time_gives_the_same_events_as_whole_chunks():
    for stream in LOGIN:
        whole = feed_all(stream)
        parser = StreamParser()
        trickled = []
        for i in range(len(stream)):
            trickled += parser.feed(stream[i:i + 1])
        assert describe(trickled) == whole
    last = feed_all(LOGIN[2])
    kinds = [event[0] for event in last]
    assert kinds == ["opened", "stanza", "stanza", "stanza", "closed"]


def test_login_events_carry_namespaces_text_and_attributes():
    parser = StreamParser()
    events = parser.feed(LOGIN[2])
    opened = events[0]
    assert opened.attributes["to"] == "localhost"
    assert opened.attributes["{http://www.w3.org/XML/1998/namespace}lang"] == "en"
    assert opened.default_namespace == "jabber:client"
    iq, presence, message = (e.element for e in events[1:4])
    assert iq.tag == "{jabber:client}iq" and iq.get("id") == "bind_1"
    assert iq.findtext("{urn:ietf:params:xml:ns:xmpp-bind}bind/{urn:ietf:params:xml:ns:xmpp-bind}resource") == "laptop"
    assert presence.findtext("{jabber:client}status") == "café & \u2615 <ok>"
    assert message.findtext("{jabber:client}body") == "hi <bob>"
    assert message.find("{http://jabber.org/protocol/chatstates}active") is not None
    assert isinstance(events[-1], StreamClosed)
    assert parser.feed(b"anything after the end is ignored") == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), max_size=60))
def test_any_split_gives_the_same_events(sizes):
    assert feed_all(LOGIN[2], sizes) == feed_all(LOGIN[2])


def test_with_and_without_xml_declaration():
    assert feed_all(DECLARATION + HEADER) == feed_all(HEADER)
    assert feed_all(b'<?xml version="1.0"?>' + HEADER)[0][0] == "opened"


def test_whitespace_keepalives_are_accepted_and_not_kept():
    limits = Limits(max_stanza_bytes=1024)
    parser = StreamParser(limits)
    parser.feed(HEADER)
    for _ in range(2000):  # far more than one stanza's worth
        assert parser.feed(b" \r\n\t") == []
    assert describe(parser.feed(b"<presence/>")) == [("stanza", b"<presence/>")]


def test_attribute_values_are_normalised_and_unescaped():
    events = StreamParser().feed(HEADER + b"<message to=\"a&apos;b@x\" id='1&#10;2\t3'/>")
    message = events[1].element
    assert message.get("to") == "a'b@x"
    assert message.get("id") == "1\n2 3"  # a literal tab becomes a space, a reference stays


def test_line_endings_are_normalised_as_xml_requires():
    events = StreamParser().feed(HEADER + b"<message id='a\r\nb'><body>one\r\ntwo\rthree&#13;</body></message>")
    message = events[1].element
    assert message.get("id") == "a b"
    assert message.findtext("{jabber:client}body") == "one\ntwo\nthree\r"  # a reference keeps its CR


# -- hostile input, class by class ------------------------------------------------------


def client_hello() -> bytes:
    """The first flight of a real TLS client, as a client sends it to the wrong port."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("data, condition", [
    pytest.param(b"<!DOCTYPE stream [<!ENTITY lol 'lol'>]>", "restricted-xml", id="doctype-first"),
    pytest.param(b"<!DOCTYPE", "restricted-xml", id="doctype-partial"),
    pytest.param(b"<!-", "restricted-xml", id="comment-partial"),
    pytest.param(b"<?xml-stylesheet href='x'?>", "restricted-xml", id="processing-instruction-first"),
    pytest.param(b"<?xml version='1.0' encoding='ISO-8859-1'?>", "unsupported-encoding", id="latin1-declaration"),
    pytest.param(b"\xff\xfe<\x00", "not-well-formed", id="utf16-bom"),
    pytest.param(b"GET / HTTP/1.1\r\n", "not-well-formed", id="http-request"),
    pytest.param(b"<html>", "invalid-namespace", id="not-a-stream"),
    pytest.param(b"<stream:stream xmlns:stream='jabber:wrong'>", "invalid-namespace", id="wrong-stream-namespace"),
    pytest.param(b"<stream:stream>", "not-well-formed", id="unbound-stream-prefix"),
])
def test_refused_before_the_stream_opens(data, condition):
    assert refused(data).condition == condition


@pytest.mark.parametrize("data, condition", [
    pytest.param(b"<!-- a comment -->", "restricted-xml", id="comment"),
    pytest.param(b"<message><!-", "restricted-xml", id="comment-in-stanza-partial"),
    pytest.param(b"<!DOCTYPE x>", "restricted-xml", id="doctype-in-stream"),
    pytest.param(b"<?xml version='1.0'?>", "restricted-xml", id="declaration-in-stream"),
    pytest.param(b"<message><?php", "restricted-xml", id="processing-instruction"),
    pytest.param(b"<message><body>&xxe;</body></message>", "restricted-xml", id="external-entity"),
    pytest.param(b"<message to='&lol9;'/>", "restricted-xml", id="entity-in-attribute"),
    pytest.param(b"<message><body>fish & chips</body></message>", "not-well-formed", id="bare-ampersand"),
    pytest.param(b"<message><body>&#0;</body></message>", "not-well-formed", id="nul-reference"),
    pytest.param(b"<message><body>&#xD800;</body></message>", "not-well-formed", id="surrogate-reference"),
    pytest.param(b"<message><body>\x00</body>", "not-well-formed", id="nul-byte"),
    pytest.param(b"<message><body>\x1b[31m", "not-well-formed", id="escape-byte"),
    pytest.param(b"<message><body>\xc0\xaf", "not-well-formed", id="overlong-utf8"),
    pytest.param(b"<message><body>\xed\xa0\x80", "not-well-formed", id="encoded-surrogate"),
    pytest.param(b"<message><body>\xef\xbf\xbe", "not-well-formed", id="noncharacter-fffe"),
    pytest.param(b"<message><body>\x80", "not-well-formed", id="stray-continuation-byte"),
    pytest.param(b"hello", "not-well-formed", id="text-between-stanzas"),
    pytest.param(b"<![CDATA[x]]>", "not-well-formed", id="cdata-between-stanzas"),
    pytest.param(b"<message></presence>", "not-well-formed", id="mismatched-end-tag"),
    pytest.param(b"<a:message>", "not-well-formed", id="unbound-prefix"),
    pytest.param(b"<message to='a<b'/>", "not-well-formed", id="lt-in-attribute"),
    pytest.param(b"<message <", "not-well-formed", id="lt-in-tag"),
    pytest.param(b"<message to='a' to='b'/>", "not-well-formed", id="duplicate-attribute"),
    pytest.param(b"<message to=a/>", "not-well-formed", id="unquoted-attribute"),
    pytest.param(b"<message xmlns:xml='urn:evil'/>", "not-well-formed", id="rebinding-xml-prefix"),
    pytest.param(b"<message><body>]]></body></message>", "not-well-formed", id="cdata-end-in-text"),
    pytest.param(b"< message/>", "not-well-formed", id="space-after-lt"),
])
def test_refused_inside_the_stream(data, condition):
    assert refused(data, prefix=HEADER).condition == condition


def test_a_tls_client_hello_is_refused_on_its_first_chunk():
    hello = client_hello()
    assert hello[:1] == b"\x16"  # a TLS handshake record
    error = refused(hello)
    assert error.condition == "not-well-formed"
    # Even its first five bytes alone are enough: no waiting for more.
    assert refused(hello[:5]).condition == "not-well-formed"


def test_billion_laughs_is_refused_at_the_doctype():
    bomb = (b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
            + b"".join(b"<!ENTITY lol%d '&lol%d;&lol%d;'>" % (i, i - 1, i - 1) for i in range(1, 10))
            + b"]>" + HEADER + b"<message><body>&lol9;</body></message>")
    parser = StreamParser()
    with pytest.raises(StreamError) as info:
        for i in range(len(bomb)):
            parser.feed(bomb[i:i + 1])
    assert info.value.condition == "restricted-xml"
    assert i < len(b"<?xml version='1.0'?><!D")  # at the doctype's first bytes


def test_a_dead_parser_keeps_refusing():
    parser = StreamParser()
    with pytest.raises(StreamError) as first:
        parser.feed(b"\x16\x03\x01")
    with pytest.raises(StreamError) as again:
        parser.feed(HEADER)
    assert again.value is first.value


# -- limits, enforced before anything is built -------------------------------------------


def test_stanza_size_limit_is_hit_while_the_stanza_is_still_arriving():
    limits = Limits(max_stanza_bytes=512)
    parser = StreamParser(limits)
    parser.feed(HEADER)
    parser.feed(b"<message><body>")
    with pytest.raises(StreamError) as info:
        for _ in range(100):  # never closed: the limit must trip on pending bytes
            parser.feed(b"x" * 50)
    assert info.value.condition == "policy-violation"
    assert "512" in info.value.text


def test_stanza_size_counts_the_whole_stanza_not_each_piece():
    limits = Limits(max_stanza_bytes=200)
    ok = b"<message>" + b"<b>xx</b>" * 15 + b"</message>"
    assert len(ok) < 200
    parser = StreamParser(limits)
    parser.feed(HEADER)
    assert len(parser.feed(ok * 3)) == 3  # several small stanzas in one chunk are fine
    with pytest.raises(StreamError) as info:
        parser.feed(b"<message>" + b"<b>xx</b>" * 30 + b"</message>")
    assert info.value.condition == "policy-violation"


def test_an_unterminated_tag_cannot_grow_past_the_limit():
    limits = Limits(max_stanza_bytes=300)
    with pytest.raises(StreamError) as info:
        parser = StreamParser(limits)
        parser.feed(HEADER + b"<message to='")
        for _ in range(100):
            parser.feed(b"a" * 10)
    assert info.value.condition == "policy-violation"


def test_depth_limit():
    limits = Limits(max_depth=5)
    parser = StreamParser(limits)
    parser.feed(HEADER)
    assert len(parser.feed(b"<a><b><c><d><e/></d></c></b></a>")) == 1  # depth 5 is allowed
    error = refused(b"<a><b><c><d><e><f>", limits, prefix=HEADER)
    assert error.condition == "policy-violation" and "5 deep" in error.text


def test_attribute_count_limit():
    limits = Limits(max_attributes=6)  # the stream header has five
    many = b"<message a='1' b='2' c='3' d='4' e='5' f='6' g='7'/>"
    assert refused(many, limits, prefix=HEADER).condition == "policy-violation"
    parser = StreamParser(limits)
    parser.feed(HEADER)
    assert len(parser.feed(b"<message a='1' b='2' c='3' d='4' e='5' f='6'/>")) == 1


def test_header_size_limit_is_hit_before_the_header_ends():
    limits = Limits(max_header_bytes=256)
    parser = StreamParser(limits)
    parser.feed(b"<stream:stream xmlns:stream='" + STREAM + b"' to='")
    with pytest.raises(StreamError) as info:
        for _ in range(50):
            parser.feed(b"x" * 10)
    assert info.value.condition == "policy-violation"


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=0)


# -- the writer ----------------------------------------------------------------------------


def test_writer_escapes_every_attribute_and_text():
    hostile = "'\"<>&\n\t]]>"
    message = element("{jabber:client}message", {"to": hostile, "{http://www.w3.org/XML/1998/namespace}lang": "en"},
                      element("{jabber:client}body", text=hostile))
    wire = serialize(message)
    assert b"<message to='&apos;&quot;&lt;&gt;&amp;&#10;&#9;]]&gt;' xml:lang='en'>" in wire
    parser = StreamParser()
    parser.feed(HEADER)
    (event,) = parser.feed(wire)
    assert event.element.get("to") == hostile
    assert event.element.findtext("{jabber:client}body") == hostile


def test_writer_declares_namespaces_as_xmpp_peers_expect():
    stanza = element("{jabber:client}iq", {"type": "result"},
                     element(qname("urn:x", "query"), {"{urn:attr}flag": "1"}, element(qname("urn:x", "item"))),
                     element("{http://etherx.jabber.org/streams}error"))
    assert serialize(stanza) == (
        b"<iq type='result'><query xmlns='urn:x' xmlns:ns0='urn:attr' ns0:flag='1'><item/></query>"
        b"<stream:error/></iq>"
    )


def test_writer_refuses_characters_xml_cannot_carry():
    with pytest.raises(ValueError):
        escape_text("bell\x07")
    with pytest.raises(ValueError):
        escape_attribute("\ufffe")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_any_legal_text_round_trips_through_writer_and_parser(text):
    try:
        body = element("{jabber:client}body", {"id": text}, text=text)
        wire = serialize(element("{jabber:client}message", None, body))
    except ValueError:
        return  # the text holds a character XML forbids: refusing it is the point
    parser = StreamParser()
    parser.feed(HEADER)
    (event,) = parser.feed(wire)
    assert (event.element[0].text or "") == text
    assert event.element[0].get("id") == text
