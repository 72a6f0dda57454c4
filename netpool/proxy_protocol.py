"""The PROXY protocol, versions 1 and 2 (HAProxy's specification), as a sans-I/O reader.

A load balancer in front of netpool prefixes each connection with a header
naming the real client. :class:`ProxyHeaderReader` takes bytes and says how
many of them belong to the header, never one more: the I/O side peeks at the
socket, feeds the peeked bytes, and consumes exactly what the reader took, so
the bytes after the header (a TLS ClientHello, the protocol's first line)
stay in the socket for whoever reads next.

Only the fields a server needs are decoded: command, transport, source and
destination addresses, and the TLVs as raw (type, value) pairs.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .errors import NetpoolError

__all__ = ["ProxyHeader", "ProxyHeaderError", "ProxyUntrusted", "ProxyHeaderReader", "build_v1", "build_v2", "parse_networks",
           "V2_SIGNATURE", "MAX_V1", "MAX_V2"]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V1 = 107  # the specification's longest v1 line, CRLF included
# A v2 header may announce up to 64 KiB of addresses and TLVs; balancers send
# a few hundred bytes at most. Anything larger is refused before it is read.
MAX_V2 = 16 + 1024

_V2_FAMILIES = {
    0x11: (socket.AF_INET, "TCP4", 12),
    0x12: (socket.AF_INET, "UDP4", 12),
    0x21: (socket.AF_INET6, "TCP6", 36),
    0x22: (socket.AF_INET6, "UDP6", 36),
    0x31: (socket.AF_UNIX, "UNIX", 216),
    0x32: (socket.AF_UNIX, "UNIXDGRAM", 216),
}


class ProxyHeaderError(NetpoolError):
    """The bytes are not a valid PROXY protocol header; the connection closes with ``reason``."""

    reason = "proxy_header_invalid"


class ProxyUntrusted(ProxyHeaderError):
    """A peer outside ``proxy_trusted`` connected to a PROXY-protocol listener."""

    reason = "proxy_untrusted"


@dataclass(frozen=True)
class ProxyHeader:
    """What the balancer said about the connection."""

    version: int
    command: str
    """"PROXY" (a relayed client) or "LOCAL" (the balancer's own connection, e.g. a health check)."""
    transport: str
    """"TCP4", "TCP6", "UNIX", ... or "UNKNOWN"."""
    source: Optional[tuple] = None
    """The real client's address, as socket addresses are: ``(host, port)``."""
    destination: Optional[tuple] = None
    tlvs: tuple[tuple[int, bytes], ...] = field(default=())


class ProxyHeaderReader:
    """Incremental PROXY header reader: ``feed`` returns how many bytes it took.

    ``versions`` limits what is accepted ({1}, {2} or both). After ``feed``
    the header is complete when :attr:`header` is not None; until then every
    byte fed was taken, since header bytes are all the reader ever takes.
    """

    __slots__ = ("versions", "_buf", "header")

    def __init__(self, versions: Iterable[int] = (1, 2)) -> None:
        self.versions = frozenset(versions)
        self._buf = bytearray()
        self.header: Optional[ProxyHeader] = None

    def feed(self, data: bytes) -> int:
        """Take the header's share of ``data``; raise :class:`ProxyHeaderError` on bad input."""
        if self.header is not None:
            return 0
        buf = self._buf
        start = len(buf)
        buf += data
        version = self._detect()
        if version is None:
            return len(data)
        if version == 1:
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) >= MAX_V1:
                    raise ProxyHeaderError(f"PROXY v1 line longer than {MAX_V1} bytes")
                return len(data)
            if end + 2 > MAX_V1:
                raise ProxyHeaderError(f"PROXY v1 line longer than {MAX_V1} bytes")
            self.header = _parse_v1(bytes(buf[: end + 2]))
            taken = end + 2 - start
        else:
            if len(buf) < 16:
                return len(data)
            (length,) = struct.unpack_from(">H", buf, 14)
            if 16 + length > MAX_V2:
                raise ProxyHeaderError(f"PROXY v2 header announces {length} bytes, more than the {MAX_V2 - 16} accepted")
            if len(buf) < 16 + length:
                return len(data)
            self.header = _parse_v2(bytes(buf[: 16 + length]))
            taken = 16 + length - start
        del buf[:]
        return taken

    def _detect(self) -> Optional[int]:
        """1 or 2 once the first bytes say which; None while they could still be either."""
        head = bytes(self._buf[:12])
        could_v1 = 1 in self.versions and V1_PREFIX.startswith(head[:6])
        could_v2 = 2 in self.versions and V2_SIGNATURE.startswith(head)
        if could_v1 and len(head) >= 6:
            return 1
        if could_v2 and len(head) == 12:
            return 2
        if could_v1 or could_v2:
            return None
        accepted = " or ".join(f"v{v}" for v in sorted(self.versions))
        raise ProxyHeaderError(f"connection did not start with a PROXY protocol {accepted} header")


def _parse_v1(line: bytes) -> ProxyHeader:
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = text.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyHeaderError("malformed PROXY v1 line")
    if parts[1] == "UNKNOWN":
        return ProxyHeader(1, "PROXY", "UNKNOWN")
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyHeaderError(f"malformed PROXY v1 line (transport {parts[1]!r}, {len(parts)} fields)")
    family = 4 if parts[1] == "TCP4" else 6
    src = _ip(parts[2], family)
    dst = _ip(parts[3], family)
    return ProxyHeader(1, "PROXY", parts[1], (src, _port(parts[4])), (dst, _port(parts[5])))


def _ip(text: str, family: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"bad address {text!r} in PROXY header") from None
    if address.version != family:
        raise ProxyHeaderError(f"bad IPv{family} address {text!r} in PROXY header")
    # Written as the socket layer writes a peer's address (inet_ntop), as v2
    # does: str() would give ::ffff:102:304 where a v2 header and a
    # dual-stack socket's own peer address give ::ffff:1.2.3.4.
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, address.packed)


def _port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"bad port {text!r} in PROXY header")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader:
    ver_cmd, fam = data[12], data[13]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {ver_cmd >> 4}")
    command = {0: "LOCAL", 1: "PROXY"}.get(ver_cmd & 0x0F)
    if command is None:
        raise ProxyHeaderError(f"PROXY v2 header with unknown command {ver_cmd & 0x0F}")
    body = data[16:]
    if fam == 0x00 or command == "LOCAL":
        # LOCAL (health checks) and UNSPEC carry no addresses worth trusting.
        return ProxyHeader(2, command, "UNKNOWN", tlvs=_tlvs(body, 0) if fam == 0 else ())
    if fam not in _V2_FAMILIES:
        raise ProxyHeaderError(f"PROXY v2 header with unknown family/transport 0x{fam:02x}")
    family, transport, size = _V2_FAMILIES[fam]
    if len(body) < size:
        raise ProxyHeaderError(f"PROXY v2 {transport} header too short for its addresses")
    src: tuple[str, int] | tuple[str]  # (host, port), or a UNIX socket's (path,)
    dst: tuple[str, int] | tuple[str]
    if family == socket.AF_INET:
        src = (socket.inet_ntop(family, body[0:4]), struct.unpack_from(">H", body, 8)[0])
        dst = (socket.inet_ntop(family, body[4:8]), struct.unpack_from(">H", body, 10)[0])
    elif family == socket.AF_INET6:
        src = (socket.inet_ntop(family, body[0:16]), struct.unpack_from(">H", body, 32)[0])
        dst = (socket.inet_ntop(family, body[16:32]), struct.unpack_from(">H", body, 34)[0])
    else:
        src = (body[0:108].split(b"\0", 1)[0].decode(errors="replace"),)
        dst = (body[108:216].split(b"\0", 1)[0].decode(errors="replace"),)
    return ProxyHeader(2, command, transport, src, dst, _tlvs(body, size))


def _tlvs(body: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    out = []
    while offset < len(body):
        if len(body) - offset < 3:
            raise ProxyHeaderError("truncated TLV in PROXY v2 header")
        kind = body[offset]
        (length,) = struct.unpack_from(">H", body, offset + 1)
        if offset + 3 + length > len(body):
            raise ProxyHeaderError("TLV runs past the end of the PROXY v2 header")
        out.append((kind, bytes(body[offset + 3 : offset + 3 + length])))
        offset += 3 + length
    return tuple(out)


# -- building (for tests and for netpool-to-netpool relays) --------------------


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    transport = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {transport} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def build_v2(source: Optional[tuple[str, int]], destination: Optional[tuple[str, int]],
             tlvs: Iterable[tuple[int, bytes]] = (), *, local: bool = False) -> bytes:
    tlv_bytes = b"".join(struct.pack(">BH", kind, len(value)) + value for kind, value in tlvs)
    if local or source is None or destination is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack(">H", len(tlv_bytes)) + tlv_bytes
    family = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
    addresses = (socket.inet_pton(family, source[0]) + socket.inet_pton(family, destination[0])
                 + struct.pack(">HH", source[1], destination[1]))
    fam = 0x21 if family == socket.AF_INET6 else 0x11
    body = addresses + tlv_bytes
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack(">H", len(body)) + body


def parse_networks(networks: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse ``proxy_trusted`` entries ("10.0.0.0/8", "127.0.0.1"); ValueError names a bad one."""
    out = []
    for text in networks:
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP network like 10.0.0.0/8 or ::1") from None
    return tuple(out)
