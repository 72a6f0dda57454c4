"""The gateway example end to end: HTTP clients -> netpool front end -> pooled back end -> SQLite."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import netpool
from netpool.examples.gateway import protocol
from netpool.examples.gateway.backend import start_backend
from netpool.examples.gateway.frontend import HttpFramer, start_frontend
from netpool.examples.gateway.passwords import HashScheme
from netpool.examples.gateway.seed import ProgressBar, seed
from netpool.examples.gateway.store import UserStore

from .conftest import run_concurrently, serving, wait_for

FAST = HashScheme.parse("pbkdf2_sha256:50")


@pytest.fixture(scope="module")
def seeded_db(tmp_path_factory):
    """A database of 200 seeded users (user<i> / password<i>), copied per test."""
    path = str(tmp_path_factory.mktemp("gateway") / "seed.db")
    seed(path, 200, FAST, batch=64, processes=1)
    return path


@pytest.fixture
def db(seeded_db, tmp_path):
    path = str(tmp_path / "users.db")
    src = sqlite3.connect(seeded_db)
    dst = sqlite3.connect(path)
    src.backup(dst)
    src.close()
    dst.close()
    return path


class Gateway:
    def __init__(self, frontend, pool, backend):
        self.frontend, self.pool, self.backend = frontend, pool, backend

    def client(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.frontend.port, timeout=10)

    def post(self, path, body, client=None):
        own = client is None
        client = client or self.client()
        try:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            client.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
            resp = client.getresponse()
            return resp.status, json.loads(resp.read()), dict(resp.getheaders())
        finally:
            if own:
                client.close()


@contextlib.contextmanager
def frontend_to(backend_port, **options):
    """The HTTP front end and its pool over ``backend_port``; both stopped on leaving (listener first)."""
    frontend, pool = start_frontend(backend_port, port=0, **options)
    try:
        yield frontend, pool
    finally:
        frontend.stop(grace=2)
        pool.close()


@contextlib.contextmanager
def running_gateway(db, *, backend_port=0, breaker=None, timeout=5.0, pool=True):
    backend = start_backend(db, port=backend_port, scheme=FAST)
    try:
        with frontend_to(backend.port, timeout=timeout, breaker=breaker, pool=pool) as (frontend, backend_pool):
            yield Gateway(frontend, backend_pool, backend)
    finally:
        backend.stop(grace=2)


def test_register_login_and_every_error_status(db):
    """Each outcome has its HTTP status and a JSON error: 201, 200, 401, 409, 400, 422, 404, 405."""
    with running_gateway(db) as gw:
        assert gw.post("/register", {"username": "ada", "password": "lovelace"})[:2] == (201, {"username": "ada"})
        assert gw.post("/login", {"username": "ada", "password": "lovelace"})[0] == 200
        assert gw.post("/login", {"username": "user7", "password": "password7"})[1] == {
            "username": "user7", "authenticated": True}
        status, body, _ = gw.post("/login", {"username": "ada", "password": "wrong"})
        assert (status, body["error"]) == (401, "invalid_credentials")
        status, body, _ = gw.post("/login", {"username": "nobody", "password": "x"})
        assert (status, body["error"]) == (401, "invalid_credentials")
        status, body, _ = gw.post("/register", {"username": "ada", "password": "again"})
        assert (status, body["error"]) == (409, "user_exists")
        status, body, _ = gw.post("/login", b"{not json")
        assert (status, body["error"]) == (400, "bad_json")
        status, body, _ = gw.post("/login", [1, 2])
        assert (status, body["error"]) == (400, "bad_json")
        status, body, _ = gw.post("/register", {"username": "", "password": 5})
        assert (status, body["error"]) == (422, "invalid_fields")
        status, body, _ = gw.post("/register", {"username": "x" * 100, "password": "p"})
        assert (status, body["error"]) == (422, "invalid_fields")
        status, body, _ = gw.post("/nowhere", {})
        assert (status, body["error"]) == (404, "not_found")
        c = gw.client()
        c.request("GET", "/login")
        resp = c.getresponse()
        assert resp.status == 405 and resp.getheader("Allow") == "POST" and json.loads(resp.read())["error"]
        c.request("GET", "/health")
        assert c.getresponse().status == 200  # same keep-alive connection
        c.close()


def test_the_pool_keeps_back_end_connections_far_below_requests(db):
    """Three hundred logins from ten keep-alive clients reach the back end over at most max_open connections."""
    with running_gateway(db) as gw:
        failures = []

        def client(n):
            c = gw.client()
            try:
                for i in range(30):
                    u = (n * 30 + i) % 200
                    status, _, _ = gw.post("/login", {"username": f"user{u}", "password": f"password{u}"}, c)
                    if status != 200:
                        failures.append(status)
            finally:
                c.close()

        run_concurrently(client, [(n,) for n in range(10)], timeout=60)
        assert not failures
        accepted = gw.backend.info().accepted
        assert 1 <= accepted <= gw.pool.max_open
        assert accepted * 10 <= 300
        assert gw.pool.stats().reused >= 300 - accepted


def test_pool_off_dials_once_per_request(db):
    """With the pool off, every request opens (and closes) its own back-end connection."""
    with running_gateway(db, pool=False) as gw:
        c = gw.client()
        for i in range(5):
            assert gw.post("/login", {"username": f"user{i}", "password": f"password{i}"}, c)[0] == 200
        c.close()
        wait_for(lambda: gw.backend.info().closed == 5, what="five back-end connections closed")
        assert gw.backend.info().accepted == 5


def test_back_end_down_is_503_then_breaker_then_recovery(db):
    """A dead back end gives 503s quickly (then Retry-After from the open breaker) and service resumes when it returns."""
    breaker = netpool.CircuitBreaker("gw", failure_threshold=2, cooldown=0.3)
    with running_gateway(db, breaker=breaker) as gw:
        port = gw.backend.port
        assert gw.post("/login", {"username": "user1", "password": "password1"})[0] == 200
        gw.backend.stop(grace=1)
        started = time.monotonic()
        statuses = [gw.post("/login", {"username": "user1", "password": "password1"}) for _ in range(3)]
        assert time.monotonic() - started < 5
        assert [s for s, _, _ in statuses] == [503, 503, 503]
        assert all(b["error"] == "backend_unavailable" for _, b, _ in statuses)
        assert breaker.state == "open" and "Retry-After" in statuses[-1][2]
        gw.backend = start_backend(db, port=port, scheme=FAST)
        try:
            wait_for(lambda: breaker.state == "half_open", what="the breaker to let a trial through")
            assert gw.post("/login", {"username": "user1", "password": "password1"})[0] == 200
            assert breaker.state == "closed"
        finally:
            gw.backend.stop(grace=1)


def test_slow_back_end_is_504_at_the_deadline(db):
    """A back end that does not answer within the front end's deadline gives 504, not a hang."""
    release = threading.Event()
    with serving(handler=lambda m, c: release.wait(10), framing="length") as slow, \
            frontend_to(slow.port, timeout=0.3) as (frontend, _):
        try:
            c = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=10)
            started = time.monotonic()
            c.request("POST", "/login", body=b'{"username":"a","password":"b"}')
            resp = c.getresponse()
            assert resp.status == 504 and json.loads(resp.read())["error"] == "backend_timeout"
            assert time.monotonic() - started < 3
            c.close()
        finally:
            release.set()  # before the front end stops: its handler waits on this back end


def test_a_back_end_reply_outside_the_protocol_is_502_and_logged(caplog):
    """An empty reply frame is no reply the protocol knows: 502 with a logged reason, and the client connection stays."""
    with serving(handler=lambda m, c: c.send(b""), framing="length") as broken, \
            frontend_to(broken.port, timeout=2.0) as (frontend, _):
        c = http.client.HTTPConnection("127.0.0.1", frontend.port, timeout=10)
        for _ in range(2):  # the same keep-alive connection both times
            c.request("POST", "/login", body=b'{"username":"a","password":"b"}')
            resp = c.getresponse()
            assert (resp.status, json.loads(resp.read())["error"]) == (502, "bad_gateway")
        c.close()
        assert frontend.info().errors == 0
        assert any("cannot read: empty reply" in r.getMessage() for r in caplog.records)


def test_http_framer_pipelining_limits_and_unsupported_bodies():
    """The HTTP framer splits pipelined requests and turns oversize, chunked or garbled input into error requests."""
    f = HttpFramer(100)
    reqs = f.feed(b"POST /login HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /health HTTP/1.1\r\nConne")
    assert [(r.method, r.path, r.body) for r in reqs] == [("POST", "/login", b"{}")]
    reqs = f.feed(b"ction: close\r\n\r\n")
    assert reqs[0].path == "/health" and not reqs[0].keep_alive
    assert HttpFramer(100).feed(b"GET / HTTP/1.0\r\n\r\n")[0].keep_alive is False
    assert HttpFramer(100).feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")[0].keep_alive is True
    assert HttpFramer(10).feed(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n")[0].error == (413, "body_too_large")
    assert HttpFramer(10).feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")[0].error[0] == 411
    assert HttpFramer(10).feed(b"garbage\r\n\r\n")[0].error == (400, "bad_request_line")
    assert HttpFramer(10).feed(b"GET / HTTP/2.0\r\n\r\n")[0].error[0] == 505
    big = HttpFramer(10)
    assert big.feed(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000)[0].error == (431, "headers_too_large")
    assert big.feed(b"more") == []


def test_garbled_http_gets_400_and_the_connection_closes(db):
    """A client sending garbage gets a 400 JSON answer and a closed connection."""
    with running_gateway(db) as gw:
        with socket.create_connection(("127.0.0.1", gw.frontend.port), timeout=10) as s:
            s.sendall(b"NONSENSE\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in data
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"] == "bad_request_line"


def test_hash_parameters_are_recorded_per_user(db):
    """Users hashed under an older scheme still log in after the back end moves to another scheme."""
    store = UserStore(db)
    try:
        old = HashScheme.parse("scrypt:1024:8:1")
        salt, digest = old.hash("s3cret")
        assert store.add("legacy", str(old), salt, digest)
        record = store.get("legacy")
        assert record.scheme == "scrypt:1024:8:1" and len(record.salt) == 16
        assert store.get("user3").scheme == "pbkdf2_sha256:50"
    finally:
        store.close()
    with running_gateway(db) as gw:
        assert gw.post("/login", {"username": "legacy", "password": "s3cret"})[0] == 200
        assert gw.post("/login", {"username": "legacy", "password": "nope"})[0] == 401


def test_seed_in_batches_across_processes_with_progress(tmp_path):
    """Seeding hashes in worker processes, inserts in batches, reports progress, builds the unique index."""
    path = str(tmp_path / "big.db")
    seen = []
    result = seed(path, 3000, FAST, batch=500, processes=2, progress=seen.append)
    assert result.users == 3000 and seen == [500 * i for i in range(1, 7)]
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*), COUNT(DISTINCT salt) FROM users").fetchone() == (3000, 3000)
    assert con.execute("SELECT name FROM sqlite_master WHERE name = 'users_username'").fetchone()
    con.close()
    store = UserStore(path)
    try:
        record = store.get("user2999")
        assert FAST.verify("password2999", record.salt, record.hash)
    finally:
        store.close()
    with pytest.raises(FileExistsError, match="already holds 3,000 users"):
        seed(path, 10, FAST)

    out = io.StringIO()
    bar = ProgressBar(1000, stream=out)
    for done in range(0, 1001, 50):
        bar.update(done)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("100.0% 1,000/1,000 users") and len(lines) == 11


def test_protocol_rejects_malformed_frames():
    """The back end's protocol decoder refuses short, unknown or inconsistent frames."""
    assert protocol.decode_request(protocol.encode_request(protocol.OP_LOGIN, "é", "p")) == (protocol.OP_LOGIN, "é", "p")
    for frame in (b"", b"\x09\x00\x00\x00\x00", b"\x02\x00\x05\x00\x00ab"):
        with pytest.raises(protocol.ProtocolViolation):
            protocol.decode_request(frame)


def test_one_command_starts_both_and_stops_both(tmp_path):
    """`python -m netpool.examples.gateway run` seeds, serves HTTP with its back end, and stops both on SIGTERM."""
    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    http_port, backend_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "netpool.examples.gateway", "run", "--db", str(tmp_path / "u.db"), "--users", "20",
         "--port", str(http_port), "--backend-port", str(backend_port), "--log-level", "warning"],
        stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        for line in proc.stderr:
            lines.append(line)
            if "frontend ready" in line or time.monotonic() > deadline:
                break
        assert any("frontend ready" in line for line in lines), "".join(lines)
        c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        c.request("POST", "/login", body=b'{"username":"user19","password":"password19"}')
        assert c.getresponse().status == 200
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", backend_port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()


def test_every_gateway_option_says_what_it_does():
    """`python -m netpool.examples.gateway COMMAND --help`: no option without a line of help."""
    from netpool.examples.gateway.__main__ import main

    bare = [f"{name} {param.opts[0]}" for name, command in main.commands.items() for param in command.params
            if getattr(param, "help", None) is None and param.param_type_name == "option"]
    assert bare == []
    shown = subprocess.run([sys.executable, "-m", "netpool.examples.gateway", "frontend", "--help"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "Where the back end listens." in shown.stdout, shown.stderr
