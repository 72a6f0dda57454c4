"""Run every fuzz target for a while and report (what `make fuzz` calls).

Each target runs on its own (one at a time: fuzzing is one busy core each)
with a scratch copy of its corpus and its crashes under build/fuzz/<target>/,
so a run never changes the committed corpus unless asked:

    python fuzz/run.py [--seconds 60] [--merge] [TARGET ...]

--merge minimises the committed corpus plus what the run found into a fresh
folder (libFuzzer's -merge=1 keeps only inputs that add coverage) and puts
it in place of fuzz/corpus/<target>/. Inputs that crash or break a property
are copied to fuzz/crashes/<target>/ and kept for good: tests/test_fuzz_corpus.py
replays them with the corpus. The table (runs, exec/s, libFuzzer's last
cov:/ft:, slowest input) is printed and its rows updated in fuzz/report.md. Exits 1
if any target crashed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FUZZ = ROOT / "fuzz"
SCRATCH = ROOT / "build" / "fuzz"
TARGETS = sorted(p.stem for p in (FUZZ / "targets").glob("*.py") if not p.stem.startswith("_"))
SLOW_MS = 100  # an input must not take longer (libFuzzer's -timeout=1 only catches whole seconds)
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", re.M)
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_ARTIFACT = re.compile(r"^(crash|timeout|oom|leak|slow-unit)-")


def inputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != ".gitkeep") if folder.is_dir() else []


def plain_ms(check: Callable[[bytes], None], data: bytes, repeat: int = 1) -> float:
    """Best time of ``repeat`` runs of the plain check(), in ms (a crash counts as done: libFuzzer reports those)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            check(data)
        except Exception:
            pass
        best = min(best, (time.perf_counter() - start) * 1000)
    return best


def slowest(check: Callable[[bytes], None], folder: Path) -> tuple[float, str]:
    """The slowest input of ``folder`` through the plain (uninstrumented) check(), in ms."""
    return max(((plain_ms(check, p.read_bytes(), repeat=2), p.name) for p in inputs(folder)), default=(0.0, ""))


def fuzz_one(target: str, seconds: int, merge: bool) -> dict[str, object]:
    scratch = SCRATCH / target
    shutil.rmtree(scratch, ignore_errors=True)
    corpus, artifacts, slow = scratch / "corpus", scratch / "artifacts", scratch / "slow"
    for folder in (corpus, artifacts):
        folder.mkdir(parents=True)
    committed, crashes = FUZZ / "corpus" / target, FUZZ / "crashes" / target
    for path in inputs(committed) + inputs(crashes):
        shutil.copy(path, corpus / path.name)
    before = len(inputs(corpus))
    script = str(FUZZ / "targets" / f"{target}.py")
    command = [sys.executable, script, str(corpus), f"-max_total_time={seconds}", "-timeout=1",
               "-rss_limit_mb=2048", "-max_len=4096", "-print_final_stats=1", f"-artifact_prefix={artifacts}/"]
    env = dict(os.environ, FUZZ_SLOW_DIR=str(slow))
    print(f"== {target}: {seconds} s, {before} inputs to start from", flush=True)
    log = scratch / "fuzz.log"
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    text = log.read_text(errors="replace")
    statuses = _STATUS.findall(text)
    stats = dict(_STAT.findall(text))
    found = [p for p in inputs(artifacts) if _ARTIFACT.match(p.name)]
    for path in found:
        crashes.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, crashes / path.name)
        print(f"   {path.name}: copied to {crashes.relative_to(ROOT)}/; log: {log.relative_to(ROOT)}", flush=True)
    if merge and not found:
        fresh = scratch / "merged"
        fresh.mkdir()
        subprocess.run([sys.executable, script, "-merge=1", "-max_len=4096", "-timeout=1", "-rss_limit_mb=2048",
                        str(fresh), str(committed), str(corpus)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=ROOT)
        if not inputs(fresh):
            raise SystemExit(f"merging {target} kept nothing: fuzz/corpus/{target}/ left as it was")
        for path in inputs(committed):
            path.unlink()
        for path in inputs(fresh):
            shutil.copy(path, committed / path.name)
    check = importlib.import_module(f"fuzz.targets.{target}").check
    worst, worst_name = slowest(check, corpus)
    if worst > SLOW_MS:
        print(f"   slowest corpus input {worst_name}: {worst:.0f} ms", flush=True)
    # Inputs over SLOW_MS under instrumentation, on a busy machine: count those still slow run plain.
    flagged = inputs(slow)
    slow_inputs = [p for p in flagged if plain_ms(check, p.read_bytes(), repeat=3) > SLOW_MS]
    for path in flagged:
        verdict = "still slow" if path in slow_inputs else "fast when run plain"
        print(f"   over {SLOW_MS} ms while fuzzing ({verdict}): {path.relative_to(ROOT)}", flush=True)
    runs = int(stats.get("number_of_executed_units", statuses[-1][0] if statuses else 0))
    return {
        "target": target, "runs": runs, "exec_s": int(stats.get("average_exec_per_sec", 0)),
        "cov": statuses[-1][1] if statuses else "?", "ft": statuses[-1][2] if statuses else "?",
        "corpus": len(inputs(committed)), "found": len(found), "slow": f"{len(slow_inputs)} of {len(flagged)}",
        "slowest_ms": worst, "exit": code,
    }


HEADER = """# Fuzzing report

Written by `make fuzz` (fuzz/run.py): one row per target, from its last run (a run of some
targets keeps the others' rows). Targets run one at a time. cov/ft: libFuzzer's last status
line, counting only the instrumented parser module. Slow: inputs over 100 ms under
instrumentation (flagged), and how many of those still take over 100 ms through the plain
check(). Slowest: the slowest corpus input through the plain check().

| target | date | seconds | runs | exec/s | cov | ft | committed corpus | crashes found | slow: plain of flagged | slowest |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
"""


def report(rows: list[dict[str, object]], seconds: int) -> str:
    """The table, with this run's rows in place of the earlier rows for the same targets."""
    today = datetime.date.today().isoformat()
    table = {}
    if (FUZZ / "report.md").exists():
        for line in (FUZZ / "report.md").read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 11 and cells[0] in TARGETS:
                table[cells[0]] = line
    for r in rows:
        table[str(r["target"])] = (
            f"| {r['target']} | {today} | {seconds} | {r['runs']:,} | {r['exec_s']:,} | {r['cov']} | {r['ft']} "
            f"| {r['corpus']} | {r['found']} | {r['slow']} | {r['slowest_ms']:.1f} ms |")
    return HEADER + "".join(table[name] + "\n" for name in sorted(table))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--merge", action="store_true", help="minimise the corpus plus new finds into fuzz/corpus/")
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"no such target: {', '.join(sorted(unknown))}")
    rows = [fuzz_one(target, args.seconds, args.merge) for target in args.targets or TARGETS]
    table = report(rows, args.seconds)
    print(table)
    (FUZZ / "report.md").write_text(table)
    return 1 if any(r["found"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
