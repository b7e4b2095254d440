"""Refcount checking and rebuilding (block/qcow2-refcount.c, qcow2_check_refcounts,
calculate_refcounts, compare_refcounts, check_oflag_copied).

The model computes what every refcount must be by walking every structure that owns host
clusters, and compares with what the refcount blocks say:

=========================================  =====================================
structure                                  clusters referenced
=========================================  =====================================
header                                     cluster 0
active L1 table, each snapshot's L1        its clusters (once per table)
snapshot table                             its clusters
L2 tables                                  once per L1 table pointing at them
data clusters (NORMAL, ZERO_ALLOC)         once per L1 table reaching them
compressed clusters                        every cluster its sectors touch
refcount table, refcount blocks            their clusters
bitmap directory, tables, data clusters    their clusters
LUKS header                                its clusters
=========================================  =====================================

A stored refcount below the computed one is a corruption, above it a leak (qemu-img
check's terms). COPIED must be set exactly on active L1/L2 entries whose cluster has
refcount 1.

``check(path, repair="leaks"|"all")`` is ``qemu-img check -r`` (see _check_and_repair and
model/repair_pass.py): it repairs what QEMU repairs (refcounts, in place or by rebuilding
the refcount structure; COPIED flags; misaligned preallocated zero clusters; refcount blocks
past the end of the file; the dirty/corrupt bits), keeps counted the damage QEMU never
repairs, stops with an error where QEMU's repair does, and reports what a second check
finds, with the fixed counts, as qemu-img does. tests/test_repair.py holds it to QEMU's
report, exit code and repaired bytes.

Errors: CorruptionError when a structure points outside what can be walked; FormatError
from spec.image.open_image in ``check``; UnsupportedFeature for damage the repair does not
handle QEMU's way (refused before anything is written); RequestError when another process
holds a conflicting lock (spec/locking.py).
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

from model import mapping as mp
from model import refcounts as rc
from model.qfile import Qcow2File
from spec import features as ft
from spec import header as hd
from spec.entries import (
    BME_TABLE_ENTRY_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COPIED,
    REFT_OFFSET_MASK,
    ClusterType,
    cluster_type,
    compressed_range,
)
from spec.errors import CorruptionError, FormatError, Qcow2Error, UnsupportedFeature
from spec.geometry import align_up
from spec.image import open_image
from spec.interface import CheckResult, Repair
from spec.locking import ImageLock


def expected_refcounts(q: Qcow2File) -> Counter[int]:
    """Computed refcount of every host cluster that something references."""
    cs = q.cluster_size
    refs: Counter[int] = Counter()

    def ref(offset: int, length: int, times: int = 1) -> None:
        if length <= 0:
            return
        for cl in range(offset // cs, (offset + length - 1) // cs + 1):
            refs[cl] += times

    ref(0, cs)
    ref(q.header.refcount_table_offset, q.header.refcount_table_clusters * cs)
    for e in rc.read_reftable(q):
        # check_refblocks skips an unaligned refcount block offset (counted as a corruption
        # that forces a rebuild) instead of referencing the cluster it points into.
        if e & REFT_OFFSET_MASK and not (e & REFT_OFFSET_MASK) % cs:
            ref(e & REFT_OFFSET_MASK, cs)
    l1_tables = [(int(q.header.l1_table_offset), int(q.header.l1_size))]
    if q.header.nb_snapshots:
        size = 0
        for s in _snapshot_table(q):
            l1_tables.append((int(s.l1_table_offset), int(s.l1_size)))
            size += _snapshot_entry_size(s)
        ref(q.header.snapshots_offset, size)
    # An L2 table counts once per L1 entry that points at it, and so does everything it
    # points at; each distinct table is read once and its references multiplied.
    uses: Counter[int] = Counter()
    for l1_off, l1_size in l1_tables:
        ref(l1_off, l1_size * 8)
        for i, l1e in enumerate(mp.read_l1(q, l1_off, l1_size)):
            l2off = mp.l2_offset(q, l1e, i)
            if l2off:
                uses[l2off] += 1
    file_size = q.file_size()
    for l2off, times in uses.items():
        ref(l2off, cs, times)
        if l2off >= file_size:
            continue  # reads as zeros: references nothing
        for entry, _ in mp.read_l2(q, l2off):
            t = cluster_type(entry, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
            if t is ClusterType.COMPRESSED:
                coff, csize = compressed_range(entry, q.cluster_bits)
                ref(coff, csize, times)
            elif t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) and not q.has_data_file:
                ref(entry & L2E_OFFSET_MASK, cs, times)
    _bitmap_refs(q, ref)
    crypt = q.image_file.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    if crypt is not None:
        ref(crypt.data.offset, crypt.data.length)
    return refs


def _snapshot_table(q: Qcow2File) -> list[Any]:
    from model.snapshots import _table  # snapshots imports image, which imports this module

    return _table(q)


def _snapshot_entry_size(s: Any) -> int:
    n = 40 + int(s.extra_data_size) + int(s.id_str_size) + int(s.name_size)
    return n + (-n % 8)


def _bitmap_refs(q: Qcow2File, ref: Callable[[int, int], None]) -> None:
    """Bitmap directory, bitmap tables and their data clusters (qcow2.rst "Bitmaps")."""
    ext = q.image_file.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
    if ext is None or not q.image_file.bitmaps_enabled:
        return
    ref(ext.data.bitmap_directory_offset, ext.data.bitmap_directory_size)
    for e in q.image_file.bitmap_directory():
        ref(e.bitmap_table_offset, e.bitmap_table_size * 8)
        for be in mp.read_l1(q, e.bitmap_table_offset, e.bitmap_table_size):
            if be & BME_TABLE_ENTRY_OFFSET_MASK:
                ref(be & BME_TABLE_ENTRY_OFFSET_MASK, q.cluster_size)


def stored_refcounts(q: Qcow2File, limit: int | None = None) -> dict[int, int]:
    """Every non-zero refcount the refcount blocks hold, each block read once; with
    ``limit``, only the blocks covering clusters below it (compare_refcounts looks at the
    clusters of the file and no further)."""
    g = q.geometry
    entries, bits = g.refcount_block_entries, g.refcount_bits
    table = rc.read_reftable(q)
    out: dict[int, int] = {}
    count = len(table) if limit is None else min(len(table), -(-limit // entries))
    for i in range(count):
        block = rc._refblock_offset(q, table, i)
        if not block:
            continue
        data = q.pread(block, q.cluster_size)
        if not any(data):
            continue
        for j in range(entries):
            v = rc.refcount_get(data, j, bits)
            if v and (limit is None or i * entries + j < limit):
                out[i * entries + j] = v
    return out


def _beyond_file(q: Qcow2File, want: Counter[int]) -> list[int]:
    """Referenced clusters past the end of the file (qemu-img check: "beyond the end")."""
    last = -(-q.file_size() // q.cluster_size)
    return [i for i in want if i >= last]


def rebuild_refcounts(q: Qcow2File) -> None:
    """Repair a dirty image's refcounts the way QEMU does when it opens one read-write
    (qcow2_do_open -> qcow2_check_refcounts with BDRV_FIX_ERRORS | BDRV_FIX_LEAKS):

    - if some referenced cluster has a stored refcount of 0, the whole refcount structure
      is rebuilt in free space (rebuild_refcount_structure), then every cluster the old
      structure leaves leaked is freed again;
    - otherwise each wrong refcount is corrected in place (compare_refcounts);
    - finally COPIED flags are fixed (check_oflag_copied).

    A reference past the end of the file is a CorruptionError: nothing sane can be rebuilt.
    """
    want = expected_refcounts(q)
    if _beyond_file(q, want):
        raise CorruptionError("a table references a cluster past the end of the file")
    have = stored_refcounts(q)
    if any(v and not have.get(i) for i, v in want.items()):
        nb = -(-q.file_size() // q.cluster_size)
        _rebuild_structure(q, [want.get(i, 0) for i in range(nb)])
        want = expected_refcounts(q)
        have = stored_refcounts(q)
    for i in sorted(set(want) | set(have)):
        diff = want.get(i, 0) - have.get(i, 0)
        if diff:
            # compare_refcounts fixes with update_refcount(..., QCOW2_DISCARD_ALWAYS).
            while True:
                try:
                    rc.update_refcount(q, i * q.cluster_size, 1, diff, discard=True)
                    break
                except rc._Again:
                    continue
    fix_copied(q)


def _alloc_imrt(imrt: list[int], count: int, first_free: list[int]) -> int:
    """alloc_clusters_imrt: ``count`` contiguous free clusters in the in-memory refcount
    array from ``first_free[0]`` on, growing the array past the end if needed; they get
    refcount 1. Returns the first cluster index."""
    cluster = first_free[0]
    found = 0
    first_gap = True
    while cluster < len(imrt) and found < count:
        if not imrt[cluster]:
            found += 1
            if first_gap:
                first_free[0] = cluster
                first_gap = False
        else:
            found = 0
        cluster += 1
    if found < count:
        imrt.extend([0] * (cluster + count - found - len(imrt)))
    cluster -= found
    for k in range(count):
        imrt[cluster + k] = 1
    return cluster


PreWrite = Callable[[int, int], None]
"""qcow2_pre_write_overlap_check before each write of a rebuild; raises to stop it."""


def _write_refblocks(q: Qcow2File, imrt: list[int], first: int, end: int, reftable: list[int],
                     pre_write: PreWrite | None = None) -> bool:
    """rebuild_refcounts_write_refblocks: write a refblock for every block range of
    [first, end) that has a non-zero refcount, allocating it in ``imrt`` if new. Returns
    whether ``reftable`` had to grow."""
    entries = q.geometry.refcount_block_entries
    grown = False
    first_free = [0]
    cluster = first
    while cluster < end:
        if cluster >= len(imrt) or not imrt[cluster]:
            cluster += 1
            continue
        index = cluster // entries
        block_start = index * entries
        if index < len(reftable) and reftable[index]:
            block = reftable[index]
        else:
            first_free[0] = max(first_free[0], block_start)
            block_cluster = _alloc_imrt(imrt, 1, first_free)
            block = block_cluster * q.cluster_size
            end = max(end, block_cluster + 1)
            if len(reftable) <= index:
                reftable.extend([0] * (align_up((index + 1) * 8, q.cluster_size) // 8 - len(reftable)))
                grown = True
            reftable[index] = block
        values = (imrt[block_start:block_start + entries] + [0] * entries)[:entries]
        if pre_write is not None:
            pre_write(block, q.cluster_size)
        rc.write_refblock(q, block, values)
        cluster = block_start + entries
    return grown


def _rebuild_structure(q: Qcow2File, imrt: list[int], pre_write: PreWrite | None = None) -> None:
    """rebuild_refcount_structure: new refcount blocks and a new refcount table, placed in
    the free clusters of the computed refcounts ``imrt``; the old structure is leaked (the
    caller frees it). Repeats until the table stops growing. ``pre_write`` is called before
    each refcount block and the table are written (QEMU's overlap check)."""
    reftable: list[int] = []
    _write_refblocks(q, imrt, 0, len(imrt), reftable, pre_write)
    while True:
        clusters = -(-len(reftable) * 8 // q.cluster_size)
        start = _alloc_imrt(imrt, clusters, [0])
        if not _write_refblocks(q, imrt, start, start + clusters, reftable, pre_write):
            break
    if pre_write is not None:
        pre_write(start * q.cluster_size, len(reftable) * 8)
    q.pwrite(start * q.cluster_size, struct.pack(f">{len(reftable)}Q", *reftable))
    q.header.refcount_table_offset = start * q.cluster_size
    q.header.refcount_table_clusters = clusters
    q.write_header()


def fix_copied(q: Qcow2File) -> int:
    """Set COPIED exactly where the active tables' clusters have refcount 1
    (check_oflag_copied with repair). Returns how many entries were wrong."""
    wrong = 0
    l1 = mp.read_l1(q)
    for i, l1e in enumerate(l1):
        l2off = mp.l2_offset(q, l1e, i)
        if not l2off:
            continue
        want = rc.get_refcount(q, l2off // q.cluster_size) == 1
        if bool(l1e & QCOW_OFLAG_COPIED) != want:
            wrong += 1
            l1[i] = l2off | (QCOW_OFLAG_COPIED if want else 0)
            mp.write_l1(q, l1)
        table = mp.read_l2(q, l2off)
        dirty = False
        for j, (e, b) in enumerate(table):
            t = cluster_type(e, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
            if t not in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                continue
            # With a data file every cluster counts as referenced once (no refcounts).
            ok = q.has_data_file or rc.get_refcount(q, (e & L2E_OFFSET_MASK) // q.cluster_size) == 1
            if bool(e & QCOW_OFLAG_COPIED) != ok:
                wrong += 1
                table[j] = ((e | QCOW_OFLAG_COPIED) if ok else (e & ~QCOW_OFLAG_COPIED), b)
                dirty = True
        if dirty and not q.readonly:
            mp.write_l2(q, l2off, table)
    return wrong


def check(path: str | os.PathLike[str], *, repair: Repair = None) -> CheckResult:
    """``qemu-img check`` of the image at ``path`` (qcow2_co_check_locked).

    ``repair``: None only reports and never writes to the file. "leaks" and "all" repair
    as ``qemu-img check -r leaks|all`` does; see ``_check_and_repair``.

    Raises FormatError / UnsupportedFeature when the image does not open; with ``repair``
    also UnsupportedFeature when the image has damage the model does not repair (nothing
    is written then).
    """
    if repair is not None:
        return _check_and_repair(str(path), repair)
    from model.image import open as open_model

    path = str(path)
    result = CheckResult(filename=path)
    # Locked as ``qemu-img check -U`` locks (a shared read lock that shares everything), so a
    # report never fails for another process (or another model Image) holding the file.
    img = open_model(path, readonly=True, force_share=True)
    q = img.q
    try:
        want = expected_refcounts(q)
        beyond = set(_beyond_file(q, want))
        # compare_refcounts never looks past the file's clusters (and what is referenced).
        stored = stored_refcounts(q, _compared(q, want))
        for i in sorted(set(want) | set(stored)):
            have = stored.get(i, 0)
            exp = want.get(i, 0)
            if i in beyond:
                # QEMU reports these and cannot fix them by changing refcounts.
                result.corruptions += 1
                continue
            if have > exp:
                result.leaks += 1
            elif have < exp:
                result.corruptions += 1
        result.corruptions += _count_copied(q)
        # qemu-img leaves out the counters that are 0 (collect_image_check: has_* = value != 0).
        total = q.geometry.size_to_clusters(int(q.header.size))
        result.total_clusters = total or None
        result.image_end_offset = _image_end(q, want) or None
        allocated, compressed, fragmented = _stats(q)
        result.allocated_clusters = allocated or None
        result.compressed_clusters = compressed or None
        result.fragmented_clusters = fragmented or None
    except (CorruptionError, FormatError) as e:
        result.check_errors += 1
        result.findings.append(str(e))
    finally:
        img.close()
    return result


def _check_and_repair(path: str, repair: str) -> CheckResult:
    """``qemu-img check -r leaks|all`` (qemu-img.c img_check; block/qcow2.c
    qcow2_co_check_locked; block/qcow2-refcount.c qcow2_check_refcounts).

    1. A read-only check (the rules catalogue, spec.rules, which agrees with qemu-img
       check) decides whether to touch the file at all: an image qemu-img would not report
       on ("refused") is returned as is, and damage the model's repair does not handle
       (repair_pass.HANDLED) raises UnsupportedFeature, as does a
       refcount block that would grow the file past repair_pass.GROW_LIMIT_CLUSTERS.
       Nothing is written in those cases.
    2. The fix pass (model/repair_pass.py) repairs what QEMU repairs, in QEMU's order, and
       leaves counted what QEMU leaves; when QEMU's check would end with an error, so does
       it (no report, exit 1), after the writes QEMU makes before that point.
    3. As qemu-img, when something was fixed the image is checked again and that result is
       reported, carrying the fix pass's corruptions-fixed / leaks-fixed.
    """
    from model import repair_pass as rp
    from spec.rules.check import check as rules_check
    from spec.rules.check import verdict

    before = rules_check(path)
    if verdict(before) == "refused":
        return before
    counted = {f.rule for f in before.findings if f.counted}
    if {"REFBLOCK-ALIGNED", "REFCOUNT-READABLE"} <= counted:
        return _refuse_unaligned_refblock(path, before)
    unrepairable = sorted(counted - rp.HANDLED)
    if unrepairable:
        raise UnsupportedFeature("check repair", f"the model cannot repair {', '.join(unrepairable)}")
    growths: list[rp.Growth] = []
    if repair == "all" and "REFBLOCK-INSIDE-FILE" in counted:
        ev = rp.evaluate(path)
        cs = ev.tally.geometry.cluster_size if ev.tally else 512
        growths = rp.plan_growth(path, ev, cs)
        try:
            largest = rp.probe_growth(path, growths, cs)
        except OSError as e:
            raise FormatError(f"cannot resize: {e.strerror}", path) from None
        if largest > rp.GROW_LIMIT_CLUSTERS * cs:
            raise UnsupportedFeature("check repair", f"repairing a refcount block past the end of "
                                     f"the file would grow it to {largest} bytes")
    fixed = _fix_pass(path, repair, growths)
    if fixed.check_errors:
        return fixed
    if not (fixed.corruptions_fixed or fixed.leaks_fixed):
        return before
    after = rules_check(path)
    after.corruptions_fixed = fixed.corruptions_fixed
    after.leaks_fixed = fixed.leaks_fixed
    return after


def _open_for_repair(path: str) -> Qcow2File:
    """The image read-write, without the open-time rebuild of dirty images (qemu-img check
    opens with BDRV_O_CHECK, which skips it), locked as a writer: qemu-img check -r opens
    read-write, so a conflicting process makes it RequestError."""
    raw = open_image(path)
    try:
        raw.f.close()
        raw.f = open(path, "r+b")  # noqa: SIM115 - the caller closes q.f
    except OSError as e:
        raw.close()
        raise FormatError(f"cannot open for writing: {e.strerror}", path) from None
    q = Qcow2File(raw, raw.f, readonly=False)
    try:
        ImageLock(q.f, path=path).acquire(write=True)
        # A read-write open clears the autoclear bits QEMU does not know (qcow2_do_open:
        # "autoclear_features &= QCOW2_AUTOCLEAR_MASK", then the header is rewritten).
        v3 = q.header.v3
        if v3 is not None and int(v3.autoclear_features) & ~ft.QCOW2_AUTOCLEAR_MASK:
            v3.autoclear_features = int(v3.autoclear_features) & ft.QCOW2_AUTOCLEAR_MASK
            q.write_header()
    except Qcow2Error:
        q.f.close()
        raise
    return q


def _refuse_unaligned_refblock(path: str, before: CheckResult) -> CheckResult:
    """An unaligned refcount block offset: QEMU 7.2's repair reads a refcount through it,
    which flags the image corrupt (qcow2_get_refcount -> qcow2_signal_corruption, "Refblock
    offset ... unaligned"), and the check then stops with an error: no report, exit 1, and
    the corrupt bit is the one change in the file (observed: qemu-img check -r all/leaks on
    difftest/mutate.py's refcount-table-block-misaligned). The model does the same."""
    from spec.rules import Finding

    q = _open_for_repair(path)
    try:
        q.set_incompatible_bit(ft.QCOW2_INCOMPAT_CORRUPT, True)
    finally:
        q.f.close()
    before.check_errors = max(before.check_errors, 1)
    before.findings.append(Finding("CHECK-COMPLETES", None,
                                   "a refcount block offset is unaligned: the repair stops"))
    return before


def _fix_pass(path: str, repair: str, growths: list[Any]) -> CheckResult:
    """Run model.repair_pass on the file opened for repair. Its corruptions/leaks are what
    remains unfixed; check_errors with a CHECK-COMPLETES finding means qemu-img stops."""
    from model import repair_pass as rp
    from spec.rules import Finding

    result = CheckResult(filename=path)
    q = _open_for_repair(path)
    try:
        try:
            result = rp.run_pass(q, path, repair, growths)
        except rp.Fatal as e:
            # qcow2_signal_corruption: the corrupt bit is set and the node made unusable, so
            # it is not marked clean on close either.
            q.set_incompatible_bit(ft.QCOW2_INCOMPAT_CORRUPT, True)
            result.check_errors += 1
            result.findings.append(Finding("CHECK-COMPLETES", None, str(e)))
            os.fsync(q.f.fileno())
            return result
        except rp.CheckFailed as e:
            result.check_errors += 1
            result.findings.append(Finding("CHECK-COMPLETES", None, str(e)))
        # Closing a read-write qcow2 node marks it clean whatever the check found
        # (qcow2_inactivate -> qcow2_mark_clean): observed on a lazy-refcount dirty image
        # whose -r leaks stops with "need to rebuild", which still loses its dirty bit.
        q.set_incompatible_bit(ft.QCOW2_INCOMPAT_DIRTY, False)
        os.fsync(q.f.fileno())
    except (CorruptionError, FormatError) as e:
        result.check_errors += 1
        result.findings.append(Finding("CHECK-COMPLETES", None, str(e)))
    except OSError as e:
        result.check_errors += 1
        result.findings.append(Finding("CHECK-COMPLETES", None, f"fsync failed: {e}"))
    finally:
        q.f.close()
    return result


def _compared(q: Qcow2File, want: Counter[int]) -> int:
    """How many clusters compare_refcounts looks at: those of the file, and as many more as
    the computed refcounts reach (calculate_refcounts grows its array for them)."""
    return max(-(-q.file_size() // q.cluster_size), max(want, default=-1) + 1)


def _count_copied(q: Qcow2File) -> int:
    ro = q.readonly
    q.readonly = True
    try:
        return _copied_errors(q)
    finally:
        q.readonly = ro


def _copied_errors(q: Qcow2File) -> int:
    wrong = 0
    for i, l1e in enumerate(mp.read_l1(q)):
        l2off = mp.l2_offset(q, l1e, i)
        if not l2off:
            continue
        if bool(l1e & QCOW_OFLAG_COPIED) != (rc.get_refcount(q, l2off // q.cluster_size) == 1):
            wrong += 1
        for e, _ in mp.read_l2(q, l2off):
            t = cluster_type(e, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
            if t not in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC) or q.has_data_file:
                continue
            single = rc.get_refcount(q, (e & L2E_OFFSET_MASK) // q.cluster_size) == 1
            if bool(e & QCOW_OFLAG_COPIED) != single:
                wrong += 1
    return wrong


def _image_end(q: Qcow2File, want: Counter[int]) -> int:
    last = max((i for i, v in want.items() if v), default=0)
    return (last + 1) * q.cluster_size


def _stats(q: Qcow2File) -> tuple[int, int, int]:
    """allocated, compressed and fragmented guest clusters, as qemu-img check counts them."""
    allocated = compressed = fragmented = 0
    prev: int | None = None
    for i, l1e in enumerate(mp.read_l1(q)):
        l2off = mp.l2_offset(q, l1e, i)
        if not l2off:
            continue
        for e, _ in mp.read_l2(q, l2off):
            t = cluster_type(e, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
            if t is ClusterType.COMPRESSED:
                # check_refcounts_l2: compressed clusters count as fragmented by nature.
                allocated += 1
                compressed += 1
                fragmented += 1
            elif t in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                allocated += 1
                off = e & L2E_OFFSET_MASK
                if prev is not None and off != prev + q.cluster_size:
                    fragmented += 1
                prev = off
    return allocated, compressed, fragmented
