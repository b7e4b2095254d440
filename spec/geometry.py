"""Guest-offset arithmetic shared by model/ and impl/ (qcow2.rst "Cluster mapping",
"Extended L2 Entries", "Host cluster management").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spec.limits import QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER

L1E_SIZE = 8
L2E_SIZE_NORMAL = 8
L2E_SIZE_EXTENDED = 16
REFTABLE_ENTRY_SIZE = 8


def div_round_up(n: int, d: int) -> int:
    return -(-n // d)


def align_up(n: int, a: int) -> int:
    return div_round_up(n, a) * a


def align_down(n: int, a: int) -> int:
    return n - n % a


def split_aligned(offset: int, n: int, align: int) -> list[tuple[int, int]]:
    """How the block layer cuts a request for a driver with an alignment (block/io.c
    bdrv_co_do_pwrite_zeroes, bdrv_co_pdiscard): an unaligned head up to the first
    boundary, the aligned middle, an unaligned tail; no empty pieces."""
    out: list[tuple[int, int]] = []
    end = offset + n
    head_end = min(end, align_up(offset, align))
    if head_end > offset:
        out.append((offset, head_end - offset))
    mid_end = max(head_end, align_down(end, align))
    if mid_end > head_end:
        out.append((head_end, mid_end - head_end))
    if end > mid_end:
        out.append((mid_end, end - mid_end))
    return out


@dataclass(frozen=True)
class Geometry:
    """The sizes that follow from cluster_bits, extended_l2 and refcount_order.

    ``l2_entries = cluster_size / l2_entry_size``; with extended L2 an entry is 16 bytes and
    a cluster has 32 subclusters (qcow2.rst "Extended L2 Entries"). Without it, a cluster is
    its own single subcluster, which lets callers treat both layouts alike.

    The derived sizes are computed once, in ``__post_init__``: every guest request asks for
    several of them, and the model and the difftest step millions of requests.
    """

    cluster_bits: int
    extended_l2: bool = False
    refcount_order: int = 4
    cluster_size: int = field(init=False, repr=False, compare=False)
    l2_entry_size: int = field(init=False, repr=False, compare=False)
    l2_bits: int = field(init=False, repr=False, compare=False)
    l2_entries: int = field(init=False, repr=False, compare=False)
    subclusters_per_cluster: int = field(init=False, repr=False, compare=False)
    subcluster_bits: int = field(init=False, repr=False, compare=False)
    subcluster_size: int = field(init=False, repr=False, compare=False)
    refcount_bits: int = field(init=False, repr=False, compare=False)
    refcount_block_entries: int = field(init=False, repr=False, compare=False)
    """Refcounts per refcount block: cluster_size * 8 / refcount_bits."""
    l2_coverage: int = field(init=False, repr=False, compare=False)
    """Guest bytes mapped by one L2 table."""

    def __post_init__(self) -> None:
        ext = self.extended_l2
        derived = {
            "cluster_size": 1 << self.cluster_bits,
            "l2_entry_size": L2E_SIZE_EXTENDED if ext else L2E_SIZE_NORMAL,
            "l2_bits": self.cluster_bits - (4 if ext else 3),
            "subclusters_per_cluster": QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER if ext else 1,
            "subcluster_bits": self.cluster_bits - (5 if ext else 0),
            "refcount_bits": 1 << self.refcount_order,
            "refcount_block_entries": (8 << self.cluster_bits) >> self.refcount_order,
        }
        derived["l2_entries"] = 1 << derived["l2_bits"]
        derived["subcluster_size"] = 1 << derived["subcluster_bits"]
        derived["l2_coverage"] = derived["cluster_size"] * derived["l2_entries"]
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # a frozen dataclass's own set-up

    def l1_index(self, guest_offset: int) -> int:
        return guest_offset >> (self.cluster_bits + self.l2_bits)

    def l2_index(self, guest_offset: int) -> int:
        return (guest_offset >> self.cluster_bits) & (self.l2_entries - 1)

    def subcluster_index(self, guest_offset: int) -> int:
        return (guest_offset >> self.subcluster_bits) & (self.subclusters_per_cluster - 1)

    def offset_in_cluster(self, offset: int) -> int:
        return offset & (self.cluster_size - 1)

    def cluster_index(self, offset: int) -> int:
        return offset >> self.cluster_bits

    def l1_size_for(self, virtual_size: int) -> int:
        """Minimum number of L1 entries needed to map ``virtual_size`` bytes."""
        return div_round_up(virtual_size, self.l2_coverage)

    def refcount_table_index(self, host_offset: int) -> int:
        return (host_offset >> self.cluster_bits) // self.refcount_block_entries

    def refcount_block_index(self, host_offset: int) -> int:
        return (host_offset >> self.cluster_bits) % self.refcount_block_entries

    def size_to_clusters(self, n: int) -> int:
        return div_round_up(n, self.cluster_size)
