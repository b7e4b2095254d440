"""Running the conformance matrix: one short difftest campaign per (area, reader) cell.

Each cell is a campaign (difftest/core/campaign.py) of the model and qemu-io as writers
and the one reader, with the area's Config fields pinned, under a time budget. The model
goes first, so the reader is held to what the model reads from each file, and the model
is itself held to qemu-io by the same campaign. A cell's outcome:

- ``unsupported``: the reader declares one of the area's pinned values in its module's
  ``UNSUPPORTED`` (Config field -> values; the cell is not run), or it refused the images
  at open with UnsupportedFeature or NotImplementedError (an ``unsupported:`` note, or, from
  an older teardown, a reader finding that names the exception);
- a finding class (wrong bytes, crash, hang, memory, error) when the reader disagreed, with
  the reproducer folder of the smallest instance and its number of operations;
- ``pass`` when it read every file of every example as the model did.

Findings of the writers themselves (model against qemu-io) are not the reader's: they are
counted in the cell as ``other`` and left to ``qcow2lab difftest``.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftest.adapters import load
from difftest.conformance.areas import BY_NAME, Area
from difftest.conformance.snapshots import wrap
from difftest.core.campaign import Found, Shard, Stats, run_shards
from difftest.core.procpool import run_forked
from difftest.core.signature import READER_CLASSES, short_name

TARGETS = ["model", "qemu"]
STEPS = 12
"""Operations per example at most: reader bugs show on short sequences, and short examples
give a cell of a few seconds many configurations and files."""
EXAMPLES_PER_SHARD = 4
OUTCOMES = ("pass", "unsupported", "wrong-bytes", "error", "hang", "crash", "memory", "not run")


@dataclass
class Cell:
    area: str
    reader: str
    outcome: str = "not run"
    detail: str = ""
    repro: str | None = None
    steps: int = 0
    hits: int = 0
    examples: int = 0
    seconds: float = 0.0
    others: list[CellFinding] = field(default_factory=list)
    """The cell's other distinct reader findings, each with its own reproducer (a short
    backing file also has zero clusters over it: one cell can meet two bugs)."""
    harness: int = 0
    """Findings that are not the reader's (the writers disagreeing), left to difftest."""
    flaky: bool = False
    """The cell's finding did not fail again when its reproducer was replayed."""
    grown: bool = False
    """The cell's finding is the short-backing area's, met here by growing the image past its
    backing file (see grown_elsewhere)."""
    died: bool = False
    """The cell's process ended without reporting (--jobs): the harness failed there."""

    def to_json(self) -> dict[str, Any]:
        return {"area": self.area, "reader": self.reader, "outcome": self.outcome, "detail": self.detail,
                "repro": self.repro, "steps": self.steps, "hits": self.hits, "examples": self.examples,
                "flaky": self.flaky, "grown_past_backing": self.grown, "process_died": self.died,
                "seconds": round(self.seconds, 1), "others": [o.to_json() for o in self.others],
                "harness_findings": self.harness}


@dataclass
class CellFinding:
    outcome: str
    steps: int
    repro: str | None
    hits: int
    detail: str
    flaky: bool = False
    grown: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "steps": self.steps, "repro": self.repro, "hits": self.hits,
                "detail": self.detail, "flaky": self.flaky, "grown_past_backing": self.grown}


def declared_unsupported(reader: str, area: Area) -> str | None:
    """The pinned field and value ``reader``'s module declares unsupported, or None."""
    obj = load(reader)
    mod = obj if inspect.ismodule(obj) else inspect.getmodule(type(obj))
    declared: dict[str, Any] = getattr(obj, "UNSUPPORTED", None) or getattr(mod, "UNSUPPORTED", None) or {}
    for key, value in area.overrides.items():
        values = declared.get(key)
        if values is not None and value in values:
            return f"declares {key}={value} unsupported"
    return None


def finding_class_of(found: Found) -> str | None:
    """A reader finding's class from its signature; "unsupported" when the reader refused
    the image at open; None for a finding that is not the reader's."""
    if found.kind != "reader":
        return None
    if "UnsupportedFeature" in found.message or "NotImplementedError" in found.message:
        return "unsupported"
    for cls in READER_CLASSES:
        if found.signature.startswith(f"reader-{cls}-"):
            return cls
    return "error"


def grown_elsewhere(area: str, found: Found) -> bool:
    """Whether ``found`` is named ``shorter-backing`` in an area whose backing file is not
    shorter: the operations grew the image past its backing file (signature.grown_past_backing)
    and met what the short-backing area is about. The only feature operations can add to a
    configuration; the cell still reports it (its campaign met it), marked so."""
    pinned = BY_NAME[area].overrides.get("backing_size") if area in BY_NAME else None
    return pinned != "shorter" and "shorter-backing" in found.signature.split("--")[-1].split(",")


def classify(cell: Cell, stats: Stats) -> Cell:
    """Fill ``cell`` from its campaign's statistics (see the module docstring)."""
    cell.examples = stats.examples
    real: list[CellFinding] = []
    unsupported_finding: Found | None = None
    for best, hits, met in stats.findings():
        cls = finding_class_of(best)
        if cls is None:
            cell.harness += 1
        elif cls == "unsupported":
            unsupported_finding = best
        else:
            real.append(CellFinding(cls, best.steps, _shown(best.repro_dir), hits, best.message,
                                    not any(d.reproduced for d in met), grown_elsewhere(cell.area, best)))
    unsupported_notes = sum(n for k, n in stats.notes.items() if k.startswith("unsupported"))
    if real:
        # The area's own findings first, then the most met; on a tie the one with fewer
        # operations (the more basic bug).
        real.sort(key=lambda f: (f.grown, -f.hits, f.steps))
        top = real[0]
        cell.outcome, cell.repro, cell.steps, cell.hits, cell.detail, cell.flaky, cell.grown = \
            top.outcome, top.repro, top.steps, top.hits, top.detail, top.flaky, top.grown
        cell.others = real[1:]
    elif unsupported_finding is not None:
        cell.outcome, cell.detail = "unsupported", unsupported_finding.message
    elif unsupported_notes:
        cell.outcome = "unsupported"
        cell.detail = next(k for k in stats.notes if k.startswith("unsupported"))
    elif stats.examples and sum(stats.ops.values()):
        cell.outcome = "pass"
        cell.detail = f"{stats.examples} examples, {sum(stats.ops.values())} operations"
    else:  # the writers never got going (a harness finding): the reader was not tested
        cell.detail = next((best.message for best, _, _ in stats.findings()), "no example ran")
    return cell


def run_cell(area: Area, reader: str, *, budget: float, seed: int, out: Path,
             on_event: Callable[[str, Any], None] | None = None) -> Cell:
    """One cell: ``reader`` on ``area`` for about ``budget`` seconds. Shrinking a finding
    gets half the budget (at least 10 s) for Hypothesis and as much again for the deletion
    pass and the feature simplification, so a cell with a finding can take twice as long."""
    cell = Cell(area.name, reader)
    t0 = time.monotonic()
    why = declared_unsupported(reader, area)
    if why is not None:
        cell.outcome, cell.detail = "unsupported", why
        return cell
    spec = wrap(reader) if area.snapshots else reader
    # Absolute: qemu-img and qemu-io run in the targets' directories.
    where = out.resolve() / area.name / short_name(reader)
    shards = [Shard(TARGETS, seed + k, EXAMPLES_PER_SHARD, STEPS, area.overrides, db_dir=None,
                    repro_dir=str(where), readers=[spec], shrink_seconds=max(10.0, budget / 2),
                    workdir=str(where / "work"))
              for k in range(10_000)]
    try:
        stats = run_shards(shards, 1, on_event, deadline=t0 + budget)
    finally:  # also when interrupted: the work folder goes, and an empty cell folder
        _remove_workdir(where / "work")
        with contextlib.suppress(OSError):
            where.rmdir()
    cell.seconds = time.monotonic() - t0
    return classify(cell, stats)


def _shown(repro: str | None) -> str | None:
    """A reproducer folder relative to the current directory when under it (as the user
    named ``--out``)."""
    if repro and Path(repro).is_relative_to(Path.cwd()):
        return str(Path(repro).relative_to(Path.cwd()))
    return repro


def _remove_workdir(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def run_matrix(areas: list[Area], readers: list[str], *, budget: float, seed: int, out: Path,
               jobs: int = 1, on_start: Callable[[Cell], None] | None = None,
               on_cell: Callable[[Cell], None] | None = None,
               on_event: Callable[[str, Any], None] | None = None) -> list[Cell]:
    """Every (area, reader) cell, area by area, ``jobs`` cells at a time (each in a forked
    process of its own when jobs > 1, difftest/core/procpool.py); ``budget`` is per cell. The
    cells come back in matrix order whatever order they finish in; ``on_start`` and
    ``on_cell`` see each cell begin and end. A cell whose process died without reporting is
    "not run" with ``died`` set."""
    todo = [(area, reader) for area in areas for reader in readers]
    cells = [Cell(area.name, reader) for area, reader in todo]

    def run(i: int, events: Callable[[str, Any], None] | None) -> Cell:
        area, reader = todo[i]
        return run_cell(area, reader, budget=budget, seed=seed, out=out, on_event=events)

    def done(i: int, cell: Cell) -> None:
        cells[i] = cell
        if on_cell:
            on_cell(cell)

    def died(i: int, why: str) -> None:
        cells[i].died, cells[i].detail = True, f"the cell's process ended without reporting ({why})"
        done(i, cells[i])

    try:
        if jobs <= 1:
            for i in range(len(todo)):
                if on_start:
                    on_start(cells[i])
                done(i, run(i, on_event))
        else:
            run_forked(len(todo), run, jobs, on_result=done, on_died=died, on_event=on_event,
                       on_start=None if on_start is None else lambda i: on_start(cells[i]))
    finally:
        for area in areas:  # an area whose cells all passed leaves no empty folder (pruned
            with contextlib.suppress(OSError):  # here: another cell may be about to write there)
                (out / area.name).rmdir()
    return cells
