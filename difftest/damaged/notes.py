"""Named differences: disagreements whose cause is known and written down, never silent.

A damaged-image finding is either unexplained (a failure of the campaign, exit 1) or matches
one of the notes below, each with the evidence it needs in what qemu-io printed during the
run. A matched finding is still counted and reported under its note's name with how often it
was hit; it only stops being a failure. Two rules keep a note from hiding a real bug:

- the engines must agree with each other: a note explains QEMU against every engine, never
  one engine against another (the model and the impl share spec/ and must behave alike).
  The exceptions are DROPPED_CACHES, MODEL_WRITE_THROUGH, CACHED_METADATA_READ,
  METADATA_OVERLAP and REFCOUNTS_GROWN_ON_FREE, whose cause is the model's design (it has no
  cache, DESIGN.md), each with its own evidence (QEMU's words, the model's own error, the
  read's host cluster, the impl answering as QEMU did);
- the evidence is QEMU's own words for the cause, not the shape of the disagreement.
  (QEMU's overlap message does not say which write it refused, guest data, a table
  write-back, an L1 entry or a new table; the engines check every writer QEMU 7.2 checks,
  against the same kinds of metadata, and the impl writes its caches back in QEMU's slot
  order, so when the impl agrees with QEMU it refused the same write. QEMU refusing a write
  where both engines went on has no known cause left: it is unexplained, a failure. The
  note metadata-overlap-unchecked that excused it is gone, its last cause, the write-back
  order, closed: impl/cache.py, tests/conformance/test_cache_slots.py.)

``open`` says whether the difference is an engine gap still to close (it names what is
missing), or one that a sequential engine cannot follow at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from difftest.damaged.case import Finding, Run
from spec.entries import L1E_OFFSET_MASK, L2E_OFFSET_MASK, REFT_OFFSET_MASK
from spec.errors import Qcow2Error
from spec.header import QCOW2_EXT_MAGIC_BITMAPS
from spec.image import open_image


@dataclass(frozen=True)
class Note:
    name: str
    reason: str
    open: bool
    """True: the engines lack what QEMU does here (an open gap, listed in the README)."""


METADATA_OVERLAP = Note(
    "metadata-overlap",
    "QEMU refused a write-back of its own metadata as overlapping other metadata, and the impl "
    "refused the same one; the model did not. QEMU runs the overlap check on every table it "
    "writes back, only the table's own kind ignored (block/qcow2-cache.c qcow2_cache_entry_flush, "
    "qcow2_pre_write_overlap_check), so a damaged refcount-table entry or bitmap directory that "
    "lands on an L2 table stops that table's write-back; the impl checks its cache write-backs "
    "and L1 entry writes the same way (impl/cache.py, impl/state.py write_l1_entry). QEMU meets "
    "the overlap when the table leaves its cache (a flush, an eviction, the close); the model has "
    "no cache (DESIGN.md) and writes an L2 table or refcount block with the request, where QEMU "
    "would not yet check it, so it never meets the overlap (its L1 entry writes are checked, "
    "model/mapping.py, as QEMU writes those at once).",
    open=False)

QEMU_ABORTED = Note(
    "qemu-aborted",
    "qemu-io itself died on the damaged image, killed by SIGABRT (an assertion failed inside "
    "QEMU 7.2, e.g. block/qcow2-cache.c qcow2_cache_discard: 'c->entries[i].ref == 0', met by a "
    "discard) or SIGSEGV (e.g. after flagging an unaligned refcount block offset): there is no "
    "QEMU outcome to compare with. The qcow2_cache_discard assertion means a request freed an "
    "L2 table it was still using (a damaged entry pointing at its own table); that case has no "
    "reference behaviour at all, and the engines may differ there too: the impl drops the "
    "table's cached slice as QEMU's cache would, the model has none.",
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
    "The model writes each metadata update at once, and a table the request changes (a refcount "
    "block, an L2 table) lies at a damaged offset the host cannot write (EFBIG), so the model's "
    "request ends with a host I/O error, which flags nothing (QEMU returns the errno of a plain "
    "I/O error). QEMU and the impl keep that update in their cache: either the request succeeds "
    "there and the write-back fails later (at the close: 'Failed to flush the L2 table cache'), "
    "or they go on to the overlap check of the data write, which flags the image and drops the "
    "cached update unwritten.",
    open=False)

CACHED_METADATA_READ = Note(
    "cached-metadata-read",
    "The guest read maps onto a host cluster that is also a refcount block or an L2 table (through "
    "a damaged L2 entry, or a damaged refcount that let the cluster be allocated twice), which an "
    "earlier request of the case changed. QEMU and the impl hold that "
    "change in their metadata cache (written back at a flush, an eviction or the close), so the "
    "guest read returns the table as it still is on disk; the model has no cache and wrote it "
    "at once, so it reads the updated table.",
    open=False)

REFCOUNTS_GROWN_ON_FREE = Note(
    "refcounts-grown-on-free",
    "A request freed a cluster that no refcount block covers (a damaged L2 entry far past the "
    "data) and QEMU's free failed on the host ('qcow2_free_clusters failed: File too large'); "
    "the impl answered as QEMU did, the model did not. QEMU's update_refcount fetches the "
    "refcount block of a cluster it decrements through alloc_refcount_block "
    "(block/qcow2-refcount.c), which writes a new block and, past the refcount table, builds "
    "new refcount structures at the first refblock range past that cluster "
    "(qcow2_refcount_area); both engines now do the same (spec/refblocks.py, impl/refcount.py; "
    "tests/conformance/test_damaged.py). When that range lies past the host's file size limit "
    "(a cluster 16 TiB up, on ext4) the new blocks cannot be written (EFBIG) and stay dirty in "
    "QEMU's refcount cache: every later eviction of one, flush and the close fail with EFBIG "
    "('Failed to flush the refcount block cache'), so a later request whose refcount update "
    "needs a block the cache does not hold fails, and so does a later free. The impl's cache "
    "(QEMU's size and LRU order) keeps them the same way; the model has no cache (DESIGN.md): "
    "its write of the first new block fails at once, it forgets the blocks and goes on, so its "
    "later requests, its close and its file (check's leaks) differ. A guest flush that fails "
    "so in QEMU shows as a success: qemu-io's flush command prints nothing when the flush "
    "fails (qemu-io-cmds.c flush_f returns the error, and the command loop only keeps it for "
    "the exit code), so there the impl's EFBIG stands against qemu-io's silence (damaged seed "
    "15, flip-4773@snap: QEMU's trace shows the flush's write-back of the same block failing).",
    open=False)

REFCOUNT_INDEX_WRAP = Note(
    "refcount-index-wrap",
    "A damaged L2 entry (plain or compressed) holds a host offset whose refcount-table index "
    "does not fit in 32 bits. "
    "QEMU keeps that index in an unsigned int (block/qcow2-refcount.c alloc_refcount_block: "
    "refcount_table_index), so when a request frees the cluster it changes the refcount of a "
    "low cluster instead (the header's, cluster 0, for an index of exactly 2^32), and check "
    "counts that; the engines compute the index in full and, like alloc_refcount_block for "
    "any cluster no block covers, write a new block, then fail on the table that would cover "
    "the index (past QEMU's limit, EFBIG): a failed free, which QEMU only logs, and the new "
    "block leaked. The same holds for a bitmap directory entry or bitmap table entry with such "
    "an offset, which the close's bitmap store frees (block/qcow2-bitmap.c). The low cluster "
    "whose refcount the wrap dropped is then free to QEMU's allocator: a later write that "
    "allocates it is refused by QEMU's own overlap check (the header's cluster: \"overlaps with "
    "qcow2_header\") and flags the image, where the engines allocate elsewhere and write "
    "(damaged seed 19, flip-4349@v3). A QEMU defect, not matched.",
    open=False)

TABLE_PUNCHED = Note(
    "table-punched",
    "A damaged L2 entry points at the refcount table or the active L1 table, and a request "
    "freed that cluster with a discard, which punched it out of the file (it reads as zeros). "
    "QEMU keeps both tables in memory for as long as the image is open (qcow2_do_open, "
    "qcow2_refcount_init) and the impl does the same, so they go on with the tables they had; "
    "the model reads every table from the file each time (DESIGN.md), finds it zeroed and "
    "allocates, maps and flags differently from then on.",
    open=False)

TABLE_WRITTEN_BEFORE_PUNCH = Note(
    "table-written-before-punch",
    "The guest read maps onto a host cluster that is also an L2 table or a refcount block "
    "(through a damaged L2 entry), and an earlier discard (or zero write with unmap) changed "
    "that table and freed clusters. QEMU punches the freed clusters out of the file while the "
    "changed table may still be dirty in its cache (qcow2_process_discards), so the read returns "
    "the table as it still is on disk. The impl writes its dirty L2 slices back before it "
    "punches (impl/state.py process_discards: a crash between the two must not leave an L2 "
    "entry, a compressed one above all, pointing into a hole), and the model writes every "
    "table at once: both read the updated table (damaged seed 17, flip-4126@v2). A deliberate "
    "crash-safety order, not a gap.",
    open=False)

QEMU_NONDETERMINISTIC = Note(
    "qemu-nondeterministic",
    "Replayed on fresh copies, the same case had QEMU answer one of its requests otherwise, "
    "while the engines answered every request the same each time and QEMU's other answer was "
    "theirs. QEMU splits a request over several host runs into tasks it runs concurrently "
    "(block/qcow2.c, qcow2_add_task on an aio_task_pool), so the order in which their "
    "metadata updates and cache write-backs happen, and a failure among them, can vary from "
    "run to run; the engines run the pieces in order, which is one of QEMU's interleavings "
    "(damaged seed 19, flip-531@snap: a refused L2 write-back flagged the image in one request "
    "or the next). QEMU's race, not an engine gap.",
    open=False)

NOTES = (METADATA_OVERLAP, QEMU_ABORTED, DROPPED_CACHES, MODEL_WRITE_THROUGH,
         CACHED_METADATA_READ, REFCOUNTS_GROWN_ON_FREE, REFCOUNT_INDEX_WRAP, TABLE_PUNCHED,
         TABLE_WRITTEN_BEFORE_PUNCH, QEMU_NONDETERMINISTIC)


def _wrapping_offset(image: bytes) -> bool:
    """An active L2 entry of ``image`` (the damaged file's bytes) whose host cluster's
    refcount-table index is 2^32 or more (see REFCOUNT_INDEX_WRAP). Read with struct, in
    bounds: a damaged header may say anything."""
    if len(image) < 104 or image[:4] != b"QFI\xfb":
        return False
    version, cluster_bits = int.from_bytes(image[4:8], "big"), int.from_bytes(image[20:24], "big")
    if not 9 <= cluster_bits <= 21:
        return False
    l1_size, l1_offset = int.from_bytes(image[36:40], "big"), int.from_bytes(image[40:48], "big")
    refcount_order = int.from_bytes(image[96:100], "big") if version >= 3 else 4
    extended = version >= 3 and bool(int.from_bytes(image[72:80], "big") & 16)
    cs, width = 1 << cluster_bits, 16 if extended else 8
    block_bits = cluster_bits + 3 - refcount_order  # refcount entries per block, log2
    limit = 1 << (32 + block_bits + cluster_bits)
    for i in range(min(l1_size, 1024)):
        l2 = int.from_bytes(image[l1_offset + 8 * i:l1_offset + 8 * i + 8], "big") & L1E_OFFSET_MASK
        table = image[l2:l2 + cs] if l2 else b""
        for j in range(0, len(table) - 7, width):
            entry = int.from_bytes(table[j:j + 8], "big")
            # A compressed entry keeps its offset in the bits below the sector count
            # (qcow2.rst "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8)).
            mask = (1 << (62 - (cluster_bits - 8))) - 1 if entry & 1 << 62 else L2E_OFFSET_MASK
            if entry & mask >= limit:
                return True
    return version >= 3 and any(off >= limit for off in _bitmap_offsets(image, cs))


def _bitmap_offsets(image: bytes, cs: int) -> list[int]:
    """The bitmap table offsets of the bitmaps directory of ``image`` (v3), and the entries of
    the tables that lie inside the file: what the close's bitmap store frees. Read with
    struct, in bounds, as _wrapping_offset reads the header."""
    pos = int.from_bytes(image[100:104], "big")  # header_length: the extensions follow
    out: list[int] = []
    while 0 < pos <= len(image) - 8 and len(out) < 64:
        magic, size = int.from_bytes(image[pos:pos + 4], "big"), int.from_bytes(image[pos + 4:pos + 8], "big")
        if magic == 0:
            break
        if magic == QCOW2_EXT_MAGIC_BITMAPS and size >= 24:
            dir_size = int.from_bytes(image[pos + 16:pos + 24], "big")
            dir_offset = int.from_bytes(image[pos + 24:pos + 32], "big")
            directory = image[dir_offset:dir_offset + min(dir_size, 1 << 16)]
            at = 0
            while at + 24 <= len(directory) and len(out) < 64:
                table = int.from_bytes(directory[at:at + 8], "big")
                entries = int.from_bytes(directory[at + 8:at + 12], "big")
                name_size = int.from_bytes(directory[at + 18:at + 20], "big")
                extra = int.from_bytes(directory[at + 20:at + 24], "big")
                out.append(table)
                data = image[table:table + 8 * min(entries, cs // 8)] if table < len(image) else b""
                # A table entry's offset bits are an L1 entry's (qcow2.rst "Bitmap table").
                out += [int.from_bytes(data[k:k + 8], "big") & L1E_OFFSET_MASK
                        for k in range(0, len(data) - 7, 8)]
                at += (24 + extra + name_size + 7) // 8 * 8
        pos += 8 + (size + 7) // 8 * 8
    return out


_FREE_EFBIG_WORDS = "qcow2_free_clusters failed: File too large"
"""QEMU's words for a free whose refcount update failed on the host (see
REFCOUNTS_GROWN_ON_FREE)."""


def _model_forgot_unwritable_blocks(finding: Finding, qemu_log: str, impl_error: str) -> bool:
    """A free failed on the host in QEMU, and the impl (QEMU's cache) answered as QEMU did
    where the model (no cache) did not."""
    if _FREE_EFBIG_WORDS not in qemu_log or "impl" not in finding.outcomes:
        return False
    theirs = finding.outcomes["qemu"]
    if finding.kind == "flush" and theirs == "ok" and finding.outcomes.get("model", "ok") == "ok":
        # qemu-io prints nothing for a failed flush: the impl's own failure must be the
        # host's refusal of a block (EFBIG), as QEMU's write-back of it fails.
        return finding.outcomes["impl"] == "CorruptionError" and impl_error.startswith("HostIOError") \
            and "File too large" in impl_error
    return finding.outcomes["impl"] == theirs and finding.outcomes.get("model", theirs) != theirs


def _read_onto_metadata(finding: Finding, run: Run) -> bool:
    """A read every side served, whose host clusters are tables in the model's file
    (_reads_metadata)."""
    return (finding.kind == "read" and all(v.startswith("ok") for v in finding.outcomes.values())
            and run.case is not None and "model" in run.paths and 0 <= finding.step < len(run.case.ops)
            and _reads_metadata(run.paths["model"], run.case.ops[finding.step].offset,
                                run.case.ops[finding.step].n))


def _reads_metadata(path: Path, guest: int, n: int) -> bool:
    """Some cluster of [guest, guest+n) maps, through the active L1 and L2 tables of ``path``,
    to a host cluster that the refcount table or the L1 table also names (a refcount block, an
    L2 table)."""
    try:
        with open_image(path) as img:
            g, cs = img.geometry, img.cluster_size
            l1 = img.l1_table()
            tables = {e & REFT_OFFSET_MASK for e in img.refcount_table()} | {e & L1E_OFFSET_MASK for e in l1}
            tables.discard(0)
            width = 16 if img.extended_l2 else 8
            for pos in range(guest - guest % cs, guest + n, cs):  # a request: at most 64 KiB
                i1 = g.l1_index(pos)
                l2 = l1[i1] & L1E_OFFSET_MASK if i1 < len(l1) else 0
                if not l2:
                    continue
                entry = img.read(l2 + width * g.l2_index(pos), 8, "l2_entry")
                host = int.from_bytes(entry, "big") & L2E_OFFSET_MASK
                if host and any(t // cs == host // cs for t in tables):
                    return True
            return False
    except (Qcow2Error, OSError):
        return False

_OVERLAP_WORDS = "Preventing invalid write on metadata"
_FLAGGED_WORDS = "Marking image as corrupt"
_ABORT_WORDS = ("Assertion", "Aborted", "killed by SIGABRT", "killed by SIGSEGV")


def _engines_agree(finding: Finding) -> bool:
    return len({v for k, v in finding.outcomes.items() if k != "qemu"}) <= 1


def explain(finding: Finding, run: Run) -> Note | None:
    """The note that explains ``finding`` given what the run saw (everything qemu-io printed,
    whether one request failed with CorruptionError on every side, each side's last error),
    or None."""
    if "qemu" not in finding.outcomes:
        return None
    if run.qemu_varied:
        return QEMU_NONDETERMINISTIC
    qemu_log = "".join(run.qemu_log)
    if finding.kind == "check" and run.flagged_everywhere and _FLAGGED_WORDS in qemu_log:
        # A check finding comes only after every earlier comparison agreed, the request that
        # flagged the image on every side, the corrupt bits and the reopen among them.
        return DROPPED_CACHES
    theirs = finding.outcomes["qemu"]
    if theirs.startswith(("QemuIoDied", "refused (QemuIoDied")) and any(w in qemu_log for w in _ABORT_WORDS) \
            and (_engines_agree(finding) or "qcow2_cache_discard" in qemu_log):
        return QEMU_ABORTED
    others = {v for k, v in finding.outcomes.items() if k != "model"}
    model_error = run.errors.get("model", "")
    efbig = model_error.startswith("HostIOError") and "File too large" in model_error
    if efbig and finding.kind == "corrupt-flag" and finding.outcomes.get("model") == "False" \
            and others == {"True"} and _FLAGGED_WORDS in qemu_log:
        return MODEL_WRITE_THROUGH
    if efbig and finding.kind in ("write", "write_zeroes", "discard", "flush") and others == {"ok"} \
            and finding.outcomes.get("model") == "CorruptionError":
        return MODEL_WRITE_THROUGH
    if (len(others) == 1 and finding.outcomes.get("model") not in others
            and _read_onto_metadata(finding, run)):
        return CACHED_METADATA_READ
    if (_engines_agree(finding) and "impl" in finding.outcomes
            and finding.outcomes["qemu"] != finding.outcomes["impl"] and _read_onto_metadata(finding, run)
            and run.case is not None and any(op.kind == "discard" or (op.kind == "write_zeroes" and op.unmap)
                                             for op in run.case.ops[:finding.step])):
        return TABLE_WRITTEN_BEFORE_PUNCH
    if (len(others) == 1 and finding.outcomes.get("model") not in others and "model" in run.paths
            and run.model_table_punched):
        return TABLE_PUNCHED
    if _OVERLAP_WORDS in qemu_log and _model_missed_writeback(finding, others, run.image) \
            and run.errors.get("model", "") in ("", run.errors.get("impl", "")):
        # The model's last error, if any, is one the impl had too: it failed nothing of its own.
        return METADATA_OVERLAP
    if _model_forgot_unwritable_blocks(finding, qemu_log, run.errors.get("impl", "")):
        return REFCOUNTS_GROWN_ON_FREE
    if not _engines_agree(finding):
        return None
    if finding.kind == "check" and _wrapping_offset(run.image):
        return REFCOUNT_INDEX_WRAP
    if (theirs == "CorruptionError" and _OVERLAP_WORDS in qemu_log and _wrapping_offset(run.image)
            and all(v != theirs for k, v in finding.outcomes.items() if k != "qemu")):
        return REFCOUNT_INDEX_WRAP  # QEMU allocated the cluster the wrap freed, and refused to write it
    return None


def _model_missed_writeback(finding: Finding, others: set[str], image: bytes) -> bool:
    """QEMU and the impl answered alike and flagged the image here (a refused request, or the
    corrupt bit a refused write-back at the close left); the model, which has no write-back to
    refuse, did not. A reopen or check finding only for a v2 ``image``, which has no corrupt
    bit to show the flag (QEMU stops writing its file all the same); with a v3 image the bits
    agreed, so nothing says the model's file differs for this reason."""
    if "impl" not in finding.outcomes or len(others) != 1:
        return False
    theirs, model = finding.outcomes["qemu"], finding.outcomes.get("model")
    if model is None or model == theirs:
        return False
    if finding.kind == "corrupt-flag":
        return theirs == "True" and model == "False"
    if finding.kind in ("reopen", "check"):
        return image[:4] == b"QFI\xfb" and int.from_bytes(image[4:8], "big") == 2
    # A request (a flush, or a write whose eviction wrote the table back) or the close.
    return theirs == "CorruptionError" and model != "CorruptionError"
