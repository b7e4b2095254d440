"""Damaged images, each recipe run through qemu-io and through every engine (issue 15's
cases): the same refusal, the same corrupt flag, the same bytes.

1. An extended-L2 cluster whose host offset is unaligned, read where its subcluster is
   unallocated: qcow2_get_host_offset checks the offset of any entry that carries one
   (spec.entries.HOST_OFFSET_TYPES), so QEMU flags the image and fails the read.
2. A snapshot table past the end of the file: QEMU reads it as zeros, opens the image and
   serves guest I/O; so do the engines, and their writes leave QEMU's bytes.
3. An active L2 entry pointing at a snapshot's L2 table, written with overlap_check=all:
   QEMU refuses the write ("overlaps with inactive L2 table") and flags the image. The impl
   does the same; the model implements only "cached" and refuses the option instead of
   ignoring it.
4. Persistent bitmaps (the damaged campaign's commonest finding, on the undamaged bitmap
   base): the engines kept no bitmaps, so a read-write open cleared the autoclear bit, and
   QEMU's check then counted the bitmap directory, tables and data as leaks where QEMU's
   own writer (which keeps the bitmaps) leaves the image clean. The engines now keep the
   bitmaps as QEMU does (spec/bitmap_store.py; more recipes in test_bitmaps_kept.py): the
   files come out byte-identical and check clean.
5. A backing format extension whose name starts with NUL: QEMU reads it as a C string, an
   empty format, and probes the backing file; the engines refused "backing format \0cow2".
6. A file cut short before its L1 table: the refcount block is gone too, so the header
   cluster reads as free and the next L2 table would be allocated on it. QEMU flags the
   image ("Preventing invalid allocation of L2 table at offset 0", l2_allocate); the engines
   wrote the table over the header.
7. A bitmap table past the end of the file: QEMU reads it as zeros and opens the image; the
   engines refused it ("file ends before ...").
8. A zero flag in a v2 image's L2 entry: v2 has no zero clusters, so QEMU's lookup takes it
   for corruption and fails the read with EIO (qcow2_get_host_offset, "Zero cluster entry
   found in pre-v3 image"); the engines read zeros. The same lookup answers block status, so a
   write_zeroes whose unaligned head asks whether that cluster reads as zeros fails too.
9. An L1 table offset moved past the host's file size limit: a write allocates an L2 table,
   and writing the L1 entry fails (EFBIG). QEMU's l2_allocate frees the new table on that
   path; the engines left it allocated, one leak more than QEMU's.
10. A refcount-table entry pointing at the active L1 table: the L1 entry of a new L2 table is
   overlap-checked before it is written (qcow2_write_l1_entry, the active L1 ignored), so
   QEMU refuses the write and flags the image at that request. The engines checked guest
   data only and wrote the entry; now both refuse it and leave QEMU's bytes.
11. A refcount-table entry pointing at an active L2 table: QEMU refuses the write-back of
   that table (qcow2_cache_entry_flush, the active L2 ignored) at the flush, or at the close
   with writeback caching, and flags the image. The impl does the same from its cache; the
   model writes the table at once and has no write-back to refuse (difftest/damaged/notes.py,
   metadata-overlap), so it is only held to its own error-free run there.
12. An L2 table whose refcount is 0, and a table allocated next: QEMU checks each new table
   before writing it, nothing ignored (the header does not name it yet), so the grown L1 of
   `qemu-img resize` (qcow2_grow_l1_table) and the L1 copy of `snapshot -c`
   (qcow2_snapshot_create) are refused there and flag the image; with overlap-check=none
   QEMU and the impl write the L1 table over the L2 table. The engines checked neither.
13. A snapshot whose L1 table offset names the active L1 table: `snapshot -a` checks the
   active table before overwriting it, the active L1 ignored (qcow2_snapshot_goto), and
   meets the inactive L1 table.
14. The same zero refcount under `snapshot -d`: the new snapshot table is refused
   (qcow2_write_snapshots), and QEMU's file keeps the header's count from its memory (one
   snapshot fewer, the old table's offset) and the new clusters punched out. Under
   `snapshot -c`, with the new table on the first snapshot's L1 table (its refcount 0), the
   count is one more.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from spec.errors import CorruptionError, RequestError
from spec.features import QCOW2_INCOMPAT_CORRUPT
from spec.header import QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_BITMAPS
from spec.hostio import HostIOError
from spec.image import open_image
from tests.conformance.helpers import KiB, MiB, check_json, check_without_name, l2_table_offset
from tests.qemu import qemu_io

COPIED = 1 << 63


def _corrupt_bit(path: Path) -> bool:
    """incompatible_features (header bytes 72-79, v3) bit 1."""
    return bool(struct.unpack_from(">Q", path.read_bytes()[:80], 72)[0] & QCOW2_INCOMPAT_CORRUPT)


def _poke(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def _qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True)


def test_unaligned_offset_of_an_unallocated_subcluster_flags_the_image(engine: ModuleType,
                                                                        tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(src), "1M"],
                   check=True)
    qemu_io(src, "write -q -P 1 4k 2k")
    l2 = l2_table_offset(src, 0)
    _poke(src, l2 + 6, b"\x02")  # the host offset's low bits: 0x50000 -> 0x50200
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-f", "qcow2", "-c", "read 0 2k", str(theirs))
    assert "Input/output error" in r.stdout + r.stderr
    assert _corrupt_bit(theirs)
    with engine.open(ours) as img, pytest.raises(CorruptionError):
        img.read(0, 2 * KiB)  # subcluster 0 is unallocated: zeros if the offset went unchecked
    assert _corrupt_bit(ours)


def test_snapshot_table_past_the_end_of_the_file_reads_as_zeros(engine: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "64M"], check=True)
    qemu_io(src, "write -q -P 7 0 64k")
    _poke(src, 60, struct.pack(">IQ", 0x10000, 1 << 32))  # nb_snapshots, snapshots_offset
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-f", "qcow2", "-c", "read -P 7 0 64k", "-c", "write -q -P 0x78 1M 64k", str(theirs))
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    with engine.open(ours) as img:
        assert img.read(0, 64 * KiB) == b"\x07" * (64 * KiB)
        assert len(img.snapshots()) == 0x10000
        img.write(MiB, b"\x78" * (64 * KiB))
    assert ours.read_bytes() == theirs.read_bytes()


def test_overlap_check_all_refuses_a_write_into_an_inactive_l2_table(engine: ModuleType,
                                                                     tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "1M"], check=True)
    qemu_io(src, "write -q -P 1 0 64k")
    inactive = l2_table_offset(src, 0)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(src)], check=True)
    qemu_io(src, "write -q -P 2 0 4k")  # the active table is copied; the old one is the snapshot's
    active = l2_table_offset(src, 0)
    assert active != inactive
    _poke(src, active + 8, struct.pack(">Q", inactive | COPIED))  # guest cluster 1 -> that table
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("--image-opts", "-c", "write -P 3 64k 4k",
                 f"driver=qcow2,file.filename={theirs},overlap-check=all")
    assert "overlaps with inactive L2 table" in r.stdout + r.stderr
    assert _corrupt_bit(theirs)
    before = ours.read_bytes()
    if engine.__name__ == "model":
        # An option the model does not honour is refused, never silently ignored.
        with pytest.raises(RequestError):
            engine.open(ours, overlap_check="all")
        assert ours.read_bytes() == before
        return
    with engine.open(ours, overlap_check="all") as img, pytest.raises(CorruptionError):
        img.write(64 * KiB, b"\x03" * (4 * KiB))
    assert _corrupt_bit(ours)
    # The inactive table is untouched: the refused write reached nothing.
    assert ours.read_bytes()[inactive:inactive + 65536] == before[inactive:inactive + 65536]


def test_read_write_open_keeps_bitmaps_as_qemu_does(engine: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "4M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(src), "b0"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "512", str(src), "b1"], check=True)
    qemu_io(src, "write -q -P 1 0 64k", "write -q -P 2 3M 64k")  # both bitmaps get data clusters
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    qemu_io(theirs, "write -q -P 3 1M 64k")
    with engine.open(ours) as img:
        img.write(MiB, b"\x03" * (64 * KiB))
    # Both kept the bitmaps, rewritten at close into the same clusters.
    assert open_image(ours).bitmaps_enabled
    assert ours.read_bytes() == theirs.read_bytes()
    for path in (theirs, ours):  # the same verdict: no leaked bitmap cluster on either side
        report = check_json(path)
        assert (report.get("leaks", 0), report.get("corruptions", 0)) == (0, 0), (path, report)
    r = _qemu_io("-f", "qcow2", "-c", "read -P 1 0 64k", "-c", "read -P 3 1M 64k", "-c", "read -P 2 3M 64k",
                 "-c", "read -P 0 64k 960k", str(ours))
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr


def test_an_empty_backing_format_name_probes_the_backing_file(engine: ModuleType, tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    qemu_io(base, "write -q -P 5 0 64k")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)],
                   check=True, cwd=tmp_path)
    ext = open_image(top).extension(QCOW2_EXT_MAGIC_BACKING_FORMAT)
    assert ext is not None
    _poke(top, ext.offset + 8, b"\0")  # "qcow2" -> "\0cow2": an empty C string
    r = _qemu_io("-f", "qcow2", "-c", "read -P 5 0 64k", str(top))
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    with engine.open(top) as img:
        assert img.read(0, 64 * KiB) == b"\x05" * (64 * KiB)


def test_an_l2_table_is_never_allocated_over_the_header(engine: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(src), "4M"],
                   check=True)
    qemu_io(src, "write -q -P 1 0 8k")
    h = open_image(src).header
    assert h.refcount_table_offset < h.l1_table_offset  # header, reftable, refblock, L1
    with src.open("r+b") as f:
        # Keep the refcount table's first entry; the refcount block and L1 table it points
        # past now read as zeros (QEMU's file driver zero-fills reads past the end).
        f.truncate(h.refcount_table_offset + 8)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-f", "qcow2", "-c", "write -z 4k 8k", str(theirs))
    assert "Preventing invalid allocation of L2 table at offset 0" in r.stdout + r.stderr
    assert _corrupt_bit(theirs)
    with engine.open(ours) as img, pytest.raises(CorruptionError):
        img.write_zeroes(4 * KiB, 8 * KiB)
    assert _corrupt_bit(ours)
    assert ours.read_bytes()[:4] == b"QFI\xfb"  # the header is still there


def test_a_bitmap_table_past_the_end_of_the_file_reads_as_zeros(engine: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "4M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(src), "b0"], check=True)
    qemu_io(src, "write -q -P 1 0 64k")
    entry = open_image(src).bitmaps[0]
    directory = open_image(src).extension(QCOW2_EXT_MAGIC_BITMAPS)
    assert directory is not None
    _poke(src, int(directory.data.bitmap_directory_offset), struct.pack(">Q", 1 << 40))  # the table offset
    assert int(entry.bitmap_table_offset) < 1 << 40
    r = _qemu_io("-f", "qcow2", "-c", "read -P 1 0 64k", str(src))
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    with engine.open(src, readonly=True) as img:
        assert img.read(0, 64 * KiB) == b"\x01" * (64 * KiB)


def test_a_zero_flag_in_a_v2_image_is_corruption(engine: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(src), "1M"],
                   check=True)
    qemu_io(src, "write -q -P 1 0 64k")
    l2 = l2_table_offset(src, 0)
    _poke(src, l2 + 7, bytes([src.read_bytes()[l2 + 7] | 1]))  # QCOW_OFLAG_ZERO on guest cluster 0
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-f", "qcow2", "-c", "read 0 4k", str(theirs))
    assert "Zero cluster entry found in pre-v3 image" in r.stdout + r.stderr
    assert "Input/output error" in r.stdout + r.stderr
    with engine.open(ours) as img:
        with pytest.raises(CorruptionError):
            img.read(0, 4 * KiB)
        with pytest.raises(CorruptionError):  # QEMU drops the node: nothing is served after it
            img.read(64 * KiB, 4 * KiB)
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-f", "qcow2", "-c", "write -z 512 4k", str(theirs))
    assert "Zero cluster entry found in pre-v3 image" in r.stdout + r.stderr
    with engine.open(ours) as img, pytest.raises(CorruptionError):
        img.write_zeroes(512, 4 * KiB)  # the head: is the rest of cluster 0 zero? (block status)


def test_an_l2_table_whose_l1_entry_cannot_be_written_is_freed(engine: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(src), "4M"],
                   check=True)
    qemu_io(src, "write -q -P 1 1M 4k")
    h = open_image(src).header
    _poke(src, 40, struct.pack(">Q", h.l1_table_offset | 1 << 58))  # the L1 table: past any file's end
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-f", "qcow2", "-c", "write -P 2 0 4k", str(theirs))
    assert "File too large" in r.stdout + r.stderr
    with engine.open(ours) as img, pytest.raises(CorruptionError):  # spec.hostio.HostIOError
        img.write(0, b"\x02" * (4 * KiB))
    counts = [(c.get("leaks", 0), c.get("corruptions", 0)) for c in map(check_json, (theirs, ours))]
    assert counts[0] == counts[1], counts


def _reftable_entry_at(src: Path, index: int, target: int) -> None:
    """Point refcount-table entry ``index`` at host offset ``target`` (a table of another
    kind); entry 1 covers clusters no 1 MiB image reaches, so allocation never reads it."""
    with open_image(src) as img:
        reftable = int(img.header.refcount_table_offset)
    _poke(src, reftable + 8 * index, struct.pack(">Q", target))


def test_an_l1_entry_written_over_a_refcount_block_flags_the_image(engine: ModuleType,
                                                                   tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "1M"], check=True)
    with open_image(src) as img:
        l1 = int(img.header.l1_table_offset)
    _reftable_entry_at(src, 1, l1)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-t", "writeback", "-f", "qcow2", "-c", "write -q -P 1 0 4k", str(theirs))
    assert "overlaps with refcount block" in r.stdout + r.stderr
    assert _corrupt_bit(theirs)
    with engine.open(ours) as img, pytest.raises(CorruptionError, match="overlaps with refcount block"):
        img.write(0, b"\x01" * (4 * KiB))
    assert _corrupt_bit(ours)
    # The new L2 table written, its refcount flushed, the L1 entry not: QEMU's bytes.
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("ending", ["flush", "close"])
def test_an_l2_table_written_back_over_a_refcount_block_flags_the_image(engine: ModuleType, tmp_path: Path,
                                                                        ending: str) -> None:
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "1M"], check=True)
    qemu_io(src, "write -q -P 1 0 4k")
    _reftable_entry_at(src, 1, l2_table_offset(src, 0))
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    cmds = ["-c", "write -q -P 2 64k 4k"] + (["-c", "flush"] if ending == "flush" else [])
    r = _qemu_io("-t", "writeback", "-f", "qcow2", *cmds, str(theirs))
    assert "overlaps with refcount block" in r.stdout + r.stderr
    assert r.returncode == (1 if ending == "flush" else 0)  # qemu-io's close reports nothing
    assert _corrupt_bit(theirs)
    img = engine.open(ours)
    img.write(64 * KiB, b"\x02" * (4 * KiB))  # the L2 update stays in the cache: no check yet
    if engine.__name__ == "model":
        # No cache, no write-back to refuse: the model wrote the L2 table with the request.
        img.flush()
        img.close()
        assert not _corrupt_bit(ours)
        return
    if ending == "flush":
        with pytest.raises(CorruptionError, match="overlaps with refcount block"):
            img.flush()
    img.close()  # as QEMU's: the refusal shows in the corrupt bit, not as an error
    assert _corrupt_bit(ours)
    assert ours.read_bytes() == theirs.read_bytes()


def _refcount_zeroed(src: Path, host: int) -> None:
    """Set the refcount of the cluster at ``host`` to 0 in the first refcount block (16-bit
    entries, qemu-img create's default): the allocator then takes it for free, the next new
    table lands on it."""
    with open_image(src) as img:
        block = int(img.refcount_table()[0])
        cs = img.cluster_size
    _poke(src, block + 2 * (host // cs), b"\0\0")


def _one_l2_table(tmp_path: Path) -> tuple[Path, int]:
    """A 1 GiB image (two L1 entries) with one cluster written: (the file, its L2 table)."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "1G"], check=True)
    qemu_io(src, "write -q -P 1 0 4k")
    return src, l2_table_offset(src, 0)


def _same_outcome(theirs: Path, ours: Path) -> None:
    """The corrupt bit set in both, and QEMU's bytes (hence its check verdict) in ours."""
    assert _corrupt_bit(theirs) and _corrupt_bit(ours)
    assert ours.read_bytes() == theirs.read_bytes()
    assert check_without_name(ours) == check_without_name(theirs)


def test_a_grown_l1_table_landing_on_an_l2_table_flags_the_image(engine: ModuleType, tmp_path: Path) -> None:
    """qcow2_grow_l1_table checks the new table's clusters against every kind of metadata:
    a refcount of 0 on the L2 table puts the grown L1 there, and QEMU refuses the resize
    and flags the image. The allocation was flushed before the check and stays (a
    corruption: the L2 table's refcount is 1 where two tables would need it)."""
    src, l2 = _one_l2_table(tmp_path)
    _refcount_zeroed(src, l2)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = subprocess.run(["qemu-img", "resize", str(theirs), "2G"], capture_output=True, text=True)
    assert r.returncode == 1 and "overlaps with active L2 table" in r.stderr
    with engine.open(ours) as img, pytest.raises(CorruptionError, match="overlaps with active L2 table"):
        img.resize(2 << 30)
    _same_outcome(theirs, ours)


def test_overlap_check_none_lets_the_grown_l1_table_overwrite_the_l2_table(tmp_path: Path) -> None:
    """The same resize with overlap-check=none: QEMU writes the grown L1 table over the L2
    table, and so does the impl under the same mode (the model implements only "cached")."""
    import impl

    src, l2 = _one_l2_table(tmp_path)
    _refcount_zeroed(src, l2)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    subprocess.run(["qemu-img", "resize", "--image-opts",
                    f"driver=qcow2,file.filename={theirs},overlap-check=none", "2G"], check=True,
                   capture_output=True)
    with impl.open(ours, overlap_check="none") as img:
        img.resize(2 << 30)
    assert not _corrupt_bit(theirs) and not _corrupt_bit(ours)
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_snapshot_l1_copy_landing_on_an_l2_table_flags_the_image(engine: ModuleType,
                                                                  tmp_path: Path) -> None:
    """qcow2_snapshot_create checks the L1 copy's clusters against every kind of metadata.
    Its allocation is still in QEMU's refcount cache when the check refuses it, and the
    flagged node never writes that back: the L2 table's refcount stays 0 in the file."""
    src, l2 = _one_l2_table(tmp_path)
    _refcount_zeroed(src, l2)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(theirs)], capture_output=True, text=True)
    assert r.returncode == 1 and "overlaps with active L2 table" in r.stderr
    with engine.open(ours) as img, pytest.raises(CorruptionError, match="overlaps with active L2 table"):
        img.snapshot_create("s1")
    _same_outcome(theirs, ours)
    assert check_json(ours)["corruptions"] == 2


def test_a_snapshot_applied_over_its_own_l1_table_flags_the_image(engine: ModuleType, tmp_path: Path) -> None:
    """A snapshot whose L1 table offset names the active L1 table: qcow2_snapshot_goto
    checks the active table before overwriting it, the active L1 ignored, and meets the
    inactive L1 table there."""
    src, _ = _one_l2_table(tmp_path)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(src)], check=True)
    with open_image(src) as img:
        l1, table = int(img.header.l1_table_offset), int(img.header.snapshots_offset)
    _poke(src, table, struct.pack(">Q", l1))  # the first entry's l1_table_offset
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = subprocess.run(["qemu-img", "snapshot", "-a", "s1", str(theirs)], capture_output=True, text=True)
    assert r.returncode == 1 and "overlaps with inactive L1 table" in r.stderr
    with engine.open(ours) as img, pytest.raises(CorruptionError, match="overlaps with inactive L1 table"):
        img.snapshot_apply("s1")
    _same_outcome(theirs, ours)


def test_a_snapshot_table_landing_on_an_l2_table_flags_the_image(engine: ModuleType, tmp_path: Path) -> None:
    """qcow2_write_snapshots checks the new table's clusters against every kind of metadata.
    A delete whose new table lands on the L2 table (refcount 0) is refused, and QEMU's file
    shows two side effects the engines reproduce: the header rewritten at the flag with the
    shortened list's count (nb_snapshots 1, the old table's offset), and the new clusters,
    freed with QCOW2_DISCARD_ALWAYS, punched out: the L2 table reads as zeros."""
    src, l2 = _one_l2_table(tmp_path)
    for name in ("s1", "s2"):
        subprocess.run(["qemu-img", "snapshot", "-c", name, str(src)], check=True)
    _refcount_zeroed(src, l2)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = subprocess.run(["qemu-img", "snapshot", "-d", "s1", str(theirs)], capture_output=True, text=True)
    assert r.returncode == 1 and "overlaps with active L2 table" in r.stderr
    with engine.open(ours) as img, pytest.raises(CorruptionError, match="overlaps with active L2 table"):
        img.snapshot_delete("s1")
    _same_outcome(theirs, ours)
    assert struct.unpack_from(">I", ours.read_bytes(), 60)[0] == 1
    assert ours.read_bytes()[l2:l2 + 4096] == bytes(4096)


def _far_data_entry(tmp_path: Path, far: int) -> Path:
    """A 4 KiB-cluster image with guest clusters 0 and 1 written, then guest cluster 1's L2
    entry moved to host offset ``far`` (a damaged entry past every refcount block)."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(src), "4M"],
                   check=True)
    qemu_io(src, "write -q -P 1 0 8k")
    l2 = l2_table_offset(src, 0)
    _poke(src, l2 + 8, (COPIED | far).to_bytes(8, "big"))
    return src


def _qemu_unsafe(path: Path, *commands: str) -> str:
    """qemu-io with writeback caching, as the damaged campaign runs it (-t unsafe)."""
    argv = ["qemu-io", "-t", "unsafe", "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    r = subprocess.run([*argv, str(path)], capture_output=True, text=True)
    return r.stdout + r.stderr


def _reftable_fields(path: Path) -> tuple[int, int]:
    with path.open("rb") as f:
        return struct.unpack_from(">QI", f.read(60), 48)


@pytest.mark.parametrize("far", [1 << 30, 64 << 30])
def test_freeing_a_cluster_no_refcount_block_covers_allocates_one(engine: ModuleType, tmp_path: Path,
                                                                  far: int) -> None:
    """QEMU's update_refcount fetches the refcount block of a cluster it decrements through
    alloc_refcount_block: at 1 GiB the new block is hooked into the table, at 64 GiB the
    table grows (qcow2_refcount_area, at 64 GiB + 8 MiB: a sparse file that large); then the
    decrement fails with EAGAIN, which qcow2_free_clusters only logs. The engines dropped a
    reference only where a block existed and allocated nothing."""
    src = _far_data_entry(tmp_path, far)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    out = _qemu_unsafe(theirs, "discard 4k 4k", "write -P 5 8k 4k")
    assert "qcow2_free_clusters failed: Resource temporarily unavailable" in out, out
    with engine.open(ours) as img:
        img.discard(4 * KiB, 4 * KiB)
        img.write(8 * KiB, b"\x05" * (4 * KiB))
    assert _reftable_fields(ours) == _reftable_fields(theirs)
    assert ours.stat().st_size == theirs.stat().st_size
    if far < 1 << 32:
        assert ours.read_bytes() == theirs.read_bytes()
        assert _reftable_fields(ours) == (0x1000, 1)  # hooked up, not grown
    else:
        offset, clusters = _reftable_fields(ours)
        assert (offset, clusters) == (far + 8 * MiB + 5 * 4096, 25)  # grown, after its new blocks
        with ours.open("rb") as a, theirs.open("rb") as b:
            assert a.read(64 * KiB) == b.read(64 * KiB)  # header, tables, data
            a.seek(far)
            b.seek(far)  # the new blocks and the new table
            assert a.read(8 * MiB + 30 * 4096) == b.read(8 * MiB + 30 * 4096)
    assert check_without_name(ours) == check_without_name(theirs)
    assert check_json(ours)["leaks"] == 1  # the data cluster the damaged entry had lost


def test_a_refcount_area_past_the_file_size_limit_stays_in_the_cache(engine: ModuleType,
                                                                      tmp_path: Path) -> None:
    """The seed-1 finding (write:flip@snap): a damaged entry 16 TiB up. Its free makes QEMU
    write a new refcount block (leaked: the free still fails) and build a larger refcount
    table at 16 TiB + 8 MiB, whose blocks the host cannot write (EFBIG, ext4's limit). They
    stay dirty in QEMU's refcount cache, so the next write whose allocation evicts one fails
    with EFBIG, and so does the close's write-back. The impl's cache (QEMU's size and LRU
    order) does the same; the model has no cache (DESIGN.md): its writes of those blocks
    fail at once and it goes on (difftest/damaged/notes.py, refcounts-grown-on-free)."""
    src = _far_data_entry(tmp_path, 1 << 44)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    out = _qemu_unsafe(theirs, "discard 4k 4k", "write -P 5 0 512", "write -P 5 8k 8k")
    assert "qcow2_free_clusters failed: File too large" in out, out
    assert "write failed: File too large" in out and "Failed to flush the refcount block cache" in out, out
    img = engine.open(ours)
    img.discard(4 * KiB, 4 * KiB)
    img.write(0, b"\x05" * 512)  # no allocation
    if engine.__name__ == "impl":
        with pytest.raises(HostIOError):
            img.write(8 * KiB, b"\x05" * (8 * KiB))
        img.close()  # QEMU's close only prints the failed write-back (qcow2_inactivate)
        assert isinstance(img.close_error, HostIOError)
        assert ours.read_bytes() == theirs.read_bytes()
    else:
        img.write(8 * KiB, b"\x05" * (8 * KiB))
        img.close()
        assert _reftable_fields(ours) == _reftable_fields(theirs) == (0x1000, 1)
    assert check_json(ours)["leaks"] == check_json(theirs)["leaks"] == 2  # and the new block


def test_a_refcount_block_for_a_free_is_never_allocated_over_the_header(engine: ModuleType,
                                                                       tmp_path: Path) -> None:
    """A refcount table entry zeroed: every cluster reads as free, so the refcount block a
    discard's decrement needs would land on the header. QEMU flags the image there
    ("Preventing invalid allocation of refcount block at offset 0"), logs the failed free,
    answers the discard itself as done and refuses every later request. The engines freed
    nothing and went on."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(src), "4M"],
                   check=True)
    qemu_io(src, "write -q -P 1 0 8k")
    _poke(src, 0x1000, bytes(8))  # refcount table entry 0
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    out = _qemu_unsafe(theirs, "discard 4k 4k", "write -P 5 0 512")
    assert "Preventing invalid allocation of refcount block at offset 0" in out, out
    assert "discard 4096/4096 bytes" in out and "write failed" in out, out
    with engine.open(ours) as img:
        img.discard(4 * KiB, 4 * KiB)  # QEMU's discard succeeded too
        assert img.broken
        with pytest.raises(CorruptionError):
            img.write(0, b"\x05" * 512)
    assert _corrupt_bit(ours) and _corrupt_bit(theirs)
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_new_snapshot_table_landing_on_an_inactive_l1_table_flags_the_image(engine: ModuleType,
                                                                              tmp_path: Path) -> None:
    """qcow2_write_snapshots under `snapshot -c`: a freed data cluster takes the L1 copy,
    and the next cluster the allocator calls free (a refcount of 0 on the first snapshot's
    L1 table) takes the new table, which the check refuses. QEMU's file then counts the new
    list (nb_snapshots 2) at the old table's offset: the flag rewrote the header from
    memory, where the snapshot was already appended."""
    from spec.entries import L2E_OFFSET_MASK

    src, l2 = _one_l2_table(tmp_path)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(src)], check=True)
    with open_image(src) as img:
        data = int.from_bytes(img.read(l2, 8, "l2_entry"), "big") & L2E_OFFSET_MASK
        snapshot_l1 = int(img.snapshot_table()[0].l1_table_offset)
    _poke(src, l2, bytes(8))  # the data cluster unreferenced...
    _refcount_zeroed(src, data)  # ...and free: the L1 copy goes there
    _refcount_zeroed(src, snapshot_l1)  # the new table goes here
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = subprocess.run(["qemu-img", "snapshot", "-c", "s2", str(theirs)], capture_output=True, text=True)
    assert r.returncode == 1 and "overlaps with inactive L1 table" in r.stderr
    with engine.open(ours) as img, pytest.raises(CorruptionError, match="overlaps with inactive L1 table"):
        img.snapshot_create("s2")
    _same_outcome(theirs, ours)
    assert struct.unpack_from(">I", ours.read_bytes(), 60)[0] == 2


def test_a_request_piece_after_a_free_flagged_the_image_fails(engine: ModuleType, tmp_path: Path) -> None:
    """The same zeroed refcount table entry, and write_zeroes -u over [512, 8704): the block
    layer cuts it at clusters. The aligned middle frees guest cluster 1 and QEMU flags the
    image there, dropping the node, so the unaligned tail after it fails (ENOMEDIUM: the
    node is gone); an aligned request of two clusters frees both, the second block refused
    by the overlap check (it would overwrite the refcount table), and succeeds."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(src), "4M"],
                   check=True)
    qemu_io(src, "write -q -P 1 0 8k")
    _poke(src, 0x1000, bytes(8))
    for name, (offset, n, fails) in {"tail": (512, 8192, True), "aligned": (0, 8192, False)}.items():
        theirs, ours = tmp_path / f"q-{name}.qcow2", tmp_path / f"e-{name}.qcow2"
        shutil.copy(src, theirs)
        shutil.copy(src, ours)
        out = _qemu_unsafe(theirs, f"write -z -u {offset} {n}")
        assert ("write failed: No medium found" in out) == fails, out
        with engine.open(ours) as img:
            if fails:
                with pytest.raises(CorruptionError):
                    img.write_zeroes(offset, n, unmap=True)
            else:
                img.write_zeroes(offset, n, unmap=True)
            assert img.broken
        assert _corrupt_bit(theirs)
        assert ours.read_bytes() == theirs.read_bytes()  # the refcount table not overwritten


@pytest.mark.parametrize("far", [1 << 30, 64 << 30])
def test_refcount_table_writes_landing_on_an_l2_table_are_not_checked(engine: ModuleType, tmp_path: Path,
                                                                     far: int) -> None:
    """QEMU 7.2 runs no overlap check on the refcount table's own writes (block/
    qcow2-refcount.c): alloc_refcount_block hooks a new block into the table with a plain
    bdrv_pwrite_sync, and qcow2_refcount_area writes the grown table the same way (only
    the new blocks go through the refcount cache's checked flush). A damaged L1 entry makes
    the written table an active L2 table: at 1 GiB the hook-up lands in the refcount table
    that L1 entry 1 names, at 64 GiB the grown table lands where it points. QEMU writes
    both without a refusal or a flag, and so do the engines."""
    src = _far_data_entry(tmp_path, far)
    target = 0x1000 if far < 1 << 32 else far + 8 * MiB + 5 * 4096  # the table written
    with open_image(src) as img:
        l1 = int(img.header.l1_table_offset)
    _poke(src, l1 + 8, struct.pack(">Q", COPIED | target))
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    out = _qemu_unsafe(theirs, "discard 4k 4k", "write -P 5 8k 4k")
    assert "overlaps with" not in out and "wrote 4096/4096 bytes" in out, out
    with engine.open(ours) as img:
        img.discard(4 * KiB, 4 * KiB)
        img.write(8 * KiB, b"\x05" * (4 * KiB))
        assert not img.broken
    for path in (theirs, ours):  # the corrupt bit clear (the header only: the file is sparse)
        with path.open("rb") as f:
            assert not struct.unpack_from(">Q", f.read(80), 72)[0] & QCOW2_INCOMPAT_CORRUPT
    assert _reftable_fields(ours) == _reftable_fields(theirs)
    assert ours.stat().st_size == theirs.stat().st_size
    with ours.open("rb") as a, theirs.open("rb") as b:
        assert a.read(64 * KiB) == b.read(64 * KiB)  # header, tables (the hooked-up entry), data
        a.seek(far)
        b.seek(far)  # past the damaged entry: the new blocks and the grown table, if any
        assert a.read() == b.read()
    if far >= 1 << 32:
        assert _reftable_fields(ours) == (target, 25)  # grown onto the L2 table L1 entry 1 names
    assert check_without_name(ours) == check_without_name(theirs)


@pytest.mark.parametrize("first", ["refcount block", "active L1 table"])
def test_two_refused_l2_write_backs_meet_qemus_first_refusal_first(engine: ModuleType, tmp_path: Path,
                                                                   first: str) -> None:
    """Two dirty L2 tables both overlap other metadata: the one at guest 0 is also a refcount
    block (a damaged refcount-table entry), the one of guest 512 MiB is the active L1 table
    itself (a damaged L1 entry, COPIED so it is updated in place). QEMU's flush writes the L2
    cache back in slot order (block/qcow2-cache.c qcow2_cache_write), and with the default
    4-slot cache of a 2 GiB image every scan starts at slot 0 ((offset / 64 KiB * 4) % 4), so
    the table loaded first sits in slot 0 and its refusal is the one QEMU reports; host-offset
    order would always put the L1 table (0x30000) first."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "2G"], check=True)
    qemu_io(src, "write -q -P 1 0 4k")
    with open_image(src) as img:
        l1 = int(img.header.l1_table_offset)
    _reftable_entry_at(src, 1, l2_table_offset(src, 0))
    _poke(src, l1 + 8, struct.pack(">Q", COPIED | l1))
    far = 512 * MiB + 640 * KiB  # L2 index 10 of the L1 cluster: past l1_size, a zero entry
    writes = [(64 * KiB, 2), (far, 3)]
    if first == "active L1 table":
        writes.reverse()
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    cmds = [a for off, p in writes for a in ("-c", f"write -q -P {p} {off} 4k")] + ["-c", "flush"]
    r = _qemu_io("-t", "writeback", "-f", "qcow2", *cmds, str(theirs))
    assert f"Preventing invalid write on metadata (overlaps with {first})" in r.stdout + r.stderr
    assert _corrupt_bit(theirs)
    img = engine.open(ours)
    for off, p in writes:
        img.write(off, bytes([p]) * (4 * KiB))  # the L2 updates stay in the cache
    if engine.__name__ == "model":
        # No cache, no write-back to refuse: the model wrote both tables with the requests.
        img.flush()
        img.close()
        assert not _corrupt_bit(ours)
        return
    with pytest.raises(CorruptionError, match=f"overlaps with {first}"):
        img.flush()
    img.close()
    assert _corrupt_bit(ours)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_an_unaligned_refcount_block_met_by_the_preallocation_guess_flags_the_image(
        engine: ModuleType, tmp_path: Path, compat: str) -> None:
    """The first block-status query of an open (a partial write_zeroes asks whether the rest
    of its cluster reads as zeros) guesses whether the image is preallocated
    (qcow2_detect_metadata_preallocation): it counts refcounts cluster by cluster up to the
    end of the file, and qcow2_get_refcount flags an unaligned refcount block on the way.
    The detection's failure is ignored, but the node is dropped, so the zero-data fallback
    fails (ENOMEDIUM) and so does everything after it (damaged seed 13, flip-340@v2: a
    reftable entry with reserved bits, met after a free had grown the file to 4 TiB)."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat},cluster_size=4k",
                    str(src), "4M"], check=True)
    qemu_io(src, "write -q -P 1 0 8k")
    with open_image(src) as img:
        reftable = int(img.header.refcount_table_offset)
    _poke(src, reftable + 8, struct.pack(">Q", 0x1200))  # entry 1 (clusters from 8 MiB): unaligned
    with src.open("r+b") as f:
        f.truncate(16 * MiB)  # a sparse tail: the count reaches entry 1 below its threshold
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-f", "qcow2", "-c", "write -z 0 512", "-c", "read 8k 4k", str(theirs))
    assert "Refblock offset 0x1200 unaligned (reftable index: 0x1)" in r.stderr, r.stdout + r.stderr
    assert r.stdout.count("No medium found") == 2, r.stdout
    with engine.open(ours) as img:
        with pytest.raises(CorruptionError):
            img.write_zeroes(0, 512)  # cluster 0 holds data: not zero, the fallback is refused
        with pytest.raises(CorruptionError):
            img.read(8 * KiB, 4 * KiB)
    if compat == "1.1":
        assert _corrupt_bit(theirs) and _corrupt_bit(ours)
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_cow_freeing_the_refcount_block_itself_leaves_its_refcount(engine: ModuleType,
                                                                      tmp_path: Path) -> None:
    """An L2 entry (without COPIED) pointing at the refcount block: a partial write copies the
    cluster elsewhere and frees the old one, the refcount block itself, whose refcount drops
    to 0. QEMU's update_refcount then finds that cluster in its refcount cache and discards
    the entry, dirty (qcow2_cache_is_table_offset, qcow2_cache_discard): the decrement never
    reaches the file, which keeps refcount 1 for the block, as its reftable entry wants, and
    checks clean. The cacheless model wrote the 0 (damaged seed 13, flip-1467@snap)."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(src), "4M"],
                   check=True)
    qemu_io(src, "write -q -P 1 0 8k")
    with open_image(src) as img:
        block = int(img.refcount_table()[0])
    _poke(src, l2_table_offset(src, 0) + 8 * 21, struct.pack(">Q", block))  # guest cluster 21
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-f", "qcow2", "-c", "write -q -P 7 84k 512", str(theirs))
    assert r.returncode == 0 and not r.stderr, r.stdout + r.stderr
    with engine.open(ours) as img:
        img.write(84 * KiB, b"\x07" * 512)
    assert check_json(theirs).get("corruptions", 0) == 0
    assert check_without_name(ours) == check_without_name(theirs)
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_grown_refcount_table_drops_reserved_bits_past_the_last_block(engine: ModuleType,
                                                                        tmp_path: Path) -> None:
    """qcow2_refcount_area copies the old table into the grown one only up to
    max_refcount_table_index, the last entry whose offset bits are set: an entry past it that
    holds only reserved bits (a damaged one) is gone from the new table, where the engines
    copied the whole table and check counted one corruption more than QEMU's (damaged seed
    13, flip-1206@bitmap and flip-5136@bitmap)."""
    src = _far_data_entry(tmp_path, 64 << 30)
    with open_image(src) as img:
        reftable = int(img.header.refcount_table_offset)
    _poke(src, reftable + 8 * 300, struct.pack(">Q", 0x4))  # reserved bits only
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    out = _qemu_unsafe(theirs, "discard 4k 4k")
    assert "qcow2_free_clusters failed: Resource temporarily unavailable" in out, out
    with engine.open(ours) as img:
        img.discard(4 * KiB, 4 * KiB)
    offset, clusters = _reftable_fields(theirs)
    assert _reftable_fields(ours) == (offset, clusters)
    with ours.open("rb") as a, theirs.open("rb") as b:
        a.seek(offset)
        b.seek(offset)
        assert a.read(clusters * 4096) == b.read(clusters * 4096)
    assert "reserved bits" not in qemu_img_check_text(theirs)
    assert check_without_name(ours) == check_without_name(theirs)


def qemu_img_check_text(path: Path) -> str:
    return subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True).stdout


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_flagging_the_image_rewrites_the_whole_header_cluster(engine: ModuleType, tmp_path: Path,
                                                              compat: str) -> None:
    """qcow2_mark_corrupt (on v2 too, which has no corrupt bit) rewrites the header with
    qcow2_update_header: the whole first cluster rebuilt from memory, extensions in QEMU's
    order, the backing file name after them, zeros to the end. Damaged bytes there that QEMU
    never read (the padding, a feature name) are gone from its file; the engines rewrote
    the fixed fields only and kept them (damaged seed 13, flip-5136@bitmap: a byte at 1175)."""
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"compat={compat}", "-b", "base.qcow2",
                    "-F", "qcow2", str(src), "1M"], check=True, cwd=tmp_path)
    qemu_io(src, "write -q -P 1 0 64k")
    l2 = l2_table_offset(src, 0)
    _poke(src, l2 + 6, b"\x02")  # guest cluster 0's host offset unaligned: a read flags the image
    _poke(src, 1175, b"\xf8")  # past the backing file name
    _poke(src, 0xFFFF, b"\x01")  # the header cluster's last byte
    if compat == "1.1":
        _poke(src, 112 + 8 + 2 + 5, b"X")  # inside the feature table's first name
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-f", "qcow2", "-c", "read 0 4k", str(theirs))
    assert "Marking image as corrupt" in r.stderr, r.stdout + r.stderr
    with engine.open(ours) as img, pytest.raises(CorruptionError):
        img.read(0, 4 * KiB)
    head = theirs.read_bytes()[:64 * KiB]
    assert head[1175] == 0 and head[0xFFFF] == 0
    assert ours.read_bytes() == theirs.read_bytes()


def test_a_one_cluster_write_whose_link_forces_a_refused_write_back_succeeds_flagged(
        engine: ModuleType, tmp_path: Path) -> None:
    """A refcount-table entry naming the active L2 table, a discard (its free makes the
    refcount cache depend on the L2 cache), then a partial write of one new cluster: linking
    it, qcow2_alloc_cluster_link_l2 sets the L2 cache's dependency on the refcount cache,
    which first writes the L2 table back; the overlap check refuses it and flags the image,
    and QEMU ignores that result, so the write succeeds. The impl's one-cluster write path
    failed the write (damaged seed 14, flip-2771@v3); its run path already went on."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(src), "4M"],
                   check=True)
    qemu_io(src, "write -q -P 1 0 8k")
    _reftable_entry_at(src, 1, l2_table_offset(src, 0))
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    out = _qemu_unsafe(theirs, "discard 4k 4k", "write -P 5 1M 512", "read -P 5 1M 512")
    assert "overlaps with refcount block" in out and "write failed" not in out, out
    assert "read failed: No medium found" in out, out
    assert _corrupt_bit(theirs)
    with engine.open(ours) as img:
        img.discard(4 * KiB, 4 * KiB)
        img.write(MiB, b"\x05" * 512)
        if engine.__name__ == "model":
            # No cache, no write-back to refuse (notes.py, metadata-overlap): its own run.
            assert img.read(MiB, 512) == b"\x05" * 512
            return
        with pytest.raises(CorruptionError):  # the node was dropped: nothing is served
            img.read(MiB, 512)
    assert _corrupt_bit(ours)


def test_a_header_rewrite_that_does_not_fit_leaves_the_header_alone(engine: ModuleType,
                                                                      tmp_path: Path) -> None:
    """header_length as large as the cluster: QEMU keeps everything after its 112 bytes as
    unknown header fields, and qcow2_update_header, which must add at least the end-of-
    extensions marker, runs out of room (-ENOSPC) and writes nothing. So flagging the image
    leaves no corrupt bit in the file (damaged seed 14, flip-957@snap); the engines wrote
    it."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(src), "1M"],
                   check=True)
    qemu_io(src, "write -q -P 1 0 4k")
    _poke(src, 100, struct.pack(">I", 4096))  # header_length
    l2 = l2_table_offset(src, 0)
    _poke(src, l2 + 6, b"\x02")  # an unaligned host offset: a read flags the image
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    r = _qemu_io("-f", "qcow2", "-c", "read 0 4k", str(theirs))
    assert "Marking image as corrupt" in r.stderr, r.stdout + r.stderr
    assert not _corrupt_bit(theirs)
    with engine.open(ours) as img, pytest.raises(CorruptionError):
        img.read(0, 4 * KiB)
    assert ours.read_bytes() == theirs.read_bytes() == src.read_bytes()


def test_the_preallocation_guess_leaves_dirty_tables_in_the_cache(engine: ModuleType, tmp_path: Path) -> None:
    """A damaged L2 entry naming the first free cluster, where the next L2 table lands: QEMU
    writes that table empty when it allocates it (l2_allocate) and keeps its entries in the
    cache, so a read through the damaged entry gives zeros, also after the first block-status
    query of the open (a partial write_zeroes), whose preallocation guess reads refcounts
    through the cache and flushes nothing. The impl wrote its caches back there (damaged
    seed 14, flip-7491@snap); the cacheless model reads the entries (notes.py,
    cached-metadata-read), so it is only held to its own run."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(src), "4M"],
                   check=True)
    qemu_io(src, "write -q -P 1 0 8k")
    end = src.stat().st_size
    _poke(src, l2_table_offset(src, 0) + 8 * 5, struct.pack(">Q", end))  # guest cluster 5 -> the next table
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    out = _qemu_unsafe(theirs, "write -P 7 3M 4k", "write -z 0x1e00 0x200", "read -P 0 20k 4k")
    assert "Pattern verification failed" not in out and "failed" not in out, out
    with engine.open(ours) as img:
        img.write(3 * MiB, b"\x07" * (4 * KiB))
        img.write_zeroes(0x1E00, 0x200)
        table = img.read(20 * KiB, 4 * KiB)
        assert table == bytes(4 * KiB) or engine.__name__ == "model", table.hex()
    assert check_without_name(ours) == check_without_name(theirs)


def test_a_refcount_block_past_the_file_size_limit_stays_dirty_through_a_status_query(
        engine: ModuleType, tmp_path: Path) -> None:
    """The first refcount block moved to 2 PiB (a reftable entry's bit 51): it reads as zeros,
    and QEMU keeps the new clusters' refcounts in its cache, so a write with COW regions over
    a backing file succeeds, and only the close fails to write the block back (EFBIG,
    printed). The COW's zero-status query makes the first preallocation guess of the open,
    where the impl wrote its caches back and failed the write (damaged seed 15,
    flip-3290@overlay). The cacheless model writes the block with the request and fails
    (notes.py, model-write-through)."""
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2",
                    "-F", "qcow2", str(src), "4M"], check=True, cwd=tmp_path)
    qemu_io(src, "write -q -P 1 4k 4k")
    with open_image(src) as img:
        reftable, block = int(img.header.refcount_table_offset), int(img.refcount_table()[0])
    _poke(src, reftable, struct.pack(">Q", block | 1 << 51))
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(src, theirs)
    shutil.copy(src, ours)
    out = _qemu_unsafe(theirs, "write -P 2 4608 65536", "read -P 2 4608 65536")
    assert "failed" not in out.replace("Failed to flush", ""), out
    assert "Failed to flush the refcount block cache: File too large" in out, out
    img = engine.open(ours)
    if engine.__name__ == "model":
        with pytest.raises(HostIOError):
            img.write(4608, b"\x02" * (64 * KiB))
        img.close()
        return
    img.write(4608, b"\x02" * (64 * KiB))
    assert img.read(4608, 64 * KiB) == b"\x02" * (64 * KiB)
    img.close()  # its write-back of the block fails as QEMU's does, and is only reported


def test_a_refcount_block_the_preallocation_guess_cannot_read_is_not_preallocated(
        engine: ModuleType, tmp_path: Path) -> None:
    """The same guess meets a refcount block it cannot read (a reftable entry at 2^63, which
    no host read reaches): qcow2_get_refcount fails, the detection fails, and
    qcow2_co_block_status takes that for "not preallocated" and goes on, nothing flagged.
    The engines failed the request with the host error (damaged seed 17, flip-1263@snap)."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(src), "4M"],
                   check=True)
    qemu_io(src, "write -q -P 1 0 8k")
    with open_image(src) as img:
        reftable = int(img.header.refcount_table_offset)
    _poke(src, reftable + 8, struct.pack(">Q", 1 << 63))  # entry 1 (clusters from 8 MiB)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    for path in (theirs, ours):
        shutil.copy(src, path)
        with path.open("r+b") as f:
            # A sparse tail (a copy would fill it): the count reaches entry 1 below its
            # threshold, which st_blocks sets.
            f.truncate(16 * MiB)
    r = _qemu_io("-f", "qcow2", "-c", "write -z 0 512", "-c", "read -P 0 0 512", "-c", "read -P 1 512 4k",
                 str(theirs))
    assert r.returncode == 0 and "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    with engine.open(ours) as img:
        img.write_zeroes(0, 512)
        assert img.read(0, 4608) == bytes(512) + b"\x01" * 4096
    assert not _corrupt_bit(theirs) and not _corrupt_bit(ours)
    assert ours.read_bytes() == theirs.read_bytes()


def test_the_preallocation_guess_is_made_at_the_first_block_status_query(
        engine: ModuleType, tmp_path: Path) -> None:
    """qcow2_co_block_status makes the guess at its first call, on the file as it is then.
    Here that call is the first write's COW check (is_zero_cow), while the file is small;
    the write then puts its L2 table at 8 MiB, where a damaged L1 entry points. The impl
    knew the COW regions of a plain unallocated cluster were zeros without asking, so its
    guess came at the next query, on the grown file, and met the unaligned refcount block
    of reftable entry 1 (clusters from 8 MiB), which QEMU never reaches: the impl flagged the
    image where QEMU wrote (damaged seed 18, flip-2969@v3)."""
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(src), "4M"],
                   check=True)
    with open_image(src) as img:
        reftable, l1 = int(img.header.refcount_table_offset), int(img.header.l1_table_offset)
    _poke(src, reftable + 8, struct.pack(">Q", 0x800))  # entry 1: an unaligned block
    _poke(src, l1, struct.pack(">Q", 1 << 63 | (8 * MiB + 4096)))  # L1[0]: past the file's end
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    for path in (theirs, ours):
        shutil.copy(src, path)
    r = _qemu_io("-f", "qcow2", "-c", "write -P 7 0xc00 4k", "-c", "write -z 0x3200 512",
                 "-c", "read -P 7 0xc00 4k", str(theirs))
    assert r.returncode == 0 and "corrupt" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    with engine.open(ours) as img:
        img.write(0xC00, b"\x07" * 4096)
        img.write_zeroes(0x3200, 512)
        assert img.read(0xC00, 4096) == b"\x07" * 4096
    assert not _corrupt_bit(theirs) and not _corrupt_bit(ours)
    assert ours.read_bytes() == theirs.read_bytes()
