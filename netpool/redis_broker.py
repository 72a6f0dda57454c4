"""The session broker on Redis: sessions and delivery across worker processes and machines.

:class:`RedisBroker` is :class:`broker.LocalBroker` (the sessions of this
process, delivered to without leaving it) plus a directory in Redis that
every node (a process with a broker) shares, through redis-py:

- ``P u:USER``: a hash, session name -> {key, node, meta} (JSON). A name is
  claimed with HSETNX, so one name of a user (an XMPP full JID) is bound
  once among all the nodes, as one server would bind it.
- ``P users``, ``P nodes``: who has sessions; the nodes alive.
- ``P alive:NODE``: a key with a TTL each node renews every ``beat`` seconds;
  ``P ns:NODE``: that node's sessions, for whoever clears them up.
- Channels: ``P n:NODE``, each node's inbox (messages for its sessions, and
  bounces for its senders); ``P t:TOPIC``, topics (every node subscribes to
  the pattern).

Delivery to a session of another node is one PUBLISH to its inbox, sent by
the publisher thread (every message queued meanwhile in one pipeline).
Redis answers how many subscribers took it: none means the node is gone
(its subscription died with it), and the message bounces to its sender. A node that
finds the session closed meanwhile sends the sender's ``bounce`` back to the
sender's node. So every message is delivered or bounced; none vanishes.

Failures, and what users see:

- **A node dies** (SIGKILL, power): its key expires within ``ttl`` seconds;
  within one ``beat`` more a surviving node takes its sessions out of the
  directory and calls ``on_gone(sessions)`` once, on that node only (an
  XMPP server announces them unavailable). Until then messages to them
  bounce (nobody subscribes to the dead node's inbox).
- **Redis unreachable**: no call waits longer than ``timeout`` (no retries
  on the caller's thread); after the first failure calls fail at once with
  :class:`BrokerUnavailable` until a background PING gets through. Sessions
  of this process keep being served. One log line when the outage starts,
  one when it ends.
- **Redis back, or restarted empty**: the node registers its sessions again
  by itself and calls ``on_restored(sessions)`` (an XMPP server announces
  its available users again).

Threads: one reads the inbox and the topics (``netpool-broker-inbox``), one
publishes what handlers deliver and publish for other nodes, a pipeline at
a time, so no handler waits for Redis to send a message
(``netpool-broker-publish``), one renews the node's key, clears up dead
nodes and watches for Redis to come back (``netpool-broker-beat``). They start on first use in the process that
serves (a broker made before ``fork`` starts its own in each child).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qs, urlsplit

from .broker import LocalBroker, Session, redact_url
from .errors import BrokerUnavailable, ConfigError
from .ratelimit import RateLimitedLog

__all__ = ["RedisBroker", "DEFAULT_PREFIX"]

log = logging.getLogger("netpool.broker")

DEFAULT_PREFIX = "netpool:"
# Calls to Redis at once per process (handler threads beyond wait for a
# turn, up to POOL_WAIT): one connection per calling thread would be
# hundreds per process, and Redis refuses clients past its maxclients. All
# turns busy that long is this process's load, not a Redis outage: that
# call fails (its message bounces) and nothing else changes. 1,000 users
# messaging at once on two cores kept 16 connections busy past 0.5 s.
POOL_SIZE = 32
POOL_WAIT = 2.0
# Messages for other nodes waiting to be published (one pipeline a round,
# on the publisher thread); past this, deliveries are refused (they bounce).
OUTGOING_LIMIT = 100_000

# Envelopes on the channels: a kind byte, a JSON header line, the message.
_DELIVER = b"D"
_BOUNCE = b"B"
_TOPIC = b"T"


def _redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ConfigError("broker", "a redis:// broker needs redis-py: pip install 'netpool[redis]'") from None
    return redis


class RedisBroker(LocalBroker):
    """Sessions, topics and delivery shared through a Redis server (see the module's docstring).

    ``url`` is redis-py's (``redis://HOST:PORT/DB``); ``prefix`` keeps the
    keys of several chat servers sharing one Redis apart (also given as
    ``?prefix=`` in the URL). Timings: ``timeout`` bounds any one call to
    Redis from a handler's thread; a dead node's sessions are gone within
    ``ttl + beat`` seconds.
    """

    def __init__(self, url: str, *, node: Optional[str] = None, prefix: Optional[str] = None,
                 on_gone: Optional[Callable[[list[Session]], None]] = None,
                 on_restored: Optional[Callable[[list[Session]], None]] = None,
                 timeout: float = 0.5, beat: float = 1.0, ttl: float = 3.0) -> None:
        super().__init__(node=node, on_gone=on_gone)
        redis = _redis()
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError("broker", f"expected a redis://HOST:PORT/DB address, got {url!r}")
        query = parse_qs(parts.query)
        self.prefix = prefix or query.pop("prefix", [DEFAULT_PREFIX])[0]
        self.url = parts._replace(query="&".join(f"{k}={v[0]}" for k, v in query.items())).geturl()
        self.address = redact_url(self.url)  # for log lines and errors: no password
        self.on_restored = on_restored
        self.timeout = timeout
        self.beat = beat
        self.ttl = ttl
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)

        # No retries on the caller's thread: a call fails within `timeout`.
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._client = redis.Redis.from_url(
            self.url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False)
        self._slots = threading.BoundedSemaphore(POOL_SIZE)
        self._outgoing: list[tuple[str, bytes, Optional[tuple[str, bytes]]]] = []
        self._outgoing_ready = threading.Condition(threading.Lock())
        self._release_script = self._client.register_script(_RELEASE)
        self._claim_script = self._client.register_script(_CLAIM)
        self._store_script = self._client.register_script(_STORE)
        # What this node knows of other nodes' sessions, user by user, kept
        # while the inbox hears every change of the directory (``P d``, sent
        # by the same scripts that write it): a message to a user costs no
        # round trip to Redis. A change empties the user's entry; a lookup
        # that overlapped a change does not store what it read (generations).
        self._changes = self._key("", "d")
        self._known: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self._generation: dict[str, int] = {}
        self._epoch = 0
        self._mirroring = False
        self._known_lock = threading.Lock()
        self._busy_log = RateLimitedLog(log)
        self._topics = self._key("t:", "")
        self._up = True
        self._down_since = 0.0
        self._state_lock = threading.Lock()
        self._started_pid = 0
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._threads: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"<RedisBroker {self.node} at {self.address}: {len(self.local_sessions())} sessions here>"

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}{name}"

    @property
    def _inbox(self) -> str:
        """This node's channel: messages for its sessions, and bounces for its senders."""
        return self._key("n:", self.node)

    def _away(self) -> BrokerUnavailable:
        """The error for a call made while Redis is known to be away (raised at once, without trying)."""
        return BrokerUnavailable(f"Redis at {self.address} is unreachable (since {self._outage():.1f} s)")

    # -- starting, in the serving process --------------------------------------------

    def start(self) -> None:
        """Register the node and start its threads (done by the first call that needs them; idempotent)."""
        if self._started_pid == os.getpid():
            return
        with self._start_lock:
            if self._started_pid == os.getpid():
                return
            if self._started_pid:  # made before a fork: the parent's threads did not come along
                self.node = f"{self.node}.{os.getpid()}"
            self._stop.clear()
            self._subscribed.clear()
            self._threads = [
                threading.Thread(target=self._read_inbox, name="netpool-broker-inbox", daemon=True),
                threading.Thread(target=self._keep_alive, name="netpool-broker-beat", daemon=True),
                threading.Thread(target=self._send_outgoing, name="netpool-broker-publish", daemon=True),
            ]
            self._started_pid = os.getpid()
            try:
                self._announce()
            except self._errors as exc:
                self._went_down(exc)
            for thread in self._threads:
                thread.start()
            # Not subscribed yet means messages for this node would bounce: wait a little for it.
            self._subscribed.wait(max(self.timeout * 4, 1.0))
            log.info("broker %s: sessions shared through Redis at %s (prefix %r)", self.node, self.address, self.prefix)

    def close(self) -> None:
        """Leave the directory (sessions still here are taken out of it) and stop the threads."""
        if self._started_pid != os.getpid():
            return
        self._stop.set()
        with self._outgoing_ready:
            self._outgoing_ready.notify()
        for _, session in self._entries():
            self._release_quietly(session)
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(self._key("alive:", self.node), self._key("ns:", self.node))
            pipe.srem(self._key("", "nodes"), self.node)
            pipe.execute()
        except self._errors:
            pass
        for thread in self._threads:
            thread.join(max(self.beat, 1.0) + self.timeout)
        self._started_pid = 0

    # -- the directory: what LocalBroker asks of it ------------------------------------

    def _claim(self, session: Session) -> bool:
        self.start()
        with self._redis() as client:
            return bool(self._claim_script(keys=[self._key("u:", session.user), self._key("", "users"),
                                                 self._key("ns:", self.node)],
                                           args=[session.name, self._record(session), session.user,
                                                 _member(session), self._changes], client=client))

    def _store(self, session: Session) -> None:
        with self._redis() as client:
            self._store_script(keys=[self._key("u:", session.user)],
                               args=[session.name, self._record(session), session.user, self._changes],
                               client=client)

    def _release(self, session: Session) -> None:
        if self._started_pid == os.getpid():
            self._release_quietly(session)

    def _release_quietly(self, session: Session) -> None:
        """Take ``session`` out of the directory if it is still ours there; an outage is logged, not raised."""
        try:
            with self._redis() as client:
                self._forget(client, session, session.node)
        except BrokerUnavailable:
            pass  # the directory is rebuilt from what is here when it is back

    def _forget(self, client: Any, session: Session, node: str) -> Optional[dict[str, Any]]:
        """Remove ``session``'s name if ``node``'s session holds it, and the user once it has none; its record."""
        record = self._release_script(keys=[self._key("u:", session.user), self._key("", "users"),
                                            self._key("ns:", node)],
                                      args=[session.name, node, session.key, session.user, _member(session),
                                            self._changes],
                                      client=client)
        return json.loads(record) if record else None

    def _record(self, session: Session) -> str:
        return json.dumps({"k": session.key, "n": session.node, "m": session.meta})

    # -- looking up --------------------------------------------------------------------

    def sessions(self, user: str) -> list[Session]:
        """Every session of ``user`` on every node; BrokerUnavailable if Redis cannot be asked (see local_sessions).

        Answered from what this node knows when it can (the inbox hears every
        change); else from Redis, and then remembered.
        """
        self.start()
        if not self._up:
            raise self._away()
        known = self._known.get(user)
        if known is None:
            with self._known_lock:
                seen = (self._epoch, self._generation.get(user, 0))
            with self._redis() as client:
                records = client.hgetall(self._key("u:", user))
            known = [(name.decode(), json.loads(record)) for name, record in records.items()]
            with self._known_lock:
                if self._mirroring and seen == (self._epoch, self._generation.get(user, 0)):
                    self._known[user] = known
        return self._merge(user, known)

    def everyone(self) -> list[Session]:
        """Every session on every node; BrokerUnavailable if Redis cannot be asked."""
        self.start()
        with self._redis() as client:
            users = sorted(u.decode() for u in client.smembers(self._key("", "users")))
            pipe = client.pipeline(transaction=False)
            for user in users:
                pipe.hgetall(self._key("u:", user))
            found = pipe.execute()
        return [s for user, records in zip(users, found)
                for s in self._merge(user, [(name.decode(), json.loads(r)) for name, r in records.items()])]

    def _merge(self, user: str, records: list[tuple[str, dict[str, Any]]]) -> list[Session]:
        """Sessions from the directory, those of this node as this node has them (fresher, and only if open)."""
        here = {s.key: s for s in self.local_sessions(user)}
        found = []
        for name, data in records:
            if data["n"] == self.node:
                session = here.pop(data["k"], None)
                if session is not None:
                    found.append(session)
            else:
                found.append(Session(data["k"], user, name, data["n"], data.get("m") or {}))
        found.extend(here.values())  # registered while the directory was away
        return found

    # -- delivery ------------------------------------------------------------------------

    def deliver(self, to: "Session | str", message: bytes, *, bounce: Optional[bytes] = None,
                sender: Any = None) -> bool:
        """As LocalBroker.deliver; a session on another node is reached through the outgoing queue (never waits).

        True then means "on its way": whether the node took it is known
        when the queue is written (one pipeline for every message queued
        meanwhile). A message no node took, or whose session is gone there,
        comes back to ``sender`` as ``bounce``. False at once while Redis is
        known to be away, or the queue is full (this process is overloaded).
        """
        key = to.key if isinstance(to, Session) else to
        node = key.rpartition("/")[0]
        if node == self.node:
            return self._deliver_here(key, message)
        self.start()
        origin = self.session_of(sender) if sender is not None and bounce is not None else None
        header = {"to": key}
        back: Optional[tuple[str, bytes]] = None
        if origin is not None:
            assert bounce is not None  # origin is looked up only when there is a bounce to send back
            header["from"] = origin.key
            header["bounce"] = bounce.decode("latin-1")
            back = (origin.key, bounce)
        return self._queue(self._key("n:", node), _envelope(_DELIVER, header, message), back)

    def publish(self, topic: str, message: bytes, *, exclude: Any = None) -> int:
        """Post to ``topic``'s sessions here at once, and to other nodes' through the outgoing queue.

        Returns the count here. During an outage only this node's sessions
        get it (topics carry presence and broadcasts, which are not bounced).
        """
        count = super().publish(topic, message, exclude=exclude)
        self.start()
        self._queue(self._key("t:", topic), _envelope(_TOPIC, {"o": self.node, "t": topic}, message), None)
        return count

    # -- the outgoing queue: PUBLISHes off the callers' threads, pipelined ---------------------

    def _queue(self, channel: str, payload: bytes, bounce: Optional[tuple[str, bytes]]) -> bool:
        if not self._up:
            return False
        with self._outgoing_ready:
            if len(self._outgoing) >= OUTGOING_LIMIT:
                full = True
            else:
                full = False
                self._outgoing.append((channel, payload, bounce))
                if len(self._outgoing) == 1:
                    self._outgoing_ready.notify()
        if full:
            self._busy_log(logging.WARNING, "broker %s: %d messages wait to be published; refusing more "
                           "(they bounce): this process is overloaded", self.node, OUTGOING_LIMIT)
        return not full

    def _send_outgoing(self) -> None:
        """The publisher thread: everything queued since the last round in one pipeline; bounce what no node took."""
        while not self._stop.is_set():
            with self._outgoing_ready:
                while not self._outgoing and not self._stop.is_set():
                    self._outgoing_ready.wait(1.0)
                batch, self._outgoing = self._outgoing, []
            if not batch:
                continue
            try:
                pipe = self._client.pipeline(transaction=False)
                for channel, payload, _ in batch:
                    pipe.publish(channel, payload)
                taken = pipe.execute()
            except self._errors as exc:
                self._went_down(exc)
                taken = [0] * len(batch)
            except Exception:
                log.exception("broker %s: publishing %d messages failed; bouncing them", self.node, len(batch))
                taken = [0] * len(batch)
            for (channel, _, bounce), count in zip(batch, taken):
                if not count and bounce is not None and not self._deliver_here(*bounce):
                    log.debug("broker %s: a bounce for %s found it gone", self.node, bounce[0])

    @contextlib.contextmanager
    def _redis(self) -> Iterator[Any]:
        """The client for one call from a caller's thread: BrokerUnavailable at once while Redis is known away,
        after POOL_WAIT if every turn is taken, within ``timeout`` if Redis does not answer (an outage)."""
        if not self._up:
            raise self._away()
        if not self._slots.acquire(timeout=POOL_WAIT):
            self._busy_log(logging.WARNING, "broker %s: all %d turns to call Redis stayed taken for %g s; a call "
                           "failed (its message bounces): this process is overloaded", self.node, POOL_SIZE, POOL_WAIT)
            raise BrokerUnavailable(f"every turn to call Redis at {self.address} is taken")
        try:
            yield self._client
        except self._errors as exc:
            raise self._went_down(exc) from None
        finally:
            self._slots.release()

    # -- the inbox thread ----------------------------------------------------------------

    def _read_inbox(self) -> None:
        pause = 0.05
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self._inbox, self._changes)
                pubsub.psubscribe(self._topics + "*")
                self._forget_known(mirroring=True)  # changes missed while not subscribed: start afresh
                self._subscribed.set()
                pause = 0.05
                changes = self._changes.encode()
                while not self._stop.is_set():
                    item = pubsub.get_message(timeout=0.5)
                    if item is None or item["type"] not in ("message", "pmessage"):
                        continue
                    if item["channel"] == changes:
                        self._changed(item["data"].decode())
                    else:
                        self._received(item["data"])
            except self._errors as exc:
                self._forget_known(mirroring=False)
                self._subscribed.set()  # nobody should wait for a subscription during an outage
                self._went_down(exc)
            except Exception:
                log.exception("broker %s: reading the inbox failed; starting it again", self.node)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # closing a broken connection: nothing left to tell
                        pass
            self._stop.wait(pause)
            pause = min(pause * 2, 1.0)

    def _changed(self, user: str) -> None:
        """The directory changed for ``user`` (or for everyone: "")."""
        with self._known_lock:
            if user:
                self._known.pop(user, None)
                self._generation[user] = self._generation.get(user, 0) + 1
            else:
                self._known.clear()
                self._epoch += 1

    def _forget_known(self, *, mirroring: bool) -> None:
        with self._known_lock:
            self._known.clear()
            self._epoch += 1
            self._mirroring = mirroring

    def _received(self, data: bytes) -> None:
        kind, header, message = _open(data)
        if kind == _DELIVER:
            if self._deliver_here(header["to"], message):
                return
            origin = header.get("from")
            if origin is None:
                log.debug("broker %s: a message for %s found it gone", self.node, header["to"])
                return
            back = _envelope(_BOUNCE, {"to": origin}, header["bounce"].encode("latin-1"))
            if not self._queue(self._key("n:", origin.rpartition("/")[0]), back, None):
                log.info("broker %s: a message for %s bounced, and its sender %s cannot be told (Redis is away)",
                         self.node, header["to"], origin)
        elif kind == _BOUNCE:
            if not self._deliver_here(header["to"], message):
                log.debug("broker %s: a bounce for %s found it gone", self.node, header["to"])
        elif kind == _TOPIC:
            if header["o"] != self.node:  # this node's sessions had it from publish() itself
                self._publish_here(header["t"], message)
        else:
            log.warning("broker %s: unknown message kind %r on the inbox; ignored", self.node, kind)

    # -- the beat thread: this node's key, dead nodes, outages ----------------------------

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.beat):
            try:
                if not self._up:
                    self._client.ping()
                    self._came_back()
                    continue
                if not self._client.set(self._key("alive:", self.node), "1", ex=_seconds(self.ttl), xx=True):
                    # Our key is gone: Redis restarted empty, or we stalled past the TTL and were cleared up.
                    log.warning("broker %s: this node was missing from Redis; registering its sessions again",
                                self.node)
                    self._restore()
                self._clear_dead_nodes()
            except self._errors as exc:
                self._went_down(exc)
            except Exception:
                log.exception("broker %s: the keep-alive round failed", self.node)

    def _announce(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.set(self._key("alive:", self.node), "1", ex=_seconds(self.ttl))
        pipe.sadd(self._key("", "nodes"), self.node)
        pipe.execute()

    def _restore(self) -> None:
        """Put this node and its sessions (back) in the directory, then tell the application."""
        self._announce()
        entries = self._entries()
        pipe = self._client.pipeline(transaction=False)
        for _, session in entries:
            pipe.hset(self._key("u:", session.user), session.name, self._record(session))
            pipe.sadd(self._key("", "users"), session.user)
            pipe.sadd(self._key("ns:", self.node), _member(session))
        pipe.publish(self._changes, "")  # every node reads the directory afresh
        pipe.execute()
        if self.on_restored is not None and entries:
            try:
                self.on_restored([session for _, session in entries])
            except Exception:
                log.exception("broker %s: on_restored failed", self.node)

    def _clear_dead_nodes(self) -> None:
        client = self._client
        for raw in client.smembers(self._key("", "nodes")):
            node = raw.decode()
            if node == self.node or client.exists(self._key("alive:", node)):
                continue
            # One survivor clears each dead node up: whoever sets this first.
            if not client.set(self._key("reap:", node), self.node, nx=True, ex=_seconds(self.ttl * 10)):
                continue
            gone = []
            for member in client.smembers(self._key("ns:", node)):
                user, _, name = member.decode().partition("\0")
                data = self._forget(client, Session("", user, name, node), node)
                if data is not None:
                    gone.append(Session(data["k"], user, name, node, data.get("m") or {}))
            client.delete(self._key("ns:", node))
            client.srem(self._key("", "nodes"), node)
            log.warning("broker %s: node %s stopped renewing its key; took its %d sessions out",
                        self.node, node, len(gone))
            if self.on_gone is not None and gone:
                try:
                    self.on_gone(gone)
                except Exception:
                    log.exception("broker %s: on_gone failed", self.node)

    # -- outages --------------------------------------------------------------------------

    def _went_down(self, exc: BaseException) -> BrokerUnavailable:
        """Record an outage (one log line for all of it); returns the error for the caller to raise."""
        with self._state_lock:
            first = self._up
            if first:
                self._up = False
                self._down_since = time.monotonic()
        if first:
            log.error("broker %s: Redis at %s is unreachable (%s); sessions here are still served, "
                      "deliveries elsewhere bounce until it is back", self.node, self.address, exc)
        return BrokerUnavailable(f"Redis at {self.address} is unreachable: {exc}")

    def _came_back(self) -> None:
        outage = self._outage()
        self._restore()
        with self._state_lock:
            self._up = True
        log.warning("broker %s: Redis at %s is back after %.1f s; %d sessions registered again",
                    self.node, self.address, outage, len(self._entries()))

    def _outage(self) -> float:
        return time.monotonic() - self._down_since if not self._up else 0.0


# Release a session's name atomically: only if the given node's session (any
# of that node's, for key "") holds it; then the user leaves the set of users
# once it has no name left, so everyone() never reads users long gone.
# Returns the record removed, or nil.
_RELEASE = """
redis.call('SREM', KEYS[3], ARGV[5])
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then
  return nil
end
local data = cjson.decode(record)
if data['n'] ~= ARGV[2] or (ARGV[3] ~= '' and data['k'] ~= ARGV[3]) then
  return nil
end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[4])
end
redis.call('PUBLISH', ARGV[6], ARGV[4])
return record
"""

# Claim a name (HSETNX) and tell every node, in one step: a node never
# hears of a change before it can read it, nor misses one.
_CLAIM = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[3])
return 1
"""

_STORE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
"""


def _member(session: Session) -> str:
    return f"{session.user}\0{session.name}"


def _seconds(value: float) -> int:
    return max(1, round(value))


def _envelope(kind: bytes, header: dict[str, Any], message: bytes) -> bytes:
    return kind + json.dumps(header, separators=(",", ":")).encode() + b"\n" + message


def _open(data: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    head, _, message = data.partition(b"\n")
    return head[:1], json.loads(head[1:]), message
