"""Prometheus metrics scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import netpool
from netpool.breaker import CircuitBreaker
from netpool.client_pool import ConnectionPool
from netpool.metrics import Metrics, instrument_handler, serve_metrics
from netpool.workers import WorkerPool

from .conftest import DEADLINE, connect, recv_exactly, recv_until_closed, serving, wait_for


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics and return {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_scrape_listener_pool_workers_and_breaker_metrics():
    """One scrape shows the listener's connections and closes, handler latency, pool, worker pool and breaker."""
    metrics = Metrics()
    handler = metrics.instrument_handler(lambda m, c: c.send(m), listener="api")
    with serving(handler=handler, framing="length", name="api") as backend:
        metrics.add_listener(backend)
        pool = ConnectionPool(("127.0.0.1", backend.port), max_open=2, health_check_interval=None, name="backend")
        breaker = CircuitBreaker("backend", failure_threshold=1, cooldown=60)
        workers = WorkerPool(2, queue_size=2, overflow_size=1, name="jobs")
        try:
            metrics.add(pool, workers, breaker)
            for i in range(10):
                assert pool.request(b"m%d" % i) == b"m%d" % i
            with pytest.raises(ZeroDivisionError):
                breaker.call(lambda: 1 / 0)
            gate = threading.Event()
            workers.submit(gate.wait, 10)
            workers.submit(gate.wait, 10)
            wait_for(lambda: workers.stats().busy == 2, what="busy workers")
            for _ in range(3):
                workers.submit(lambda: None)
            with pytest.raises(netpool.Overloaded):
                workers.submit(lambda: None)
            c = connect(backend)
            c.close()
            wait_for(lambda: backend.info().closed_by_reason.get("eof") == 1, what="the raw client's close")

            with metrics.serve(port=0) as server:
                s = scrape(server.url)
            gate.set()

            assert value(s, "netpool_listener_accepted_total", listener="api") == 2
            assert value(s, "netpool_listener_live_connections", listener="api") == 1
            assert value(s, "netpool_listener_closed_total", listener="api", reason="eof") == 1
            assert value(s, "netpool_listener_running", listener="api") == 1
            assert value(s, "netpool_handler_duration_seconds_count", listener="api") == 10
            assert value(s, "netpool_handler_received_bytes_total", listener="api") == 20
            assert value(s, "netpool_pool_connections", pool="backend", state="idle") == 1
            assert value(s, "netpool_pool_dials_total", pool="backend") == 1
            assert value(s, "netpool_pool_reused_total", pool="backend") == 9
            assert value(s, "netpool_pool_acquire_wait_seconds_count", pool="backend") == 10
            assert value(s, "netpool_pool_acquire_wait_seconds_bucket", pool="backend", le="0.0") == 10
            assert value(s, "netpool_workers_queue_depth", pool="jobs", queue="overflow") == 1
            assert value(s, "netpool_workers_rejected_total", pool="jobs") == 1
            assert value(s, "netpool_workers_busy", pool="jobs") == 2
            assert value(s, "netpool_breaker_state", breaker="backend", state="open") == 1
            assert value(s, "netpool_breaker_state", breaker="backend", state="closed") == 0
            assert value(s, "netpool_breaker_transitions_total", breaker="backend", from_state="closed", to_state="open") == 1
        finally:
            workers.stop()
            pool.close()


def test_handler_errors_are_counted_and_still_close_the_connection():
    """An instrumented handler that raises is counted and the listener still closes with handler_error."""
    metrics = Metrics()

    def broken(message, conn):
        raise RuntimeError("bug")

    with serving(handler=metrics.instrument_handler(broken, listener="l")) as listener:
        s = connect(listener)
        s.sendall(b"x")
        assert s.recv(10) == b""
        s.close()
        wait_for(lambda: listener.info().closed_by_reason.get("handler_error") == 1, what="handler_error close")
    text = metrics.text()
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for f in text_string_to_metric_families(text) for x in f.samples}
    assert value(samples, "netpool_handler_errors_total", listener="l") == 1


def test_registries_are_isolated_and_module_helpers_work():
    """Two registries never share series; instrument_handler/serve_metrics work on a registry you own."""
    from prometheus_client import CollectorRegistry

    one, two = CollectorRegistry(), CollectorRegistry()
    h1 = instrument_handler(lambda m, c: c.send(m), one, listener="a")
    instrument_handler(lambda m, c: c.send(m), one, listener="b")  # same registry, second label: no clash
    with serving(handler=h1) as listener:
        s = connect(listener)
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        s.close()
        server = serve_metrics(0, two)
        try:
            samples = scrape(server.url)
        finally:
            server.stop()
    assert not any(name.startswith("netpool_handler") for name, _ in samples)


def test_metrics_port_in_use_is_a_listen_error():
    """Serving metrics on a taken port fails with a ListenError naming it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(netpool.ListenError, match=f"127.0.0.1:{port}"):
            serve_metrics(port, Metrics().registry)


def fetch(server, method: str, path: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request to the metrics server over a fresh connection: (status, headers, body)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=DEADLINE)
    try:
        conn.request(method, path, body=b"x=1" if method == "POST" else None)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


@pytest.fixture
def metrics_server():
    metrics = Metrics()
    metrics.instrument_handler(lambda m, c: None, listener="api")  # so the registry has a netpool_ series
    with metrics.serve(port=0) as server:
        yield server


@pytest.mark.parametrize("path", ["/metrics", "/metrics?x=1", "/metrics?name[]=netpool_handler_errors_total"])
def test_metrics_path_answers_with_the_exposition(metrics_server, path):
    """/metrics, with or without a query string, is 200 with the Prometheus text format."""
    status, headers, body = fetch(metrics_server, "GET", path)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert b"netpool_handler_errors_total" in body


@pytest.mark.parametrize("path", ["/", "/anything", "/metricsfoo", "/metrics/", "/favicon.ico", "/x?/metrics"])
def test_other_paths_are_404_naming_metrics(metrics_server, path):
    """Any path but /metrics is a 404 whose short plain-text body points at /metrics, not the metrics."""
    status, headers, body = fetch(metrics_server, "GET", path)
    assert status == 404
    assert headers["Content-Type"].startswith("text/plain")
    assert body == b"not found: metrics are at /metrics\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_on_metrics_are_405_with_allow(metrics_server, method):
    """Methods other than GET and HEAD get 405 and an Allow header listing both."""
    status, headers, body = fetch(metrics_server, method, "/metrics")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert b"/metrics" in body and b"netpool_" not in body


def test_head_metrics_is_200_with_the_get_headers_and_no_body(metrics_server):
    """HEAD /metrics answers like GET, with the same type and length, and sends no body bytes on the wire."""
    get_status, get_headers, get_body = fetch(metrics_server, "GET", "/metrics")
    status, headers, body = fetch(metrics_server, "HEAD", "/metrics")
    assert (get_status, status) == (200, 200)
    assert headers["Content-Type"] == get_headers["Content-Type"]
    assert int(headers["Content-Length"]) == len(get_body) > 0
    # http.client never reads a body for HEAD, so look at the raw bytes too
    # (the server speaks HTTP/1.0 and closes after the response).
    with socket.create_connection((metrics_server.host, metrics_server.port), timeout=DEADLINE) as s:
        s.sendall(b"HEAD /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        raw = recv_until_closed(s)
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ") and sep and rest == b""
