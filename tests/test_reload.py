"""Rolling reloads (SIGHUP) and workers sharing one socket, through the real CLI, real signals and real clients."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from .conftest import DEADLINE, wait_for
from .test_cli import server
from .test_processes import await_lines

# A handler whose reply names its version and process, and a helper module
# it imports: a reload must import both afresh.
APP = '''
import os
import helper

def handler(message, conn):
    conn.send(b"%s %d %s" % (helper.VERSION, os.getpid(), message))

def hello(conn):
    conn.send(b"hello %d" % os.getpid())  # line framing adds the newline
'''


# Python trusts a cached .pyc whose source has the same size and modification
# second: a test rewriting a module within the same second must not cache.
FRESH_ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def write_app(folder: Path, version: str) -> None:
    (folder / "app.py").write_text(APP)
    (folder / "helper.py").write_text(f"VERSION = b{version!r}\n")


def ask(port: int, line: bytes = b"hi\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(line)
        return sock.recv(100)


def version_of(reply: bytes) -> bytes:
    return reply.split(b" ", 1)[0]


@pytest.mark.parametrize("processes", ["1", "2"])
def test_sighup_serves_the_new_code_and_config_and_a_broken_one_changes_nothing(tmp_path: Path, processes: str):
    write_app(tmp_path, "v1")
    config = tmp_path / "server.toml"
    config.write_text('max_message_size = 1000\n')
    with server("run", "app:handler", "--port", "0", "--framing", "line", "--processes", processes,
                "--config", str(config), "--grace", "3", cwd=tmp_path, env=FRESH_ENV) as srv:
        port = int(srv.expect(r"(?:listening on|worker processes serving) 127\.0\.0\.1:(\d+)")[1])
        if processes == "2":
            await_lines(srv, {"l0": r"\[0\] listening on", "l1": r"\[1\] listening on"})
        assert version_of(ask(port)) == b"v1"
        before = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        before.sendall(b"first\n")
        assert version_of(before.recv(100)) == b"v1"

        # New code in the helper module and a new setting in the file.
        write_app(tmp_path, "v2")
        config.write_text('max_message_size = 2000\n')
        srv.proc.send_signal(signal.SIGHUP)
        done = "reload done in .*: 2 of 2 workers replaced" if processes == "2" else "reload 1: the new listener"
        srv.expect(done)
        assert version_of(ask(port)) == b"v2", "every client after the reload meets the new code"
        assert version_of(ask(port, b"x" * 1500 + b"\n")) == b"v2", "the new max_message_size applies"
        before.sendall(b"second\n")  # a connection from before the reload goes on with the old code
        assert version_of(before.recv(100)) == b"v1"

        # A module that no longer imports: one clear line, and the server goes on as it was.
        (tmp_path / "helper.py").write_text("VERSION = (\n")
        srv.proc.send_signal(signal.SIGHUP)
        failed = srv.expect("reload failed, so the running (?:server|workers) go(?:es)? on unchanged: (.*)")
        assert "helper" in failed[1] and "SyntaxError" in failed[1], failed[0]
        assert "Traceback" not in srv.stderr
        assert version_of(ask(port)) == b"v2"

        # A config file that no longer parses: the same.
        write_app(tmp_path, "v3")
        config.write_text("max_message_size = = 3\n")
        srv.proc.send_signal(signal.SIGHUP)
        failed = srv.expect("reload failed, so the running (?:server|workers) go(?:es)? on unchanged: (.*)")
        assert "server.toml" in failed[1], failed[0]
        assert version_of(ask(port)) == b"v2"

        # The listening address is not a reload's to change.
        config.write_text("max_message_size = 2000\nhost = '127.0.0.2'\n")
        srv.proc.send_signal(signal.SIGHUP)
        srv.expect("reload failed, so the running .* host changed from .* which needs a restart")
        assert version_of(ask(port)) == b"v2"

        before.sendall(b"third\n")
        # The old generation closes it gracefully once its grace is over: an end of stream, never a reset.
        data = before.recv(100)
        assert data == b"" or version_of(data) == b"v1"
        before.settimeout(DEADLINE)
        assert _read_to_end(before) is True
        before.close()
        returncode, stderr = srv.stop()
        assert returncode == 0, stderr
        if processes == "2":
            assert re.search(r"all workers stopped \(0 restarts, 1 reloads\)", stderr), stderr
        else:
            assert re.search(r"1 reloads; over all generations: accepted \d+", stderr), stderr
        assert "reload 1" in stderr and "closed" in stderr


def _read_to_end(sock: socket.socket) -> bool:
    """Read until the peer's FIN (True); a reset raises."""
    for _ in range(1000):
        if not sock.recv(65536):
            return True
    return False


def test_a_worker_killed_with_clients_queued_resets_only_its_own(tmp_path: Path):
    """Clients queued on the socket belong to no worker: a SIGKILLed one takes only the clients it had accepted.

    Each worker may hold 5 connections (overflow=wait: at the limit it stops
    accepting), so after 10 held connections every further client waits in
    the shared backlog: 20 queued ones, and new ones arriving all along from
    churn threads (connect, echo once, close, again). With a socket per
    worker (SO_REUSEPORT) a killed worker's backlog was reset with it.
    """
    import threading
    from collections import Counter
    write_app(tmp_path, "v1")
    with server("run", "app:handler", "--on-connect", "app:hello", "--port", "0", "--framing", "line",
                "--processes", "2", "--max-connections", "5", "--overflow", "wait", "--backlog", "64",
                cwd=tmp_path) as srv:
        port = int(srv.expect(r"worker processes serving 127\.0\.0\.1:(\d+)")[1])
        await_lines(srv, {"l0": r"\[0\] listening on", "l1": r"\[1\] listening on"})
        held: dict[int, list[socket.socket]] = {}
        queued: list[socket.socket] = []
        try:
            for _ in range(10):  # fills both workers (the kernel hands each client to a worker with a free slot)
                sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
                pid = int(_line(sock).split()[1])
                held.setdefault(pid, []).append(sock)
            assert sorted(len(socks) for socks in held.values()) == [5, 5], held
            for _ in range(20):  # now nobody accepts: these wait in the backlog
                sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
                sock.sendall(b"queued\n")
                queued.append(sock)
            victim, survivor = sorted(held)
            churned: Counter[str] = Counter()
            stop_churn = threading.Event()

            def churn() -> None:
                while not stop_churn.is_set():
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
                            _line(sock)  # the greeting
                            sock.sendall(b"churn\n")
                            churned["served" if _line(sock).endswith(b"churn") else "garbled"] += 1
                    except ConnectionResetError:
                        churned["reset"] += 1
                    except OSError as exc:
                        churned[type(exc).__name__] += 1

            churners = [threading.Thread(target=churn, daemon=True) for _ in range(2)]
            for thread in churners:
                thread.start()
            os.kill(victim, signal.SIGKILL)
            restarted = srv.expect(r"worker \d started \(pid (\d+)\)")
            new_pid = int(restarted[1])

            resets_of_held = 0
            for sock in held[victim]:
                try:
                    sock.sendall(b"are you there\n")
                    if not sock.recv(100):
                        continue
                except ConnectionResetError:
                    resets_of_held += 1
            # Every queued client is served by the new worker (5 slots) or, once
            # the survivor's held clients leave, by the survivor.
            for sock in held[survivor]:
                sock.close()
            resets_of_queued = 0
            served_by: dict[int, int] = {}
            for sock in queued:
                try:
                    greeting = _line(sock)
                    reply = _line(sock)
                except ConnectionResetError:
                    resets_of_queued += 1
                    continue
                pid = int(greeting.split()[1])
                assert reply.endswith(b"queued"), reply
                served_by[pid] = served_by.get(pid, 0) + 1
                sock.close()  # frees the slot for the next queued client
            assert resets_of_queued == 0, f"{resets_of_queued} of 20 queued clients were reset"
            assert sum(served_by.values()) == 20 and set(served_by) <= {survivor, new_pid}, served_by
            assert resets_of_held <= 5
            wait_for(lambda: churned["served"] >= 20, what="new clients served after the kill")
            stop_churn.set()
            for thread in churners:
                thread.join(DEADLINE)
            assert set(churned) == {"served"}, f"new clients during and after the kill: {dict(churned)}"
        finally:
            for sock in [*queued, *(s for socks in held.values() for s in socks)]:
                sock.close()
        returncode, stderr = srv.stop()
        assert returncode == 0, stderr
        assert "was killed by SIGKILL" in stderr


def _line(sock: socket.socket) -> bytes:
    """One line from ``sock`` (read byte by byte, so nothing after it is consumed)."""
    data = b""
    deadline = time.monotonic() + DEADLINE
    while not data.endswith(b"\n"):
        assert time.monotonic() < deadline, "no line in time"
        byte = sock.recv(1)
        if not byte:
            raise ConnectionResetError("closed before a whole line")  # treated like a reset by callers
        data += byte
    return data.rstrip(b"\n")


def test_unix_socket_shared_by_two_workers_is_removed_at_the_end(tmp_path: Path):
    write_app(tmp_path, "v1")
    path = tmp_path / "s.sock"
    with server("run", "app:handler", "--unix", str(path), "--framing", "line", "--processes", "2",
                cwd=tmp_path) as srv:
        await_lines(srv, {"l0": r"\[0\] listening on", "l1": r"\[1\] listening on"})
        pids = set()
        for _ in range(200):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(DEADLINE)
                sock.connect(str(path))
                sock.sendall(b"who\n")
                pids.add(int(sock.recv(100).split()[1]))
            if len(pids) == 2:
                break
        assert len(pids) == 2, "both workers take clients from the one socket"
        srv.proc.send_signal(signal.SIGHUP)
        srv.expect("reload done in .*: 2 of 2 workers replaced")
        assert path.exists()
        returncode, stderr = srv.stop()
        assert returncode == 0, stderr
    assert not path.exists(), "the parent bound it, so the parent removes it"


ACTIVATOR = "/usr/bin/systemd-socket-activate"


@pytest.mark.skipif(not os.path.exists(ACTIVATOR), reason="systemd-socket-activate is not installed")
@pytest.mark.parametrize("processes", ["1", "2"])
def test_socket_activation_serves_the_passed_socket_and_reloads_on_it(tmp_path: Path, processes: str):
    """systemd-socket-activate binds, then execs netpool at the first client: that client waits, then is served."""
    from .test_cli import NETPOOL, free_port

    write_app(tmp_path, "v1")
    port = free_port()
    argv = [ACTIVATOR, "-l", f"127.0.0.1:{port}", "-E", "PYTHONDONTWRITEBYTECODE=1", NETPOOL, "run", "app:handler", "--framing", "line",
            "--port", "1", "--processes", processes]  # the configured port is not the one passed: one socket wins
    with server(*argv[1:], cwd=tmp_path, argv0=[ACTIVATOR], env=FRESH_ENV) as srv:
        srv.expect(rf"Listening on 127\.0\.0\.1:{port}")
        first = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)  # starts the service
        first.sendall(b"first\n")
        assert version_of(first.recv(100)) == b"v1"
        assert srv.expect(r"serving (\S+), the socket systemd passed")[1] == f"127.0.0.1:{port}"
        write_app(tmp_path, "v2")
        srv.proc.send_signal(signal.SIGHUP)
        srv.expect("reload done in .*: 2 of 2 workers replaced" if processes == "2" else "reload 1: the new listener")
        assert version_of(ask(port)) == b"v2", srv.stderr
        first.close()
        returncode, stderr = srv.stop()
        assert returncode == 0, stderr
        assert "LISTEN_FDS" not in stderr


def test_chat_users_on_the_old_and_the_new_generation_reach_each_other(tmp_path: Path):
    """In one process both generations share the broker: a user still on the old one chats with one on the new."""
    from .test_chat import CHAT, Client

    with server("run", f"{CHAT}:handler", "--on-connect", f"{CHAT}:joined", "--on-close", f"{CHAT}:left",
                "--framing", "line", "--port", "0", "--grace", "30", cwd=tmp_path) as srv:
        port = srv.port()
        alice = Client(port)
        alice.nick(b"alice")
        srv.proc.send_signal(signal.SIGHUP)
        srv.expect("reload 1: the new listener")
        bob = Client(port)
        bob.nick(b"bob")
        assert alice.line() == b"* bob joined"
        alice.say(b"hello from the old generation")
        assert bob.line() == b"<alice> hello from the old generation"
        bob.say(b"/msg alice and back")
        assert alice.line() == b"*bob* and back"
        bob.say(b"/who")
        assert bob.line() == b"* online (2): alice bob"
        alice.close()
        assert bob.line() == b"* alice left"
        bob.close()
        returncode, stderr = srv.stop()
        assert returncode == 0, stderr


# -- the library pieces, in one process ------------------------------------------------


def _named(name: bytes):
    def handler(message: bytes, conn) -> None:
        conn.send(name + b" " + message)
    return handler


def test_a_given_socket_outlives_its_listeners_and_keeps_its_queued_clients():
    """start_listener(sock=...) serves a socket it does not own: stopping it leaves clients queued for the next."""
    import netpool

    sock = socket.create_server(("127.0.0.1", 0), backlog=16)
    port = sock.getsockname()[1]
    try:
        first = netpool.start_listener({"port": 0, "handler": _named(b"first")}, sock=sock)
        assert first.port == port
        assert ask(port, b"a") == b"first a"
        second = netpool.start_listener({"port": 0, "handler": _named(b"second")}, sock=sock)
        first.stop_accepting()  # returns once its acceptors are gone
        assert first.state == "draining"
        assert {ask(port, b"b") for _ in range(20)} == {b"second b"}, "the old one takes nobody"
        first.retire(grace=1.0)
        second.stop(grace=1.0)
        # Nobody accepts now, but the socket still listens: the kernel completes
        # the handshake and the client waits in the backlog, not refused, not reset.
        waiting = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        waiting.sendall(b"c")
        third = netpool.start_listener({"port": 0, "handler": _named(b"third")}, sock=sock)
        try:
            assert waiting.recv(100) == b"third c"
        finally:
            waiting.close()
            third.stop(grace=1.0)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        sock.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_graceful_stop_over_unread_bytes_ends_with_a_fin_not_a_reset(tmp_path: Path, tls: bool):
    """Bytes a client sent after its connection was told to quit are read away, so the close is not a reset."""
    import ssl
    import threading

    import netpool
    from netpool.devcert import write_dev_certificate

    started, release = threading.Event(), threading.Event()

    def slow(message: bytes, conn) -> None:
        started.set()
        release.wait(DEADLINE)
        conn.send(b"done")

    config: dict = {"port": 0, "handler": slow, "io": "threads"}
    if tls:
        cert, key = write_dev_certificate(str(tmp_path))
        config["ssl"] = {"certfile": cert, "keyfile": key}
    listener = netpool.start_listener(config)
    client = socket.create_connection(("127.0.0.1", listener.port), timeout=DEADLINE)
    if tls:
        client = ssl.create_default_context(cafile=cert).wrap_socket(client, server_hostname="localhost")
    stopper = threading.Thread(target=listener.stop, kwargs={"grace": DEADLINE})
    try:
        client.sendall(b"first")
        assert started.wait(DEADLINE)
        stopper.start()  # tells the connection to quit: reads stop, the running handler goes on
        wait_for(lambda: listener.state == "stopping", what="the stop to begin")
        for conn in listener.connections():
            wait_for(lambda: conn.close_reason is not None, what="the connection told to quit")
        client.sendall(b"x" * 5000)  # arrives after the quit: nobody will read it
        release.set()
        assert client.recv(100) == b"done"
        assert client.recv(100) == b"", "a FIN, not a reset"
    finally:
        release.set()
        stopper.join(DEADLINE)
        client.close()
    assert listener.info().closed_by_reason == {"server_stop": 1}


def test_a_renewed_certificate_is_picked_up_by_new_handshakes_without_touching_live_connections(tmp_path: Path,
                                                                                              caplog):
    """ssl.reload_interval: the files are watched; a new pair serves new handshakes, a broken one is refused."""
    import logging

    import netpool
    from netpool.devcert import write_dev_certificate

    from .test_tls_cli import _serial

    cert, key = write_dev_certificate(str(tmp_path))
    config = {"port": 0, "handler": _named(b"tls"), "ssl": {"certfile": cert, "keyfile": key,
                                                              "reload_interval": 0.1}}
    with caplog.at_level(logging.INFO, logger="netpool.listener"):
        listener = netpool.start_listener(config)
        try:
            first, live = _serial(cert, listener.port)
            write_dev_certificate(str(tmp_path), force=True)  # renewed: a new key pair and serial
            # Trusting only the renewed certificate, a handshake fails (0) until the server serves it.
            renewed = wait_for(lambda: _handshake_serial(cert, listener.port),
                               what="a handshake with the renewed certificate")
            assert renewed != first
            live.sendall(b"still")
            assert live.recv(100) == b"tls still", "a connection from before the renewal goes on"

            Path(key).write_text("not a key\n")  # broken: the last good pair stays
            wait_for(lambda: "cannot use the new certificate" in caplog.text, what="the refusal logged")
            assert _handshake_serial(cert, listener.port) == renewed
            live.sendall(b"and on")
            assert live.recv(100) == b"tls and on"
            live.close()
        finally:
            listener.stop(grace=1.0)


def _handshake_serial(cafile: str, port: int) -> int:
    """A new handshake's certificate serial (0 if the client does not trust it yet: the old one is served)."""
    import ssl

    from .test_tls_cli import _serial

    try:
        serial, sock = _serial(cafile, port)
    except ssl.SSLCertVerificationError:
        return 0
    sock.close()
    return serial


@pytest.mark.skipif(not os.path.exists(ACTIVATOR), reason="systemd-socket-activate is not installed")
def test_an_activated_unix_socket_is_served_by_two_workers_and_left_to_its_owner(tmp_path: Path):
    """A UNIX socket systemd bound: both workers take clients from it, and netpool does not remove its path."""
    import shutil
    import tempfile

    from .test_cli import NETPOOL

    write_app(tmp_path, "v1")
    folder = tempfile.mkdtemp(prefix="np-", dir="/tmp")  # UNIX socket paths must be short
    path = os.path.join(folder, "s.sock")
    try:
        argv = ["-l", path, "-E", "PYTHONDONTWRITEBYTECODE=1", NETPOOL, "run", "app:handler", "--framing", "line",
                "--processes", "2"]
        with server(*argv, cwd=tmp_path, argv0=[ACTIVATOR], env=FRESH_ENV) as srv:
            srv.expect(rf"Listening on {re.escape(path)}")
            pids = set()
            for _ in range(200):
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(DEADLINE)
                    sock.connect(path)
                    sock.sendall(b"who\n")
                    pids.add(int(sock.recv(100).split()[1]))
                if len(pids) == 2:
                    break
            assert len(pids) == 2, "both workers take clients from the passed socket"
            assert srv.expect(r"serving (\S+), the socket systemd passed")[1] == path
            returncode, stderr = srv.stop()
            assert returncode == 0, stderr
        assert os.path.exists(path), "the socket file belongs to whoever bound it (systemd), not to netpool"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_burst_of_sighups_reloads_in_turn_and_never_crashes(tmp_path: Path, processes: str):
    """Signals that come while a reload runs wait their turn (they once escaped the code that handles them)."""
    write_app(tmp_path, "v1")
    with server("run", "app:handler", "--port", "0", "--framing", "line", "--processes", processes, "--grace", "1",
                cwd=tmp_path, env=FRESH_ENV) as srv:
        port = int(srv.expect(r"(?:listening on|worker processes serving) 127\.0\.0\.1:(\d+)")[1])
        if processes == "2":
            await_lines(srv, {"l0": r"\[0\] listening on", "l1": r"\[1\] listening on"})
        for _ in range(5):
            srv.proc.send_signal(signal.SIGHUP)
        done = r"reload done in .*: 2 of 2 workers replaced" if processes == "2" else r"reload \d: the new listener"
        srv.expect(done, timeout=30)
        assert version_of(ask(port)) == b"v1"
        srv.proc.send_signal(signal.SIGTERM)
        srv.proc.send_signal(signal.SIGINT)  # an impatient second signal: noted, not fatal
        returncode, stderr = srv.stop(signal.SIGTERM, timeout=30)
    assert returncode == 0, stderr
    assert "Traceback" not in stderr
