"""The ``netpool`` command as a user runs it: real subprocesses, real sockets on 127.0.0.1.

Every wait has a deadline: servers are watched through their stderr lines
(read on a thread into a queue) and through socket events, never through
sleeps; every subprocess is killed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest

import netpool
from netpool import cli

from .conftest import recv_exactly, recv_until_closed, wait_for

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NETPOOL = str(BIN / "netpool")
DEADLINE = 10.0

# "echo listening on 127.0.0.1:40123 (acceptors=10, ...)" or "... on /tmp/x.sock (...)"
LISTENING = re.compile(r"(?P<name>\S+) listening on (?P<address>\S+) \((?P<settings>[^)]*)\)")
# "echo stopped after 0.1s: accepted 1, refused 0, closed 1 (server_stop 1), live 0"
STOPPED = re.compile(r"(?P<name>\S+) stopped after [\d.]+s: (?P<summary>.*)$")


# -- helpers ---------------------------------------------------------------------


class Server:
    """A netpool CLI in a subprocess; its stderr is read line by line on a thread."""

    def __init__(self, argv: list[str], *, cwd: Path, env: Optional[dict[str, str]] = None,
                 new_session: bool = False) -> None:
        self.argv = argv
        self.new_session = new_session
        self.lines: list[str] = []
        self._queue: "queue.Queue[Optional[str]]" = queue.Queue()
        self._eof = False
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=new_session,
        )
        self._reader = threading.Thread(target=self._read, name="test-cli-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        try:
            for line in self.proc.stderr:
                self._queue.put(line)
        finally:
            self._queue.put(None)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def _next_line(self, deadline: float) -> Optional[str]:
        """The next stderr line, or None at EOF or at the deadline."""
        if self._eof:
            return None
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is None:
            self._eof = True
            return None
        self.lines.append(line)
        return line

    def expect(self, pattern: "re.Pattern[str] | str", timeout: float = DEADLINE) -> "re.Match[str]":
        """Wait for a stderr line matching ``pattern``; fail at EOF or at the deadline."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while (line := self._next_line(deadline)) is not None:
            if match := regex.search(line):
                return match
        why = "stderr closed" if self._eof else f"timed out after {timeout}s"
        raise AssertionError(f"{why} waiting for /{regex.pattern}/ from {self.argv}:\n{self.stderr}")

    def listening(self, timeout: float = DEADLINE) -> "re.Match[str]":
        return self.expect(LISTENING, timeout)

    def port(self, timeout: float = DEADLINE) -> int:
        """Wait for the listening line and return the TCP port it names."""
        address = self.listening(timeout)["address"]
        return int(address.rpartition(":")[2])

    def stop(self, signum: int = signal.SIGTERM, timeout: float = DEADLINE) -> tuple[int, str]:
        """Send ``signum``, wait for the exit and the end of stderr; return (exit code, stderr)."""
        if self.new_session:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)
        deadline = time.monotonic() + timeout
        returncode = self.proc.wait(timeout=timeout)
        while self._next_line(deadline) is not None:
            pass
        assert self._eof, f"stderr of {self.argv} still open {timeout}s after the signal"
        return returncode, self.stderr

    def kill(self) -> None:
        """Last resort, from a finally: SIGKILL the process (its whole group if it has one)."""
        if self.new_session:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        elif self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=DEADLINE)
        self._reader.join(timeout=DEADLINE)
        if not self._reader.is_alive() and self.proc.stderr is not None:
            self.proc.stderr.close()


@contextlib.contextmanager
def server(*args: str, cwd: Path, argv0: Optional[list[str]] = None, env: Optional[dict[str, str]] = None,
           new_session: bool = False) -> Iterator[Server]:
    """Start ``netpool ARGS...`` (or ``argv0 + ARGS``); always killed on the way out."""
    proc = Server([*(argv0 or [NETPOOL]), *args], cwd=cwd, env=env, new_session=new_session)
    try:
        yield proc
    finally:
        proc.kill()


def run_cli(*args: str, cwd: Path, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    """Run a netpool command that should exit by itself (subprocess.run kills it at the timeout)."""
    return subprocess.run([NETPOOL, *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)


def round_trip(sock: socket.socket, payload: bytes, expected: Optional[bytes] = None) -> bytes:
    """Send ``payload`` and read back exactly as many bytes as ``expected`` (default: the payload)."""
    expected = payload if expected is None else expected
    sock.sendall(payload)
    reply = recv_exactly(sock, len(expected))
    assert reply == expected
    return reply


def assert_clean_usage_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit status 2, an ``Error:`` line naming the problem, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Error:" in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A server that cannot start: exit status 2 and nothing on stderr but one ``Error: ...`` line naming it."""
    assert_clean_usage_error(result, *needles)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- serving and stopping -----------------------------------------------------------


def test_signal_right_after_the_listening_line_still_stops_gracefully(tmp_path):
    """A SIGTERM sent the moment "listening" is logged still gets the summary and exit 0.

    Regression: the handlers used to be installed after the line was logged,
    so an early signal killed the server with no summary.
    """
    for _ in range(5):
        with server("echo", "--port", "0", cwd=tmp_path) as srv:
            srv.listening()
            returncode, stderr = srv.stop(signal.SIGTERM)
            assert returncode == 0, stderr
            assert "stopped after" in stderr and "accepted 0" in stderr, stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_echo_serves_then_stops_cleanly_with_a_summary(tmp_path: Path, signum: int) -> None:
    """`netpool echo --port 0` echoes, and SIGTERM/Ctrl-C exits 0 with a one-line summary."""
    with server("echo", "--port", "0", cwd=tmp_path) as srv:
        match = srv.listening()
        assert match["name"] == "echo"
        assert match["address"].startswith("127.0.0.1:")
        port = int(match["address"].rpartition(":")[2])
        assert port > 0
        with connect(port) as sock:
            round_trip(sock, b"hello netpool")
            # The client stays connected through the stop: it is told to quit
            # (server_stop) and sees a clean EOF.
            returncode, stderr = srv.stop(signum)
            assert recv_until_closed(sock) == b""
    assert returncode == 0, stderr
    assert f"{signal.Signals(signum).name} received: stopping" in stderr
    stopped = [m for m in map(STOPPED.search, stderr.splitlines()) if m]
    assert len(stopped) == 1, stderr
    assert stopped[0]["name"] == "echo"
    assert stopped[0]["summary"] == "accepted 1, refused 0, closed 1 (server_stop 1), live 0"
    assert "Traceback" not in stderr


def test_python_dash_m_netpool_echoes(tmp_path: Path) -> None:
    """`python -m netpool echo --port 0` is the same CLI and echoes."""
    with server("-m", "netpool", "echo", "--port", "0", cwd=tmp_path, argv0=[sys.executable]) as srv:
        with connect(srv.port()) as sock:
            round_trip(sock, b"via python -m")
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr
    assert "echo stopped after" in stderr


# -- help and usage errors ----------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["echo"], ["run"]], ids=["netpool", "echo", "run"])
def test_help_documents_every_option(tmp_path: Path, command: list[str]) -> None:
    """`--help` exits 0 and lists every flag (the ListenerConfig ones plus --config, --grace, --log-level)."""
    result = run_cli(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("Usage: netpool")
    if not command:
        for sub in ("echo", "run"):
            assert re.search(rf"^\s+{sub}\s", text, re.M), text
        return
    flags = [flag for flag, *_ in cli.LISTENER_OPTIONS]
    flags += [flag for flag, *_ in getattr(cli, "TLS_OPTIONS", [])]
    flags += ["--config", "--grace", "--log-level"]
    # Every setting has a flag, or the help names it as config-file only.
    keys = {key for _, key, *_ in cli.LISTENER_OPTIONS} | {"handler", "ssl", "on_connect", "on_close", "on_alarm"}
    keys |= {f"ssl.{key}" for _, key, *_ in cli.TLS_OPTIONS}
    for field in dataclasses.fields(netpool.ListenerConfig):
        assert field.name in keys or field.name in cli.CONFIG_FILE_ONLY, f"{field.name}: no flag, not documented"
    for field in dataclasses.fields(netpool.TLSConfig):
        name = f"ssl.{field.name}"
        assert name in keys or name in cli.CONFIG_FILE_ONLY, f"{name}: no flag, not documented"
    for name in cli.CONFIG_FILE_ONLY:
        assert name in " ".join(text.split()), f"{name} not named as config-file only in:\n{text}"
    for flag in flags:
        # An option's own entry starts its line; mentions in other help texts do not count.
        assert re.search(rf"^\s+{re.escape(flag)}(?=\s)", text, re.M), f"{flag} missing from:\n{text}"
    hook_flags = ("--on-connect", "--on-close", "--on-alarm")
    if command == ["run"]:
        assert "MODULE:HANDLER" in text
        for flag in hook_flags:
            assert re.search(rf"^\s+{flag} MODULE:FN\s", text, re.M), f"{flag} missing from:\n{text}"
    else:
        # echo's handler is fixed; the hooks belong to `run` only.
        for flag in hook_flags:
            assert flag not in text, text


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--overflow", "bogus", "--port", "0"], ["--overflow", "bogus"]),
        (["--acceptors", "0", "--port", "0"], ["--acceptors", "0"]),
        (["--port", "notanumber"], ["--port", "notanumber"]),
        (["--no-such-flag", "--port", "0"], ["No such option", "--no-such-flag"]),
        (["--unix-mode", "999", "--unix", "x.sock"], ["unix_mode", "999"]),
    ],
    ids=["overflow", "acceptors", "port", "unknown-flag", "unix-mode"],
)
def test_bad_option_is_a_usage_error(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    """A bad option value or an unknown flag exits 2 with one clear error, no traceback."""
    result = run_cli("echo", *args, cwd=tmp_path)
    assert_clean_usage_error(result, *needles)
    if "unix_mode" in needles:  # a setting netpool checks, not click: one line, without click's usage lines
        assert_one_error_line(result, *needles)


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("nosuchmodule:handler", ["cannot import module 'nosuchmodule'"]),
        ("os:nosuchattr", ["module 'os' has no attribute 'nosuchattr'"]),
        ("badspec", ["MODULE:ATTRIBUTE", "'badspec'"]),
        ("boom:handler", ["importing 'boom' raised RuntimeError: kaboom"]),
    ],
    ids=["no-module", "no-attribute", "no-colon", "raises-on-import"],
)
def test_run_with_a_bad_handler_is_a_usage_error(tmp_path: Path, spec: str, needles: list[str]) -> None:
    """`netpool run` with a handler that cannot be imported exits 2 naming the problem, no traceback."""
    (tmp_path / "boom.py").write_text('raise RuntimeError("kaboom")\n')
    assert_one_error_line(run_cli("run", spec, "--port", "0", cwd=tmp_path), "handler:", *needles)


@pytest.mark.parametrize(
    "args, toml, field, needles",
    [
        (["--on-connect", "nosuch:fn"], None, "on_connect", ["cannot import module 'nosuch'"]),
        (["--on-close", "hooks:nosuch"], None, "on_close", ["module 'hooks' has no attribute 'nosuch'"]),
        (["--on-connect", "hooks:GREETING"], None, "on_connect", ["expected a callable", "'hooks:GREETING'"]),
        ([], 'on_alarm = "nosuch:fn"\nalarm_threshold = 2\n', "on_alarm", ["cannot import module 'nosuch'"]),
    ],
    ids=["on-connect-no-module", "on-close-no-attribute", "on-connect-not-callable", "toml-on-alarm"],
)
def test_run_with_a_bad_hook_is_a_usage_error(tmp_path: Path, args: list[str], toml: Optional[str], field: str,
                                              needles: list[str]) -> None:
    """A hook that cannot be imported (flag or --config key) exits 2 with one line naming the field, no traceback."""
    (tmp_path / "hooks.py").write_text(HOOKS_MODULE)
    if toml is not None:
        (tmp_path / "listener.toml").write_text(toml)
        args = [*args, "--config", str(tmp_path / "listener.toml")]
    result = run_cli("run", "hooks:handler", "--port", "0", *args, cwd=tmp_path)
    assert_one_error_line(result, f"{field}:", *needles)
    naming = [line for line in result.stderr.splitlines() if field in line]
    assert len(naming) == 1 and naming[0].startswith(f"Error: {field}: "), result.stderr


def test_a_registered_command_that_cannot_load_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken netpool.commands entry point: naming it is a clear error; help and the other commands still work."""
    from importlib.metadata import EntryPoint

    from click.testing import CliRunner

    broken = EntryPoint(name="chat", value="no_such_module_here:command", group=cli.COMMANDS_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [broken] if group == cli.COMMANDS_GROUP else [])
    runner = CliRunner()
    listed = runner.invoke(cli.main, ["--help"])
    assert listed.exit_code == 0, listed.output
    assert re.search(r"^\s+chat\s+\(cannot be loaded: ", listed.output, re.M), listed.output
    assert runner.invoke(cli.main, ["run", "--help"]).exit_code == 0
    named = runner.invoke(cli.main, ["chat", "--port", "0"])
    assert named.exit_code == 1, named.output
    assert "the command 'chat' (no_such_module_here:command) cannot be loaded" in named.output
    assert "No module named 'no_such_module_here'" in named.output


def test_port_in_use_is_one_error_line(tmp_path: Path) -> None:
    """A port someone else listens on: exit 2 and one line saying "address already in use", no traceback."""
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        result = run_cli("echo", "--port", str(port), cwd=tmp_path)
    assert_one_error_line(result, "address already in use", f"127.0.0.1:{port}")


# -- your own handler, config files, UNIX sockets --------------------------------------


def test_run_serves_a_handler_from_the_current_directory(tmp_path: Path) -> None:
    """`netpool run mymod:handler --framing line` imports ./mymod.py and serves it."""
    (tmp_path / "mymod.py").write_text(
        "def handler(message, conn):\n"
        "    conn.send(message.upper())\n"
    )
    with server("run", "mymod:handler", "--port", "0", "--framing", "line", cwd=tmp_path) as srv:
        match = srv.listening()
        assert match["name"] == "mymod"
        assert "framing=line" in match["settings"]
        with connect(int(match["address"].rpartition(":")[2])) as sock:
            # Two lines in one write, the second split across writes: one reply per line.
            sock.sendall(b"hello\r\nwor")
            round_trip(sock, b"ld\n", expected=b"HELLO\nWORLD\n")
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr


def test_config_file_settings_take_effect(tmp_path: Path) -> None:
    """`--config FILE.toml` sets the name, framing and a max_connections=1 limit that refuses a 2nd client."""
    config = tmp_path / "listener.toml"
    config.write_text(
        'name = "fromfile"\n'
        'framing = "line"\n'
        "max_connections = 1\n"
        'overflow = "refuse"\n'
        'refuse_message = "busy\\n"\n'
    )
    with server("echo", "--port", "0", "--config", str(config), cwd=tmp_path) as srv:
        match = srv.listening()
        assert match["name"] == "fromfile"
        assert "max_connections=1," in match["settings"]
        assert "overflow=refuse" in match["settings"]
        assert "framing=line" in match["settings"]
        port = int(match["address"].rpartition(":")[2])
        with connect(port) as first:
            round_trip(first, b"one\n")
            with connect(port) as second:
                # The server accepts, says "busy" and closes the newcomer.
                assert recv_until_closed(second) == b"busy\n"
            round_trip(first, b"still here\n")
            returncode, stderr = srv.stop()
    assert returncode == 0, stderr
    assert re.search(r"fromfile stopped after [\d.]+s: accepted 2, refused 1 \(limit 1\), closed 1 ", stderr), stderr


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    """A flag given on the command line beats the same key in --config; other file keys still apply."""
    config = tmp_path / "listener.toml"
    config.write_text('name = "fromfile"\nframing = "line"\nmax_connections = 1\n')
    with server("echo", "--port", "0", "--config", str(config), "--name", "fromflag",
                "--max-connections", "7", cwd=tmp_path) as srv:
        match = srv.listening()
        assert match["name"] == "fromflag"
        assert "max_connections=7," in match["settings"]
        assert "framing=line" in match["settings"]
        with connect(int(match["address"].rpartition(":")[2])) as sock:
            round_trip(sock, b"a\nb\n")
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr


HOOKS_MODULE = """\
from pathlib import Path

CLOSED = Path(__file__).with_name("closed.txt")
GREETING = b"welcome"  # --framing line: send() adds the newline


def handler(message, conn):
    conn.send(message)


def joined(conn):
    conn.send(GREETING)


def joined_from_the_flag(conn):
    conn.send(b"hello from the flag")


def left(conn, reason):
    with CLOSED.open("a") as fh:
        fh.write(reason + "\\n")
"""


def serve_with_hooks(tmp_path: Path, *args: str, greeting: bytes = b"welcome\n") -> str:
    """`netpool run hooks:handler ARGS...`: a client sees ``greeting`` first, is echoed, closes; on_close logs eof.

    Returns the server's stderr after a clean SIGTERM.
    """
    (tmp_path / "hooks.py").write_text(HOOKS_MODULE)
    closed = tmp_path / "closed.txt"
    with server("run", "hooks:handler", "--port", "0", "--framing", "line", *args, cwd=tmp_path) as srv:
        with connect(srv.port()) as sock:
            assert recv_exactly(sock, len(greeting)) == greeting
            round_trip(sock, b"ping\n")
            assert not closed.exists(), "on_close ran while the client was still connected"
        # The client closed cleanly: on_close(conn, "eof") runs once, in the server process.
        wait_for(lambda: closed.exists() and closed.read_text() == "eof\n", what="on_close to write eof")
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr
    assert re.search(r"hooks stopped after [\d.]+s: accepted 1, refused 0, closed 1 \(eof 1\)", stderr), stderr
    assert closed.read_text() == "eof\n", "on_close ran more than once"
    return stderr


def test_run_hooks_from_flags(tmp_path: Path) -> None:
    """`--on-connect MODULE:FN --on-close MODULE:FN` import the hooks: a greeting first, the close reason after."""
    serve_with_hooks(tmp_path, "--on-connect", "hooks:joined", "--on-close", "hooks:left")


def test_run_hooks_from_the_config_file(tmp_path: Path) -> None:
    """on_connect/on_close as "module:attr" strings in --config work as the flags do."""
    config = tmp_path / "listener.toml"
    config.write_text('on_connect = "hooks:joined"\non_close = "hooks:left"\n')
    serve_with_hooks(tmp_path, "--config", str(config))


def test_hook_flag_overrides_the_config_file(tmp_path: Path) -> None:
    """--on-connect beats on_connect in --config (whose own spec is never imported); on_close still comes from the file."""
    config = tmp_path / "listener.toml"
    config.write_text('on_connect = "nosuch:fn"\non_close = "hooks:left"\n')
    serve_with_hooks(tmp_path, "--config", str(config), "--on-connect", "hooks:joined_from_the_flag",
                     greeting=b"hello from the flag\n")


def test_unknown_key_in_config_file_is_a_usage_error(tmp_path: Path) -> None:
    """An unknown key in --config exits 2 naming the key and the file, no traceback."""
    config = tmp_path / "listener.toml"
    config.write_text('framing = "line"\nmax_conections = 5\n')
    result = run_cli("echo", "--port", "0", "--config", str(config), cwd=tmp_path)
    assert_clean_usage_error(result, "max_conections", str(config))


def test_unix_socket_with_mode_and_cleanup(tmp_path: Path) -> None:
    """`--unix PATH --unix-mode 600` echoes over the socket, which is mode 0600 and removed on SIGTERM."""
    path = tmp_path / "echo.sock"
    assert len(str(path)) < 100, "AF_UNIX paths are limited to 107 bytes"
    with server("echo", "--unix", str(path), "--unix-mode", "600", cwd=tmp_path) as srv:
        assert srv.listening()["address"] == str(path)
        mode = os.lstat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(DEADLINE)
            sock.connect(str(path))
            round_trip(sock, b"over a unix socket")
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr
    assert not path.exists()


# -- the Makefile and an installed package ---------------------------------------------


def test_make_run_serves_the_echo_example() -> None:
    """`make run PORT=...` (the README's first command) serves the echo example on that port."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "HOST")}
    # If the venv stamp is out of date, `make run` reinstalls first: allow for it.
    stale = subprocess.run(["make", "-q", ".venv/.installed"], cwd=ROOT, env=env,
                           capture_output=True, timeout=DEADLINE).returncode != 0
    with server("run", f"PORT={port}", cwd=ROOT, argv0=["make"], env=env, new_session=True) as srv:
        match = srv.listening(timeout=300 if stale else DEADLINE)
        assert match["address"] == f"127.0.0.1:{port}"
        with connect(port) as sock:
            round_trip(sock, b"made it")
        # SIGTERM to the whole group (make and netpool), as a terminal's Ctrl-C would.
        _returncode, stderr = srv.stop()
    assert re.search(r"echo stopped after [\d.]+s: accepted 1,", stderr), stderr


INSTALLED_SERVER = """\
import sys
import netpool
import netpool.examples.echo.handler as example
print("netpool-file", netpool.__file__, file=sys.stderr, flush=True)
print("example-file", example.__file__, file=sys.stderr, flush=True)
from netpool.cli import main
main()
"""


def install_wheel(tmp_path: Path) -> tuple[Path, Path]:
    """Build a wheel and install it (no editable links) into tmp_path/site; returns (site, an empty cwd)."""
    # Build from a copy of the sources: an in-tree build would leave build/ and
    # *.egg-info in the checkout, and a stale build/ can leak into later wheels.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "tests"))
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=120)
    (wheel,) = wheels.glob("netpool-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=60)
    return site, elsewhere


@pytest.mark.timeout(180)
def test_installed_wheel_serves_echo_and_finds_the_example_commands(tmp_path: Path) -> None:
    """A plain (non-editable) install of the wheel serves `netpool echo` from its own files, examples included.

    `netpool xmpp` comes from the wheel's entry points (netpool.commands),
    not from an import in netpool itself.
    """
    site, elsewhere = install_wheel(tmp_path)
    assert (site / "netpool" / "examples" / "echo" / "handler.py").is_file()
    assert (site / "netpool" / "examples" / "echo" / "README.md").is_file(), "package_data README.md not installed"
    assert (site / "netpool" / "py.typed").is_file(), "type checkers would not read netpool's annotations"
    (dist_info,) = site.glob("netpool-*.dist-info")
    assert "MIT License" in "".join(p.read_text() for p in dist_info.rglob("LICENSE*")), "no LICENSE in the wheel"

    env = {**os.environ, "PYTHONPATH": str(site)}
    with server("-c", INSTALLED_SERVER, "echo", "--port", "0", cwd=elsewhere, env=env,
                argv0=[sys.executable]) as srv:
        netpool_file = Path(srv.expect(r"^netpool-file (.*)$")[1])
        example_file = Path(srv.expect(r"^example-file (.*)$")[1])
        assert netpool_file.is_relative_to(site), netpool_file
        assert example_file == site / "netpool" / "examples" / "echo" / "handler.py"
        with connect(srv.port()) as sock:
            round_trip(sock, b"from the wheel")
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr
    assert "echo stopped after" in stderr

    xmpp = subprocess.run([sys.executable, "-c", "from netpool.cli import main; main()", "xmpp", "--help"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert xmpp.returncode == 0, xmpp.stderr
    assert "XMPP example" in xmpp.stdout and "--domain" in xmpp.stdout


def test_the_xmpp_help_shows_only_what_it_accepts_with_its_own_defaults(tmp_path: Path) -> None:
    """`netpool xmpp --help` leaves out --framing (always raw there) and shows its own defaults, not echo's."""
    text = run_cli("xmpp", "--help", cwd=tmp_path).stdout
    flat = " ".join(text.split())  # help text wraps anywhere
    assert not re.search(r"^\s+--framing\s", text, re.M), text
    assert "[default: echo, or MODULE for run]" not in flat
    assert re.search(r"--name TEXT .*?\[default: xmpp\]", flat), flat
    assert re.search(r"--port INTEGER RANGE .*?\[default: 5222\]", flat), flat
    assert re.search(r"--tls-mode \[implicit\|starttls\] .*?\[default: starttls\]", flat), flat
    refused = run_cli("xmpp", "--framing", "line", cwd=tmp_path)
    assert refused.returncode == 2 and "No such option '--framing'" in refused.stderr
