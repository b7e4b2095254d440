"""DESIGN.md's dependency rule: spec <- model, spec <- impl, and spec, model, impl <- difftest.

The differential test only means something if the model and the impl share nothing but
spec/, so this is enforced on the source, not trusted.
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
