"""Guest-offset arithmetic shared by model/ and impl/ (qcow2.rst "Cluster mapping",
"Extended L2 Entries", "Host cluster management").
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Geometry:
    """The sizes that follow from cluster_bits, extended_l2 and refcount_order.

    ``l2_entries = cluster_size / l2_entry_size``; with extended L2 an entry is 16 bytes and
    a cluster has 32 subclusters (qcow2.rst "Extended L2 Entries"). Without it, a cluster is
    its own single subcluster, which lets callers treat both layouts alike.
    """

    cluster_bits: int
    extended_l2: bool = False
    refcount_order: int = 4

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entry_size(self) -> int:
        return L2E_SIZE_EXTENDED if self.extended_l2 else L2E_SIZE_NORMAL

    @property
    def l2_bits(self) -> int:
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def l2_entries(self) -> int:
        return 1 << self.l2_bits

    @property
    def subclusters_per_cluster(self) -> int:
        return QCOW_EXTL2_SUBCLUSTERS_PER_CLUSTER if self.extended_l2 else 1

    @property
    def subcluster_bits(self) -> int:
        return self.cluster_bits - (5 if self.extended_l2 else 0)

    @property
    def subcluster_size(self) -> int:
        return 1 << self.subcluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def refcount_block_entries(self) -> int:
        """Refcounts per refcount block: cluster_size * 8 / refcount_bits."""
        return (self.cluster_size * 8) >> self.refcount_order

    @property
    def l2_coverage(self) -> int:
        """Guest bytes mapped by one L2 table."""
        return self.cluster_size * self.l2_entries

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
