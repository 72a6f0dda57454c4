"""SASL PLAIN (RFC 4616) as XMPP carries it (RFC 6120 section 6): decoding only, no I/O, no secrets kept.

PLAIN is the one mechanism this server implements, so it is the only one it
offers; SCRAM would need the user store to keep SCRAM keys, which is a
different file format. PLAIN sends the password itself, which is why the
server offers STARTTLS first when it has a certificate, and can refuse to
authenticate at all without it (``--require-tls``).

Nothing here logs: the payload holds the password. Errors carry only the
SASL failure condition to send back.
"""

from __future__ import annotations

import base64
import binascii
from typing import NamedTuple

__all__ = ["SASLFailure", "PlainCredentials", "decode_payload", "parse_plain", "MECHANISMS"]

MECHANISMS = ("PLAIN",)
# RFC 4616: each field is at most 255 octets. The limit is checked on the
# base64 text before decoding, so an oversized payload costs nothing.
_MAX_FIELD = 255
_MAX_ENCODED = 4 * ((3 * _MAX_FIELD + 2 + 2) // 3)


class SASLFailure(Exception):
    """Authentication failed; ``condition`` is the RFC 6120 SASL failure element to send."""

    def __init__(self, condition: str) -> None:
        super().__init__(condition)
        self.condition = condition


class PlainCredentials(NamedTuple):
    authzid: str
    """Who to act as; empty means the same identity as authcid."""
    authcid: str
    """The user name as typed, before normalisation."""
    password: str

    def __repr__(self) -> str:  # never show the password, even in a traceback or a debugger
        return f"PlainCredentials(authzid={self.authzid!r}, authcid={self.authcid!r}, password=<hidden>)"


def decode_payload(text: str) -> bytes:
    """The bytes of an ``<auth>`` or ``<response>`` element's text.

    Empty text means "no initial response" (the server then sends an empty
    challenge); a single ``=`` means an initial response of zero bytes.
    """
    text = "".join(text.split())  # line breaks inside base64 are tolerated by clients and by us
    if len(text) > _MAX_ENCODED:
        raise SASLFailure("malformed-request")
    if text == "=":
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SASLFailure("incorrect-encoding") from None


def parse_plain(payload: bytes) -> PlainCredentials:
    """Split ``authzid NUL authcid NUL password``; raises :class:`SASLFailure` if it is not that."""
    parts = payload.split(b"\x00")
    if len(parts) != 3:
        raise SASLFailure("malformed-request")
    if not parts[1] or not parts[2] or any(len(part) > _MAX_FIELD for part in parts):
        raise SASLFailure("malformed-request")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise SASLFailure("malformed-request") from None
    return PlainCredentials(authzid, authcid, password)
