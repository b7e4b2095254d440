"""State shared by the rule walkers: the image, a zero-filling reader, the refcount tally,
the findings so far and QEMU's fragmentation counters."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from spec.geometry import Geometry
from spec.image import ImageFile
from spec.refcounts import Kind, Tally
from spec.rules.catalogue import RULES_BY_ID, Finding


class Abort(Exception):
    """QEMU's check returns an error here (or cannot open the image): stop walking."""


@dataclass
class FragInfo:
    """BlockFragInfo, filled from the active L1 table only (CHECK_FRAG_INFO)."""

    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


@dataclass
class Context:
    img: ImageFile
    tally: Tally
    findings: list[Finding] = field(default_factory=list)
    bfi: FragInfo = field(default_factory=FragInfo)

    @property
    def geometry(self) -> Geometry:
        return self.img.geometry

    @property
    def cluster_size(self) -> int:
        return self.img.geometry.cluster_size

    @property
    def cluster_bits(self) -> int:
        return self.img.geometry.cluster_bits

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset``, zero-filled past the end of the file.

        QEMU's block layer reads past the end of a file as zeros, so a table that lies (partly)
        beyond it is read, not refused; its clusters then show up as refcount mismatches.
        """
        if n <= 0:
            return b""
        try:
            data = os.pread(self.img.f.fileno(), n, offset)
        except (OSError, OverflowError):
            data = b""
        return data + bytes(n - len(data))

    def add(self, rule: str, offset: int | None, message: str, *, stored: int | None = None,
            computed: int | None = None, count: int = 1) -> None:
        assert rule in RULES_BY_ID, rule
        self.findings.append(Finding(rule, offset, message, stored, computed, count))

    def ref(self, offset: int, size: int, kind: Kind, what: str) -> None:
        """Count one reference to [offset, offset + size), or report QEMU's refusal of it."""
        if not self.tally.add_range(offset, size, kind):
            self.add("REFERENCE-INSIDE-FILE", offset,
                     f"{what} at {offset:#x} (+{size:#x}) ends past the end of the file")

    def refs(self, offsets: npt.NDArray[np.uint64], size: int | npt.NDArray[np.uint64], kind: Kind,
             what: str) -> None:
        """``ref`` for many regions at once (a whole table's worth of clusters)."""
        sizes = np.full(offsets.size, size, dtype=np.uint64) if isinstance(size, int) else size
        for o in self.tally.add_regions(offsets, sizes, kind).tolist():
            self.add("REFERENCE-INSIDE-FILE", int(o), f"{what} at {int(o):#x} ends past the end of the file")

    def abort(self, rule: str, offset: int | None, message: str) -> Abort:
        """Record ``rule`` and return the exception that stops the walk."""
        self.add(rule, offset, message)
        return Abort(rule)
