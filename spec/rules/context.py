"""State shared by the rule walkers: the image, a zero-filling reader, the refcount tally,
the findings so far and QEMU's fragmentation counters."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spec.geometry import Geometry
from spec.image import ImageFile
from spec.refcounts import Kind, Tally
from spec.rules.catalogue import RULES_BY_ID, Finding, Severity

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
else:
    # Executed at first use: a small clean image is checked without numpy
    # (spec/rules/quick.py), and importing it is most of qcow2lab check's start-up.
    from spec.lazy import numpy as np

BATCH = 1024
"""Findings handed on together by ``Context.add_all``."""

FindingSink = Callable[[list[Finding]], None]
"""Receives every finding as the walk meets it, in order, a batch at a time (a table's worth
of one rule, or a single finding); ``qcow2lab check`` prints them there."""


_SEVERITIES = tuple(Severity)
_COUNTER: dict[str, int | None] = {
    r.id: _SEVERITIES.index(r.severity) if r.qemu_counts else None for r in RULES_BY_ID.values()}
"""Per rule, which of FindingLog's counters it moves (None: qemu-img does not count it)."""


@dataclass(slots=True)
class FindingLog:
    """The findings of one walk: counted as they arrive, kept only up to ``keep``.

    A wrecked image yields a finding per bad entry, hundreds of thousands of them (an L1 table
    reaching into guest data: README, "Bounded check"), and ``qemu-img check`` only counts
    and prints them. So the counters (what qemu-img reports) are kept here, every finding goes
    to ``sink`` when there is one, and at most ``keep`` findings stay in memory (None: all;
    a repair acts on them). CHECK-COMPLETES is always kept: ``verdict`` looks for it.
    """

    sink: FindingSink | None = None
    keep: int | None = None
    kept: list[Finding] = field(default_factory=list)
    omitted: int = 0
    """Findings passed on (or dropped) but not kept, beyond ``keep``."""
    rules: set[str] = field(default_factory=set)
    """Every rule violated at least once."""
    only: frozenset[str] | None = None
    """Keep findings of these rules only (None: any); the others are counted, not kept."""
    per_rule: dict[str, int] = field(default_factory=dict)
    """Per rule, the sum of its findings' ``count``: what a repair reckons with."""
    _counts: list[int] = field(default_factory=lambda: [0] * len(_SEVERITIES))

    def count(self, severity: Severity) -> int:
        """How many times qemu-img counts the findings of ``severity`` (Rule.qemu_counts only)."""
        return self._counts[_SEVERITIES.index(severity)]

    def add(self, f: Finding) -> None:
        self.extend([f])

    def extend(self, fs: list[Finding]) -> None:
        """``add`` for several findings of one rule at once (a wrecked table has thousands,
        and per-finding calls would dominate the check)."""
        if not fs:
            return
        rule = fs[0].rule
        i = _COUNTER[rule]
        if i is not None:
            self._counts[i] += sum(f.count for f in fs)
        self.rules.add(rule)
        self.per_rule[rule] = self.per_rule.get(rule, 0) + sum(f.count for f in fs)
        if self.sink is not None:
            self.sink(fs)
        room = len(fs)
        if self.only is not None and rule not in self.only and rule != "CHECK-COMPLETES":
            room = 0
        elif self.keep is not None and rule != "CHECK-COMPLETES":
            room = min(room, max(0, self.keep - len(self.kept)))
        self.kept.extend(fs[:room] if room < len(fs) else fs)
        self.omitted += len(fs) - room


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
    log: FindingLog = field(default_factory=FindingLog)
    bfi: FragInfo = field(default_factory=FragInfo)

    @property
    def findings(self) -> list[Finding]:
        """The findings kept so far (all of them unless the log has a ``keep`` limit)."""
        return self.log.kept

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
        self.log.extend([Finding(rule, offset, message, stored, computed, count)])

    def add_all(self, rule: str, found: Iterable[tuple[int, str]]) -> None:
        """``add`` for every (offset, message) of ``found``, in that order, passed on in
        batches of ``BATCH`` (memory stays bounded however long the table)."""
        it = iter(found)
        while batch := [Finding(rule, at, message) for at, message in itertools.islice(it, BATCH)]:
            self.log.extend(batch)

    def ref(self, offset: int, size: int, kind: Kind, what: str) -> None:
        """Count one reference to [offset, offset + size), or report QEMU's refusal of it."""
        if not self.tally.add_range(offset, size, kind):
            self.add("REFERENCE-INSIDE-FILE", offset,
                     f"{what} at {offset:#x} (+{size:#x}) ends past the end of the file")

    def refs(self, offsets: npt.NDArray[np.uint64], size: int | npt.NDArray[np.uint64], kind: Kind,
             what: str) -> None:
        """``ref`` for many regions at once (a whole table's worth of clusters)."""
        sizes = np.full(offsets.size, size, dtype=np.uint64) if isinstance(size, int) else size
        refused = self.tally.add_regions(offsets, sizes, kind).tolist()
        self.add_all("REFERENCE-INSIDE-FILE",
                     ((o, f"{what} at {o:#x} ends past the end of the file") for o in refused))

    def abort(self, rule: str, offset: int | None, message: str) -> Abort:
        """Record ``rule`` and return the exception that stops the walk."""
        self.add(rule, offset, message)
        return Abort(rule)
