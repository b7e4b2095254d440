"""``qcow2lab conformance``: other qcow2 readers against QEMU, one short campaign per
feature area and reader (difftest/conformance/), printed as a matrix.

    qcow2lab conformance --readers dissect,libqcow[,py:MODULE[:NAME]] [--areas a,b,...]
                         [--time-budget S | --total-budget S] [--seed N] [--jobs N] [--out DIR]
                         [--output=table|json|markdown]

Each cell is pass, unsupported, or the class of the reader's finding (wrong bytes, error,
hang, crash, memory) with the folder of its minimal reproducer (repro.sh runs the reader and
exits non-zero while the bug is there; test_repro.py is the same case as a pytest test).
Exit status: 0 when every cell passed or is unsupported, 1 when a reader has a finding or
a cell's process died (--jobs).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DEFAULT_BUDGET = 30.0


def register(sub: argparse._SubParsersAction) -> None:
    from difftest.conformance.areas import AREAS

    p = sub.add_parser("conformance", help="hold other qcow2 readers to QEMU, feature by feature",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readers", required=True, help="comma-separated: dissect, libqcow, py:MODULE[:NAME] "
                   "(see difftest/adapters/__init__.py)")
    p.add_argument("--areas", help="comma-separated feature areas (default all): "
                   + ", ".join(a.name for a in AREAS))
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--time-budget", type=float, help=f"seconds per cell (default {DEFAULT_BUDGET:.0f}; "
                        "a cell with a finding can take up to twice that, to shrink it)")
    budget.add_argument("--total-budget", type=float, help="seconds for the whole matrix, shared equally "
                        "by the cells (--jobs of them at a time)")
    p.add_argument("--seed", type=int, default=0, help="first seed of every cell's campaign")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, each in a process of its own "
                   "(default 1). With --time-budget N jobs take about 1/N of the time; with "
                   "--total-budget each cell gets about N times as long. Cells share the CPUs: "
                   "more jobs than cores give each cell fewer examples")
    p.add_argument("--out", default="conformance-repro", help="where the cells' reproducers are written")
    p.add_argument("--output", choices=["table", "json", "markdown"], default="table")
    p.set_defaults(func=run)


def _versions(readers: list[str]) -> dict[str, str]:
    """The installed version of each shipped reader (for the matrix's caption)."""
    out: dict[str, str] = {}
    for r in readers:
        try:
            if r == "dissect":
                from importlib.metadata import version

                from difftest.adapters.dissect_qcow2 import ensure_installed
                ensure_installed()
                out[r] = f"dissect.hypervisor {version('dissect.hypervisor')}"
            elif r == "libqcow":
                from difftest.adapters.libqcow import version as libqcow_version
                out[r] = f"libqcow {libqcow_version()}"
        except Exception as e:  # a missing reader shows in its cells; the caption says why
            out[r] = f"unavailable ({type(e).__name__})"
    return out


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from difftest.adapters import load
    from difftest.conformance import render
    from difftest.conformance.areas import select
    from difftest.conformance.matrix import Cell, run_matrix
    from difftest.core import qemuio

    err = Console(stderr=True)
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    if args.jobs < 1:
        err.print(f"[red]--jobs must be at least 1, not {args.jobs}[/]")
        return 2
    try:
        areas = select(args.areas)
    except ValueError as e:
        err.print(f"[red]{e}[/]")
        return 2
    if not qemuio.available():
        err.print("[bold red]qemu-img/qemu-io not found: the matrix needs QEMU as the oracle[/]")
        return 2
    for r in readers:  # a typo or a module off the path is the commonest first mistake
        try:
            load(r)
        except AttributeError as e:  # the module imported: the :NAME part is wrong
            err.print(f"[bold red]reader {r!r} cannot be loaded: {e}[/]\n"
                      "py:MODULE:NAME names an object of the module (or leave :NAME out for the "
                      "module itself).")
            return 2
        except (ImportError, ValueError) as e:
            err.print(f"[bold red]reader {r!r} cannot be loaded: {type(e).__name__}: {e}[/]\n"
                      "A py: reader's module must be importable: run from the directory that holds "
                      "its package or put that directory on PYTHONPATH.")
            return 2
    versions = _versions(readers)
    ncells = len(areas) * len(readers)
    jobs = min(args.jobs, ncells)
    # --total-budget: the cells run in ceil(ncells / jobs) waves, which share it.
    budget = (args.total_budget / -(-ncells // jobs) if args.total_budget
              else (args.time_budget or DEFAULT_BUDGET))
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("examples {task.fields[examples]}  findings [red]{task.fields[found]}"),
                        TimeElapsedColumn(), console=err,
                        disable=args.output != "table" and not err.is_terminal)
    counts = {"examples": 0, "found": 0}
    # Hypothesis reports on stdout (e.g. a shrink that hit its time limit), which is the
    # matrix's: it goes to stderr while the cells run.
    with progress, contextlib.redirect_stdout(sys.stderr):
        task = progress.add_task("cells", total=ncells, examples=0, found=0)

        def on_event(kind: str, value: Any) -> None:
            if kind == "example":
                counts["examples"] += 1
            progress.update(task, examples=counts["examples"], found=counts["found"])

        running: list[str] = []

        def on_start(cell: Cell) -> None:
            running.append(f"{cell.area} × {cell.reader}")
            progress.update(task, description=", ".join(running))

        def on_cell(cell: Cell) -> None:
            running.remove(f"{cell.area} × {cell.reader}")
            if cell.outcome not in ("pass", "unsupported", "not run"):
                counts["found"] += 1
            progress.update(task, advance=1, found=counts["found"], description=", ".join(running) or "done")

        cells = run_matrix(areas, readers, budget=budget, seed=args.seed, out=Path(args.out), jobs=jobs,
                           on_start=on_start, on_cell=on_cell, on_event=on_event)
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    meta = {"date": date, "versions": versions, "budget_per_cell_s": round(budget, 1), "seed": args.seed}
    if args.output == "json":
        print(render.to_json(cells, meta))
    elif args.output == "markdown":
        print(f"Measured {date}, {', '.join(versions.values()) or 'readers as given'}; "
              f"{budget:.0f} s per cell, seed {args.seed}.\n")
        print(render.to_markdown(cells))
    else:
        render.print_table(cells, f"conformance {date}: {', '.join(versions.values())}")
    died = [c for c in cells if c.died]
    for c in died:  # the harness failed there, not the reader: never a silent "not run"
        err.print(f"[bold red]{c.area} × {c.reader} did not run: {c.detail}[/]")
    return 1 if died or any(c.outcome not in ("pass", "unsupported", "not run") for c in cells) else 0
