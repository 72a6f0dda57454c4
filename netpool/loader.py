"""Import a handler (or any object) from a ``module:attribute`` spec."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from .errors import HandlerImportError

__all__ = ["load_object"]


def load_object(spec: str, *, field: str = "handler") -> Any:
    """Return the object ``spec`` names, as ``package.module:attr.sub``.

    The current directory is importable, as with ``python -m`` and uvicorn,
    so ``netpool run mymodule:handler`` finds ``./mymodule.py``.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise HandlerImportError(field, f"expected MODULE:ATTRIBUTE (like mymodule:handler), got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerImportError(field, f"cannot import module {module_name!r}: {exc}") from None
    except Exception as exc:  # the user's module raised while being imported
        raise HandlerImportError(
            field, f"importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerImportError(field, f"module {module_name!r} has no attribute {attr_path!r}") from None
    return obj
