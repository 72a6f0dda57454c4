"""The chat example (examples/chat): two people chatting, a slow reader among 1,000, several processes on Redis.

Real sockets on 127.0.0.1; every wait has a deadline, nothing sleeps.
"""

from __future__ import annotations

import json
import re
import selectors
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from netpool.examples.chat import chat

from .conftest import DEADLINE, serving, wait_for
from .test_cli import server
from .test_processes import await_lines

CHAT = "netpool.examples.chat.chat"


class Client:
    """One chat user: lines out, lines in; every read bounded by the socket's timeout and a deadline."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.buffer = b""

    def say(self, line: bytes) -> None:
        self.sock.sendall(line + b"\n")

    def line(self) -> bytes:
        """The next line (without its newline)."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def until(self, wanted: bytes, timeout: float = DEADLINE) -> list[bytes]:
        """Read lines until ``wanted`` arrives; returns the lines before it (other people's news)."""
        deadline = time.monotonic() + timeout
        skipped = []
        while (line := self.line()) != wanted:
            skipped.append(line)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {wanted!r}; got {skipped[-5:]!r}")
        return skipped

    def nick(self, name: bytes) -> None:
        assert self.line().startswith(b"* welcome")
        self.say(b"/nick " + name)
        assert self.line() == b"* you are now " + name

    def read_to_end(self) -> bytes:
        """Read until the server hangs up (the socket timeout bounds each read); returns what was still unread."""
        try:
            while chunk := self.sock.recv(65536):
                self.buffer += chunk
        except ConnectionResetError:
            pass
        return self.buffer

    def close(self) -> None:
        self.sock.close()


def chat_listener(**settings: Any):
    settings = {"handler": chat.handler, "on_connect": chat.joined, "on_close": chat.left, "framing": "line",
                **settings}
    return serving(**settings)


# -- two people ----------------------------------------------------------------------


@pytest.mark.io_modes
def test_two_people_chat():
    """Nicks, the room, private messages, /who, join/rename/leave news, and errors that disturb nobody."""
    with chat_listener() as listener:
        port = listener.port
        alice = Client(port)
        assert alice.line().startswith(b"* welcome")
        for early in (b"hello?", b"/who", b"/msg bob hi"):  # nothing but /nick (and /quit) before a nick
            alice.say(early)
            assert alice.line() == b"! pick a nick first: /nick NAME"
        alice.say(b"/nick alice")
        assert alice.line() == b"* you are now alice"

        bob = Client(port)
        assert bob.line().startswith(b"* welcome")
        bob.say(b"/nick alice")
        assert bob.line() == b"! alice is taken"
        bob.say(b"/nick bob")
        assert bob.line() == b"* you are now bob"
        assert alice.line() == b"* bob joined"

        alice.say(b"hello bob")
        assert bob.line() == b"<alice> hello bob"
        bob.say(b"/msg alice psst")
        assert alice.line() == b"*bob* psst"
        bob.say(b"/msg carol are you there")
        assert bob.line() == b"! nobody is called carol"
        alice.say(b"/who")
        assert alice.line() == b"* online (2): alice bob"

        # Bad input: an error line for bob, nothing at all for alice, and bob carries on.
        bob.say(b"/nick " + b"b" * 17)
        assert bob.line().startswith(b"! a nick is 1 to 16")
        bob.say(b"/nick b\xc3\xb6b")
        assert bob.line().startswith(b"! a nick is 1 to 16")
        bob.say(b"/nick")
        assert bob.line().startswith(b"! a nick is 1 to 16")
        bob.say(b"/frobnicate now")
        assert bob.line() == b"! unknown command /frobnicate"
        assert bob.line().startswith(b"! commands:")
        bob.say(b"/msg alice")
        assert bob.line() == b"! usage: /msg NAME TEXT"
        bob.say(b"ring \x07 \x1b[2J")
        assert bob.line() == b"! control characters are not relayed"
        bob.say(b"still here")
        assert alice.line() == b"<bob> still here"  # the first thing alice hears since /who

        # A rename is news; a rename to a taken nick keeps the old one.
        bob.say(b"/nick robert")
        assert bob.line() == b"* you are now robert"
        assert alice.line() == b"* bob is now robert"
        bob.say(b"/nick alice")
        assert bob.line() == b"! alice is taken"
        alice.say(b"/msg robert still robert?")
        assert bob.line() == b"*alice* still robert?"
        alice.say(b"and still in the room?")  # the failed rename kept him in the room too
        assert bob.line() == b"<alice> and still in the room?"
        alice.say(b"/who")
        assert alice.line() == b"* online (2): alice robert"

        bob.say(b"/quit")
        assert bob.line() == b"* bye"
        assert bob.read_to_end() == b""
        assert alice.line() == b"* robert left"
        alice.say(b"/msg robert are you gone")
        assert alice.line() == b"! nobody is called robert"
        alice.close()
        wait_for(lambda: not listener.broker.everyone(), what="alice's session to go with her connection")
        bob.close()


# -- a slow reader among 1,000 ---------------------------------------------------------

READERS = 998
PAYLOAD = b"x" * 1000


class Readers:
    """Many clients read on the test's own thread (selectors): each must get the sender's lines in order.

    No reading thread: the test reads between the sender's rounds, so that
    what a round takes is the server's work alone, not a fight for the GIL.
    """

    def __init__(self, socks: list[socket.socket]) -> None:
        self.selector = selectors.DefaultSelector()
        self.buffers = [b""] * len(socks)
        self.progress = [0] * len(socks)  # the next broadcast number each reader expects
        self.saw_slow_leave = [False] * len(socks)
        self.errors: list[str] = []
        for index, sock in enumerate(socks):
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, index)

    def read_until(self, done: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        """Read whatever arrives until ``done()``; fail at the deadline or at the first wrong line."""
        deadline = time.monotonic() + timeout
        while not done():
            assert not self.errors, self.errors[:5]
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            for key, _ in self.selector.select(timeout=0.05):
                self.read(key.fileobj, key.data)  # type: ignore[arg-type]
        assert not self.errors, self.errors[:5]

    def read(self, sock: socket.socket, index: int) -> None:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            self.errors.append(f"reader {index} was closed by the server")
            self.selector.unregister(sock)
            return
        lines = (self.buffers[index] + data).split(b"\n")
        self.buffers[index] = lines.pop()
        for line in lines:
            if line.startswith(b"<sender> "):
                number = int(line[9:15])
                if number != self.progress[index] or line[16:] != PAYLOAD:
                    self.errors.append(f"reader {index} got broadcast {number}, expected {self.progress[index]}")
                self.progress[index] = number + 1
            elif line == b"* slow left (outbox_overflow)":
                self.saw_slow_leave[index] = True

    def close(self) -> None:
        self.selector.close()


@pytest.mark.io_modes
def test_a_reader_that_stops_is_closed_and_holds_up_nobody():
    """998 readers get every broadcast in order, the sender never waits, the non-reader overflows and goes."""
    reasons: list[str] = []
    slow_port: list[int] = []
    publishing: list[float] = []  # how long each broadcast's handler call took

    def handler(message, conn):
        started = time.perf_counter()
        chat.handler(message, conn)
        if message.startswith(b"0"):
            publishing.append(time.perf_counter() - started)

    def on_connect(conn):
        # What the kernel buffers for a peer that stopped reading comes before the
        # outbox: Linux grows a loopback send buffer to a few MB. Small buffers for
        # the non-reader (and a 16 KiB outbox) make it overflow within ~15 broadcasts.
        if conn.peer[1] in slow_port:
            conn.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        chat.joined(conn)

    def on_close(conn, reason):
        if over:  # the test is over: skip 999 goodbyes to 999 closing connections (~500,000 posts)
            conn.listener.broker.unregister(conn)
            return
        reasons.append(reason)
        chat.left(conn, reason)

    over = False
    with chat_listener(handler=handler, on_connect=on_connect, on_close=on_close, outbox_limit=16 * 1024,
                       max_connections=2000, acceptors=4) as listener:
        port = listener.port
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.bind(("127.0.0.1", 0))
        slow_port.append(slow.getsockname()[1])
        slow.settimeout(DEADLINE)
        slow.connect(("127.0.0.1", port))
        slow.sendall(b"/nick slow\n")  # and never reads again
        wait_for(lambda: listener.broker.sessions("slow"), what="the slow reader's nick")

        socks = []
        readers = sender = None
        try:
            for i in range(READERS):
                sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
                socks.append(sock)
                sock.sendall(b"/nick r%d\n" % i)
            readers = Readers(socks)
            sender = Client(port)
            sender.nick(b"sender")
            # Each nick is news to everyone before it: ~500,000 posts in all, a second or two (more on a busy machine).
            wait_for(lambda: len(listener.broker.everyone()) == READERS + 2, timeout=3 * DEADLINE,
                     what="everyone's nick")

            assert not reasons, "the non-reader overflowed on the join news alone"
            rounds: list[float] = []
            sent = 0
            overflowed_at = None
            while overflowed_at is None or sent < overflowed_at + 10:
                assert sent < 1000, f"the non-reader was still open after {sent} broadcasts: {reasons}"
                started = time.monotonic()
                sender.say(b"%06d %s" % (sent, PAYLOAD))
                # Lines are handled in order: this reply means the publish has returned.
                sender.say(b"/nick sender")
                sender.until(b"* you are already sender")
                rounds.append(time.monotonic() - started)
                sent += 1
                if overflowed_at is None and "outbox_overflow" in reasons:
                    overflowed_at = sent
                # The readers keep up (they must not overflow); reading is not timed.
                readers.read_until(lambda: min(readers.progress) == sent, "the readers to catch up")

            assert readers.progress == [sent] * READERS, "every reader got every broadcast, in order"
            readers.read_until(lambda: all(readers.saw_slow_leave), "everyone to hear that slow left")
            assert max(publishing) < 0.5, f"a broadcast took the sender's handler {max(publishing):.3f}s"
            assert sum(rounds) < 5.0, f"the sender waited {sum(rounds):.2f}s in {sent} rounds"
            assert reasons == ["outbox_overflow"]
            assert listener.info().closed_by_reason == {"outbox_overflow": 1}
            assert not listener.broker.sessions("slow")
        finally:
            over = True
            if readers is not None:
                readers.close()
            for sock in socks:
                sock.close()
            if sender is not None:
                sender.close()
            slow.close()


# -- several processes, one Redis --------------------------------------------------------


def sessions_by_node(redis_url: str, nicks: list[str]) -> dict[str, str]:
    """nick -> the node (worker process) holding it, from the broker's directory in Redis."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        found = {}
        for nick in nicks:
            record = client.hget(f"netpool:u:{nick}", "")
            assert record is not None, f"{nick} is not in the directory"
            found[nick] = json.loads(record)["n"]
        return found
    finally:
        client.close()


def test_chat_across_processes_on_redis(tmp_path: Path, redis_url: str):
    """Two worker processes, one Redis: unique nicks, private messages and the room reach across processes."""
    with server("run", f"{CHAT}:handler", "--on-connect", f"{CHAT}:joined", "--on-close", f"{CHAT}:left",
                "--framing", "line", "--port", "0", "--processes", "2", "--broker", redis_url,
                cwd=tmp_path) as srv:
        lines = await_lines(srv, {
            "serving": r"2 worker processes serving 127\.0\.0\.1:(\d+)",
            "l0": r"\[0\] listening on",
            "l1": r"\[1\] listening on",
        })
        port = int(lines["serving"][1])
        clients: dict[str, Client] = {}
        try:
            # The kernel hands each client to whichever worker waits in accept(): keep connecting
            # (a bounded number) until both workers hold some.
            while len(clients) < 20 or len(set(sessions_by_node(redis_url, list(clients)).values())) < 2:
                assert len(clients) < 200, "every client landed on one worker"
                nick = f"c{len(clients)}"
                clients[nick] = client = Client(port)
                client.nick(nick.encode())
            nicks = list(clients)
            nodes = sessions_by_node(redis_url, nicks)
            assert len(set(nodes.values())) == 2

            # A nick is unique across processes: someone on the other worker cannot take it.
            first = nicks[0]
            other = next(n for n in nicks if nodes[n] != nodes[first])
            clients[other].say(f"/nick {first}".encode())
            clients[other].until(f"! {first} is taken".encode())
            clients[other].say(b"/who")
            clients[other].until(f"* online ({len(nicks)}): {' '.join(sorted(nicks))}".encode())

            # Everyone writes to the next one, wherever each is.
            for i, nick in enumerate(nicks):
                clients[nick].say(f"/msg {nicks[(i + 1) % len(nicks)]} hello from {nick}".encode())
            for i, nick in enumerate(nicks):
                sender = nicks[i - 1]
                clients[nick].until(f"*{sender}* hello from {sender}".encode())

            # The room reaches both processes.
            clients[first].say(b"hello everyone")
            for nick in nicks[1:]:
                clients[nick].until(f"<{first}> hello everyone".encode())
            clients[other].say(b"and back")
            for nick in nicks:
                if nick != other:
                    clients[nick].until(f"<{other}> and back".encode())

            # Leaving is news on the other worker too, and frees the nick everywhere.
            clients.pop(other).close()
            clients[first].until(f"* {other} left".encode())
            clients[first].say(b"/msg " + other.encode() + b" gone?")
            clients[first].until(f"! nobody is called {other}".encode())
        finally:
            for client in clients.values():
                client.close()
        returncode, stderr = srv.stop(signal.SIGTERM)
        assert returncode == 0, stderr
        assert re.search(r"all workers stopped \(0 restarts, 0 reloads\)", stderr), stderr
        assert "Traceback" not in stderr, stderr
