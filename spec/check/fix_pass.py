"""The fix pass of ``qemu-img check -r leaks|all``: block/qcow2.c qcow2_co_check_locked with
BDRV_FIX_LEAKS ("leaks") or BDRV_FIX_LEAKS | BDRV_FIX_ERRORS ("all"), step by step, on the
raw file (spec/check/repair.py decides whether to run it and reports the check that follows;
a read-write open of a dirty image runs it with "all", as qcow2_do_open does).

QEMU's order, and what each step repairs:

=================================  ============================================================
step (QEMU function)               repair
=================================  ============================================================
calculate_refcounts                "all": a preallocated zero cluster whose host offset is
(check_refcounts_l1/_l2)           unaligned becomes a plain zero cluster (fix_l2_entry_by_zero)
                                   and is not counted as a reference. Everything else it finds
                                   (reserved bits, unaligned tables or data, bad subcluster
                                   bitmaps, COPIED on a compressed cluster, references past the
                                   end of the file, refcount overflows, bad snapshot L1 tables)
                                   is counted and never fixed.
check_refblocks                    "all": a refcount block past the end of the file grows the
                                   file to hold it (bdrv_truncate); if that fails, a rebuild.
                                   A reserved bit, an unaligned block or a block referenced
                                   twice forces a rebuild.
compare_refcounts                  a referenced cluster with refcount 0 forces a rebuild ("all"
                                   only; "leaks" stops: "need to rebuild", check error);
                                   otherwise each leak is fixed, and with "all" each too-low
                                   refcount, in place (update_refcount, discarding freed
                                   clusters).
rebuild_refcount_structure         new refcount blocks and table in free clusters; the old
                                   structure is then freed as leaks.
check_oflag_copied                 COPIED flags ("leaks": only if no error remains).
qcow2_check_fix_snapshot_table     "all": a snapshot table whose entries lack the version 3
                                   extra data is written anew (qcow2_write_snapshots).
qcow2_mark_clean/_consistent       dirty and corrupt bits, when no error remains.
=================================  ============================================================

The computed refcounts are the rules engine's (spec/rules/evaluate.py walks the image as
``qemu-img check`` does, and is held to it by tests/spec/test_check_agreement.py); each fix writes
what QEMU writes, through the raw file (spec.qfile, spec.refblocks). A write QEMU's metadata
overlap check would stop (qcow2_pre_write_overlap_check, spec/check/overlap.py) flags the
image corrupt and ends the check with an error, as in QEMU, keeping what was written before.

Errors: CorruptionError and FormatError end the pass with a check error (the caller reports
it); nothing else escapes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from spec import features as ft
from spec import refblocks as rb
from spec.check.growth import REFBLOCK_OUTSIDE, Growth
from spec.check.overlap import Fatal, pre_write
from spec.check.rebuild import rebuild_refcount_structure, stored_refcounts
from spec.check.refcache import RefblockCache
from spec.entries import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_L2_BITMAP_ALL_ALLOC,
    QCOW_L2_BITMAP_ALL_ZEROES,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    ClusterType,
    cluster_type,
)
from spec.errors import CorruptionError, RequestError
from spec.image import open_image
from spec.interface import CheckResult
from spec.lazy import numpy
from spec.qfile import Qcow2File
from spec.refcounts import Tally
from spec.rules.catalogue import RULES_BY_ID, Severity
from spec.rules.context import FindingLog
from spec.rules.evaluate import Evaluation, run
from spec.snapshot_table import read_snapshot_table, write_snapshots

# Corruptions calculate_refcounts counts that no repair fixes: they stay counted through
# the repair and in the check after it.
COUNTED_NOT_FIXED = frozenset({
    "L1-RESERVED-ZERO", "L1-L2-ALIGNED", "L2-RESERVED-ZERO", "L2-DATA-ALIGNED",
    "COMPRESSED-NO-COPIED", "COMPRESSED-NO-DATA-FILE", "COMPRESSED-NO-BITMAP",
    "SUBCLUSTER-BITMAP-VALID", "SNAPSHOT-NO-DATA-FILE", "SNAPSHOT-L1-ALIGNED", "SNAPSHOT-L1-SIZE",
    "REFERENCE-INSIDE-FILE", "REFCOUNT-NO-OVERFLOW"})
# check_refblocks: each forces a rebuild of the refcount structure.
FORCE_REBUILD = frozenset({"REFTABLE-RESERVED-ZERO", "REFBLOCK-ALIGNED", "REFBLOCK-REFCOUNT-1"})
# Those of them that depend on which references were counted.
REFERENCE_RULES = frozenset({"REFERENCE-INSIDE-FILE", "REFCOUNT-NO-OVERFLOW", "REFBLOCK-REFCOUNT-1"})
# The corruptions of calculate_refcounts (refcount_res before compare_refcounts).
CALCULATE_RULES = COUNTED_NOT_FIXED | FORCE_REBUILD | {REFBLOCK_OUTSIDE}
COMPARE_RULES = frozenset({"REFCOUNT-MATCHES-REFERENCES", "REFCOUNT-NO-LEAK"})
COPIED_RULES = frozenset({"L1-COPIED-IFF-REFCOUNT-1", "COPIED-IFF-REFCOUNT-1"})
# qcow2_check_read_snapshot_table counts these in snapshot_res; -r all fixes them by
# writing the snapshot table anew (qcow2_check_fix_snapshot_table).
SNAPSHOT_RULES = frozenset({"SNAPSHOT-EXTRA-DATA-V3"})

HANDLED = CALCULATE_RULES | COMPARE_RULES | COPIED_RULES | SNAPSHOT_RULES
"""The counted rules the repair handles the way QEMU does (fixing or keeping them)."""


class CheckFailed(Exception):
    """The check returns an error without a fatal corruption (QEMU: "need to rebuild")."""


ACTED_ON = frozenset({"L2-DATA-ALIGNED", REFBLOCK_OUTSIDE})
"""The rules whose findings the pass acts on one by one; of the others it needs only how
often each was counted (FindingLog.per_rule), so memory stays bounded on a wrecked image."""


def evaluate(path: str) -> Evaluation:
    """qemu-img check's walk (no repair) of the file as it is now."""
    with open_image(path, check_mode=True) as img:
        return run(img, FindingLog(only=ACTED_ON))


def counted(ev: Evaluation, rules: frozenset[str]) -> int:
    return sum(n for r, n in ev.log.per_rule.items() if r in rules and RULES_BY_ID[r].qemu_counts
               and RULES_BY_ID[r].severity is Severity.CORRUPTION)


def computed_refcounts(tally: Tally) -> dict[int, int]:
    """The non-zero computed refcounts, by cluster index."""
    out = {int(k): int(tally.counts[k]) for k in tally.counts.nonzero()[0].tolist()}
    out.update((k, v) for k, v in tally.beyond.items() if v)
    return out


# --- the steps ---------------------------------------------------------------------------------

def read_l1(q: Qcow2File) -> list[int]:
    """The active L1 table as the open read it (s->l1_table). QEMU's check works on that
    copy, never re-reading the file: a repair that frees and punches a cluster the table
    shares with other metadata (damage) leaves the copy as it was."""
    l1_size = int(q.header.l1_size)
    if not l1_size:
        return []
    return list(struct.unpack(f">{l1_size}Q", q.pread(int(q.header.l1_table_offset), l1_size * 8)))


def fix_unaligned_zero_clusters(q: Qcow2File, ev: Evaluation, l1: list[int]) -> int:
    """check_refcounts_l2 with BDRV_FIX_ERRORS: an allocated-zero entry (no subcluster
    with data) whose host offset is unaligned is rewritten as a plain zero cluster
    (fix_l2_entry_by_zero). Returns how many entries were fixed."""
    cs = q.cluster_size
    active = [e & L1E_OFFSET_MASK for e in l1 if e]
    fixed = 0
    seen: set[int] = set()
    for f in ev.findings:
        if f.rule != "L2-DATA-ALIGNED" or f.offset is None or f.offset in seen:
            continue
        seen.add(f.offset)
        entry = int.from_bytes(q.pread(f.offset, 8), "big")
        bitmap = int.from_bytes(q.pread(f.offset + 8, 8), "big") if q.extended_l2 else 0
        data = bitmap & QCOW_L2_BITMAP_ALL_ALLOC if q.extended_l2 else not entry & QCOW_OFLAG_ZERO
        if data:
            continue
        if q.extended_l2:
            bitmap = (bitmap | bitmap << 32) & QCOW_L2_BITMAP_ALL_ZEROES
            new = struct.pack(">QQ", 0, bitmap)
        else:
            new = struct.pack(">Q", QCOW_OFLAG_ZERO)
        in_active = any(t <= f.offset < t + cs for t in active)
        pre_write(q, f.offset, len(new), frozenset({"active L2 table" if in_active else "inactive L2 table"}))
        q.pwrite(f.offset, new)
        fixed += 1
    return fixed


def update(q: Qcow2File, cluster: int, addend: int) -> bool:
    """update_refcount(..., QCOW2_DISCARD_ALWAYS) on one cluster; False if it fails."""
    while True:
        try:
            rb.update_refcount(q, cluster * q.cluster_size, 1, addend, discard=True)
            return True
        except rb.Again:
            continue
        except (RequestError, CorruptionError):
            return False


@dataclass
class Mismatches:
    corruptions: int = 0
    leaks: int = 0
    rebuild: bool = False


def compare(q: Qcow2File, computed: dict[int, int], nb: int, repair: str | None,
            stored: dict[int, int], cache: RefblockCache) -> Mismatches:
    """compare_refcounts over clusters [0, nb): with ``repair`` None only counts; with
    "leaks" fixes leaks, with "all" also too-low refcounts. A stored 0 against a computed
    reference is never fixed here: it asks for a rebuild. ``cache`` follows the refcount
    lookups QEMU makes for every cluster in order."""
    out = Mismatches()
    looked = 0  # clusters [0, looked) have had their block looked up
    for i in sorted(k for k in set(computed) | set(stored) if k < nb):
        looked = cache.scan(looked, i + 1)
        have, want = stored.get(i, 0), computed.get(i, 0)
        if have == want:
            continue
        fixable = False
        if have == 0:
            out.rebuild = True
        elif have > want:
            fixable = repair is not None
        else:
            fixable = repair == "all"
        if fixable:
            cache.before_update(i)
            if update(q, i, want - have):
                continue
        if have < want:
            out.corruptions += 1
        else:
            out.leaks += 1
    cache.scan(looked, nb)
    return out


def oflag_copied(q: Qcow2File, repair: bool, l1: list[int], cache: RefblockCache) -> tuple[int, int]:
    """check_oflag_copied: COPIED on every active L1 entry (``l1``, the open's copy, which
    a fix updates) and on every allocated active L2 entry must say "refcount is 1".
    Returns (wrong and left, fixed). Entries whose refcount cannot be read are skipped, as
    QEMU skips them; the entries keep all their other bits."""
    cs = q.cluster_size
    l1_off = int(q.header.l1_table_offset)
    wrong = fixed = 0

    def refcount(cluster: int) -> int | None:
        cache.touch(cluster)
        try:
            return rb.get_refcount(q, cluster)
        except CorruptionError:
            return None

    for i, l1e in enumerate(l1):
        l2off = l1e & L1E_OFFSET_MASK
        if not l2off:
            continue
        r = refcount(l2off // cs)
        if r is None:
            continue
        if (r == 1) != bool(l1e & QCOW_OFLAG_COPIED):
            if repair:
                new = l1e | QCOW_OFLAG_COPIED if r == 1 else l1e & ~QCOW_OFLAG_COPIED
                # qcow2_write_l1_entry: the one entry (request_alignment 1 on a regular file).
                pre_write(q, l1_off + 8 * i, 8, frozenset({"active L1 table"}), l1)
                q.pwrite(l1_off + 8 * i, struct.pack(">Q", new))
                l1[i] = new
                fixed += 1
            else:
                wrong += 1
        raw = q.pread(l2off, cs)
        # Only an entry with an offset (or COPIED, the external data file's offset 0) that
        # is not compressed can be NORMAL or ZERO_ALLOC. A wrecked L1 table names tens of
        # thousands of "L2 tables", mostly zeros or past the end of the file: numpy picks
        # the candidates, so the Python loop sees only those.
        table = numpy.frombuffer(raw, dtype=">u8")[::2 if q.extended_l2 else 1]
        cand = numpy.flatnonzero(((table & (L2E_OFFSET_MASK | QCOW_OFLAG_COPIED)) != 0)
                                 & ((table & QCOW_OFLAG_COMPRESSED) == 0))
        if not len(cand):
            continue
        words = list(struct.unpack(f">{cs // 8}Q", raw))
        step = 2 if q.extended_l2 else 1
        dirty = 0
        for j in (int(k) * step for k in cand):
            e = words[j]
            t = cluster_type(e, extended_l2=q.extended_l2, has_data_file=q.has_data_file)
            if t not in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                continue
            r2 = 1 if q.has_data_file else refcount((e & L2E_OFFSET_MASK) // cs)
            if r2 is None or (r2 == 1) == bool(e & QCOW_OFLAG_COPIED):
                continue
            if repair:
                words[j] = e | QCOW_OFLAG_COPIED if r2 == 1 else e & ~QCOW_OFLAG_COPIED
                dirty += 1
            else:
                wrong += 1
        if dirty:
            pre_write(q, l2off, cs, frozenset({"active L2 table"}), l1)
            q.pwrite(l2off, struct.pack(f">{len(words)}Q", *words))
            fixed += dirty
    return wrong, fixed



def rewrite_snapshot_table(q: Qcow2File) -> None:
    """qcow2_write_snapshots of the table as qcow2_do_read_snapshots read it: an entry whose
    extra data stops before disk_size gets the image's size, before icount gets -1 (all
    ones), before vm_state_size_large keeps the 32-bit vm_state_size."""
    entries = read_snapshot_table(q)
    for e in entries:
        if e.extra_data.disk_size is None:
            e.extra_data.disk_size = int(q.header.size) // 512 * 512
    write_snapshots(q, entries)


def run_pass(q: Qcow2File, path: str, repair: str, growths: list[Growth]) -> CheckResult:
    """The fix pass on the open file ``q``; see the module doc. The result's counters are
    what remains after it, with corruptions-fixed / leaks-fixed. Raises Fatal or
    CheckFailed when QEMU's check returns an error."""
    result = CheckResult(filename=path)
    cs = q.cluster_size
    l1 = read_l1(q)
    ev = evaluate(path)
    if ev.tally is None:
        raise CorruptionError("the image cannot be walked")
    # qcow2_check_read_snapshot_table (snapshot_res): counted, and with -r leaks not fixed.
    snap_corruptions = counted(ev, SNAPSHOT_RULES)

    # calculate_refcounts: with -r all, unaligned zero clusters are zeroed as they are met,
    # after their other faults (reserved bits, bitmap) were counted, and are then no
    # reference: what depends on the references is counted on the walk of the fixed file.
    calc_corruptions = counted(ev, CALCULATE_RULES - REFERENCE_RULES - {REFBLOCK_OUTSIDE})
    if repair == "all":
        zeroed = fix_unaligned_zero_clusters(q, ev, l1)
        if zeroed:
            result.corruptions_fixed += zeroed
            calc_corruptions -= zeroed
            ev = evaluate(path)
            assert ev.tally is not None
    calc_corruptions += counted(ev, REFERENCE_RULES)
    tally = ev.tally
    assert tally is not None
    computed = computed_refcounts(tally)
    nb = tally.nb_clusters
    rebuild = counted(ev, FORCE_REBUILD) > 0

    # check_refblocks: blocks past the end of the file, in reftable order.
    if repair != "all":
        calc_corruptions += sum(1 for f in ev.findings if f.rule == REFBLOCK_OUTSIDE)
    else:
        for g in growths:
            if g.cluster < nb:
                # An earlier growth brought it inside: a refcount block like any other.
                computed[g.cluster] = computed.get(g.cluster, 0) + 1
                if computed[g.cluster] != 1:
                    calc_corruptions += 1
                    rebuild = True
                continue
            if g.fails:
                calc_corruptions += 1
                rebuild = True
                continue
            q.truncate(g.target)
            nb = max(nb, -(-q.file_size() // cs))
            result.corruptions_fixed += 1
            computed[g.cluster] = computed.get(g.cluster, 0) + 1

    # compare_refcounts, first without fixing: does the structure need a rebuild?
    stored = stored_refcounts(q, nb)
    cache = RefblockCache(q, l1)
    first = compare(q, computed, nb, None, stored, cache)
    rebuild = rebuild or first.rebuild
    try:
        _fix_and_flag(q, path, repair, result, computed, nb, stored, cache, first, rebuild,
                      calc_corruptions, snap_corruptions, l1)
    except Fatal:
        # The node is made unusable: QEMU's dirty refcount blocks never reach the file.
        cache.drop()
        raise
    return result


def _fix_and_flag(q: Qcow2File, path: str, repair: str, result: CheckResult,
                  computed: dict[int, int], nb: int, stored: dict[int, int], cache: RefblockCache,
                  first: Mismatches, rebuild: bool, calc_corruptions: int, snap_corruptions: int,
                  l1: list[int]) -> None:
    """run_pass from the fixing compare_refcounts (or the rebuild) on."""
    if rebuild and repair == "all":
        pre_corruptions = calc_corruptions + first.corruptions
        rebuild_refcount_structure(q, [computed.get(i, 0) for i in range(nb)],
                           lambda off, n: pre_write(q, off, n))
        cache.empty()
        # calculate_refcounts again (without fixing), then free what the old structure
        # leaves leaked; only the leaks of that comparison are kept (fresh_leaks).
        ev2 = evaluate(path)
        assert ev2.tally is not None
        computed2 = computed_refcounts(ev2.tally)
        nb2 = ev2.tally.nb_clusters
        fresh = compare(q, computed2, nb2, "leaks", stored_refcounts(q, nb2), cache)
        corruptions = counted(ev2, CALCULATE_RULES)
        result.corruptions_fixed += max(0, pre_corruptions - corruptions)
        result.leaks_fixed += first.leaks
        result.corruptions = corruptions
        result.leaks = fresh.leaks
    elif rebuild:
        raise CheckFailed("need to rebuild refcount structures")
    else:
        # compare_refcounts again, fixing, when the first one found anything at all.
        redo = first.corruptions or first.leaks or calc_corruptions
        fixed = compare(q, computed, nb, repair, stored, cache) if redo else first
        result.corruptions_fixed += first.corruptions - fixed.corruptions
        result.leaks_fixed += first.leaks - fixed.leaks
        result.corruptions = calc_corruptions + fixed.corruptions
        result.leaks = fixed.leaks

    # check_oflag_copied: -r leaks repairs only once the refcounts are known right.
    fix_flags = repair == "all" or not (result.check_errors or result.corruptions or result.leaks)
    wrong, fixed_flags = oflag_copied(q, fix_flags, l1, cache)
    result.corruptions += wrong
    result.corruptions_fixed += fixed_flags

    # qcow2_check_fix_snapshot_table: -r all writes the snapshot table anew, with complete
    # extra data.
    if snap_corruptions and repair == "all":
        rewrite_snapshot_table(q)
        result.corruptions_fixed += snap_corruptions
        snap_corruptions = 0
    result.corruptions += snap_corruptions
    if not result.check_errors and not result.corruptions:
        # qcow2_co_check_locked: a repair that leaves no error marks the image consistent.
        q.set_incompatible_bit(ft.QCOW2_INCOMPAT_CORRUPT, False)


