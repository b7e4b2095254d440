"""What each guest sector may read as after a power cut (the guest's view of durability).

A guest flush (and a close, which flushes) that completed makes everything written before it
durable: after a crash such a sector reads exactly as it did at that flush. A sector written
since may read as any value it held since that flush, the one at the flush included, because
the write may or may not have reached the disk, and a later write may have reached it
before an earlier one did not. The values are taken from the live engine after each
operation (a read of the range it touched), so discard and write_compressed need no rules
of their own here: what the engine reads live is what the lockstep holds it to.

The virtual size follows the same rule: after a crash it is the size at the last flush or one
the image had since (a resize or a snapshot apply that may not have reached the disk). A
sector past the size at the flush has no flushed value: it may only hold what it held since.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SECTOR = 512


@dataclass
class GuestOracle:
    durable: bytes
    """Guest content at the last completed flush (the whole image; sizes are small).
    Immutable, so that the per-operation copies share it."""
    pending: dict[int, set[bytes]] = field(default_factory=dict)
    """Sector index -> values it held since that flush (the flushed one not included)."""
    sizes: frozenset[int] = frozenset()
    """Virtual sizes the image had since that flush, the one at the flush included (empty:
    only len(durable))."""

    def wrote(self, off: int, content: bytes) -> None:
        """The live image now reads ``content`` at sector-aligned ``off``."""
        for k in range(0, len(content), SECTOR):
            self.pending.setdefault((off + k) // SECTOR, set()).add(bytes(content[k:k + SECTOR]))

    def resized(self, size: int) -> None:
        """The live image now has virtual size ``size``."""
        self.sizes = frozenset({*self.allowed_sizes(), size})

    def allowed_sizes(self) -> frozenset[int]:
        return self.sizes or frozenset({len(self.durable)})

    def flushed(self, current: bytes) -> None:
        """A guest flush completed; ``current`` is the whole live content."""
        self.durable = bytes(current)
        self.pending.clear()
        self.sizes = frozenset()

    def copy(self) -> GuestOracle:
        return GuestOracle(self.durable, {k: set(v) for k, v in self.pending.items()}, self.sizes)

    def bad_sectors(self, content: bytes) -> list[int]:
        """Sectors of ``content`` (a whole guest read after the crash) that hold a value
        they never held since the last flush."""
        if content == self.durable:
            return []
        n = min(len(content), len(self.durable)) // SECTOR
        a = np.frombuffer(bytes(content[:n * SECTOR]), dtype=np.uint8).reshape(n, SECTOR)
        b = np.frombuffer(bytes(self.durable[:n * SECTOR]), dtype=np.uint8).reshape(n, SECTOR)
        differ = [int(s) for s in np.nonzero((a != b).any(axis=1))[0]]
        differ += range(n, -(-len(content) // SECTOR))  # past the flushed size
        return [s for s in differ
                if bytes(content[s * SECTOR:(s + 1) * SECTOR]) not in self.pending.get(s, ())]
