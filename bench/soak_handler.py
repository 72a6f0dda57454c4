"""The soak server's handler: line echo, STARTTLS, a flood on request, and INFO and TRACEMALLOC control lines."""

import dataclasses
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


def handler(message: bytes, conn) -> None:
    if message == b"STARTTLS":
        conn.send(b"PROCEED")
        conn.start_tls()
    elif message == b"INFO":
        conn.send(json.dumps(dataclasses.asdict(conn.listener.info())).encode())
    elif message.startswith(b"TRACEMALLOC "):
        conn.send(memory_report(message))
    elif message == b"FLOOD":
        while True:  # until send_timeout closes this client, which never reads
            conn.send(b"z" * 65536)
    else:
        conn.send(message)
