"""The differences between two runs' observations (nested dicts, lists, bytes), one readable line each.

Bytes are not printed whole (an echo can be megabytes): their lengths, the
first offset where they differ and a few bytes either side.
"""

from __future__ import annotations

from typing import Any

CONTEXT = 12  # bytes shown either side of the first difference


def differences(a: Any, b: Any, names: tuple[str, str] = ("c", "python"), path: str = "") -> list[str]:
    """Every place where ``a`` and ``b`` differ, as ``path: <name a> ... | <name b> ...``."""
    left, right = names
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                out.append(f"{where}: {left} {_short(a.get(key, '<missing>'))} | {right} "
                           f"{_short(b.get(key, '<missing>'))}")
            else:
                out += differences(a[key], b[key], names, where)
        return out
    if isinstance(a, list) and isinstance(b, list):
        out = [f"{path}: {left} has {len(a)} items, {right} {len(b)}"] if len(a) != len(b) else []
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, names, f"{path}[{i}]")
        return out
    if isinstance(a, bytes) and isinstance(b, bytes):
        return [f"{path}: {bytes_difference(a, b, names)}"] if a != b else []
    return [f"{path}: {left} {_short(a)} | {right} {_short(b)}"] if a != b else []


def bytes_difference(a: bytes, b: bytes, names: tuple[str, str] = ("c", "python")) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, at - CONTEXT)
    return (f"{names[0]} {len(a)} bytes, {names[1]} {len(b)}; first difference at offset {at}: "
            f"{names[0]} ...{a[start:at + CONTEXT]!r}... | {names[1]} ...{b[start:at + CONTEXT]!r}...")


def _short(value: Any) -> str:
    if isinstance(value, bytes) and len(value) > 2 * CONTEXT:
        return f"{len(value)} bytes {value[:CONTEXT]!r}..."
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
