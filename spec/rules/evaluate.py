"""Evaluating the catalogue on a parsed image.

The walk follows ``qemu-img check`` step for step (block/qcow2.c qcow2_co_check_locked;
block/qcow2-refcount.c qcow2_check_refcounts, calculate_refcounts, compare_refcounts,
check_oflag_copied) so that the findings QEMU counts are counted the same number of times, and
adds the spec's own rules, which QEMU does not count (Rule.qemu_counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from spec import header as hd
from spec import limits as lim
from spec.entries import REFT_OFFSET_MASK, REFT_RESERVED_MASK
from spec.geometry import div_round_up
from spec.image import ImageFile
from spec.refcounts import Kind, StoredRefcounts, Tally, compare
from spec.rules import bitmaps, header_rules, mapping, snapshots
from spec.rules.catalogue import Finding
from spec.rules.context import Abort, Context, FindingLog, FragInfo

if TYPE_CHECKING:
    import numpy as np
else:
    # Executed at first use: a small clean image is checked without numpy
    # (spec/rules/quick.py), and importing it is most of qcow2lab check's start-up.
    from spec.lazy import numpy as np

INT_MAX = (1 << 31) - 1
BDRV_SECTOR_SIZE = 512


@dataclass
class Evaluation:
    """Findings plus the numbers ``qemu-img check`` reports beside its counters."""

    findings: list[Finding]
    """The findings kept (``log.kept``): all of them unless ``run`` was given ``keep``."""
    bfi: FragInfo
    log: FindingLog
    """Every finding counted, whether kept or not: what the counters are made of."""
    image_end_offset: int = 0
    aborted: bool = False
    """QEMU's check fails here (exit 1, no result): a CHECK-COMPLETES finding is included."""
    tally: Tally | None = None
    """The computed refcounts (calculate_refcounts' in-memory table), once the walk got that
    far: what a repair (spec/check/fix_pass.py) compares with and rebuilds from."""


def evaluate(img: ImageFile) -> list[Finding]:
    """Every violated rule of ``img``, in the order ``qemu-img check`` meets them."""
    return run(img).findings


def run(img: ImageFile, log: FindingLog | None = None) -> Evaluation:
    """Evaluate ``img``: findings, QEMU's fragmentation numbers and image-end-offset.

    ``log`` says where findings go and how many stay in memory (FindingLog); by default
    all are kept, as a repair needs them."""
    file_clusters = div_round_up(img.file_size, img.cluster_size)
    # The tally is replaced once the file size is known to be sane.
    ctx = Context(img, Tally(img.geometry, 0), log or FindingLog())
    ev = Evaluation(ctx.findings, ctx.bfi, ctx.log)
    try:
        header_rules.spec_checks(ctx)
        header_rules.open_checks(ctx)
        snaps, snapshots_size = snapshots.read_snapshot_table(ctx)
        snapshots.check_snapshot_entries(ctx, snaps)
        if file_clusters > INT_MAX:
            raise ctx.abort("IMAGE-SIZE-LIMIT", None, f"{file_clusters} clusters (QEMU: at most INT_MAX)")
        # QEMU sees the file's length in whole 512-byte sectors (block.c bdrv_getlength is
        # bdrv_nb_sectors * BDRV_SECTOR_SIZE), and judges "past the end of the file" on that.
        ctx.tally = Tally(img.geometry, div_round_up(img.file_size, BDRV_SECTOR_SIZE) * BDRV_SECTOR_SIZE)
        ctx.bfi.total_clusters = div_round_up(img.size // BDRV_SECTOR_SIZE * BDRV_SECTOR_SIZE,
                                              img.cluster_size)
        stored = _calculate_refcounts(ctx, snaps, snapshots_size)
        ev.tally = ctx.tally
        cmp = compare(ctx.tally, stored)
        for m in cmp.mismatches:
            off = m.cluster << ctx.cluster_bits
            if m.stored < m.computed:
                ctx.add("REFCOUNT-MATCHES-REFERENCES", off,
                        f"cluster {m.cluster}: refcount={m.stored} reference={m.computed}",
                        stored=m.stored, computed=m.computed)
            else:
                ctx.add("REFCOUNT-NO-LEAK", off, f"cluster {m.cluster}: leaked, refcount={m.stored} "
                        f"reference={m.computed}", stored=m.stored, computed=m.computed)
        for first, n in cmp.unreadable:
            ctx.add("REFCOUNT-READABLE", first << ctx.cluster_bits,
                    f"clusters {first}..{first + n - 1}: their refcount block cannot be read", count=n)
        mapping.check_oflag_copied(ctx, mapping.StoredGet(cmp, stored))
        ev.image_end_offset = (cmp.highest_cluster + 1) * img.cluster_size
        _overlaps(ctx)
    except Abort:
        ev.aborted = True
    if ev.aborted and "CHECK-COMPLETES" not in ctx.log.rules:
        ctx.add("CHECK-COMPLETES", None, "qemu-img check stops with an error on this image")
    return ev


def _calculate_refcounts(ctx: Context, snaps: list[snapshots.SnapshotEntry],
                         snapshots_size: int) -> StoredRefcounts:
    """calculate_refcounts, in QEMU's order; returns the stored refcounts for comparison."""
    img, cs, tally = ctx.img, ctx.cluster_size, ctx.tally
    h = img.header
    ctx.ref(0, cs, Kind.HEADER, "header")
    mapping.walk_l1(ctx, int(h.l1_table_offset), int(h.l1_size), active=True)
    if img.has_data_file and snaps:
        ctx.add("SNAPSHOT-NO-DATA-FILE", int(h.snapshots_offset),
                f"{len(snaps)} snapshots in an image with an external data file")
    for i, sn in enumerate(snaps):
        if sn.l1_table_offset % cs:
            ctx.add("SNAPSHOT-L1-ALIGNED", sn.offset,
                    f"snapshot {i}: L1 table offset {sn.l1_table_offset:#x} is not cluster aligned")
            continue
        if sn.l1_size > lim.QCOW_MAX_L1_SIZE // 8:
            ctx.add("SNAPSHOT-L1-SIZE", sn.offset, f"snapshot {i}: l1_size {sn.l1_size} is too large")
            continue
        mapping.walk_l1(ctx, sn.l1_table_offset, sn.l1_size, active=False)
    ctx.ref(int(h.snapshots_offset), snapshots_size, Kind.SNAPSHOT_TABLE, "snapshot table")
    rt_entries = int(h.refcount_table_clusters) * cs // 8
    ctx.ref(int(h.refcount_table_offset), rt_entries * 8, Kind.REFCOUNT_TABLE, "refcount table")
    crypto = img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    if crypto is not None and int(crypto.data.length):
        ctx.ref(int(crypto.data.offset), int(crypto.data.length), Kind.CRYPTO_HEADER, "LUKS header")
    bitmaps.count_bitmaps(ctx)
    reftable = np.frombuffer(ctx.read(int(h.refcount_table_offset), rt_entries * 8),
                             dtype=">u8").astype(np.uint64)
    _check_refblocks(ctx, reftable)
    for k, n in tally.overflows:
        ctx.add("REFCOUNT-NO-OVERFLOW", k << ctx.cluster_bits,
                f"cluster {k}: more references than refcount_bits can count", count=n)
    return StoredRefcounts(img.geometry, reftable, ctx.read)


def _check_refblocks(ctx: Context, reftable: np.ndarray) -> None:
    """check_refblocks: every refcount block is aligned, inside the file and used once."""
    cs, cb, tally = ctx.cluster_size, ctx.cluster_bits, ctx.tally
    rt_offset = int(ctx.img.header.refcount_table_offset)
    for i in np.nonzero(reftable)[0].tolist():
        entry = int(reftable[i])
        at = rt_offset + 8 * i
        if entry & REFT_RESERVED_MASK:
            ctx.add("REFTABLE-RESERVED-ZERO", at,
                    f"refcount table entry {i} = {entry:#x} has reserved bits set")
            continue
        off = entry & REFT_OFFSET_MASK
        if off % cs:
            ctx.add("REFBLOCK-ALIGNED", at, f"refcount block {i} at {off:#x} is not cluster aligned")
            continue
        if off >> cb >= tally.nb_clusters:
            ctx.add("REFBLOCK-INSIDE-FILE", at, f"refcount block {i} at {off:#x} is outside the image")
            continue
        ctx.ref(off, cs, Kind.REFCOUNT_BLOCK, "refcount block")
        n = tally.get(off >> cb)
        if n != 1:
            ctx.add("REFBLOCK-REFCOUNT-1", at, f"refcount block {i} at {off:#x} has {n} references")


def _overlaps(ctx: Context) -> None:
    for o in ctx.tally.overlaps:
        a, b = o.first.name.lower().replace("_", " "), o.second.name.lower().replace("_", " ")
        what = f"{a} and {b}" if a != b else f"{a} used twice"
        ctx.add("METADATA-NO-OVERLAP", o.cluster << ctx.cluster_bits, f"cluster {o.cluster}: {what}")
