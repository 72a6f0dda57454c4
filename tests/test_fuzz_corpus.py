"""The fuzz corpora and crash inputs (fuzz/), replayed through each target's check() without atheris.

`make fuzz` grows the corpora and files every input that ever broke a
property under fuzz/crashes/; here each one must pass, so a parser change
that brings a bug back fails `make test`. The second half breaks each
parser on purpose and expects check() to notice: a harness that passes
everything would otherwise look the same as a correct parser.
"""

from __future__ import annotations

import importlib
import struct
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
TARGETS = sorted(p.stem for p in (FUZZ / "targets").glob("*.py") if not p.stem.startswith("_"))


def target(name: str) -> ModuleType:
    return importlib.import_module(f"fuzz.targets.{name}")


def inputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != ".gitkeep")


def test_every_target_has_a_corpus_and_a_crashes_folder():
    assert len(TARGETS) >= 7, TARGETS
    for name in TARGETS:
        assert inputs(FUZZ / "corpus" / name), f"fuzz/corpus/{name}/ is empty"
        assert (FUZZ / "crashes" / name).is_dir(), f"fuzz/crashes/{name}/ is missing"


@pytest.mark.parametrize("name", TARGETS)
def test_corpus_and_crashes_pass_the_check(name):
    check = target(name).check
    failures = []
    for path in inputs(FUZZ / "corpus" / name) + inputs(FUZZ / "crashes" / name):
        try:
            check(path.read_bytes())
        except Exception as exc:  # any exception is a failure: report them all, by file
            failures.append(f"{path.relative_to(ROOT)}: {type(exc).__name__}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)


# -- each check() catches a broken parser ------------------------------------------------

HEADER = target("xmpp_parser").HEADER


def wrap(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, change) -> None:
    """Replace ``owner.name`` with ``change(original)``."""
    monkeypatch.setattr(owner, name, change(getattr(owner, name)))


def break_line_framer(monkeypatch):
    # Drops the last byte of every line.
    wrap(monkeypatch, target("line_framer").LineFramer, "feed",
         lambda feed: lambda self, data: [m[:-1] for m in feed(self, data)])
    return b"\x03\x05hello\nworld\n"


def break_length_prefix_framer(monkeypatch):
    # Loses the first byte of every chunk after the first frame.
    wrap(monkeypatch, target("length_prefix_framer").LengthPrefixFramer, "feed",
         lambda feed: lambda self, data: feed(self, data[1:] if self.pending else data))
    return b"\x03\x06" + struct.pack(">I", 3) + b"abc" + struct.pack(">I", 2) + b"de"


def break_raw_framer(monkeypatch):
    # Holds the last byte of each chunk back.
    wrap(monkeypatch, target("raw_framer").RawFramer, "feed",
         lambda feed: lambda self, data: [m[:-1] for m in feed(self, data)])
    return b"\x06\x00some bytes"


def break_proxy_protocol(monkeypatch):
    # Takes one byte past the header.
    wrap(monkeypatch, target("proxy_protocol").ProxyHeaderReader, "feed",
         lambda feed: lambda self, data: (lambda took: took + (took < len(data) and self.header is not None))(
             feed(self, data)))
    return b"\x07\x00PROXY TCP4 1.2.3.4 5.6.7.8 80 81\r\nGET / HTTP/1.1\r\n"


def break_xmpp_parser(monkeypatch):
    # Loses stanzas that complete in a one-byte feed.
    module = target("xmpp_parser")
    wrap(monkeypatch, module.StreamParser, "feed", lambda feed: lambda self, data: [
        event for event in feed(self, data) if len(data) > 1 or not isinstance(event, module.StanzaReceived)])
    return b"\x00\x00" + HEADER + b"<message><body>hi</body></message>"


def break_http_framer(monkeypatch):
    # Ignores Content-Length: the body is read as the next request's head.
    frontend = target("http_framer").frontend

    def parse_head(original):
        def parse(head, max_body):
            request = original(head, max_body)
            request.content_length = 0
            return request
        return parse

    wrap(monkeypatch, frontend, "_parse_head", parse_head)
    return b"\x03\x10POST /login HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"


def break_gateway_protocol(monkeypatch):
    # Raises ValueError (not ProtocolViolation) for an unknown operation.
    protocol = target("gateway_protocol").p

    def decode_request(original):
        def decode(frame):
            if frame[:1] == b"\x09":
                raise ValueError("unknown operation")
            return original(frame)
        return decode

    wrap(monkeypatch, protocol, "decode_request", decode_request)
    return b"\x00\x00\x09\x00\x00\x00\x00"


BREAKERS = {name[len("break_"):]: function for name, function in globals().items() if name.startswith("break_")}


def test_every_target_has_a_breaker():
    assert sorted(BREAKERS) == TARGETS


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_check_notices_a_broken_parser(name, monkeypatch):
    check = target(name).check
    data = BREAKERS[name](monkeypatch)
    with pytest.raises((AssertionError, ValueError)):
        check(data)
    monkeypatch.undo()
    check(data)  # and the same input passes the real parser
