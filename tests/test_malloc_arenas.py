"""netpool run caps glibc's malloc arenas; MALLOC_ARENA_MAX, when set, is the operator's.

The arenas are counted as glibc reports them (malloc_info's <heap> entries),
in a real ``netpool run`` process whose handler starts threads that each
allocate, as a thread-mode server's threads do.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from netpool.malloc_arenas import ARENAS

from .conftest import recv_exactly
from .test_cli import connect, server

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="M_ARENA_MAX is glibc's")

THREADS = 12

# A handler that answers "arenas" with how many arenas glibc has once THREADS
# threads, alive at the same time, have each allocated blocks past pymalloc's
# 512 bytes (which go to the thread's arena).
HANDLER = f"""
import ctypes, re, threading

libc = ctypes.CDLL(None)
libc.open_memstream.restype = ctypes.c_void_p
libc.open_memstream.argtypes = (ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t))
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
libc.free.argtypes = (ctypes.c_void_p,)


def arenas():
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    xml = ctypes.string_at(buf, size.value).decode()
    libc.free(buf)
    return len(re.findall(r'<heap nr="', xml))


def handler(message, conn):
    barrier = threading.Barrier({THREADS} + 1, timeout=10)
    kept = []

    def allocate():
        kept.append([bytes(4000 + i) for i in range(50)])
        barrier.wait()  # all alive at once: none hands its arena to the next
        barrier.wait()

    threads = [threading.Thread(target=allocate) for _ in range({THREADS})]
    for t in threads:
        t.start()
    barrier.wait()
    count = arenas()
    barrier.wait()
    for t in threads:
        t.join(10)
    conn.send(str(count).encode())
"""


def arenas_in_netpool_run(tmp_path: Path, env_arenas: Optional[str]) -> int:
    (tmp_path / "arenas_handler.py").write_text(HANDLER)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if env_arenas is not None:
        env["MALLOC_ARENA_MAX"] = env_arenas
    with server("run", "arenas_handler:handler", "--port", "0", "--framing", "line", cwd=tmp_path, env=env) as srv:
        with connect(srv.port()) as sock:
            sock.sendall(b"arenas\n")
            reply = b""
            while not reply.endswith(b"\n"):
                reply += recv_exactly(sock, 1)
        returncode, stderr = srv.stop()
    assert returncode == 0, stderr
    return int(reply)


def test_netpool_run_keeps_its_threads_to_two_malloc_arenas(tmp_path: Path) -> None:
    assert arenas_in_netpool_run(tmp_path, None) <= ARENAS


def test_malloc_arena_max_in_the_environment_wins(tmp_path: Path) -> None:
    # 12 threads on a machine with 2 or more cores have more than 2 arenas
    # when nothing caps them: this is also the check that the count above
    # could have come out higher.
    assert arenas_in_netpool_run(tmp_path, "64") > ARENAS


def test_the_cap_is_left_alone_where_malloc_arena_max_is_set() -> None:
    code = "from netpool.malloc_arenas import cap_arenas; print(cap_arenas())"
    env = {**os.environ, "MALLOC_ARENA_MAX": "8"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "False"
    env.pop("MALLOC_ARENA_MAX")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "True"
