"""Serialising elements for the wire: every attribute value and every text node escaped.

The parser hands stanzas over as ElementTree elements with ``{namespace}name``
tags; this module writes them back the way XMPP peers expect: the content
namespace (``jabber:client``) as an inherited default, ``stream:`` for the
stream namespace (bound by our stream header), ``xml:lang`` as is. The
standard library's ``tostring`` would invent ``ns0:`` prefixes instead, which
XMPP clients accept in theory and mishandle in practice.

Text comes from the network (a routed message body, a resource name) or from
our code; either way it is escaped here, at the last moment, so no caller can
forget. A character XML forbids is a bug (the parser refuses them on input),
so it raises instead of being sent.
"""

from __future__ import annotations

import re
from xml.etree.ElementTree import Element

from .parser import STREAM_NS, XML_NS

__all__ = ["escape_text", "escape_attribute", "serialize", "CLIENT_NS"]

CLIENT_NS = "jabber:client"

_FORBIDDEN_CHARACTER = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# CR as a reference: a receiving parser would turn a literal one into LF.
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
# Quotes for the delimiter, and tab/newline/CR as references so a receiving
# parser's attribute normalisation does not turn them into spaces.
_ATTRIBUTE_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}
)


def _check(value: str) -> str:
    bad = _FORBIDDEN_CHARACTER.search(value)
    if bad is not None:
        raise ValueError(f"character U+{ord(bad.group()):04X} cannot be sent in XML")
    return value


def escape_text(value: str) -> str:
    """Escape character data: ``&``, ``<``, ``>`` (and CR, which parsers would turn into LF)."""
    return _check(value).translate(_TEXT_ESCAPES)


def escape_attribute(value: str) -> str:
    """Escape an attribute value for single or double quotes."""
    return _check(value).translate(_ATTRIBUTE_ESCAPES)


def _split(name: str) -> tuple[str, str]:
    if name[:1] == "{":
        # The last "}": a namespace may contain one (the parser allows it), a local name may not;
        # splitting at the first would write the rest of a peer's namespace as raw markup.
        namespace, _, local = name[1:].rpartition("}")
        return namespace, local
    return "", name


def _write(element: Element, inherited: str, out: list[str]) -> None:
    namespace, local = _split(element.tag)
    attributes: list[tuple[str, str]] = []
    if namespace == STREAM_NS:
        name = f"stream:{local}"  # our stream header binds the prefix
        inner = inherited
    else:
        name = local
        if namespace != inherited:
            attributes.append(("xmlns", namespace))
        inner = namespace
    generated = 0
    for key, value in element.attrib.items():
        attribute_ns, attribute_name = _split(key)
        if not attribute_ns:
            attributes.append((attribute_name, value))
        elif attribute_ns == XML_NS:
            attributes.append((f"xml:{attribute_name}", value))
        else:
            prefix = f"ns{generated}"
            generated += 1
            attributes.append((f"xmlns:{prefix}", attribute_ns))
            attributes.append((f"{prefix}:{attribute_name}", value))
    out.append("<" + name)
    for key, value in attributes:
        out.append(f" {key}='{escape_attribute(value)}'")
    if not len(element) and not element.text:
        out.append("/>")
        return
    out.append(">")
    if element.text:
        out.append(escape_text(element.text))
    for child in element:
        _write(child, inner, out)
        if child.tail:
            out.append(escape_text(child.tail))
    out.append(f"</{name}>")


def serialize(element: Element, default_namespace: str = CLIENT_NS) -> bytes:
    """Return the UTF-8 wire form of ``element`` inside a stream whose default namespace is given.

    The element's own ``tail`` is not written: it belongs to its parent.
    """
    out: list[str] = []
    _write(element, default_namespace, out)
    return "".join(out).encode("utf-8")
