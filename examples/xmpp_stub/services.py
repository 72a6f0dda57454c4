"""What the server itself answers: iq get/set addressed to the server or to the user's own account.

Every request gets exactly one reply (RFC 6120 section 8.2.3): a result for
the few payloads implemented here, ``service-unavailable`` for anything else.
Each handler is a plain function from the request to the reply, found by
(type, payload element) in one table, so adding a service is one function
and one line.
"""

from __future__ import annotations

from typing import Callable, Optional
from xml.etree.ElementTree import Element

from .stanzas import (
    BIND_NS,
    DISCO_INFO_NS,
    DISCO_ITEMS_NS,
    PING_NS,
    ROSTER_NS,
    SESSION_NS,
    element,
    iq_result,
    qname,
    stanza_error,
)

__all__ = ["answer", "SERVER_FEATURES"]

SERVER_NAME = "netpool xmpp_stub"
SERVER_FEATURES = (DISCO_INFO_NS, DISCO_ITEMS_NS, PING_NS)

Handler = Callable[[Element, Element, bool], Element]


def _disco_info(iq: Element, query: Element, for_account: bool) -> Element:
    if query.get("node"):
        return stanza_error(iq, "item-not-found")
    reply = element(qname(DISCO_INFO_NS, "query"))
    if for_account:
        # The account exists and is registered; it offers nothing further here (no PEP).
        reply.append(element(qname(DISCO_INFO_NS, "identity"), {"category": "account", "type": "registered"}))
    else:
        reply.append(element(qname(DISCO_INFO_NS, "identity"),
                             {"category": "server", "type": "im", "name": SERVER_NAME}))
        for feature in SERVER_FEATURES:
            reply.append(element(qname(DISCO_INFO_NS, "feature"), {"var": feature}))
    return iq_result(iq, reply)


def _disco_items(iq: Element, query: Element, for_account: bool) -> Element:
    if query.get("node"):
        return stanza_error(iq, "item-not-found")
    return iq_result(iq, element(qname(DISCO_ITEMS_NS, "query")))


def _roster_get(iq: Element, query: Element, for_account: bool) -> Element:
    # No rosters: every online user is visible to every other one through presence.
    return iq_result(iq, element(qname(ROSTER_NS, "query")))


def _roster_set(iq: Element, query: Element, for_account: bool) -> Element:
    return stanza_error(iq, "not-allowed", "this server keeps no rosters: every online user is visible")


def _empty_result(iq: Element, query: Element, for_account: bool) -> Element:
    return iq_result(iq)


def _bind_again(iq: Element, query: Element, for_account: bool) -> Element:
    return stanza_error(iq, "not-allowed", "a resource is already bound to this stream")


_HANDLERS: dict[tuple[str, str], Handler] = {
    ("get", qname(DISCO_INFO_NS, "query")): _disco_info,
    ("get", qname(DISCO_ITEMS_NS, "query")): _disco_items,
    ("get", qname(ROSTER_NS, "query")): _roster_get,
    ("set", qname(ROSTER_NS, "query")): _roster_set,
    ("get", qname(PING_NS, "ping")): _empty_result,  # XEP-0199
    ("set", qname(SESSION_NS, "session")): _empty_result,  # RFC 3921's session: accepted, means nothing now
    ("set", qname(BIND_NS, "bind")): _bind_again,
}


def answer(iq: Element, *, for_account: bool) -> Optional[Element]:
    """The reply to an iq for the server (or, with ``for_account``, for the sender's own bare JID).

    Results and errors addressed to the server get no reply (None): the
    server never sends requests, and replying to a reply could loop.
    """
    kind = iq.get("type")
    if kind not in ("get", "set"):
        return None
    if len(iq) != 1:
        return stanza_error(iq, "bad-request", "an iq get or set carries exactly one payload element")
    payload = iq[0]
    handler = _HANDLERS.get((kind, payload.tag))
    if handler is None:
        return stanza_error(iq, "service-unavailable")
    return handler(iq, payload, for_account)
