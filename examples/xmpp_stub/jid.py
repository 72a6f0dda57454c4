"""JIDs (``local@domain/resource``): parsed, validated and normalised before anything uses them.

RFC 7622 prepares each part with a PRECIS profile. The standard library has
no PRECIS, so this is the conservative subset that matters for a server that
compares and routes addresses: Unicode NFC everywhere, case folding for the
localpart (``Alice`` and ``alice`` are one account) and the domain, the
characters RFC 7622 forbids in a localpart refused, no control or invisible
formatting characters anywhere, and every part at most 1023 bytes. A JID that
fails is refused, never "cleaned up": two different strings must not end up
naming the same user by accident.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from dataclasses import dataclass
from typing import Optional

__all__ = ["JID", "InvalidJID", "localpart", "domainpart", "resourcepart"]

MAX_PART_BYTES = 1023
# RFC 7622 section 3.3.1: these never appear in a localpart.
_LOCALPART_FORBIDDEN = frozenset("\"&'/:<>@")


class InvalidJID(ValueError):
    """The text is not a JID (or JID part) this server accepts; the message says why."""


def _prepare(part: str, what: str) -> str:
    if not part:
        raise InvalidJID(f"empty {what}")
    part = unicodedata.normalize("NFC", part)
    if len(part.encode("utf-8")) > MAX_PART_BYTES:
        raise InvalidJID(f"{what} longer than {MAX_PART_BYTES} bytes")
    for char in part:
        # Cc: controls, Cf: invisible formatting (zero-width joiners, bidi
        # overrides), Cs/Co/Cn: surrogates, private use, unassigned.
        if unicodedata.category(char)[0] == "C":
            raise InvalidJID(f"{what} contains a control or unassigned character (U+{ord(char):04X})")
    return part


def localpart(text: str) -> str:
    """The account name: case-folded, without spaces or any of ``"&'/:<>@``."""
    part = _prepare(text, "localpart").casefold()
    for char in part:
        if char in _LOCALPART_FORBIDDEN or char.isspace():
            raise InvalidJID(f"localpart contains {char!r}, which JIDs do not allow there")
    return unicodedata.normalize("NFC", part)


def domainpart(text: str) -> str:
    """A host name (letters of any script, digits, hyphens), an IPv4 address or an ``[IPv6]`` literal."""
    if text.endswith(".") and len(text) > 1:
        text = text[:-1]  # the fully qualified form names the same host
    part = _prepare(text, "domainpart").lower()
    if part.startswith("[") and part.endswith("]"):
        try:
            ipaddress.IPv6Address(part[1:-1])
        except ValueError:
            raise InvalidJID(f"{text!r} is not an IPv6 literal") from None
        return part
    for label in part.split("."):
        if not label or len(label) > 63:
            raise InvalidJID(f"domain {text!r} has an empty or over-long label")
        if label[0] == "-" or label[-1] == "-" or not all(c.isalnum() or c == "-" for c in label):
            raise InvalidJID(f"domain {text!r} is not a host name")
    return part


def resourcepart(text: str) -> str:
    """The client's own name for its connection: any printable text, case kept, no edge spaces."""
    part = _prepare(text, "resourcepart")
    if part != part.strip():
        raise InvalidJID("resourcepart starts or ends with whitespace")
    return part


@dataclass(frozen=True)
class JID:
    """A normalised JID; compare and hash them freely. ``str(jid)`` is the wire form."""

    local: Optional[str]
    domain: str
    resource: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "JID":
        """Parse and normalise; raises :class:`InvalidJID`.

        RFC 7622's order: the resource is everything after the first ``/``
        (it may itself contain ``@`` and ``/``), the localpart what comes
        before an ``@`` in the rest.
        """
        if not isinstance(text, str) or not text:
            raise InvalidJID("empty JID")
        address, slash, resource = text.partition("/")
        local, at, domain = address.rpartition("@")
        return cls(
            localpart(local) if at else None,
            domainpart(domain),
            resourcepart(resource) if slash else None,
        )

    @property
    def bare(self) -> "JID":
        """The account (``local@domain``) without the resource."""
        return JID(self.local, self.domain) if self.resource is not None else self

    def __str__(self) -> str:
        text = self.domain if self.local is None else f"{self.local}@{self.domain}"
        return text if self.resource is None else f"{text}/{self.resource}"
