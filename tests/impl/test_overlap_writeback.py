"""The overlap check on the impl's table write-backs (impl/cache.py, impl/overlap.py): QEMU's
write-backs refuse and flag; the impl's own ordering barriers, which QEMU does not make, leave
a refused entry dirty, so the image is flagged where QEMU flags it (tests/conformance/
test_damaged.py runs the same recipe through qemu-io)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

import impl
from spec.errors import CorruptionError
from tests.conformance.helpers import l2_table_offset
from tests.impl.helpers import corrupt_bit
from tests.qemu import qemu_io


def _l2_under_a_refcount_block(tmp_path: Path) -> Path:
    p = tmp_path / "i.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(p), "1M"], check=True)
    qemu_io(p, "write -q -P 1 0 4k")
    with p.open("r+b") as f:
        f.seek(0x10000 + 8)  # refcount-table entry 1 (the table is at 0x10000 in a new image)
        f.write(struct.pack(">Q", l2_table_offset(p, 0)))
    return p


def test_a_barrier_leaves_a_refused_entry_dirty_and_flags_nothing(tmp_path: Path) -> None:
    p = _l2_under_a_refcount_block(tmp_path)
    img = impl.open(p)
    img.write(64 * 1024, b"\x02" * 4096)
    l2 = l2_table_offset(p, 0)
    img.s.l2_cache.write(barrier=True)
    assert l2 in img.s.l2_cache.dirty and not img.broken
    with pytest.raises(CorruptionError, match="overlaps with refcount block"):
        img.flush()
    assert img.broken
    img.close()
    assert corrupt_bit(p)


@pytest.mark.parametrize("mode,refused", [("cached", True), ("constant", False), ("none", False)])
def test_the_write_back_check_follows_the_overlap_check_mode(tmp_path: Path, mode: str,
                                                             refused: bool) -> None:
    p = _l2_under_a_refcount_block(tmp_path)
    with impl.open(p, overlap_check=mode) as img:
        img.write(64 * 1024, b"\x02" * 4096)
        if refused:
            with pytest.raises(CorruptionError):
                img.flush()
        else:
            img.flush()  # refcount blocks are checked in "cached" and "all" only
    assert corrupt_bit(p) == refused
