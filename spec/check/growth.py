"""Refcount blocks past the end of the file, as ``qemu-img check -r all`` grows the file for
them (block/qcow2-refcount.c check_refblocks: bdrv_truncate to the block's end).

The growth is planned before anything is written, so that a repair that would grow the file
past GROW_LIMIT_CLUSTERS is refused first (spec/check/repair.py).

Errors: OSError from the file system (the caller reports it); RequestError when another
process holds a conflicting lock.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from spec.entries import REFT_OFFSET_MASK
from spec.locking import ImageLock
from spec.rules.evaluate import Evaluation

INT64_MAX = (1 << 63) - 1

GROW_LIMIT_CLUSTERS = 1 << 21
"""The largest file, in clusters, a repair grows to for a refcount block past the end of the
file. QEMU grows it to wherever the block points (observed: up to 2 TB, sparse); this engine,
whose rebuild holds one refcount per cluster of the file, refuses beyond this, before
writing anything."""

REFBLOCK_OUTSIDE = "REFBLOCK-INSIDE-FILE"
"""The rule a refcount block past the end of the file violates."""


@dataclass
class Growth:
    """A refcount block past the end of the file, as check_refblocks meets it with -r all."""

    cluster: int
    target: int
    """The file size bdrv_truncate asks for (block offset + one cluster)."""
    fails: bool
    """bdrv_truncate fails (offset beyond INT64_MAX, or the file system refuses the size)."""


def plan_growth(path: str, ev: Evaluation, cluster_size: int) -> list[Growth]:
    """The refcount blocks -r all will grow the file for, in reftable order (called before
    anything is written, so that a repair that would grow the file too far is refused)."""
    out: list[Growth] = []
    with open(path, "rb") as f:
        for finding in ev.findings:
            if finding.rule != REFBLOCK_OUTSIDE or finding.offset is None:
                continue
            entry = int.from_bytes(os.pread(f.fileno(), 8, finding.offset), "big")
            off = entry & REFT_OFFSET_MASK
            if off > INT64_MAX - cluster_size:
                out.append(Growth(off // cluster_size, 0, True))  # -EINVAL before truncating
                continue
            out.append(Growth(off // cluster_size, off + cluster_size, False))
    return out


def probe_growth(path: str, growths: list[Growth], cluster_size: int) -> int:
    """For each growth past GROW_LIMIT_CLUSTERS, ask the file system, as QEMU finds out:
    by growing the file (and shrinking it back at once, so its bytes do not change); the
    sizes it refuses fail as in QEMU. Returns the largest size still to grow to (0 if none).
    The file is locked as a writer first (RequestError if another process holds it)."""
    size = os.stat(path).st_size
    largest = 0
    with open(path, "r+b") as f:
        ImageLock(f, path=path).acquire(write=True)
        for g in growths:
            if g.fails or g.target <= size:
                continue
            if g.target > GROW_LIMIT_CLUSTERS * cluster_size:
                try:
                    os.ftruncate(f.fileno(), g.target)
                except OSError as e:
                    if e.errno in (errno.EFBIG, errno.EINVAL):
                        g.fails = True
                        continue
                    raise
                finally:
                    if os.fstat(f.fileno()).st_size != size:
                        os.ftruncate(f.fileno(), size)
            largest = max(largest, g.target)
    return largest
