"""open_broker: the session broker an address names (``--broker``, the ``broker`` setting).

None (or ``local``) is the in-process :class:`broker.LocalBroker`: one
process, as without a broker. ``redis://HOST:PORT/DB`` is
:class:`redis_broker.RedisBroker`, for several worker processes or
machines; redis-py is imported only then.
"""

from __future__ import annotations

from typing import Any, Optional, TypeGuard

from .broker import LocalBroker
from .errors import ConfigError

__all__ = ["open_broker", "check_broker_url", "shares_sessions"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_broker_url(url: Any) -> None:
    """Raise ConfigError unless ``url`` names a broker: None, ``local`` or a Redis address."""
    if url is not None and (not isinstance(url, str) or not (url == "local" or url.startswith(REDIS_SCHEMES))):
        raise ConfigError("broker", f"expected local or redis://HOST:PORT/DB, got {url!r}")


def open_broker(url: Optional[str], **options: Any) -> LocalBroker:
    """The broker for ``url``; ``options`` go to its constructor (``on_gone``, ``on_restored``, timings).

    The in-process broker takes ``node`` and ``on_gone`` only; the rest
    concern a shared directory and are left out for it.
    """
    check_broker_url(url)
    if shares_sessions(url):
        from .redis_broker import RedisBroker

        return RedisBroker(url, **options)
    return LocalBroker(**{k: v for k, v in options.items() if k in ("node", "on_gone")})


def shares_sessions(url: Optional[str]) -> TypeGuard[str]:
    """Whether a broker at ``url`` reaches sessions in other processes (what --processes N needs)."""
    return url is not None and url != "local"

