"""``qcow2lab run``: the default campaign behind ``make run``.

About two minutes in three parts, each with its share of the budget:
- ``qcow2lab difftest``: every usable target (model, impl, qemu-io) in lockstep over
  configurations drawn by Hypothesis, shards started until its share is spent, on two
  processes;
- ``qcow2lab difftest --damaged`` (DAMAGED_SHARE): damaged images of the fuzz corpus on the
  engines and qemu-io side by side (difftest/damaged/);
- ``qcow2lab crash`` (CRASH_SHARE) on the model.
Prints a progress bar and a report per part, then one summary line for all three; exit 1 on
any lockstep divergence, unexplained damaged-image finding or bad crash state.
"""

from __future__ import annotations

import argparse
import sys

from difftest.cli.difftest import add_campaign_args
from difftest.cli.difftest import run as difftest_run

TOTAL = 110.0
"""Seconds of campaign in all (make run's "about two minutes", with start-up and reports)."""
CRASH_SHARE = 20.0
"""Seconds of the budget that go to ``qcow2lab crash`` on the model."""
DAMAGED_SHARE = 20.0
"""Seconds of the budget that go to ``qcow2lab difftest --damaged``."""
DAMAGED_SHRINK = 10.0
"""Seconds a damaged-image finding may spend shrinking here (the command's own default is
longer): the share is small, and a finding still gets a reproducer."""
DAMAGED_ENGINES = ("model", "impl", "qemu")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the default differential campaign, about 2 minutes (make run)")
    add_campaign_args(p, profile="ci")
    p.set_defaults(func=run, time_budget=TOTAL - CRASH_SHARE - DAMAGED_SHARE, jobs=2, examples=40)


def damaged_args(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """The damaged part's options: its share of the budget, the run's seed and reproducer
    directory, and those of the run's engines that the damaged mode drives (both by default),
    always beside qemu-io: it is the oracle, and its tools build the corpus. Its report goes to
    the terminal even when the lockstep's is JSON on stdout."""
    asked = [t.strip() for t in (args.targets or "").split(",") if t.strip()]
    engines = [t for t in asked if t in DAMAGED_ENGINES[:-1]] or list(DAMAGED_ENGINES[:-1])
    engines.append("qemu")
    ns = argparse.Namespace(seed=args.seed or 0, time_budget=DAMAGED_SHARE, examples=None, repro=args.repro,
                            output="human", replay=None, targets=",".join(engines),
                            shrink_seconds=DAMAGED_SHRINK)
    return ns, engines


def run(args: argparse.Namespace) -> int:
    lockstep = difftest_run(args)
    from difftest.cli import crash, damaged
    from difftest.core.qemuio import available

    if available():
        ns, engines = damaged_args(args)
        dstatus, dstats = damaged.run_campaign(ns, engines)
        damaged_line = damaged.summary(dstats, engines)
    else:
        # The corpus's bases are made by qemu-img and qemu-io: without them there is nothing to damage.
        dstatus, damaged_line = 0, "skipped (qemu-img/qemu-io not installed)"
    # The crash-consistency campaign (difftest/crash/) takes its share of the budget.
    cstatus = crash.run(crash.defaults(time_budget=CRASH_SHARE, seed=args.seed or 0))
    verdict = {0: "ok"}
    print(f"qcow2lab run: lockstep {verdict.get(lockstep, 'FAILED')}; damaged "
          f"{verdict.get(dstatus, 'FAILED')}: {damaged_line}; crash {verdict.get(cstatus, 'FAILED')}",
          file=sys.stderr)
    return max(lockstep, dstatus, cstatus)
