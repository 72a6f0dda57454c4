"""Sans-I/O framers: bytes in, messages out.

A framer never touches a socket. The connection's read loop calls
``feed(data)`` with whatever ``recv`` returned and gets back the list of
complete messages (possibly empty); at end of stream it calls ``eof()``.
``encode(message)`` turns a message the handler sends into wire bytes, so a
handler written as ``conn.send(message)`` works unchanged under any framing.

Each framer enforces ``max_message_size`` *before* buffering past it, so a
peer cannot make the server hold more than one maximum-size message per
connection (h11's ``max_incomplete_event_size`` idea).

Framers are per connection and not thread-safe; ``encode`` keeps no state and
may be called from any thread.

A custom framer is any object with ``feed``, ``eof`` and ``encode``; pass its
class (or any callable taking ``max_message_size``) as ``framing``.
"""

from __future__ import annotations

import struct
import time
from typing import Callable, Protocol, runtime_checkable

from .errors import FramingError, MessageTimeout, MessageTooLarge

__all__ = [
    "Framer",
    "FramerFactory",
    "RawFramer",
    "LineFramer",
    "LengthPrefixFramer",
    "FRAMERS",
    "framer_factory",
]


@runtime_checkable
class Framer(Protocol):
    """What the read loop needs from a framer."""

    def feed(self, data: bytes) -> list[bytes]:
        """Take received bytes; return the messages they complete, in order.

        Raises :class:`MessageTooLarge` or :class:`FramingError` for bad input.
        """

    def eof(self) -> list[bytes]:
        """The peer closed its side: return any last messages the stream holds."""

    def encode(self, message: bytes) -> bytes:
        """Return the wire form of one outgoing message."""


FramerFactory = Callable[[int], Framer]


class RawFramer:
    """Each chunk ``recv`` returns is one message, as in the Go original.

    Chunk boundaries are whatever TCP delivers, so this suits byte streams
    (echo, proxies) rather than protocols with records. The read loop never
    asks for more than ``max_message_size`` bytes at a time, so no chunk is
    ever too large.
    """

    __slots__ = ("max_message_size",)

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size

    def feed(self, data: bytes) -> list[bytes]:
        return [data] if data else []

    def eof(self) -> list[bytes]:
        return []

    def encode(self, message: bytes) -> bytes:
        return message


class LineFramer:
    """Newline-delimited messages; the ``\\n`` (and a ``\\r`` before it) is stripped.

    ``encode`` appends ``\\n``. A last line without a newline is delivered at
    end of stream, so ``printf 'hi' | nc`` behaves as people expect.
    ``max_message_size`` counts the line without its terminator.
    """

    __slots__ = ("max_message_size", "_buf", "_scanned")

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._buf = bytearray()
        # How far the buffer is known to hold no newline, so a long line
        # arriving in many small pieces is scanned once, not once per piece.
        self._scanned = 0

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        if not buf and data.endswith(b"\n") and data.count(b"\n") == 1:
            # The common case (one whole line per recv) without copying twice.
            line = data[:-1]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._check(len(line))
            return [line]
        buf += data
        messages: list[bytes] = []
        start = 0
        pos = buf.find(b"\n", self._scanned)
        while pos != -1:
            end = pos - 1 if pos > start and buf[pos - 1] == 0x0D else pos
            self._check(end - start)
            messages.append(bytes(buf[start:end]))
            start = pos + 1
            pos = buf.find(b"\n", start)
        if start:
            del buf[:start]
        self._scanned = len(buf)
        # An unterminated line already longer than the limit can never become
        # valid: fail now instead of buffering until the newline arrives.
        pending = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
        self._check(pending)
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held back."""
        return len(self._buf)

    def eof(self) -> list[bytes]:
        if not self._buf:
            return []
        line = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return [line[:-1] if line.endswith(b"\r") else line]

    def encode(self, message: bytes) -> bytes:
        return message + b"\n"

    def _check(self, size: int) -> None:
        if size > self.max_message_size:
            raise MessageTooLarge(
                f"line of {size} bytes or more exceeds max_message_size={self.max_message_size}"
            )


_LENGTH = struct.Struct(">I")


class LengthPrefixFramer:
    """Messages prefixed by their length as a 4-byte big-endian unsigned integer.

    ``encode`` adds the prefix. A frame announcing more than
    ``max_message_size`` bytes is rejected as soon as its header arrives,
    before any of its body is buffered.
    """

    __slots__ = ("max_message_size", "_buf", "_need")

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._need = -1  # body length of the frame in progress, -1 = reading a header

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        messages: list[bytes] = []
        pos = 0
        size = len(buf)
        while True:
            if self._need < 0:
                if size - pos < 4:
                    break
                (need,) = _LENGTH.unpack_from(buf, pos)
                if need > self.max_message_size:
                    raise MessageTooLarge(
                        f"frame announces {need} bytes, max_message_size={self.max_message_size}"
                    )
                self._need = need
                pos += 4
            if size - pos < self._need:
                break
            messages.append(bytes(buf[pos : pos + self._need]))
            pos += self._need
            self._need = -1
        if pos:
            del buf[:pos]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held back (a header counts once it is read)."""
        return len(self._buf) + (4 if self._need >= 0 else 0)

    def eof(self) -> list[bytes]:
        if self._buf or self._need >= 0:
            pending = len(self._buf)
            self._buf.clear()
            self._need = -1
            raise FramingError(f"stream ended inside a frame ({pending} bytes pending)")
        return []

    def encode(self, message: bytes) -> bytes:
        if len(message) > 0xFFFFFFFF:
            raise ValueError("a length-prefixed message cannot exceed 4 GiB")
        return _LENGTH.pack(len(message)) + message


class MessageDeadline:
    """Wraps a framer: a message begun but not finished within ``timeout`` s raises MessageTimeout.

    The idle timeout cannot catch a slow-loris client, which sends a byte
    now and then and never completes a message; this can. It needs the
    wrapped framer's ``pending`` (bytes of an unfinished message held).
    """

    __slots__ = ("_inner", "_timeout", "_since", "encode", "eof")

    def __init__(self, inner: Framer, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._since: float | None = None
        self.encode = inner.encode
        self.eof = inner.eof

    @property
    def pending(self) -> int:
        return self._inner.pending  # type: ignore[attr-defined, no-any-return]

    def feed(self, data: bytes) -> list[bytes]:
        messages = self._inner.feed(data)
        if self._inner.pending:  # type: ignore[attr-defined]
            now = time.monotonic()
            if self._since is None or messages:
                self._since = now
            elif now - self._since > self._timeout:
                raise MessageTimeout(
                    f"a message begun {now - self._since:.1f}s ago is still unfinished "
                    f"(message_timeout={self._timeout:g}s)"
                )
        else:
            self._since = None
        return messages


def with_message_deadline(factory: FramerFactory, timeout: float | None) -> FramerFactory:
    """The factory, wrapped with :class:`MessageDeadline` when it can be (framers with ``pending``)."""
    if timeout is None or not hasattr(factory, "pending"):
        return factory
    return lambda max_message_size: MessageDeadline(factory(max_message_size), timeout)


FRAMERS: dict[str, FramerFactory] = {
    "raw": RawFramer,
    "line": LineFramer,
    "length": LengthPrefixFramer,
}


def framer_factory(framing: str | FramerFactory) -> FramerFactory:
    """Resolve a framing name (``raw``, ``line``, ``length``) or pass a factory through."""
    if callable(framing):
        return framing
    try:
        return FRAMERS[framing]
    except (KeyError, TypeError):
        raise FramingError(f"unknown framing {framing!r}") from None
