"""The back end: a netpool listener speaking the length-prefixed protocol, users in SQLite.

It never sees HTTP: the front end turns each HTTP request into one frame
and the back end answers with one. Each connection's thread runs the
handler, so with a pooled front end the back end holds as many threads as
the pool holds connections, whatever the number of HTTP clients.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

import netpool

from . import protocol as p
from .passwords import DEFAULT_SCHEME, HashScheme
from .store import UserStore

__all__ = ["Backend", "start_backend"]

log = logging.getLogger("netpool.examples.gateway.backend")


class Backend:
    """The handler and its state: the user store and the hashing scheme for new users."""

    def __init__(self, store: UserStore, scheme: HashScheme = DEFAULT_SCHEME) -> None:
        self.store = store
        self.scheme = scheme
        # Verifying against this when the user does not exist costs the same
        # as a real check, so response times do not tell which names exist.
        self._decoy = scheme.hash("decoy")

    def __call__(self, message: bytes, conn: netpool.Connection) -> None:
        try:
            request = p.decode_request(message)
        except p.ProtocolViolation as exc:
            conn.send(p.encode_reply(p.BAD_REQUEST, str(exc)))
            return
        try:
            reply = self.handle(request, conn)
        except Exception:
            log.exception("back end failed on a %s request", p.OPS[request.op])
            reply = p.encode_reply(p.SERVER_ERROR, "internal error")
        conn.send(reply)

    def handle(self, request: p.Request, conn: Any) -> bytes:
        if request.op == p.OP_LOGIN:
            record = self.store.get(request.username)
            if record is None:
                self.scheme.verify(request.password, *self._decoy)
                return p.encode_reply(p.UNKNOWN_USER)
            ok = HashScheme.parse(record.scheme).verify(request.password, record.salt, record.hash)
            return p.encode_reply(p.OK if ok else p.WRONG_PASSWORD)
        if request.op == p.OP_REGISTER:
            if not request.username or not request.password:
                return p.encode_reply(p.BAD_REQUEST, "username and password must not be empty")
            salt, digest = self.scheme.hash(request.password)
            added = self.store.add(request.username, str(self.scheme), salt, digest)
            return p.encode_reply(p.OK if added else p.EXISTS)
        if request.op == p.OP_PING:
            return p.encode_reply(p.OK, "pong")
        info = conn.listener.info()
        return p.encode_reply(p.OK, json.dumps({
            "accepted": info.accepted, "live": info.live, "closed": info.closed,
            "closed_by_reason": dict(info.closed_by_reason),
        }))


def start_backend(
    db: str,
    *,
    host: str = "127.0.0.1",
    port: int = 7001,
    scheme: HashScheme = DEFAULT_SCHEME,
    max_connections: int = 4096,
    name: str = "gateway-backend",
    store: Optional[UserStore] = None,
) -> netpool.Listener:
    """Open the store and start serving; returns the running listener (stop it when done)."""
    store = store or UserStore(db)
    return netpool.start_listener(netpool.ListenerConfig(
        handler=Backend(store, scheme),
        host=host,
        port=port,
        framing="length",
        max_message_size=4096,
        max_connections=max_connections,
        backlog=4096,
        acceptors=4,
        name=name,
        on_close=None,
    ))
