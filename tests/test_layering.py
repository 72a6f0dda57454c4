"""The package's layering, read from its own source: which modules import which, and whose private names they use.

Dependencies point one way: no import circle. And no module reaches into
another's underscore names: each part gets what it needs handed to it (a
settings object, a callable) or uses a public name.

A "private name" here is ``obj._name`` (read or set; or
``getattr(obj, "_name")``, or ``from .mod import _name``) in module M, where
``obj`` is not ``self`` or ``cls``, nothing in M itself defines ``_name``
(a function, class, attribute set on self, or ``__slots__`` entry) and
another module of the package does. Dunder names are not private.
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "netpool"

def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_submodule(name: str) -> bool:
    return any(PACKAGE.glob(f"{name}.*"))


def _modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))}


def _own_names(tree: ast.Module) -> set[str]:
    """Names the module defines itself: functions, classes, assigned names, attributes set on self, __slots__."""
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            own.add(node.attr)  # set on another module's object, it would still be that module's name
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
            own.update(c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return own


def _imports(tree: ast.Module, modules: set[str]) -> tuple[set[str], set[str]]:
    """(package modules this one imports, private names it imports from them)."""
    deps: set[str] = set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "netpool":
                parts = node.module.split(".")
                deps.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
            if node.level == 1 or (node.module or "").startswith("netpool"):
                # A private submodule (the compiled _speedups) is the package's own, not another module's.
                names.update(alias.name for alias in node.names
                             if _private(alias.name) and not (node.module is None and _is_submodule(alias.name)))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "netpool" and len(parts) > 1:
                    deps.add(parts[1])
    return deps & modules | ({"examples"} & deps), names


def _private_uses(tree: ast.Module) -> set[str]:
    own = _own_names(tree)
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            used.add(node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            used.add(node.args[1].value)
    return used - own


def _graph() -> dict[str, set[str]]:
    trees = _modules()
    return {name: _imports(tree, set(trees))[0] - {name} for name, tree in trees.items()}


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    """Dependencies point one way: no module imports one that (indirectly) imports it, type-checking imports included."""
    circles = _circles(_graph())
    assert not circles, f"modules importing each other in a circle: {sorted(map(sorted, circles))}"


def test_no_module_uses_another_modules_private_names() -> None:
    trees = _modules()
    owners: dict[str, set[str]] = defaultdict(set)
    for name, tree in trees.items():
        for own in _own_names(tree):
            if _private(own):
                owners[own].add(name)
    found: dict[str, set[str]] = defaultdict(set)
    for name, tree in trees.items():
        # Only another netpool module's names count: a module's own marker
        # on a foreign object, or the standard library's socket._accept and
        # os._exit, are nobody else's in this package.
        uses = {used for used in _private_uses(tree) | _imports(tree, set())[1] if owners.get(used, {name}) - {name}}
        if uses:
            found[name] = uses
    found = {m: sorted(names) for m, names in found.items()}
    assert not found, f"modules using other modules' private names (hand them a public name or a callable): {found}"


def test_library_does_not_import_examples() -> None:
    """The examples sit outside the library: the CLI finds theirs through entry points (netpool.commands)."""
    importers = {name for name, deps in _graph().items() if "examples" in deps}
    assert not importers, f"library modules importing the examples: {sorted(importers)}"


def test_the_checks_see_what_they_look_for() -> None:
    """The analysis itself: a circle, a private name and a getattr string are found in made-up modules."""
    a = ast.parse("from . import b\nimport netpool.c\ndef f(x):\n    return x._secret + getattr(x, '_other')")
    assert _imports(a, {"b", "c"})[0] == {"b", "c"}
    assert _imports(ast.parse("from .examples.echo import handler"), {"b"})[0] == {"examples"}
    assert _private_uses(a) == {"_secret", "_other"}
    own = ast.parse("class K:\n    __slots__ = ('_mine',)\n    def g(self, o):\n        return o._mine + self._x")
    assert _private_uses(own) == set()
    assert _private_uses(ast.parse("def h(conn):\n    conn._theirs = 1")) == {"_theirs"}
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset({"a", "b", "c"})]


def test_the_readme_layout_names_every_module() -> None:
    """Each module of the package has its line in the README's Layout section."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    missing = [path.name for path in sorted(PACKAGE.glob("*.py")) if f"netpool/{path.name}" not in layout]
    assert not missing, f"README's Layout does not list: {missing}"
