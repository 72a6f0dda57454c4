"""The back end's wire protocol: one request, one reply, each in a netpool "length" frame.

Sans-I/O (bytes in, values out) so both sides and the tests share it:

    request = op (1 byte) | username length (2) | password length (2) | username | password
    reply   = status (1 byte) | detail (UTF-8 text, or JSON for STATS)

Small and binary on purpose: parsing it costs far less than the password
hash, and it needs no RPC framework.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "OP_REGISTER", "OP_LOGIN", "OP_PING", "OP_STATS",
    "OK", "EXISTS", "UNKNOWN_USER", "WRONG_PASSWORD", "BAD_REQUEST", "SERVER_ERROR",
    "Request", "Reply", "encode_request", "decode_request", "encode_reply", "decode_reply", "ProtocolViolation",
]

OP_REGISTER = 1
OP_LOGIN = 2
OP_PING = 3
OP_STATS = 4
OPS = {OP_REGISTER: "register", OP_LOGIN: "login", OP_PING: "ping", OP_STATS: "stats"}

OK = 0
EXISTS = 1
UNKNOWN_USER = 2
WRONG_PASSWORD = 3
BAD_REQUEST = 4
SERVER_ERROR = 5

MAX_USERNAME = 64
MAX_PASSWORD = 256

_HEAD = struct.Struct(">BHH")


class ProtocolViolation(ValueError):
    """A frame that is not a valid request or reply."""


class Request(NamedTuple):
    op: int
    username: str
    password: str


class Reply(NamedTuple):
    status: int
    detail: str


def encode_request(op: int, username: str = "", password: str = "") -> bytes:
    try:
        user = username.encode()
        pw = password.encode()
    except UnicodeEncodeError:  # a lone surrogate, as json.loads makes from "\ud800"
        raise ProtocolViolation("username and password must be valid Unicode text") from None
    if len(user) > MAX_USERNAME or len(pw) > MAX_PASSWORD:
        raise ProtocolViolation(f"username at most {MAX_USERNAME} bytes, password at most {MAX_PASSWORD}")
    return _HEAD.pack(op, len(user), len(pw)) + user + pw


def decode_request(frame: bytes) -> Request:
    if len(frame) < _HEAD.size:
        raise ProtocolViolation(f"request of {len(frame)} bytes is shorter than its {_HEAD.size}-byte header")
    op, ulen, plen = _HEAD.unpack_from(frame)
    if op not in OPS:
        raise ProtocolViolation(f"unknown operation {op}")
    if len(frame) != _HEAD.size + ulen + plen or ulen > MAX_USERNAME or plen > MAX_PASSWORD:
        raise ProtocolViolation("field lengths do not match the frame")
    try:
        username = frame[_HEAD.size:_HEAD.size + ulen].decode()
        password = frame[_HEAD.size + ulen:].decode()
    except UnicodeDecodeError:
        raise ProtocolViolation("username and password must be UTF-8") from None
    return Request(op, username, password)


def encode_reply(status: int, detail: str = "") -> bytes:
    return bytes((status,)) + detail.encode()


def decode_reply(frame: bytes) -> Reply:
    if not frame:
        raise ProtocolViolation("empty reply")
    return Reply(frame[0], frame[1:].decode(errors="replace"))
