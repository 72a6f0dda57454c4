"""netpool: TCP servers on a pool of acceptor threads, the way Ranch and Go write them.

    import netpool

    def echo(message: bytes, conn: netpool.Connection) -> None:
        conn.send(message)

    listener = netpool.start_listener(netpool.ListenerConfig(handler=echo, port=5555))
    listener.wait()

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
    "start_listener",
]

# The calling side (issue 6): client pool, circuit breaker, deadlines.
from .breaker import BreakerStats, CircuitBreaker
from .client_pool import ConnectionPool, PoolConnection, PoolStats
from .deadline import Deadline
from .errors import (
    CircuitOpen,
    DeadlineExceeded,
    DialError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    ProtocolError,
)

__all__ += [
    "BreakerStats",
    "CircuitBreaker",
    "CircuitOpen",
    "ConnectionPool",
    "Deadline",
    "DeadlineExceeded",
    "DialError",
    "PoolClosed",
    "PoolConnection",
    "PoolError",
    "PoolStats",
    "PoolTimeout",
    "ProtocolError",
]

# Worker pool and balancer (issue 6).
from .errors import Overloaded, WorkerPoolStopped
from .workers import Lane, WorkerPool, WorkerPoolStats

__all__ += ["Lane", "Overloaded", "WorkerPool", "WorkerPoolStats", "WorkerPoolStopped"]

# Prometheus metrics (issue 6).
from .metrics import Metrics, MetricsServer, instrument_handler, serve_metrics

__all__ += ["Metrics", "MetricsServer", "instrument_handler", "serve_metrics"]
