"""Put the documentation of a dataclass's fields where ``help()`` shows it.

The settings classes document each field with a docstring under it (as
Sphinx and mkdocstrings read them), but ``help()`` and ``pydoc`` show only the
class docstring. This reads those attribute docstrings from the class's
source once, at import, and appends a "Fields" section to the class
docstring: every field with its default and its text.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any

__all__ = ["document_fields"]


def document_fields(cls: Any) -> Any:
    """Append each field's attribute docstring (and default) to ``cls.__doc__``; returns ``cls`` (a decorator)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return cls  # no source (a frozen or zipped install): help() keeps the class docstring alone
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    lines = ["", "", "Fields:", ""]
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = f" = {field.default!r}"
        elif field.default_factory is not dataclasses.MISSING:
            default = f" = {field.default_factory()!r}"
        else:
            default = " (required)"
        lines.append(f"{field.name}{default}")
        lines.extend(textwrap.indent(docs.get(field.name, "(undocumented)"), "    ").splitlines())
    cls.__doc__ = inspect.cleandoc(cls.__doc__ or cls.__name__) + "\n".join(lines)
    return cls
