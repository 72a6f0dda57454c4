"""Differential fuzzing of the C hot path (netpool/_speedups.c) against the Python one, the oracle.

    python fuzz/hot_path_diff.py [--scripts 200] [--seed 0] [--seconds S] [--input FILE ...] [-v]

A seed (or a file's bytes) decides a script (fuzz/differential/script.py): a
few connections over real loopback sockets, plain TCP or TLS, to a listener
in thread or events mode with raw or line framing and a read size; each
sends rounds of bytes cut at random boundaries, interleaved, with small
pauses, reads the echo back, and ends in one way (half-close, close, reset,
close_notify, a forged TLS record, a handler that raises or closes, a line too long, a reply it
closes on, or left open until the listener stops). Each script runs twice,
on a new listener each time: with the C hot path, then with the Python one.
Every connection's echo and end of stream, what the server's handler got,
each close reason and byte count, and the listener's counters must agree;
the first differences are printed with the seed that replays them
(``--seed N --scripts 1 -v``). The Python run is also held to the script's
model of the echo, so a harness that stopped exercising anything would show.

Exits 1 if any script disagreed (or broke the model).
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz.differential import script as scripts  # noqa: E402
from fuzz.differential.compare import differences  # noqa: E402
from fuzz.differential.server import PKI, big_reply, run  # noqa: E402
from netpool import hot_path  # noqa: E402
from netpool.listener import install_hot_path  # noqa: E402
from netpool.listener_info import ERROR_REASONS  # noqa: E402

SHOWN = 12  # differences printed per script


@dataclass
class Outcome:
    script: scripts.Script
    pair: tuple[str, str]  # the hot paths of the two runs: ("c", "python") but to check the harness itself
    first: dict[str, Any]  # what each run saw (server.run)
    second: dict[str, Any]
    disagreements: list[str] = field(default_factory=list)  # first against second
    off_model: list[str] = field(default_factory=list)  # second against the script's model

    @property
    def ok(self) -> bool:
        return not self.disagreements and not self.off_model

    def report(self) -> str:
        seed = self.script.name.removeprefix("seed ")
        replay = "python fuzz/hot_path_diff.py " + (f"--seed {seed} --scripts 1" if seed.isdigit() else "--input FILE")
        replay += " -v" + (f" --pair {','.join(self.pair)}" if self.pair != ("c", "python") else "")
        first, second = self.pair
        lines = [scripts.describe(self.script), f"replay: {replay}"]
        for title, found in ((f"{first} and {second} disagree", self.disagreements),
                             (f"the {second} run is not what the script's model says", self.off_model)):
            if found:
                lines.append(f"{title} ({len(found)} differences):")
                lines += [f"  {line}" for line in found[:SHOWN]]
                lines += [f"  ... and {len(found) - SHOWN} more"] if len(found) > SHOWN else []
        return "\n".join(lines)


class Harness:
    """Certificates for the TLS scripts (made once, removed on close), and ``check(script)``."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="hot-path-diff-")
        self.pki = PKI(Path(self._dir.name))

    def __enter__(self) -> "Harness":
        return self

    def __exit__(self, *exc: object) -> None:
        self._dir.cleanup()

    def check(self, script: scripts.Script, pair: tuple[str, str] = ("c", "python")) -> Outcome:
        """Run ``script`` on each hot path of ``pair`` and compare; ("python", "python") checks the harness itself."""
        first = run(script, c=pair[0] == "c", pki=self.pki)
        second = run(script, c=pair[1] == "c", pki=self.pki)
        expected = model(script)
        return Outcome(script, pair, first, second, differences(first, second, pair),
                       differences(expected, _like(second, expected), ("model", pair[1])))


def model(script: scripts.Script) -> dict[str, Any]:
    """What a correct server must do with ``script``: the parts of an observation that the script decides alone."""
    conns = []
    reasons = scripts.reasons(script)
    for i, plan in enumerate(script.plans):
        echoes, tail = scripts.echoes(script, i), scripts.tail(script, i)
        big = len(big_reply(script.io)) + (script.framing == "line") if plan.ending.startswith("big") else 0
        sent = b"".join(plan.rounds)
        server: dict[str, Any] = {
            "reason": reasons[i], "bytes_in": len(sent),
            # What left of a big reply before the reset is timing (server.big_reply_counted).
            "bytes_out": sum(map(len, echoes)) + len(tail or b"") if not big else "the echoes and at most the big reply"}
        if script.framing == "raw":
            server.update(received=sent, oversized=0)
        else:
            lines = [line for payload in plan.rounds for line in payload.split(b"\n")[:-1]]
            unfinished = tail[:-1] if tail else b""  # fin with an unfinished last line: framed at end of stream
            server["messages"] = lines + [unfinished] * bool(unfinished)
        client: dict[str, Any] = {"echoes": echoes, "error": None, "more": True if big else None, "tail": None}
        if tail is not None:
            # Over TLS the server ends with close_notify (an EOF without one reads as one:
            # OP_IGNORE_UNEXPECTED_EOF), unless the session broke.
            forged = plan.ending == "corrupt"
            client["tail"] = {"after": tail, "end": "eof", "close_notify": not forged if script.tls else None}
            if not forged:  # the alert's wording is OpenSSL's business (the two runs still compare it)
                client["tail"]["tls_error"] = None
        conns.append({"client": client, "server": server})
    by_reason = collections.Counter(reasons)
    return {
        "listener": {"accepted": len(conns), "closed": len(conns), "open": 0, "unclosed_before_stop": 0,
                     "closed_by_reason": dict(sorted(by_reason.items())),
                     "errors": sum(n for reason, n in by_reason.items() if reason in ERROR_REASONS),
                     "bytes_in": sum(c["server"]["bytes_in"] for c in conns),
                     # Without the big replies' connections (server.big_reply_counted).
                     "bytes_out": sum(c["server"]["bytes_out"] for c in conns if isinstance(c["server"]["bytes_out"], int))},
        "conns": conns,
    }


def _like(observed: Any, shape: Any) -> Any:
    """``observed`` with only the keys ``shape`` has (recursively): what a model can say about."""
    if isinstance(observed, dict) and isinstance(shape, dict):
        return {k: _like(observed[k], shape[k]) if k in observed else "<missing>" for k in shape}
    if isinstance(observed, list) and isinstance(shape, list) and len(observed) == len(shape):
        return [_like(o, s) for o, s in zip(observed, shape)]
    return observed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", type=int, default=200, help="how many seeds to run (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long, whatever --scripts says")
    parser.add_argument("--input", type=Path, nargs="*", default=[], help="scripts from these files' bytes instead")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every script, not only disagreements")
    parser.add_argument("--pair", default="c,python", choices=("c,python", "python,python", "c,c"),
                        help="the hot paths compared; python,python and c,c check that the harness is deterministic")
    args = parser.parse_args()
    pair = tuple(args.pair.split(","))
    install_hot_path(tls=True)
    if hot_path._speedups is None:
        print("netpool._speedups is not built: there is no C hot path to compare", file=sys.stderr)
        return 2
    # The handler raises on purpose: its tracebacks are part of the scripts, not news.
    logging.getLogger("netpool").setLevel(logging.CRITICAL)
    print(f"C hot path: {hot_path._speedups.__file__}; TLS on the C path: {hot_path.tls_speedups_ready()}",
          flush=True)
    if args.input:
        todo = [scripts.from_bytes(path.read_bytes()) for path in args.input]
    else:
        todo = [scripts.from_seed(seed) for seed in range(args.seed, args.seed + args.scripts)]
    started = time.monotonic()
    failed: list[str] = []
    endings: collections.Counter[str] = collections.Counter()
    done = 0
    with Harness() as harness:
        for script in todo:
            if args.seconds and time.monotonic() - started > args.seconds:
                break
            outcome = harness.check(script, (pair[0], pair[1]))
            done += 1
            endings.update(plan.ending for plan in script.plans)
            if not outcome.ok:
                failed.append(script.name)
                print(f"FAIL {outcome.report()}\n", flush=True)
            elif args.verbose:
                print(f"ok   {scripts.describe(script)}", flush=True)
            if done % 50 == 0:
                print(f"... {done} scripts, {len(failed)} failed, {time.monotonic() - started:.0f} s", flush=True)
    elapsed = time.monotonic() - started
    print(f"{done} scripts ({args.pair}) in {elapsed:.0f} s, {len(failed)} with differences"
          + (f": {', '.join(failed)}" if failed else ""))
    print("connections by ending: " + ", ".join(f"{k} {v}" for k, v in sorted(endings.items())))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
