"""A line-based chat server: nicks, a shared room, private messages, who is online.

Serve it with::

    netpool run netpool.examples.chat.chat:handler --framing line \\
        --on-connect netpool.examples.chat.chat:joined \\
        --on-close netpool.examples.chat.chat:left

and add ``--processes 2 --broker redis://127.0.0.1:6379/0`` to run it on
several processes (or machines) at once. Talk to it with ``nc 127.0.0.1 5555``.

The protocol, one line each way::

    /nick NAME        claim a nick (unique on every server sharing the broker)
    /msg NAME TEXT    a private message
    /who              who is online
    /quit             leave
    anything else     said to the room: everyone else gets "<nick> text"

Lines from the server start with ``*`` (news), ``!`` (an error, only for
you), ``<nick>`` (the room) or ``*nick*`` (a private message).

Two rules make it work, and the README explains both:

- Every piece of shared state (who has which nick, who is in the room) lives
  in the listener's broker, never in this module: with ``--processes N``
  each process has its own copy of the module, and only the broker is seen
  by all of them.
- Nothing here ever calls another connection's ``send``: other people are
  reached through ``publish`` and ``deliver``, which only post to their
  outboxes and never wait. ``conn.send`` is for answering ``conn`` itself.
"""

from __future__ import annotations

import re

import netpool
from netpool.broker import LocalBroker, Session
from netpool.errors import BrokerUnavailable

# Constants are fine at module level: every process has the same ones.
# (Mutable state is not; see the module's docstring.)
ROOM = "chat:room"
NICK = re.compile(rb"[A-Za-z0-9_-]{1,16}")
# Control characters (an ANSI escape, a bare \r) could rewrite other people's
# terminals: the server refuses to relay them. Tab is allowed.
CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
HELP = b"! commands: /nick NAME, /msg NAME TEXT, /who, /quit; any other line goes to the room"
GREETING = b"* welcome to netpool chat: pick a nick with /nick NAME (letters, digits, _ or -, at most 16)"
# Reasons that are just "they left"; anything else is worth telling the room.
ORDINARY = {"eof", "quit", "reset", "closed"}


def joined(conn: netpool.Connection) -> None:
    """on_connect: greet; nobody else hears of this client until it has a nick."""
    conn.send(GREETING)


def left(conn: netpool.Connection, reason: str) -> None:
    """on_close: give the nick back (on every server) and tell the room."""
    session = conn.listener.broker.unregister(conn)  # also leaves the room
    if session is not None:
        why = b"" if reason in ORDINARY else b" (%s)" % reason.encode()
        conn.listener.broker.publish(ROOM, b"* %s left%s" % (session.user.encode(), why))


def handler(message: bytes, conn: netpool.Connection) -> None:
    """One line from one client; a client's lines come one at a time, in order."""
    broker = conn.listener.broker
    session = broker.session_of(conn)  # the nick lives in the broker, not in conn.state
    command, _, rest = message.partition(b" ")

    if command == b"/quit":
        conn.send(b"* bye")
        conn.close("quit", graceful=True)  # graceful: the "bye" still goes out; on_close says "left"
    elif command == b"/nick":
        nick(conn, broker, session, rest.strip())
    elif session is None:
        conn.send(b"! pick a nick first: /nick NAME")
    elif command == b"/msg":
        name, _, text = rest.strip().partition(b" ")
        private(conn, broker, session.user, name, text)
    elif command == b"/who":
        who(conn, broker)
    elif command.startswith(b"/"):
        conn.send(b"! unknown command %s" % command[:32])
        conn.send(HELP)
    elif CONTROL.search(message):
        conn.send(b"! control characters are not relayed")
    elif message.strip():
        # The fan-out: one post per member of the room, into each outbox.
        # publish() never waits for anyone, so a reader that stopped reading
        # costs this sender nothing (it gets closed once its outbox overflows).
        broker.publish(ROOM, b"<%s> %s" % (session.user.encode(), message), exclude=conn)


def nick(conn: netpool.Connection, broker: LocalBroker, session: Session | None, name: bytes) -> None:
    """/nick NAME: claim NAME everywhere (the broker's directory makes it unique), then join the room."""
    if not NICK.fullmatch(name):
        conn.send(b"! a nick is 1 to 16 letters, digits, _ or -")
        return
    new = name.decode("ascii")
    old = session.user if session is not None else None
    if new == old:
        conn.send(b"* you are already %s" % name)
        return
    try:
        # A rename keeps the session (and its room); a failed one changes nothing.
        claimed = broker.register(conn, user=new)
    except BrokerUnavailable:
        conn.send(b"! nicks cannot be claimed right now (the directory is unreachable): try again soon")
        return
    if claimed is None:
        conn.send(b"! %s is taken" % name)
        return
    conn.send(b"* you are now %s" % name)
    if old is None:
        broker.join(conn, ROOM)
        broker.publish(ROOM, b"* %s joined" % name, exclude=conn)
    else:
        broker.publish(ROOM, b"* %s is now %s" % (old.encode(), name), exclude=conn)


def private(conn: netpool.Connection, broker: LocalBroker, me: str, name: bytes, text: bytes) -> None:
    """/msg NAME TEXT: to NAME's session, wherever it is; the sender hears if it cannot be delivered."""
    if not NICK.fullmatch(name) or not text.strip():
        conn.send(b"! usage: /msg NAME TEXT")
        return
    if CONTROL.search(text):
        conn.send(b"! control characters are not relayed")
        return
    try:
        sessions = broker.sessions(name.decode("ascii"))
    except BrokerUnavailable:
        # Redis is away: this process's own sessions can still be reached.
        sessions = broker.local_sessions(name.decode("ascii"))
        if not sessions:
            conn.send(b"! %s is not on this server, and the others cannot be asked right now" % name)
            return
    if not sessions:
        conn.send(b"! nobody is called %s" % name)
        return
    # deliver() posts and returns at once. False: not taken (gone, outbox
    # full). A session in another process that vanished meanwhile is only
    # found out there: then `bounce` comes back to this connection later.
    bounce = b"! your message to %s could not be delivered" % name
    line = b"*%s* %s" % (me.encode(), text)
    if not any([broker.deliver(s, line, bounce=bounce, sender=conn) for s in sessions]):
        conn.send(bounce)


def who(conn: netpool.Connection, broker: LocalBroker) -> None:
    """/who: every nick online, on every server sharing the broker."""
    try:
        sessions, note = broker.everyone(), b""
    except BrokerUnavailable:
        sessions, note = broker.local_sessions(), b" (this server only: the directory is unreachable)"
    nicks = sorted({s.user for s in sessions})
    conn.send(b"* online (%d)%s: %s" % (len(nicks), note, " ".join(nicks).encode()))
