"""The session broker: sessions, topics and delivery in one process, and across nodes through a real Redis.

A "node" is one broker; several in one test process stand for several
processes (each listener here has its own RedisBroker, as each worker
process would), and a real subprocess stands for a node that is killed.
Clients are real sockets on loopback; what they read is what a user sees.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import netpool
from netpool.broker import LocalBroker, Session
from netpool.errors import BrokerUnavailable
from netpool.redis_broker import RedisBroker

from .conftest import DEADLINE, connect, serving, wait_for


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"closed after {data!r}")
        data += chunk
    return data[:-1]


class Chat:
    """A line server on a broker: 'as NAME' registers, 'to NAME TEXT' delivers, 'all TEXT' publishes."""

    def __init__(self) -> None:
        self.listener: Any = None

    def handle(self, message: bytes, conn: netpool.Connection) -> None:
        broker = conn.listener.broker
        command, _, rest = message.partition(b" ")
        if command == b"as":
            session = broker.register(conn, rest.decode())
            if session is not None:
                broker.join(conn, "all")
            conn.send(b"ok" if session is not None else b"taken")
        elif command == b"to":
            name, _, text = rest.partition(b" ")
            try:
                sessions = broker.sessions(name.decode())
            except BrokerUnavailable:
                sessions = broker.local_sessions(name.decode())
            sent = [broker.deliver(s, text, bounce=b"bounced " + text, sender=conn) for s in sessions]
            if not any(sent):
                conn.send(b"nobody " + name)
        elif command == b"all":
            broker.publish("all", rest, exclude=conn)

    def left(self, conn: netpool.Connection, reason: str) -> None:
        conn.listener.broker.unregister(conn)

    def settings(self, **extra: Any) -> dict[str, Any]:
        return {"handler": self.handle, "on_close": self.left, "framing": "line", **extra}


def login(listener: netpool.Listener, name: str) -> socket.socket:
    sock = connect(listener)
    sock.sendall(b"as %s\n" % name.encode())
    assert read_line(sock) == b"ok"
    return sock


# -- one process -------------------------------------------------------------------------------


def test_the_local_broker_delivers_publishes_and_keeps_names_unique():
    chat = Chat()
    with serving(**chat.settings()) as listener:
        assert isinstance(listener.broker, LocalBroker) and not isinstance(listener.broker, RedisBroker)
        alice, bob, carol = (login(listener, n) for n in ("alice", "bob", "carol"))
        twin = connect(listener)
        twin.sendall(b"as alice\n")
        assert read_line(twin) == b"taken"
        alice.sendall(b"to bob hello bob\n")
        assert read_line(bob) == b"hello bob"
        alice.sendall(b"to dave anyone?\n")
        assert read_line(alice) == b"nobody dave"
        alice.sendall(b"all hi all\n")
        assert read_line(bob) == b"hi all" and read_line(carol) == b"hi all"
        assert sorted(s.user for s in listener.broker.everyone()) == ["alice", "bob", "carol"]
        bob.close()
        wait_for(lambda: listener.broker.sessions("bob") == [], what="bob's session to go")
        alice.sendall(b"to bob still there?\n")
        assert read_line(alice) == b"nobody bob"
        twin.sendall(b"as alice2\n")
        assert read_line(twin) == b"ok"
        for sock in (alice, carol, twin):
            sock.close()


def test_meta_updates_are_seen_and_a_connection_holds_one_session():
    with serving(handler=lambda m, c: None) as listener:
        client = connect(listener)
        wait_for(lambda: listener.connections(), what="the connection")
        conn = listener.connections()[0]
        broker = listener.broker
        first = broker.register(conn, "alice", "phone", {"available": False})
        assert first is not None and first.meta == {"available": False}
        assert broker.update(conn, available=True, priority=5).meta == {"available": True, "priority": 5}
        assert broker.sessions("alice")[0].meta["priority"] == 5
        second = broker.register(conn, "alice", "laptop")  # registering again replaces the first
        assert second is not None and [s.name for s in broker.sessions("alice")] == ["laptop"]
        assert broker.unregister(conn) == second and broker.everyone() == []
        with pytest.raises(KeyError):
            broker.update(conn, available=False)
        client.close()


def test_a_rename_keeps_the_topics_and_a_failed_one_keeps_the_old_name():
    with serving(handler=lambda m, c: None) as listener:
        clients = [connect(listener), connect(listener)]
        wait_for(lambda: len(listener.connections()) == 2, what="two connections")
        first, second = listener.connections()
        broker = listener.broker
        assert broker.register(first, "alice") and broker.register(second, "bob")
        broker.join(first, "room")
        assert broker.register(first, "bob") is None  # taken: alice stays alice, in the room
        assert broker.session_of(first).user == "alice" and broker.members("room") == 1
        renamed = broker.register(first, "carol")
        assert renamed is not None and renamed.user == "carol" and broker.members("room") == 1
        assert broker.sessions("alice") == [] and broker.register(second, "alice") is not None
        for client in clients:
            client.close()


# -- across nodes, through Redis ------------------------------------------------------------------


@pytest.fixture
def two_nodes(redis_url: str) -> Iterator[tuple[netpool.Listener, netpool.Listener]]:
    chat = Chat()
    with serving(**chat.settings(broker=redis_url)) as one, serving(**chat.settings(broker=redis_url)) as two:
        assert isinstance(one.broker, RedisBroker) and one.broker.node != two.broker.node
        yield one, two


def test_sessions_on_two_nodes_reach_each_other(two_nodes):
    one, two = two_nodes
    alice, bob = login(one, "alice"), login(two, "bob")
    clash = connect(two)
    clash.sendall(b"as alice\n")  # alice is taken on the other node: names are unique across nodes
    assert read_line(clash) == b"taken"
    alice.sendall(b"to bob across\n")
    assert read_line(bob) == b"across"
    bob.sendall(b"to alice and back\n")
    assert read_line(alice) == b"and back"
    bob.sendall(b"all to everyone\n")
    assert read_line(alice) == b"to everyone"
    assert {(s.user, s.node) for s in one.broker.everyone()} == {("alice", one.broker.node),
                                                                  ("bob", two.broker.node)}
    for sock in (alice, bob, clash):
        sock.close()


def test_a_message_whose_recipient_left_in_flight_comes_back_to_its_sender(two_nodes):
    one, two = two_nodes
    alice, bob = login(one, "alice"), login(two, "bob")
    stale = one.broker.sessions("bob")[0]
    bob.close()
    wait_for(lambda: two.broker.local_sessions() == [], what="bob to leave node two")
    # The session alice's node looked up a moment ago is gone on its node: node two sends the bounce back.
    conn = next(c for c in one.connections())
    assert one.broker.deliver(stale, b"are you there", bounce=b"bounced: are you there", sender=conn)
    assert read_line(alice) == b"bounced: are you there"
    alice.close()


def test_one_thousand_users_on_two_nodes_each_message_one_on_the_other(two_nodes):
    """Every one of 1,000 messages is delivered (none lost, none bounced)."""
    one, two = two_nodes
    users = 500  # per node: 1,000 in all
    left = [login(one, f"a{i}") for i in range(users)]
    right = [login(two, f"b{i}") for i in range(users)]
    for i, sock in enumerate(left):
        sock.sendall(b"to b%d from a%d\n" % (i, i))
    for i, sock in enumerate(right):
        sock.sendall(b"to a%d from b%d\n" % (i, i))
    for i, sock in enumerate(right):
        assert read_line(sock) == b"from a%d" % i
    for i, sock in enumerate(left):
        assert read_line(sock) == b"from b%d" % i
    for sock in left + right:
        sock.close()


def test_the_directory_forgets_users_who_left(two_nodes, redis_url: str):
    """everyone() reads the users still there, not every name ever used."""
    import redis

    one, _ = two_nodes
    socks = [login(one, f"u{i}") for i in range(5)]
    rename = socks[0]
    rename.sendall(b"as renamed\n")
    assert read_line(rename) == b"ok"
    directory = redis.Redis.from_url(redis_url)
    assert {m.decode() for m in directory.smembers("netpool:users")} == {"renamed", "u1", "u2", "u3", "u4"}
    for sock in socks:
        sock.close()
    wait_for(lambda: one.broker.local_sessions() == [], what="every session to end")
    assert directory.smembers("netpool:users") == set() and one.broker.everyone() == []
    directory.close()


NODE_SCRIPT = textwrap.dedent("""
    import sys, threading
    import netpool
    from tests.test_broker import Chat
    listener = netpool.start_listener(Chat().settings(broker=sys.argv[1], port=0))
    print(listener.port, flush=True)
    threading.Event().wait()
""")


def test_a_killed_node_disappears_and_messages_to_it_bounce(redis_url: str, tmp_path: Path):
    gone: list[list[Session]] = []
    chat = Chat()
    with serving(**chat.settings(broker=redis_url)) as here:
        broker = here.broker
        broker.on_gone = gone.append
        alice = login(here, "alice")
        node = subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, redis_url], stdout=subprocess.PIPE,
                                cwd=Path(__file__).resolve().parent.parent)
        try:
            port = int(node.stdout.readline())  # type: ignore[union-attr]
            carol = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
            carol.sendall(b"as carol\n")
            assert read_line(carol) == b"ok"
            alice.sendall(b"to carol before\n")
            assert read_line(carol) == b"before"
            node.send_signal(signal.SIGKILL)
            node.wait(DEADLINE)
            killed = time.monotonic()
            # At once: nobody reads the dead node's inbox, so the message bounces instead of vanishing.
            alice.sendall(b"to carol after\n")
            assert read_line(alice) in (b"nobody carol", b"bounced after")
            # Within ttl + beat (3 + 1 s by default): carol is gone from the directory, and on_gone said so once.
            wait_for(lambda: broker.sessions("carol") == [], timeout=10, what="carol's session to be cleared")
            assert time.monotonic() - killed < 3.0 + 1.0 + 1.0
            wait_for(lambda: gone, what="on_gone")
            assert [(s.user, s.node) for s in gone[0]] == [("carol", s.node) for s in gone[0]]
            assert len(gone) == 1 and len(gone[0]) == 1
            carol.close()
        finally:
            if node.poll() is None:
                node.kill()
                node.wait(DEADLINE)
        alice.close()


def test_redis_away_and_back_empty(redis_server, redis_url: str, caplog: pytest.LogCaptureFixture):
    """Local chat goes on; remote deliveries bounce at once; one log line per outage; back by itself."""
    caplog.set_level(logging.INFO, logger="netpool.broker")
    chat = Chat()
    with serving(**chat.settings(broker=redis_url)) as one, serving(**chat.settings(broker=redis_url)) as two:
        alice, amy, bob = login(one, "alice"), login(one, "amy"), login(two, "bob")
        redis_server.stop()
        try:
            for i in range(5):
                started = time.monotonic()
                alice.sendall(b"to bob lost %d\n" % i)
                # Not silently dropped: refused at once, or (sent just as Redis went) bounced.
                assert read_line(alice) in (b"nobody bob", b"bounced lost %d" % i)
                assert time.monotonic() - started < 2.0  # nobody waits long on a dead Redis
                alice.sendall(b"to amy local %d\n" % i)
                assert read_line(amy) == b"local %d" % i  # same node: as if nothing happened
        finally:
            redis_server.start()  # back, and empty
        outages = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len([r for r in outages if one.broker.node in r.getMessage()]) == 1
        # Both nodes register their sessions again by themselves; cross-node chat works again.
        wait_for(lambda: _everyone(one.broker) == {"alice", "amy", "bob"} and _up(two.broker),
                 timeout=15, what="the sessions to be registered again")
        alice.sendall(b"to bob found again\n")
        assert read_line(bob) == b"found again"
        assert any("is back" in r.getMessage() for r in caplog.records)
        for sock in (alice, amy, bob):
            sock.close()


def _up(broker: RedisBroker) -> bool:
    return _everyone(broker) is not None


def _everyone(broker: RedisBroker) -> Any:
    """Users of every node, or None while the broker finds Redis away."""
    try:
        return {s.user for s in broker.everyone()}
    except BrokerUnavailable:
        return None


def test_a_bad_broker_address_is_a_config_error():
    with pytest.raises(netpool.ConfigError, match="broker"):
        netpool.ListenerConfig(handler=lambda m, c: None, broker="http://127.0.0.1:6379")
