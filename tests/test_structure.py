"""The package structure, read statically with ``ast`` (no imports, fast).

* No import cycle among the modules of ``ttt_jax`` and ``parallel`` (imports inside functions
  count too: a lazy import hides a cycle, it does not remove it). A module importing an ancestor
  package (``from ttt_jax.ops import attention_cp_ring`` in ``ttt_jax.ops.attention_cp``) is not an
  edge: Python initialises the package first anyway.
* ``ttt_jax.parallel`` (the top-level ``parallel/`` folder) imports only JAX, numpy and the standard library, never the rest of ``ttt_jax``.
* No private name (leading underscore) imported from another module, or read from an imported
  module (``mod._name``), anywhere in ``ttt_jax`` or ``parallel`` (library layers and applications
  alike): a helper shared by two modules is public and named for what it does.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ttt_jax", "parallel")      # source folders
# The folder each is imported as: the top-level parallel/ is ttt_jax.parallel (see ttt_jax/__init__.py).
IMPORTED_AS = {"ttt_jax": "ttt_jax", "parallel": "ttt_jax.parallel"}
PARALLEL_MAY_IMPORT = {"jax", "jaxlib", "numpy"}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            parts[0:1] = IMPORTED_AS[pkg].split(".")
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _imports(path: Path, module: str) -> list[tuple[str, str | None]]:
    """``(imported module, imported name or None)`` for every absolute import in the file; relative
    imports are resolved against ``module``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((a.name, None) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.extend(_imports_of(node, path, module))
    return out


def _imports_of(node: ast.ImportFrom, path: Path, module: str) -> list[tuple[str, str]]:
    base = node.module or ""
    if node.level:
        is_pkg = path.name == "__init__.py"
        parent = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
        base = ".".join(parent + ([base] if base else []))
    return [(base, a.name) for a in node.names]


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges = {}
    for m, f in mods.items():
        deps = set()
        for mod, name in _imports(f, m):
            target = f"{mod}.{name}" if name and f"{mod}.{name}" in mods else mod
            if target in mods and target != m and not m.startswith(target + "."):
                deps.add(target)
        edges[m] = deps
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _in(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _private_imports(mods: dict[str, Path], scope) -> list[str]:
    bad = []
    for m, f in mods.items():
        if not _in(m, scope):
            continue
        for mod, name in _imports(f, m):
            if (name and name.startswith("_") and not name.startswith("__") and mod in mods
                    and mod != m and f"{mod}.{name}" not in mods):
                bad.append(f"{m} imports {mod}.{name}")
        bad.extend(f"{m} uses {target}.{attr}" for target, attr in _module_attributes(f, m, mods)
                   if attr.startswith("_") and not attr.startswith("__") and target != m)
    return bad


def _module_attributes(path: Path, module: str, mods: dict[str, Path]) -> list[tuple[str, str]]:
    """``(module, attribute)`` for every ``alias.attr`` where ``alias`` names an imported module of
    the packages (``from ttt_jax.ops import attention as A`` ... ``A._auto_impl``)."""
    alias, tree = {}, ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            alias.update({a.asname or a.name: a.name for a in node.names if a.name in mods})
        elif isinstance(node, ast.ImportFrom):
            for (mod, name), a in zip(_imports_of(node, path, module), node.names):
                if f"{mod}.{name}" in mods:
                    alias[a.asname or a.name] = f"{mod}.{name}"
    return [(alias[n.value.id], n.attr) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in alias]


def test_no_import_cycle():
    cycles = _cycles(_graph(_modules()))
    assert not cycles, f"import cycles: {cycles}"


def test_parallel_imports_only_jax_numpy_and_the_standard_library():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = []
    for m, f in _modules().items():
        if _in(m, ("ttt_jax.parallel",)):
            for mod, _ in _imports(f, m):
                top = mod.split(".")[0]
                if top not in stdlib and top not in PARALLEL_MAY_IMPORT and not _in(mod, ("ttt_jax.parallel",)):
                    bad.append(f"{m} imports {mod}")
    assert not bad, bad


def test_no_private_name_imported_across_modules():
    bad = _private_imports(_modules(), ("ttt_jax",))
    assert not bad, bad


def test_every_subpackage_is_checked():
    """Every folder of modules under ``ttt_jax`` / ``parallel`` is a package (has ``__init__.py``)
    that the module walk finds, so the checks above cover the applications too."""
    mods = _modules()
    subpackages = {".".join([IMPORTED_AS[pkg], *d.relative_to(ROOT / pkg).parts]) for pkg in PACKAGES
                   for d in [ROOT / pkg, *(ROOT / pkg).rglob("*")] if d.is_dir()
                   and d.name != "__pycache__" and any(d.glob("*.py"))}
    assert subpackages and subpackages <= set(mods), sorted(subpackages - set(mods))
    assert {"ttt_jax.bench", "ttt_jax.compile", "ttt_jax.convert", "ttt_jax.infer",
            "ttt_jax.train"} <= subpackages


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The checks find a planted cycle, a planted private import and a planted ttt_jax import."""
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "parallel" / "a.py").write_text("from ttt_jax.parallel.b import _helper\nimport ttt_jax\n")
    (tmp_path / "parallel" / "b.py").write_text("def f():\n    from . import a\n")
    (tmp_path / "ttt_jax" / "app").mkdir()
    (tmp_path / "ttt_jax" / "app" / "__init__.py").write_text("")
    (tmp_path / "ttt_jax" / "app" / "cli.py").write_text(
        "def main():\n    from ttt_jax.app.engine import _pad\n")
    (tmp_path / "ttt_jax" / "app" / "engine.py").write_text("def _pad():\n    pass\n")
    (tmp_path / "ttt_jax" / "app" / "plots.py").write_text(
        "from ttt_jax.app import engine as E\nE._pad()\n")
    mods = _modules(tmp_path)
    assert _cycles(_graph(mods)) == [["ttt_jax.parallel.a", "ttt_jax.parallel.b"]]
    assert sorted(_private_imports(mods, ("ttt_jax",))) == [
        "ttt_jax.app.cli imports ttt_jax.app.engine._pad", "ttt_jax.app.plots uses ttt_jax.app.engine._pad",
        "ttt_jax.parallel.a imports ttt_jax.parallel.b._helper"]
    assert ("ttt_jax", None) in _imports(mods["ttt_jax.parallel.a"], "ttt_jax.parallel.a")
