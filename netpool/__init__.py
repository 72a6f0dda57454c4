"""netpool: TCP servers on a pool of acceptor threads, the way Ranch and Go write them.

    import netpool

    def echo(message: bytes, conn: netpool.Connection) -> None:
        conn.send(message)

    netpool.serve(netpool.ListenerConfig(handler=echo, port=5555))   # until Ctrl-C or SIGTERM

or, to keep the running listener in hand: ``listener = netpool.start_listener(...)``.

This module only re-exports the public names.
"""

from .config import ListenerConfig, load_toml
from .connection import Connection, QuitQueue
from .errors import (
    ConfigError,
    ConnectionClosed,
    FramingError,
    HandlerImportError,
    ListenError,
    MessageTimeout,
    MessageTooLarge,
    NetpoolError,
    SendTimeout,
    TLSError,
)
from .framing import Framer, LengthPrefixFramer, LineFramer, RawFramer
from .listener import Listener, ListenerInfo, start_listener
from .serve import serve
from .tls_config import TLSConfig, TLSInfo

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Connection",
    "ConnectionClosed",
    "Framer",
    "FramingError",
    "HandlerImportError",
    "LengthPrefixFramer",
    "LineFramer",
    "ListenError",
    "Listener",
    "ListenerConfig",
    "ListenerInfo",
    "MessageTimeout",
    "MessageTooLarge",
    "NetpoolError",
    "QuitQueue",
    "RawFramer",
    "SendTimeout",
    "TLSConfig",
    "TLSError",
    "TLSInfo",
    "load_toml",
    "serve",
    "start_listener",
]

# The calling side: client pool, circuit breaker, deadlines, worker pool.
from .breaker import BreakerStats, CircuitBreaker  # noqa: E402
from .client_pool import ConnectionPool, PoolStats  # noqa: E402
from .pool_connection import PoolConnection  # noqa: E402
from .deadline import Deadline  # noqa: E402
from .errors import (  # noqa: E402
    CircuitOpen,
    DeadlineExceeded,
    DialError,
    Overloaded,
    PoolClosed,
    PoolError,
    PoolTimeout,
    ProtocolError,
    WorkerPoolStopped,
)
from .workers import Lane, WorkerPool, WorkerPoolStats  # noqa: E402

__all__ += [
    "BreakerStats",
    "CircuitBreaker",
    "CircuitOpen",
    "ConnectionPool",
    "Deadline",
    "DeadlineExceeded",
    "DialError",
    "Lane",
    "Overloaded",
    "PoolClosed",
    "PoolConnection",
    "PoolError",
    "PoolStats",
    "PoolTimeout",
    "ProtocolError",
    "WorkerPool",
    "WorkerPoolStats",
    "WorkerPoolStopped",
    "Metrics",
    "MetricsServer",
    "instrument_handler",
    "serve_metrics",
]

_METRICS_NAMES = frozenset({"Metrics", "MetricsServer", "instrument_handler", "serve_metrics"})


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # prometheus_client is imported on first use of the metrics names, so a
    # server that does not export metrics does not carry it in memory.
    if name in _METRICS_NAMES:
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'netpool' has no attribute {name!r}")
