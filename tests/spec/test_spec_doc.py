"""docs/spec.md is the committed output of ``qcow2lab spec``; these tests keep it current,
deterministic and complete (every structure, field, feature bit, limit and rule is in it).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import construct as c
import pytest

from difftest.cli import spec as spec_command
from spec import entries, features, limits
from spec.registry import STRUCTURES
from spec.render import (
    LayoutError,
    Row,
    _cell,
    _condition_text,
    bit_runs,
    format_range,
    layout,
    module_constants,
    render_markdown,
    structure_rows,
)
from spec.rules import RULES

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "spec.md"


@pytest.fixture(scope="module")
def rendered() -> str:
    return render_markdown()


def test_docs_spec_md_is_current(rendered: str) -> None:
    assert DOC.exists(), "docs/spec.md is missing: run `make spec`"
    assert DOC.read_text(encoding="utf-8") == rendered, (
        "docs/spec.md is stale (schemas, registry, features, limits or rules changed): run `make spec`"
    )


def test_render_is_deterministic_across_processes(rendered: str) -> None:
    """Same bytes whatever the hash seed (set/dict order must not leak into the document)."""
    code = ("import sys; from spec.render import render_markdown; "
            "sys.stdout.buffer.write(render_markdown().encode())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, check=True)
    assert out.stdout.decode("utf-8") == rendered
    assert render_markdown() == rendered


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcow2lab")
    spec_command.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_prints_the_document(rendered: str, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buf, encoding="utf-8"))
    args = _parser().parse_args(["spec"])
    assert args.func(args) == 0
    assert buf.getvalue().decode("utf-8") == rendered


def test_cli_check_flags_a_stale_file(rendered: str, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh.md"
    fresh.write_text(rendered, encoding="utf-8")
    stale = tmp_path / "stale.md"
    stale.write_text(rendered.replace("| 4-7 | `version` |", "| 4-8 | `version` |", 1), encoding="utf-8")
    assert stale.read_text(encoding="utf-8") != rendered
    parser = _parser()
    for path, code in ((fresh, 0), (stale, 1), (tmp_path / "absent.md", 1)):
        args = parser.parse_args(["spec", "--check", str(path)])
        assert args.func(args) == code, path


def test_cli_verb_is_registered() -> None:
    from difftest.cli import COMMANDS

    assert "spec" in COMMANDS


# --- Completeness -----------------------------------------------------------------------------


def test_every_structure_and_field_is_documented(rendered: str) -> None:
    for s in STRUCTURES:
        assert f"### {s.title}\n" in rendered, s.key
        rows = structure_rows(s)
        assert rows, s.key
        for row in rows:
            assert row.doc, f"{s.key}.{row.path} has no construct doc"
            line = f"| {format_range(row, s.unit)} | `{row.path}` | "
            assert line in rendered, line


def test_every_feature_bit_is_listed(rendered: str) -> None:
    for f in features.FEATURES:
        assert f"| `{f.type.name.lower()}_features` | {f.bit} | 0x{1 << f.bit:x} | {f.name} |" in rendered


def test_every_limit_is_listed_with_its_value(rendered: str) -> None:
    consts = module_constants(limits)
    assert {n for n, _, _ in consts} == {n for n in vars(limits) if n.isupper()}
    for name, value, doc in consts:
        assert value == getattr(limits, name)
        row = next(line for line in rendered.splitlines() if line.startswith(f"| `{name}` |"))
        if isinstance(value, int):
            assert f"| {value}" in row, row
        if doc:
            assert doc.split()[0] in row


def test_every_rule_is_listed(rendered: str) -> None:
    section = rendered[rendered.index("## Rules catalogue"):]
    assert f"({len(RULES)} rules)" in section
    for r in RULES:
        line = next(x for x in section.splitlines() if x.startswith(f"| `{r.id}` |"))
        assert _cell(r.statement) in line
        assert _cell(r.source) in line
        assert str(getattr(r.severity, "value", r.severity)) in line
    ids = [r.id for r in RULES]
    assert len(ids) == len(set(ids))


def test_every_entry_mask_is_listed(rendered: str) -> None:
    section = rendered[rendered.index("### QEMU's entry masks\n"):]
    masks = [(n, v) for n, v, _ in module_constants(entries) if isinstance(v, int) and v >= 0]
    assert len(masks) >= 14
    for name, value in masks:
        runs = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in bit_runs(value))
        assert f"| `{name}` | 0x{value:016x} | {runs} |" in section


def test_extension_data_row_names_every_payload(rendered: str) -> None:
    line = next(x for x in rendered.splitlines() if x.startswith("| 8+ (variable) | `data` |"))
    for case in ("0x6803f857: array of Feature name table entry", "0x23852875: Bitmaps extension",
                 "0x0537be77: Full disk encryption header pointer", "any other value: raw bytes"):
        assert case in line


def test_refcount_block_table_has_every_order(rendered: str) -> None:
    section = rendered[rendered.index("### Refcount block\n"):]
    for order in range(limits.MAX_REFCOUNT_ORDER + 1):
        assert f"\n| {order} | {1 << order} | " in section


# --- Renderer details ---------------------------------------------------------------------------


def test_format_range() -> None:
    assert format_range(Row("a", "a", 0, 3, "", None), "bytes") == "0-3"
    assert format_range(Row("a", "a", 104, 104, "", None), "bytes") == "104"
    assert format_range(Row("a", "a", 105, None, "", None), "bytes") == "105+ (variable)"
    assert format_range(Row("a", "a", None, None, "", None), "bytes") == "variable"


def test_condition_text_names_the_field() -> None:
    assert _condition_text(c.this._.extra_data_size >= 8) == "extra_data_size >= 8"
    assert _condition_text(c.this.version >= 3) == "version >= 3"
    assert _condition_text(lambda ctx: True) == "conditional"


def test_table_cells_escape_pipes() -> None:
    assert _cell("a | b\n  c") == "a \\| b c"


def test_conditional_fields_are_laid_out_present() -> None:
    schema = c.Struct("n" / c.Int8ub * "count", "x" / c.If(c.this.n > 0, c.Int16ub) * "maybe",
                      "y" / c.Int32ub * "after")
    assert [(r.path, r.span, r.condition) for r in layout(schema)] == [
        ("n", (0, 0), None), ("x", (1, 2), "n > 0"), ("y", (3, 6), None),
    ]


def test_unknown_schemas_are_refused() -> None:
    with pytest.raises(LayoutError):
        layout(c.Int64ub)
    with pytest.raises(LayoutError):
        layout(c.Struct(c.Padding(4)))
