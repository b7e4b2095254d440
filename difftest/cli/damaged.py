"""``qcow2lab difftest --damaged``: damaged images in lockstep with QEMU (difftest/damaged/).

    qcow2lab difftest --damaged [--seed S] [--examples N | --time-budget S]
                      [--targets model,impl,qemu] [--repro DIR] [--output=json]
    qcow2lab difftest --damaged --replay DIR/case.json

Exit status: 0 when every side agreed on every damaged image or every disagreement is a
named difference (difftest/damaged/notes.py, reported with its hits), 1 on any unexplained
finding (with --replay: 1 while the saved case still disagrees unexplained).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from difftest.damaged.campaign import SHRINK_SECONDS, Corpus, Stats, campaign, describe, explain_run
from difftest.damaged.case import Case

DEFAULT_EXAMPLES = 200


def _engines(spec: str | None) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()] if spec else ["model", "impl", "qemu"]


def replay(path: Path, engines: list[str]) -> int:
    case = Case.from_json(json.loads(path.read_text()))
    work = path.parent / "replay"
    corpus = Corpus(work, case.seed)
    run = corpus.run(case, engines, work / "run")
    if run.finding is None:
        print("every side agrees")
        return 0
    note = explain_run(corpus, run, engines, work / "again")
    print(run.finding if note is None else f"{run.finding}\n  named difference {note.name}: {note.reason}")
    return 1 if note is None else 0


def summary(stats: Stats, engines: list[str]) -> str:
    """One line: the figures of a damaged campaign (also in ``qcow2lab run``'s summary)."""
    open_notes = sum(f.hits for f in stats.noted.values() if f.note is not None and f.note.open)
    return (f"{stats.examples} damaged images ({stats.opened} opened, {stats.refused} refused by every "
            f"side), {stats.operations} requests, {stats.elapsed:.0f} s, targets {','.join(engines)}: "
            f"{len(stats.found)} unexplained finding(s), {len(stats.noted)} named difference(s) "
            f"({sum(f.hits for f in stats.noted.values())} hits, {open_notes} of them open engine gaps)")


def run(args: argparse.Namespace) -> int:
    engines = _engines(args.targets)
    if args.replay:
        return replay(Path(args.replay), engines)
    return run_campaign(args, engines)[0]


def run_campaign(args: argparse.Namespace, engines: list[str]) -> tuple[int, Stats]:
    """The campaign with a progress bar and its report; (exit status, figures)."""
    console = Console(stderr=True)
    examples = args.examples if args.examples else (None if args.time_budget else DEFAULT_EXAMPLES)
    with Progress(TextColumn("damaged"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("", total=args.time_budget or examples)

        def tick(s: Stats) -> None:
            bar.update(task, completed=s.elapsed if args.time_budget else s.examples,
                       description=f"{s.examples} images, {s.operations} requests, {len(s.found)} findings, "
                                   f"{len(s.noted)} named")
        shrink = getattr(args, "shrink_seconds", None)
        stats = campaign(seed=args.seed or 0, engines=engines, time_budget=args.time_budget,
                         examples=examples, repro_dir=Path(args.repro) / "damaged", on_example=tick,
                         shrink_seconds=SHRINK_SECONDS if shrink is None else shrink)
    if args.output == "json":
        json.dump({"examples": stats.examples, "opened": stats.opened, "refused": stats.refused,
                   "operations": stats.operations, "elapsed_s": round(stats.elapsed, 1), "targets": engines,
                   "findings": [{"key": k, "message": describe(f), "hits": f.hits, "repro_dir": f.repro}
                                for k, f in stats.found.items()],
                   "named_differences": [{"key": k, "note": f.note.name if f.note else None,
                                          "open": bool(f.note and f.note.open), "message": describe(f),
                                          "hits": f.hits, "repro_dir": f.repro}
                                         for k, f in stats.noted.items()]}, sys.stdout, indent=2)
        print()
    else:
        console.print(summary(stats, engines), highlight=False)
        for key, f in stats.noted.items():
            console.print(f"[yellow]{key}[/]: {describe(f)}\n  reproducer: {f.repro}", highlight=False)
        for key, f in stats.found.items():
            console.print(f"[red]{key}[/]: {describe(f)}\n  reproducer: {f.repro}", highlight=False)
    return (1 if stats.found else 0), stats
