"""The soak server's handler: line echo, STARTTLS, a flood on request, and INFO, TRACEMALLOC, MALLOC and CENSUS lines."""

import collections
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import tracemalloc

# Where memory went, by allocation site (file:line of the innermost frame).
TOP_SITES = 12
_baseline = None


def _site(stat) -> dict:
    frame = stat.traceback[0]
    size, count = (stat.size_diff, stat.count_diff) if hasattr(stat, "size_diff") else (stat.size, stat.count)
    return {"site": f"{frame.filename}:{frame.lineno}", "kib": round(size / 1024, 1), "blocks": count}


def memory_report(command: bytes) -> bytes:
    """Answer a TRACEMALLOC control line (the server traces from its start: PYTHONTRACEMALLOC=1).

    MEM: traced memory and tracemalloc's own (which counts in the RSS);
    START: the largest allocation sites now, kept as the baseline (the
    warm-up is over); TOP: the largest now, and what grew most since START.
    """
    global _baseline
    if not tracemalloc.is_tracing():  # PYTHONTRACEMALLOC=1 (bench/soak.py) traces from the start
        return b'{"error": "not tracing: start the server with PYTHONTRACEMALLOC=1"}'
    memory = {"traced_kib": round(tracemalloc.get_traced_memory()[0] / 1024, 1),
              "overhead_kib": round(tracemalloc.get_tracemalloc_memory() / 1024, 1)}
    if command == b"TRACEMALLOC MEM":
        return json.dumps(memory).encode()
    snapshot = tracemalloc.take_snapshot()
    if command == b"TRACEMALLOC START":
        _baseline = snapshot
    largest = [_site(s) for s in snapshot.statistics("lineno")[:TOP_SITES]]
    if _baseline is None or command == b"TRACEMALLOC START":
        return json.dumps({**memory, "largest": largest, "grown": []}).encode()
    grown = [d for d in snapshot.compare_to(_baseline, "lineno") if d.size_diff > 0]
    return json.dumps({**memory, "largest": largest, "grown": [_site(d) for d in grown[:TOP_SITES]]}).encode()


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _malloc_census() -> dict:
    """glibc's own account (mallinfo2, summed over its arenas), in KiB: memory tracemalloc cannot see.

    ``in_use`` is what C code (OpenSSL, the interpreter's own raw
    allocations) holds now; ``free`` is what malloc keeps but nobody uses
    (fragmentation, or a peak not yet given back); ``mmapped`` is large
    blocks. A leak grows ``in_use``; fragmentation grows ``free``.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):  # not glibc, or one before 2.33
        return {}
    info = libc.mallinfo2()
    return {"heap": info.arena // 1024, "in_use": info.uordblks // 1024, "free": info.fordblks // 1024,
            "mmapped": info.hblkhd // 1024}


def _rss_by_kind() -> dict:
    """The process's resident memory by kind of mapping (/proc/self/smaps), in KiB.

    What tracemalloc and mallinfo cannot tell apart: glibc's main heap,
    the heaps of its per-thread arenas (64 MiB reservations, mapped in
    part), the interpreter's own 1 MiB object arenas (pymalloc), thread
    stacks, and file-backed pages (code, shared libraries).

    Told apart by size, so only roughly: the kernel merges neighbouring
    anonymous mappings, and arenas mapped side by side then show as one
    mapping of another size, counted under "thread heaps and other". (The
    20 MB a tracemalloc snapshot leaves in the RSS showed there in one run,
    and under three kinds in another.)
    """
    kinds: collections.Counter = collections.Counter()
    kind = "other"
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's header line
                start, end = (int(x, 16) for x in head[0].split("-"))
                size, path = (end - start) // 1024, head[5] if len(head) > 5 else ""
                if path == "[heap]":
                    kind = "main heap"
                elif path.startswith("/"):
                    kind = "files"
                elif path:
                    kind = "other"
                elif size == 1024:
                    kind = "pymalloc arenas"
                elif 8192 <= size <= 8200:
                    kind = "thread stacks"
                else:
                    kind = "thread heaps and other"
            elif head[0] == "Rss:":
                kinds[kind] += int(head[1])
    return dict(kinds)


def malloc_report() -> bytes:
    """Answer MALLOC: malloc's account and the RSS by kind, without the object census (cheap enough for every sample)."""
    return json.dumps({"malloc": _malloc_census(), "rss": _rss_by_kind()}).encode()


def census() -> bytes:
    """Answer CENSUS: live objects by type (the collector's view) and malloc's account.

    A Python object that leaks is counted here however small it is, and it
    may hold C memory tracemalloc does not trace (an OpenSSL session under
    a pyOpenSSL Connection); comparing two censuses names the types that grew.
    """
    gc.collect()
    by_type = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    return json.dumps({"malloc": _malloc_census(), "rss": _rss_by_kind(),
                       "objects": dict(by_type.most_common(400))}).encode()


def handler(message: bytes, conn) -> None:
    if message == b"STARTTLS":
        conn.send(b"PROCEED")
        conn.start_tls()
    elif message == b"INFO":
        conn.send(json.dumps(dataclasses.asdict(conn.listener.info())).encode())
    elif message.startswith(b"TRACEMALLOC "):
        conn.send(memory_report(message))
    elif message == b"CENSUS":
        conn.send(census())
    elif message == b"MALLOC":
        conn.send(malloc_report())
    elif message == b"FLOOD":
        while True:  # until send_timeout closes this client, which never reads
            conn.send(b"z" * 65536)
    else:
        conn.send(message)
