"""The circuit breaker on its own, and guarding a client pool in front of a real back end."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

import netpool
from netpool.breaker import CircuitBreaker
from netpool.client_pool import ConnectionPool

from .conftest import run_concurrently, serving, wait_for


def boom():
    raise ConnectionRefusedError("back end down")


def fail(breaker, times):
    for _ in range(times):
        with pytest.raises(ConnectionRefusedError):
            breaker.call(boom)


def test_opens_after_consecutive_failures_and_fails_fast():
    """After N failures in a row the breaker opens and calls fail at once with CircuitOpen and a retry-after."""
    breaker = CircuitBreaker("db", failure_threshold=3, cooldown=30)
    fail(breaker, 2)
    assert breaker.call(lambda: "ok") == "ok"  # a success resets the run
    fail(breaker, 3)
    assert breaker.state == "open"
    calls = []
    with pytest.raises(netpool.CircuitOpen, match="circuit db is open") as info:
        breaker.call(calls.append, 1)
    assert calls == [] and 29 < info.value.retry_after <= 30
    stats = breaker.stats()
    assert stats.rejected == 1 and stats.failures == 5 and stats.transitions == {"closed->open": 1}


def test_half_open_lets_one_trial_through_and_its_outcome_decides():
    """After the cool-down one trial call goes through: failure reopens, success closes."""
    breaker = CircuitBreaker("svc", failure_threshold=1, cooldown=0.1)
    fail(breaker, 1)
    wait_for(lambda: breaker.state == "half_open", what="half-open after the cool-down")
    trial = breaker.allow()
    with pytest.raises(netpool.CircuitOpen, match="trial call is in flight"):
        breaker.allow()
    trial.failure(ConnectionRefusedError())
    assert breaker.state == "open"
    wait_for(lambda: breaker.state == "half_open", what="half-open again")
    assert breaker.call(lambda: 42) == 42
    assert breaker.state == "closed"
    assert breaker.stats().transitions == {
        "closed->open": 1, "open->half_open": 2, "half_open->open": 1, "half_open->closed": 1,
    }


def test_an_ignored_trial_frees_the_half_open_slot():
    """A trial that ends for a reason unrelated to the back end lets the next caller try."""
    breaker = CircuitBreaker("svc", failure_threshold=1, cooldown=0.05, is_failure=lambda e: not isinstance(e, KeyError))
    fail(breaker, 1)
    wait_for(lambda: breaker.state == "half_open", what="half-open")
    with pytest.raises(KeyError):
        with breaker.guard():
            raise KeyError("caller's own bug")
    assert breaker.state == "half_open"
    with breaker.guard():
        pass
    assert breaker.state == "closed"


def test_failure_ratio_over_a_window_opens_it():
    """A back end failing every other call never fails N in a row, but the ratio over the window opens the breaker."""
    breaker = CircuitBreaker("flaky", failure_threshold=None, failure_ratio=0.5, min_calls=10, window=60)
    for i in range(9):
        if i % 2:
            fail(breaker, 1)
        else:
            breaker.call(lambda: None)
    assert breaker.state == "closed"  # 9 calls: below min_calls
    fail(breaker, 1)
    assert breaker.state == "open"
    assert breaker.stats().window_calls == 10 and breaker.stats().window_failures == 5


def test_late_outcomes_from_before_a_transition_do_not_move_the_state():
    """A slow call that started while closed and fails after the breaker opened does not count twice."""
    breaker = CircuitBreaker("svc", failure_threshold=2, cooldown=0.05)
    slow = breaker.allow()
    fail(breaker, 2)
    wait_for(lambda: breaker.state == "half_open", what="half-open")
    slow.failure()
    assert breaker.state == "half_open"
    breaker.allow().success()
    assert breaker.state == "closed"


def test_transitions_are_logged_and_reported_to_listeners(caplog):
    """Every state change reaches listeners and the netpool.breaker log."""
    seen = []
    breaker = CircuitBreaker("audit", failure_threshold=1, cooldown=0.05)
    breaker.add_listener(lambda b, old, new: seen.append((b.name, old, new)))
    with caplog.at_level(logging.INFO, logger="netpool.breaker"):
        fail(breaker, 1)
        wait_for(lambda: breaker.state == "half_open", what="half-open")
        breaker.call(lambda: None)
    assert seen == [("audit", "closed", "open"), ("audit", "open", "half_open"), ("audit", "half_open", "closed")]
    text = caplog.text
    assert "circuit audit opened" in text and "half-open" in text and "circuit audit closed" in text


def test_bad_settings_are_config_errors():
    """Nonsense settings fail at construction, naming the setting."""
    with pytest.raises(netpool.ConfigError, match="failure_ratio"):
        CircuitBreaker(failure_ratio=1.5)
    with pytest.raises(netpool.ConfigError, match="never opens"):
        CircuitBreaker(failure_threshold=None)
    with pytest.raises(netpool.ConfigError, match="cooldown"):
        CircuitBreaker(cooldown=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pool_breaker_opens_on_a_dead_back_end_and_closes_when_it_returns():
    """Requests to a dead back end open the breaker (later ones fail fast, no dial); it closes once the back end is back."""
    port = free_port()
    breaker = CircuitBreaker("backend", failure_threshold=3, cooldown=0.2)
    with ConnectionPool(("127.0.0.1", port), breaker=breaker, health_check_interval=None) as pool:
        for _ in range(3):
            with pytest.raises(netpool.DialError):
                pool.request(b"x", deadline=2)
        assert breaker.state == "open"
        with pytest.raises(netpool.CircuitOpen):
            pool.request(b"x", deadline=2)
        with pytest.raises(netpool.CircuitOpen):
            with pool.acquire():  # a plain checkout dials through the breaker too
                pass
        assert pool.stats().dial_errors == 3  # failing fast means not dialling
        with serving(port=port, framing="length"):
            wait_for(lambda: breaker.state == "half_open", what="half-open")
            assert pool.request(b"back", deadline=5) == b"back"
            assert breaker.state == "closed"
            assert pool.request(b"again", deadline=5) == b"again"
        assert breaker.stats().transitions == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


def test_pool_breaker_counts_request_failures_but_not_a_full_pool():
    """Back-end I/O failures count against the breaker; PoolTimeout (local contention) does not."""
    def hang_up(message, conn):
        conn.close()

    breaker = CircuitBreaker("rude", failure_threshold=2, cooldown=30)
    with serving(handler=hang_up, framing="length") as backend:
        with ConnectionPool(("127.0.0.1", backend.port), breaker=breaker, max_open=1,
                            health_check_interval=None) as pool:
            held = pool.checkout()
            for _ in range(3):
                with pytest.raises(netpool.PoolTimeout):
                    pool.request(b"x", deadline=0.05)
            assert breaker.state == "closed"
            pool.release(held)
            for _ in range(2):
                with pytest.raises(netpool.ConnectionClosed):
                    pool.request(b"x", deadline=2)
            assert breaker.state == "open"


def test_breaker_is_thread_safe_in_half_open():
    """Twenty threads racing in half-open: exactly one is let through."""
    breaker = CircuitBreaker("race", failure_threshold=1, cooldown=0.05)
    fail(breaker, 1)
    wait_for(lambda: breaker.state == "half_open", what="half-open")
    barrier = threading.Barrier(20, timeout=10)
    admitted = []

    def racer():
        barrier.wait()
        try:
            admitted.append(breaker.allow())
        except netpool.CircuitOpen:
            pass

    run_concurrently(racer, [() for _ in range(20)], timeout=10)
    assert len(admitted) == 1
