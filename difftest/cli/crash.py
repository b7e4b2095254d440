"""``qcow2lab crash``: the crash-consistency campaign (difftest/crash/).

Runs random operation sequences on each engine with its host I/O recorded, rebuilds every
state a power cut could leave (prefixes, reorderings after the last flush, torn writes) and
judges each with qemu-img check, the guest's durability rules and cross-reads by every engine
and qemu. Prints the states judged and the bad ones per engine; exit 1 on any bad state,
with the shrunk reproducer written to --repro-dir.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from difftest.crash import campaign


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crash", help="crash-consistency campaign: judge every state a power cut "
                       "can leave")
    p.add_argument("--engines", default="model", help="comma-separated: model, impl, qemu")
    p.add_argument("--time-budget", type=float, default=60.0, help="seconds per engine")
    p.add_argument("--seed", type=int, default=0, help="first seed (job k uses seed+k)")
    p.add_argument("--jobs", type=int, default=1, help="processes per engine")
    p.add_argument("--max-ops", type=int, default=12, help="operations per example")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VAL",
                   help="pin a configuration field (as in difftest)")
    p.add_argument("--reorder-samples", type=int, default=None, metavar="N",
                   help="reordered states drawn per epoch (the calls between two flushes): "
                   "every whole-call reordering when an epoch has at most N, then states in "
                   "which a write reached the disk in part (default 64)")
    p.add_argument("--skip-ops", default="", metavar="KIND,...",
                   help="operation kinds not drawn (write, write_zeroes, discard, "
                   "write_compressed, flush, reopen, resize, snapshot_create, snapshot_apply, "
                   "snapshot_delete)")
    p.add_argument("--shrink-seconds", type=float, default=120.0)
    p.add_argument("--repro-dir", type=Path, default=Path("crash-repro"))
    p.add_argument("--replay", type=Path, help="judge the state of a saved reproducer again")
    p.add_argument("--survey", action="store_true",
                   help="count bad states by kind instead of stopping at the first (the "
                   "default for the qemu engine, whose bad states are QEMU's own)")
    p.set_defaults(func=run)


def _one(engine: str, args: argparse.Namespace, overrides: dict[str, Any],
         seed: int) -> campaign.Report:
    from difftest.crash import campaign

    def progress(r: campaign.Report) -> None:
        print(f"\r{r.engine} (seed {seed}): {r.examples} examples, {r.total} states judged, "
              f"{sum(r.bad.values())} bad   ", end="", file=sys.stderr, flush=True)

    return campaign.campaign(engine, seconds=args.time_budget, seed=seed, max_ops=args.max_ops,
                             overrides=overrides, shrink_seconds=args.shrink_seconds,
                             on_example=progress, survey=args.survey or engine == "qemu",
                             reorders=args.reorder_samples or campaign.REORDERS,
                             skip_ops=frozenset(k.strip() for k in args.skip_ops.split(",")
                                                if k.strip()))


def _campaign(engine: str, args: argparse.Namespace, overrides: dict[str, Any]) -> campaign.Report:
    """``--jobs`` campaigns with seeds seed, seed+1, ... summed into one report."""
    from difftest.crash import campaign

    if args.jobs <= 1:
        return _one(engine, args, overrides, args.seed)
    with ProcessPoolExecutor(args.jobs) as pool:
        parts = list(pool.map(_one, [engine] * args.jobs, [args] * args.jobs,
                              [overrides] * args.jobs, range(args.seed, args.seed + args.jobs)))
    total = campaign.Report(engine)
    for r in parts:
        total.examples += r.examples
        total.judged += r.judged
        total.bad += r.bad
        total.configs += r.configs
        total.live_corrupt += r.live_corrupt
        total.named += r.named
        for name, f in r.samples.items():
            total.samples.setdefault(name, f)
        if r.failure is not None and total.failure is None:
            total.failure = r.failure
    return total


def defaults(**overrides: object) -> argparse.Namespace:
    """The options of a plain ``qcow2lab crash``, with ``overrides`` (for ``qcow2lab run``)."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["crash"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def run(args: argparse.Namespace) -> int:
    from difftest.core.config import parse_overrides
    from difftest.crash import repro

    if args.replay:
        res = repro.replay(args.replay)
        if res.failure is None:
            print(f"{args.replay}: the state is good now ({dict(res.judged)})")
            return 0
        print(res.failure.describe())
        return 1
    overrides = parse_overrides(args.config)
    status = 0
    rows = []
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        rep = _campaign(engine, args, overrides)
        print(file=sys.stderr)
        rows.append(rep)
        for i, (name, count) in enumerate(sorted(rep.named.items())):
            path = repro.save(rep.samples[name], args.repro_dir, f"{engine}-seed-{args.seed}-kind-{i}")
            print(f"{engine}: {count} bad states: {name}\n  first: {rep.samples[name].describe()}"
                  f"\n  reproducer: {path}\n".replace("\n", "\n  ").rstrip() + "\n")
        if rep.failure is not None:
            status = 1
            path = repro.save(rep.failure, args.repro_dir, f"{engine}-seed-{args.seed}")
            print(f"BAD crash state ({engine}), shrunk:\n{rep.failure.describe()}\n"
                  f"reproducer: {path} (qcow2lab crash --replay {path})\n")
    print(f"{'engine':8} {'examples':>8} {'configs':>7} {'prefix':>8} {'reordered':>9} "
          f"{'torn':>6} {'judged':>8} {'bad':>4} {'skipped':>7}")
    for r in rows:
        print(f"{r.engine:8} {r.examples:>8} {len(r.configs):>7} {r.judged['prefix']:>8} "
              f"{r.judged['reordered']:>9} {r.judged['torn']:>6} {r.total:>8} "
              f"{sum(r.bad.values()):>4} {r.live_corrupt:>7}")
    print("skipped: examples whose run leaves the file corrupt with no crash (QEMU 7.2's "
          "packing of compressed data into a reused cluster, which the model reproduces)")
    return status
