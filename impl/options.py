"""Open options, with QEMU's names (``-`` written ``_``) and rules (block/qcow2.c
read_cache_sizes and qcow2_update_options_prepare; block/qcow2.h for the defaults).

==========================  =============================================================
option                      meaning (QEMU 7.2 on Linux)
==========================  =============================================================
l2_cache_size               bytes of L2 cache; default: enough for the whole disk, at most
                            DEFAULT_L2_CACHE_MAX_SIZE = 32 MiB; at least 2 entries
l2_cache_entry_size         slice size: a power of two from 512 to the cluster size;
                            default the cluster size, or 4 KiB when the cache does not
                            cover the whole disk and the option is not given
refcount_cache_size         bytes of refcount-block cache; at least 4 clusters (default)
cache_size                  l2 + refcount together; split as QEMU splits it
cache_clean_interval        seconds; entries unused that long are dropped; default 600,
                            0 = never
overlap_check               none | constant | cached (default) | all
overlap_check_<name>        one check on or off (main_header, active_l1, active_l2,
                            refcount_table, refcount_block, snapshot_table, inactive_l1,
                            inactive_l2, bitmap_directory)
cache                       writeback (default) | none (O_DIRECT) | unsafe (no fsync)
force_share, locking        as model.open (spec/locking.py)
==========================  =============================================================

A bad value is RequestError, with QEMU's reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from impl.overlap import OVERLAP_MODES, OVERLAP_NAMES
from spec.errors import RequestError

MiB = 1 << 20
DEFAULT_L2_CACHE_MAX_SIZE = 32 * MiB
"""block/qcow2.h, CONFIG_LINUX (8 MiB elsewhere)."""
DEFAULT_CACHE_CLEAN_INTERVAL = 600
MIN_L2_CACHE_SIZE = 2
"""Entries (block/qcow2.h): a COW may need two L2 slices at once."""
MIN_REFCOUNT_CACHE_SIZE = 4
"""Clusters (block/qcow2.h)."""
MIN_CLUSTER_BITS = 9
INT_MAX = (1 << 31) - 1
UINT_MAX = (1 << 32) - 1

KNOWN = frozenset({"l2_cache_size", "l2_cache_entry_size", "refcount_cache_size", "cache_size",
                   "cache_clean_interval", "overlap_check", "cache", "force_share", "locking"}
                  | {f"overlap_check_{n}" for n in OVERLAP_NAMES})


@dataclass(frozen=True)
class Options:
    l2_cache_entries: int
    l2_cache_entry_size: int
    refcount_cache_entries: int
    cache_clean_interval: int
    overlap_check: int
    cache: str
    force_share: bool
    locking: str


def _size(options: dict[str, Any], name: str) -> int | None:
    v = options.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise RequestError(f"{name} must be a non-negative integer")
    return v


def parse(options: dict[str, Any], *, cluster_size: int, virtual_size: int, l2_entry_size: int) -> Options:
    """Validate ``options`` and compute the cache geometry (read_cache_sizes, then
    qcow2_update_options_prepare's rounding to whole entries)."""
    unknown = set(options) - KNOWN
    if unknown:
        raise RequestError(f"unknown option(s): {', '.join(sorted(unknown))}")
    combined = _size(options, "cache_size")
    l2_set = _size(options, "l2_cache_size")
    rc_set = _size(options, "refcount_cache_size")
    entry_set = _size(options, "l2_cache_entry_size")
    min_refcount_cache = MIN_REFCOUNT_CACHE_SIZE * cluster_size
    # An L2 table is a whole cluster, so the cache that covers the disk is a whole number
    # of clusters (read_cache_sizes: max_l2_cache).
    max_l2_entries = -(-virtual_size // cluster_size)
    max_l2_cache = -(-(max_l2_entries * l2_entry_size) // cluster_size) * cluster_size
    l2_max_setting = DEFAULT_L2_CACHE_MAX_SIZE if l2_set is None else l2_set
    refcount_cache = rc_set or 0
    entry_size = cluster_size if entry_set is None else entry_set
    l2_cache = min(max_l2_cache, l2_max_setting)
    if combined is not None:
        if l2_set is not None and rc_set is not None:
            raise RequestError("cache_size, l2_cache_size and refcount_cache_size may not be set "
                               "at the same time")
        if l2_set is not None and l2_max_setting > combined:
            raise RequestError("l2_cache_size may not exceed cache_size")
        if refcount_cache > combined:
            raise RequestError("refcount_cache_size may not exceed cache_size")
        if l2_set is not None:
            refcount_cache = combined - l2_cache
        elif rc_set is not None:
            l2_cache = combined - refcount_cache
        elif combined >= max_l2_cache + min_refcount_cache:
            l2_cache = max_l2_cache
            refcount_cache = combined - l2_cache
        else:
            refcount_cache = min(combined, min_refcount_cache)
            l2_cache = combined - refcount_cache
    if l2_cache < max_l2_cache and entry_set is None:
        # A cache that cannot hold the whole disk works in 4 KiB slices: cheaper misses.
        entry_size = min(cluster_size, 4096)
    if (entry_size < 1 << MIN_CLUSTER_BITS or entry_size > cluster_size
            or entry_size & (entry_size - 1)):
        raise RequestError(f"L2 cache entry size must be a power of two between "
                           f"{1 << MIN_CLUSTER_BITS} and the cluster size ({cluster_size})")
    l2_entries = max(MIN_L2_CACHE_SIZE, l2_cache // entry_size)
    if l2_entries > INT_MAX:
        raise RequestError("L2 cache size too big")
    rc_entries = max(MIN_REFCOUNT_CACHE_SIZE, refcount_cache // cluster_size)
    if rc_entries > INT_MAX:
        raise RequestError("Refcount cache size too big")
    interval = options.get("cache_clean_interval", DEFAULT_CACHE_CLEAN_INTERVAL)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 0:
        raise RequestError("cache_clean_interval must be a non-negative integer")
    if interval > UINT_MAX:
        raise RequestError("Cache clean interval too big")
    mode = options.get("overlap_check", "cached")
    if mode not in OVERLAP_MODES:
        raise RequestError(f"Unsupported value '{mode}' for qcow2 option 'overlap-check'. "
                           "Allowed are any of the following: none, constant, cached, all")
    mask = OVERLAP_MODES[mode]
    for name, bit in OVERLAP_NAMES.items():
        v = options.get(f"overlap_check_{name}")
        if v is None:
            continue
        if not isinstance(v, bool):
            raise RequestError(f"overlap_check_{name} must be a bool")
        mask = mask | bit if v else mask & ~bit
    cache = options.get("cache", "writeback")
    if cache not in ("writeback", "none", "unsafe"):
        raise RequestError("cache must be 'writeback', 'none' or 'unsafe'")
    force_share = options.get("force_share", False)
    if not isinstance(force_share, bool):
        raise RequestError("force_share must be a bool")
    locking = options.get("locking", "auto")
    if locking not in ("auto", "on", "off"):
        raise RequestError("locking must be 'auto', 'on' or 'off'")
    return Options(l2_entries, entry_size, rc_entries, interval, mask, cache, force_share, locking)
