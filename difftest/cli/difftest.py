"""``qcow2lab difftest``: the differential campaign (difftest/core/campaign.py) from the command line.

    qcow2lab difftest [--examples N] [--steps N] [--seed S] [--targets model,qemu,...]
                      [--profile quick|ci|deep] [--config KEY=VAL ...] [--jobs N]
                      [--readers dissect,py:MODULE[:NAME]] [--adapter-timeout S]
                      [--adapter-memory MIB] [--db DIR] [--repro DIR] [--time-budget SECONDS]
                      [--shrink-seconds S] [--output=human|json]

--config VAL may be a set (backing=none,qcow2) or an exclusion (backing=!raw, !a,b).
Foreign adapters run in worker processes under --adapter-timeout and --adapter-memory; their
findings are classed hang, crash, memory, error or wrong-bytes, and what they do not support
is noted "unsupported:" rather than reported (difftest/adapters/__init__.py).

Exit status: 0 when every target agreed everywhere, 1 on any divergence (or when fewer than
two targets can run), as a test runner would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from difftest.adapters import isolation
from difftest.cli import damaged
from difftest.core import qemuio
from difftest.core.campaign import PROFILES, Shard, Stats, run_shards
from difftest.core.config import parse_overrides
from difftest.core.targets import default_targets, module_available


def add_campaign_args(p: argparse.ArgumentParser, *, profile: str = "quick") -> None:
    p.add_argument("--examples", type=int, help="examples (Hypothesis test cases) in all; "
                   "default from the profile")
    p.add_argument("--steps", type=int, help="maximum operations per example; default from the profile")
    p.add_argument("--seed", type=int, default=0, help="first seed (shard k uses seed+k); default 0")
    p.add_argument("--targets", help="comma-separated: model, impl, qemu, qemu2, cmd:NAME=ARGV, "
                   "py:MODULE (default: model and impl when usable, and qemu)")
    p.add_argument("--readers", default="", help="comma-separated read-only adapters that read every "
                   "file at teardown: 'dissect' (dissect.hypervisor), 'libqcow' (libyal's libqcow; both "
                   "pip-installed on first use) or "
                   "py:MODULE[:NAME] (see difftest/adapters/__init__.py)")
    p.add_argument("--adapter-timeout", type=float, metavar="S",
                   help="wall-clock seconds a foreign adapter (py: reader or target other than model "
                   f"and impl, cmd: target) may take per call before it is killed as a hang (default "
                   f"{isolation.TIMEOUT:g}; env {isolation.TIMEOUT_ENV})")
    p.add_argument("--adapter-memory", type=int, metavar="MIB",
                   help="address space (MiB) an adapter's worker may grow by, RLIMIT_AS; beyond it "
                   f"the finding is 'memory' (default {isolation.MEMORY_MIB}; env {isolation.MEMORY_ENV})")
    p.add_argument("--profile", choices=sorted(PROFILES), default=profile)
    p.add_argument("--config", action="append", default=[], metavar="KEY=VAL",
                   help="pin a configuration field (version, cluster_size, refcount_bits, extended_l2, "
                   "compression_type, lazy_refcounts, backing, backing_size, data_file, data_file_raw, size, "
                   "the open options l2_cache_size, l2_cache_entry_size, refcount_cache_size, overlap_check, "
                   "and encryption: encrypt=none|luks|aes, encrypt_cipher=aes-256-xts-plain64|"
                   "aes-128-cbc-essiv|aes-256-cbc-plain, encrypt_backing=on|off); e.g. --config encrypt=luks "
                   "runs LUKS images only. VAL may be a set, --config backing=none,qcow2 (draw only these), "
                   "or an exclusion, --config backing=!raw or cluster_size=!512,1k (never these); "
                   "repeated exclusions of one field add up")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (shards run in parallel)")
    p.add_argument("--shards", type=int, help="number of shards (default: jobs, or more under "
                   "--time-budget)")
    p.add_argument("--db", default=".hypothesis/difftest", help="example database directory "
                   "(failing examples are replayed first next time); 'none' to disable")
    p.add_argument("--repro", default="difftest-repro", help="where reproducers are written")
    p.add_argument("--time-budget", type=float, help="stop starting new shards after this many seconds")
    p.add_argument("--no-shrink", action="store_true", help="report the first failing sequence unshrunk")
    p.add_argument("--shrink-seconds", type=float, help="stop shrinking a failure after this many "
                   "seconds (default: Hypothesis's 300, or a third of --time-budget)")
    p.add_argument("--output", choices=["human", "json"], default="human")


def set_adapter_limits(args: argparse.Namespace) -> None:
    """The adapter limits go through the environment (difftest/adapters/isolation.py), so
    that shard processes and the replays of reproducers get them as well."""
    if getattr(args, "adapter_timeout", None) is not None:
        os.environ[isolation.TIMEOUT_ENV] = str(args.adapter_timeout)
    if getattr(args, "adapter_memory", None) is not None:
        os.environ[isolation.MEMORY_ENV] = str(args.adapter_memory)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("difftest", help="drive model, impl and qemu-io in lockstep and cross-check them",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_campaign_args(p)
    p.add_argument("--damaged", action="store_true",
                   help="start every example from a damaged image of the fuzz corpus and compare what each "
                   "side does with it (difftest/damaged/; see the README)")
    p.add_argument("--replay", metavar="CASE_JSON",
                   help="with --damaged: run a saved damaged-image case again")
    p.set_defaults(func=run)


def resolve_targets(spec: str | None, warn: Any) -> list[str]:
    wanted = [t.strip() for t in spec.split(",") if t.strip()] if spec else default_targets()
    out = []
    for t in wanted:
        if t.startswith("qemu") and not qemuio.available():
            warn(f"[bold red]WARNING: qemu-io/qemu-img not found: running WITHOUT the {t} target "
                 "(install qemu-utils)[/]")
            continue
        if t in ("model", "impl") and not module_available(t):
            warn(f"[bold yellow]{t} does not export create/open yet: skipped[/]")
            continue
        out.append(t)
    if not qemuio.available() and not spec:
        warn("[bold red]WARNING: qemu-io is not installed: the oracle is missing, only in-process "
             "targets are compared[/]")
    return out


def campaign(args: argparse.Namespace) -> tuple[Stats, list[str]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    quiet = args.output == "json"
    targets = resolve_targets(args.targets, lambda m: err.print(m))
    if len(targets) < 2:
        err.print(f"[bold red]need at least two targets, have {targets}[/]")
        return Stats(), targets
    prof = PROFILES[args.profile]
    examples = args.examples or prof["examples"]
    steps = args.steps or prof["steps"]
    jobs = max(1, args.jobs)
    overrides = parse_overrides(args.config)
    set_adapter_limits(args)
    nshards = args.shards or (jobs if not args.time_budget else max(jobs, 512))
    # Under a time budget shards are kept small, so the last one ends soon after the budget.
    per = max(1, -(-examples // nshards)) if not args.time_budget else 6
    readers = [r.strip() for r in args.readers.split(",") if r.strip()]
    if "dissect" in readers:
        from difftest.adapters.dissect_qcow2 import ensure_installed
        ensure_installed()  # once, before workers fork
    if "libqcow" in readers:
        from difftest.adapters import libqcow
        libqcow.ensure_installed()  # the same: one pip run, not one per worker
    shrink_seconds = args.shrink_seconds
    if shrink_seconds is None and args.time_budget:
        shrink_seconds = max(10.0, args.time_budget / 3)
    shards = [Shard(targets, args.seed + k, per, steps, overrides,
                    None if args.db == "none" else args.db, args.repro, shrink=not args.no_shrink,
                    readers=readers, shrink_seconds=shrink_seconds)
              for k in range(nshards)]
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    if not quiet:
        err.print(f"targets: [bold]{', '.join(targets)}[/]  readers: {', '.join(readers) or '-'}  "
                  f"profile: {args.profile}  examples: "
                  f"{'until budget' if deadline else examples}  steps<= {steps}  jobs: {jobs}  "
                  f"seed: {args.seed}")
    counts = {"steps": 0, "examples": 0, "div": 0}
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("steps {task.fields[steps]}  divergences [red]{task.fields[div]}"),
                        TimeElapsedColumn(), console=err, disable=quiet, transient=False)
    total = examples if not deadline else None
    with progress:
        task = progress.add_task("examples", total=total, steps=0, div=0)

        def on_event(kind: str, value: Any) -> None:
            if kind == "step":
                counts["steps"] += int(value)
            elif kind == "example":
                counts["examples"] += 1
            elif kind == "divergence":
                counts["div"] += 1
            progress.update(task, completed=counts["examples"], steps=counts["steps"], div=counts["div"])

        stats = run_shards(shards, jobs, on_event, deadline)
    return stats, targets


def summary(stats: Stats, targets: list[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console()
    t = Table(title="difftest summary", show_header=False)
    t.add_row("targets", ", ".join(targets))
    t.add_row("shards / examples / steps", f"{stats.shards} / {stats.examples} / {stats.steps}")
    t.add_row("configurations covered", str(len(stats.configs)))
    t.add_row("operations run", str(sum(stats.ops.values())))
    t.add_row("ops/second (wall, incl. set-up and teardown checks)", f"{stats.ops_per_second:.0f}")
    t.add_row("elapsed", f"{stats.elapsed:.1f} s")
    findings = stats.findings()
    t.add_row("distinct findings (times met)", f"[{'red' if findings else 'green'}]"
              f"{len(findings)} ({sum(hits for _, hits, _ in findings)})[/]")
    con.print(t)
    ops = Table(title="operations")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for name, n in stats.ops.most_common():
        ops.add_row(name, str(n))
    con.print(ops)
    if stats.notes:
        con.print("notes: " + "; ".join(f"{k} (x{v})" for k, v in stats.notes.items()))
    # One bug is met by many examples and shards, with different offsets and paths in its
    # message: report each distinct finding (signature, difftest/core/signature.py) once,
    # with how often it was met and its smallest reproducer.
    for best, hits, ds in findings:
        seeds = ", ".join(str(d.seed) for d in ds[:8]) + (" ..." if len(ds) > 8 else "")
        con.print(f"[bold red]FINDING[/] {escape(best.key)}: met x{hits} (seeds {seeds}; "
                  f"{best.steps} step{'s' if best.steps != 1 else ''}): {escape(best.message)}")
        if not any(d.reproduced for d in ds):
            con.print("  [yellow]did not fail again when its reproducer was replayed: flaky (load, "
                      "timing or a limit); its repro.sh and test_repro.py may pass[/]")
        if best.repro_dir:
            con.print(f"  reproducers: {best.repro_dir}/repro.sh (qemu side), "
                      f"{best.repro_dir}/test_repro.py (pytest)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "damaged", False):
        return damaged.run(args)
    if args.output == "json":
        # Hypothesis prints its reports (a shrink that hit its time limit, ...) on stdout, in
        # this process and in the shard workers, which inherit the descriptor: while the
        # campaign runs, descriptor 1 is stderr, so stdout holds the JSON alone.
        with _stdout_on_stderr():
            stats, targets = campaign(args)
    else:
        stats, targets = campaign(args)
    if args.output == "json":
        out = stats.to_json()
        out["targets"] = targets
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        summary(stats, targets)
    return 1 if stats.divergences or len(targets) < 2 else 0


@contextlib.contextmanager
def _stdout_on_stderr() -> Iterator[None]:
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # whatever sys.stdout is (a test's capture)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
