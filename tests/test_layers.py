"""The house rules (docs/ARCHITECTURE.md, "Layers"): imports point one way, no cycles, nothing
imports the command line, no module over 800 lines.

Every ``import`` and ``from ... import`` in every module counts: at module level, inside
functions, and under ``if TYPE_CHECKING:`` — a type-only import is still one module knowing
another, and a cycle of them is the same knot in the design (a lower module that needs a
higher type declares a Protocol for it instead). Importing ``pkg.mod`` is an edge to that
module, not to ``pkg/__init__``: Python runs a parent package's ``__init__`` on the way,
which is why package ``__init__`` files only re-export.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "hvmodel"
MAX_LINES = 800

# Top to bottom; a module may import its own package (at any layer) and anything in a lower
# layer. Packages in one layer are siblings: they do not import each other.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("main", ("hvmodel.__main__",)),                   # ``python -m hvmodel``
    ("cli", ("hvmodel.cli",)),
    ("api", ("hvmodel", "hvmodel.pytest_plugin")),     # the package's face and the pytest plugin
    ("run", ("hvmodel.run",)),
    ("tools", ("hvmodel.check", "hvmodel.bench", "hvmodel.debug", "hvmodel.inject", "hvmodel.report")),
    ("host", ("hvmodel.host",)),
    ("memory", ("hvmodel.memory",)),
    ("guest", ("hvmodel.guest",)),
    ("boot", ("hvmodel.boot",)),
    ("vm", ("hvmodel.vm",)),
    ("devices", ("hvmodel.devices",)),
    ("mmu", ("hvmodel.mmu",)),
    ("p2m", ("hvmodel.mmu.p2m",)),
    ("machine", ("hvmodel.machine",)),
]
# Value modules that import nothing of hvmodel: any layer may import them.
LEAVES = {"hvmodel.guest.image"}


def module_files() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = module_files()


def imports_of(name: str, path: Path) -> set[str]:
    """Every hvmodel module ``name`` imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t == "hvmodel" or t.startswith("hvmodel."):
                while t not in MODULES:
                    t = t.rsplit(".", 1)[0]
                if t != name:
                    out.add(t)
    return out


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, the layer's package) of a module."""
    best = None
    for i, (_, pkgs) in enumerate(LAYERS):
        for pkg in pkgs:
            exact = pkg in ("hvmodel", "hvmodel.__main__", "hvmodel.cli", "hvmodel.pytest_plugin")
            if name == pkg or (not exact and name.startswith(pkg + ".")):
                if best is None or len(pkg) > len(best[1]):
                    best = (i, pkg)
    assert best is not None, f"{name} is in no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)"
    return best


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer_of(name)


def test_nothing_in_the_library_imports_the_cli():
    users = sorted(m for m, deps in GRAPH.items() if "hvmodel.cli" in deps and m != "hvmodel.__main__")
    assert users == []


def test_imports_point_down_the_layers():
    bad = []
    for mod, deps in GRAPH.items():
        mi, mpkg = layer_of(mod)
        for dep in deps:
            if dep in LEAVES:
                continue
            di, dpkg = layer_of(dep)
            same_package = dpkg == mpkg or mod.startswith(dpkg + ".") or dep.startswith(mpkg + ".")
            if di < mi or (di == mi and not same_package):
                bad.append(f"{mod} ({LAYERS[mi][0]}) imports {dep} ({LAYERS[di][0]})")
    assert bad == []


def test_leaf_modules_import_nothing_of_hvmodel():
    for leaf in LEAVES:
        assert GRAPH[leaf] == set()


def test_no_import_cycle_between_files():
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_checks_see_function_level_and_type_checking_imports(tmp_path):
    # The collector must not miss the forms that hid the old cycles.
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .vm.vm import VM\n"
                   "def f():\n    from . import cli\n    import hvmodel.host.host\n")
    got = imports_of("hvmodel.m", src)
    assert got == {"hvmodel.vm.vm", "hvmodel.cli", "hvmodel.host.host"}


def test_no_module_over_800_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, "split these along their sections"
