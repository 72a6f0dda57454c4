"""Checks on settings values, each failing with a :class:`ConfigError` that names the setting and says what it takes."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = ["whole_number", "seconds"]


def whole_number(name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    """``value`` must be an int (not a bool) of at least ``minimum`` (or None, when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be a whole number of at least {minimum}{' or None' if optional else ''}, got {value!r}")


def seconds(name: str, value: Any, *, optional: bool = False) -> None:
    """``value`` must be a positive number of seconds (or None, when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(name, f"must be a positive number of seconds{' or None' if optional else ''}, got {value!r}")
