"""Shared fixtures: real listeners on 127.0.0.1, real client sockets, bounded waits.

Every wait here has a deadline; nothing sleeps to let state settle.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

import netpool
from netpool import hot_path
from netpool.listener import install_hot_path

if TYPE_CHECKING:
    from .redis_server import RedisServer

DEADLINE = 10.0

# Listeners install the C hot path as they are made; the tests switch between
# it and the Python one (version) before any listener exists, so it is put in
# place here.
install_hot_path()


@pytest.fixture(params=["c", "python"])
def version(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with the C hot path, then with the Python one."""
    if request.param == "c" and hot_path._speedups is None:
        pytest.skip("netpool._speedups was not compiled (no C compiler at install time)")
    before = hot_path.speedups_active()
    hot_path.use_speedups(request.param == "c")
    try:
        yield request.param
    finally:
        hot_path.use_speedups(before)

# The I/O mode serving() uses unless a test says otherwise; modules marked
# ``io_modes`` run every test once per mode (see pytest_generate_tests).
IO_MODES = ("threads", "events")
_default_io = "threads"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("io_modes") is not None:
        metafunc.parametrize("io_mode", IO_MODES, indirect=True)


# Autouse: a fixture only named in pytest_generate_tests is never set up, so
# a test that did not ask for io_mode would run its [events] case in threads.
@pytest.fixture(autouse=True)
def io_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """The I/O mode for this test's listeners: every listener behaviour must hold in both."""
    global _default_io
    _default_io = getattr(request, "param", "threads")
    try:
        yield _default_io
    finally:
        _default_io = "threads"


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        pause.wait(0.005)


def run_concurrently(target: Callable[..., Any], args_list: list[tuple], timeout: float) -> None:
    """Run ``target(*args)`` on one thread per args tuple; fail if any is still running after ``timeout``."""
    threads = [threading.Thread(target=target, args=args) for args in args_list]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    alive = sum(thread.is_alive() for thread in threads)
    assert not alive, f"{alive} of {len(threads)} threads still running after {timeout}s"


def echo(message: bytes, conn: netpool.Connection) -> None:
    conn.send(message)


@contextlib.contextmanager
def serving(**settings: Any) -> Iterator[netpool.Listener]:
    """A listener on a free loopback port, stopped (and its threads joined) afterwards."""
    settings.setdefault("handler", echo)
    settings.setdefault("port", 0)
    settings.setdefault("acceptors", 4)
    settings.setdefault("io", _default_io)
    listener = netpool.start_listener(settings)
    try:
        yield listener
    finally:
        listener.stop(grace=2.0)


def connect(listener: netpool.Listener, timeout: float = DEADLINE) -> socket.socket:
    if listener.config.unix is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(listener.config.unix)
        return sock
    return socket.create_connection((listener.config.host, listener.port), timeout=timeout)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes (the socket's own timeout bounds each read)."""
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise AssertionError(f"connection closed with {n} bytes still expected")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def ask_line(port: int, line: bytes) -> tuple[bytes, tuple[str, int]]:
    """One client on 127.0.0.1:port: send a line, read one line back; returns (reply, our address)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(line + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):  # each recv is bounded by the socket timeout
            chunk = sock.recv(1024)
            if not chunk:
                raise ConnectionError(f"closed after {reply!r}")
            reply += chunk
        return reply[:-1], sock.getsockname()


def recv_until_closed(sock: socket.socket, limit: int = 1 << 24) -> bytes:
    """Read until EOF (or a reset, which also means closed); the socket timeout bounds it."""
    chunks = []
    total = 0
    while total <= limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def netpool_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("netpool-")]


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    """Every test must leave no netpool thread behind (socketserver's reap_threads)."""
    yield
    wait_for(lambda: not netpool_threads(), timeout=5.0, what="netpool threads to exit")


@pytest.fixture
def listener_factory() -> Iterator[Callable[..., netpool.Listener]]:
    """Start listeners inside a test (same defaults as ``serving``); all stop at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda **settings: stack.enter_context(serving(**settings))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server (Debian's) for the whole session, on a free loopback port, without persistence.

    One for the session because starting one costs far more than a FLUSHALL;
    tests isolate themselves through ``redis_url`` (or ``flush()``), and may
    ``stop()`` and ``start()`` it to simulate Redis going away and coming back
    empty on the same port.
    """
    # Imported here: redis_server.py uses this module's wait_for.
    from .redis_server import RedisServer

    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed: run `make test`, which installs it (Debian package redis-server)")
    server = RedisServer(executable, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's redis-server, running (a previous test may have stopped it) and empty: its redis:// URL."""
    redis_server.start()  # returns at once when it is already running
    redis_server.flush()
    return redis_server.url
