"""Where a write's copy-on-write regions start and end (block/qcow2-cluster.c,
calculate_l2_meta): arithmetic on the L2 entries of the first and last cluster a write
touches, shared by both engines.

A write of guest bytes [start_to, end_from), as offsets from the start of its first cluster,
copies [start_from, start_to) and [end_from, end_to) from what those bytes read as now.
Written in place (``keep_old``), only the touched subclusters that were not data are
completed to their boundaries. A new cluster is copied whole from the old one, except: with
extended L2 entries QEMU copies only from the first allocated subcluster and up to the last
allocated one (the rest stays unallocated in the new bitmap); a compressed cluster is always
copied whole; one without a host cluster (plain zero, unallocated) only up to the subcluster
boundaries around the new data.
"""

from __future__ import annotations

from spec.entries import QCOW_L2_BITMAP_ALL_ALLOC, SubclusterType, subcluster_type
from spec.geometry import Geometry, align_down, align_up

PERFORM_COW_MERGE_MAX = 16384
"""perform_cow (block/qcow2.c) reads both COW regions in one request when at most this many
bytes of new data lie between them."""

QCOW2_MAX_WORKERS = 8
"""Write tasks of one request in flight at once (block/qcow2.h): a failed COW read does not
stop the later runs of a request until its pool is full."""

_KEEPS_HOST = (SubclusterType.NORMAL, SubclusterType.ZERO_ALLOC, SubclusterType.UNALLOCATED_ALLOC)


def cow_range(g: Geometry, first: tuple[int, int], last: tuple[int, int], start_to: int,
              end_from: int, *, keep_old: bool, has_data_file: bool = False) -> tuple[int, int]:
    """(start_from, end_to) for a write of [start_to, end_from) whose first and last
    clusters have the (l2_entry, l2_bitmap) pairs ``first`` and ``last``."""
    cs, scs, ext = g.cluster_size, g.subcluster_size, g.extended_l2
    sc_first = start_to % cs // scs
    sc_last = (end_from - 1) % cs // scs
    t_first = subcluster_type(first[0], first[1], sc_first, extended_l2=ext, has_data_file=has_data_file)
    t_last = subcluster_type(last[0], last[1], sc_last, extended_l2=ext, has_data_file=has_data_file)
    if keep_old:
        start_from = start_to if t_first is SubclusterType.NORMAL else align_down(start_to, scs)
    elif t_first is SubclusterType.COMPRESSED:
        start_from = 0
    elif t_first in _KEEPS_HOST:
        alloc = first[1] & QCOW_L2_BITMAP_ALL_ALLOC
        low = (alloc & -alloc).bit_length() - 1 if alloc else 32
        start_from = min(start_to // scs, low) * scs if ext else 0
    else:
        start_from = align_down(start_to, scs)
    if keep_old:
        end_to = end_from if t_last is SubclusterType.NORMAL else align_up(end_from, scs)
    elif t_last is SubclusterType.COMPRESSED:
        end_to = align_up(end_from, cs)
    elif t_last in _KEEPS_HOST:
        end_to = align_up(end_from, cs)
        if ext:
            high = 32 - (last[1] & QCOW_L2_BITMAP_ALL_ALLOC).bit_length()
            end_to -= min(g.subclusters_per_cluster - sc_last - 1, high) * scs
    else:
        end_to = align_up(end_from, scs)
    return start_from, end_to
