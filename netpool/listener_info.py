"""ListenerInfo: a consistent snapshot of a listener's counters, and which close reasons count as errors."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["ListenerInfo", "ERROR_REASONS", "combined"]

# Close reasons that mean something went wrong (as opposed to a client that
# left, a quit or a stop); summed as ``info().errors``.
ERROR_REASONS = frozenset(
    {
        "error",
        "handler_error",
        "send_error",
        "send_timeout",
        "send_overflow",
        "message_too_large",
        "message_timeout",
        "framing_error",
        "tls_error",
        "tls_handshake_timeout",
        "proxy_header_invalid",
        "proxy_untrusted",
        "overloaded",
    }
)


@dataclass(frozen=True)
class ListenerInfo:
    """A consistent snapshot of a listener's counters (Ranch's ``ranch:info``)."""

    name: str
    state: str
    address: str
    live: int
    """Connections counted against max_connections."""
    open: int
    """All open connections, including those taken out of the count (``uncount``)."""
    max_connections: int
    ceiling: int
    """The most "grow" may raise max_connections to (from the open-file limit)."""
    accepted: int
    """Every socket accept() returned: admitted + refused."""
    admitted: int
    refused: int
    closed: int
    errors: int
    grown: int
    refused_by_reason: Mapping[str, int] = field(default_factory=dict)
    closed_by_reason: Mapping[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    """Application bytes received (after TLS) by all connections, closed and open."""
    bytes_out: int = 0
    accepted_by_acceptor: tuple[int, ...] = ()
    """What each acceptor's accept() returned; clients dropped through the spare descriptor are not in it."""
    handoffs: int = 0
    """Thread mode: handler or hook calls still running on the loop after HANDOFF_AFTER, whose loop moved on."""
    offloads: int = 0
    """Thread mode: connections whose calls moved off their loop because one held it up (OFFLOAD_AFTER)."""
    threaded_calls: int = 0
    """Thread mode: handler and hook calls run on the listener's threads for offloaded connections."""

    def summary(self) -> str:
        """One line for logs: accepted, refused, closed by reason."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.closed_by_reason.items()))
        refused = ", ".join(f"{k} {v}" for k, v in sorted(self.refused_by_reason.items()))
        return (
            f"accepted {self.accepted}, refused {self.refused}"
            + (f" ({refused})" if refused else "")
            + f", closed {self.closed}"
            + (f" ({reasons})" if reasons else "")
            + f", live {self.live}"
            + (f", handed off {self.handoffs}" if self.handoffs else "")
        )


def combined(infos: list[ListenerInfo]) -> ListenerInfo:
    """One ListenerInfo adding up several (the generations of reloads, a supervisor's workers), for a summary."""
    totals: collections.Counter[str] = collections.Counter()
    closed: collections.Counter[str] = collections.Counter()
    refused: collections.Counter[str] = collections.Counter()
    for info in infos:
        for key in ("accepted", "admitted", "refused", "closed", "errors", "live"):
            totals[key] += getattr(info, key)
        closed.update(info.closed_by_reason)
        refused.update(info.refused_by_reason)
    return ListenerInfo(name="all", state="stopped", address="", live=totals["live"], open=0, max_connections=0,
                        ceiling=0, accepted=totals["accepted"], admitted=totals["admitted"],
                        refused=totals["refused"], closed=totals["closed"], errors=totals["errors"], grown=0,
                        refused_by_reason=dict(refused), closed_by_reason=dict(closed))
