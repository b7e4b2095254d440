"""``qemu-img check -r leaks|all`` on a file (qemu-img.c img_check; block/qcow2.c
qcow2_co_check_locked; block/qcow2-refcount.c qcow2_check_refcounts), and the same repair
run by a read-write open of a dirty image (qcow2_do_open).

The file is written through spec.qfile, never through an engine: the model and the impl
reach this code by the same entry point (spec.check.check), so a repair means the same for
both.

Errors: FormatError when the image does not open; UnsupportedFeature for damage this engine
does not repair QEMU's way (refused before anything is written); RequestError when another
process holds a conflicting lock (spec/locking.py). ``repair_dirty``: CorruptionError when
QEMU's repair at open would fail.
"""

from __future__ import annotations

import os

from spec import features as ft
from spec.check import fix_pass as fp
from spec.check import growth as gr
from spec.check.overlap import Fatal
from spec.errors import CorruptionError, FormatError, Qcow2Error, UnsupportedFeature
from spec.image import open_image
from spec.interface import CheckResult
from spec.locking import ImageLock
from spec.qfile import Qcow2File
from spec.rules import RULES_BY_ID, Finding
from spec.rules.check import check as rules_check
from spec.rules.check import verdict


def check_and_repair(path: str, repair: str) -> CheckResult:
    """``qemu-img check -r leaks|all`` of the image at ``path``.

    1. A read-only check (the rules catalogue, spec.rules, which agrees with qemu-img
       check) decides whether to touch the file at all: an image qemu-img would not report
       on ("refused") is returned as is, and damage this repair does not handle
       (fix_pass.HANDLED) raises UnsupportedFeature, as does a refcount block that would
       grow the file past growth.GROW_LIMIT_CLUSTERS. Nothing is written in those cases.
    2. The fix pass (spec/check/fix_pass.py) repairs what QEMU repairs, in QEMU's order, and
       leaves counted what QEMU leaves; when QEMU's check would end with an error, so does
       it (no report, exit 1), after the writes QEMU makes before that point.
    3. As qemu-img, when something was fixed the image is checked again and that result is
       reported, carrying the fix pass's corruptions-fixed / leaks-fixed.
    """
    # Which rules are broken is all the decision needs; the findings themselves stay bounded
    # (KEEP_FINDINGS: a wrecked image has hundreds of thousands, README "Bounded check").
    seen: set[str] = set()
    before = rules_check(path, sink=lambda fs: seen.add(fs[0].rule))
    if verdict(before) == "refused":
        return before
    counted = {r for r in seen if RULES_BY_ID[r].qemu_counts}
    if {"REFBLOCK-ALIGNED", "REFCOUNT-READABLE"} <= counted:
        return _refuse_unaligned_refblock(path, before)
    unrepairable = sorted(counted - fp.HANDLED)
    if unrepairable:
        raise UnsupportedFeature("check repair", f"cannot repair {', '.join(unrepairable)} as QEMU does")
    growths: list[gr.Growth] = []
    if repair == "all" and gr.REFBLOCK_OUTSIDE in counted:
        ev = fp.evaluate(path)
        cs = ev.tally.geometry.cluster_size if ev.tally else 512
        growths = gr.plan_growth(path, ev, cs)
        try:
            largest = gr.probe_growth(path, growths, cs)
        except OSError as e:
            raise FormatError(f"cannot resize: {e.strerror}", path) from None
        if largest > gr.GROW_LIMIT_CLUSTERS * cs:
            raise UnsupportedFeature("check repair", f"repairing a refcount block past the end of "
                                     f"the file would grow it to {largest} bytes")
    fixed = _fix_file(path, repair, growths)
    if fixed.check_errors:
        return fixed
    if not (fixed.corruptions_fixed or fixed.leaks_fixed):
        return before
    after = rules_check(path)
    after.corruptions_fixed = fixed.corruptions_fixed
    after.leaks_fixed = fixed.leaks_fixed
    return after


def repair_dirty(q: Qcow2File) -> None:
    """The repair a read-write open runs on a dirty image (lazy refcounts left unclean):
    qcow2_do_open calls qcow2_co_check_locked with BDRV_FIX_ERRORS | BDRV_FIX_LEAKS, the
    fix pass of ``check -r all``, on the file the caller holds open. The caller clears the
    dirty bit. Raises CorruptionError where QEMU fails the open ("Could not repair dirty
    image": the check stops with an error, or leaves check errors)."""
    try:
        result = fp.run_pass(q, q.path, "all", [])
    except (Fatal, fp.CheckFailed) as e:
        raise CorruptionError(f"could not repair dirty image: {e}") from None
    if result.check_errors:
        raise CorruptionError("could not repair dirty image")


def _open_for_repair(path: str) -> Qcow2File:
    """The image read-write, without the open-time repair of dirty images (qemu-img check
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
    difftest/corpus/mutate.py's refcount-table-block-misaligned). This engine does the same."""
    q = _open_for_repair(path)
    try:
        q.set_incompatible_bit(ft.QCOW2_INCOMPAT_CORRUPT, True)
    finally:
        q.f.close()
    before.check_errors = max(before.check_errors, 1)
    before.findings.append(Finding("CHECK-COMPLETES", None,
                                   "a refcount block offset is unaligned: the repair stops"))
    return before


def _fix_file(path: str, repair: str, growths: list[gr.Growth]) -> CheckResult:
    """Run the fix pass on the file opened for repair. Its corruptions/leaks are what
    remains unfixed; check_errors with a CHECK-COMPLETES finding means qemu-img stops."""
    result = CheckResult(filename=path)
    q = _open_for_repair(path)
    try:
        try:
            result = fp.run_pass(q, path, repair, growths)
        except Fatal as e:
            # qcow2_signal_corruption: the corrupt bit is set and the node made unusable, so
            # it is not marked clean on close either.
            q.set_incompatible_bit(ft.QCOW2_INCOMPAT_CORRUPT, True)
            result.check_errors += 1
            result.findings.append(Finding("CHECK-COMPLETES", None, str(e)))
            os.fsync(q.f.fileno())
            return result
        except fp.CheckFailed as e:
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
