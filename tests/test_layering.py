"""Layering of the package, read from its source with ``ast`` (nothing is imported or run):

- no ecospa module uses another ecospa module's private names (``_name``): not by
  ``from ecospa.x import _y``, not as ``x._y`` on a module imported under a name, and not as
  ``obj._y`` where ``_y`` is an attribute or method that only other ecospa modules define (a
  private field of an object made elsewhere, such as ``fwd._kv``);
- the module-level imports among ecospa modules form no circle (imports inside functions are
  left out: they run after every module has loaded);
- every import, inside functions too, goes from a folder to one on a lower layer of
  :data:`LAYERS` or stays inside its folder: the folders form a stack, never a circle.

Each check is a pure function of source text, tested on small sources below so that it is seen
to fail where it must.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ecospa"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_sources(root: Path = PACKAGE) -> dict[str, str]:
    """``{dotted module name: source}`` of every module under ``root`` (a package's ``__init__``
    under the package's name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path.read_text(encoding="utf-8")
    return out


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module ``node`` imports from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _trees(sources: dict[str, str]) -> dict[str, tuple[ast.Module, bool]]:
    """Parsed sources; the flag says whether the module is a package (``__init__``): a module
    that is the prefix of another is one."""
    names = set(sources)
    return {m: (ast.parse(src), any(o.startswith(m + ".") for o in names)) for m, src in sources.items()}


def _private_fields(tree: ast.Module) -> set[str]:
    """Private names a module gives its objects: methods and class attributes of its classes,
    and ``self._x = ...`` / ``cls._x = ...`` anywhere in it."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(item.name):
                    out.add(item.name)
                targets = item.targets if isinstance(item, ast.Assign) else (
                    [item.target] if isinstance(item, ast.AnnAssign) else [])
                out.update(t.id for t in targets if isinstance(t, ast.Name) and _is_private(t.id))
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_private(node.attr)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            out.add(node.attr)
    return out


def private_uses(sources: dict[str, str], top: str = "ecospa") -> list[str]:
    """Every use of another module's private name, as ``"module:line: what"``."""
    trees = _trees(sources)
    owners: dict[str, set[str]] = {}
    for m, (tree, _) in trees.items():
        for name in _private_fields(tree):
            owners.setdefault(name, set()).add(m)
    found = []
    for m, (tree, is_pkg) in trees.items():
        aliases: dict[str, str] = {}  # local name -> ecospa module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == top and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                src = _absolute(m, is_pkg, node)
                if src.split(".")[0] != top:
                    continue
                for a in node.names:
                    if _is_private(a.name) and src != m:
                        found.append(f"{m}:{node.lineno}: imports {a.name} from {src}")
                    elif f"{src}.{a.name}" in trees:
                        aliases[a.asname or a.name] = f"{src}.{a.name}"
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _is_private(node.attr)):
                continue
            v = node.value
            if isinstance(v, ast.Name) and v.id in aliases and aliases[v.id] != m:
                found.append(f"{m}:{node.lineno}: reads {ast.unparse(node)} of module {aliases[v.id]}")
            elif isinstance(v, ast.Name) and v.id in ("self", "cls"):
                continue
            elif isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                continue
            elif node.attr in owners and m not in owners[node.attr]:
                found.append(f"{m}:{node.lineno}: reads {ast.unparse(node)}, a private field of "
                             f"{', '.join(sorted(owners[node.attr]))}")
    return sorted(set(found))


def _module_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported: not inside a function or class
    body, not under ``if TYPE_CHECKING``."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        todo.extend(ast.iter_child_nodes(node))


def import_graph(sources: dict[str, str], top: str = "ecospa") -> nx.DiGraph:
    """Module -> module it imports at module level, among the modules of ``sources``.
    ``from a import b`` points at ``a.b`` when that is a module, else at ``a``."""
    trees = _trees(sources)
    g = nx.DiGraph()
    g.add_nodes_from(trees)
    for m, (tree, is_pkg) in trees.items():
        for node in _module_level_imports(tree):
            if isinstance(node, ast.Import):
                g.add_edges_from((m, a.name) for a in node.names if a.name in trees)
                continue
            src = _absolute(m, is_pkg, node)
            for a in node.names:
                target = f"{src}.{a.name}" if f"{src}.{a.name}" in trees else src
                if target in trees and target != m:
                    g.add_edge(m, target)
    return g


#: The folders of the package from the bottom up (docs/ARCHITECTURE.md, "Layout"). A module may
#: import from its own folder and from folders on lower layers; folders on one layer do not import
#: each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "version"),
    ("ir",),
    ("capture",),
    ("ops",),
    ("analysis",),
    ("narrow", "export"),
    ("pruning",),
    ("scoring",),
    ("schedule",),
    ("training", "compression", "checkpoint"),
    ("integrations",),
    ("",),  # ecospa/__init__.py: the public API
    ("recipes",),
    ("cli",),
)

#: Imports against the layers, each with its reason: ``{(module, imported module): why}``.
ALLOWED = {
    ("ecospa.ir.plan", "ecospa.analysis.auto_couple"): "Plan.replay, the public shortcut for ecospa.prune(model, "
                                                       "plan): imported when called, so the IR loads alone",
    ("ecospa.ir.plan", "ecospa.pruning.apply"): "Plan.replay (as above)",
}


def _folder(module: str, top: str = "ecospa") -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def all_imports(sources: dict[str, str], top: str = "ecospa") -> list[tuple[str, int, str]]:
    """``(module, line, imported module)`` for every import of an ecospa module, at any depth
    (inside functions too; ``if TYPE_CHECKING`` ones included: they are imports all the same)."""
    trees = _trees(sources)
    out = []
    for m, (tree, is_pkg) in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(m, node.lineno, a.name) for a in node.names if a.name.split(".")[0] == top]
            elif isinstance(node, ast.ImportFrom):
                src = _absolute(m, is_pkg, node)
                if src.split(".")[0] != top:
                    continue
                for a in node.names:
                    out.append((m, node.lineno, f"{src}.{a.name}" if f"{src}.{a.name}" in trees else src))
    return out


def layer_violations(sources: dict[str, str], layers=LAYERS) -> list[str]:
    """Imports that go up the stack of :data:`LAYERS` or sideways between folders of one layer."""
    rank = {f: i for i, layer in enumerate(layers) for f in layer}
    found = []
    for m, line, target in all_imports(sources):
        a, b = _folder(m), _folder(target)
        if a == b or (m, target) in ALLOWED:
            continue
        if a not in rank or b not in rank:
            found.append(f"{m}:{line}: folder {a if a not in rank else b!r} is on no layer")
        elif rank[b] >= rank[a]:
            found.append(f"{m}:{line}: imports {target} ({b or 'ecospa'} is not below {a or 'ecospa'})")
    return sorted(set(found))


def import_circles(sources: dict[str, str]) -> list[list[str]]:
    return sorted(sorted(c) for c in nx.simple_cycles(import_graph(sources)))


# ---------------------------------------------------------------------------- the package
def test_no_module_uses_another_modules_private_names():
    found = private_uses(package_sources())
    assert not found, ("private names used across modules (give them a public name, listed in the "
                       "owner's __all__):\n" + "\n".join(found))


def test_module_level_imports_form_no_circle():
    circles = import_circles(package_sources())
    assert not circles, "import circles among ecospa modules (module-level imports):\n" + "\n".join(
        " -> ".join(c) for c in circles)


def test_folders_import_only_from_lower_layers():
    found = layer_violations(package_sources())
    assert not found, "imports against the layers of LAYERS:\n" + "\n".join(found)


def test_every_folder_is_on_a_layer():
    folders = {_folder(m) for m in package_sources()}
    assert folders == {f for layer in LAYERS for f in layer}


def test_the_package_is_read():
    sources = package_sources()
    assert {"ecospa", "ecospa.pruning.apply", "ecospa.ir.coupling"} <= set(sources)
    g = import_graph(sources)
    assert g.has_edge("ecospa.pruning.apply", "ecospa.pruning.transaction")


# ---------------------------------------------------------------------------- the checks fail where they must
@pytest.mark.parametrize("src, what", [
    ("from ecospa.a import _hidden\n", "imports _hidden from ecospa.a"),
    ("from .a import _hidden\n", "imports _hidden from ecospa.a"),
    ("import ecospa.a as a\nx = a._hidden\n", "reads a._hidden of module ecospa.a"),
    ("from ecospa import a\nx = a._hidden\n", "reads a._hidden of module ecospa.a"),
    ("def f(obj):\n    return obj._state\n", "reads obj._state, a private field of ecospa.a"),
    ("def f(obj):\n    return obj._helper()\n", "reads obj._helper, a private field of ecospa.a"),
])
def test_private_use_is_found(src, what):
    a = "_hidden = 1\nclass A:\n    def __init__(self):\n        self._state = 0\n    def _helper(self):\n        pass\n"
    found = private_uses({"ecospa": "", "ecospa.a": a, "ecospa.b": src})
    assert len(found) == 1 and what in found[0] and found[0].startswith("ecospa.b:"), found


def test_own_and_foreign_private_names_are_allowed():
    a = "_x = 1\nclass A:\n    def __init__(self):\n        self._state = 0\n    def f(self, other):\n        return other._state + _x\n"
    b = "def f(module):\n    return module._parameters, module._buffers\n"  # torch's, not ecospa's
    assert private_uses({"ecospa": "", "ecospa.a": a, "ecospa.b": b, "ecospa.c": "from ecospa.a import A\n"}) == []


def test_layer_violations_are_found_inside_functions_too():
    layers = (("a",), ("b",))
    src = {"ecospa": "", "ecospa.a": "", "ecospa.a.x": "def f():\n    from ecospa.b.y import g\n",
           "ecospa.b": "", "ecospa.b.y": "from ecospa.a.x import f\n"}
    found = layer_violations(src, layers)
    assert len(found) == 1 and found[0].startswith("ecospa.a.x:2: imports ecospa.b.y"), found
    assert layer_violations(src, (("a", "b"),)) == ["ecospa.a.x:2: imports ecospa.b.y (b is not below a)",
                                                     "ecospa.b.y:1: imports ecospa.a.x (a is not below b)"]


def test_circle_is_found_at_module_level_only():
    circle = {"ecospa": "", "ecospa.a": "from ecospa.b import f\n", "ecospa.b": "import ecospa.c\n",
              "ecospa.c": "from ecospa import a\n"}
    assert import_circles(circle) == [["ecospa.a", "ecospa.b", "ecospa.c"]]
    nested = dict(circle, **{"ecospa.c": "def g():\n    from ecospa import a\n"})
    assert import_circles(nested) == []
    typing_only = dict(circle, **{"ecospa.c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                              "    from ecospa import a\n"})
    assert import_circles(typing_only) == []
    in_try = dict(circle, **{"ecospa.c": "try:\n    from ecospa.a import x\nexcept ImportError:\n    x = None\n"})
    assert import_circles(in_try) == [["ecospa.a", "ecospa.b", "ecospa.c"]]
