"""Import a server's own code afresh at each rolling reload, inside the same process.

A reload must run the handler as it is on disk now, while the connections
of the previous generation keep running the code they started with. Python
caches modules in ``sys.modules``; ``importlib.reload`` would re-run one
module in place (changing the old generation's globals under it) and leave
the modules it imports stale. Instead, each load records which modules it
imported first, and the next load takes those out of ``sys.modules`` before
importing: the new generation gets new module objects, and the old one keeps
the objects it holds. Only the server's own code is imported again: not
netpool, the standard library, installed packages (site-packages) or C
extensions, which cannot be loaded twice (restart to upgrade those).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from typing import Callable, TypeVar

__all__ = ["FreshImports"]

T = TypeVar("T")

_INSTALLED = tuple(
    os.path.realpath(path) + os.sep
    for path in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), sysconfig.get_path("stdlib")}
    if path
)


class FreshImports:
    """Run loads (building a config resolves its ``module:attr`` strings) that import the server's code afresh."""

    def __init__(self) -> None:
        self._names: set[str] = set()

    def load(self, build: Callable[[], T]) -> T:
        """Forget the server modules earlier loads imported, then ``build()``; remember what it imports."""
        for name in self._names:
            sys.modules.pop(name, None)
        before = set(sys.modules)
        try:
            return build()
        finally:
            # Also after a failed build: what it imported is forgotten next time.
            self._names.update(name for name in set(sys.modules) - before if _is_server_code(name))

    @property
    def modules(self) -> frozenset[str]:
        """The module names the next load imports afresh."""
        return frozenset(self._names)


def _is_server_code(name: str) -> bool:
    top = name.partition(".")[0]
    if top == "netpool" or top in sys.stdlib_module_names:
        return False
    path = getattr(sys.modules.get(name), "__file__", None)
    if not path or not path.endswith(".py"):
        return False  # built in, a namespace package, or a C extension
    return not os.path.realpath(path).startswith(_INSTALLED)
