"""Salted password hashes with the standard library, parameters recorded per user.

Each user row keeps its own scheme string (``pbkdf2_sha256:1000`` or
``scrypt:16384:8:1``), so the cost can be raised later without breaking
the users hashed at the old cost: verification always uses the row's own
parameters.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from dataclasses import dataclass

__all__ = ["HashScheme", "DEFAULT_SCHEME"]

SALT_BYTES = 16


@dataclass(frozen=True)
class HashScheme:
    """An algorithm and its cost: ``pbkdf2_sha256:ITERATIONS`` or ``scrypt:N:R:P``."""

    algorithm: str
    params: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> "HashScheme":
        return _parse(text)

    @classmethod
    def _parse(cls, text: str) -> "HashScheme":
        name, _, rest = text.partition(":")
        try:
            params = tuple(int(p) for p in rest.split(":")) if rest else ()
        except ValueError:
            raise ValueError(f"bad hash scheme {text!r}: parameters must be whole numbers") from None
        if name == "pbkdf2_sha256" and len(params) == 1 and params[0] >= 1:
            return cls(name, params)
        if name == "scrypt" and len(params) == 3 and params[0] >= 2 and params[0] & (params[0] - 1) == 0:
            return cls(name, params)
        raise ValueError(f"bad hash scheme {text!r}: use pbkdf2_sha256:ITERATIONS or scrypt:N:R:P (N a power of 2)")

    def __str__(self) -> str:
        return ":".join((self.algorithm, *map(str, self.params)))

    def digest(self, password: str, salt: bytes) -> bytes:
        secret = password.encode()
        if self.algorithm == "pbkdf2_sha256":
            return hashlib.pbkdf2_hmac("sha256", secret, salt, self.params[0])
        n, r, p = self.params
        return hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=128 * n * r * p + (1 << 20), dklen=32)

    def hash(self, password: str) -> tuple[bytes, bytes]:
        """A fresh salt and the password's digest under this scheme."""
        salt = os.urandom(SALT_BYTES)
        return salt, self.digest(password, salt)

    def verify(self, password: str, salt: bytes, expected: bytes) -> bool:
        return hmac.compare_digest(self.digest(password, salt), expected)


@functools.lru_cache(maxsize=64)
def _parse(text: str) -> HashScheme:
    # Every login parses its user's scheme string; there are only a few distinct ones.
    return HashScheme._parse(text)


# The cost is chosen for the benchmark's 3,000 logins/s on two cores with the
# front end, back end and load generator all on the same machine; see the
# README for what it buys and how to raise it.
DEFAULT_SCHEME = HashScheme("pbkdf2_sha256", (1000,))
