"""The XML the server itself says: namespaces, the stream header, features, errors and replies.

Everything here builds elements (or, for the stream's own framing, bytes)
through :mod:`writer`, so escaping happens in exactly one place.
"""

from __future__ import annotations

from typing import Optional
from xml.etree.ElementTree import Element, SubElement

from .parser import STREAM_NS, XML_NS
from .writer import CLIENT_NS, escape_attribute, serialize

__all__ = [
    "CLIENT_NS", "STREAM_NS", "XML_NS", "TLS_NS", "SASL_NS", "BIND_NS", "SESSION_NS", "STANZA_ERRORS_NS",
    "STREAM_ERRORS_NS", "ROSTER_NS", "DISCO_INFO_NS", "DISCO_ITEMS_NS", "PING_NS", "LIMITS_NS",
    "IQ", "MESSAGE", "PRESENCE", "qname", "element", "stream_header", "stream_error", "STREAM_END",
    "stanza_error", "iq_result", "STREAM_ERROR_CONDITIONS", "STANZA_ERROR_TYPES",
]

TLS_NS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL_NS = "urn:ietf:params:xml:ns:xmpp-sasl"
BIND_NS = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION_NS = "urn:ietf:params:xml:ns:xmpp-session"
STREAM_ERRORS_NS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZA_ERRORS_NS = "urn:ietf:params:xml:ns:xmpp-stanzas"
ROSTER_NS = "jabber:iq:roster"
DISCO_INFO_NS = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS_NS = "http://jabber.org/protocol/disco#items"
PING_NS = "urn:xmpp:ping"
LIMITS_NS = "urn:xmpp:stream-limits:0"  # XEP-0478: tells clients the limits before they hit them


def qname(namespace: str, name: str) -> str:
    """``{namespace}name``, the form ElementTree and the parser use."""
    return f"{{{namespace}}}{name}"


IQ = qname(CLIENT_NS, "iq")
MESSAGE = qname(CLIENT_NS, "message")
PRESENCE = qname(CLIENT_NS, "presence")

# RFC 6120 section 4.9.3: the stream errors this server sends.
STREAM_ERROR_CONDITIONS = frozenset({
    "bad-format", "connection-timeout", "host-unknown", "internal-server-error", "invalid-namespace",
    "not-authorized", "not-well-formed", "policy-violation", "resource-constraint", "restricted-xml",
    "system-shutdown", "unsupported-encoding", "unsupported-stanza-type", "unsupported-version",
})

# RFC 6120 section 8.3.3: the error type that goes with each stanza error condition.
STANZA_ERROR_TYPES = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "remote-server-not-found": "cancel",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
}


def element(tag: str, attributes: Optional[dict[str, str]] = None, *children: Element,
            text: Optional[str] = None) -> Element:
    """Build an element in one expression: ``element(qname(NS, "x"), {"a": "1"}, child, text="...")``."""
    node = Element(tag, attributes or {})
    node.extend(children)
    if text is not None:
        node.text = text
    return node


# -- the stream's own framing ---------------------------------------------------------


def stream_header(domain: str, stream_id: str, lang: str = "en") -> bytes:
    """Our opening tag for one stream (sent again after every restart, with a new id)."""
    return (
        f"<?xml version='1.0'?><stream:stream xmlns='{CLIENT_NS}' xmlns:stream='{STREAM_NS}'"
        f" id='{escape_attribute(stream_id)}' from='{escape_attribute(domain)}' version='1.0'"
        f" xml:lang='{escape_attribute(lang)}'>"
    ).encode("utf-8")


STREAM_END = b"</stream:stream>"


def stream_error(condition: str, text: Optional[str] = None) -> bytes:
    """``<stream:error>`` with its condition and an optional explanation (the stream end is separate)."""
    if condition not in STREAM_ERROR_CONDITIONS:
        raise ValueError(f"not a stream error condition this server sends: {condition!r}")
    error = element(qname(STREAM_NS, "error"), None, element(qname(STREAM_ERRORS_NS, condition)))
    if text:
        error.append(element(qname(STREAM_ERRORS_NS, "text"), {qname(XML_NS, "lang"): "en"}, text=text))
    return serialize(error)


# -- stanza replies -------------------------------------------------------------------


def stanza_error(stanza: Element, condition: str, text: Optional[str] = None) -> Element:
    """The error reply to ``stanza``: same kind and id, addresses swapped (RFC 6120 section 8.3)."""
    reply = Element(stanza.tag, {"type": "error"})
    if stanza.get("id") is not None:
        reply.set("id", stanza.get("id", ""))
    if stanza.get("to"):
        reply.set("from", stanza.get("to", ""))
    if stanza.get("from"):
        reply.set("to", stanza.get("from", ""))
    error = SubElement(reply, qname(CLIENT_NS, "error"), {"type": STANZA_ERROR_TYPES[condition]})
    SubElement(error, qname(STANZA_ERRORS_NS, condition))
    if text:
        SubElement(error, qname(STANZA_ERRORS_NS, "text"), {qname(XML_NS, "lang"): "en"}).text = text
    return reply


def iq_result(iq: Element, payload: Optional[Element] = None) -> Element:
    """The result reply to an iq get/set, from the address it was sent to."""
    reply = Element(IQ, {"type": "result", "id": iq.get("id", "")})
    if iq.get("to"):
        reply.set("from", iq.get("to", ""))
    if iq.get("from"):
        reply.set("to", iq.get("from", ""))
    if payload is not None:
        reply.append(payload)
    return reply
