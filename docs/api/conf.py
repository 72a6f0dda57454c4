"""Sphinx configuration of netpool's API reference (``make docs``).

Built from the docstrings with autodoc only: no intersphinx and no theme to
install, so the build works offline with what ``pip install -e '.[docs]'``
brings.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from sphinx.application import Sphinx

# Document this checkout, even from a virtualenv where netpool is installed elsewhere.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import netpool  # noqa: E402

project = "netpool"
release = version = netpool.__version__
copyright = "netpool authors, MIT licence"

extensions = ["sphinx.ext.autodoc"]

# Members in source order: the settings classes list their fields in the
# order that explains them (where to listen, then admission, then I/O...).
autodoc_member_order = "bysource"
# Types in the signature only: each field's description already says what
# the value means, and a second copy of the type there is noise.
autodoc_typehints = "signature"
# Undocumented public members too (Listener.info(), WorkerPool.stats(),
# conn.peer...): a reference that leaves them out looks as if they did not exist.
autodoc_default_options = {"members": True, "undoc-members": True}
# Defaults as the source writes them (``is_failure=_any_exception``), not as
# their repr (``<function _any_exception at 0x7f...>``), which is no Python
# and makes Sphinx print the whole signature unparsed.
autodoc_preserve_defaults = True

# Docstrings quote Python values ("refuse", "1.2"): straight quotes, as typed.
smartquotes = False

html_theme = "alabaster"
html_title = f"netpool {release} API reference"
html_show_sourcelink = False
exclude_patterns = ["_build"]


def _drop_fields_section(app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    # netpool.field_docs appends a plain-text "Fields:" section to the
    # settings classes' docstrings for help(); here every field is
    # documented by autodoc from the same attribute docstrings, so the
    # appended copy would only repeat them.
    if what == "class" and dataclasses.is_dataclass(obj) and "Fields:" in lines:
        del lines[lines.index("Fields:"):]
        while lines and not lines[-1].strip():
            lines.pop()


def _show_default_factories(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                            signature: str | None, return_annotation: str | None) -> tuple[str, str | None] | None:
    # A dataclass field with a default_factory appears in the generated
    # __init__ as "= <factory>" (no source to preserve): no Python either,
    # so Sphinx would print the whole signature unparsed. Show what the
    # factory makes instead ("extra: Mapping[str, Any] = {}").
    if what != "class" or not signature or not dataclasses.is_dataclass(obj):
        return None
    for field in dataclasses.fields(obj):
        if field.init and field.default_factory is not dataclasses.MISSING:
            signature = signature.replace("<factory>", repr(field.default_factory()), 1)
    return signature, return_annotation


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-docstring", _drop_fields_section)
    app.connect("autodoc-process-signature", _show_default_factories)
