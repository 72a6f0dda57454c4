"""systemd socket activation, taken from a real systemd-socket-activate and from descriptors set up by hand.

The end-to-end tests run ``systemd-socket-activate`` (it needs no systemd as
PID 1): it binds the sockets, and at the first connection execs a small
Python child that calls netpool.socket_activation, reports what it got as one
JSON line, then accepts one connection on the socket it chose and echoes a
line. The unit tests put a datagram socket, a pipe or a connected socket at
fd 3 of a child process (pass_fds + dup2) to see each refusal, and read the
environment variables in-process where no descriptor is touched.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from netpool import socket_activation as sa
from netpool.errors import ListenError

DEADLINE = 10.0
ROOT = Path(__file__).resolve().parent.parent
ACTIVATOR = "/usr/bin/systemd-socket-activate"
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

needs_activator = pytest.mark.skipif(not os.access(ACTIVATOR, os.X_OK), reason=f"{ACTIVATOR} is not installed")

# What a process started by the activated child sees: the LISTEN_* variables
# and whether the listening descriptors (argv) leaked into it.
GRANDCHILD = r"""
import json, os, sys
def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
print(json.dumps({"env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
                  "open": [fd for fd in map(int, sys.argv[1:]) if is_open(fd)]}))
"""

# The service systemd-socket-activate execs. argv[1]: JSON with the
# configured address (host, port, unix) and whether to ask for names.
CHILD = r"""
import json, os, socket, subprocess, sys
from netpool import socket_activation as sa

want = json.loads(sys.argv[1])
KEYS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
report = {"pid": os.getpid(), "before": {k: os.environ.get(k) for k in KEYS}}
try:
    if want["names"]:
        activated = sa.activated_sockets()
        socks = [a.sock for a in activated]
        report["names"] = [a.name for a in activated]
        report["address_texts"] = [a.address_text for a in activated]
    else:
        socks = sa.inherited_sockets()
    report["after"] = {k: os.environ.get(k) for k in KEYS}
    report["sockets"] = [{
        "fd": s.fileno(),
        "family": s.family.name,
        "type": s.type.name,
        "address": sa.describe(s),
        "inheritable": os.get_inheritable(s.fileno()),
        "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
    } for s in socks]
    # close_fds=False: only close-on-exec keeps the sockets from a child.
    grandchild = subprocess.run([sys.executable, "-c", want["grandchild"], *[str(s.fileno()) for s in socks]],
                                close_fds=False, capture_output=True, text=True, timeout=10)
    report["grandchild"] = json.loads(grandchild.stdout)
    chosen = sa.choose_socket(socks, host=want["host"], port=want["port"], unix=want["unix"])
    report["chosen"] = sa.describe(chosen)
except sa.SocketActivationError as exc:
    report["error"] = str(exc)
    print(json.dumps(report), flush=True)
    sys.exit(3)
print(json.dumps(report), flush=True)
chosen.settimeout(10)
conn, _ = chosen.accept()
with conn:
    conn.settimeout(10)
    line = conn.makefile("rb").readline()
    conn.sendall(b"echo: " + line)
"""


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without LISTEN_* (the activator passes those on), netpool importable."""
    env = {k: v for k, v in os.environ.items() if k not in LISTEN_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _two_free_ports() -> tuple[int, int]:
    """Two different free ports (both bound at once, so the kernel cannot hand out the same one twice)."""
    with socket.socket() as one, socket.socket() as two:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        return one.getsockname()[1], two.getsockname()[1]


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a UNIX socket path must fit in 108 bytes, pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="np-sa-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Activator:
    """A running systemd-socket-activate; its child is exec'd (same PID) at the first connection."""

    def __init__(self, listen: list[str], fdnames: Optional[str], want: dict[str, Any]) -> None:
        args = [ACTIVATOR]
        for address in listen:
            args += ["-l", address]
        if fdnames is not None:
            args.append(f"--fdname={fdnames}")
        want = {"host": "127.0.0.1", "port": 0, "unix": None, "names": False, **want, "grandchild": GRANDCHILD}
        args += [sys.executable, "-c", CHILD, json.dumps(want)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_clean_env())
        self.stderr = b""
        self._wait_listening(len(listen))

    def _wait_listening(self, count: int) -> None:
        """Until the activator logged "Listening on ..." for every address (its stderr, within the deadline)."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + DEADLINE
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while self.stderr.count(b"Listening on") < count:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise AssertionError(f"activator not listening within {DEADLINE}s: {self.stderr!r}")
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise AssertionError(f"activator exited ({self.proc.wait(DEADLINE)}): {self.stderr!r}")
                self.stderr += chunk

    def finish(self) -> tuple[int, dict[str, Any], str]:
        """(exit status, the child's JSON report, stderr) once the child is done."""
        out, err = self.proc.communicate(timeout=DEADLINE)
        stderr = (self.stderr + err).decode(errors="replace")
        lines = out.decode().splitlines()
        assert lines, f"the activated child printed nothing; stderr: {stderr}"
        return self.proc.returncode, json.loads(lines[0]), stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=DEADLINE)


@pytest.fixture
def activate() -> Iterator[Any]:
    started: list[Activator] = []

    def start(listen: list[str], want: dict[str, Any], fdnames: Optional[str] = None) -> Activator:
        started.append(Activator(listen, fdnames, want))
        return started[-1]

    try:
        yield start
    finally:
        for activator in started:
            activator.kill()


def _echo(address: Any) -> bytes:
    """Connect (waking the activator), send one line, return the reply line."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(DEADLINE)
        client.connect(address)
        client.sendall(b"hello\n")
        return client.makefile("rb").readline()


def _assert_clean_handover(report: dict[str, Any], fds: list[int], names: Optional[str] = None) -> None:
    """The facts every activation must show: our PID, the variables gone, nothing leaked to a child."""
    assert report["before"] == {"LISTEN_PID": str(report["pid"]), "LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": names}
    assert report["after"] == {key: None for key in LISTEN_VARS}
    assert [s["fd"] for s in report["sockets"]] == fds
    assert all(s["type"] == "SOCK_STREAM" and s["listening"] == 1 and not s["inheritable"]
               for s in report["sockets"]), report["sockets"]
    assert report["grandchild"] == {"env": {key: None for key in LISTEN_VARS}, "open": []}


# -- end to end: systemd-socket-activate ---------------------------------------------


@needs_activator
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_one_tcp_socket_is_served_whatever_the_config_says(activate, host):
    if host == "::1" and not _ipv6_loopback():
        pytest.skip("::1 is not configured on this machine")
    port = _free_port(host)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # The config names another port: with one socket, the unit decides.
    activator = activate([listen], {"host": "127.0.0.1", "port": 1})
    assert _echo((host, port)) == b"echo: hello\n"
    status, report, stderr = activator.finish()
    assert status == 0, stderr
    _assert_clean_handover(report, [3])
    assert report["sockets"][0]["family"] == ("AF_INET6" if ":" in host else "AF_INET")
    assert report["sockets"][0]["address"] == report["chosen"] == listen


@needs_activator
def test_a_unix_socket(activate, short_dir):
    path = str(short_dir / "s.sock")
    activator = activate([path], {"unix": path})
    assert _echo(path) == b"echo: hello\n"
    status, report, stderr = activator.finish()
    assert status == 0, stderr
    _assert_clean_handover(report, [3])
    assert report["sockets"][0]["family"] == "AF_UNIX"
    assert report["sockets"][0]["address"] == report["chosen"] == path


@needs_activator
def test_of_two_tcp_sockets_the_configured_port_is_chosen(activate):
    first, second = _two_free_ports()
    activator = activate([f"127.0.0.1:{first}", f"127.0.0.1:{second}"], {"host": "127.0.0.1", "port": second})
    assert _echo(("127.0.0.1", second)) == b"echo: hello\n"
    status, report, stderr = activator.finish()
    assert status == 0, stderr
    _assert_clean_handover(report, [3, 4])
    assert [s["address"] for s in report["sockets"]] == [f"127.0.0.1:{first}", f"127.0.0.1:{second}"]
    assert report["chosen"] == f"127.0.0.1:{second}"


@needs_activator
def test_names_from_fdname_and_a_unix_path_chosen_among_tcp_and_unix(activate, short_dir):
    port = _free_port()
    path = str(short_dir / "s.sock")
    activator = activate([f"127.0.0.1:{port}", path], {"unix": path, "names": True}, fdnames="web:local")
    assert _echo(path) == b"echo: hello\n"
    status, report, stderr = activator.finish()
    assert status == 0, stderr
    _assert_clean_handover(report, [3, 4], names="web:local")
    assert report["names"] == ["web", "local"]
    assert report["address_texts"] == [f"127.0.0.1:{port}", path]
    assert [s["family"] for s in report["sockets"]] == ["AF_INET", "AF_UNIX"]
    assert report["chosen"] == path


@needs_activator
def test_no_passed_socket_matching_the_config_is_an_error_listing_both(activate):
    first, second = _two_free_ports()
    activator = activate([f"127.0.0.1:{first}", f"127.0.0.1:{second}"], {"host": "127.0.0.1", "port": 1})
    with socket.create_connection(("127.0.0.1", first), timeout=DEADLINE):  # wakes the activator; never accepted
        status, report, stderr = activator.finish()
    assert status == 3, stderr
    error = report["error"]
    assert f"127.0.0.1:{first} (fd 3)" in error and f"127.0.0.1:{second} (fd 4)" in error, error
    assert "configured 127.0.0.1:1" in error, error


# -- descriptors set up by hand in a child process -------------------------------------


def _run_at_fd3(source: Optional[socket.socket | int], code: str, *, listen_fds: str = "1") -> dict[str, Any]:
    """Run ``code`` in a child whose fd 3 is ``source`` (and fds above it closed), LISTEN_* set for it.

    ``code`` sees ``sa`` and ``report`` (a dict printed as JSON at the end).
    """
    fd = source if isinstance(source, int) or source is None else source.fileno()
    setup = (f"os.dup2({fd}, 3)\nos.closerange(4, 1024)\n" if fd is not None and fd != 3
             else "os.closerange(3, 1024)\n" if fd is None else "os.closerange(4, 1024)\n")
    script = (
        "import json, os, socket\n"
        + setup
        + "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        + f"os.environ['LISTEN_FDS'] = {listen_fds!r}\n"
        + "from netpool import socket_activation as sa\n"
        + "report = {}\n"
        + code
        + "\nprint(json.dumps(report))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], pass_fds=() if fd is None else (fd,),
                            capture_output=True, text=True, timeout=DEADLINE, env=_clean_env())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# The refusal, and what became of fd 3 and the variables afterwards.
REFUSE = """
try:
    sa.inherited_sockets()
except sa.SocketActivationError as exc:
    report["error"] = str(exc)
try:
    os.fstat(3)
    report["fd3_open"] = True
except OSError:
    report["fd3_open"] = False
report["env"] = [os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS")]
"""


def test_a_datagram_socket_at_fd_3_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dgram:
        dgram.bind(("127.0.0.1", 0))
        report = _run_at_fd3(dgram, REFUSE)
    assert report["error"] == ("fd 3 is a datagram socket; netpool serves stream sockets: "
                               "use ListenStream= in the .socket unit")
    # Refused, not closed: a caller falling back still finds its descriptors as they were.
    assert report["fd3_open"] is True
    assert report["env"] == [None, None]


def test_a_connected_stream_socket_at_fd_3_asks_for_accept_no():
    left, right = socket.socketpair()
    with left, right:
        report = _run_at_fd3(left, REFUSE)
    assert report["error"].startswith("fd 3 is a stream socket that is not listening"), report
    assert "set Accept=no in the .socket unit" in report["error"]


def test_a_pipe_at_fd_3_is_not_a_socket():
    read_end, write_end = os.pipe()
    try:
        report = _run_at_fd3(read_end, REFUSE)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert report["error"].startswith("fd 3 is a FIFO (ListenFIFO=), not a socket"), report
    assert "ListenStream=" in report["error"]


def test_more_sockets_counted_than_passed_names_the_missing_fd():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        report = _run_at_fd3(listening, REFUSE, listen_fds="2")
    assert report["error"].startswith("fd 4 is not open, yet LISTEN_FDS counts it"), report
    assert report["fd3_open"] is True  # fd 3 was fine; it is left open, not closed with the failure


def test_a_listening_socket_at_fd_3_is_taken_close_on_exec_and_keeps_its_nonblocking_mode():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        listening.setblocking(False)  # as systemd may pass it: O_NONBLOCK on the shared file description
        os.set_inheritable(listening.fileno(), True)
        report = _run_at_fd3(listening, """
socks = sa.inherited_sockets()
report["sockets"] = [(s.fileno(), sa.describe(s), s.gettimeout(), os.get_inheritable(s.fileno())) for s in socks]
""")
        address = sa.describe(listening)
    assert report["sockets"] == [[3, address, 0.0, False]]


# -- the environment, read in-process (no descriptor is touched) -------------------------


@pytest.fixture
def listen_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in LISTEN_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_no_variables_means_no_sockets(listen_env):
    assert sa.inherited_sockets() == []
    assert sa.activated_sockets() == []


def test_variables_for_another_process_are_ignored_and_forgotten(listen_env):
    listen_env.setenv("LISTEN_PID", str(os.getppid()))
    listen_env.setenv("LISTEN_FDS", "1")
    assert sa.inherited_sockets(unset_environment=False) == []
    assert os.environ["LISTEN_PID"] == str(os.getppid())  # kept when asked to
    listen_env.setenv("LISTEN_FDNAMES", "web")
    assert sa.inherited_sockets() == []
    assert not any(key in os.environ for key in LISTEN_VARS)


def test_zero_sockets_for_this_process_is_none(listen_env):
    listen_env.setenv("LISTEN_PID", str(os.getpid()))
    listen_env.setenv("LISTEN_FDS", "0")
    assert sa.inherited_sockets() == []


@pytest.mark.parametrize("key, value", [
    ("LISTEN_FDS", "two"), ("LISTEN_FDS", "-1"), ("LISTEN_FDS", ""), ("LISTEN_FDS", " 1"), ("LISTEN_FDS", "1.0"),
    ("LISTEN_PID", "self"), ("LISTEN_PID", "-5"), ("LISTEN_PID", "0"),
])
def test_malformed_values_raise_and_are_still_forgotten(listen_env, key, value):
    listen_env.setenv("LISTEN_PID", str(os.getpid()))
    listen_env.setenv("LISTEN_FDS", "1")
    listen_env.setenv(key, value)
    with pytest.raises(sa.SocketActivationError) as raised:
        sa.inherited_sockets()
    assert f"{key}=" in str(raised.value)
    assert not any(k in os.environ for k in LISTEN_VARS)
    assert isinstance(raised.value, ListenError) and isinstance(raised.value, OSError)


def test_names_must_be_one_per_socket(listen_env):
    listen_env.setenv("LISTEN_PID", str(os.getpid()))
    listen_env.setenv("LISTEN_FDS", "2")
    listen_env.setenv("LISTEN_FDNAMES", "web")
    with pytest.raises(sa.SocketActivationError, match="LISTEN_FDNAMES has 1 names .* for LISTEN_FDS=2"):
        sa.activated_sockets()


# -- choose_socket and describe, on sockets bound here -----------------------------------


@pytest.fixture
def bound() -> Iterator[Any]:
    opened: list[socket.socket] = []

    def bind(family: int, address: Any) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        opened.append(sock)
        sock.bind(address)
        sock.listen()
        return sock

    try:
        yield bind
    finally:
        for sock in opened:
            sock.close()


def test_describe(bound, short_dir):
    assert sa.describe(bound(socket.AF_INET, ("127.0.0.1", 0))).startswith("127.0.0.1:")
    path = str(short_dir / "d.sock")
    assert sa.describe(bound(socket.AF_UNIX, path)) == path
    name = f"netpool-sa-{os.getpid()}-{time.monotonic_ns()}"
    assert sa.describe(bound(socket.AF_UNIX, "\0" + name)) == "@" + name
    if _ipv6_loopback():
        v6 = bound(socket.AF_INET6, ("::1", 0))
        assert sa.describe(v6) == f"[::1]:{v6.getsockname()[1]}"


def test_choose_socket(bound, short_dir, monkeypatch):
    tcp_a = bound(socket.AF_INET, ("127.0.0.1", 0))
    tcp_b = bound(socket.AF_INET, ("127.0.0.1", 0))
    path = str(short_dir / "c.sock")
    unix = bound(socket.AF_UNIX, path)
    port_b = tcp_b.getsockname()[1]
    every = [tcp_a, tcp_b, unix]

    assert sa.choose_socket([unix], host="127.0.0.1", port=9, unix=None) is unix  # one: whatever the config says
    assert sa.choose_socket(every, host="127.0.0.1", port=port_b, unix=None) is tcp_b
    assert sa.choose_socket(every, host="localhost", port=port_b, unix=None) is tcp_b
    assert sa.choose_socket(every, host="0.0.0.0", port=port_b, unix=None) is tcp_b  # wildcard host: family only
    assert sa.choose_socket([tcp_a, unix], host="", port=0, unix=None) is tcp_a  # port 0: any port
    assert sa.choose_socket(every, host="127.0.0.1", port=0, unix=path) is unix
    monkeypatch.chdir(short_dir)
    assert sa.choose_socket(every, host="127.0.0.1", port=0, unix="c.sock") is unix  # relative to the cwd

    with pytest.raises(sa.SocketActivationError, match=r"2 of them match the configured 127\.0\.0\.1:0"):
        sa.choose_socket(every, host="127.0.0.1", port=0, unix=None)
    with pytest.raises(sa.SocketActivationError, match=r"none is the configured \[::\]:" + str(port_b)):
        sa.choose_socket(every, host="::", port=port_b, unix=None)  # an IPv6 wildcard: not an IPv4 socket
    with pytest.raises(sa.SocketActivationError) as raised:
        sa.choose_socket(every, host="127.0.0.1", port=0, unix="/nowhere.sock")
    assert f"{path} (fd {unix.fileno()})" in str(raised.value) and "/nowhere.sock" in str(raised.value)
    with pytest.raises(sa.SocketActivationError, match="no sockets"):
        sa.choose_socket([], host="127.0.0.1", port=0, unix=None)


def test_a_socket_bound_to_every_interface_does_not_match_a_specific_host(bound):
    everywhere = bound(socket.AF_INET, ("0.0.0.0", 0))
    other = bound(socket.AF_INET, ("127.0.0.1", 0))
    port = everywhere.getsockname()[1]
    with pytest.raises(sa.SocketActivationError, match="none is the configured"):
        sa.choose_socket([everywhere, other], host="127.0.0.1", port=port, unix=None)
    assert sa.choose_socket([everywhere, other], host="0.0.0.0", port=port, unix=None) is everywhere
