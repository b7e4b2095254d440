"""A numpy-free proof that a small image is clean, for ``qcow2lab check``'s start-up.

Importing numpy costs about 45 ms here, more than the rest of ``qcow2lab check`` on a small
image (DESIGN.md, "Performance": a CLI command should cost little more than the interpreter).
The full walk (spec/rules/evaluate.py) needs numpy on every image. So ``check`` first asks this
module, which walks a small image in plain Python and answers only "clean, with these
counters" or "don't know" (None). On "don't know" the full walk runs, so this module never
decides a finding, its wording or its count: it only has to be right about clean images.

It answers only when it can see the whole image follow the simplest shape a clean image
has, and gives up at the first departure, even a legal one (a shared cluster, a snapshot,
compression, bitmaps, an external data file, encryption, a backing file, version 2,
refcounts narrower than a byte, a file over ``MAX_CLUSTERS`` clusters or L2 tables over
``MAX_L2_ENTRIES`` entries in all). Within that shape, "clean" is what the full walk
requires, rule by rule: the header and open-time rules run as they are (header_rules,
snapshots); every reference lies inside the file, is aligned and has no reserved bits; every
cluster is referenced at most once; every stored refcount equals the computed one; COPIED is
set on every L1 and L2 entry in use (their refcount is then 1); extended L2 bitmaps are valid.
tests/spec/test_check_quick.py holds it to the full walk on every test image and on damaged ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import cast

from spec import entries as en
from spec import features as ft
from spec import header as hd
from spec.geometry import div_round_up
from spec.image import ImageFile
from spec.refcounts import Tally
from spec.rules import header_rules, snapshots
from spec.rules.context import Abort, Context, FindingLog, FragInfo

MAX_CLUSTERS = 4096
"""Host clusters of the largest file walked here; larger files take the numpy walk."""
MAX_L2_ENTRIES = 32768
"""L2 entries walked here at most (about 10 ms of Python); more take the numpy walk."""
MAX_REFTABLE_CLUSTERS = 4
_REFCOUNT_FORMAT = {8: "B", 16: "H", 32: "I", 64: "Q"}
BDRV_SECTOR_SIZE = 512


@dataclass
class Clean:
    """What the full walk reports on a clean image besides "no findings"."""

    bfi: FragInfo
    image_end_offset: int


def clean_small_image(img: ImageFile) -> Clean | None:
    """``img``'s counters if it is small, simple and clean; None when the full walk must decide."""
    g = img.geometry
    cs, cb = g.cluster_size, g.cluster_bits
    h = img.header
    if (img.file_size > MAX_CLUSTERS * cs or img.version < 3 or int(h.nb_snapshots)
            or img.has_data_file or img.data_file is not None or img.backing_file
            or int(h.crypt_method) or img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER) is not None
            or img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS) is not None
            or img.autoclear_features & ft.QCOW2_AUTOCLEAR_BITMAPS
            or g.refcount_bits not in _REFCOUNT_FORMAT):
        return None
    # The header and open-time rules, exactly as the full walk runs them; they read the image
    # and report, and never touch the tally (hence the cast: no numpy array is made).
    log = FindingLog()
    ctx = Context(img, cast(Tally, None), log)
    try:
        header_rules.spec_checks(ctx)
        header_rules.open_checks(ctx)
        snapshots.read_snapshot_table(ctx)
    except Abort:
        return None
    if log.rules:
        return None

    # QEMU's view of the file: whole sectors (see evaluate.run).
    nb_clusters = div_round_up(div_round_up(img.file_size, BDRV_SECTOR_SIZE) * BDRV_SECTOR_SIZE, cs)
    referenced = bytearray(nb_clusters)

    def ref(offset: int, size: int) -> bool:
        """Count one reference; False if it leaves the file or meets another reference."""
        if size <= 0:
            return True
        first, last = offset >> cb, (offset + size - 1) >> cb
        if last >= nb_clusters or any(referenced[first:last + 1]):
            return False
        referenced[first:last + 1] = b"\1" * (last - first + 1)
        return True

    bfi = FragInfo(total_clusters=div_round_up(img.size // BDRV_SECTOR_SIZE * BDRV_SECTOR_SIZE, cs))
    if not ref(0, cs):
        return None

    # Active L1 and L2 tables (check_refcounts_l1/l2, check_oflag_copied).
    l1_offset, l1_size = int(h.l1_table_offset), int(h.l1_size)
    tables: list[int] = []
    if l1_size:
        if not ref(l1_offset, l1_size * 8):
            return None
        for e in struct.unpack(f">{l1_size}Q", ctx.read(l1_offset, l1_size * 8)):
            if not e:
                continue
            l2 = e & en.L1E_OFFSET_MASK
            if e & en.L1E_RESERVED_MASK or not e & en.QCOW_OFLAG_COPIED or not l2 or l2 % cs:
                return None
            if not ref(l2, cs):
                return None
            tables.append(l2)
    ext = img.extended_l2
    n_entries = cs // g.l2_entry_size
    if len(tables) * n_entries > MAX_L2_ENTRIES:
        return None
    for l2 in tables:
        words = struct.unpack(f">{cs // 8}Q", ctx.read(l2, cs))
        entries, bitmaps = (words[0::2], words[1::2]) if ext else (words, (0,) * n_entries)
        prev = -1
        for e, bm in zip(entries, bitmaps, strict=True):
            if not e and not bm:
                continue
            if e & (en.QCOW_OFLAG_COMPRESSED | en.L2E_STD_RESERVED_MASK):
                return None
            if ext and e & en.QCOW_OFLAG_ZERO:
                return None
            off = e & en.L2E_OFFSET_MASK
            if not off:
                # Unallocated (or a plain zero cluster, v3): nothing to count.
                if e & en.QCOW_OFLAG_COPIED or (ext and bm & en.QCOW_L2_BITMAP_ALL_ALLOC):
                    return None
                continue
            # In use (normal, or a preallocated zero cluster): aligned, COPIED, counted once.
            if off % cs or not e & en.QCOW_OFLAG_COPIED:
                return None
            if ext and (bm >> 32) & bm & en.QCOW_L2_BITMAP_ALL_ALLOC:
                return None
            if not ref(off, cs):
                return None
            bfi.allocated_clusters += 1
            # Contiguity is followed within one L2 table (as in the full walk).
            if prev >= 0 and off != prev + cs:
                bfi.fragmented_clusters += 1
            prev = off

    # The refcount table and blocks (check_refblocks), then the stored refcounts
    # (compare_refcounts): exactly the referenced clusters have refcount 1, no other is used.
    rt_offset, rt_clusters = int(h.refcount_table_offset), int(h.refcount_table_clusters)
    if rt_clusters > MAX_REFTABLE_CLUSTERS or not ref(rt_offset, rt_clusters * cs):
        return None
    blocks: list[tuple[int, int]] = []
    for i, e in enumerate(struct.unpack(f">{rt_clusters * cs // 8}Q", ctx.read(rt_offset, rt_clusters * cs))):
        if not e:
            continue
        off = e & en.REFT_OFFSET_MASK
        if e & en.REFT_RESERVED_MASK or off % cs or not ref(off, cs):
            return None
        blocks.append((i, off))
    bits = g.refcount_bits
    rbe = g.refcount_block_entries
    ones = 0
    highest = 0
    for i, off in blocks:
        data = ctx.read(off, cs).rstrip(b"\0")
        data += bytes(-len(data) % (bits // 8))
        values = struct.unpack(f">{len(data) // (bits // 8)}{_REFCOUNT_FORMAT[bits]}", data)
        for j, v in enumerate(values):
            if not v:
                continue
            k = i * rbe + j
            if v != 1 or k >= nb_clusters or not referenced[k]:
                return None
            ones += 1
            highest = max(highest, k)
    if ones != referenced.count(1):
        return None
    return Clean(bfi, (highest + 1) * cs)
