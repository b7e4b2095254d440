"""``qcow2lab fuzz``: run the corruption-mutant corpus through every reader (difftest/corpus/fuzz.py).

    qcow2lab fuzz [--images N] [--seed S] [--jobs J] [--time-limit SEC] [--memory-limit MIB]
                  [--keep DIR] [--qemu]

Builds the base images with qemu-img, generates N deterministic mutants from the seed (the
named, targeted mutations first, then random bit flips in metadata clusters) and probes each
in a sandboxed worker. Exit code 0 when no probe crashed, hung or blew the memory cap, 1
otherwise. ``--keep DIR`` writes every finding's image there to reproduce it; ``--qemu`` also
asks ``qemu-img check`` about each mutant and tabulates its verdicts against spec.rules'.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from difftest.corpus import fuzz
from difftest.corpus.mutate import Mutant, build_bases, iter_corpus, qemu_verdict

CHECK_EXIT_KIND = {0: "clean", 1: "check-errors", 2: "corruptions", 3: "leaks"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuzz", help="probe the readers with deterministic corrupted images")
    p.add_argument("--images", type=int, default=200, metavar="N", help="number of mutants (default 200)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="corpus seed (default 0)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), metavar="J",
                   help="worker processes (default: up to 2)")
    p.add_argument("--time-limit", type=float, default=fuzz.TIME_LIMIT, metavar="SEC",
                   help="CPU seconds per probe per image (default 1)")
    p.add_argument("--memory-limit", type=int, default=fuzz.MEMORY_LIMIT >> 20, metavar="MIB",
                   help=f"memory growth allowed per image, MiB (default {fuzz.MEMORY_LIMIT >> 20})")
    p.add_argument("--keep", metavar="DIR", help="write the image of every finding into DIR")
    p.add_argument("--qemu", action="store_true",
                   help="also run qemu-img check on every mutant and compare with spec.rules")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    out = Console()
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        console.print("qcow2lab fuzz: qemu-img and qemu-io are needed to write the base images")
        return 2
    with tempfile.TemporaryDirectory(prefix="qcow2lab-fuzz-") as wd:
        with console.status("building base images with qemu-img"):
            bases = build_bases(wd)
        probes, skipped = fuzz.available_probes()
        for name, why in skipped.items():
            console.print(f"[yellow]probe {name} skipped:[/] {why}")
        # Mutants stream through: only those in flight and those with findings stay in memory.
        in_flight: dict[str, Mutant] = {}

        def feed() -> Iterator[Mutant]:
            for m in iter_corpus(bases, args.images, args.seed):
                in_flight[m.name] = m
                yield m

        results: list[fuzz.Result] = []
        found: list[tuple[fuzz.Result, Mutant]] = []
        counts: collections.Counter[str] = collections.Counter()
        columns = (TextColumn("[bold]fuzz"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[counts]}"))
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("fuzz", total=args.images, counts="")
            for r in fuzz.iterate(feed(), jobs=args.jobs, time_limit=args.time_limit,
                                  memory_limit=args.memory_limit << 20, probes=probes):
                results.append(r)
                m = in_flight.pop(r.name)
                counts[r.outcome] += 1
                progress.update(task, advance=1, counts=_counts_text(counts))
                if r.finding:
                    found.append((r, m))
                    progress.console.print(f"[red]{r.outcome}[/] {r.name} ({r.probe}): {r.error}")
        _summary(out, args, results, probes)
        for r, m in found:
            out.print(f"\n[red bold]{r.outcome}[/] {r.name} in probe {r.probe}: {r.error}")
            out.print(f"  {m.description}")
            if r.detail:
                out.print(r.detail, markup=False, highlight=False)
        if args.keep and found:
            keep = Path(args.keep)
            for r, m in found:
                m.write(keep / r.name.replace("@", "-"))
            out.print(f"findings written under {keep}")
        if args.qemu:
            _compare_with_qemu(out, console, iter_corpus(bases, args.images, args.seed), args.images, wd)
        findings = [r for r, _ in found]
    return 1 if findings else 0


def _counts_text(counts: collections.Counter[str]) -> str:
    bad = sum(counts[k] for k in fuzz.FINDING_KINDS)
    colour = "red" if bad else "green"
    return f"ok {counts['ok']}  rejected {counts['rejected']}  [{colour}]findings {bad}[/]"


def _summary(out: Console, args: argparse.Namespace, results: list[fuzz.Result], probes: list[str]) -> None:
    out.print(f"qcow2lab fuzz: {len(results)} mutants, seed {args.seed}, probes: {', '.join(probes)}")
    t = Table()
    t.add_column("outcome")
    t.add_column("mutants", justify="right")
    counts = collections.Counter(r.outcome for r in results)
    for k in ("ok", "rejected", *fuzz.FINDING_KINDS):
        t.add_row(k, str(counts[k]), style="red" if k in fuzz.FINDING_KINDS and counts[k] else None)
    out.print(t)
    rej = collections.Counter(f"{p}: {cls}" for r in results for p, cls in r.rejections.items())
    if rej:
        rt = Table()
        rt.add_column("rejected by probe: class")
        rt.add_column("mutants", justify="right")
        for k, v in sorted(rej.items()):
            rt.add_row(k, str(v))
        out.print(rt)
    if results:
        peak = max(results, key=lambda r: r.peak)
        slow = max(results, key=lambda r: r.cpu)
        out.print(f"largest memory peak: {peak.peak / 2**20:.1f} MiB ({peak.name}); "
                  f"slowest probe: {slow.cpu * 1000:.0f} ms CPU ({slow.name})")


def _compare_with_qemu(out: Console, console: Console, mutants: Iterable[Mutant], total: int,
                      wd: str) -> None:
    """Tabulate qemu-img check's verdict against spec.rules' for every mutant."""
    from spec.errors import Qcow2Error
    from spec.rules.check import check

    table: collections.Counter[tuple[str, str]] = collections.Counter()
    missed = []
    with Progress(TextColumn("[bold]qemu-img check"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("qemu", total=total)
        for m in mutants:
            d = Path(wd) / "qemu" / m.name.replace("@", "-")
            p = m.write(d)
            theirs = qemu_verdict(p, oracle=m.oracle, timeout=10).kind
            try:
                ours = "refused" if m.oracle == "chain" else _our_kind(p, check(p).exit_code)
            except Qcow2Error as e:
                ours = f"error {type(e).__name__}"
            except Exception as e:  # already reported as a finding by the probes
                ours = f"crash {type(e).__name__}"
            table[(theirs, ours)] += 1
            if m.expect and theirs not in m.expect:
                missed.append((m.name, sorted(m.expect), theirs))
            shutil.rmtree(d)  # a long campaign must not fill the disk
            progress.advance(task)
    out.print("qemu-img check's verdict against spec.rules' (qcow2lab check) on the same mutants:")
    t = Table()
    t.add_column("qemu-img")
    t.add_column("spec.rules")
    t.add_column("mutants", justify="right")
    for (theirs, ours), n in sorted(table.items()):
        t.add_row(theirs, ours, str(n), style=None if theirs == ours else "yellow")
    out.print(t)
    for name, expect, got in missed:
        out.print(f"[yellow]QEMU's verdict on {name} is {got}, the mutation intends {expect}[/]")


def _our_kind(path: Path, exit_code: int) -> str:
    # spec.rules reports an image it cannot open as check-errors (exit 1); qemu-img prints no
    # report at all then, which mutate.qemu_verdict calls "refused". Tell them apart by opening.
    from spec.errors import FormatError, UnsupportedFeature
    from spec.image import open_image

    try:
        open_image(path).close()
    except (FormatError, UnsupportedFeature):
        return "refused"
    return CHECK_EXIT_KIND.get(exit_code, f"exit {exit_code}")
