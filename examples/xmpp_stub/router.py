"""The router: who is online under which resource, and where messages, presence and iqs go.

One router serves every stream of a server. Its table maps an account to its
bound resources; a stream appears there once it has authenticated *and*
bound a resource, so nothing is ever routed to or from a stream before that.

Delivery between streams always goes through the recipient's outbox (never
its socket), so routing never blocks on a slow recipient. Presence changes
are applied and fanned out under the table's lock: that is what keeps every
observer's view in order (alice never sees bob come online *after* seeing
him leave). Holding the lock is cheap because putting into an outbox never
blocks.

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
from typing import TYPE_CHECKING, Iterator, Optional
from xml.etree.ElementTree import Element

from .jid import JID, InvalidJID
from .stanzas import CLIENT_NS, PRESENCE, element, qname, stanza_error
from .writer import serialize

if TYPE_CHECKING:  # pragma: no cover
    from .stream import ClientStream

__all__ = ["Router"]

log = logging.getLogger("netpool.xmpp")

_MESSAGE_TYPES = frozenset({"chat", "error", "groupchat", "headline", "normal"})
_PRIORITY = qname(CLIENT_NS, "priority")


class Router:
    """The table of bound resources of one server, and the stanza routing rules."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self._lock = threading.Lock()
        self._accounts: dict[str, dict[str, "ClientStream"]] = {}

    # -- the table ------------------------------------------------------------------

    def bind(self, stream: "ClientStream", local: str, requested: Optional[str]) -> JID:
        """Claim a resource for ``stream``; a missing or taken one is replaced by a generated one.

        RFC 6120 section 7.7.2.2 lets the server choose; generating keeps
        both the old connection and the new one working (a phone and a
        laptop that both call themselves "mobile").
        """
        with self._lock:
            resources = self._accounts.setdefault(local, {})
            resource = requested
            while resource is None or resource in resources:
                suffix = secrets.token_hex(4)
                # The requested name stays recognisable, within the 1023-byte limit on resources.
                fits = requested is not None and len(requested.encode("utf-8")) <= 1000
                resource = f"{requested}.{suffix}" if fits else f"netpool-{suffix}"
            resources[resource] = stream
        return JID(local, self.domain, resource)

    def unbind(self, stream: "ClientStream") -> None:
        """Remove a closed stream; if it was available, everyone sees it leave."""
        jid = stream.jid
        if jid is None or jid.local is None or jid.resource is None:
            return
        with self._lock:
            resources = self._accounts.get(jid.local, {})
            if resources.get(jid.resource) is stream:
                del resources[jid.resource]
                if not resources:
                    del self._accounts[jid.local]
            if stream.available:
                stream.available = False
                self._broadcast(self._unavailable(jid), exclude=stream)

    def online(self) -> int:
        """How many resources are bound (for logs and tests)."""
        with self._lock:
            return sum(len(resources) for resources in self._accounts.values())

    def _streams(self) -> Iterator["ClientStream"]:
        for resources in self._accounts.values():
            yield from resources.values()

    def _broadcast(self, data: bytes, exclude: Optional["ClientStream"] = None) -> None:
        """Give ``data`` to every available stream (lock held)."""
        for stream in self._streams():
            if stream.available and stream is not exclude:
                stream.deliver(data)

    def _recipients(self, to: JID, kind: str) -> list["ClientStream"]:
        """The streams a message or presence for ``to`` goes to (RFC 6121 section 8.5)."""
        with self._lock:
            resources = self._accounts.get(to.local or "", {})
            if to.resource is not None:
                exact = resources.get(to.resource)
                if exact is not None:
                    return [exact]
                if kind in ("groupchat", "presence"):
                    return []
            return [s for s in resources.values() if s.available and s.priority >= 0]

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
        data = serialize(message)
        delivered = [stream.deliver(data) for stream in self._recipients(to, kind)]
        if not any(delivered):
            self._bounce(sender, message, kind, "service-unavailable", f"{to.bare} is not online")

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
        for stream in self._recipients(to, "presence"):
            stream.deliver(data)

    def _available(self, sender: "ClientStream", presence: Element) -> None:
        """Initial presence or an update: everyone (the sender too) sees it; a newcomer learns who is on."""
        priority = _priority(presence)
        data = serialize(presence)
        with self._lock:
            newcomer = not sender.available
            sender.available, sender.priority, sender.presence = True, priority, data
            self._broadcast(data)  # RFC 6121 section 4.2.2: the sender's own resource included
            if newcomer:
                for stream in self._streams():
                    if stream.available and stream is not sender and stream.presence is not None:
                        sender.deliver(stream.presence)

    def _went_unavailable(self, sender: "ClientStream", presence: Element) -> None:
        assert sender.jid is not None
        with self._lock:
            if not sender.available:
                return
            self._broadcast(serialize(presence))
            sender.available, sender.presence = False, None

    def _unavailable(self, jid: JID) -> bytes:
        return serialize(element(PRESENCE, {"from": str(jid), "type": "unavailable"}))

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
        with self._lock:
            recipient = self._accounts.get(to.local or "", {}).get(to.resource)
        if (recipient is None or not recipient.deliver(serialize(iq))) and request:
            sender.send_stanza(stanza_error(iq, "service-unavailable", f"{to} is not online"))


def _priority(presence: Element) -> int:
    """The presence's ``<priority/>`` (-128..127, default 0): negative ones get no bare-JID messages."""
    node = presence.find(_PRIORITY)
    if node is None or not node.text:
        return 0
    try:
        return max(-128, min(127, int(node.text.strip())))
    except ValueError:
        return 0
