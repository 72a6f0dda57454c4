"""What the blocking benchmarks' handlers do before they echo, the same in every server.

WORK is one of:
  sleep:MS     block MS milliseconds on every message (time.sleep: a stand-in for a database call)
  mixed:MS     block MS milliseconds on messages that start with B (loadgen's mixed mode), not on the others
  redis:PORT   one GET from the redis-server on 127.0.0.1:PORT (redis-py): a real blocking client
"""

from typing import Callable


def make_work(spec: str) -> Callable[[bytes], None]:
    kind, _, arg = spec.partition(":")
    if kind == "redis":
        import redis

        client = redis.Redis(host="127.0.0.1", port=int(arg), max_connections=2048)
        return lambda message: client.get("netpool-bench")
    if kind not in ("sleep", "mixed"):
        raise SystemExit(f"unknown WORK {spec!r}: sleep:MS, mixed:MS or redis:PORT")
    import time

    seconds = float(arg) / 1000
    if not seconds:
        return lambda message: None
    if kind == "sleep":
        return lambda message: time.sleep(seconds)

    def mixed(message: bytes) -> None:
        if message[:1] == b"B":
            time.sleep(seconds)

    return mixed
