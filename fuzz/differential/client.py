"""The client side of a script: real sockets to the listener on 127.0.0.1, plain TCP or TLS, one thread for all.

TLS goes through memory BIOs (``ssl.SSLObject``), so the client decides where
records meet TCP segments: a record may be cut in two, or several packed in
one send (``wire_seed`` decides as the bytes go out). Sockets are
non-blocking and every wait is a ``select`` with a deadline; a send reads
what comes back while it waits, so a server blocked on this client's full
window never deadlocks with a client blocked on the server's.

What a connection saw is kept as plain data (``view``): the echo of each
round, how the stream ended when it read to the end (the bytes after the
last echo, whether a TLS close_notify came, ``eof`` or ``reset``), and the
first thing that went other than the script expects.
"""

from __future__ import annotations

import random
import select
import socket
import ssl
import struct
import time
from typing import Any, Optional

from . import script as scripts

WAIT = 5.0  # seconds any one wait may take: a read, a send, a handshake
SMALL_WINDOW = 16384  # SO_RCVBUF of a small_window client (the kernel doubles it)


class Gone(Exception):
    """The connection did not do what the script expects (ended early, timed out); the message says how."""


class Client:
    def __init__(self, address: tuple[str, int], context: Optional[ssl.SSLContext], small_window: bool) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if small_window:  # before connect(): the window is agreed in the handshake
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_WINDOW)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each piece its own segment
        sock.settimeout(WAIT)
        sock.connect(address)
        sock.setblocking(False)
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.inbox = bytearray()  # plaintext received and not yet read by the script
        self.end: Optional[str] = None  # "eof" or "reset" once the stream has ended
        self.close_notify = False  # TLS: the server's close_notify came
        self.tls_error: Optional[str] = None
        self._tls: Optional[ssl.SSLObject] = None
        if context is not None:
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = context.wrap_bio(self._in, self._out, server_hostname="localhost")
            self._handshake()

    # -- sending ------------------------------------------------------------------

    def records(self, data: bytes) -> bytes:
        """The wire bytes for ``data``: itself, or over TLS its records (not sent)."""
        if self._tls is None:
            return data
        self._tls.write(data)
        return self._out.read()

    def send(self, wire: bytes) -> None:
        view = memoryview(wire)
        deadline = time.monotonic() + WAIT
        while view:
            try:
                view = view[self.sock.send(view):]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                raise Gone(f"send failed with {len(view)} bytes to go: {exc.strerror}") from None
            # The server may be waiting for this client to read before it reads again.
            readable, _, _ = select.select([self.sock] if self.end is None else [], [self.sock], [],
                                           self._left(deadline, f"a send ({len(view)} bytes to go)"))
            if readable:
                self._receive()

    # -- reading ------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or Gone (what came is left in ``inbox``)."""
        deadline = time.monotonic() + WAIT
        while len(self.inbox) < n:
            if self.end is not None:
                raise Gone(f"the stream ended ({self.end}) after {len(self.inbox)} of {n} bytes")
            self._wait(deadline, f"{n} bytes ({len(self.inbox)} came)")
        got = bytes(self.inbox[:n])
        del self.inbox[:n]
        return got

    def read_to_end(self) -> dict[str, Any]:
        """Read until the server's end of stream: what came, whether a close_notify did, and eof or reset."""
        deadline = time.monotonic() + WAIT
        while self.end is None:
            self._wait(deadline, "the end of the stream")
        after = bytes(self.inbox)
        self.inbox.clear()
        return {"after": after, "close_notify": self.close_notify if self._tls else None, "end": self.end,
                "tls_error": self.tls_error}

    def _wait(self, deadline: float, what: str) -> None:
        select.select([self.sock], [], [], self._left(deadline, what))
        self._receive()

    @staticmethod
    def _left(deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Gone(f"timed out after {WAIT:g} s waiting for {what}")
        return left

    def _receive(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            self.end = "reset"
            return
        if not data:
            self.end = "eof"
        if self._tls is None:
            self.inbox += data
            return
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        if self._tls.version() is not None:  # the handshake is over: decrypt what is complete
            self._decrypt()

    def _decrypt(self) -> None:
        assert self._tls is not None
        while True:
            try:
                data = self._tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self.close_notify = True
                return
            except ssl.SSLEOFError:
                return  # the TCP stream ended without a close_notify: self.end says it ended
            except ssl.SSLError as exc:
                self.tls_error = exc.reason or str(exc)
                return
            if not data:  # what read() returns for a close_notify (SSL_RECEIVED_SHUTDOWN)
                self.close_notify = True
                return
            self.inbox += data

    def _handshake(self) -> None:
        assert self._tls is not None
        deadline = time.monotonic() + WAIT
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.send(self._out.read())
                if self.end is not None:
                    raise Gone(f"the stream ended ({self.end}) during the TLS handshake") from None
                self._wait(deadline, "the TLS handshake")
        self.send(self._out.read())
        self._decrypt()  # what came with the handshake's last flight

    # -- ending -------------------------------------------------------------------

    def shut_wr(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def notify(self) -> None:
        """TLS close_notify (the server answers with its own, then its FIN)."""
        assert self._tls is not None
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # it waits for the server's close_notify, which read_to_end notices
        self.send(self._out.read())

    def forge(self) -> None:
        """A TLS record that no longer authenticates: the last byte of its tag flipped."""
        wire = bytearray(self.records(b"forged"))
        wire[-1] ^= 0xFF
        self.send(bytes(wire))

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def close_unread(self) -> None:
        """close() with bytes left unread in the kernel, so that it sends a reset and not a FIN.

        Reads drain the kernel into ``inbox``: closing straight after one
        could send a FIN, and the server would see an end of stream (about
        one run in eight of seed 30). The server is still sending, so more
        comes: wait for it, without reading it.
        """
        deadline = time.monotonic() + WAIT
        readable, _, _ = select.select([self.sock], [], [], self._left(deadline, "more of the reply"))
        if not readable:
            raise Gone(f"timed out after {WAIT:g} s waiting for more of the reply")
        self.sock.close()


class Session:
    """Plays a script's client side against one listener; ``views`` is what each connection saw.

    ``play()`` runs every batch and ending but for connections left open;
    ``finish()``, after the listener has stopped, reads those to the end and
    closes every socket.
    """

    def __init__(self, script: scripts.Script, address: tuple[str, int], context: Optional[ssl.SSLContext]) -> None:
        self.script = script
        self.address = address
        self.context = context
        n = len(script.plans)
        self.clients: list[Optional[Client]] = [None] * n
        self.views: list[dict[str, Any]] = [{"echoes": [], "more": None, "tail": None, "error": None} for _ in range(n)]
        self._held = [b""] * n  # wire bytes held back for the next send (a record cut in two)
        self._rounds = [0] * n
        self._wire = random.Random(script.wire_seed)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        for client in self.clients:
            if client is not None:
                client.close()

    @property
    def ports(self) -> list[Optional[int]]:
        return [c.port if c is not None else None for c in self.clients]

    def play(self) -> None:
        for batch in self.script.batches:
            for piece in batch.pieces:
                self._attempt(piece.conn, self._send, piece.data)
                if piece.pause:
                    time.sleep(piece.pause)  # a chunk boundary for the server to find, not a wait for an event
            for i in batch.conns:
                self._attempt(i, self._flush)
            for i in batch.conns:
                self._attempt(i, self._read_round)

    def finish(self) -> None:
        """After the listener stopped: connections left open read to the end (server_stop)."""
        for i, plan in enumerate(self.script.plans):
            if plan.ending == "open":
                self._attempt(i, self._read_tail)
        self.__exit__()

    def _attempt(self, i: int, step: Any, *args: Any) -> None:
        """Run one step for connection ``i``, unless it already went wrong; a Gone is noted as what it saw."""
        view = self.views[i]
        if view["error"] is not None:
            return
        try:
            step(i, *args)
        except Gone as exc:
            view["error"] = f"round {self._rounds[i]}: {exc}"
            client = self.clients[i]
            if client is not None:
                view["unread"] = bytes(client.inbox)
                client.close()

    def _client(self, i: int) -> Client:
        client = self.clients[i]
        if client is None:  # connected at its first piece: new connections arrive among the others' reads
            try:
                client = Client(self.address, self.context, self.script.plans[i].small_window)
            except OSError as exc:
                raise Gone(f"connect failed: {exc}") from None
            self.clients[i] = client
        return client

    def _send(self, i: int, data: bytes) -> None:
        client = self._client(i)
        wire = self._held[i] + client.records(data)
        # Over TLS, half the time a record is cut where the segment ends: the rest goes with the next piece.
        cut = len(wire) if self.context is None or self._wire.random() < 0.5 else self._wire.randint(0, len(wire))
        client.send(wire[:cut])
        self._held[i] = wire[cut:]

    def _flush(self, i: int) -> None:
        self._client(i).send(self._held[i])
        self._held[i] = b""

    def _read_round(self, i: int) -> None:
        client = self._client(i)
        n = self._rounds[i]
        view = self.views[i]
        view["echoes"].append(client.read(len(scripts.echoes(self.script, i)[n])))
        self._rounds[i] = n = n + 1
        plan = self.script.plans[i]
        if n < len(plan.rounds):
            return
        ending = plan.ending
        if ending.startswith("big"):
            client.read(1)  # some of the reply: the server is sending it now
            view["more"] = True
            if ending == "big_rst":
                client.reset()
            else:
                client.close_unread()  # unread bytes: the kernel sends a reset, not a FIN
        elif ending == "rst":
            client.reset()
        elif ending == "close":
            client.close()
        elif ending != "open":
            if ending == "fin":
                client.shut_wr()
            elif ending == "notify":
                client.notify()
            elif ending == "corrupt":
                client.forge()
            self._read_tail(i)

    def _read_tail(self, i: int) -> None:
        self.views[i]["tail"] = self._client(i).read_to_end()
