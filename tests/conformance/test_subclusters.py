"""Extended L2 entries: reads across clusters whose subclusters mix data, zeros and backing."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from tests.conformance.helpers import KiB, MiB, base, clean
from tests.qemu import qemu_img, raw_content


def test_extended_l2_read_spanning_clusters_with_mixed_subclusters(engine: ModuleType,
                                                                   tmp_path: Path) -> None:
    base(tmp_path, pattern=0xBB)
    top = tmp_path / "top.qcow2"
    engine.create(top, 4 * MiB, extended_l2=True, backing_file="base.qcow2", backing_fmt="qcow2")
    with engine.open(top) as img:
        img.write(0, b"\x01" * 2 * KiB)             # normal subcluster, partial (COW from backing)
        img.write(6 * KiB, b"\x02" * 4 * KiB)       # two more normal subclusters
        img.write_zeroes(12 * KiB, 2 * KiB)         # zero subcluster in an allocated cluster
        img.write_zeroes(64 * KiB, 8 * KiB)         # zero-plain subclusters in the next cluster
        img.write(90 * KiB, b"\x03" * 1 * KiB)      # normal in the next cluster
        span = img.read(1 * KiB, 100 * KiB)          # crosses the cluster boundary at 64 KiB
        extents = img.map()
    assert span == raw_content(top)[1 * KiB:101 * KiB]
    assert span[:KiB] == b"\x01" * KiB and span[KiB:5 * KiB] == b"\xbb" * 4 * KiB
    assert span[11 * KiB:13 * KiB] == bytes(2 * KiB)
    assert span[63 * KiB:71 * KiB] == bytes(8 * KiB)
    assert extents == json.loads(qemu_img("map", "--output=json", str(top)).stdout)
    assert clean(top)
