"""Seed the users table: N users ``user<i>`` with password ``password<i>``, in batches.

Hashing dominates (every user gets its own salt, so every hash is real
work); it runs in worker processes, one per core, while the main process
inserts finished batches, each batch one ``executemany`` in one
transaction. On an empty table the unique index is dropped during the load
and built once at the end (a sort instead of ten million B-tree inserts).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sqlite3
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, TextIO

from .passwords import HashScheme
from .store import SCHEMA, connect

__all__ = ["seed", "SeedResult", "ProgressBar"]


@dataclass(frozen=True)
class SeedResult:
    users: int
    seconds: float
    scheme: str


def _hash_batch(start: int, count: int, scheme_text: str) -> list[tuple]:
    scheme = HashScheme.parse(scheme_text)
    now = time.time()
    rows = []
    for i in range(start, start + count):
        salt, digest = scheme.hash(f"password{i}")
        rows.append((i + 1, f"user{i}", scheme_text, salt, digest, now))
    return rows


class ProgressBar:
    """A one-line progress bar on a terminal, a line per 10% elsewhere (CI logs)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, label: str = "users") -> None:
        self.total = total
        self.stream = stream
        self.label = label
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self._last = 0.0
        self._last_decile = -1

    def update(self, done: int) -> None:
        now = time.monotonic()
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        share = done / self.total if self.total else 1.0
        if self.tty:
            if now - self._last < 0.2 and done < self.total:
                return
            self._last = now
            filled = int(share * 30)
            self.stream.write(
                f"\r[{'#' * filled}{'.' * (30 - filled)}] {share:6.1%} {done:,}/{self.total:,} {self.label} "
                f"{rate:,.0f}/s ETA {eta:,.0f}s "
            )
            if done >= self.total:
                self.stream.write("\n")
        else:
            decile = int(share * 10)
            if decile == self._last_decile:
                return
            self._last_decile = decile
            self.stream.write(f"{share:6.1%} {done:,}/{self.total:,} {self.label} {rate:,.0f}/s ETA {eta:,.0f}s\n")
        self.stream.flush()


def seed(
    path: str,
    users: int,
    scheme: HashScheme,
    *,
    batch: int = 10_000,
    processes: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
    force: bool = False,
) -> SeedResult:
    """Create ``path`` with ``users`` users; refuses a database that already has users unless ``force``."""
    started = time.monotonic()
    if force and os.path.exists(path):
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
    db = connect(path)
    try:
        db.executescript(SCHEMA)
        existing = db.execute("SELECT COUNT(*) FROM users").fetchone()[0]
        if existing:
            raise FileExistsError(f"{path} already holds {existing:,} users; pass --force to replace it")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("DROP INDEX IF EXISTS users_username")
        done = 0
        for rows in _batches(users, batch, str(scheme), processes):
            db.execute("BEGIN")
            db.executemany("INSERT INTO users (id, username, scheme, salt, hash, created_at) VALUES (?, ?, ?, ?, ?, ?)", rows)
            db.execute("COMMIT")
            done += len(rows)
            if progress is not None:
                progress(done)
        db.execute("CREATE UNIQUE INDEX users_username ON users(username)")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        raise
    finally:
        db.close()
    return SeedResult(users, time.monotonic() - started, str(scheme))


def _batches(users: int, batch: int, scheme_text: str, processes: Optional[int]) -> Iterator[list[tuple]]:
    starts = range(0, users, batch)
    processes = processes if processes is not None else (os.cpu_count() or 1)
    if processes <= 1 or users <= batch:
        for start in starts:
            yield _hash_batch(start, min(batch, users - start), scheme_text)
        return
    # spawn, not fork: the caller may have threads (a running listener, tests).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as executor:
        # Keep a bounded window of batches in flight: memory stays flat at any N.
        window = processes * 2
        pending: list[concurrent.futures.Future] = []
        it = iter(starts)
        for start in it:
            pending.append(executor.submit(_hash_batch, start, min(batch, users - start), scheme_text))
            if len(pending) >= window:
                break
        while pending:
            rows = pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(executor.submit(_hash_batch, nxt, min(batch, users - nxt), scheme_text))
            yield rows
