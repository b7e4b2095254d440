"""``qcow2lab run``: the default campaign behind ``make run``.

About two minutes of ``qcow2lab difftest``: every usable target (model, impl, qemu-io) in
lockstep over configurations drawn by Hypothesis, shards started until the time budget is
spent, on two processes. Prints a progress bar and a summary; exit 1 on any divergence.
"""

from __future__ import annotations

import argparse

from difftest.cli.difftest import add_campaign_args
from difftest.cli.difftest import run as difftest_run

CRASH_SHARE = 20.0
"""Seconds of the budget that go to ``qcow2lab crash`` on the model."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the default differential campaign, about 2 minutes (make run)")
    add_campaign_args(p, profile="ci")
    p.set_defaults(func=run, time_budget=110.0 - CRASH_SHARE, jobs=2, examples=40)


def run(args: argparse.Namespace) -> int:
    status = difftest_run(args)
    # The crash-consistency campaign (difftest/crash/) takes its share of the budget.
    from difftest.cli import crash
    return max(status, crash.run(crash.defaults(time_budget=CRASH_SHARE, seed=args.seed or 0)))
