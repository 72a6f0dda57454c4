"""The session broker: who is connected where, and delivery to a session, a user or a topic.

What every chat-style server needs and each one writes by hand: a table of
sessions (a logged-in connection, under a user name and a name unique for
that user, such as an XMPP resource or a chat nick), topics that sessions
join, and delivery of a message to any of them that never waits for the
recipient. Delivery goes through the recipient's outbox
(:meth:`Connection.post`): a recipient that stops reading is disconnected
once its outbox overflows, and never holds up the sender.

This module is the in-process broker, the default: one process, no
dependency, everything in one table under one lock. ``redis_broker`` puts the
same table in Redis so that sessions in other worker processes and on other
machines are reached the same way; the API is the same, so a server written
against :class:`LocalBroker` grows with ``--broker redis://...`` and no
change.

Nothing is lost silently: :meth:`LocalBroker.deliver` returns False when the
message was not taken (the session is gone, its outbox is full), and a
message whose failure is only known later (in another process) comes back
to its sender as the ``bounce`` bytes the sender gave.

Sessions are described by :class:`Session`: frozen, with the application's
own ``meta`` (presence, priority, a display name: anything JSON can carry),
changed by :meth:`LocalBroker.update`.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional
from urllib.parse import urlsplit

__all__ = ["Session", "LocalBroker", "node_name", "redact_url"]

log = logging.getLogger("netpool.broker")

_node_ids = itertools.count(1)


def node_name() -> str:
    """A name for this process among all the brokers sharing a directory: host, pid and a counter."""
    return f"{socket.gethostname()}:{os.getpid()}:{next(_node_ids)}"


def redact_url(url: str) -> str:
    """``url`` for a log line: a password in it (redis://:secret@host) is left out."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


@dataclass(frozen=True)
class Session:
    """One registered connection, as every node sees it."""

    key: str
    """Unique among all nodes: ``node/connection id``. What :meth:`LocalBroker.deliver` takes."""
    user: str
    """Who logged in (an XMPP account, a chat nick)."""
    name: str
    """Unique among the user's sessions (an XMPP resource); "" when a user has one session at most."""
    node: str
    """The broker (process) holding the connection."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """The application's data about the session (JSON types): presence, priority, ..."""


class LocalBroker:
    """Sessions, topics and delivery within one process (see the module's docstring).

    Every method is thread-safe and none waits for a peer: delivery only
    posts to outboxes. ``on_gone(sessions)`` is called when sessions vanish
    without their connections closing here (another node died: see
    ``redis_broker``); in one process it is never called.
    """

    def __init__(self, *, node: Optional[str] = None,
                 on_gone: Optional[Callable[[list[Session]], None]] = None) -> None:
        self.node = node or node_name()
        self.on_gone = on_gone
        self._lock = threading.RLock()
        self._local: dict[str, tuple[Any, Session]] = {}  # key -> (connection, session)
        self._by_conn: dict[int, str] = {}  # connection id -> key
        self._by_user: dict[str, dict[str, str]] = {}  # user -> {name: key}, sessions here
        self._members: dict[str, dict[str, Any]] = {}  # topic -> {key: connection}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node}: {len(self._local)} sessions here>"

    # -- sessions -------------------------------------------------------------------

    def register(self, conn: Any, user: str, name: str = "", meta: Optional[Mapping[str, Any]] = None
                 ) -> Optional[Session]:
        """Register ``conn`` as ``user``'s session ``name``; None if the user already has a session of that name.

        A connection holds one session: registering it again renames it (a
        chat's /nick), keeping its topics; the old name is let go only once
        the new one is claimed, so a failed rename leaves the session as it
        was. Call :meth:`unregister` when it closes (``on_close``).
        """
        if not isinstance(user, str) or not isinstance(name, str):
            raise TypeError(f"register(): user and name must be str, got {user!r} and {name!r}")
        session = Session(f"{self.node}/{conn.id}", user, name, self.node, dict(meta or {}))
        old = self.session_of(conn)
        if old is not None and (old.user, old.name) == (user, name):
            with self._lock:
                self._local[session.key] = (conn, session)
            self._store(session)
            return session
        with self._lock:
            names = self._by_user.setdefault(user, {})
            if name in names:
                return None
            names[name] = session.key  # reserved here while the directory is asked
        try:
            claimed = self._claim(session)
        except BaseException:
            self._forget_name(user, name)
            raise
        if not claimed:
            self._forget_name(user, name)
            return None
        with self._lock:
            if old is not None:
                self._forget_name(old.user, old.name)
            self._local[session.key] = (conn, session)
            self._by_conn[conn.id] = session.key
        if old is not None:
            self._release(old)
        return session

    def update(self, conn: Any, **meta: Any) -> Session:
        """Merge ``meta`` into ``conn``'s session (what others see of it); returns the session as it is now."""
        with self._lock:
            key = self._by_conn.get(conn.id)
            if key is None:
                raise KeyError(f"connection {conn.id} holds no session: register it first")
            _, old = self._local[key]
            session = Session(old.key, old.user, old.name, old.node, {**old.meta, **meta})
            self._local[key] = (conn, session)
        self._store(session)
        return session

    def unregister(self, conn: Any) -> Optional[Session]:
        """Forget ``conn``'s session and its topics; returns it (None if it held none)."""
        with self._lock:
            key = self._by_conn.pop(conn.id, None)
            if key is None:
                return None
            _, session = self._local.pop(key)
            self._forget_name(session.user, session.name)
            for topic, members in list(self._members.items()):
                if members.pop(key, None) is not None and not members:
                    del self._members[topic]
        self._release(session)
        return session

    def _forget_name(self, user: str, name: str) -> None:
        with self._lock:
            names = self._by_user[user]
            del names[name]
            if not names:
                del self._by_user[user]

    def session_of(self, conn: Any) -> Optional[Session]:
        """The session ``conn`` holds here, or None."""
        with self._lock:
            key = self._by_conn.get(conn.id)
            return self._local[key][1] if key is not None else None

    def local_sessions(self, user: Optional[str] = None) -> list[Session]:
        """Sessions of this process (of ``user``, if given); never asks anyone else."""
        with self._lock:
            if user is None:
                return [s for _, s in self._local.values()]
            local = self._local
            return [local[key][1] for key in self._by_user.get(user, {}).values() if key in local]

    def sessions(self, user: str) -> list[Session]:
        """Every session of ``user``, wherever it is."""
        return self.local_sessions(user)

    def everyone(self) -> list[Session]:
        """Every session, wherever it is."""
        return self.local_sessions()

    # -- topics ---------------------------------------------------------------------

    def join(self, conn: Any, topic: str) -> None:
        """Have ``conn``'s session receive what is published to ``topic``."""
        with self._lock:
            key = self._by_conn.get(conn.id)
            if key is None:
                raise KeyError(f"connection {conn.id} holds no session: register it first")
            self._members.setdefault(topic, {})[key] = conn

    def leave(self, conn: Any, topic: str) -> None:
        with self._lock:
            key = self._by_conn.get(conn.id)
            members = self._members.get(topic)
            if key is not None and members is not None and members.pop(key, None) is not None and not members:
                del self._members[topic]

    def members(self, topic: str) -> int:
        """How many sessions of this process are in ``topic``."""
        with self._lock:
            return len(self._members.get(topic, ()))

    def publish(self, topic: str, message: bytes, *, exclude: Any = None) -> int:
        """Post ``message`` to every session in ``topic`` (but ``exclude``'s); returns how many here took it."""
        return self._publish_here(topic, message, exclude.id if exclude is not None else None)

    def _publish_here(self, topic: str, message: bytes, exclude_id: Optional[int] = None) -> int:
        with self._lock:
            members = list(self._members.get(topic, {}).values())
        return sum(1 for conn in members if conn.id != exclude_id and conn.post(message))

    # -- delivery -------------------------------------------------------------------

    def deliver(self, to: "Session | str", message: bytes, *, bounce: Optional[bytes] = None,
                sender: Any = None) -> bool:
        """Post ``message`` to one session (a Session or its key); False if it was not taken.

        False means nothing was delivered and nothing will come back: the
        caller tells its sender. Where the outcome is only known later (a
        session in another process that closed meanwhile), ``bounce`` is
        posted to ``sender``'s connection instead, so a message is
        delivered or bounced, never dropped without a word (``sender`` must
        hold a session: that is where the bounce is sent).
        """
        key = to.key if isinstance(to, Session) else to
        return self._deliver_here(key, message)

    def _deliver_here(self, key: str, message: bytes) -> bool:
        with self._lock:
            entry = self._local.get(key)
        return entry is not None and entry[0].post(message)

    def close(self) -> None:
        """Stop serving (threads, connections to a directory); the in-process broker has none."""

    # -- what a shared directory adds (redis_broker) ------------------------------------

    def _claim(self, session: Session) -> bool:
        """Make ``session``'s (user, name) its own everywhere; False if a session elsewhere has it."""
        return True  # one process: the table here is everything

    def _store(self, session: Session) -> None:
        """``session``'s meta changed: tell the directory."""

    def _release(self, session: Session) -> None:
        """``session`` is gone: tell the directory."""

    def _entries(self) -> list[tuple[Any, Session]]:
        """Every (connection, session) here, for re-registering."""
        with self._lock:
            return list(self._local.values())
