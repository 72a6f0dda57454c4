"""The router: who is online under which resource, and where messages, presence and iqs go.

One router serves every stream of a server. Its table is netpool's session
broker (``conn.listener.broker``): a stream is registered there once it has
authenticated *and* bound a resource, as the account's session named by the
resource, so nothing is ever routed to or from a stream before that. With
``--broker redis://...`` the table is shared by every worker process and
every server on that Redis: a resource is bound once among all of them (the
broker claims a name atomically), and a message finds its recipient
wherever it is connected.

Delivery always goes through the recipient's outbox (``conn.post``, through
the broker), never its socket, so routing never waits for a slow recipient;
a recipient that stops reading is disconnected by netpool once its outbox
overflows (``outbox_limit``). Presence changes are applied and fanned out
(the broker's ``available`` topic) under one lock per server process: that
keeps the view of every observer on that process in order.

Nothing is lost without a word: a message for nobody bounces at once
(``service-unavailable``); one whose recipient on another node disappeared
in flight comes back as the error the broker was handed with it. A node
that dies takes its users offline for everyone (the broker's ``on_gone``:
their unavailable presence), and when Redis comes back after an outage or a
restart, this node's available users are announced again (``on_restored``).

There are no rosters here: every available user sees every other one, which
is what "see who is online" means on a small chat server.

Routing rules (RFC 6121 section 8, reduced to this server):

- stanzas arrive with ``from`` already set to the sender's full JID by its
  stream, whatever the client wrote;
- messages to a bare JID go to the account's available resources with
  non-negative priority; to a full JID, to that resource if it is bound,
  else as for the bare JID; with no recipient the sender gets a
  ``service-unavailable`` error back (errors and headlines are never bounced);
- directed presence goes where it is addressed, or nowhere: it is never bounced;
- iqs to a full JID go to that resource; the server answers iqs to the
  account itself (the stream does that) and refuses the rest.
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import TYPE_CHECKING, Any, Optional
from xml.etree.ElementTree import Element

from netpool.broker import LocalBroker, Session
from netpool.errors import BrokerUnavailable

from .jid import JID, InvalidJID
from .stanzas import CLIENT_NS, PRESENCE, element, qname, stanza_error
from .writer import serialize

if TYPE_CHECKING:  # pragma: no cover
    from .stream import ClientStream

__all__ = ["Router", "BindFailed"]

log = logging.getLogger("netpool.xmpp")

_MESSAGE_TYPES = frozenset({"chat", "error", "groupchat", "headline", "normal"})
_PRIORITY = qname(CLIENT_NS, "priority")
# The broker topic of available streams: presence broadcasts go there.
AVAILABLE = "xmpp:available"


class BindFailed(Exception):
    """No resource could be bound now (the shared session table is unreachable): the client may try again."""


class Router:
    """The stanza routing rules over netpool's session broker (see the module's docstring)."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self._lock = threading.Lock()
        self._broker: Optional[LocalBroker] = None

    def broker(self, conn: Any) -> LocalBroker:
        """The listener's broker, met through a connection; the router's callbacks set on it the first time."""
        broker = self._broker
        if broker is None:
            broker = conn.listener.broker
            broker.on_gone = self._sessions_gone
            if hasattr(broker, "on_restored"):
                broker.on_restored = self._sessions_restored
            self._broker = broker
        return broker

    # -- the table ------------------------------------------------------------------

    def bind(self, stream: "ClientStream", local: str, requested: Optional[str]) -> JID:
        """Claim a resource for ``stream``; a missing or taken one is replaced by a generated one.

        RFC 6120 section 7.7.2.2 lets the server choose; generating keeps
        both the old connection and the new one working (a phone and a
        laptop that both call themselves "mobile"). The session is not
        ``ready`` (routed to) until the stream has sent the bind result:
        see :meth:`bound`. BindFailed if the broker cannot be asked.
        """
        broker = self.broker(stream.conn)
        resource = requested
        for _ in range(100):  # a clash of generated names is as good as impossible; bounded anyway
            if resource is not None:
                try:
                    session = broker.register(stream.conn, local, resource, {"ready": False})
                except BrokerUnavailable as exc:
                    raise BindFailed(str(exc)) from None
                if session is not None:
                    return JID(local, self.domain, resource)
            suffix = secrets.token_hex(4)
            # The requested name stays recognisable, within the 1023-byte limit on resources.
            fits = requested is not None and len(requested.encode("utf-8")) <= 1000
            resource = f"{requested}.{suffix}" if fits else f"netpool-{suffix}"
        raise BindFailed("no free resource name")

    def bound(self, stream: "ClientStream") -> None:
        """The bind result is out: stanzas for the stream's JID may come now."""
        self._update(stream, ready=True)

    def unbind(self, stream: "ClientStream") -> None:
        """Remove a closed stream; if it was available, everyone sees it leave."""
        jid = stream.jid
        if jid is None or jid.local is None or jid.resource is None:
            return
        broker = self.broker(stream.conn)
        with self._lock:
            was_available, stream.available = stream.available, False
            broker.unregister(stream.conn)
            if was_available:
                broker.publish(AVAILABLE, self._unavailable(jid))

    def online(self) -> int:
        """How many resources are bound on this process (for logs and tests)."""
        return len(self._broker.local_sessions()) if self._broker is not None else 0

    def _update(self, stream: "ClientStream", **meta: Any) -> None:
        """Change what every node sees of the stream's session; an outage is logged by the broker, not fatal."""
        try:
            self.broker(stream.conn).update(stream.conn, **meta)
        except BrokerUnavailable:
            pass  # the stream keeps its local state; the broker registers it again when the directory is back
        except KeyError:
            pass  # unbound meanwhile: the stream is closing

    def _sessions(self, sender: "ClientStream", local: str) -> tuple[list[Session], Optional[str]]:
        """The sessions of account ``local`` everywhere, or (those here, why the rest is unknown)."""
        broker = self.broker(sender.conn)
        try:
            return broker.sessions(local), None
        except BrokerUnavailable as exc:
            return broker.local_sessions(local), str(exc)

    def _recipients(self, sender: "ClientStream", to: JID, kind: str) -> tuple[list[Session], Optional[str]]:
        """The sessions a message or presence for ``to`` goes to (RFC 6121 section 8.5)."""
        sessions, trouble = self._sessions(sender, to.local or "")
        ready = [s for s in sessions if s.meta.get("ready")]
        if to.resource is not None:
            exact = [s for s in ready if s.name == to.resource]
            if exact:
                return exact, trouble
            if kind in ("groupchat", "presence"):
                return [], trouble
        return [s for s in ready if s.meta.get("available") and s.meta.get("priority", 0) >= 0], trouble

    # -- messages -------------------------------------------------------------------

    def message(self, sender: "ClientStream", message: Element) -> None:
        assert sender.jid is not None
        kind = message.get("type", "normal")
        if kind not in _MESSAGE_TYPES:
            kind = "normal"  # RFC 6121 section 5.2.2: unknown types are treated as normal
        to_text = message.get("to")
        try:
            # No 'to': the message is for the sender's own account (RFC 6120 section 10.3.1).
            to = JID.parse(to_text) if to_text is not None else sender.jid.bare
        except InvalidJID as exc:
            return self._bounce(sender, message, kind, "jid-malformed", str(exc))
        if to.domain != self.domain:
            return self._bounce(sender, message, kind, "remote-server-not-found",
                                f"this server only serves {self.domain}")
        if to.local is None:
            return self._bounce(sender, message, kind, "service-unavailable", "the server takes no messages")
        recipients, trouble = self._recipients(sender, to, kind)
        why = _why(to.bare, trouble)
        data = serialize(message)
        broker = self.broker(sender.conn)
        bounce = None
        if any(s.node != broker.node for s in recipients) and kind not in ("error", "headline"):
            # Whether another node takes it is only known later: the error to send back then. With
            # several resources a failed one says so even if another got it: an error too many,
            # never a message lost without a word.
            bounce = serialize(stanza_error(message, "service-unavailable", why))
        delivered = [broker.deliver(s, data, bounce=bounce, sender=sender.conn) for s in recipients]
        if not any(delivered):
            self._bounce(sender, message, kind, "service-unavailable", why)

    def _bounce(self, sender: "ClientStream", message: Element, kind: str, condition: str, text: str) -> None:
        """Tell the sender its message went nowhere; never for errors, never for headlines."""
        if kind in ("error", "headline"):
            return
        sender.send_stanza(stanza_error(message, condition, text))

    # -- presence -------------------------------------------------------------------

    def presence(self, sender: "ClientStream", presence: Element) -> None:
        assert sender.jid is not None
        kind = presence.get("type")
        to_text = presence.get("to")
        if to_text is None:
            if kind is None:
                self._available(sender, presence)
            elif kind == "unavailable":
                self._went_unavailable(sender, presence)
            # Subscriptions and probes mean nothing without rosters: dropped.
            return
        if kind not in (None, "unavailable", "error"):
            return  # subscription requests: everyone already sees everyone
        try:
            to = JID.parse(to_text)
        except InvalidJID:
            return  # presence is never bounced
        if to.domain != self.domain or to.local is None:
            return
        data = serialize(presence)
        broker = self.broker(sender.conn)
        for session in self._recipients(sender, to, "presence")[0]:
            broker.deliver(session, data)

    def _available(self, sender: "ClientStream", presence: Element) -> None:
        """Initial presence or an update: everyone (the sender too) sees it; a newcomer learns who is on."""
        priority = _priority(presence)
        data = serialize(presence)
        broker = self.broker(sender.conn)
        with self._lock:
            newcomer = not sender.available
            sender.available, sender.priority, sender.presence = True, priority, data
            self._update(sender, available=True, priority=priority, presence=data.decode())
            if newcomer:
                broker.join(sender.conn, AVAILABLE)
            broker.publish(AVAILABLE, data)  # RFC 6121 section 4.2.2: the sender's own resource included
        if newcomer:
            try:
                others = broker.everyone()
            except BrokerUnavailable:
                others = broker.local_sessions()
            own = broker.session_of(sender.conn)
            for session in others:
                presence = session.meta.get("presence")
                if session.meta.get("available") and presence and (own is None or session.key != own.key):
                    sender.deliver(presence.encode())

    def _went_unavailable(self, sender: "ClientStream", presence: Element) -> None:
        assert sender.jid is not None
        broker = self.broker(sender.conn)
        with self._lock:
            if not sender.available:
                return
            broker.publish(AVAILABLE, serialize(presence))
            broker.leave(sender.conn, AVAILABLE)
            sender.available, sender.presence = False, None
            self._update(sender, available=False, presence=None)

    def _unavailable(self, jid: JID) -> bytes:
        return serialize(element(PRESENCE, {"from": str(jid), "type": "unavailable"}))

    # -- sessions that went away elsewhere, or came back -------------------------------

    def _sessions_gone(self, sessions: list[Session]) -> None:
        """Another node died (the broker's on_gone, on this node alone): its available users leave for everyone."""
        broker = self._broker
        assert broker is not None
        for session in sessions:
            if session.meta.get("available"):
                broker.publish(AVAILABLE, self._unavailable(JID(session.user, self.domain, session.name)))
        log.warning("%d sessions of node %s went with it; announced unavailable", len(sessions),
                    sessions[0].node if sessions else "?")

    def _sessions_restored(self, sessions: list[Session]) -> None:
        """This node's sessions are in the directory again (Redis back, or restarted empty): announce the available ones."""
        broker = self._broker
        assert broker is not None
        for session in sessions:
            presence = session.meta.get("presence")
            if session.meta.get("available") and presence:
                broker.publish(AVAILABLE, presence.encode())

    # -- iq -------------------------------------------------------------------------

    def iq(self, sender: "ClientStream", iq: Element, to: JID) -> None:
        """Route an iq addressed to someone other than the server or the sender's own account."""
        assert sender.jid is not None
        request = iq.get("type") in ("get", "set")
        if to.domain != self.domain:
            if request:
                sender.send_stanza(
                    stanza_error(iq, "remote-server-not-found", f"this server only serves {self.domain}"))
            return
        if to.resource is None:
            # The server answers for an account (RFC 6121 section 8.5.1) and supports nothing for others.
            if request:
                sender.send_stanza(stanza_error(iq, "service-unavailable"))
            return
        sessions, trouble = self._sessions(sender, to.local or "")
        recipient = next((s for s in sessions if s.name == to.resource and s.meta.get("ready")), None)
        why = _why(to, trouble)
        broker = self.broker(sender.conn)
        bounce = None
        if request and recipient is not None and recipient.node != broker.node:
            bounce = serialize(stanza_error(iq, "service-unavailable", why))
        if (recipient is None or not broker.deliver(recipient, serialize(iq), bounce=bounce, sender=sender.conn)) \
                and request:
            sender.send_stanza(stanza_error(iq, "service-unavailable", why))


def _why(to: JID, trouble: Optional[str]) -> str:
    """The text of a service-unavailable bounce: nobody there, or the session table could not be asked."""
    return f"{to} is not online" if trouble is None else f"{to} cannot be reached now ({trouble})"


def _priority(presence: Element) -> int:
    """The presence's ``<priority/>`` (-128..127, default 0): negative ones get no bare-JID messages."""
    node = presence.find(_PRIORITY)
    if node is None or not node.text:
        return 0
    try:
        return max(-128, min(127, int(node.text.strip())))
    except ValueError:
        return 0
