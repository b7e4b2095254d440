"""impl's open options: QEMU's defaults and its refusals (block/qcow2.c read_cache_sizes,
qcow2_update_options_prepare)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import impl
from impl import options as opt
from spec.errors import RequestError

M = 1 << 20


def _parse(cs: int = 65536, size: int = 64 * M, entry: int = 8, **o: Any) -> opt.Options:
    return opt.parse(o, cluster_size=cs, virtual_size=size, l2_entry_size=entry)


def test_defaults_cover_the_whole_disk_with_cluster_sized_entries() -> None:
    from impl import overlap as ov

    o = _parse()
    # 64 MiB / 64 KiB = 1024 entries = 8 KiB of L2, rounded up to one cluster.
    assert o.l2_cache_entry_size == 65536
    assert o.l2_cache_entries == opt.MIN_L2_CACHE_SIZE
    assert o.refcount_cache_entries == opt.MIN_REFCOUNT_CACHE_SIZE
    assert o.cache_clean_interval == 600
    assert o.overlap_check == ov.QCOW2_OL_CACHED
    assert o.cache == "writeback"


def test_default_l2_cache_is_capped_at_32_mib_and_then_uses_4k_slices() -> None:
    # 4 TiB with 64 KiB clusters needs 512 MiB of L2 tables: QEMU caps the cache at 32 MiB
    # (DEFAULT_L2_CACHE_MAX_SIZE on Linux) and, the disk not being covered, uses 4 KiB slices.
    o = _parse(size=4 << 40)
    assert o.l2_cache_entry_size == 4096
    assert o.l2_cache_entries == 32 * M // 4096


def test_small_l2_cache_without_entry_size_uses_4k_slices() -> None:
    o = _parse(size=1 << 30, l2_cache_size=65536)
    assert (o.l2_cache_entry_size, o.l2_cache_entries) == (4096, 16)


def test_explicit_entry_size_is_kept() -> None:
    o = _parse(size=1 << 30, l2_cache_size=65536, l2_cache_entry_size=512)
    assert (o.l2_cache_entry_size, o.l2_cache_entries) == (512, 128)


def test_minimums() -> None:
    o = _parse(l2_cache_size=1, refcount_cache_size=1)
    assert o.l2_cache_entries == 2 and o.refcount_cache_entries == 4


def test_combined_cache_size_split_as_qemu_splits_it() -> None:
    # Enough for the whole disk's L2 plus the minimal refcount cache: L2 gets all it needs.
    # max_l2_cache is one cluster (raised to the 2-entry minimum); the rest is refcount.
    o = _parse(size=64 * M, cache_size=10 * 65536)
    assert (o.l2_cache_entries, o.refcount_cache_entries) == (2, 9)
    o = _parse(size=1 << 40, cache_size=1 * M)
    assert o.refcount_cache_entries == 4
    assert o.l2_cache_entries == (M - 4 * 65536) // 4096


@pytest.mark.parametrize("bad", [
    {"l2_cache_entry_size": 256}, {"l2_cache_entry_size": 3000},
    {"l2_cache_entry_size": 131072}, {"l2_cache_size": -1}, {"l2_cache_size": "1M"},
    {"cache_size": 1 * M, "l2_cache_size": 1, "refcount_cache_size": 1},
    {"cache_size": 65536, "l2_cache_size": 131072},
    {"cache_size": 65536, "refcount_cache_size": 131072},
    {"cache_clean_interval": -1}, {"cache_clean_interval": 1 << 32},
    {"overlap_check": "some"}, {"overlap_check_active_l2": "yes"},
    {"cache": "directsync"}, {"frobnicate": 1},
])
def test_bad_values_are_request_errors(bad: dict[str, Any]) -> None:
    with pytest.raises(RequestError):
        _parse(**bad)


def test_overlap_flags_override_the_template() -> None:
    from impl import overlap as ov

    o = _parse(overlap_check="none", overlap_check_main_header=True)
    assert o.overlap_check == ov.QCOW2_OL_MAIN_HEADER
    o = _parse(overlap_check="all", overlap_check_inactive_l2=False)
    assert o.overlap_check == ov.QCOW2_OL_CACHED


def test_open_refuses_bad_options(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 64 * M)
    with pytest.raises(RequestError):
        impl.open(p, l2_cache_entry_size=100)
    with pytest.raises(RequestError):
        impl.open(p, snapshot="x")
    # Nothing stays locked after a refused open.
    with impl.open(p, l2_cache_entry_size=4096, overlap_check="all", cache_clean_interval=0) as img:
        assert img.s.l2_cache.entry_size == 4096
        assert img.s.slice_entries == 512
