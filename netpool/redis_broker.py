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

Delivery to a session of another node is one PUBLISH to its inbox. Redis
answers how many subscribers took it: none means the node is gone (its
subscription died with it), and the message bounces at once. A node that
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
renews the node's key, clears up dead nodes and watches for Redis to come
back (``netpool-broker-beat``). They start on first use in the process that
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
        self._release_script = self._client.register_script(_RELEASE)
        self._busy_log = RateLimitedLog(log)
        self._inbox = self._key("n:", self.node)
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
                self._inbox = self._key("n:", self.node)
            self._stop.clear()
            self._subscribed.clear()
            self._threads = [
                threading.Thread(target=self._read_inbox, name="netpool-broker-inbox", daemon=True),
                threading.Thread(target=self._keep_alive, name="netpool-broker-beat", daemon=True),
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
            if not client.hsetnx(self._key("u:", session.user), session.name, self._record(session)):
                return False
            pipe = client.pipeline(transaction=False)
            pipe.sadd(self._key("", "users"), session.user)
            pipe.sadd(self._key("ns:", self.node), _member(session))
            pipe.execute()
        return True

    def _store(self, session: Session) -> None:
        with self._redis() as client:
            client.hset(self._key("u:", session.user), session.name, self._record(session))

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
                                      args=[session.name, node, session.key, session.user, _member(session)],
                                      client=client)
        return json.loads(record) if record else None

    def _record(self, session: Session) -> str:
        return json.dumps({"k": session.key, "n": session.node, "m": session.meta})

    # -- looking up --------------------------------------------------------------------

    def sessions(self, user: str) -> list[Session]:
        """Every session of ``user`` on every node; BrokerUnavailable if Redis cannot be asked (see local_sessions)."""
        self.start()
        with self._redis() as client:
            records = client.hgetall(self._key("u:", user))
        return self._merge(user, records)

    def everyone(self) -> list[Session]:
        """Every session on every node; BrokerUnavailable if Redis cannot be asked."""
        self.start()
        with self._redis() as client:
            users = sorted(u.decode() for u in client.smembers(self._key("", "users")))
            pipe = client.pipeline(transaction=False)
            for user in users:
                pipe.hgetall(self._key("u:", user))
            found = pipe.execute()
        return [s for user, records in zip(users, found) for s in self._merge(user, records)]

    def _merge(self, user: str, records: dict[bytes, bytes]) -> list[Session]:
        """Sessions from the directory, those of this node as this node has them (fresher, and only if open)."""
        here = {s.key: s for s in self.local_sessions(user)}
        found = []
        for name, record in records.items():
            data = json.loads(record)
            if data["n"] == self.node:
                session = here.pop(data["k"], None)
                if session is not None:
                    found.append(session)
            else:
                found.append(Session(data["k"], user, name.decode(), data["n"], data.get("m") or {}))
        found.extend(here.values())  # registered while the directory was away
        return found

    # -- delivery ------------------------------------------------------------------------

    def deliver(self, to: "Session | str", message: bytes, *, bounce: Optional[bytes] = None,
                sender: Any = None) -> bool:
        key = to.key if isinstance(to, Session) else to
        node = key.rpartition("/")[0]
        if node == self.node:
            return self._deliver_here(key, message)
        self.start()
        origin = self.session_of(sender) if sender is not None and bounce is not None else None
        header = {"to": key}
        if origin is not None:
            header["from"] = origin.key
            header["bounce"] = bounce.decode("latin-1")  # type: ignore[union-attr]
        try:
            with self._redis() as client:
                return bool(client.publish(self._key("n:", node), _envelope(_DELIVER, header, message)))
        except BrokerUnavailable:
            return False

    def publish(self, topic: str, message: bytes, *, exclude: Any = None) -> int:
        """Post to ``topic``'s sessions here at once, and to other nodes' through Redis; returns the count here.

        During an outage only this node's sessions get it (topics carry
        presence and broadcasts, which are not bounced).
        """
        count = super().publish(topic, message, exclude=exclude)
        self.start()
        header = {"o": self.node, "t": topic}
        try:
            with self._redis() as client:
                client.publish(self._key("t:", topic), _envelope(_TOPIC, header, message))
        except BrokerUnavailable:
            pass
        return count

    @contextlib.contextmanager
    def _redis(self) -> Iterator[Any]:
        """The client for one call from a caller's thread: BrokerUnavailable at once while Redis is known away,
        after POOL_WAIT if every turn is taken, within ``timeout`` if Redis does not answer (an outage)."""
        if not self._up:
            raise BrokerUnavailable(f"Redis at {self.address} is unreachable (since {self._outage():.1f} s)")
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
                pubsub.subscribe(self._inbox)
                pubsub.psubscribe(self._topics + "*")
                self._subscribed.set()
                pause = 0.05
                while not self._stop.is_set():
                    item = pubsub.get_message(timeout=0.5)
                    if item is not None and item["type"] in ("message", "pmessage"):
                        self._received(item["data"])
            except self._errors as exc:
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

    def _received(self, data: bytes) -> None:
        kind, header, message = _open(data)
        if kind == _DELIVER:
            if self._deliver_here(header["to"], message):
                return
            origin = header.get("from")
            if origin is None:
                log.debug("broker %s: a message for %s found it gone", self.node, header["to"])
                return
            back = {"to": origin}
            bounce = header["bounce"].encode("latin-1")
            try:
                with self._redis() as client:
                    taken = client.publish(self._key("n:", origin.rpartition("/")[0]), _envelope(_BOUNCE, back, bounce))
            except BrokerUnavailable:
                taken = 0
            if not taken:
                log.info("broker %s: a message for %s bounced, and its sender %s is gone too",
                         self.node, header["to"], origin)
        elif kind == _BOUNCE:
            if not self._deliver_here(header["to"], message):
                log.debug("broker %s: a bounce for %s found it gone", self.node, header["to"])
        elif kind == _TOPIC:
            if header["o"] != self.node:  # this node's sessions had it from publish() itself
                self._publish_here(header["t"], message, None, header["o"])
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
return record
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
