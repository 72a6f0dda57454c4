"""workers=N: each connection's handler calls queued on a worker-pool lane of its own, in order.

The read paths call :meth:`WorkerDispatch.handle` as if it were the handler;
it queues the call on the connection's lane (made at its first message) and
returns. When the connection ends, :meth:`WorkerDispatch.after_queued_calls`
runs the step that closes it only once its queued calls are over, since they
may still send.
"""

from __future__ import annotations

from typing import Any, Callable

from .close_reasons import reason_for
from .config import ListenerConfig
from .errors import ConnectionClosed, Overloaded, WorkerPoolStopped
from .workers import WorkerPool

__all__ = ["WorkerDispatch"]


class WorkerDispatch:
    """A listener's worker pool, seen from its connections: one lane each, kept in a table by connection id."""

    def __init__(self, pool: WorkerPool, config: ListenerConfig, fault_logs: Any) -> None:
        self.pool = pool
        self._config = config
        self._fault_logs = fault_logs
        self._lanes: dict[int, Any] = {}

    def handle(self, message: bytes, conn: Any) -> None:
        """Queue the handler call on the connection's lane (its order is kept)."""
        lane = self._lanes.get(conn.id)
        if lane is None:
            lane = self._lanes[conn.id] = self.pool.lane(
                max_pending=self._config.worker_queue, name=str(conn.id),
                on_error=lambda exc, _fn, _args: self._handler_failed(conn, exc))
        config = self._config
        try:
            # Threads: a full lane holds the reader (TCP then slows the peer).
            # Events: the loop must never wait, so a full lane closes the connection.
            # config.handler is callable: __post_init__ imported what a "module:attr" string names.
            lane.submit(config.handler, message, conn,  # type: ignore[arg-type]
                        timeout=config.send_timeout if config.io == "threads" else 0)
        except Overloaded as exc:
            conn.close("overloaded")
            raise ConnectionClosed(f"connection {conn.id}: {exc}") from None
        except WorkerPoolStopped:
            raise ConnectionClosed(f"connection {conn.id}: the worker pool is stopped") from None

    def after_queued_calls(self, conn: Any, reason: str, then: Callable[[], None]) -> None:
        """Run ``then`` once the connection's queued calls are over (see ConnectionServices)."""
        lane = self._lanes.pop(conn.id, None)  # the read path is done with it: nothing is queued after this
        if lane is None:
            then()
            return
        if reason != "eof":
            lane.close()  # the connection is failing: drop what it had queued
        lane.call_when_idle(then)

    def _handler_failed(self, conn: Any, exc: BaseException) -> None:
        if isinstance(exc, Exception):
            reason = reason_for(conn, exc, self._fault_logs)
            conn.close(reason if reason != "error" else "handler_error")
