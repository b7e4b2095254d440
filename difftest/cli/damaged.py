"""``qcow2lab difftest --damaged``: damaged images in lockstep with QEMU (difftest/damaged/).

    qcow2lab difftest --damaged [--seed S] [--examples N | --time-budget S]
                      [--targets model,impl,qemu] [--repro DIR] [--output=json]
    qcow2lab difftest --damaged --replay DIR/case.json

Exit status: 0 when every side agreed on every damaged image, 1 on any finding (with
--replay: 1 while the saved case still disagrees).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from difftest.damaged.campaign import Corpus, Stats, campaign, describe
from difftest.damaged.case import Case

DEFAULT_EXAMPLES = 200


def _engines(spec: str | None) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()] if spec else ["model", "impl", "qemu"]


def replay(path: Path, engines: list[str]) -> int:
    case = Case.from_json(json.loads(path.read_text()))
    work = path.parent / "replay"
    run = Corpus(work, case.seed).run(case, engines, work / "run")
    print(run.finding if run.finding is not None else "every side agrees")
    return 1 if run.finding is not None else 0


def run(args: argparse.Namespace) -> int:
    engines = _engines(args.targets)
    if args.replay:
        return replay(Path(args.replay), engines)
    console = Console(stderr=True)
    examples = args.examples if args.examples else (None if args.time_budget else DEFAULT_EXAMPLES)
    with Progress(TextColumn("damaged"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("", total=args.time_budget or examples)

        def tick(s: Stats) -> None:
            bar.update(task, completed=s.elapsed if args.time_budget else s.examples,
                       description=f"{s.examples} images, {s.operations} requests, {len(s.found)} findings")
        stats = campaign(seed=args.seed or 0, engines=engines, time_budget=args.time_budget,
                         examples=examples, repro_dir=Path(args.repro) / "damaged", on_example=tick)
    if args.output == "json":
        json.dump({"examples": stats.examples, "opened": stats.opened, "refused": stats.refused,
                   "operations": stats.operations, "elapsed_s": round(stats.elapsed, 1), "targets": engines,
                   "findings": [{"key": k, "message": describe(f), "hits": f.hits, "repro_dir": f.repro}
                                for k, f in stats.found.items()]}, sys.stdout, indent=2)
        print()
    else:
        console.print(f"{stats.examples} damaged images ({stats.opened} opened, {stats.refused} refused by "
                      f"every side), {stats.operations} requests, {stats.elapsed:.0f} s, targets "
                      f"{','.join(engines)}: {len(stats.found)} distinct finding(s)")
        for key, f in stats.found.items():
            console.print(f"[red]{key}[/]: {describe(f)}\n  reproducer: {f.repro}", highlight=False)
    return 1 if stats.found else 0
