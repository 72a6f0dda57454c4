"""ServerSettings: what an XMPP server needs to know besides where to listen.

Listening (address, TLS certificate, connection limits) is netpool's
``ListenerConfig``; this is the protocol's side, frozen and checked at
construction like ``ListenerConfig`` so a bad value fails before a socket is bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from netpool import ConfigError

from .jid import InvalidJID, domainpart
from .parser import Limits
from .users import UserStore

__all__ = ["ServerSettings"]


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """The XMPP side of a server. Defaults suit a development machine."""

    domain: str = "localhost"
    """The one domain served: users are ``name@domain``; stream headers must say ``to='domain'``."""
    users: Optional[UserStore] = None
    """Where passwords are checked; None only together with ``accept_any_password``."""
    accept_any_password: bool = False
    """Log in anyone with any password: for quick prototypes, never for a reachable server."""
    require_tls: bool = False
    """Refuse to authenticate on a plain stream: clients must STARTTLS first."""
    login_timeout: float = 30.0
    """Seconds from connecting to a bound resource; slow or silent clients are closed (connection-timeout)."""
    session_timeout: float = 900.0
    """Seconds a logged-in stream may stay silent. Clients keep alive every 300 s or so: three missed and it is gone."""
    limits: Limits = field(default_factory=Limits)
    """Stanza size, header size, nesting and attribute limits for incoming XML."""
    max_outbound_bytes: int = 1 << 20
    """Bytes waiting for one recipient before it counts as not reading and is disconnected
    (the listener's ``outbox_limit``, unless the listener settings name one)."""
    max_auth_attempts: int = 3
    """Failed SASL attempts allowed on one stream (RFC 6120 asks for at least two)."""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "domain", domainpart(self.domain))
        except InvalidJID as exc:
            raise ConfigError("domain", f"{self.domain!r} is not a domain name: {exc}") from None
        if self.users is None and not self.accept_any_password:
            raise ConfigError("users", "give a user store, or accept_any_password=True for a prototype")
        for name in ("login_timeout", "session_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(name, f"must be a positive number of seconds, got {value!r}")
        if not isinstance(self.limits, Limits):
            raise ConfigError("limits", f"expected a parser.Limits, got {self.limits!r}")
        if self.max_outbound_bytes < self.limits.max_stanza_bytes:
            raise ConfigError("max_outbound_bytes", "must hold at least one stanza of limits.max_stanza_bytes")
        if isinstance(self.max_auth_attempts, bool) or not isinstance(self.max_auth_attempts, int) \
                or self.max_auth_attempts < 1:
            raise ConfigError("max_auth_attempts", f"must be at least 1, got {self.max_auth_attempts!r}")
