"""glibc malloc's arenas, capped in a server process that the CLI runs.

glibc gives threads malloc arenas of their own (up to eight per core), so
that threads allocating at once do not wait on one lock. In CPython almost
every allocation is made holding the interpreter lock, so that buys little;
and a thread-mode server's threads come and go (handler threads, a loop's
next owner), each arena keeping what was freed in it for the threads that
use it. In an hour's soak (bench/soak.py) memory in use stayed flat while
memory held free in the arenas grew (+1.8 MB an hour); with two arenas the
free memory stayed at about 2 MB.

``cap_arenas`` sets M_ARENA_MAX through ``mallopt``; the CLI (``netpool
run``, ``netpool echo``) and ``netpool.serve()``, which own their process,
call it at start, before any thread. ``start_listener`` does not: a library
leaves its host's allocator alone (a program can call this itself, or set
the environment variable). ``MALLOC_ARENA_MAX`` in the environment wins
over it. Without glibc (musl, macOS) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = ["ARENAS", "cap_arenas"]

log = logging.getLogger("netpool.malloc_arenas")

ARENAS = 2
_M_ARENA_MAX = -8  # glibc's malloc.h


def cap_arenas(arenas: int = ARENAS) -> bool:
    """Let glibc's malloc use at most ``arenas`` arenas; whether it was done (not if MALLOC_ARENA_MAX is set)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False  # the operator's own choice
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not mallopt(_M_ARENA_MAX, arenas):
        return False
    log.debug("glibc malloc: at most %d arenas (MALLOC_ARENA_MAX overrides)", arenas)
    return True
