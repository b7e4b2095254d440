"""The metadata-preallocation probe of impl's map (impl/status.py,
detect_metadata_preallocation with write_back=False): it answers as on the file with every
dirty cache entry written, and writes them only when that answer could depend on it."""

from __future__ import annotations

from pathlib import Path

import impl

K, M = 1 << 10, 1 << 20


def _fresh_map(path: Path, off: int, n: int) -> list[dict[str, object]]:
    """What a fresh process (qemu-img map) reports of the file as written now."""
    with impl.open(path, readonly=True, force_share=True) as img:
        return img.map(off, n)


def test_sparse_image_maps_without_writing_dirty_entries(tmp_path: Path) -> None:
    p = tmp_path / "i.qcow2"
    impl.create(p, 16 * M, cluster_size=4096)
    with impl.open(p, cache="unsafe") as img:
        for i in range(0, 8 * M, 64 * K):
            img.write(i, b"\x11" * 8192)
        img.discard(0, 4 * M)  # holes in the file: the probe has to count refcounts
        img.flush()
        img.write(12 * M + 512, b"\x22" * 4096)  # a new L2 entry and refcounts, dirty
        dirty = set(img.s.l2_cache.dirty) | set(img.s.rc_cache.dirty)
        assert dirty
        got = img.map(0, 16 * M)
        assert set(img.s.l2_cache.dirty) | set(img.s.rc_cache.dirty) == dirty
        img.flush()
        assert got == img.map(0, 16 * M) == _fresh_map(p, 0, 16 * M)
        assert any(e["data"] and e["start"] <= 12 * M + 512 < e["start"] + e["length"] for e in got)


def test_preallocated_image_writes_dirty_entries_before_answering(tmp_path: Path) -> None:
    """Metadata preallocation: the count reaches the threshold, so the entries are written
    back and the map asks the file about holes (BDRV_BLOCK_RECURSE) as qemu-img would."""
    p = tmp_path / "i.qcow2"
    impl.create(p, 16 * M, cluster_size=4096, preallocation="metadata")
    with impl.open(p, cache="unsafe") as img:
        img.write(5 * M, b"\x33" * 4096)  # its first status query decided for this open
        img.write_zeroes(6 * M, 8192)  # sets the zero flag of preallocated entries: L2 dirty
        assert img.s.l2_cache.dirty
        got = img.map(4 * M, 4 * M)
        assert not img.s.l2_cache.dirty and not img.s.rc_cache.dirty
        assert got == _fresh_map(p, 4 * M, 4 * M)
        assert any(e["zero"] and e["data"] for e in got)  # the host holes were asked about
