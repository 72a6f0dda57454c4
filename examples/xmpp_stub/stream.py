"""ClientStream: one client's XMPP session on one netpool connection.

The whole life of a client-to-server stream (RFC 6120), as the state this
object holds::

    connected --header--> features --STARTTLS--> (restart) --header--> features
        --SASL PLAIN--> (restart) --header--> features --bind--> bound
        --stanzas...--> closed

- ``parser`` is replaced at each restart (after STARTTLS, after SASL
  success): the new stream starts from a fresh parser, and whatever the
  client sent after its request on the old one is void.
- ``user`` is set by SASL, ``jid`` by resource binding; the router learns
  of the stream only at binding, so nothing is routed before both.
- ``deadline`` is for the deadline keeper: a fixed login deadline until
  binding, then moved on with every read.

Threads: ``receive`` runs on the connection's own thread (netpool calls the
handler there, in order), and so do the replies it writes (``send``), which
may wait for this client's window but never for anyone else. Stanzas from
other users arrive through ``deliver`` (or straight from the broker) on
*their* threads, or on the broker's in another process, and only go into
the connection's outbox (``conn.post``), which netpool writes between this
stream's own sends and which never makes the sender wait. One lock
serialises this stream's writes and its end; once the stream has ended
(``</stream:stream>`` sent) its connection closes, and nothing posted is
written after that.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from typing import TYPE_CHECKING, Optional
from xml.etree.ElementTree import Element

import netpool
from netpool import ConnectionClosed, SendTimeout
from netpool.config import format_address

from .jid import JID, InvalidJID, domainpart, localpart, resourcepart
from .parser import StanzaReceived, StreamError, StreamOpened, StreamParser
from .sasl import MECHANISMS, PlainCredentials, SASLFailure, decode_payload, parse_plain
from .router import BindFailed
from .services import answer
from .stanzas import (
    BIND_NS,
    CLIENT_NS,
    IQ,
    LIMITS_NS,
    MESSAGE,
    PRESENCE,
    SASL_NS,
    SESSION_NS,
    STREAM_END,
    STREAM_NS,
    TLS_NS,
    XML_NS,
    element,
    iq_result,
    qname,
    stanza_error,
    stream_error,
    stream_header,
)
from .writer import serialize

if TYPE_CHECKING:  # pragma: no cover
    from .server import XMPPServer

__all__ = ["ClientStream"]

log = logging.getLogger("netpool.xmpp")

STARTTLS = qname(TLS_NS, "starttls")
BIND = qname(BIND_NS, "bind")
XML_LANG = qname(XML_NS, "lang")
_SASL_PREFIX = f"{{{SASL_NS}}}"
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")


class ClientStream:
    """The protocol state of one client connection; created by :meth:`XMPPServer.on_connect`."""

    def __init__(self, server: "XMPPServer", conn: netpool.Connection) -> None:
        settings = server.settings
        self.server = server
        self.conn = conn
        self.settings = settings
        self.parser = StreamParser(settings.limits)
        self.stream_id = ""
        self.header_sent = False
        self.user: Optional[str] = None
        """The authenticated account's localpart, once SASL succeeded."""
        self.jid: Optional[JID] = None
        """The bound full JID, once resource binding succeeded."""
        # Presence, read and written by the router under its lock.
        self.available = False
        self.priority = 0
        self.presence: Optional[bytes] = None
        self.deadline = time.monotonic() + settings.login_timeout
        self._challenged = False
        self._auth_failures = 0
        self._write_lock = threading.Lock()
        self._ended = False
        tls = conn.listener.config.ssl
        self._starttls_configured = tls is not None and tls.mode == "starttls"

    def __repr__(self) -> str:
        return f"<ClientStream conn={self.conn.id} {self.jid or self.user or 'unauthenticated'}>"

    def _who(self) -> str:
        who = f"conn {self.conn.id} from {format_address(self.conn.peer)}"
        return f"{who} ({self.jid})" if self.jid is not None else who

    # -- input: the connection's own thread ---------------------------------------------

    def receive(self, data: bytes) -> None:
        """Handle bytes as they arrive; a protocol error ends the stream with its stream error."""
        if self._ended:
            return
        if self.jid is not None:
            self.deadline = time.monotonic() + self.settings.session_timeout
        try:
            events = self.parser.feed(data)
        except StreamError as exc:
            self.close(exc.condition, exc.text)
            return
        parser = self.parser
        for event in events:
            if self._ended or self.parser is not parser:
                break  # closed, or restarted: what followed belonged to the old stream
            if isinstance(event, StanzaReceived):
                self._stanza(event.element)
            elif isinstance(event, StreamOpened):
                self._opened(event)
            else:
                self.close()  # the client sent </stream:stream>: answer with ours and hang up

    def _opened(self, header: StreamOpened) -> None:
        self.stream_id = secrets.token_hex(8)  # a new id for every stream, restarts included
        lang = header.attributes.get(XML_LANG, "en")
        self.send(stream_header(self.settings.domain, self.stream_id,
                                lang if _LANGUAGE_TAG.fullmatch(lang) else "en"))
        self.header_sent = True
        if header.default_namespace != CLIENT_NS:
            return self.close("invalid-namespace", f"this is a client port: the content namespace is {CLIENT_NS}")
        if header.attributes.get("version", "").partition(".")[0] != "1":
            return self.close("unsupported-version", "this server speaks XMPP 1.0: send version='1.0'")
        try:
            host = domainpart(header.attributes.get("to", ""))
        except InvalidJID:
            host = None
        if host != self.settings.domain:
            return self.close("host-unknown", f"this server is {self.settings.domain}: say to='{self.settings.domain}'")
        self.send_stanza(self._features())

    def _features(self) -> Element:
        """What the client may negotiate next (RFC 6120 section 4.3.2)."""
        features = element(qname(STREAM_NS, "features"))
        if self.user is None:
            if self._starttls_offered():
                starttls = element(STARTTLS)
                if self.settings.require_tls:
                    starttls.append(element(qname(TLS_NS, "required")))
                features.append(starttls)
            if self._tls_satisfied():
                # Only what is implemented: a client must never pick a mechanism we would refuse.
                features.append(element(qname(SASL_NS, "mechanisms"), None,
                                        *(element(qname(SASL_NS, "mechanism"), text=m) for m in MECHANISMS)))
        else:
            features.append(element(BIND))
            features.append(element(qname(SESSION_NS, "session"), None, element(qname(SESSION_NS, "optional"))))
            max_bytes = str(self.settings.limits.max_stanza_bytes)
            idle_seconds = f"{self.settings.session_timeout:.0f}"
            features.append(element(qname(LIMITS_NS, "limits"), None,
                                    element(qname(LIMITS_NS, "max-bytes"), text=max_bytes),
                                    element(qname(LIMITS_NS, "idle-seconds"), text=idle_seconds)))
        return features

    def _starttls_offered(self) -> bool:
        # Never twice, never once authenticated, only with a certificate in STARTTLS mode.
        return self._starttls_configured and self.conn.tls is None and self.user is None

    def _tls_satisfied(self) -> bool:
        return self.conn.tls is not None or not self.settings.require_tls

    def _stanza(self, stanza: Element) -> None:
        """One top-level element: negotiation while logging in, then messages, presence and iqs."""
        tag = stanza.tag
        if tag == STARTTLS:
            return self._starttls()
        if tag.startswith(_SASL_PREFIX):
            return self._sasl(stanza)
        if not self._tls_satisfied():
            return self.close("policy-violation", "this server requires STARTTLS first")
        if self.user is None:
            return self.close("not-authorized", "authenticate first")
        if tag not in (IQ, MESSAGE, PRESENCE):
            return self.close("unsupported-stanza-type", f"<{tag}> is not a client stanza")
        if self.jid is None:
            if tag == IQ and stanza.get("type") == "set" and len(stanza) == 1 and stanza[0].tag == BIND:
                return self._bind(stanza)
            return self.close("not-authorized", "bind a resource before sending stanzas")
        # Whatever the client wrote, the server vouches for the sender.
        stanza.set("from", str(self.jid))
        if tag == MESSAGE:
            self.server.router.message(self, stanza)
        elif tag == PRESENCE:
            self.server.router.presence(self, stanza)
        else:
            self._iq(stanza)

    # -- STARTTLS -----------------------------------------------------------------------

    def _starttls(self) -> None:
        if not self._starttls_offered():
            # RFC 6120 section 5.4.2.2: failure, then the stream and the connection close.
            self.send_stanza(element(qname(TLS_NS, "failure")))
            return self.close()
        self.send_stanza(element(qname(TLS_NS, "proceed")))
        try:
            info = self.conn.start_tls()
        except netpool.TLSError as exc:
            self._ended = True  # netpool has closed the connection (tls_error or tls_handshake_timeout)
            log.info("%s: STARTTLS failed: %s", self._who(), exc)
            return
        log.debug("%s: %s with %s", self._who(), info.version, info.cipher)
        self._restart()

    # -- SASL ---------------------------------------------------------------------------

    def _sasl(self, stanza: Element) -> None:
        if self.user is not None:
            return self.close("policy-violation", "already authenticated")
        if not self._tls_satisfied():
            return self.close("policy-violation", "this server requires STARTTLS before authentication")
        name = stanza.tag[len(_SASL_PREFIX):]
        if name == "auth":
            if stanza.get("mechanism") not in MECHANISMS:
                return self._auth_failed("invalid-mechanism")
            if not (stanza.text or "").strip():
                self._challenged = True  # no initial response: ask for it with an empty challenge
                return self.send_stanza(element(qname(SASL_NS, "challenge")))
            return self._authenticate(stanza.text or "")
        if name == "response" and self._challenged:
            return self._authenticate(stanza.text or "")
        if name == "abort":
            self._challenged = False
            return self._auth_failed("aborted")
        return self._auth_failed("malformed-request")

    def _authenticate(self, payload: str) -> None:
        self._challenged = False
        user = None
        try:
            credentials = parse_plain(decode_payload(payload))
            user = self._account(credentials)
            if not self.server.check_password(user, credentials.password):
                raise SASLFailure("not-authorized")
        except SASLFailure as failure:
            return self._auth_failed(failure.condition, user)
        self.user = user
        log.info("%s: authenticated as %s@%s", self._who(), user, self.settings.domain)
        self.send_stanza(element(qname(SASL_NS, "success")))
        self._restart()

    def _account(self, credentials: PlainCredentials) -> str:
        """The localpart the credentials name, normalised; SASLFailure if they name nothing valid here."""
        name = credentials.authcid
        if "@" in name:  # some clients send the bare JID as the user name
            name, _, domain = name.rpartition("@")
            try:
                if domainpart(domain) != self.settings.domain:
                    raise SASLFailure("not-authorized")
            except InvalidJID:
                raise SASLFailure("not-authorized") from None
        try:
            user = localpart(name)
        except InvalidJID:
            raise SASLFailure("not-authorized") from None
        if credentials.authzid:
            # Acting as someone else is not supported: the authzid may only repeat the account.
            try:
                authzid = JID.parse(credentials.authzid)
            except InvalidJID:
                raise SASLFailure("invalid-authzid") from None
            if authzid != JID(user, self.settings.domain):
                raise SASLFailure("invalid-authzid")
        return user

    def _auth_failed(self, condition: str, user: Optional[str] = None) -> None:
        # The user name is logged (it is needed to spot attacks); the payload never is.
        self._auth_failures += 1
        log.info("%s: authentication failed (%s)%s", self._who(), condition, f" for user {user!r}" if user else "")
        self.send_stanza(element(qname(SASL_NS, "failure"), None, element(qname(SASL_NS, condition))))
        if self._auth_failures >= self.settings.max_auth_attempts:
            self.close("policy-violation", "too many failed authentication attempts")

    def _restart(self) -> None:
        """A new stream on the same connection: fresh parser, and our header again when theirs comes."""
        self.parser = StreamParser(self.settings.limits)
        self.header_sent = False

    # -- binding and the server's own replies -------------------------------------------

    def _bind(self, iq: Element) -> None:
        assert self.user is not None
        requested = (iq[0].findtext(qname(BIND_NS, "resource")) or "").strip()
        resource = None
        if requested:
            try:
                resource = resourcepart(requested)
            except InvalidJID as exc:
                return self.send_stanza(stanza_error(iq, "bad-request", f"resource: {exc}"))
        try:
            jid = self.server.router.bind(self, self.user, resource or None)
        except BindFailed as exc:
            log.warning("%s: cannot bind a resource: %s", self._who(), exc)
            return self.send_stanza(stanza_error(iq, "resource-constraint", "the session table is unreachable; "
                                                 "try again in a moment"))
        self.jid = jid
        self.deadline = time.monotonic() + self.settings.session_timeout
        self.send_stanza(iq_result(iq, element(BIND, None, element(qname(BIND_NS, "jid"), text=str(jid)))))
        # Only now is it routed to: nothing for the new JID can overtake the bind result.
        # (A sender who knows the JID out of band and writes in the moment between gets
        # service-unavailable; one who learns it from this stream's presence never does.)
        self.server.router.bound(self)
        log.info("%s: bound", self._who())

    def _iq(self, iq: Element) -> None:
        assert self.jid is not None
        kind = iq.get("type")
        request = kind in ("get", "set")
        if not request and kind not in ("result", "error"):
            return self.send_stanza(stanza_error(iq, "bad-request", "iq type must be get, set, result or error"))
        if iq.get("id") is None:
            if request:
                self.send_stanza(stanza_error(iq, "bad-request", "an iq needs an id"))
            return
        to_text = iq.get("to")
        try:
            to = JID.parse(to_text) if to_text is not None else None
        except InvalidJID as exc:
            if request:
                self.send_stanza(stanza_error(iq, "jid-malformed", str(exc)))
            return
        if to is None or to == JID(None, self.settings.domain) or to == self.jid.bare:
            reply = answer(iq, for_account=to is not None and to.local is not None)
            if reply is not None:
                self.send_stanza(reply)
            return
        self.server.router.iq(self, iq, to)

    # -- output ---------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write to this client now, on the calling thread; nothing is written once the stream ended.

        Called by the stream's own thread. May wait for this client's window
        (up to ``send_timeout``), which only ever delays this client.
        """
        with self._write_lock:
            self._write_locked(data)

    def _write_locked(self, data: bytes) -> None:
        if not self._ended:
            self.conn.send(data)

    def send_stanza(self, stanza: Element) -> None:
        self.send(serialize(stanza))

    def deliver(self, data: bytes) -> bool:
        """Queue a stanza from elsewhere (any thread; never blocks); False if it was not taken."""
        return False if self._ended else self.conn.post(data)

    def close(self, condition: Optional[str] = None, text: Optional[str] = None) -> None:
        """End the stream: our header if not yet sent, the stream error if any, ``</stream:stream>``, then hang up."""
        with self._write_lock:
            last = self._last_words(condition, text)
            if last is None:
                return
            try:
                self.conn.send(last)
            except (ConnectionClosed, SendTimeout):
                pass  # the client is gone or not reading: closing is all that is left
        if condition is not None:
            log.info("%s: stream error %s: %s", self._who(), condition, text or "")
        self.conn.close()

    # -- called from other threads ------------------------------------------------------

    def expire(self) -> None:
        """The deadline passed (deadline keeper's thread): close with connection-timeout, without blocking here.

        The stream error goes out through the outbox (a client that does not
        read delays nobody); the graceful close lets it be written before
        the connection ends.
        """
        if self.jid is None:
            text = f"not logged in within {self.settings.login_timeout:g} s"
        else:
            text = f"nothing received for {self.settings.session_timeout:g} s"
        with self._write_lock:
            last = self._last_words("connection-timeout", text)
        if last is None:
            return
        log.info("%s: stream error connection-timeout: %s", self._who(), text)
        self.conn.post(last)
        self.conn.close("timeout", graceful=True)

    def _last_words(self, condition: Optional[str], text: Optional[str]) -> Optional[bytes]:
        """End the stream (write lock held): what is left to say, or None if it had already ended.

        Our header if not yet sent (an error before the client's header still
        comes inside a stream), the stream error if any, ``</stream:stream>``.
        """
        if self._ended:
            return None
        self._ended = True
        parts = [] if self.header_sent else [stream_header(self.settings.domain,
                                                           self.stream_id or secrets.token_hex(8))]
        if condition is not None:
            parts.append(stream_error(condition, text))
        parts.append(STREAM_END)
        return b"".join(parts)

    def closed(self, reason: str) -> None:
        """The connection has closed (netpool's on_close, on the connection's thread)."""
        self._ended = True
        self.server.deadlines.unwatch(self)
        self.server.router.unbind(self)
        log.info("%s: closed (%s)", self._who(), reason)
