"""A circuit breaker: stop calling a back end that keeps failing, then probe it.

Without one, every request to a dead back end waits out its own connect or
read timeout, callers pile up, and the front end falls over with it. The
breaker counts failures; past a limit it *opens* and calls fail at once with
:class:`~netpool.CircuitOpen`; after ``cooldown`` seconds it goes *half-open*
and lets one trial call through: success closes it, failure opens it again::

    closed --N consecutive failures, or failure_ratio over window--> open
    open   --cooldown elapsed-------------------------------------> half_open
    half_open --trial succeeds--> closed      --trial fails--> open

Use it around any call (``breaker.call(fn)``, ``with breaker.guard():``,
``@breaker.protect``) or give it to a :class:`~netpool.ConnectionPool`,
which guards its dials and requests with it. Outcomes of calls that started
in an earlier state (a slow call finishing after the breaker opened) are
counted but do not move the state: only the half-open trial decides.
Every transition is logged under ``netpool.breaker`` and counted.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, TypeVar

from .checks import seconds, whole_number
from .errors import CircuitOpen, ConfigError

__all__ = ["CircuitBreaker", "BreakerStats", "STATES"]

log = logging.getLogger("netpool.breaker")

STATES = ("closed", "open", "half_open")
T = TypeVar("T")
Listener = Callable[["CircuitBreaker", str, str], None]


def _any_exception(exc: BaseException) -> bool:
    return isinstance(exc, Exception)


@dataclass(frozen=True)
class BreakerStats:
    """A snapshot of a breaker's state and counters."""

    name: str
    state: str
    consecutive_failures: int
    calls: int
    """Calls let through (finished, with any outcome)."""
    successes: int
    failures: int
    rejected: int
    """Calls refused with CircuitOpen."""
    window_calls: int
    window_failures: int
    transitions: Mapping[str, int] = field(default_factory=dict)
    """Counts keyed "closed->open", "open->half_open", ..."""


class _Call:
    """One call let through by :meth:`CircuitBreaker.allow`; report how it went exactly once."""

    __slots__ = ("_breaker", "_generation", "_trial", "_done")

    def __init__(self, breaker: "CircuitBreaker", generation: int, trial: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._trial = trial
        self._done = False

    def success(self) -> None:
        if not self._done:
            self._done = True
            self._breaker._record(self, ok=True, exc=None)

    def failure(self, exc: Optional[BaseException] = None) -> None:
        if not self._done:
            self._done = True
            self._breaker._record(self, ok=False, exc=exc)

    def ignore(self) -> None:
        """The call ended for a reason that says nothing about the back end (frees a half-open trial)."""
        if not self._done:
            self._done = True
            self._breaker._record(self, ok=None, exc=None)


class _Guard:
    __slots__ = ("_breaker", "_call")

    def __init__(self, breaker: "CircuitBreaker") -> None:
        self._breaker = breaker
        self._call: Optional[_Call] = None

    def __enter__(self) -> _Call:
        self._call = self._breaker.allow()
        return self._call

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> None:
        call = self._call
        assert call is not None
        if exc is None:
            call.success()
        elif self._breaker.is_failure(exc):
            call.failure(exc)
        else:
            call.ignore()


class CircuitBreaker:
    """Closed, open after repeated failures, half-open after a cool-down.

    :param failure_threshold: consecutive failures that open it (None: off).
    :param failure_ratio: open when this share of the calls in the last
        ``window`` seconds failed, once there were at least ``min_calls``
        (None: off). Catches a back end that fails one call in two, which
        never makes N failures in a row.
    :param cooldown: seconds open before a trial call is let through.
    :param is_failure: which exceptions count against the back end (default:
        every Exception) when used through :meth:`call`/:meth:`guard`.
    """

    def __init__(
        self,
        name: str = "breaker",
        *,
        failure_threshold: Optional[int] = 5,
        failure_ratio: Optional[float] = None,
        window: float = 10.0,
        min_calls: int = 20,
        cooldown: float = 5.0,
        is_failure: Callable[[BaseException], bool] = _any_exception,
    ) -> None:
        whole_number("failure_threshold", failure_threshold, optional=True)
        if failure_ratio is not None and not (isinstance(failure_ratio, (int, float)) and 0 < failure_ratio <= 1):
            raise ConfigError("failure_ratio", f"must be in (0, 1] or None, got {failure_ratio!r}")
        if failure_threshold is None and failure_ratio is None:
            raise ConfigError("failure_threshold", "set failure_threshold or failure_ratio, or the breaker never opens")
        seconds("window", window)
        seconds("cooldown", cooldown)
        whole_number("min_calls", min_calls)
        if not callable(is_failure):
            raise ConfigError("is_failure", f"expected a callable is_failure(exc) -> bool, got {is_failure!r}")
        self.name = name
        self.failure_threshold = failure_threshold
        self.failure_ratio = failure_ratio
        self.window = float(window)
        self.min_calls = min_calls
        self.cooldown = float(cooldown)
        self.is_failure = is_failure

        self._lock = threading.Lock()
        self._state = "closed"
        self._generation = 0
        self._opened_at = 0.0
        self._trial_out = False
        self._consecutive = 0
        self._successes = 0
        self._failures = 0
        self._rejected = 0
        self._transitions: collections.Counter[str] = collections.Counter()
        self._listeners: list[Listener] = []
        # The failure-ratio window: 10 time buckets, so memory stays fixed at any call rate.
        self._buckets = 10
        self._bucket_width = self.window / self._buckets
        self._bucket_ids = [-1] * self._buckets
        self._bucket_calls = [0] * self._buckets
        self._bucket_failures = [0] * self._buckets

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name} {self.state}>"

    # -- the call API --------------------------------------------------------

    def allow(self) -> _Call:
        """Let one call through, or raise CircuitOpen. Report its outcome on the returned token."""
        notes: list[tuple[str, str]] = []
        with self._lock:
            now = time.monotonic()
            state = self._state
            if state == "open" and now - self._opened_at >= self.cooldown:
                notes.append(self._move_locked("half_open", now))
                state = "half_open"
            if state == "closed":
                call = _Call(self, self._generation, trial=False)
            elif state == "half_open" and not self._trial_out:
                self._trial_out = True
                call = _Call(self, self._generation, trial=True)
            else:
                self._rejected += 1
                retry_after = max(0.0, self._opened_at + self.cooldown - now) if state == "open" else self.cooldown
                call = None
        self._notify(notes)
        if call is None:
            if state == "open":
                raise CircuitOpen(
                    self,
                    f"circuit {self.name} is open after repeated failures; "
                    f"calls fail fast for another {retry_after:.1f} s, then one trial call is let through",
                    retry_after,
                )
            raise CircuitOpen(self, f"circuit {self.name} is half-open and its one trial call is in flight", retry_after)
        return call

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` through the breaker; exceptions count as ``is_failure`` says."""
        with self.guard():
            return fn(*args, **kwargs)

    def guard(self) -> _Guard:
        """``with breaker.guard():`` the block is one call (raises CircuitOpen on entry when open)."""
        return _Guard(self)

    def protect(self, fn: Callable[..., T]) -> Callable[..., T]:
        """Decorator form of :meth:`call`."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            with self.guard():
                return fn(*args, **kwargs)

        return wrapper

    # -- state ---------------------------------------------------------------

    @property
    def state(self) -> str:
        """"closed", "open" or "half_open" (open turns half-open once the cool-down has passed)."""
        notes: list[tuple[str, str]] = []
        with self._lock:
            if self._state == "open" and time.monotonic() - self._opened_at >= self.cooldown:
                notes.append(self._move_locked("half_open", time.monotonic()))
            state = self._state
        self._notify(notes)
        return state

    def add_listener(self, callback: Listener) -> None:
        """``callback(breaker, old_state, new_state)`` after every transition (metrics, alerts)."""
        self._listeners.append(callback)

    def reset(self) -> None:
        """Force the breaker closed (an operator knows the back end is back)."""
        with self._lock:
            notes = [self._move_locked("closed", time.monotonic())] if self._state != "closed" else []
        self._notify(notes)

    def stats(self) -> BreakerStats:
        state = self.state
        with self._lock:
            window_calls, window_failures = self._window_totals(time.monotonic())
            return BreakerStats(
                name=self.name,
                state=state,
                consecutive_failures=self._consecutive,
                calls=self._successes + self._failures,
                successes=self._successes,
                failures=self._failures,
                rejected=self._rejected,
                window_calls=window_calls,
                window_failures=window_failures,
                transitions=dict(self._transitions),
            )

    # -- internals -----------------------------------------------------------

    def _record(self, call: _Call, ok: Optional[bool], exc: Optional[BaseException]) -> None:
        notes: list[tuple[str, str]] = []
        with self._lock:
            now = time.monotonic()
            if ok is True:
                self._successes += 1
            elif ok is False:
                self._failures += 1
            current = call._generation == self._generation
            if call._trial and current:
                self._trial_out = False
                if ok is True:
                    notes.append(self._move_locked("closed", now))
                elif ok is False:
                    notes.append(self._move_locked("open", now))
            elif current and self._state == "closed" and ok is not None:
                self._count_locked(now, failed=not ok)
                if not ok and self._should_open_locked(now):
                    notes.append(self._move_locked("open", now))
        for old, new in notes:
            if new == "open":
                why = f" (last error: {exc!r})" if exc is not None else ""
                log.warning(
                    "circuit %s opened from %s%s; calls fail fast for %g s", self.name, old, why, self.cooldown
                )
        self._notify(notes)

    def _count_locked(self, now: float, failed: bool) -> None:
        self._consecutive = self._consecutive + 1 if failed else 0
        idx = int(now / self._bucket_width)
        slot = idx % self._buckets
        if self._bucket_ids[slot] != idx:
            self._bucket_ids[slot] = idx
            self._bucket_calls[slot] = 0
            self._bucket_failures[slot] = 0
        self._bucket_calls[slot] += 1
        self._bucket_failures[slot] += failed

    def _window_totals(self, now: float) -> tuple[int, int]:
        oldest = int(now / self._bucket_width) - self._buckets + 1
        calls = failures = 0
        for slot, idx in enumerate(self._bucket_ids):
            if idx >= oldest:
                calls += self._bucket_calls[slot]
                failures += self._bucket_failures[slot]
        return calls, failures

    def _should_open_locked(self, now: float) -> bool:
        if self.failure_threshold is not None and self._consecutive >= self.failure_threshold:
            return True
        if self.failure_ratio is not None:
            calls, failures = self._window_totals(now)
            return calls >= self.min_calls and failures >= self.failure_ratio * calls
        return False

    def _move_locked(self, new: str, now: float) -> tuple[str, str]:
        old = self._state
        self._state = new
        self._generation += 1
        self._trial_out = False
        if new == "open":
            self._opened_at = now
        else:
            # A fresh start: old failures must not reopen a breaker that just closed.
            self._consecutive = 0
            self._bucket_ids = [-1] * self._buckets
        self._transitions[f"{old}->{new}"] += 1
        return old, new

    def _notify(self, notes: list[tuple[str, str]]) -> None:
        for old, new in notes:
            if new == "half_open":
                log.info("circuit %s half-open: letting one trial call through", self.name)
            elif new == "closed":
                log.info("circuit %s closed (was %s): calls go through again", self.name, old)
            for callback in self._listeners:
                try:
                    callback(self, old, new)
                except Exception:
                    log.exception("circuit %s: state listener raised", self.name)
