"""The server side of a script: a real listener on 127.0.0.1 with a recording handler, run with either hot path.

``run(script, c=...)`` switches the hot path (``hot_path.use_speedups``: it
takes effect for loops started afterwards, so each run starts its own
listener), plays the script's client side, waits (with a deadline) for the
connections to close, stops the listener and returns what both sides saw as
plain data. Only what must come out the same however the bytes were cut is
kept: with raw framing a message is whatever one read returned, so the
server's side is the bytes received end to end (and how many messages were
longer than a read may be); with line framing, the messages themselves.
"""

from __future__ import annotations

import collections
import functools
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Optional

import netpool
from netpool import hot_path
from netpool.listener import install_hot_path

from . import client as clients
from . import script as scripts

# The reply a BIG byte asks for, which the client reads a little of and then resets. Events mode
# queues what the kernel does not take: 3 MiB stays under io_loop.LOOP_QUEUE_LIMIT (4 MiB), so it
# is queued whole (no send_overflow), and bytes_out ends up with what left before the reset
# (big_reply_counted). Thread mode counts it once sent: 8 MiB is more than the kernel holds for a client with a 16 KiB receive buffer (the
# server's send buffer stops at net.ipv4.tcp_wmem's 4 MiB), so the send is still waiting when
# the reset comes, and it never counts.
BIG_REPLY = {"events": 3 << 20, "threads": 8 << 20}
CLOSE_DEADLINE = 10.0  # seconds for the server to close every connection the script ended


@functools.cache
def big_reply(io: str) -> bytes:
    return b"B" * BIG_REPLY[io]


class Recorder:
    """The handler and on_close of a run: what each connection (by its client's port) got, and how it ended."""

    def __init__(self, script: scripts.Script) -> None:
        self.raw = script.framing == "raw"
        self.io = script.io
        self.limit = script.max_message_size
        self.seen: dict[int, list[bytes]] = collections.defaultdict(list)
        self.ends: dict[int, dict[str, Any]] = {}

    def handler(self, message: bytes, conn: netpool.Connection) -> None:
        self.seen[conn.peer[1]].append(message)  # one connection's calls run one at a time
        if scripts.SLEEP in message:
            time.sleep(scripts.SLEEP_SECONDS)
        trigger = scripts.TRIGGER.search(message)
        end = trigger.start() if trigger else len(message)
        body = message[:end]
        if self.raw:
            # The bytes up to each AMPLIFY, then FILLER: where the filler lands in the echo does not
            # depend on where the reads ended.
            pieces = body.split(scripts.AMPLIFY)
            for piece in pieces[:-1]:
                conn.send(piece + scripts.AMPLIFY)
                conn.send(scripts.FILLER)
            if pieces[-1]:
                conn.send(pieces[-1])
        elif trigger is None:
            conn.send(body)
            for _ in range(body.count(scripts.AMPLIFY)):
                conn.send(scripts.FILLER)
        if trigger is None:
            return
        if message[end:end + 1] == scripts.RAISE:
            raise ValueError("the script's RAISE byte")
        if message[end:end + 1] == scripts.CLOSE:
            conn.send(scripts.BYE)
            conn.close()
        else:
            conn.send(big_reply(self.io))

    def closed(self, conn: netpool.Connection, reason: str) -> None:
        self.ends[conn.peer[1]] = {"reason": reason, "bytes_in": conn.bytes_in, "bytes_out": conn.bytes_out}

    def view(self, port: Optional[int]) -> dict[str, Any]:
        """What the server saw of the connection from ``port``; messages kept as far as they are deterministic."""
        if port is None:
            return {"connected": False}
        messages = self.seen.get(port, [])
        seen: dict[str, Any] = {"received": b"".join(messages),
                                "oversized": sum(len(m) > self.limit for m in messages)} if self.raw else {
            "messages": messages}
        return {**seen, **self.ends.get(port, {"reason": None})}


class PKI:
    """A CA and the server's certificate (tests/certs.py), and the client context that trusts them."""

    def __init__(self, directory: Path) -> None:
        from tests.certs import TestCA  # the tests' own PKI, as fuzz/seeds.py takes the tests' vectors

        self.ca = TestCA(directory)
        self.server = self.ca.issue("localhost", hosts=("localhost", "127.0.0.1"))

    def settings(self) -> dict[str, str]:
        return {"certfile": str(self.server.cert), "keyfile": str(self.server.key)}

    def context(self, version: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.path))
        context.minimum_version = context.maximum_version = getattr(ssl.TLSVersion, "TLSv" + version.replace(".", "_"))
        return context


def run(script: scripts.Script, *, c: bool, pki: PKI) -> dict[str, Any]:
    """Play ``script`` against a new listener on the C (``c``) or the Python hot path; what both sides saw."""
    install_hot_path(tls=True)
    before = hot_path.speedups_active()
    if hot_path.use_speedups(c) != c:
        hot_path.use_speedups(before)
        raise RuntimeError("netpool._speedups is not built: there is no C hot path to compare")
    try:
        return _run(script, pki)
    finally:
        hot_path.use_speedups(before)


def _run(script: scripts.Script, pki: PKI) -> dict[str, Any]:
    recorder = Recorder(script)
    settings: dict[str, Any] = {"handler": recorder.handler, "on_close": recorder.closed, "port": 0, "io": script.io,
                                "framing": script.framing, "max_message_size": script.max_message_size,
                                "name": "hot-path-diff"}
    if script.tls:
        settings["ssl"] = pki.settings()
    context = pki.context(script.tls) if script.tls else None
    listener = netpool.start_listener(settings)
    try:
        with clients.Session(script, (listener.config.host, listener.port), context) as session:
            try:
                session.play()
                # Every connection the script ended has closed before the listener stops (server_stop).
                unclosed = _wait_closed(listener, sum(plan.ending != "open" for plan in script.plans))
            finally:
                info = listener.stop(grace=2.0)
            session.finish()
    finally:
        listener.stop()  # again, if play() raised: a no-op otherwise
    ports = [port for port in session.ports if port is not None]
    if len(set(ports)) != len(ports):  # the server's records are by the client's port
        raise RuntimeError(f"{script.name}: two of its connections had the same port; run it again")
    conns = [{"client": view, "server": recorder.view(port)} for view, port in zip(session.views, session.ports)]
    bytes_out = info.bytes_out
    for plan, conn in zip(script.plans, conns):
        if plan.ending.startswith("big") and isinstance(conn["server"].get("bytes_out"), int):
            bytes_out -= conn["server"]["bytes_out"]
            conn["server"]["bytes_out"] = big_reply_counted(script, conn)
    return {
        "listener": {"accepted": info.accepted, "closed": info.closed, "errors": info.errors,
                     "closed_by_reason": dict(sorted(info.closed_by_reason.items())), "bytes_in": info.bytes_in,
                     "bytes_out": bytes_out, "open": info.open, "unclosed_before_stop": unclosed},
        "conns": conns,
    }


def big_reply_counted(script: scripts.Script, conn: dict[str, Any]) -> str:
    """What bytes_out says of a connection that reset during its big reply, in words both runs must agree on.

    bytes_out counts what left: the echoes, and the part of the big reply the
    kernel had taken when the reset came. How much is timing, up to all of it
    (thread mode counts a send's first part and, on a timeout, what followed;
    a reset while it waits loses the count of the rest).
    """
    extra = conn["server"]["bytes_out"] - sum(map(len, conn["client"]["echoes"]))
    big = len(big_reply(script.io)) + (script.framing == "line")
    if 0 <= extra <= big:
        return "the echoes and at most the big reply"
    return f"{extra} bytes more than the echoes, of a {big}-byte reply"


def _wait_closed(listener: netpool.Listener, n: int) -> int:
    """Wait (CLOSE_DEADLINE at most) until ``n`` connections have closed; how many had not."""
    deadline = time.monotonic() + CLOSE_DEADLINE
    pause = threading.Event()
    while (closed := listener.info().closed) < n and time.monotonic() < deadline:
        pause.wait(0.002)
    return max(0, n - closed)
