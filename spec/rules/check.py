"""``check(path) -> CheckResult``: the catalogue evaluated and counted as ``qemu-img check``
counts it (qemu-img.c img_check, collect_image_check; block/qcow2.c qcow2_co_check_locked).

Only findings of rules QEMU counts (Rule.qemu_counts) move the counters, so the exit code is
QEMU's verdict; the others ride along in ``CheckResult.findings``. A repair mode can act on the
findings: each names its rule, its host offset and, for refcounts, both numbers.

The image is opened as ``qemu-img check`` opens it (BDRV_O_CHECK: spec.image's check_mode,
zero-filled reads past the end of the file, no snapshot table or bitmaps read at open), and
its backing chain is followed as far as QEMU would open it. ``verdict(result)`` names the
outcome class qemu-img's exit code and output stand for ("refused" when it prints no report);
tests/spec/test_check_agreement.py holds it to qemu-img's on a corpus of damaged images.
"""

from __future__ import annotations

import os
import re

from spec.errors import FormatError, UnsupportedFeature
from spec.image import open_image
from spec.interface import CheckResult
from spec.rules.catalogue import Finding, Severity
from spec.rules.context import FindingLog, FindingSink
from spec.rules.evaluate import Evaluation, run
from spec.rules.quick import Clean, clean_small_image

KEEP_FINDINGS = 10_000
"""Findings ``check`` keeps in ``CheckResult.findings`` by default; beyond it they are only
counted (``findings_omitted``) or passed to the caller's sink. A wrecked image has hundreds
of thousands, and memory stays bounded whatever the image (README, "Bounded check")."""

_OPEN_RULES = tuple((re.compile(p), r) for p, r in (
    # FormatError field paths (spec.image) that have a more precise rule than IMAGE-OPENS.
    (r"^header\.ext\.compression_type|^header\.v3\.incompatible_features", "FEATURE-COMPRESSION-TYPE"),
    (r"^header\.(snapshots_offset|nb_snapshots)|^snapshots\[", "SNAPSHOT-TABLE-READABLE"),
    (r"^bitmap_directory|^bitmaps\.", "BITMAP-DIRECTORY-VALID"),
    (r"^bitmap_table", "BITMAP-TABLE-ENTRY-VALID"),
    (r"^header\.v3\.autoclear_features", "FEATURE-RAW-NEEDS-DATA-FILE"),
    (r"^extensions$", "FEATURE-LUKS-CRYPTO-HEADER"),
    (r"^extensions\[\d+\]\.data\.offset$", "CRYPTO-HEADER-ALIGNED"),
))


def open_failure(e: FormatError | UnsupportedFeature) -> Finding:
    """The finding for an image QEMU (and spec.image) refuses to open."""
    path = (e.path or "") if isinstance(e, FormatError) else ""
    rule = next((r for pat, r in _OPEN_RULES if pat.search(path)), "IMAGE-OPENS")
    return Finding(rule, None, str(e))


def check(path: str | os.PathLike[str], *, sink: FindingSink | None = None,
          keep: int | None = KEEP_FINDINGS) -> CheckResult:
    """Check ``path`` read-only; never raises for a malformed file (the result says why).
    The repair modes act on these findings (spec/check/, whose ``check`` is the interface's).

    Every finding goes to ``sink`` (if given) as the walk meets it, in the order of
    ``result.findings``; at most ``keep`` of them (None: all) stay in ``result.findings``, the
    rest are counted in ``result.findings_omitted``. The counters count all of them."""
    result = CheckResult(filename=str(path))
    log = FindingLog(sink, keep)
    try:
        # As qemu-img check opens (BDRV_O_CHECK): the snapshot table and the bitmaps are not
        # read at open, so their damage is counted by the walk rather than refused.
        img = open_image(path, check_mode=True)
    except (FormatError, UnsupportedFeature) as e:
        # qemu-img check reports nothing for an image it cannot open: mark it as for a check
        # that stops (CHECK-COMPLETES), so ``verdict`` says "refused" for both.
        log.add(open_failure(e))
        log.add(Finding("CHECK-COMPLETES", None, "qemu-img cannot open the image"))
        result.findings = log.kept
        result.check_errors = 1
        return result
    with img:
        # A small clean image is proven clean without numpy (start-up: spec/rules/quick.py);
        # anything else, or anything that proof is unsure of, takes the full walk.
        ev: Evaluation | Clean | None = clean_small_image(img)
        if ev is None:
            ev = run(img, log)
    result.findings = log.kept
    result.findings_omitted = log.omitted
    result.corruptions = log.count(Severity.CORRUPTION)
    result.leaks = log.count(Severity.LEAK)
    result.check_errors = log.count(Severity.CHECK_ERROR)
    # qemu-img leaves out the numbers that are zero (collect_image_check: has_* = value != 0).
    result.image_end_offset = ev.image_end_offset or None
    result.total_clusters = ev.bfi.total_clusters or None
    result.allocated_clusters = ev.bfi.allocated_clusters or None
    result.fragmented_clusters = ev.bfi.fragmented_clusters or None
    result.compressed_clusters = ev.bfi.compressed_clusters or None
    return result


VERDICTS = ("clean", "leaks", "corruptions", "check-errors", "refused")


def verdict(result: CheckResult) -> str:
    """The outcome class of ``qemu-img check`` this result stands for.

    "refused" means qemu-img prints no report at all and exits 1: it could not open the image
    (or its backing chain), or its check stopped with an error (qemu-img.c collect_image_check
    returns the error before filling the report). Otherwise the class follows the exit code:
    "clean" (0), "check-errors" (1), "corruptions" (2), "leaks" (3).
    """
    if any(f.rule == "CHECK-COMPLETES" for f in result.findings):
        return "refused"
    return {0: "clean", 1: "check-errors", 2: "corruptions", 3: "leaks"}[result.exit_code]
