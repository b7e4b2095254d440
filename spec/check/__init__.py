"""The one check-and-repair engine, shared by both engines (DESIGN.md): ``model.check`` and
``impl.check`` are this ``check``.

Modules, from the entry point down:

- repair.py: ``qemu-img check -r`` on a file (decide, fix, check again), and the repair a
  read-write open runs on a dirty image (``repair_dirty``);
- fix_pass.py: the fix pass, QEMU's steps in QEMU's order;
- growth.py: refcount blocks past the end of the file, grown for as QEMU does;
- rebuild.py: rebuild_refcount_structure from the computed refcounts;
- overlap.py: the metadata overlap check of the repair's own writes.

The report itself (no repair) is the rules catalogue counted as qemu-img counts it
(spec/rules/check.py). Every write goes through the raw file (spec/qfile.py,
spec/refblocks.py, spec/snapshot_table.py), never through the model or the impl.
"""

from __future__ import annotations

import os

from spec.check.repair import check_and_repair, repair_dirty
from spec.interface import CheckResult, Repair
from spec.rules.check import check as report


def check(path: str | os.PathLike[str], *, repair: Repair = None) -> CheckResult:
    """``qemu-img check [-r leaks|all]`` of the image at ``path``.

    ``repair``: None only reports and never writes to the file (it never raises for a
    malformed file: the result says why). "leaks" and "all" repair as ``qemu-img check
    -r leaks|all`` does (spec/check/repair.py).

    Raises, with ``repair``: FormatError when the image does not open for writing;
    UnsupportedFeature when the image has damage this engine does not repair QEMU's way
    (nothing is written then); RequestError when another process holds the image.
    """
    if repair is None:
        return report(path)
    return check_and_repair(str(path), repair)


__all__ = ["check", "repair_dirty"]
