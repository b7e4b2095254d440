"""The one verdict of the lockstep harness: the targets disagree.

Its own module so that everything that can find a disagreement (core/lockstep.py during a
run, core/teardown.py at its end, core/machine.py and core/repro.py around them) imports it
without importing each other.
"""

from __future__ import annotations


class Divergence(AssertionError):
    """The targets disagree. ``kind`` is a short class of disagreement (bytes, error, map,
    check, rules, crossread, snapshots, size, crash), ``op`` the operation."""

    def __init__(self, kind: str, op: str, message: str) -> None:
        self.kind = kind
        self.op = op
        super().__init__(f"[{kind}] {op}: {message}")
