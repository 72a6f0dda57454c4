"""The redis_server fixture itself, against the real redis-server: the tests of Redis-backed code rely on what it promises.

It serves redis-py on its URL; ``flush()`` empties it; ``stop()`` makes
connecting fail; ``start()`` brings it back empty on the same port; and
``redis_url`` hands each test a running, empty server even after a test left
it stopped.
"""

from __future__ import annotations

import socket

import pytest

from .redis_server import RedisServer, command

redis = pytest.importorskip("redis", reason="redis-py is installed by `make test` (the test extra)")
from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402


def client(url: str) -> "redis.Redis":
    """redis-py without its retries: a refused connection must fail at once, not after a backoff."""
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0))


def test_url_names_the_loopback_port(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert (redis_server.host, redis_server.url) == ("127.0.0.1", redis_url)


def test_set_and_get_through_redis_py(redis_url: str) -> None:
    with client(redis_url) as r:
        assert r.set("greeting", b"hello")
        assert r.get("greeting") == b"hello"
        assert r.dbsize() == 1


def test_flush_empties_every_database(redis_server: RedisServer, redis_url: str) -> None:
    with client(redis_url) as r0, client(redis_url.rsplit("/", 1)[0] + "/1") as r1:
        r0.set("a", 1)
        r1.set("b", 2)
        redis_server.flush()
        assert (r0.dbsize(), r1.dbsize()) == (0, 0)


def test_stop_refuses_connections_and_start_brings_it_back_empty_on_the_same_port(
        redis_server: RedisServer, redis_url: str) -> None:
    port = redis_server.port
    with client(redis_url) as r:
        r.set("survives?", b"no")
        redis_server.stop()
        assert not redis_server.running
        with pytest.raises(redis.ConnectionError):
            r.ping()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()

        redis_server.start()
        assert redis_server.running
        assert (redis_server.port, redis_server.url) == (port, redis_url)
        assert r.ping()  # the same client reconnects to the restarted server
        assert r.get("survives?") is None
        assert r.dbsize() == 0


def test_stop_and_start_again_are_harmless(redis_server: RedisServer, redis_url: str) -> None:
    """stop() on a stopped server and start() on a running one do nothing (teardown may stop it twice)."""
    redis_server.start()
    assert command(redis_server.port, "PING") == b"PONG"
    redis_server.stop()
    redis_server.stop()
    assert not redis_server.running
    with pytest.raises(RuntimeError, match="stopped"):
        redis_server.flush()
    # Left stopped on purpose: the next test's redis_url must start it again.


def test_redis_url_starts_a_server_a_previous_test_left_stopped(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_server.running
    with client(redis_url) as r:
        assert r.ping()
        assert r.dbsize() == 0


def test_a_server_that_exits_fails_start_at_once(tmp_path) -> None:
    """A server that exits fails start() with its status and log at once, not after the whole deadline."""
    server = RedisServer("/bin/false", tmp_path)
    with pytest.raises(RuntimeError, match="exited with status 1"):
        server.start()
    assert not server.running and server.port == 0
