"""``qcow2lab bench <what>``: benchmarks that print figures taken in one run on this machine.

Each benchmark is a sub-verb; ``difftest`` measures the differential harness (difftest/bench/harness.py).
Other benchmarks can add their own sub-verb in ``SUBVERBS``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from difftest.core.campaign import PROFILES


def _difftest(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from difftest.bench import harness
    from difftest.core.config import Config

    cfg = Config(cluster_size=4096, size=64 << 20)
    rows = []
    for targets in harness.target_sets():
        row = {"steady": harness.steady_state(targets, args.ops, cfg, rounds=args.rounds)}
        if not args.no_campaign:
            row["campaign"] = harness.campaign(targets, args.examples, PROFILES["ci"]["steps"])
        rows.append(row)
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return 0
    t = Table(title=f"difftest throughput ({cfg.short()}; steady state: median of {args.rounds} "
                    f"rounds of {args.ops} ops)")
    for col in ("targets", "steady ops/s", "campaign ops/s (incl. set-up + teardown)", "campaign examples"):
        t.add_column(col, justify="right")
    for r in rows:
        camp = r.get("campaign", {})
        t.add_row(",".join(r["steady"]["targets"]), f"{r['steady']['ops_per_second']:.0f}",
                  f"{camp.get('ops_per_second', 0):.0f}" if camp else "-", str(camp.get("examples", "-")))
    Console().print(t)
    return 0


def _difftest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", type=int, default=3000, help="steady-state operations per round")
    p.add_argument("--rounds", type=int, default=3, help="steady-state rounds; the median is shown")
    p.add_argument("--examples", type=int, default=10, help="examples of the campaign figure")
    p.add_argument("--no-campaign", action="store_true")
    p.add_argument("--output", choices=["human", "json"], default="human")


def _check(args: argparse.Namespace) -> int:
    import subprocess
    import sys

    from difftest.bench import check as bench_check

    if args.damaged:
        from difftest.bench import damaged

        d = damaged.run(args.repeat)
        print(json.dumps(d, indent=2) if args.output == "json" else damaged.human(d))
        return 0
    try:
        r = bench_check.run(args.size, args.cluster_size, args.repeat)
    except subprocess.CalledProcessError as e:  # qemu-img create refused the geometry
        print(f"qcow2lab bench check: qemu-img create failed: {e.stderr.decode(errors='replace').strip()}",
              file=sys.stderr)
        return 1
    print(json.dumps(r, indent=2) if args.output == "json" else bench_check.human(r))
    return 0


def _size(text: str) -> int:
    from difftest.bench.check import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=_size, default="16G",
                   help="virtual size of the preallocated image (qemu-img syntax: 64M, 16G, 1T)")
    p.add_argument("--cluster-size", type=int, default=65536)
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each check (the median is shown)")
    p.add_argument("--damaged", action="store_true",
                   help="instead, both checks as whole processes on a wrecked image (688,323 "
                        "corruptions): time ratio (target <= 3x) and qcow2lab's memory growth "
                        "(target <= 64 MiB) (difftest/bench/damaged.py)")
    p.add_argument("--output", choices=["human", "json"], default="human")


def _impl(args: argparse.Namespace) -> int:
    """``qcow2lab bench impl [ROW]`` (difftest/bench/impl/): every row, or one."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from difftest.bench.impl import registry, report

    names = [args.row] if args.row else list(registry.ROWS)
    err = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err, transient=True, disable=args.output == "json") as bar:
        task = bar.add_task("starting", total=None)
        results = registry.run(names, args.rounds, lambda text: bar.update(task, description=text),
                               args.dir, done=lambda r: bar.console.print(report.line(r)))
    if args.output == "json":
        print(json.dumps(report.as_json(results), indent=2))
    else:
        Console().print(report.table(results, args.rounds))
    return 0


def _impl_args(p: argparse.ArgumentParser) -> None:
    from difftest.bench.impl.registry import ROWS

    p.add_argument("row", nargs="?", choices=list(ROWS), metavar="ROW",
                   help=f"one row (default: all): {', '.join(ROWS)}")
    p.add_argument("--rounds", type=int, default=5, help="rounds per row; medians are shown")
    p.add_argument("--dir", default=None, help="where the images go (a disk that allows O_DIRECT)")
    p.add_argument("--output", choices=["human", "json"], default="human")


SUBVERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "difftest": ("throughput of the differential harness", _difftest_args, _difftest),
    "check": ("qcow2lab check against qemu-img check on a preallocated image (difftest/bench/check.py)",
              _check_args, _check),
    "impl": ("impl against the seed results and QEMU's tools (difftest/bench/impl/)", _impl_args, _impl),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (figures from one run on this machine)")
    inner = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, (helptext, add_args, fn) in SUBVERBS.items():
        q = inner.add_parser(name, help=helptext)
        add_args(q)
        q.set_defaults(func=fn)
