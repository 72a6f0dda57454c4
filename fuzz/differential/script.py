"""What a differential script is, how a seed (or bytes) decides one, and the echo it must get back.

A script is a few connections to one listener (plain TCP or TLS, thread or
events mode, raw or line framing, a read size), each sending a few rounds of
bytes and then ending in one way. Rounds go out in batches whose pieces are
interleaved between connections with small pauses, so the server reads them
at boundaries nobody chose; the client reads each round's echo back before
the next batch. What is compared between the C and the Python runs must not
depend on those boundaries: each choice below keeps it so, and says how.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Optional

# Bytes that steer the recording handler (server.Recorder); payloads hold them only where a script puts them.
SLEEP = b"~"    # the handler sleeps first: in thread mode the loop is handed off and the connection offloaded
AMPLIFY = b"^"  # after the bytes up to it, the handler sends FILLER: replies larger than the socket buffers
RAISE = b"!"    # the handler raises: handler_error
CLOSE = b"#"    # the handler replies BYE and closes the connection: closed
BIG = b"*"      # the handler sends more than the kernel holds; the client reads a little of it and goes
# The bytes that end a connection: each is only ever the last byte its client sends, so nothing after it
# is left unread whichever read it arrives in (a server closing with unread bytes would send a reset).
TRIGGER = re.compile(rb"[!#*]")
SLEEP_SECONDS = 0.003  # longer than io_loop.HANDOFF_AFTER (2 ms)
FILLER = bytes(range(256)) * 800  # 204,800 bytes
BYE = b"bye"

# How a connection ends once its rounds are echoed: (the close reason the server must give, what the client does).
ENDINGS = {
    "fin": ("eof", "half-close (shutdown SHUT_WR), then read to the end"),
    "close": ("eof", "close with everything read: a FIN, not a reset"),
    "rst": ("reset", "abortive close (SO_LINGER 0)"),
    "notify": ("eof", "TLS only: close_notify, then read to the end"),
    "corrupt": ("tls_error", "TLS only: a record that no longer authenticates, then read to the end"),
    "raise": ("handler_error", "the last byte makes the handler raise"),
    "handler_close": ("closed", "the last byte makes the handler reply BYE and close"),
    "too_large": ("message_too_large", "line framing only: a last line one byte over the limit"),
    "big_rst": ("reset", "the last byte asks for a reply larger than the kernel holds; one read, then SO_LINGER 0"),
    "big_close": ("reset", "as big_rst, then a plain close, which the kernel turns into a reset (unread data)"),
    "open": ("server_stop", "left open until the listener stops"),
}
TRIGGERS = {"raise": RAISE, "handler_close": CLOSE, "big_rst": BIG, "big_close": BIG}
# Endings after which the client reads what comes until the server's end of stream.
READ_TO_END = frozenset({"fin", "notify", "corrupt", "raise", "handler_close", "too_large", "open"})

# Read sizes (max_message_size): raw framing reads at most this much per recv, line framing
# allows lines this long. The tiny ones make every byte a handler call.
SIZES = {"raw": (1, 2, 7, 64, 100, 1000, 4096, 16384, 65536), "line": (16, 100, 1000, 4096, 65536)}
# Payload bytes never include the steering bytes (nor line ends, with line framing).
_RAW_SAFE = bytes.maketrans(b"~^!#*", b"abcde")
_LINE_SAFE = bytes.maketrans(b"~^!#*\n\r", b"abcdefg")


@dataclass(frozen=True)
class Piece:
    """Bytes one connection sends in one go, and the pause after them (seconds)."""

    conn: int
    data: bytes
    pause: float


@dataclass(frozen=True)
class Batch:
    """One round each of some connections, cut into pieces and interleaved; echoes are read in ``conns`` order."""

    conns: tuple[int, ...]
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Plan:
    """One connection: its rounds (payloads), how it ends, and whether its receive buffer is kept small."""

    rounds: tuple[bytes, ...]
    ending: str
    small_window: bool  # SO_RCVBUF 16 KiB: the server's sends fill it at once (and a big reply cannot fit)


@dataclass(frozen=True)
class Script:
    name: str  # how to replay it: "seed 17", or the digest of the bytes it came from
    io: str
    tls: Optional[str]  # None (plain TCP), "1.2" or "1.3"
    framing: str
    max_message_size: int
    plans: tuple[Plan, ...]
    batches: tuple[Batch, ...]
    wire_seed: int  # decides, as the bytes go out, where TLS records are cut into TCP segments


def from_seed(seed: int) -> Script:
    return _generate(random.Random(seed), f"seed {seed}")


def from_bytes(data: bytes) -> Script:
    return _generate(random.Random(data), f"bytes sha1:{hashlib.sha1(data).hexdigest()[:12]}")


def _generate(rng: random.Random, name: str) -> Script:
    io = rng.choice(("threads", "events"))
    tls = rng.choice((None, None, "1.2", "1.3"))
    framing = "line" if rng.random() < 0.3 else "raw"
    size = rng.choice(SIZES[framing])
    plans = tuple(_plan(rng, io, framing, size, tls) for _ in range(rng.choice((1, 1, 2, 2, 3, 4))))
    return Script(name=name, io=io, tls=tls, framing=framing, max_message_size=size, plans=plans,
                  batches=_schedule(rng, plans, size), wire_seed=rng.getrandbits(32))


def _plan(rng: random.Random, io: str, framing: str, size: int, tls: Optional[str]) -> Plan:
    endings = [e for e in ENDINGS
               if (e not in ("notify", "corrupt") or tls) and (e != "too_large" or framing == "line")]
    ending = rng.choice(endings)
    make = _raw_payload if framing == "raw" else _line_payload
    rounds = [make(rng, size) for _ in range(rng.randint(1, 3))]
    trigger = TRIGGERS.get(ending)
    if trigger is not None:
        trigger = trigger if framing == "raw" else trigger + b"\n"
        if io == "events" and ending in ("raise", "handler_close"):
            # A round of its own, once the echo before it is read: an events-mode connection that
            # closes itself sends what the kernel takes at once and drops the rest of its queue,
            # so replies still queued would make the bytes the client gets a matter of timing.
            rounds.append(trigger)
        else:
            rounds[-1] += trigger
    elif ending == "fin" and framing == "line" and rng.random() < 0.5:
        # A last line without its newline: the framer hands it over at end of stream.
        rounds[-1] += _line(rng, rng.randint(1, size), steer=False)
    elif ending == "too_large":
        rounds.append(rng.randbytes(size + 1).translate(_LINE_SAFE))
    return Plan(rounds=tuple(rounds), ending=ending, small_window=ending.startswith("big") or rng.random() < 0.25)


def _raw_payload(rng: random.Random, size: int) -> bytes:
    # Around whole multiples of the read size, or anything up to a few KB. Tiny read sizes make a
    # handler call (and, over TLS, a record) of every byte: fewer bytes then.
    cap = 600 if size < 64 else 140_000
    if rng.random() < 0.6:
        n = rng.choice((1, 1, 2, 3)) * size + rng.choice((-1, 0, 0, 1))
    else:
        n = rng.randint(1, 3000)
    data = rng.randbytes(max(1, min(n, cap))).translate(_RAW_SAFE)
    for steer, chance in ((SLEEP, 0.3), (AMPLIFY, 0.15)):
        if rng.random() < chance:
            i = rng.randrange(len(data))
            data = data[:i] + steer + data[i + 1:]
    return data


def _line_payload(rng: random.Random, size: int) -> bytes:
    lines = []
    for _ in range(rng.randint(1, 12 if size <= 1000 else 3)):
        n = rng.choice((0, size, size - 1, rng.randint(0, min(size, 200)), rng.randint(0, size)))
        lines.append(_line(rng, n, steer=True))
    return b"\n".join(lines) + b"\n"


def _line(rng: random.Random, n: int, *, steer: bool) -> bytes:
    data = rng.randbytes(n).translate(_LINE_SAFE)
    if steer and data and rng.random() < 0.1:
        i = rng.randrange(len(data))
        data = data[:i] + rng.choice((SLEEP, AMPLIFY)) + data[i + 1:]
    return data


def _schedule(rng: random.Random, plans: tuple[Plan, ...], size: int) -> tuple[Batch, ...]:
    """Batches until every round is sent: some connections' next rounds, their pieces interleaved."""
    sent = [0] * len(plans)
    batches = []
    while ready := [i for i, plan in enumerate(plans) if sent[i] < len(plan.rounds)]:
        chosen = rng.sample(ready, rng.randint(1, len(ready)))
        queues = {i: _cut(rng, plans[i].rounds[sent[i]], size) for i in chosen}
        pieces = []
        while queues:
            i = rng.choice(sorted(queues))
            pieces.append(Piece(i, queues[i].pop(0), 0.0 if rng.random() < 0.6 else
                                rng.choice((0.0001, 0.0005, 0.001, 0.002))))
            if not queues[i]:
                del queues[i]
        batches.append(Batch(tuple(chosen), tuple(pieces)))
        for i in chosen:
            sent[i] += 1
    return tuple(batches)


def _cut(rng: random.Random, payload: bytes, size: int) -> list[bytes]:
    """``payload`` in pieces: whole, at (about) multiples of the read size, a byte at a time at first, or anywhere."""
    n = len(payload)
    how = rng.random()
    if n == 1 or how < 0.25:
        return [payload]
    if how < 0.5 and size < n:
        points = {k * size + rng.choice((-1, 0, 0, 1)) for k in range(1, min(n // size, 8) + 1)}
    elif how < 0.6:
        points = set(range(1, min(n, 6)))
    else:
        points = set(rng.sample(range(1, n), min(n - 1, rng.randint(1, 8))))
    edges = [0, *sorted(p for p in points if 0 < p < n), n]
    return [payload[a:b] for a, b in zip(edges, edges[1:])]


# -- what the echo must be (the model: the Python path is held to it too) ------------------


def echoes(script: Script, conn: int) -> list[bytes]:
    """What the client reads back after each round of connection ``conn``, before its ending."""
    plan = script.plans[conn]
    return [_echo(script.framing, payload, plan.ending if n == len(plan.rounds) - 1 else None)
            for n, payload in enumerate(plan.rounds)]


def _echo(framing: str, payload: bytes, ending: Optional[str]) -> bytes:
    if framing == "raw":
        body = payload[:-1] if ending in TRIGGERS else payload
        return body.replace(AMPLIFY, AMPLIFY + FILLER) + (BYE if ending == "handler_close" else b"")
    out = bytearray()
    for line in payload.split(b"\n")[:-1]:  # the last piece is an unfinished line (or nothing)
        if TRIGGER.match(line):
            out += BYE + b"\n" if line == CLOSE else b""
        else:
            out += line + b"\n" + (FILLER + b"\n") * line.count(AMPLIFY)
    return bytes(out)


def tail(script: Script, conn: int) -> Optional[bytes]:
    """What the client reads after its last echo, until the server's end of stream (None: it never reads on)."""
    plan = script.plans[conn]
    if plan.ending not in READ_TO_END:
        return None
    last = plan.rounds[-1]
    if script.framing == "line" and plan.ending == "fin" and not last.endswith(b"\n"):
        return last.rsplit(b"\n", 1)[-1] + b"\n"  # the unfinished line, handed over at end of stream
    return b""


def reasons(script: Script) -> list[str]:
    """The close reason the server must give each connection."""
    return [ENDINGS[plan.ending][0] for plan in script.plans]


def describe(script: Script) -> str:
    """A few lines a person can read: the settings, each connection's rounds and ending."""
    lines = [f"{script.name}: {script.io} mode, {'TLS ' + script.tls if script.tls else 'plain TCP'}, "
             f"{script.framing} framing, max_message_size {script.max_message_size}, "
             f"{len(script.batches)} batches"]
    for i, plan in enumerate(script.plans):
        marks = [name for name, byte in (("sleep", SLEEP), ("amplify", AMPLIFY))
                 if any(byte in payload for payload in plan.rounds)]
        lines.append(f"  conn {i}: rounds of {[len(r) for r in plan.rounds]} bytes, ending {plan.ending}"
                     + (", small window" if plan.small_window else "") + (f", {' '.join(marks)}" if marks else ""))
    return "\n".join(lines)
