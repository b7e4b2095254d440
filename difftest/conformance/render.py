"""The conformance matrix as a rich table, JSON or Markdown: areas down, readers across,
each cell the outcome and the folder of its minimal reproducer (difftest/conformance/matrix.py)."""

from __future__ import annotations

import json
from typing import Any

from difftest.conformance.areas import BY_NAME
from difftest.conformance.matrix import Cell

LABELS = {"pass": "pass", "unsupported": "unsupported", "wrong-bytes": "wrong bytes", "error": "error",
          "hang": "hang", "crash": "crash", "memory": "memory", "not run": "not run"}
STYLES = {"pass": "green", "unsupported": "dim", "wrong-bytes": "bold red", "error": "red",
          "hang": "bold magenta", "crash": "bold magenta", "memory": "bold magenta", "not run": "dim"}


def _grid(cells: list[Cell]) -> tuple[list[str], list[str], dict[tuple[str, str], Cell]]:
    areas = list(dict.fromkeys(c.area for c in cells))
    readers = list(dict.fromkeys(c.reader for c in cells))
    return areas, readers, {(c.area, c.reader): c for c in cells}


def _finding(outcome: str, steps: int, repro: str | None, flaky: bool = False, grown: bool = False) -> str:
    text = LABELS.get(outcome, outcome)
    if grown:
        text += " (short-backing's, through a grow past the backing file)"
    if flaky:
        text += " (flaky: passed when replayed)"
    if repro:
        text += f", {steps} op{'s' if steps != 1 else ''}: {repro}"
    return text


def cell_text(c: Cell, sep: str = "; ") -> str:
    """One cell in plain words: each distinct finding's class, its reproducer's number of
    operations and folder (in matrix.classify's order), or pass / unsupported."""
    return sep.join([_finding(c.outcome, c.steps, c.repro, c.flaky, c.grown),
                     *(_finding(o.outcome, o.steps, o.repro, o.flaky, o.grown) for o in c.others)])


def to_json(cells: list[Cell], meta: dict[str, Any]) -> str:
    return json.dumps({**meta, "cells": [c.to_json() for c in cells]}, indent=2)


def to_markdown(cells: list[Cell]) -> str:
    areas, readers, grid = _grid(cells)
    lines = ["| area | " + " | ".join(readers) + " |", "|---|" + "---|" * len(readers)]
    for a in areas:
        title = BY_NAME[a].title if a in BY_NAME else a
        row = [cell_text(grid[(a, r)], "<br>").replace("|", "\\|") if (a, r) in grid else "" for r in readers]
        lines.append(f"| {a} ({title}) | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def print_table(cells: list[Cell], title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    areas, readers, grid = _grid(cells)
    t = Table(title=title, show_lines=True)
    t.add_column("area")
    for r in readers:
        t.add_column(r, overflow="fold")
    for a in areas:
        row = [escape(BY_NAME[a].title if a in BY_NAME else a)]
        for r in readers:
            c = grid.get((a, r))
            style = STYLES.get(c.outcome, "") if c is not None else ""
            row.append("" if c is None else f"[{style}]{escape(cell_text(c, chr(10)))}[/]")
        t.add_row(*row)
    Console().print(t)
