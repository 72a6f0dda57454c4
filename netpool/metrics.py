"""Prometheus metrics for listeners, client pools, worker pools and breakers.

Most numbers already exist as counters inside each object (``info()``,
``stats()``), so they are exported by *collectors* that read a snapshot at
scrape time: nothing is added to the hot path, and the exported numbers are
the same ones the logs and tests see. Only distributions (handler latency,
the pool's acquire wait) need an observation per event; those use
``prometheus_client`` histograms fed by a handler wrapper and by the pool's
``observe_waits`` hook.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (not the process
global), so two listeners, or two tests, never collide on metric names::

    metrics = netpool.Metrics()
    handler = metrics.instrument_handler(my_handler, listener="api")
    listener = netpool.start_listener({"handler": handler, "port": 5555, "name": "api"})
    metrics.add_listener(listener)
    metrics.add_pool(pool); metrics.add_worker_pool(workers); metrics.add_breaker(breaker)
    server = metrics.serve(9100)        # GET http://127.0.0.1:9100/metrics
    ...
    server.stop()
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .breaker import STATES, CircuitBreaker
from .errors import ListenError

if TYPE_CHECKING:  # pragma: no cover
    from .client_pool import ConnectionPool
    from .listener import Listener
    from .workers import WorkerPool

__all__ = [
    "Metrics",
    "MetricsServer",
    "ListenerCollector",
    "PoolCollector",
    "WorkerPoolCollector",
    "BreakerCollector",
    "instrument_handler",
    "serve_metrics",
]

log = logging.getLogger("netpool.metrics")

# Handler latency: from sub-millisecond replies to multi-second stalls.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Acquire wait: most checkouts do not wait at all, so start at zero.
WAIT_BUCKETS = (0.0, 0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)


class ListenerCollector(Collector):
    """Reads ``listener.info()`` at scrape time: connections live, accepted, refused and closed by reason.

    Bytes in/out are exported as soon as ``ListenerInfo`` carries
    ``bytes_in``/``bytes_out`` (the core's counters), and skipped before.
    """

    def __init__(self, listener: "Listener") -> None:
        self.listener = listener

    def collect(self) -> Iterable[Metric]:
        info = self.listener.info()
        name = [info.name]
        yield _gauge("netpool_listener_live_connections", "Connections counted against max_connections.", ["listener"], [(name, info.live)])
        yield _gauge("netpool_listener_open_connections", "All open connections, counted or not.", ["listener"], [(name, info.open)])
        yield _gauge("netpool_listener_max_connections", "The current connection limit.", ["listener"], [(name, info.max_connections)])
        yield _gauge("netpool_listener_running", "1 while the listener accepts, 0 when suspended or stopped.", ["listener"], [(name, int(info.state == "running"))])
        yield _counter("netpool_listener_accepted", "Sockets accept() returned (admitted + refused).", ["listener"], [(name, info.accepted)])
        yield _counter(
            "netpool_listener_refused", "Clients refused, by reason.", ["listener", "reason"],
            [([info.name, reason], n) for reason, n in sorted(info.refused_by_reason.items())],
        )
        yield _counter(
            "netpool_listener_closed", "Connections closed, by reason.", ["listener", "reason"],
            [([info.name, reason], n) for reason, n in sorted(info.closed_by_reason.items())],
        )
        for field, metric, text in (
            ("bytes_in", "netpool_listener_received_bytes", "Bytes received from clients."),
            ("bytes_out", "netpool_listener_sent_bytes", "Bytes sent to clients."),
            ("handoffs", "netpool_listener_handoffs", "Handler calls still running after HANDOFF_AFTER, whose loop moved on."),
            ("offloads", "netpool_listener_offloads", "Connections whose calls moved to threads because one blocked."),
            ("threaded_calls", "netpool_listener_threaded_calls", "Handler and hook calls run on threads, off the loop."),
        ):
            value = getattr(info, field, None)
            if value is not None:
                yield _counter(metric, text, ["listener"], [(name, value)])


class PoolCollector(Collector):
    """Reads ``pool.stats()`` at scrape time (the ``database/sql`` DBStats questions)."""

    def __init__(self, pool: "ConnectionPool") -> None:
        self.pool = pool

    def collect(self) -> Iterable[Metric]:
        s = self.pool.stats()
        p = [s.name]
        yield _gauge(
            "netpool_pool_connections", "Client connections by state.", ["pool", "state"],
            [([s.name, "open"], s.open), ([s.name, "idle"], s.idle), ([s.name, "in_use"], s.in_use)],
        )
        yield _gauge("netpool_pool_max_open", "Hard cap on open connections.", ["pool"], [(p, s.max_open)])
        yield _gauge("netpool_pool_waiting", "Callers queued for a connection.", ["pool"], [(p, s.waiting)])
        yield _counter("netpool_pool_dials", "Connections opened.", ["pool"], [(p, s.dialled)])
        yield _counter("netpool_pool_dial_errors", "Dials that failed.", ["pool"], [(p, s.dial_errors)])
        yield _counter("netpool_pool_acquired", "Successful checkouts.", ["pool"], [(p, s.acquired)])
        yield _counter("netpool_pool_reused", "Checkouts served by a reused connection.", ["pool"], [(p, s.reused)])
        yield _counter("netpool_pool_acquire_timeouts", "Checkouts that gave up (PoolTimeout).", ["pool"], [(p, s.timeouts)])
        yield _counter("netpool_pool_waits", "Checkouts that had to queue.", ["pool"], [(p, s.wait_count)])
        yield _counter("netpool_pool_wait_seconds", "Total time spent queued for a connection.", ["pool"], [(p, s.wait_seconds)])
        yield _counter(
            "netpool_pool_closed", "Connections the pool closed, by reason.", ["pool", "reason"],
            [([s.name, reason], n) for reason, n in sorted(s.closed_by_reason.items())],
        )


class WorkerPoolCollector(Collector):
    """Reads ``workers.stats()`` at scrape time: queue depths, busy workers, steals, rejections."""

    def __init__(self, pool: "WorkerPool") -> None:
        self.pool = pool

    def collect(self) -> Iterable[Metric]:
        s = self.pool.stats()
        p = [s.name]
        depths = [([s.name, str(i)], n) for i, n in enumerate(s.queued)] + [([s.name, "overflow"], s.overflow)]
        yield _gauge("netpool_workers_queue_depth", "Tasks waiting, per worker queue and in the overflow queue.", ["pool", "queue"], depths)
        yield _gauge("netpool_workers_busy", "Workers running a task.", ["pool"], [(p, s.busy)])
        yield _gauge("netpool_workers_size", "Worker threads.", ["pool"], [(p, s.workers)])
        yield _counter("netpool_workers_submitted", "Tasks accepted by submit().", ["pool"], [(p, s.submitted)])
        yield _counter("netpool_workers_completed", "Tasks run.", ["pool"], [(p, s.completed)])
        yield _counter("netpool_workers_errors", "Tasks that raised.", ["pool"], [(p, s.errors)])
        yield _counter("netpool_workers_steals", "Tasks taken from the overflow queue or another worker.", ["pool"], [(p, s.steals)])
        yield _counter("netpool_workers_rejected", "Submissions refused with Overloaded.", ["pool"], [(p, s.rejected)])


class BreakerCollector(Collector):
    """Reads ``breaker.stats()`` at scrape time: one 0/1 series per state, transitions, rejections."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    def collect(self) -> Iterable[Metric]:
        s = self.breaker.stats()
        b = [s.name]
        yield _gauge(
            "netpool_breaker_state", "1 for the breaker's current state, 0 for the others.", ["breaker", "state"],
            [([s.name, state], int(state == s.state)) for state in STATES],
        )
        transitions = []
        for key, n in sorted(s.transitions.items()):
            old, _, new = key.partition("->")
            transitions.append(([s.name, old, new], n))
        yield _counter("netpool_breaker_transitions", "State changes.", ["breaker", "from_state", "to_state"], transitions)
        yield _counter("netpool_breaker_rejected", "Calls refused while open or half-open.", ["breaker"], [(b, s.rejected)])
        yield _counter("netpool_breaker_failures", "Calls that failed.", ["breaker"], [(b, s.failures)])
        yield _counter("netpool_breaker_successes", "Calls that succeeded.", ["breaker"], [(b, s.successes)])


class MetricsServer:
    """The HTTP endpoint serving one registry on ``/metrics``; :meth:`stop` closes and joins it."""

    def __init__(self, httpd: Any, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.host, self.port = httpd.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self, timeout: float = 5.0) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def serve_metrics(port: int = 9100, registry: Optional[CollectorRegistry] = None, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a background thread (port 0 picks one).

    Only ``/metrics`` (with or without a query string) answers, to GET and
    HEAD; other paths get 404 and other methods 405.
    Loopback by default, like the listener: metrics say a lot about a
    service, so exposing them to the network is an explicit ``host=``.
    Raises ListenError when the port cannot be bound.
    """
    if registry is None:
        raise ValueError("pass the registry to serve (Metrics().registry); the process-global one is not used")
    try:
        # The same wsgiref server prometheus_client's start_http_server
        # builds, assembled here because that function takes no app: ours
        # wraps make_wsgi_app, which answers any path with the metrics. The
        # family comes from the address (as start_http_server does), so
        # host="::1" works; TCPServer reads it from the class when it makes
        # the socket, hence a subclass per call.
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        server_class: type[_ThreadingWSGIServer] = type("_MetricsHTTPServer", (_ThreadingWSGIServer,),
                                                        {"address_family": family})
        address = cast(str, sockaddr[0])  # the host, a str: getaddrinfo gives IPv4 and IPv6 addresses only
        httpd = make_server(address, port, _only_metrics(make_wsgi_app(registry)), server_class, _QuietHandler)
    except OSError as exc:
        raise ListenError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    thread = threading.Thread(target=httpd.serve_forever, name=f"netpool-metrics-{httpd.server_address[1]}", daemon=True)
    thread.start()
    server = MetricsServer(httpd, thread)
    log.info("serving metrics on %s", server.url)
    return server


_METRICS_PATH = "/metrics"
_ALLOWED_METHODS = "GET, HEAD"


def _only_metrics(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Wrap prometheus_client's WSGI app so that only GET/HEAD ``/metrics`` reach it.

    The app itself serves every path (and a 200 for /favicon.ico), so a
    typo in a scrape config, or a probe of ``/``, would look like a working
    target; a 404 naming the right path makes the mistake visible. The app
    also refuses HEAD (405), which ``curl -I`` and health checks use, so
    HEAD is answered here from a GET.
    """

    def metrics_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        # wsgiref has already split off the query string, so "/metrics?name[]=x" is "/metrics" here.
        if environ.get("PATH_INFO") != _METRICS_PATH:
            # The path is checked before the method: an unknown resource has no methods to list in Allow.
            return _plain(start_response, "404 Not Found", f"not found: metrics are at {_METRICS_PATH}\n", [], method)
        if method not in ("GET", "HEAD"):
            return _plain(
                start_response, "405 Method Not Allowed",
                f"method not allowed: use {_ALLOWED_METHODS} on {_METRICS_PATH}\n", [("Allow", _ALLOWED_METHODS)], method,
            )
        if method == "GET":
            return app(environ, start_response)
        # HEAD: run the app as GET so the headers (type, encoding, length) are
        # exactly the ones a GET gets, then drop the body, as HTTP requires.
        # wsgiref keeps a Content-Length the app set, and sends no body for [].
        got: list[Any] = []
        body = b"".join(app(dict(environ, REQUEST_METHOD="GET"), lambda status, headers, exc_info=None: got.append((status, headers))))
        status, headers = got[0]
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"] + [("Content-Length", str(len(body)))]
        start_response(status, headers)
        return []

    return metrics_app


def _plain(start_response: Callable[..., Any], status: str, text: str, headers: list[tuple[str, str]], method: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *headers])
    return [] if method == "HEAD" else [body]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    # A thread per scrape, so one slow scraper does not hold up the others;
    # daemon threads, so ThreadingMixIn does not keep every finished thread
    # in a list to join at close (and a stuck scrape cannot block exit).
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        # wsgiref writes a line per request to stderr; a scrape every few
        # seconds is not worth logging (prometheus_client's handler is silent too).
        pass


class _HandlerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.latency = Histogram(
            "netpool_handler_duration_seconds", "Time spent in the handler per message.",
            ["listener"], registry=registry, buckets=LATENCY_BUCKETS,
        )
        self.errors = Counter("netpool_handler_errors", "Handler calls that raised.", ["listener"], registry=registry)
        self.messages_in = Counter(
            "netpool_handler_received_bytes", "Bytes of the messages handed to the handler (after framing).",
            ["listener"], registry=registry,
        )


class Metrics:
    """A registry of netpool metrics; add what runs, then serve or scrape it."""

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._handler: Optional[_HandlerMetrics] = None
        self._wait: Optional[Histogram] = None
        self._collectors: dict[int, Any] = {}  # by id() of what they export, for remove()

    def add_listener(self, listener: "Listener") -> None:
        self._register(listener, ListenerCollector(listener))

    def remove(self, thing: Any) -> None:
        """Stop exporting a listener or worker pool added before (a reload hands its series to its successor)."""
        with self._lock:
            collector = self._collectors.pop(id(thing), None)
        if collector is not None:
            self.registry.unregister(collector)

    def _register(self, thing: Any, collector: Any) -> None:
        self.registry.register(collector)
        with self._lock:
            self._collectors[id(thing)] = collector

    def add_pool(self, pool: "ConnectionPool") -> None:
        """Export the pool's counters and an acquire-wait histogram fed by every checkout."""
        self.registry.register(PoolCollector(pool))
        with self._lock:
            if self._wait is None:
                self._wait = Histogram(
                    "netpool_pool_acquire_wait_seconds", "Time a checkout queued for a connection.",
                    ["pool"], registry=self.registry, buckets=WAIT_BUCKETS,
                )
            child = self._wait.labels(pool.name)
        pool.observe_waits(child.observe)

    def add_worker_pool(self, pool: "WorkerPool") -> None:
        self._register(pool, WorkerPoolCollector(pool))

    def add_breaker(self, breaker: CircuitBreaker) -> None:
        self.registry.register(BreakerCollector(breaker))

    def add(self, *things: Any) -> None:
        """Add listeners, pools, worker pools and breakers, whichever they are."""
        from .client_pool import ConnectionPool
        from .listener import Listener
        from .workers import WorkerPool

        for thing in things:
            if isinstance(thing, Listener):
                self.add_listener(thing)
            elif isinstance(thing, ConnectionPool):
                self.add_pool(thing)
            elif isinstance(thing, WorkerPool):
                self.add_worker_pool(thing)
            elif isinstance(thing, CircuitBreaker):
                self.add_breaker(thing)
            else:
                raise TypeError(f"no netpool metrics for {thing!r}")

    def instrument_handler(self, handler: Callable[[Any, Any], None], listener: str = "netpool") -> Callable[[Any, Any], None]:
        """Wrap ``handler(message, conn)`` to time each call and count errors and message bytes.

        ``listener`` is the label (use the listener's ``name``). The
        wrapper re-raises, so the listener still closes the connection with
        ``handler_error``.
        """
        with self._lock:
            if self._handler is None:
                self._handler = _HandlerMetrics(self.registry)
            m = self._handler
        latency = m.latency.labels(listener)
        errors = m.errors.labels(listener)
        received = m.messages_in.labels(listener)
        clock = time.perf_counter

        def instrumented(message: Any, conn: Any) -> None:
            started = clock()
            try:
                handler(message, conn)
            except BaseException:
                errors.inc()
                raise
            finally:
                latency.observe(clock() - started)
                received.inc(len(message) if isinstance(message, (bytes, bytearray, memoryview)) else 0)

        instrumented.__wrapped__ = handler  # type: ignore[attr-defined]
        instrumented.__name__ = getattr(handler, "__name__", "handler")
        return instrumented

    def serve(self, port: int = 9100, host: str = "127.0.0.1") -> MetricsServer:
        return serve_metrics(port, self.registry, host)

    def text(self) -> str:
        """The exposition text right now (what ``/metrics`` would answer)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def instrument_handler(
    handler: Callable[[Any, Any], None], registry: CollectorRegistry, listener: str = "netpool"
) -> Callable[[Any, Any], None]:
    """Module-level form of :meth:`Metrics.instrument_handler` for a registry you own."""
    return _metrics_for(registry).instrument_handler(handler, listener)


_by_registry_lock = threading.Lock()


def _metrics_for(registry: CollectorRegistry) -> Metrics:
    # Kept on the registry itself, so its metric objects live exactly as long as it does.
    with _by_registry_lock:
        m = getattr(registry, "_netpool_metrics", None)
        if m is None:
            m = Metrics(registry)
            registry._netpool_metrics = m  # type: ignore[attr-defined]
        return m


def _gauge(name: str, text: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


def _counter(name: str, text: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family
