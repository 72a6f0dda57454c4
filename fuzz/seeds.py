"""Write the seed inputs, the test vectors of tests/, into fuzz/corpus/<target>/.

Run once to start a corpus (``python fuzz/seeds.py [TARGET ...]``); fuzzing and merging
(``make fuzz FUZZ_MERGE=1``) then keep only the inputs that add coverage,
so the seeds may not all survive. Each vector is written with a few control
prefixes (see targets/_common.py: a cut seed, a config byte), named by its
SHA-1 as libFuzzer names inputs.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from netpool.proxy_protocol import MAX_V1, V2_SIGNATURE, build_v1, build_v2  # noqa: E402
from tests.test_xmpp_parser import DECLARATION, HEADER  # noqa: E402

# Control prefixes: (cut seed, config byte). Seed 0 feeds one byte at a time; 0x08 and 0x50
# give the XMPP target a small depth limit with attribute limits its header fits.
PREFIXES = [(0, 0), (3, 1), (6, 2), (7, 3), (13, 4), (0, 0x2D), (15, 0x6A), (5, 0x08), (9, 0x50)]


def client_hello() -> bytes:
    """A real TLS client's first flight (tests/test_xmpp_parser.py sends one to the XMPP port)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# tests/test_xmpp_parser.py
XMPP = [
    DECLARATION + HEADER,
    HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGFsaWNlAHNlY3JldA==</auth>",
    HEADER + b"<iq type='set' id='bind_1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
    b"<resource>laptop</resource></bind></iq> \n\t "
    b"<presence><show>chat</show><status>caf\xc3\xa9 &amp; &#x2615; <![CDATA[<ok>]]></status></presence>"
    b"<message to='bob@localhost' type='chat' id='m1'><body>hi &lt;bob&gt;</body>"
    b"<active xmlns='http://jabber.org/protocol/chatstates'/></message></stream:stream>",
    b'<?xml version="1.0"?>' + HEADER,
    HEADER + b"<message to=\"a&apos;b@x\" id='1&#10;2\t3'/>",
    HEADER + b"<message id='a\r\nb'><body>one\r\ntwo\rthree&#13;</body></message>",
    HEADER + b"<a><b><c><d><e/></d></c></b></a>",
    HEADER + b"<message a='1' b='2' c='3' d='4' e='5' f='6' g='7'/>",
    HEADER + b"<message>" + b"<b>xx</b>" * 15 + b"</message>",
    HEADER + b"<iq type='result'><query xmlns='urn:x' xmlns:ns0='urn:attr' ns0:flag='1'><item/></query>"
    b"<stream:error/></iq>",
    b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>]>" + HEADER,
    client_hello()[:300],
] + [prefix + bad for prefix, bad in [
    (b"", b"<!DOCTYPE stream [<!ENTITY lol 'lol'>]>"), (b"", b"<!-"), (b"", b"<?xml-stylesheet href='x'?>"),
    (b"", b"<?xml version='1.0' encoding='ISO-8859-1'?>"), (b"", b"\xff\xfe<\x00"), (b"", b"GET / HTTP/1.1\r\n"),
    (b"", b"<html>"), (b"", b"<stream:stream xmlns:stream='jabber:wrong'>"), (b"", b"<stream:stream>"),
    (HEADER, b"<!-- a comment -->"), (HEADER, b"<message><?php"), (HEADER, b"<message><body>&xxe;</body></message>"),
    (HEADER, b"<message><body>fish & chips</body></message>"), (HEADER, b"<message><body>&#xD800;</body></message>"),
    (HEADER, b"<message><body>\xc0\xaf"), (HEADER, b"<message><body>\xef\xbf\xbe"), (HEADER, b"hello"),
    (HEADER, b"<![CDATA[x]]>"), (HEADER, b"<message></presence>"), (HEADER, b"<a:message>"),
    (HEADER, b"<message to='a<b'/>"), (HEADER, b"<message to='a' to='b'/>"), (HEADER, b"<message to=a/>"),
    (HEADER, b"<message xmlns:xml='urn:evil'/>"), (HEADER, b"<message><body>]]></body></message>"),
    (HEADER, b"< message/>"), (HEADER, b"</stream:stream>trailing"),
]]

# tests/test_gateway.py
HTTP = [
    b"POST /login HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"garbage\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"a" * 300,
    b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Length: 39\r\n\r\n{\"username\":\"a\",\"password\":\"secret123\"}",
]

# tests/test_gateway.py (test_protocol_rejects_malformed_frames) and the back end's replies
GATEWAY = [
    b"\x02\x00\x02\x00\x01\xc3\xa9p", b"", b"\x09\x00\x00\x00\x00", b"\x02\x00\x05\x00\x00ab",
    b"\x01\x00\x05\x00\x06alicesecret", b"\x03\x00\x00\x00\x00", b"\x00pong", b"\x04username and password",
]

# tests/test_proxy_protocol.py
PROXY = [
    build_v1(("1.2.3.4", 80), ("5.6.7.8", 81)) + b"GET / HTTP/1.1\r\n",
    build_v1(("2001:db8::1", 1), ("::1", 65535)),
    build_v2(("1.2.3.4", 80), ("5.6.7.8", 81), [(0x01, b"h2"), (0xE0, b"x" * 5)]) + b"\x16\x03\x01",
    build_v2(("2001:db8::1", 1), ("::1", 2), [(0x01, b"h2")]),
    build_v2(None, None, local=True),
    b"PROXY UNKNOWN\r\n",
    b"GET / HTTP/1.1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",
    b"PROXY TCP4 1.2.3.999 5.6.7.8 80 81\r\n",
    b"PROXY TCP4 ::1 5.6.7.8 80 81\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 080 81\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 80 81\r\n",
    b"PROXY " + b"9" * MAX_V1,
    b"\x16\x03\x01\x02\x00\x01",
    V2_SIGNATURE + b"\x21\x11" + struct.pack(">H", 60000),
    V2_SIGNATURE + b"\x21\x31" + struct.pack(">H", 216) + b"/tmp/a\0".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0"),
    V2_SIGNATURE + b"\x21\x12" + struct.pack(">H", 15) + bytes(12) + b"\x01\x00",
]

# tests/test_framing.py
LINES = [b"a\r\nb\nc", b"a\r\nb\ncd\n", b"hello", b"0123456789x", b"abc\r\nabcd\n", b"\r\n\n\r\r\n", b"x\n" * 20]
FRAMES = [
    struct.pack(">I", 101), struct.pack(">I", 5) + b"ab", struct.pack(">I", 0) + struct.pack(">I", 1) + b"x",
    b"".join(struct.pack(">I", len(m)) + m for m in (b"hello", b"", b"world" * 3)),
]

CORPORA = {
    "line_framer": LINES,
    "length_prefix_framer": FRAMES,
    "raw_framer": LINES[:2] + FRAMES[:2],
    "proxy_protocol": PROXY,
    "xmpp_parser": XMPP,
    "http_framer": HTTP,
    "gateway_protocol": GATEWAY,
}


def main() -> None:
    """Seed every target, or those named on the command line."""
    for target, vectors in CORPORA.items():
        if sys.argv[1:] and target not in sys.argv[1:]:
            continue
        folder = ROOT / "fuzz" / "corpus" / target
        folder.mkdir(parents=True, exist_ok=True)
        for vector in vectors:
            for seed, config in PREFIXES:
                data = bytes((seed, config)) + vector
                (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)
        print(f"{target}: {len(os.listdir(folder))} files")


if __name__ == "__main__":
    main()
