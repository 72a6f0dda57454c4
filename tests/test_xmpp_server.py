"""The XMPP example served for real: slixmpp clients, raw sockets, the CLI, an installed wheel.

slixmpp (a real XMPP client library) logs in over plain TCP and over
STARTTLS with a ``netpool cert`` certificate, chats and watches presence.
Raw sockets, parsed with the example's own stream parser, drive the corners
no polite client reaches: stream errors, STARTTLS edge cases, timeouts, a
client that stops reading, a failing handler, 500 clients at once.

Each slixmpp scenario runs in one event loop on the test's thread, bounded
by ``asyncio.wait_for``; every wait has a deadline, nothing sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from xml.etree.ElementTree import Element

import pytest
import slixmpp
from netpool.examples.xmpp_stub import Limits, ServerSettings, StreamParser, UserStore, XMPPServer
from netpool.examples.xmpp_stub.parser import StanzaReceived, StreamClosed, StreamOpened
from netpool.examples.xmpp_stub.stanzas import (
    BIND_NS,
    DISCO_INFO_NS,
    PING_NS,
    ROSTER_NS,
    SASL_NS,
    SESSION_NS,
    STREAM_ERRORS_NS,
    STREAM_NS,
    TLS_NS,
    qname,
)

import netpool
from netpool.devcert import write_dev_certificate

from .conftest import wait_for
from .test_cli import NETPOOL, install_wheel, run_cli, server

DEADLINE = 10.0
PASSWORDS = {"alice": "wonder land", "bob": "builder"}
HEADER = ("<stream:stream to='{domain}' xmlns='{ns}' xmlns:stream='http://etherx.jabber.org/streams' "
          "version='1.0'>")


# -- servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """alice and bob, hashed with the real (default) scrypt cost, as `adduser` stores them."""
    path = tmp_path_factory.mktemp("xmpp") / "users.json"
    store = UserStore(path)
    for name, password in PASSWORDS.items():
        store.add(name, password)
    return path


@pytest.fixture(scope="module")
def dev_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The certificate `netpool cert` writes (same function), for localhost and 127.0.0.1."""
    return write_dev_certificate(str(tmp_path_factory.mktemp("cert")), ("localhost", "127.0.0.1"), 1)


@contextlib.contextmanager
def xmpp_server(users: Optional[Path] = None, *, listener: Optional[dict[str, Any]] = None,
                **settings: Any) -> Iterator[tuple[XMPPServer, netpool.Listener]]:
    """An XMPP server for localhost on a free loopback port; stopped, threads joined, afterwards."""
    if users is not None:
        settings["users"] = UserStore.open(users)
    else:
        settings.setdefault("accept_any_password", True)
    xmpp = XMPPServer(ServerSettings(domain="localhost", **settings))
    running = xmpp.start(port=0, acceptors=4, **(listener or {}))
    try:
        yield xmpp, running
    finally:
        running.stop(grace=2.0)


def tls_listener(dev_cert: tuple[str, str]) -> dict[str, Any]:
    return {"ssl": {"certfile": dev_cert[0], "keyfile": dev_cert[1]}}  # STARTTLS: the server's default mode


# -- a raw client, parsed with the example's own parser ----------------------------------------


class RawClient:
    """A socket speaking XMPP by hand; what the server says is parsed into events."""

    def __init__(self, port: int, *, rcvbuf: Optional[int] = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = StreamParser(Limits(max_stanza_bytes=1 << 20))
        self.events: collections.deque = collections.deque()
        self.skipped: list[Element] = []  # stanzas passed over while waiting for another
        self.raw = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: str | bytes) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def next_event(self) -> Any:
        """The server's next event (the socket's timeout bounds every read); fails on EOF."""
        while not self.events:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"server closed the connection; it said: {self.raw[-500:]!r}")
            self.raw += chunk
            self.events.extend(self.parser.feed(chunk))
        return self.events.popleft()

    def stanza(self, tag: Optional[str] = None, skip: Callable[[Element], bool] = lambda e: False) -> Element:
        """The next stanza (skipping those ``skip`` accepts); it must have ``tag`` if given."""
        while True:
            event = self.next_event()
            assert isinstance(event, StanzaReceived), f"expected a stanza, got {event}"
            if not skip(event.element):
                break
            self.skipped.append(event.element)
        if tag is not None:
            assert event.element.tag == tag, f"expected {tag}, got {event.element.tag}: {self.raw[-300:]!r}"
        return event.element

    def open(self, domain: str = "localhost", ns: str = "jabber:client", declaration: bool = True) -> Element:
        """Send a stream header; return the features that follow the server's header."""
        self.parser = StreamParser(Limits(max_stanza_bytes=1 << 20))
        self.events.clear()
        self.send(("<?xml version='1.0'?>" if declaration else "") + HEADER.format(domain=domain, ns=ns))
        assert isinstance(self.next_event(), StreamOpened)
        return self.stanza(qname(STREAM_NS, "features"))

    def auth(self, user: str, password: str) -> Element:
        payload = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{payload}</auth>")
        return self.stanza()

    def bind(self, resource: Optional[str] = None) -> str:
        inner = f"<resource>{resource}</resource>" if resource else ""
        self.send(f"<iq type='set' id='bind'><bind xmlns='{BIND_NS}'>{inner}</bind></iq>")
        result = self.stanza(qname("jabber:client", "iq"))
        assert result.get("type") == "result", self.raw[-300:]
        return result.findtext(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid") or ""

    def login(self, user: str, password: str = "any", resource: Optional[str] = None) -> str:
        """Log in and bind; returns the full JID, once the server routes to it.

        The bind result comes a moment before the server has made the JID
        routable: a ping answered after it says the bind is over, as a real
        client's first presence would.
        """
        self.open()
        assert self.auth(user, password).tag == qname(SASL_NS, "success"), self.raw[-300:]
        self.open()
        jid = self.bind(resource)
        assert self.iq(f"<ping xmlns='{PING_NS}'/>").get("type") == "result"
        return jid

    def iq(self, body: str, **attrs: str) -> Element:
        """Send an iq and return the reply with the same id (skipping anything else that arrives)."""
        attrs.setdefault("type", "get")
        attrs.setdefault("id", f"q{time.monotonic_ns()}")
        rendered = " ".join(f"{k}='{v}'" for k, v in attrs.items())
        self.send(f"<iq {rendered}>{body}</iq>")
        return self.stanza(qname("jabber:client", "iq"), skip=lambda e: e.get("id") != attrs["id"])

    def stream_error(self) -> tuple[str, str]:
        """Read to the end: the stream error condition and text, then </stream:stream> and EOF."""
        while True:
            event = self.next_event()
            if isinstance(event, StanzaReceived) and event.element.tag == qname(STREAM_NS, "error"):
                error = event.element
                break
        assert isinstance(self.next_event(), StreamClosed)
        assert self.sock.recv(1) == b""
        condition = next(child.tag.partition("}")[2] for child in error if child.tag != qname(STREAM_ERRORS_NS, "text"))
        return condition, error.findtext(qname(STREAM_ERRORS_NS, "text")) or ""


# -- slixmpp -------------------------------------------------------------------------------------


class Client:
    """A slixmpp client whose events land in queues, awaited with deadlines."""

    EVENTS = ("session_start", "failed_auth", "failed_all_auth", "message", "message_error",
              "presence_available", "presence_unavailable", "disconnected")

    def __init__(self, jid: str, password: str, port: int, cafile: Optional[str] = None, *,
                 direct_tls_first: bool = False) -> None:
        # Plain PLAIN is refused by slixmpp unless allowed: the plain-TCP test allows it.
        self.xmpp = slixmpp.ClientXMPP(jid, password,
                                       plugin_config={"feature_mechanisms": {"unencrypted_plain": cafile is None}})
        # slixmpp tries direct TLS (XEP-0368) before STARTTLS unless told not to.
        self.xmpp.enable_direct_tls = direct_tls_first
        if cafile is not None:
            self.xmpp.ca_certs = Path(cafile)  # trust the dev certificate; hostname checking stays on
        self.port = port
        self.queues: dict[str, asyncio.Queue] = {name: asyncio.Queue() for name in self.EVENTS}
        for name in self.EVENTS:
            self.xmpp.add_event_handler(name, self.queues[name].put_nowait)

    @property
    def jid(self) -> str:
        return str(self.xmpp.boundjid)

    async def next(self, name: str, match: Callable[[Any], bool] = lambda event: True,
                   timeout: float = DEADLINE) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            event = await asyncio.wait_for(self.queues[name].get(), remaining)
            if match(event):
                return event

    async def login(self) -> float:
        """Connect and wait for the session; returns how long the login took."""
        started = time.perf_counter()
        self.xmpp.connect("127.0.0.1", self.port)
        await self.next("session_start")
        return time.perf_counter() - started

    async def online(self) -> float:
        took = await self.login()
        self.xmpp.send_presence()
        roster = await asyncio.wait_for(self.xmpp.get_roster(), DEADLINE)
        assert roster is not None and roster["type"] == "result"
        return took

    async def logout(self) -> None:
        await asyncio.wait_for(self.xmpp.disconnect(), DEADLINE)


def run_scenario(scenario: Callable[[list[Client]], Any], timeout: float = 30.0) -> Any:
    """Run an async scenario on a fresh loop; every client it made is aborted at the end."""
    clients: list[Client] = []

    async def main() -> Any:
        try:
            return await asyncio.wait_for(scenario(clients), timeout)
        finally:
            for client in clients:
                client.xmpp.abort()

    return asyncio.run(main())


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "starttls"])
def test_two_slixmpp_users_chat_and_see_each_other_come_and_go(users_file, dev_cert, secure):
    """The issue's scenario: log in, presence both ways, bare and full JID messages, clean logout."""
    listener = tls_listener(dev_cert) if secure else {}
    extra = {"require_tls": True} if secure else {}
    with xmpp_server(users_file, listener=listener, **extra) as (xmpp, running):
        cafile = dev_cert[0] if secure else None

        async def scenario(clients: list[Client]) -> None:
            alice = Client("alice@localhost/laptop", PASSWORDS["alice"], running.port, cafile)
            bob = Client("bob@localhost", PASSWORDS["bob"], running.port, cafile)
            clients += [alice, bob]
            took = await alice.online()
            assert took < 2.0
            assert alice.jid == "alice@localhost/laptop"
            assert ("starttls" in alice.xmpp.features) is secure

            await bob.online()
            bob_jid = bob.jid
            assert bob_jid.startswith("bob@localhost/")  # no resource asked for: the server made one
            # Alice sees Bob arrive; Bob, the newcomer, learns that Alice is online.
            await alice.next("presence_available", lambda p: p["from"] == bob_jid)
            await bob.next("presence_available", lambda p: p["from"] == "alice@localhost/laptop")

            alice.xmpp.send_message(mto="bob@localhost", mbody="to your bare JID", mtype="chat")
            got = await bob.next("message")
            assert got["body"] == "to your bare JID" and got["from"] == "alice@localhost/laptop"

            bob.xmpp.send_message(mto="alice@localhost/laptop", mbody="to your full JID", mtype="chat")
            got = await alice.next("message")
            assert got["body"] == "to your full JID" and got["from"] == bob_jid

            # The server stamps 'from': a forged one never reaches the recipient.
            alice.xmpp.send_message(mto=bob_jid, mbody="forged", mfrom="carol@localhost/x")
            got = await bob.next("message")
            assert got["body"] == "forged" and got["from"] == "alice@localhost/laptop"

            # An offline recipient: the sender gets an error back.
            alice.xmpp.send_message(mto="carol@localhost", mbody="anyone?", mtype="chat")
            error = await alice.next("message_error")
            assert error["from"] == "carol@localhost" and error["error"]["condition"] == "service-unavailable"

            await bob.logout()
            await alice.next("presence_unavailable", lambda p: p["from"] == bob_jid)
            await alice.logout()

        run_scenario(scenario)
        wait_for(lambda: running.info().closed == 2, what="both connections to close")
        assert xmpp.router.online() == 0
        assert dict(running.info().closed_by_reason) == {"closed": 2}


def test_slixmpp_trying_direct_tls_first_falls_back_to_starttls_at_once(users_file, dev_cert):
    """slixmpp's default is a TLS handshake first; the plain port's instant stream error makes it move on."""
    with xmpp_server(users_file, listener=tls_listener(dev_cert)) as (_, running):
        async def scenario(clients: list[Client]) -> float:
            alice = Client("alice@localhost", PASSWORDS["alice"], running.port, dev_cert[0], direct_tls_first=True)
            clients.append(alice)
            took = await alice.login()
            assert "starttls" in alice.xmpp.features
            await alice.logout()
            return took

        took = run_scenario(scenario)
        assert took < 2.0, f"login took {took:.2f}s"
        reasons = wait_for(lambda: (info := running.info()).closed == 2 and info.closed_by_reason)
        assert reasons == {"closed": 2}  # the TLS attempt (answered with a stream error) and the session


def test_wrong_passwords_and_unknown_users_are_refused(users_file):
    with xmpp_server(users_file) as (_, running):
        async def scenario(clients: list[Client]) -> None:
            for jid, password in (("alice@localhost", "not her password"), ("mallory@localhost", "guess")):
                client = Client(jid, password, running.port)
                clients.append(client)
                client.xmpp.connect("127.0.0.1", running.port)
                failure = await client.next("failed_auth")
                assert failure["condition"] == "not-authorized"
                await client.next("disconnected")
                assert client.queues["session_start"].empty()
            # The right password still works afterwards.
            alice = Client("alice@localhost", PASSWORDS["alice"], running.port)
            clients.append(alice)
            await alice.login()
            await alice.logout()

        run_scenario(scenario)


# -- stream negotiation and errors, by hand ------------------------------------------------------


def test_a_tls_client_hello_on_the_plain_port_gets_a_stream_error_at_once():
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    with xmpp_server() as (_, running):
        client = RawClient(running.port)
        started = time.perf_counter()
        client.send(hello)
        condition, _ = client.stream_error()  # reads through to EOF
        elapsed = time.perf_counter() - started
        client.close()
    assert condition == "not-well-formed"
    assert elapsed < 0.25, f"answered after {elapsed * 1000:.0f} ms"


@pytest.mark.parametrize("send, condition", [
    pytest.param(HEADER.format(domain="example.org", ns="jabber:client"), "host-unknown", id="host-unknown"),
    pytest.param(HEADER.format(domain="localhost", ns="jabber:server"), "invalid-namespace", id="invalid-namespace"),
    pytest.param("<stream:stream xmlns:stream='urn:wrong' xmlns='jabber:client' to='localhost' version='1.0'>",
                 "invalid-namespace", id="wrong-stream-namespace"),
    pytest.param("<stream:stream to='localhost' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
                 "unsupported-version", id="no-version"),
    pytest.param(HEADER.format(domain="localhost", ns="jabber:client") + "<message to='bob@localhost'/>",
                 "not-authorized", id="stanza-before-auth"),
    pytest.param(HEADER.format(domain="localhost", ns="jabber:client") + "<!-- hi -->",
                 "restricted-xml", id="comment"),
    pytest.param(HEADER.format(domain="localhost", ns="jabber:client") + "<message>&xxe;</message>",
                 "restricted-xml", id="entity"),
    pytest.param(HEADER.format(domain="localhost", ns="jabber:client") + "<message>" + "x" * 5000,
                 "policy-violation", id="stanza-too-large"),
    pytest.param("GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "not-well-formed", id="http-request"),
])
def test_stream_errors_are_sent_properly_before_closing(send, condition):
    with xmpp_server(limits=Limits(max_stanza_bytes=4096)) as (_, running):
        client = RawClient(running.port)
        client.send(send)
        # Before the client's header arrived the server still opens its own
        # stream first, so the error is always well-formed XMPP.
        assert isinstance(client.next_event(), StreamOpened)
        assert client.stream_error()[0] == condition
        client.close()
        wait_for(lambda: running.info().closed == 1)


def test_features_before_and_after_authentication(dev_cert):
    with xmpp_server(listener=tls_listener(dev_cert)) as (_, running):
        client = RawClient(running.port)
        features = client.open(declaration=False)  # clients that send no XML declaration are fine
        assert features.find(f"{{{TLS_NS}}}starttls") is not None
        assert features.find(f"{{{TLS_NS}}}starttls/{{{TLS_NS}}}required") is None  # offered, not required
        mechanisms = [m.text for m in features.iter(f"{{{SASL_NS}}}mechanism")]
        assert mechanisms == ["PLAIN"]  # only what is implemented
        assert client.auth("alice", "x").tag == qname(SASL_NS, "success")
        features = client.open()
        assert [child.tag for child in features] == [
            qname(BIND_NS, "bind"), qname(SESSION_NS, "session"), qname("urn:xmpp:stream-limits:0", "limits")]
        assert features.find(f"{{{SESSION_NS}}}session/{{{SESSION_NS}}}optional") is not None
        client.close()


def test_require_tls_offers_only_starttls_and_refuses_plain_auth(dev_cert):
    with xmpp_server(listener=tls_listener(dev_cert), require_tls=True) as (_, running):
        client = RawClient(running.port)
        features = client.open()
        assert [child.tag for child in features] == [qname(TLS_NS, "starttls")]
        assert features.find(f"{{{TLS_NS}}}starttls/{{{TLS_NS}}}required") is not None
        payload = base64.b64encode(b"\0alice\0x").decode()
        client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{payload}</auth>")
        assert client.stream_error()[0] == "policy-violation"
        client.close()


def test_starttls_upgrades_once_and_discards_pipelined_plaintext(dev_cert):
    with xmpp_server(listener=tls_listener(dev_cert)) as (_, running):
        client = RawClient(running.port)
        client.open()
        # A stanza pipelined in plaintext behind <starttls/> must never be
        # read as if it had come over TLS (it would be a not-authorized error).
        client.send(f"<starttls xmlns='{TLS_NS}'/><message to='bob@localhost'><body>injected</body></message>")
        assert client.stanza().tag == qname(TLS_NS, "proceed")
        context = ssl.create_default_context(cafile=dev_cert[0])
        client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
        features = client.open()
        assert features.find(f"{{{TLS_NS}}}starttls") is None  # never offered twice
        assert features.find(f"{{{SASL_NS}}}mechanisms") is not None
        assert client.auth("alice", "x").tag == qname(SASL_NS, "success")
        client.open()
        assert client.bind("tls").endswith("/tls")
        assert running.connections()[0].tls is not None
        client.close()


def test_starttls_without_a_certificate_fails_cleanly():
    with xmpp_server() as (_, running):
        client = RawClient(running.port)
        features = client.open()
        assert features.find(f"{{{TLS_NS}}}starttls") is None
        client.send(f"<starttls xmlns='{TLS_NS}'/>")
        assert client.stanza().tag == qname(TLS_NS, "failure")
        assert isinstance(client.next_event(), StreamClosed)
        client.close()


def test_failed_logins_are_limited_and_sasl_errors_named(users_file, caplog):
    caplog.set_level(logging.DEBUG)
    with xmpp_server(users_file) as (_, running):
        client = RawClient(running.port)
        client.open()
        client.send(f"<auth xmlns='{SASL_NS}' mechanism='SCRAM-SHA-1'>x</auth>")
        assert client.stanza()[0].tag == qname(SASL_NS, "invalid-mechanism")
        client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>!!!</auth>")
        assert client.stanza()[0].tag == qname(SASL_NS, "incorrect-encoding")
        assert client.auth("alice", "wrong guess")[0].tag == qname(SASL_NS, "not-authorized")
        assert client.stream_error()[0] == "policy-violation"  # the third failure ends the stream
        client.close()
        good = RawClient(running.port)
        good.login("alice", PASSWORDS["alice"])
        good.close()
    # Failures are logged with the user name; no password and no SASL payload ever is.
    assert "authentication failed (not-authorized) for user 'alice'" in caplog.text
    for secret in ("wrong guess", PASSWORDS["alice"]):
        assert secret not in caplog.text
        assert base64.b64encode(f"\0alice\0{secret}".encode()).decode() not in caplog.text


def test_plain_with_an_empty_challenge_and_the_bare_jid_as_user_name(users_file):
    with xmpp_server(users_file) as (_, running):
        client = RawClient(running.port)
        client.open()
        client.send(f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'/>")
        assert client.stanza().tag == qname(SASL_NS, "challenge")
        payload = base64.b64encode(f"\0alice@localhost\0{PASSWORDS['alice']}".encode()).decode()
        client.send(f"<response xmlns='{SASL_NS}'>{payload}</response>")
        assert client.stanza().tag == qname(SASL_NS, "success")
        client.close()


def test_a_login_sent_one_byte_at_a_time(users_file):
    with xmpp_server(users_file) as (_, running):
        client = RawClient(running.port)
        payload = base64.b64encode(f"\0bob\0{PASSWORDS['bob']}".encode()).decode()
        for step in (HEADER.format(domain="localhost", ns="jabber:client"),
                     f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{payload}</auth>"):
            for byte in step.encode():
                client.send(bytes([byte]))
        assert isinstance(client.next_event(), StreamOpened)
        client.stanza(qname(STREAM_NS, "features"))
        assert client.stanza().tag == qname(SASL_NS, "success")
        client.parser = StreamParser()
        for byte in (HEADER.format(domain="localhost", ns="jabber:client")
                     + f"<iq type='set' id='b'><bind xmlns='{BIND_NS}'/></iq>").encode():
            client.send(bytes([byte]))
        assert isinstance(client.next_event(), StreamOpened)
        client.stanza(qname(STREAM_NS, "features"))
        assert client.stanza().findtext(f"{{{BIND_NS}}}bind/{{{BIND_NS}}}jid").startswith("bob@localhost/")
        client.close()


# -- the server's own replies -------------------------------------------------------------------


def test_every_iq_to_the_server_gets_a_reply():
    with xmpp_server() as (_, running):
        client = RawClient(running.port)
        jid = client.login("alice", resource="desk")
        assert jid == "alice@localhost/desk"
        session = client.iq(f"<session xmlns='{SESSION_NS}'/>", type="set")  # the legacy request, answered
        assert session.get("type") == "result"
        roster = client.iq(f"<query xmlns='{ROSTER_NS}'/>")
        assert roster.get("type") == "result" and len(roster.find(f"{{{ROSTER_NS}}}query")) == 0
        info = client.iq(f"<query xmlns='{DISCO_INFO_NS}'/>", to="localhost")
        assert info.get("from") == "localhost"
        assert info.find(f"{{{DISCO_INFO_NS}}}query/{{{DISCO_INFO_NS}}}identity").get("category") == "server"
        features = {f.get("var") for f in info.iter(f"{{{DISCO_INFO_NS}}}feature")}
        assert {DISCO_INFO_NS, PING_NS} <= features
        assert client.iq(f"<ping xmlns='{PING_NS}'/>", to="localhost").get("type") == "result"
        unknown = client.iq("<query xmlns='jabber:iq:version'/>", to="localhost")
        assert unknown.get("type") == "error"
        assert unknown.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None
        empty = client.iq("")
        assert empty.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}bad-request") is not None
        offline = client.iq(f"<ping xmlns='{PING_NS}'/>", to="bob@localhost/gone")
        assert offline.find("{jabber:client}error/{urn:ietf:params:xml:ns:xmpp-stanzas}service-unavailable") is not None
        client.send("</stream:stream>")
        assert isinstance(client.next_event(), StreamClosed)
        client.close()


def test_nothing_is_routed_before_binding():
    with xmpp_server() as (_, running):
        client = RawClient(running.port)
        client.open()
        assert client.auth("alice", "x").tag == qname(SASL_NS, "success")
        client.open()
        client.send("<message to='bob@localhost'><body>too early</body></message>")
        assert client.stream_error()[0] == "not-authorized"
        client.close()


def test_errors_and_headlines_are_never_bounced():
    with xmpp_server() as (_, running):
        client = RawClient(running.port)
        client.login("alice")
        client.send("<message type='error' to='nobody@localhost'><error type='cancel'/></message>"
                    "<message type='headline' to='nobody@localhost'><body>news</body></message>"
                    "<message to='nobody@localhost'><body>hello?</body></message>")
        bounce = client.stanza(qname("jabber:client", "message"))
        assert bounce.get("type") == "error" and bounce.findtext("{jabber:client}body") is None
        assert client.iq(f"<ping xmlns='{PING_NS}'/>").get("type") == "result"
        assert client.skipped == []  # exactly one bounce: for the normal message only
        client.close()


def test_a_clashing_resource_gets_a_generated_one():
    with xmpp_server() as (xmpp, running):
        first, second = RawClient(running.port), RawClient(running.port)
        assert first.login("alice", resource="phone") == "alice@localhost/phone"
        other = second.login("alice", resource="phone")
        assert other.startswith("alice@localhost/phone.") and other != "alice@localhost/phone"
        assert xmpp.router.online() == 2
        # The two resources reach each other by full JID.
        first.send(f"<message to='{other}'><body>hi twin</body></message>")
        message = second.stanza(qname("jabber:client", "message"))
        assert message.get("from") == "alice@localhost/phone"
        first.close()
        second.close()


# -- timeouts, slow readers, failures ---------------------------------------------------------


def test_unauthenticated_streams_time_out_quickly_and_logged_in_ones_slowly():
    with xmpp_server(login_timeout=0.3, session_timeout=0.8) as (_, running):
        silent = RawClient(running.port)
        started = time.monotonic()
        condition, text = silent.stream_error()
        assert condition == "connection-timeout" and "not logged in" in text
        assert 0.25 < time.monotonic() - started < 3.0
        silent.close()

        chatty = RawClient(running.port)
        chatty.login("alice")
        started = time.monotonic()
        # Whitespace keepalives keep a logged-in stream open past its timeout.
        while time.monotonic() - started < 1.5:
            chatty.send(" ")
            assert chatty.iq(f"<ping xmlns='{PING_NS}'/>").get("type") == "result"
        condition, text = chatty.stream_error()  # then silence: closed
        assert condition == "connection-timeout" and "nothing received" in text
        chatty.close()


def test_a_recipient_that_stops_reading_holds_no_sender_and_is_dropped():
    settings = {"limits": Limits(max_stanza_bytes=16384), "max_outbound_bytes": 65536}
    with xmpp_server(**settings) as (_, running):
        bob = RawClient(running.port, rcvbuf=4096)
        bob.login("bob")
        bob.send("<presence/>")  # bob is online, and then never reads again
        alice = RawClient(running.port)
        alice.login("alice")
        alice.send("<presence/>")
        body = "x" * 8000
        slowest = 0.0
        for batch in range(100):  # bounded: bob's buffers absorb a few MB at most
            started = time.monotonic()
            alice.send("".join(f"<message to='bob@localhost'><body>{body}</body></message>" for _ in range(20)))
            # Alice's own requests are answered at once however far behind bob is.
            alice.iq(f"<ping xmlns='{PING_NS}'/>", id=f"p{batch}")
            slowest = max(slowest, time.monotonic() - started)
            gone = [e.get("from") for e in alice.skipped if e.tag == qname("jabber:client", "presence")
                    and e.get("type") == "unavailable"]
            if gone:
                break
        else:
            pytest.fail("bob was never disconnected")
        assert slowest < 2.0, f"a send to a stalled recipient held the sender for {slowest:.1f}s"
        assert gone[0].startswith("bob@localhost/")
        alice.close()
        bob.close()


def test_a_failing_handler_closes_only_its_own_stream(monkeypatch):
    with xmpp_server() as (xmpp, running):
        victim, bystander = RawClient(running.port), RawClient(running.port)
        victim.login("alice")
        bystander.login("bob")

        def broken(sender: Any, message: Element) -> None:
            raise RuntimeError("a bug in routing")

        monkeypatch.setattr(xmpp.router, "message", broken)
        victim.send("<message to='bob@localhost'><body>boom</body></message>")
        assert victim.stream_error()[0] == "internal-server-error"
        assert bystander.iq(f"<ping xmlns='{PING_NS}'/>").get("type") == "result"
        victim.close()
        bystander.close()


def test_500_logged_in_clients_and_a_message_arrives_promptly():
    count = 500
    with xmpp_server(listener={"max_connections": count + 10}) as (xmpp, running):
        clients = [RawClient(running.port) for _ in range(count)]
        try:
            # Pipelined across sockets: every client's step goes out before any reply is read.
            started = time.perf_counter()
            for i, client in enumerate(clients):
                payload = base64.b64encode(f"\0user{i}\0pw".encode()).decode()
                client.send(HEADER.format(domain="localhost", ns="jabber:client")
                            + f"<auth xmlns='{SASL_NS}' mechanism='PLAIN'>{payload}</auth>")
            for client in clients:
                assert isinstance(client.next_event(), StreamOpened)
                client.stanza(qname(STREAM_NS, "features"))
                assert client.stanza().tag == qname(SASL_NS, "success")
            for client in clients:
                client.parser = StreamParser()
                client.send(HEADER.format(domain="localhost", ns="jabber:client")
                            + f"<iq type='set' id='b'><bind xmlns='{BIND_NS}'/></iq>")
            for client in clients:
                assert isinstance(client.next_event(), StreamOpened)
                client.stanza(qname(STREAM_NS, "features"))
                assert client.stanza().get("type") == "result"
            logged_in = time.perf_counter() - started
            assert xmpp.router.online() == count
            assert running.info().live == count

            first, last = clients[0], clients[-1]
            last.send("<presence/>")
            last.stanza()  # its own presence, reflected
            started = time.perf_counter()
            first.send(f"<message to='user{count - 1}@localhost'><body>across the room</body></message>")
            message = last.stanza(qname("jabber:client", "message"))
            latency = time.perf_counter() - started
            assert message.findtext("{jabber:client}body") == "across the room"
            assert message.get("from").startswith("user0@localhost/")
            assert latency < 1.0, f"delivered after {latency * 1000:.0f} ms"
            print(f"500 clients logged in in {logged_in:.2f} s; a message crossed in {latency * 1000:.1f} ms")
        finally:
            for client in clients:
                client.close()
        wait_for(lambda: xmpp.router.online() == 0, what="every stream to unbind")


# -- the command line ---------------------------------------------------------------------------


def talk_to(port: int, user: str, password: str) -> str:
    """One raw login against a server in another process: 'success' or the SASL failure."""
    client = RawClient(port)
    try:
        client.open()
        return client.auth(user, password).tag.partition("}")[2]
    finally:
        client.close()


def test_cli_adduser_then_serve_and_log_in(tmp_path):
    """The issue's command line, `netpool xmpp --port ... --domain localhost`, with ./xmpp-users.json."""
    def adduser(name: str, password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([NETPOOL, "xmpp", "adduser", name, "--password-stdin"], input=password + "\n",
                              capture_output=True, text=True, timeout=DEADLINE, cwd=tmp_path, check=False)

    added = adduser("Carol", "s3cret")
    assert added.returncode == 0, added.stderr
    assert "added carol in xmpp-users.json" in added.stdout and "s3cret" not in added.stdout + added.stderr
    again = adduser("carol", "x")
    assert again.returncode == 2 and "--replace" in again.stderr

    with server("xmpp", "--port", "0", "--domain", "localhost", cwd=tmp_path) as srv:
        port = srv.port()
        assert talk_to(port, "carol", "s3cret") == "success"
        assert talk_to(port, "carol", "wrong") == "failure"
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr
    assert "s3cret" not in stderr and "wrong" not in stderr  # passwords are never logged
    assert re.search(r"xmpp stopped after [\d.]+s: accepted 2,", stderr), stderr


def test_cli_adduser_prompts_for_the_password(tmp_path):
    from click.testing import CliRunner

    from netpool.cli import main

    users = tmp_path / "users.json"
    result = CliRunner().invoke(main, ["xmpp", "--users", str(users), "adduser", "dave"], input="pw1\npw1\n")
    assert result.exit_code == 0, result.output
    assert "pw1" not in result.output
    assert UserStore.open(users).verify("dave", "pw1")


def test_cli_without_users_explains_what_to_do(tmp_path):
    result = run_cli("xmpp", "--port", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "adduser" in result.stderr and "--accept-any-password" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("xmpp", "--port", "0", "--accept-any-password", "--require-tls", cwd=tmp_path)
    assert result.returncode == 2 and "certificate" in result.stderr


def test_cli_serves_starttls_with_a_netpool_cert(tmp_path):
    assert run_cli("cert", "--out", str(tmp_path / "cert"), cwd=tmp_path).returncode == 0
    cert, key = tmp_path / "cert" / "cert.pem", tmp_path / "cert" / "key.pem"
    with server("xmpp", "--port", "0", "--accept-any-password", "--require-tls",
                "--certfile", str(cert), "--keyfile", str(key), cwd=tmp_path) as srv:
        client = RawClient(srv.port())
        features = client.open()
        assert features.find(f"{{{TLS_NS}}}starttls/{{{TLS_NS}}}required") is not None
        client.send(f"<starttls xmlns='{TLS_NS}'/>")
        assert client.stanza().tag == qname(TLS_NS, "proceed")
        client.sock = ssl.create_default_context(cafile=str(cert)).wrap_socket(client.sock, server_hostname="localhost")
        assert client.open().find(f"{{{SASL_NS}}}mechanisms") is not None
        client.close()
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr
    assert "STARTTLS required" in stderr


INSTALLED_SERVER = """\
import sys
import netpool.examples.xmpp_stub.stream as example
print("example-file", example.__file__, file=sys.stderr, flush=True)
from netpool.cli import main
main()
"""


@pytest.mark.timeout(180)
def test_installed_wheel_serves_netpool_xmpp(tmp_path):
    """`netpool xmpp` works from a plain (non-editable) install, README included."""
    site, elsewhere = install_wheel(tmp_path)
    package = site / "netpool" / "examples" / "xmpp_stub"
    assert (package / "README.md").is_file(), "package_data README.md not installed"

    env = {**os.environ, "PYTHONPATH": str(site)}
    with server("-c", INSTALLED_SERVER, "xmpp", "--port", "0", "--accept-any-password", cwd=elsewhere, env=env,
                argv0=[sys.executable]) as srv:
        assert Path(srv.expect(r"^example-file (.*)$")[1]) == package / "stream.py"
        assert talk_to(srv.port(), "anyone", "anything") == "success"
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr
