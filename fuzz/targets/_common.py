"""What every target shares: the control bytes, cutting an input into chunks, the atheris entry point.

An input is ``seed byte | config byte | stream``. The seed decides how the
stream is cut into ``feed`` calls and the config byte picks limits, so the
cut and the limits come from the input itself: a corpus file replays exactly
the same way under atheris and under pytest, and libFuzzer mutates them like
any other byte.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager

# Checks slower than this are reported (libFuzzer's -timeout only catches whole seconds).
SLOW_SECONDS = 0.1

# Largest piece for each cutting mode; mode 0 is one byte per feed.
_CAPS = (1, 1, 2, 3, 5, 9, 64, 1024)


def control(data: bytes) -> tuple[int, int, bytes]:
    """(seed, config, stream): the first two bytes steer, the rest is fed."""
    seed = data[0] if data else 0
    config = data[1] if len(data) > 1 else 0
    return seed, config, data[2:]


def pieces(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut into pieces decided by ``seed`` (0-255); empty pieces included now and then.

    A small LCG instead of random.Random: the same cut on every Python, and cheap.
    """
    cap = _CAPS[seed & 7]
    state = (seed * 2654435761 + len(data)) & 0x7FFFFFFF
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        state = (state * 1103515245 + 12345) & 0x7FFFFFFF
        if seed & 8 and state & 0x700 == 0:
            out.append(b"")  # feed(b"") must be harmless
        size = 1 + (state >> 16) % cap
        out.append(data[pos:pos + size])
        pos += size
    return out


def instrumented(caller: str, *modules: str) -> ContextManager[object]:
    """Around the imports of the code under test: atheris instruments them when the target runs as a fuzzer.

    Only the named modules are instrumented, so libFuzzer's ``cov:`` counts
    the parser's own branches rather than all of netpool's.
    """
    if caller != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=list(modules))  # type: ignore[no-any-return]


def fuzz(check: Callable[[bytes], None]) -> None:
    """The atheris entry point: ``python fuzz/targets/X.py CORPUS_DIR [libFuzzer flags]``.

    An input slower than SLOW_SECONDS is copied to $FUZZ_SLOW_DIR (when set)
    so the runner can report it; the check itself is the same one pytest replays.
    """
    import atheris

    slow_dir = os.environ.get("FUZZ_SLOW_DIR")

    def test_one_input(data: bytes) -> None:
        start = time.perf_counter()
        check(data)
        took = time.perf_counter() - start
        if took > SLOW_SECONDS and slow_dir:
            import hashlib

            path = Path(slow_dir) / f"slow-{hashlib.sha1(data).hexdigest()}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"SLOW INPUT: {took * 1000:.0f} ms, saved as {path}", file=sys.stderr)

    # libFuzzer's -merge and -fork run argv[0] again through the shell: make it the interpreter
    # and the script, since the script is not executable (and would not find the venv's atheris).
    argv = [f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(sys.argv[0]).resolve()))}", *sys.argv[1:]]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()

