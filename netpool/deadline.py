"""Deadlines: one point in time shared by every step of a call.

A timeout says "each step may take 2 s"; a deadline says "the whole call
must be done by then". A request that first waits for a pooled connection
and then talks to the back end should give up at one moment, not after the
sum of two timeouts, so the pool's calls take a ``deadline``: either a
number of seconds from now, or a :class:`Deadline` made once and passed
down (Go's ``context.WithDeadline``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Optional, Union

from .errors import DeadlineExceeded

if TYPE_CHECKING:  # pragma: no cover
    import select

__all__ = ["Deadline", "DeadlineLike", "to_deadline", "poll_until"]


class Deadline:
    """An absolute point on the monotonic clock; ``None`` parts mean "no limit"."""

    __slots__ = ("at",)

    def __init__(self, at: Optional[float]) -> None:
        self.at = at

    @classmethod
    def after(cls, seconds: Optional[float]) -> "Deadline":
        """The deadline ``seconds`` from now (None: never)."""
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> Optional[float]:
        """Seconds left (never negative), or None when there is no limit."""
        if self.at is None:
            return None
        return max(0.0, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def check(self, what: str) -> Optional[float]:
        """Seconds left, or raise :class:`DeadlineExceeded` naming ``what`` was being done."""
        left = self.remaining()
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"deadline passed while {what}")
        return left

    def sooner(self, seconds: Optional[float]) -> "Deadline":
        """This deadline or ``seconds`` from now, whichever comes first."""
        if seconds is None:
            return self
        other = time.monotonic() + seconds
        return self if self.at is not None and self.at <= other else Deadline(other)

    def __repr__(self) -> str:
        left = self.remaining()
        return "<Deadline none>" if left is None else f"<Deadline in {left:.3f}s>"


DeadlineLike = Union[Deadline, float, int, None]


def to_deadline(value: DeadlineLike, default: Optional[float] = None) -> Deadline:
    """Normalise a ``deadline=`` argument: a Deadline as is, seconds from now, or ``default`` seconds."""
    if isinstance(value, Deadline):
        return value
    if value is None:
        return Deadline.after(default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"deadline must be a Deadline, a number of seconds >= 0 or None, got {value!r}")
    return Deadline.after(float(value))


def poll_until(poller: "select.poll", at: float) -> bool:
    """Wait for what ``poller`` watches until the monotonic time ``at``: True when it came, False once ``at`` passed.

    The one "wait on a socket, but not past the deadline" loop step of the
    server side (a send waiting for a full window, a TLS handshake or
    write). The wait is rounded up to poll's whole milliseconds, so False
    means the deadline really has passed.
    """
    remaining = at - time.monotonic()
    if remaining <= 0:
        return False
    return bool(poller.poll(max(1, int(remaining * 1000 + 0.999))))
