"""The client connection pool against real netpool back ends on 127.0.0.1."""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import threading
import time

import pytest

import netpool
from netpool.client_pool import ConnectionPool

from .certs import TestCA
from .conftest import run_concurrently, serving, wait_for


def length_echo(**settings):
    """A back end that echoes length-prefixed messages."""
    settings.setdefault("framing", "length")
    return serving(**settings)


@contextlib.contextmanager
def pool_for(listener, **settings):
    settings.setdefault("health_check_interval", None)
    pool = ConnectionPool(("127.0.0.1", listener.port), **settings)
    try:
        yield pool
    finally:
        pool.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_requests_reuse_a_few_connections():
    """Two hundred requests from eight threads open at most max_open back-end connections."""
    with length_echo() as backend, pool_for(backend, max_open=4) as pool:
        errors = []

        def worker(n):
            try:
                for i in range(25):
                    payload = f"{n}-{i}".encode()
                    assert pool.request(payload, deadline=5) == payload
            except Exception as exc:  # surfaced below
                errors.append(exc)

        run_concurrently(worker, [(n,) for n in range(8)], timeout=30)
        assert not errors
        stats = pool.stats()
        assert backend.info().accepted <= 4
        assert stats.dialled == backend.info().accepted
        assert stats.acquired == 200 and stats.reused >= 196
        assert stats.open <= 4 and stats.in_use == 0 and stats.waiting == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_hammering_never_hands_one_connection_to_two_users(seed):
    """Many threads acquiring, failing and releasing at random never share a connection or exceed max_open."""
    rng = random.Random(seed)
    max_open = rng.randint(1, 6)
    with length_echo() as backend, pool_for(backend, max_open=max_open, max_idle=rng.randint(0, max_open),
                                            acquire_timeout=0.05) as pool:
        owners: dict[int, int] = {}
        lock = threading.Lock()
        problems: list[str] = []
        peak = [0]

        def worker(n):
            r = random.Random(seed * 1000 + n)
            for _ in range(150):
                try:
                    with pool.acquire() as conn:
                        with lock:
                            if conn.id in owners:
                                problems.append(f"conn {conn.id} handed to {n} while held by {owners[conn.id]}")
                            owners[conn.id] = n
                            peak[0] = max(peak[0], pool.stats().open)
                        action = r.random()
                        if action < 0.5:
                            assert conn.request(b"x" * r.randint(0, 64), deadline=5) is not None
                        with lock:
                            del owners[conn.id]
                        if action > 0.9:
                            raise KeyError("user code failed; the connection must be discarded")
                except (KeyError, netpool.PoolTimeout):
                    pass

        run_concurrently(worker, [(n,) for n in range(12)], timeout=60)
        assert not problems, problems[:3]
        stats = pool.stats()
        assert peak[0] <= max_open
        assert stats.in_use == 0 and stats.waiting == 0 and stats.open == stats.idle <= max_open
        assert stats.closed_by_reason.get("error", 0) > 0
        assert stats.dialled - stats.closed == stats.open


def test_stale_connection_is_detected_after_the_back_end_restarts():
    """After the back end restarts on the same port, the next request succeeds on a fresh connection."""
    port = free_port()
    with length_echo(port=port) as backend, pool_for(backend, max_open=2) as pool:
        assert pool.request(b"before") == b"before"
        backend.stop()
        with length_echo(port=port):
            assert pool.request(b"after", deadline=5) == b"after"
        stats = pool.stats()
        assert stats.closed_by_reason == {"stale": 1}
        assert stats.dialled == 2


def test_acquire_timeout_is_a_clear_pool_timeout():
    """With every connection held, a caller gets PoolTimeout at its deadline, naming max_open."""
    with length_echo() as backend, pool_for(backend, max_open=1) as pool:
        with pool.acquire():
            started = time.monotonic()
            with pytest.raises(netpool.PoolTimeout, match="max_open=1") as info:
                pool.checkout(deadline=0.2)
            elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 2.0
        assert info.value.pool is pool
        assert pool.stats().timeouts == 1 and pool.stats().waiting == 0


def test_waiters_are_served_first_come_first_served():
    """Callers queued for a full pool get connections in the order they asked."""
    with length_echo() as backend, pool_for(backend, max_open=1, acquire_timeout=10) as pool:
        order: list[int] = []
        held = pool.checkout()
        threads = []
        for n in range(5):
            def waiter(n=n):
                with pool.acquire() as conn:
                    order.append(n)
                    conn.request(b"hi", deadline=5)

            t = threading.Thread(target=waiter)
            t.start()
            threads.append(t)
            wait_for(lambda: pool.stats().waiting == n + 1, what=f"{n + 1} waiters queued")
        pool.release(held)
        for t in threads:
            t.join(10)
        assert order == [0, 1, 2, 3, 4]
        assert pool.stats().wait_count == 5 and pool.stats().wait_seconds > 0


def test_lifetime_recycles_connections_but_never_mid_use():
    """A connection past max_lifetime finishes its work, then is closed on return and replaced."""
    with length_echo() as backend, pool_for(backend, max_open=2, max_lifetime=0.3) as pool:
        with pool.acquire() as conn:
            first = conn.id
            wait_for(lambda: time.monotonic() - conn.created_at > 0.3, what="lifetime to pass")
            assert conn.request(b"still mine", deadline=5) == b"still mine"
        assert pool.stats().closed_by_reason == {"max_lifetime": 1}
        with pool.acquire() as conn:
            assert conn.id != first
            assert conn.request(b"fresh", deadline=5) == b"fresh"
        # An idle one that ages out is replaced at checkout.
        with pool.acquire() as conn:
            second = conn.id
        wait_for(lambda: time.monotonic() - conn.created_at > 0.3, what="lifetime to pass")
        with pool.acquire() as conn:
            assert conn.id != second
        assert pool.stats().closed_by_reason == {"max_lifetime": 2}
        wait_for(lambda: backend.info().closed == 2, what="the back end to see both closes")


def test_idle_timeout_closes_idle_connections_in_the_background():
    """Idle connections past idle_timeout are closed by the background check, without any checkout."""
    with length_echo() as backend, pool_for(backend, max_open=3, idle_timeout=0.2,
                                            health_check_interval=0.05) as pool:
        conns = [pool.checkout() for _ in range(3)]
        for conn in conns:
            pool.release(conn)
        assert pool.stats().idle == 3
        wait_for(lambda: pool.stats().idle == 0, what="idle connections to be closed")
        assert pool.stats().closed_by_reason == {"idle_timeout": 3}
        wait_for(lambda: backend.info().closed == 3, what="the back end to see them close")


def test_background_check_drops_connections_the_back_end_closed():
    """A connection the server closed while idle is found by the background check and never handed out."""
    with length_echo(idle_timeout=0.2) as backend, pool_for(backend, health_check_interval=0.05) as pool:
        assert pool.request(b"x") == b"x"
        wait_for(lambda: backend.info().closed_by_reason.get("idle_timeout") == 1, what="server idle timeout")
        wait_for(lambda: pool.stats().closed_by_reason.get("stale") == 1, what="the pool to drop it")
        assert pool.stats().open == 0
        assert pool.request(b"y") == b"y"


def test_health_check_ping_closes_connections_that_fail_it():
    """The user's health_check runs on idle connections; a failing one is closed."""
    verdicts = {"ok": True}

    def ping(conn):
        return conn.request(b"ping", deadline=1) == b"ping" and verdicts["ok"]

    with length_echo() as backend, pool_for(backend, health_check=ping, health_check_interval=0.05) as pool:
        assert pool.request(b"x") == b"x"
        wait_for(lambda: backend.info().closed == 0 and pool.stats().idle == 1, what="idle connection")
        verdicts["ok"] = False
        wait_for(lambda: pool.stats().closed_by_reason.get("health_check") == 1, what="health check to close it")
        assert pool.stats().open == 0


def test_a_block_that_raises_discards_its_connection():
    """A connection used in a with-block that raised is closed, not returned to the pool."""
    with length_echo() as backend, pool_for(backend) as pool:
        with pytest.raises(RuntimeError):
            with pool.acquire() as conn:
                raise RuntimeError("half-written request")
        assert conn.broken
        stats = pool.stats()
        assert stats.idle == 0 and stats.open == 0 and stats.closed_by_reason == {"error": 1}


def test_request_deadline_on_a_silent_back_end():
    """A back end that never answers makes request() raise DeadlineExceeded at the deadline, and the connection is dropped."""
    release = threading.Event()

    def silent(message, conn):
        release.wait(10)

    with length_echo(handler=silent) as backend, pool_for(backend) as pool:
        try:
            started = time.monotonic()
            with pytest.raises(netpool.DeadlineExceeded, match="deadline passed"):
                pool.request(b"anyone?", deadline=0.2)
            assert 0.15 <= time.monotonic() - started < 2.0
            assert pool.stats().closed_by_reason == {"error": 1}
        finally:
            release.set()


def test_read_timeout_bounds_each_read_without_a_deadline():
    """read_timeout alone stops a request to a silent back end."""
    release = threading.Event()
    with length_echo(handler=lambda m, c: release.wait(10)) as backend, pool_for(backend, read_timeout=0.2) as pool:
        try:
            with pytest.raises(netpool.DeadlineExceeded, match="read/write timeout"):
                pool.request(b"anyone?")
        finally:
            release.set()


def test_dial_failure_is_a_dial_error_and_frees_the_slot():
    """A refused dial raises DialError naming the address and leaves the pool empty."""
    port = free_port()
    with ConnectionPool(("127.0.0.1", port), max_open=1, health_check_interval=None) as pool:
        for _ in range(2):
            with pytest.raises(netpool.DialError, match=f"127.0.0.1:{port}"):
                pool.request(b"x")
        stats = pool.stats()
        assert stats.open == 0 and stats.dial_errors == 2


def test_close_wakes_waiters_and_closes_returned_connections():
    """Closing the pool fails queued callers with PoolClosed and closes connections as they come back."""
    with length_echo() as backend:
        pool = ConnectionPool(("127.0.0.1", backend.port), max_open=1, health_check_interval=None)
        held = pool.checkout()
        failures: list[BaseException] = []

        def waiter():
            try:
                pool.checkout(deadline=10)
            except netpool.PoolClosed as exc:
                failures.append(exc)

        t = threading.Thread(target=waiter)
        t.start()
        wait_for(lambda: pool.stats().waiting == 1, what="a waiter")
        pool.close()
        t.join(5)
        assert len(failures) == 1
        with pytest.raises(netpool.PoolClosed):
            pool.checkout()
        pool.release(held)
        assert pool.stats().open == 0 and pool.stats().closed_by_reason == {"pool_closed": 1}
        with pytest.raises(ValueError, match="released twice"):
            pool.release(held)
        pool.close()  # twice is fine


def test_pool_over_tls(tmp_path):
    """A (host, port, ssl_context) target dials TLS and reuses the TLS connections."""
    ca = TestCA(tmp_path)
    server = ca.issue("localhost", hosts=("localhost", "127.0.0.1"))
    ctx = ssl.create_default_context(cafile=str(ca.path))
    with length_echo(ssl={"certfile": str(server.cert), "keyfile": str(server.key)}) as backend:
        with ConnectionPool(("127.0.0.1", backend.port, ctx), max_open=2, health_check_interval=None) as pool:
            for i in range(20):
                assert pool.request(b"secret %d" % i, deadline=5) == b"secret %d" % i
            assert pool.stats().dialled == 1 and backend.info().accepted == 1
            with pool.acquire() as conn:
                assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_bad_settings_are_config_errors():
    """Pool settings are checked at construction, naming the setting."""
    with pytest.raises(netpool.ConfigError, match="max_open"):
        ConnectionPool(("127.0.0.1", 1), max_open=0)
    with pytest.raises(netpool.ConfigError, match="idle_timeout"):
        ConnectionPool(("127.0.0.1", 1), idle_timeout=-1)
    with pytest.raises(netpool.ConfigError, match="target"):
        ConnectionPool("127.0.0.1:80")  # type: ignore[arg-type]
