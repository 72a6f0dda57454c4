"""An incremental parser for XMPP streams: bytes in, stream events out (sans-I/O).

A stream is one long XML document whose root, ``<stream:stream>``, stays
open for the whole session; each child of the root is a stanza. The parser
is fed bytes exactly as ``recv`` returned them, however they are split, and
hands back :class:`StreamOpened`, :class:`StanzaReceived` and
:class:`StreamClosed` events. It never touches a socket, so every hostile
input can be tested without one (h11's design, as netpool's framers).

XMPP allows only a restricted XML (RFC 6120 section 11) and the parser
enforces it instead of trusting a general XML library with network input:

- no DTDs, comments, processing instructions or entity references other than
  the five predefined ones (``restricted-xml``); an XML declaration is
  accepted only at the start of the stream, where clients may send one;
- invalid UTF-8 and characters XML forbids are rejected as soon as the bytes
  that carry them arrive (``not-well-formed``), so a TLS ClientHello or an
  HTTP request sent to the port fails on its first chunk instead of waiting
  for a ``>`` that never comes;
- size limits (stanza, stream header), nesting depth and attribute count are
  checked while bytes are still pending, before any element is built
  (``policy-violation``), so a peer cannot make the server hold more than one
  maximum-size stanza.

Each byte is scanned once however the input is split (the scan resumes where
it stopped), so feeding one byte at a time costs no more than one big chunk.
A stream restart (after STARTTLS or SASL) takes a fresh parser.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional, Union
from xml.etree.ElementTree import Element

__all__ = [
    "Limits",
    "StreamParser",
    "StreamError",
    "StreamOpened",
    "StanzaReceived",
    "StreamClosed",
    "Event",
    "STREAM_NS",
    "XML_NS",
]

STREAM_NS = "http://etherx.jabber.org/streams"
XML_NS = "http://www.w3.org/XML/1998/namespace"
STREAM_TAG = f"{{{STREAM_NS}}}stream"


@dataclass(frozen=True)
class Limits:
    """How much one stream may make the server hold; every limit closes with ``policy-violation``.

    The defaults fit every client we know of by a wide margin: real stanzas
    are a few KiB and a few elements deep.
    """

    max_stanza_bytes: int = 65536
    """Largest stanza, in bytes as received (XEP-0478's max-bytes)."""
    max_header_bytes: int = 4096
    """Largest stream header (or XML declaration) before the stream is open."""
    max_depth: int = 16
    """How deep elements may nest inside a stanza; the stanza itself is depth 1."""
    max_attributes: int = 32
    """Attributes on one element, namespace declarations included."""

    def __post_init__(self) -> None:
        for name in ("max_stanza_bytes", "max_header_bytes", "max_depth", "max_attributes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


class StreamError(Exception):
    """The peer broke the stream: send this RFC 6120 stream error condition and close.

    ``condition`` is the element name (``not-well-formed``, ``restricted-xml``,
    ``policy-violation``, ``invalid-namespace``, ``unsupported-encoding``);
    ``text`` says what was wrong, for the peer and the log.
    """

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(f"{condition}: {text}")
        self.condition = condition
        self.text = text


@dataclass(frozen=True)
class StreamOpened:
    """The peer's stream header arrived.

    ``attributes`` has plain names for plain attributes (``to``, ``version``)
    and ``{namespace}name`` for qualified ones (``xml:lang`` is
    ``{http://www.w3.org/XML/1998/namespace}lang``).
    """

    attributes: Mapping[str, str]
    default_namespace: str
    """The content namespace the header declared (``jabber:client`` for clients)."""


@dataclass(frozen=True)
class StanzaReceived:
    """One complete child of the stream element, as an ElementTree element in ``{ns}name`` form."""

    element: Element


@dataclass(frozen=True)
class StreamClosed:
    """The peer sent ``</stream:stream>``; the parser ignores anything after it."""


Event = Union[StreamOpened, StanzaReceived, StreamClosed]


# -- the lexical rules --------------------------------------------------------------

# XML names, slightly simplified: a letter or underscore, then letters, digits
# and . - _ (any script). A qualified name has at most one prefix.
_NCNAME = r"[^\W\d][\w.\-\u00B7\u0300-\u036F\u203F\u2040]*"
_QNAME = rf"{_NCNAME}(?::{_NCNAME})?"
_S = "[ \t\r\n]"  # XML's whitespace: nothing else counts
_NAME = re.compile(_QNAME)
_ATTRIBUTE = re.compile(rf"{_S}+({_QNAME}){_S}*={_S}*(?:\"([^\"<]*)\"|'([^'<]*)')")
_START_TAG_END = re.compile(rf"{_S}*(/?)>")
_END_TAG = re.compile(rf"</({_QNAME}){_S}*>")
_XML_DECLARATION = re.compile(
    rf"<\?xml{_S}+version{_S}*={_S}*(?:\"1\.[0-9]+\"|'1\.[0-9]+')"
    rf"(?:{_S}+encoding{_S}*={_S}*(?:\"(?P<enc1>[A-Za-z][\w.\-]*)\"|'(?P<enc2>[A-Za-z][\w.\-]*)'))?"
    rf"(?:{_S}+standalone{_S}*={_S}*(?:\"(?:yes|no)\"|'(?:yes|no)'))?{_S}*\?>"
)
# Characters XML 1.0 forbids anywhere, escaped or not (control characters,
# U+FFFE/U+FFFF). Strict UTF-8 decoding already rejects surrogates.
_FORBIDDEN_CHARACTER = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_REFERENCE = re.compile(r"&(?:(lt|gt|amp|quot|apos)|#([0-9]{1,10})|#x([0-9a-fA-F]{1,8})|(" + _QNAME + r"));|&")
_PREDEFINED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}
_TAG_DELIMITERS = re.compile(rb"[<>\"']")
_ATTRIBUTE_WHITESPACE = str.maketrans("\t\n\r", "   ")
_WHITESPACE = b" \t\r\n"
_CDATA_OPEN = b"<![CDATA["

# What the scanner is in the middle of.
_TEXT, _MARKUP, _CDATA = "text", "markup", "cdata"

_ROOT_SCOPE: Mapping[str, str] = {"xml": XML_NS, "": ""}


class _Open(NamedTuple):
    """An element whose end tag has not arrived yet."""

    qname: str
    element: Optional[Element]  # None for the stream element itself
    scope: Mapping[str, str]  # prefix -> namespace in force inside it ("" is the default namespace)


def _is_xml_character(code: int) -> bool:
    return (
        code in (0x9, 0xA, 0xD)
        or 0x20 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or 0x10000 <= code <= 0x10FFFF
    )


def _replace_reference(match: "re.Match[str]") -> str:
    name, decimal, hexadecimal, entity = match.groups()
    if name:
        return _PREDEFINED[name]
    if decimal or hexadecimal:
        code = int(decimal, 10) if decimal else int(hexadecimal, 16)
        if not _is_xml_character(code):
            raise StreamError("not-well-formed", f"character reference {match.group()} names a character XML forbids")
        return chr(code)
    if entity:
        raise StreamError("restricted-xml",
                          f"entity reference &{entity}; is not allowed: only the five predefined ones are")
    raise StreamError("not-well-formed", "a bare '&' must be written &amp;")


def _may_open_declaration(head: bytes) -> bool:
    """Whether the first bytes of a "<?" token can still become "<?xml" followed by whitespace."""
    if not b"<?xml".startswith(head[:5]):
        return False
    return len(head) < 6 or head[5] in _WHITESPACE


def _newlines(text: str) -> str:
    """XML's end-of-line handling: CR LF and a lone CR both become LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _attribute_value(raw: str) -> str:
    """Attribute-value normalisation: literal whitespace becomes spaces, then references are resolved."""
    return _unescape(_newlines(raw).translate(_ATTRIBUTE_WHITESPACE))


def _unescape(text: str) -> str:
    return _REFERENCE.sub(_replace_reference, text) if "&" in text else text


class StreamParser:
    """Parse one XMPP stream incrementally; see the module docstring for what it refuses.

    Usage::

        parser = StreamParser()
        for event in parser.feed(data):   # raises StreamError on bad input
            ...

    After a :class:`StreamError` the parser is dead (every later ``feed``
    raises the same error); after :class:`StreamClosed` it ignores further
    input. Not thread-safe: one parser belongs to one stream's thread.
    """

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._buf = bytearray()  # unconsumed input; the pending token always starts at index 0
        self._scan = 0  # where scanning resumes: bytes before it are known not to end the token
        self._mode = _TEXT
        self._quote = 0  # inside a tag: the quote byte we are inside, or 0
        self._stack: list[_Open] = []  # the stream element, then the open elements of the stanza
        self._stanza_bytes = 0  # bytes of the current stanza already consumed
        self._at_start = True  # nothing but whitespace so far: an XML declaration may come
        self._error: Optional[StreamError] = None
        self._closed = False

    @property
    def stream_open(self) -> bool:
        """Whether the stream header has arrived and the closing tag has not."""
        return bool(self._stack) and not self._closed

    def feed(self, data: bytes) -> list[Event]:
        """Take the next bytes of the stream; return the events they complete, in order.

        Raises :class:`StreamError` as soon as ``data`` shows the stream is
        bad, even if the offending token is not complete yet.
        """
        if self._error is not None:
            raise self._error
        if self._closed or not data:
            return []
        events: list[Event] = []
        try:
            self._check_characters(data)
            self._buf += data
            self._parse(events)
        except StreamError as exc:
            self._error = exc
            self._buf.clear()
            self._stack.clear()
            raise
        return events

    # -- scanning -------------------------------------------------------------------

    def _check_characters(self, data: bytes) -> None:
        # The incremental decoder holds back an incomplete sequence at the end
        # of a chunk and fails at once on a byte that can never be valid.
        try:
            text = self._decoder.decode(data)
        except UnicodeDecodeError:
            raise StreamError("not-well-formed", "the stream is not valid UTF-8") from None
        bad = _FORBIDDEN_CHARACTER.search(text)
        if bad is not None:
            raise StreamError("not-well-formed", f"character U+{ord(bad.group()):04X} is not allowed in XML")

    def _parse(self, events: list[Event]) -> None:
        buf = self._buf
        while not self._closed:
            if self._mode is _TEXT:
                lt = buf.find(b"<", self._scan)
                if lt < 0:
                    self._text(len(buf), complete=False)
                    break
                self._text(lt, complete=True)
                self._mode, self._scan, self._quote = _MARKUP, 1, 0
            elif self._mode is _MARKUP:
                if not self._markup(events):
                    break
            elif not self._cdata():
                break
        self._check_pending()

    def _text(self, end: int, *, complete: bool) -> None:
        """Character data in buf[:end]: whitespace between stanzas, or content inside one."""
        buf = self._buf
        if len(self._stack) < 2:
            # Between stanzas only whitespace may appear (whitespace keepalives).
            # It is checked and dropped on arrival, so it never accumulates.
            if buf[:end].strip(_WHITESPACE):
                where = "outside a stanza" if self._stack else "before the stream header"
                raise StreamError("not-well-formed", f"text {where}")
            del buf[:end]
            self._scan = 0
            return
        if not complete:
            self._scan = end  # keep it (an entity may be split) and count it as pending
            return
        raw = bytes(buf[:end])
        del buf[:end]
        self._scan = 0
        self._consume(end)
        if b"]]>" in raw:
            raise StreamError("not-well-formed", "']]>' must be escaped in text")
        self._append_text(_unescape(_newlines(raw.decode("utf-8"))))

    def _markup(self, events: list[Event]) -> bool:
        """Scan the tag, declaration or CDATA opener at buf[0]; process it when complete."""
        buf = self._buf
        if len(buf) < 2:
            return False
        kind = buf[1]
        if kind == 0x21:  # "<!": only CDATA is allowed; comments and DOCTYPE are not
            head = bytes(buf[: len(_CDATA_OPEN)])
            if not _CDATA_OPEN.startswith(head):
                raise StreamError("restricted-xml", "comments, DTDs and other declarations are not allowed")
            if len(head) < len(_CDATA_OPEN):
                return False
            if len(self._stack) < 2:
                raise StreamError("not-well-formed", "character data outside a stanza")
            self._mode, self._scan = _CDATA, len(_CDATA_OPEN)
            return True
        if kind == 0x3F:  # "<?": the XML declaration, at the very start only
            if not self._at_start or not _may_open_declaration(bytes(buf[:6])):
                raise StreamError("restricted-xml", "processing instructions are not allowed")
        end = self._find_tag_end()
        if end < 0:
            return False
        token = bytes(buf[:end])
        del buf[:end]
        self._mode, self._scan = _TEXT, 0
        self._token(token, events)
        return True

    def _find_tag_end(self) -> int:
        """Index just past the '>' closing the tag at buf[0], honouring quotes; -1 if not here yet."""
        buf = self._buf
        pos = self._scan
        while True:
            if self._quote:
                close = buf.find(self._quote, pos)
                if close < 0:
                    self._scan = len(buf)
                    return -1
                self._quote = 0
                pos = close + 1
                continue
            match = _TAG_DELIMITERS.search(buf, pos)
            if match is None:
                self._scan = len(buf)
                return -1
            char = buf[match.start()]
            if char == 0x3E:  # ">"
                return match.end()
            if char == 0x3C:  # "<"
                raise StreamError("not-well-formed", "'<' inside a tag")
            self._quote = char
            pos = match.end()

    def _cdata(self) -> bool:
        buf = self._buf
        start = len(_CDATA_OPEN)
        close = buf.find(b"]]>", max(start, self._scan - 2))
        if close < 0:
            self._scan = len(buf)
            return False
        text = bytes(buf[start:close]).decode("utf-8")
        del buf[: close + 3]
        self._mode, self._scan = _TEXT, 0
        self._consume(close + 3)
        self._append_text(text)
        return True

    def _check_pending(self) -> None:
        """Fail now if the incomplete token already breaks a size limit: nothing is built from it."""
        pending = len(self._buf)
        if not pending or self._closed:
            return
        if not self._stack:
            if pending > self.limits.max_header_bytes:
                raise StreamError("policy-violation", f"stream header larger than {self.limits.max_header_bytes} bytes")
        elif self._stanza_bytes + pending > self.limits.max_stanza_bytes:
            raise StreamError("policy-violation", f"stanza larger than {self.limits.max_stanza_bytes} bytes")

    def _consume(self, size: int) -> None:
        self._stanza_bytes += size
        if self._stanza_bytes > self.limits.max_stanza_bytes:
            raise StreamError("policy-violation", f"stanza larger than {self.limits.max_stanza_bytes} bytes")

    # -- tokens ---------------------------------------------------------------------

    def _token(self, token: bytes, events: list[Event]) -> None:
        self._at_start = False
        if not self._stack:
            if len(token) > self.limits.max_header_bytes:
                raise StreamError("policy-violation", f"stream header larger than {self.limits.max_header_bytes} bytes")
        else:
            self._consume(len(token))
        kind = token[1]
        if kind == 0x2F:  # "</"
            self._end_tag(token.decode("utf-8"), events)
        elif kind == 0x3F:  # "<?", allowed by _markup only at the start
            self._declaration(token.decode("utf-8"))
        else:
            self._start_tag(token.decode("utf-8"), events)

    def _declaration(self, text: str) -> None:
        match = _XML_DECLARATION.fullmatch(text)
        if match is None:
            raise StreamError("not-well-formed", "malformed XML declaration")
        encoding = match.group("enc1") or match.group("enc2")
        if encoding is not None and encoding.lower() not in ("utf-8", "utf8"):
            raise StreamError("unsupported-encoding", f"XMPP streams are UTF-8, not {encoding}")

    def _start_tag(self, text: str, events: list[Event]) -> None:
        name = _NAME.match(text, 1)
        if name is None:
            raise StreamError("not-well-formed", "malformed start tag")
        qname = name.group()
        # Inside a stanza the new element's depth is the stack's length (the
        # stream element is at the bottom); checked before anything is built.
        if len(self._stack) > self.limits.max_depth:
            raise StreamError("policy-violation", f"elements nested more than {self.limits.max_depth} deep")
        raw_attributes: list[tuple[str, str]] = []
        pos = name.end()
        while (attribute := _ATTRIBUTE.match(text, pos)) is not None:
            if len(raw_attributes) >= self.limits.max_attributes:
                raise StreamError("policy-violation", f"more than {self.limits.max_attributes} attributes on <{qname}>")
            value = attribute.group(2) if attribute.group(2) is not None else attribute.group(3)
            raw_attributes.append((attribute.group(1), value))
            pos = attribute.end()
        end = _START_TAG_END.match(text, pos)
        if end is None or end.end() != len(text):
            raise StreamError("not-well-formed", f"malformed start tag <{qname}>")
        self_closing = end.group(1) == "/"

        scope = self._scope(raw_attributes)
        tag = self._expand(qname, scope, attribute=False)
        attributes: dict[str, str] = {}
        for raw_name, raw_value in raw_attributes:
            if raw_name == "xmlns" or raw_name.startswith("xmlns:"):
                continue
            key = self._expand(raw_name, scope, attribute=True)
            if key in attributes:
                raise StreamError("not-well-formed", f"attribute {raw_name} repeated on <{qname}>")
            attributes[key] = _attribute_value(raw_value)

        if not self._stack:
            if tag != STREAM_TAG:
                raise StreamError("invalid-namespace",
                                  f"expected <stream:stream xmlns:stream='{STREAM_NS}'>, got <{qname}>")
            self._stack.append(_Open(qname, None, scope))
            events.append(StreamOpened(attributes, scope.get("", "")))
            if self_closing:
                self._close_stream(events)
            return

        element = Element(tag, attributes)
        parent = self._stack[-1].element
        if parent is not None:  # None: a new stanza, whose start tag _stanza_bytes already counts
            parent.append(element)
        if self_closing:
            if len(self._stack) == 1:
                self._stanza_done(element, events)
        else:
            self._stack.append(_Open(qname, element, scope))

    def _end_tag(self, text: str, events: list[Event]) -> None:
        match = _END_TAG.fullmatch(text)
        if match is None:
            raise StreamError("not-well-formed", "malformed end tag")
        if not self._stack:
            raise StreamError("not-well-formed", "end tag before the stream header")
        top = self._stack[-1]
        if match.group(1) != top.qname:
            raise StreamError("not-well-formed", f"</{match.group(1)}> does not close <{top.qname}>")
        self._stack.pop()
        if not self._stack:
            self._close_stream(events)
        elif len(self._stack) == 1:
            assert top.element is not None
            self._stanza_done(top.element, events)

    def _stanza_done(self, element: Element, events: list[Event]) -> None:
        events.append(StanzaReceived(element))
        self._stanza_bytes = 0

    def _close_stream(self, events: list[Event]) -> None:
        self._closed = True
        self._stack.clear()
        self._buf.clear()
        events.append(StreamClosed())

    def _append_text(self, text: str) -> None:
        if not text:
            return
        element = self._stack[-1].element
        assert element is not None
        if len(element):
            last = element[-1]
            last.tail = (last.tail or "") + text
        else:
            element.text = (element.text or "") + text

    # -- namespaces -----------------------------------------------------------------

    def _scope(self, raw_attributes: list[tuple[str, str]]) -> Mapping[str, str]:
        """The prefix map inside this element: the parent's, plus its own declarations."""
        parent = self._stack[-1].scope if self._stack else _ROOT_SCOPE
        declarations = [(n, v) for n, v in raw_attributes if n == "xmlns" or n.startswith("xmlns:")]
        if not declarations:
            return parent
        scope = dict(parent)
        for name, raw_value in declarations:
            uri = _attribute_value(raw_value)
            if name == "xmlns":
                scope[""] = uri
                continue
            prefix = name[len("xmlns:"):]
            if prefix == "xmlns" or (prefix == "xml") != (uri == XML_NS):
                raise StreamError("not-well-formed",
                                  f"the reserved prefix or namespace in {name}='{uri}' cannot be bound")
            if not uri:
                raise StreamError("not-well-formed", f"prefix {prefix} cannot be bound to an empty namespace")
            scope[prefix] = uri
        return scope

    @staticmethod
    def _expand(qname: str, scope: Mapping[str, str], *, attribute: bool) -> str:
        """``prefix:name`` -> ``{namespace}name``; unprefixed attributes have no namespace."""
        prefix, colon, local = qname.rpartition(":")
        if not colon:
            namespace = "" if attribute else scope.get("", "")
        else:
            found = scope.get(prefix)
            if found is None or prefix == "":
                raise StreamError("not-well-formed", f"namespace prefix {prefix!r} is not declared")
            namespace = found
        return f"{{{namespace}}}{local}" if namespace else local
