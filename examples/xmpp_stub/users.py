"""The user store: a JSON file of user names and salted scrypt password hashes.

``netpool xmpp adduser NAME`` writes it; the server reads it, and reads it
again when it changes, so users added while the server runs can log in
without a restart. The file looks like::

    {"format": "netpool-xmpp-users", "version": 1,
     "users": {"alice": {"scheme": "scrypt", "n": 16384, "r": 8, "p": 1,
                         "salt": "<base64>", "hash": "<base64>"}}}

Each user carries its own parameters, so raising the cost later does not
invalidate existing passwords. scrypt (memory-hard, in the standard library)
at n=2**14, r=8 costs about 60 ms and 16 MiB per check; it runs on the
connection's own thread and releases the GIL, so it never stalls other
clients. Unknown users are checked against a dummy record at the same cost,
so timing does not tell which names exist.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .jid import InvalidJID, localpart

__all__ = ["UserStore", "UserStoreError", "PasswordHash", "hash_password"]

log = logging.getLogger("netpool.xmpp")

FORMAT = "netpool-xmpp-users"
DEFAULT_COST = {"n": 2**14, "r": 8, "p": 1}
# Bounds on parameters read from the file, so a hand-edited file cannot make
# one login take minutes or gigabytes.
_MAX_N, _MAX_R, _MAX_P = 2**20, 32, 16
_MAXMEM = 256 * 2**20


class UserStoreError(Exception):
    """The user file cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class PasswordHash:
    """One user's record: scrypt parameters, salt and derived key."""

    n: int
    r: int
    p: int
    salt: bytes
    hash: bytes

    def matches(self, password: str) -> bool:
        derived = hashlib.scrypt(password.encode("utf-8"), salt=self.salt, n=self.n, r=self.r, p=self.p,
                                 dklen=len(self.hash), maxmem=_MAXMEM)
        return hmac.compare_digest(derived, self.hash)

    def to_json(self) -> dict[str, Any]:
        return {"scheme": "scrypt", "n": self.n, "r": self.r, "p": self.p,
                "salt": base64.b64encode(self.salt).decode(), "hash": base64.b64encode(self.hash).decode()}

    @classmethod
    def from_json(cls, record: Any) -> "PasswordHash":
        if not isinstance(record, dict) or record.get("scheme") != "scrypt":
            raise ValueError("expected a record with scheme 'scrypt'")
        cost: dict[str, int] = {}
        for name, top in (("n", _MAX_N), ("r", _MAX_R), ("p", _MAX_P)):
            value = record.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ValueError(f"scrypt parameter {name} must be 1..{top}, got {value!r}")
            cost[name] = value
        n, r, p = cost["n"], cost["r"], cost["p"]
        if n & (n - 1) or n < 2:
            raise ValueError(f"scrypt parameter n must be a power of two, got {n}")
        try:
            salt = base64.b64decode(record["salt"], validate=True)
            digest = base64.b64decode(record["hash"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise ValueError("salt and hash must be base64") from None
        if len(salt) < 8 or not 16 <= len(digest) <= 64:
            raise ValueError("salt or hash has an implausible length")
        return cls(n, r, p, salt, digest)


def hash_password(password: str, **cost: int) -> PasswordHash:
    """Hash a new password with a fresh 16-byte salt (``cost`` overrides n, r, p)."""
    params = {**DEFAULT_COST, **cost}
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, maxmem=_MAXMEM, **params)
    return PasswordHash(params["n"], params["r"], params["p"], salt, digest)


@functools.cache
def _dummy() -> PasswordHash:
    """Checked when the user does not exist, so a miss costs what a hit costs (made on first use)."""
    return hash_password(secrets.token_urlsafe(16))


class UserStore:
    """Users and password hashes in one JSON file; safe to share between connection threads."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._users: dict[str, PasswordHash] = {}
        self._stamp: Optional[tuple[int, int, int]] = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> "UserStore":
        """Open an existing file now, so a missing or broken file fails at startup, not at the first login."""
        store = cls(path)
        if not store.path.exists():
            raise UserStoreError(f"{store.path}: no such user file")
        store._refresh()
        return store

    def __len__(self) -> int:
        self._refresh()
        return len(self._users)

    def __contains__(self, name: str) -> bool:
        self._refresh()
        return name in self._users

    def verify(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s; ``name`` must already be a normalised localpart."""
        try:
            self._refresh()
        except UserStoreError as exc:
            # Keep serving the users we had: a half-edited file must not lock everyone out.
            log.warning("%s; still using the users read before", exc)
        record = self._users.get(name)
        if record is None:
            _dummy().matches(password)
            return False
        return record.matches(password)

    def add(self, name: str, password: str, *, replace: bool = False, **cost: int) -> str:
        """Add a user (or change the password with ``replace``); returns the normalised name.

        Raises ValueError for a bad name or empty password, KeyError if the
        user exists and ``replace`` is false, UserStoreError if the file cannot
        be read or written.
        """
        try:
            name = localpart(name)
        except InvalidJID as exc:
            raise ValueError(f"{name!r} cannot be a user name: {exc}") from None
        if not password:
            raise ValueError("the password must not be empty")
        with self._lock:
            users = self._read() if self.path.exists() else {}
            if name in users and not replace:
                raise KeyError(name)
            users[name] = hash_password(password, **cost)
            self._write(users)
            self._users, self._stamp = users, self._file_stamp()
        return name

    # -- the file -------------------------------------------------------------------

    def _file_stamp(self) -> Optional[tuple[int, int, int]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UserStoreError(f"{self.path}: {exc.strerror}") from None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _refresh(self) -> None:
        """Re-read the file if it changed since the last read (a stat per login, no more)."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        with self._lock:
            users = self._read() if stamp is not None else {}
            self._users, self._stamp = users, stamp

    def _read(self) -> dict[str, PasswordHash]:
        try:
            with open(self.path, "rb") as fh:
                data = json.load(fh)
        except OSError as exc:
            raise UserStoreError(f"{self.path}: {exc.strerror}") from None
        except ValueError as exc:
            raise UserStoreError(f"{self.path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("users"), dict):
            raise UserStoreError(f"{self.path} is not a netpool xmpp user file (expected format {FORMAT!r})")
        users = {}
        for name, record in data["users"].items():
            try:
                users[localpart(name)] = PasswordHash.from_json(record)
            except (InvalidJID, ValueError) as exc:
                raise UserStoreError(f"{self.path}: user {name!r}: {exc}") from None
        return users

    def _write(self, users: dict[str, PasswordHash]) -> None:
        data = {"format": FORMAT, "version": 1, "users": {name: users[name].to_json() for name in sorted(users)}}
        directory = self.path.parent
        # Written next to the target and renamed over it: a reader (the
        # running server) sees the old file or the new one, never half of one.
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    os.fchmod(fh.fileno(), 0o600)  # hashes are not passwords, but no one else needs them
                    json.dump(data, fh, indent=2)
                    fh.write("\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            raise UserStoreError(f"cannot write {self.path}: {exc.strerror or exc}") from None
