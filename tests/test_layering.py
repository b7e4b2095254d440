"""DESIGN.md's dependency rule: spec <- model, spec <- impl, and spec, model, impl <- difftest,
with no import cycle inside a package.

The differential test only means something if the model and the impl share nothing but
spec/, so this is enforced on the source, not trusted. Cycles are found on the module graph
each package's source spells out: every import statement counts, inside functions and under
``if TYPE_CHECKING`` too (a deferred import is still a dependency, it only hides the cycle
from Python); importing a package's submodule does not count as importing the package's
``__init__``, and ``import_module`` counts only with a constant name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "spec": {"spec"},
    "model": {"spec", "model"},
    "impl": {"spec", "impl"},
    "difftest": {"spec", "model", "impl", "difftest"},
}
PROJECT = set(ALLOWED) | {"tests"}


def project_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant | ast.JoinedStr)):
            first = node.args[0]
            text = first.value if isinstance(first, ast.Constant) else "".join(
                v.value for v in first.values if isinstance(v, ast.Constant))
            found.add(str(text).split(".")[0])
    return found & PROJECT


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_respect_the_rule(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    for f in files:
        bad = project_imports(f) - ALLOWED[package]
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself can fail: a model module importing impl is caught."""
    f = tmp_path / "bad.py"
    f.write_text("import impl.cache\nfrom spec import errors\n")
    assert project_imports(f) == {"impl", "spec"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The modules among ``modules`` that ``path`` (module ``name``) imports: for
    ``from X import y``, X.y when that is a module, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            named += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            named += [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            named.append(node.args[0].value)
    found = set()
    for target in named:
        while target and target not in modules:  # pkg.mod.func -> pkg.mod
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports."""
    files = {module_name(f, package_dir.parent): f for f in sorted(package_dir.rglob("*.py"))}
    return {name: imported_modules(f, name, set(files)) for name, f in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_cycle_inside_a_package(package: str) -> None:
    found = cycles(import_graph(ROOT / package))
    assert not found, f"{package}/ has modules that import each other in a cycle: {found}"


def test_cycle_checker_sees_a_planted_cycle(tmp_path: Path) -> None:
    """The checker itself can fail: a cycle closed by a function-level relative import, and
    one through a package's submodule, are caught; a package importing its own submodules
    whose siblings import each other one way only is not a cycle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("from pkg.b import helper\n")
    (pkg / "b.py").write_text("def helper() -> None:\n    from . import a\n")
    (pkg / "c.py").write_text("import pkg.sub.d\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "d.py").write_text("from pkg import c\n")
    (pkg / "e.py").write_text("from pkg import a, b\n")
    graph = import_graph(pkg)
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.e"] == {"pkg.a", "pkg.b"}
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub.d"]]
