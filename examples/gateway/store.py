"""Users in SQLite: one table, a unique index on the name, a small pool of SQLite connections.

SQLite connections are not shared between threads at once, and opening one
per request costs more than the query, so the back end keeps idle ones in
a queue and lends one per request. WAL mode lets readers (logins) run while
a registration writes; ``busy_timeout`` makes concurrent writers wait their
turn instead of failing.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import time
from typing import Iterator, NamedTuple, Optional

__all__ = ["UserStore", "UserRecord", "SCHEMA"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL,
    scheme TEXT NOT NULL,       -- hashing algorithm and its parameters, per user
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS users_username ON users(username);
"""


class UserRecord(NamedTuple):
    username: str
    scheme: str
    salt: bytes
    hash: bytes


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA synchronous = NORMAL")
    return db


class UserStore:
    """The users table, safe to use from many threads."""

    def __init__(self, path: str) -> None:
        self.path = path
        db = connect(path)
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(SCHEMA)
        self._idle: "queue.SimpleQueue[sqlite3.Connection]" = queue.SimpleQueue()
        self._idle.put(db)

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite3.Connection]:
        try:
            db = self._idle.get_nowait()
        except queue.Empty:
            db = connect(self.path)
        try:
            yield db
        finally:
            self._idle.put(db)

    def get(self, username: str) -> Optional[UserRecord]:
        with self.connection() as db:
            row = db.execute("SELECT username, scheme, salt, hash FROM users WHERE username = ?", (username,)).fetchone()
        return UserRecord(*row) if row else None

    def add(self, username: str, scheme: str, salt: bytes, digest: bytes) -> bool:
        """Insert a user; False if the name is taken (the unique index decides, no race)."""
        with self.connection() as db:
            try:
                db.execute(
                    "INSERT INTO users (username, scheme, salt, hash, created_at) VALUES (?, ?, ?, ?, ?)",
                    (username, scheme, salt, digest, time.time()),
                )
            except sqlite3.IntegrityError:
                return False
        return True

    def count(self) -> int:
        with self.connection() as db:
            return db.execute("SELECT COUNT(*) FROM users").fetchone()[0]

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
