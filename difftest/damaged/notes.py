"""Named differences: disagreements whose cause is known and written down, never silent.

A damaged-image finding is either unexplained (a failure of the campaign, exit 1) or matches
one of the notes below, each with the evidence it needs in what qemu-io printed during the
run. A matched finding is still counted and reported under its note's name with how often it
was hit; it only stops being a failure. Two rules keep a note from hiding a real bug:

- the engines must agree with each other: a note explains QEMU against every engine, never
  one engine against another (the model and the impl share spec/ and must behave alike).
  The exceptions are DROPPED_CACHES and MODEL_WRITE_THROUGH, whose cause is the model's
  design (it has no cache, DESIGN.md), each with the model's own error or QEMU's as evidence;
- the evidence is QEMU's own words for the cause, not the shape of the disagreement.
  (QEMU's overlap message does not say whether the refused write was guest data or a table
  write-back; the engines check guest-data writes against the same kinds of metadata, so
  when they agree with each other the write-back is taken as the one QEMU refused.)

``open`` says whether the difference is an engine gap still to close (it names what is
missing), or one that a sequential engine cannot follow at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from difftest.damaged.case import Finding, Run


@dataclass(frozen=True)
class Note:
    name: str
    reason: str
    open: bool
    """True: the engines lack what QEMU does here (an open gap, listed in the README)."""


METADATA_OVERLAP = Note(
    "metadata-overlap",
    "QEMU refused a write of its own metadata as overlapping other metadata: it runs the "
    "overlap check on every table it writes back (block/qcow2-cache.c qcow2_cache_entry_flush "
    "and the L1/refcount writers call qcow2_pre_write_overlap_check with only the written "
    "table's own kind ignored), so a damaged refcount-table entry or bitmap directory that "
    "lands on an L2 table stops the write-back of that table. The engines check guest-data "
    "writes only (model/overlap.py, impl/overlap.py). With writeback caching QEMU meets the "
    "overlap when the table leaves its cache (a flush, an eviction, the close), so even with "
    "the check the cacheless model would fail a different step.",
    open=True)

QEMU_ABORTED = Note(
    "qemu-aborted",
    "qemu-io itself died on the damaged image (an assertion failed inside QEMU 7.2, e.g. "
    "block/qcow2-cache.c qcow2_cache_discard: 'c->entries[i].ref == 0', met by a discard): "
    "there is no QEMU outcome to compare with.",
    open=False)

DROPPED_CACHES = Note(
    "dropped-caches",
    "Every side flagged the image at the same request (each request, the corrupt bit and the "
    "reopen agreed), and only check's counts differ. When QEMU flags an image it makes the node "
    "unusable (block/qcow2.c qcow2_signal_corruption sets bs->drv to NULL), so the dirty L2 and "
    "refcount cache entries of the failed request are never written back and the close writes "
    "nothing; the impl drops its caches the same way, but what they held need not match QEMU's "
    "entry for entry; the model has no cache (DESIGN.md) and wrote each update at once, e.g. the "
    "refcount of a cluster it allocated before the overlap check refused the write. The file "
    "after the failure therefore holds a different subset of the request's updates.",
    open=False)

MODEL_WRITE_THROUGH = Note(
    "model-write-through",
    "The request failed on every side, and QEMU and the impl flagged the image where the model "
    "did not: the model writes each metadata update at once, and the refcount block of the "
    "cluster it allocated lies at a damaged offset the host cannot write (EFBIG), so its request "
    "ended with a host I/O error, which flags nothing (QEMU returns the errno of a plain I/O "
    "error). QEMU and the impl keep that update in their refcount cache and go on to the overlap "
    "check of the data write, which flags the image; the cached update is then dropped unwritten.",
    open=False)

NOTES = (METADATA_OVERLAP, QEMU_ABORTED, DROPPED_CACHES, MODEL_WRITE_THROUGH)

_OVERLAP_WORDS = "Preventing invalid write on metadata"
_FLAGGED_WORDS = "Marking image as corrupt"
_ABORT_WORDS = ("Assertion", "Aborted")


def _engines_agree(finding: Finding) -> bool:
    return len({v for k, v in finding.outcomes.items() if k != "qemu"}) <= 1


def explain(finding: Finding, run: Run) -> Note | None:
    """The note that explains ``finding`` given what the run saw (everything qemu-io printed,
    whether one request failed with CorruptionError on every side, each side's last error),
    or None."""
    if "qemu" not in finding.outcomes:
        return None
    qemu_log = "".join(run.qemu_log)
    if finding.kind == "check" and run.flagged_everywhere and _FLAGGED_WORDS in qemu_log:
        # A check finding comes only after every earlier comparison agreed, the request that
        # flagged the image on every side, the corrupt bits and the reopen among them.
        return DROPPED_CACHES
    others = {v for k, v in finding.outcomes.items() if k != "model"}
    model_error = run.errors.get("model", "")
    if (finding.kind == "corrupt-flag" and finding.outcomes.get("model") == "False" and others == {"True"}
            and model_error.startswith("HostIOError") and "File too large" in model_error
            and _FLAGGED_WORDS in qemu_log):
        return MODEL_WRITE_THROUGH
    if not _engines_agree(finding):
        return None
    theirs = finding.outcomes["qemu"]
    if theirs.startswith(("QemuIoDied", "refused (QemuIoDied")) and any(w in qemu_log for w in _ABORT_WORDS):
        return QEMU_ABORTED
    if _OVERLAP_WORDS in qemu_log:
        # QEMU flagged the image; every later difference (the refused request, the corrupt
        # bit, what a reopen and check find in the file QEMU stopped writing) follows from it.
        flagged_here = theirs == "CorruptionError" or (finding.kind == "corrupt-flag" and theirs == "True")
        if flagged_here or finding.kind in ("reopen", "check"):
            return METADATA_OVERLAP
    return None
