"""The one verdict of the lockstep harness: the targets disagree.

Its own module so that everything that can find a disagreement (core/lockstep.py during a
run, core/teardown.py at its end, core/machine.py and core/repro.py around them) imports it
without importing each other.
"""

from __future__ import annotations


class Divergence(AssertionError):
    """The targets disagree. ``kind`` is a short class of disagreement (bytes, error, map,
    check, rules, crossread, snapshots, size, crash, reader), ``op`` the operation.

    ``finding_class`` is set when foreign code is at fault (difftest/adapters/isolation.py):
    one of hang, crash, memory, error, wrong-bytes, and the message then starts with it
    (``"hang: ..."``); None for a disagreement among the project's own targets and qemu."""

    finding_class: str | None = None

    def __init__(self, kind: str, op: str, message: str, *, finding_class: str | None = None) -> None:
        self.kind = kind
        self.op = op
        if finding_class is not None:
            self.finding_class = finding_class
        super().__init__(f"[{kind}] {op}: {message}")
