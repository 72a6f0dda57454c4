"""The chat benchmark behind `make bench-chat`: fan-out past a stalled reader, and delivery in and across processes.

Three measurements, all in one run on this machine, servers started here
(the chat example through `netpool run`, the XMPP example through
`netpool xmpp`) and a real redis-server on a free loopback port:

1. **Fan-out with a stalled reader.** 1,000 chat users, one of whom never
   reads and whose kernel buffers are already full; another broadcasts a
   line every 50 ms. For each broadcast: how long until the last of the
   other 998 has it. In both I/O modes. Target: under 50 ms.
2. **Private messages, one process and two.** Pairs of users, senders and
   recipients on one server (`--broker` unset: in-process), or senders on
   one server and recipients on another sharing Redis (every message
   crosses processes). After a second of warm-up (not counted), a fixed
   1,000 messages/s for some seconds: p50 and p99 delivery latency; then
   as fast as a window of 64 in flight allows: the message rate. Target:
   cross-process p99 under 5 ms at 1,000/s.
3. **The same for XMPP** (messages to full JIDs, raw XMPP over sockets).

Latency is measured by the clients, which stamp each message with the
time it was sent; clients and servers share this machine's two cores, so
figures are upper bounds of what the servers alone would take. Every run
is bounded: fixed counts and durations, deadlines on every read.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import queue
import re
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import LocalRedis  # noqa: E402 - the benchmark's own redis-server starter (bench/run.py)
NETPOOL = str(Path(sys.executable).with_name("netpool"))
CHAT = "netpool.examples.chat.chat"
DEADLINE = 20.0
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


@contextlib.contextmanager
def serve(argv: list[str]) -> Iterator[int]:
    """A netpool CLI server; yields its port once it logs where it listens (its log is read to the end)."""
    proc = subprocess.Popen([NETPOOL, *argv, "--port", "0", "--log-level", "info", "--max-connections", "5000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found: "queue.Queue[Optional[int]]" = queue.Queue()

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:  # read to the end, so the server never blocks on a full pipe
            match = LISTENING.search(line)
            if match:
                found.put(int(match[1]))
        found.put(None)

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        port = found.get(timeout=DEADLINE)
        if port is None:
            raise RuntimeError(f"{argv} exited before listening")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(DEADLINE)


def chat_server(*extra: str) -> list[str]:
    return ["run", f"{CHAT}:handler", "--on-connect", f"{CHAT}:joined", "--on-close", f"{CHAT}:left",
            "--framing", "line", *extra]


class LineClient:
    def __init__(self, port: int, *, rcvbuf: Optional[int] = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\n")

    def nick(self, name: str) -> None:
        self.line()  # the greeting
        self.send(b"/nick " + name.encode())
        while not self.line().startswith(b"* you are now"):
            pass


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


# -- 1. fan-out past a stalled reader ------------------------------------------------------------


def fanout(io: str, users: int, rounds: int) -> dict[str, Any]:
    with serve(chat_server("--io", io, "--outbox-limit", str(64 << 20))) as port:
        stalled = LineClient(port, rcvbuf=4096)
        stalled.nick("stalled")
        sender = LineClient(port)
        sender.nick("sender")
        readers = []
        for i in range(users - 2):
            client = LineClient(port)
            client.nick(f"u{i}")
            readers.append(client)
        selector = selectors.DefaultSelector()
        for client in readers:
            selector.register(client.sock, selectors.EVENT_READ, client)

        def drain_all(want: Callable[[bytes], bool], deadline: float) -> float:
            """Read every reader until each has a line ``want`` accepts; when the last one had it."""
            left = set(readers)
            last = 0.0
            while left and time.monotonic() < deadline:
                for key, _ in selector.select(0.5):
                    client = key.data
                    data = client.sock.recv(1 << 20)
                    now = time.perf_counter()
                    client.buf += data
                    while b"\n" in client.buf:
                        line, _, client.buf = client.buf.partition(b"\n")
                        if client in left and want(line):
                            left.discard(client)
                            last = now
            if left:
                raise RuntimeError(f"{len(left)} readers never got the broadcast")
            return last

        sender.send(b"ready")  # everyone is in once everyone has this (and every join before it)
        drain_all(lambda line: line == b"<sender> ready", time.monotonic() + DEADLINE)
        # Fill the stalled reader's kernel buffers and part of its outbox: 4 MB it will never read.
        fill = b"f" * 60000
        for i in range(70):
            sender.send(fill + b"%d" % i)
        drain_all(lambda line: line.endswith(b"f69"), time.monotonic() + 60)
        took = []
        for i in range(rounds):
            started = time.perf_counter()
            sender.send(b"round %d" % i)
            last = drain_all(lambda line, i=i: line.endswith(b"round %d" % i), time.monotonic() + DEADLINE)
            took.append((last - started) * 1000)
            time.sleep(0.05)
        stalled.sock.close()
        sender.sock.close()
        for client in readers:
            client.sock.close()
    return {"io": io, "users": users, "rounds": rounds, "p50_ms": statistics.median(took),
            "p99_ms": percentile(took, 0.99), "max_ms": max(took)}


# -- 2. and 3. private messages in and across processes ------------------------------------------


class Pairs:
    """Senders and recipients of one kind (chat lines or XMPP), timing each message from send to arrival."""

    def __init__(self, senders: list[Any], recipients: list[Any], send: Callable[[Any, int, float], None],
                 stamp: Callable[[bytes], list[float]]) -> None:
        self.senders, self.recipients = senders, recipients
        self.send, self.stamp = send, stamp
        self.selector = selectors.DefaultSelector()
        for client in recipients:
            self.selector.register(client.sock, selectors.EVENT_READ, client)
        self.received: list[float] = []

    def poll(self, timeout: float) -> None:
        for key, _ in self.selector.select(timeout):
            data = key.data.sock.recv(1 << 20)
            now = time.perf_counter()
            self.received += [now - sent for sent in self.stamp(data)]

    def paced(self, rate: int, seconds: float) -> dict[str, Any]:
        """``rate`` messages a second for ``seconds``: the latency of each."""
        self.received = []
        total = int(rate * seconds)
        started = time.perf_counter()
        for n in range(total):
            due = started + n / rate
            while (now := time.perf_counter()) < due:
                self.poll(max(0.0, due - now))
            self.send(self.senders[n % len(self.senders)], n % len(self.senders), time.perf_counter())
        deadline = time.monotonic() + DEADLINE
        while len(self.received) < total and time.monotonic() < deadline:
            self.poll(0.2)
        lat = [x * 1000 for x in self.received]
        return {"sent": total, "delivered": len(lat), "p50_ms": statistics.median(lat),
                "p99_ms": percentile(lat, 0.99), "max_ms": max(lat)}

    def flat_out(self, count: int, window: int = 64) -> dict[str, Any]:
        """``count`` messages with at most ``window`` in flight: messages a second."""
        self.received = []
        started = time.perf_counter()
        sent = 0
        deadline = time.monotonic() + 60
        while len(self.received) < count and time.monotonic() < deadline:
            while sent < count and sent - len(self.received) < window:
                self.send(self.senders[sent % len(self.senders)], sent % len(self.senders), time.perf_counter())
                sent += 1
            self.poll(0.05)
        took = time.perf_counter() - started
        return {"messages": len(self.received), "per_second": len(self.received) / took}


def make_pairs(sender_port: int, recipient_port: int, pairs: int, client: Callable[[int], Any],
               login: Callable[[Any, str], Any], send: Callable[[Any, int, float], None], stamps: "re.Pattern[bytes]"
               ) -> Pairs:
    """``pairs`` logged-in senders (s0, s1, ...) on one port and recipients (r0, r1, ...) on the other."""
    senders, recipients = [], []
    for i in range(pairs):
        s, r = client(sender_port), client(recipient_port)
        login(s, f"s{i}")
        login(r, f"r{i}")
        senders.append(s)
        recipients.append(r)
    return Pairs(senders, recipients, send, lambda data: [float(m) for m in stamps.findall(data)])


def chat_pairs(sender_port: int, recipient_port: int, pairs: int) -> Pairs:
    def send(client: LineClient, i: int, now: float) -> None:
        client.send(b"/msg r%d t%.6f" % (i, now))

    return make_pairs(sender_port, recipient_port, pairs, LineClient, LineClient.nick, send,
                      re.compile(rb"\*s\d+\* t(\d+\.\d+)"))


class XMPPClient:
    """Just enough XMPP to log in and send messages (PLAIN, bind); what arrives is scanned, not parsed."""

    HEADER = ("<?xml version='1.0'?><stream:stream to='localhost' xmlns='jabber:client' "
              "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.buf = b""

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed: {self.buf[-300:]!r}")
            self.buf += chunk
        before, _, self.buf = self.buf.partition(marker)
        return before

    def login(self, user: str) -> str:
        self.sock.sendall(self.HEADER.encode())
        self.until(b"</stream:features>")
        payload = base64.b64encode(f"\0{user}\0x".encode()).decode()
        self.sock.sendall(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{payload}</auth>"
                          .encode())
        self.until(b"<success")
        self.sock.sendall(self.HEADER.encode())
        self.until(b"</stream:features>")
        self.sock.sendall(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                          b"<resource>r</resource></bind></iq>")
        self.until(b"</iq>")
        self.buf = b""
        return f"{user}@localhost/r"


def xmpp_pairs(sender_port: int, recipient_port: int, pairs: int) -> Pairs:
    def send(client: XMPPClient, i: int, now: float) -> None:
        client.sock.sendall(b"<message to='r%d@localhost/r' type='chat'><body>t%.6f</body></message>" % (i, now))

    return make_pairs(sender_port, recipient_port, pairs, XMPPClient, XMPPClient.login, send,
                      re.compile(rb"<body>t(\d+\.\d+)</body>"))


def private_messages(kind: str, redis_url: str, pairs: int, rate: int, seconds: float, count: int
                     ) -> list[dict[str, Any]]:
    make = chat_server if kind == "chat" else (lambda *extra: ["xmpp", "--accept-any-password", *extra])
    connect = chat_pairs if kind == "chat" else xmpp_pairs
    rows = []
    with serve(make()) as port:
        rows.append({"kind": kind, "where": "one process", **measure(connect(port, port, pairs), rate, seconds, count)})
    with serve(make("--broker", redis_url)) as one, serve(make("--broker", redis_url)) as two:
        rows.append({"kind": kind, "where": "two processes, Redis",
                     **measure(connect(one, two, pairs), rate, seconds, count)})
    return rows


def measure(pairs: Pairs, rate: int, seconds: float, count: int) -> dict[str, Any]:
    """A second of the paced load first, not counted (threads started, lookups remembered), then the runs."""
    pairs.paced(rate, 1.0)
    return {**pairs.paced(rate, seconds), **pairs.flat_out(count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1000, help="chat users in the fan-out run")
    parser.add_argument("--rounds", type=int, default=40, help="broadcasts timed per I/O mode")
    parser.add_argument("--pairs", type=int, default=100, help="sender/recipient pairs for private messages")
    parser.add_argument("--rate", type=int, default=1000, help="messages a second in the paced run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the paced run")
    parser.add_argument("--count", type=int, default=20000, help="messages in the flat-out run")
    args = parser.parse_args()
    print(f"# chat benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {sys.platform}, Python {sys.version.split()[0]}")
    print("\n## fan-out: one broadcast to every user but a stalled one (time until the last has it)\n")
    print("| I/O mode | users | broadcasts | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for io in ("threads", "events"):
        r = fanout(io, args.users, args.rounds)
        print(f"| {r['io']} | {r['users']} | {r['rounds']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} |",
              flush=True)
    print(f"\n## private messages: {args.pairs} pairs, {args.rate}/s for {args.seconds:g} s, then "
          f"{args.count} with 64 in flight\n")
    print("| protocol | where | delivered | p50 ms | p99 ms | max ms | flat out msg/s |")
    print("|---|---|---|---|---|---|---|")
    with LocalRedis(cpu=None) as redis:
        url = redis.url
        for kind in ("chat", "xmpp"):
            for r in private_messages(kind, url, args.pairs, args.rate, args.seconds, args.count):
                print(f"| {r['kind']} | {r['where']} | {r['delivered']}/{r['sent']} | {r['p50_ms']:.2f} | "
                      f"{r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['per_second']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
