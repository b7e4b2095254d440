"""The reference model of qcow2: clarity, not speed.

This package is the executable meaning of the format (DESIGN.md), in the spirit of the
WebAssembly reference interpreter. Its contract:

- **Clarity, not speed.** No caches. Every metadata update reads the table from the file,
  changes it and writes the whole table back (model/mapping.py, spec/refblocks.py).
- **Naive copy-on-write.** A write into a cluster that cannot be written in place reads
  what the cluster reads as now (old cluster, zeros, or backing data), merges the new bytes
  and writes the result to a new cluster (model/write.py, perform_cow).
- **Bulk operations reduce to per-cluster primitives.** Reads are per subcluster,
  writes per host-contiguous run of clusters, zeroing and discarding per cluster.
- **QEMU 7.2's behaviour, cited.** Each case table in a docstring names the QEMU function
  that decides the case; where QEMU's choice looks arbitrary it is still followed, in a
  function of its own named after QEMU's (compressed.alloc_bytes, write.perform_cow,
  write.handle_alloc_space, mapping_report.detect_metadata_preallocation). Host offsets
  follow QEMU's allocator, not just valid ones.
- **Errors are listed.** Every public function says which spec.errors classes it raises;
  no other exception escapes, whatever the input file.

The interface is spec.interface's: ``create``, ``open`` (returning an ``Image``) and
``check``, which is the shared check-and-repair engine (spec/check/). The model never
imports impl/ (tests/test_layering.py).

Layers (imports run downwards only; tests/test_layering.py):

1. The raw file, shared with the repair engine, in spec/: spec/qfile.py (host file and
   header), spec/refblocks.py (refcounts, QEMU's cluster allocation),
   spec/snapshot_table.py (the snapshot table).
2. Table access: mapping.py (L1/L2 entries, unsharing an L2 table, freeing what an entry
   held), overlap.py (metadata overlap checks), compress.py (deflate, zstd), backing.py
   (backing layers: raw files, or model Images).
3. The open image: state.py (``State``: the raw file plus the model's packing cursor,
   backing layer, size, per-open decisions; mark_dirty, the range check).
4. Operations on a State: read.py; mapping_report.py (block status, is_zero, qemu-img map);
   write.py (allocation, COW, linking, preallocation); zeroes.py (write_zeroes, discard);
   compressed.py (compressed writes, qcow2_alloc_bytes); resize.py; snapshots.py.
5. image.py: ``open`` (files, backing chain, QEMU's locks, the repair of a dirty image) and
   ``Image``, the facade: request checks, the corrupt flag, delegation. create.py lays out
   a new file (qemu-img create) and preallocates through an opened Image.

Encrypted images (LUKS and legacy AES) open with ``key_secret=``; the cipher is spec's
(spec/encryption.py, ``State.crypto``): read.py decrypts data clusters, write.py widens
requests to whole sectors and encrypts everything it writes to data clusters (COW included),
zeroes.py writes partial edge sectors as data, as QEMU's block layer does for a 512-byte
request alignment. Compressed clusters stay unencrypted, as QEMU 7.2 stores them.

Known deliberate QEMU 7.2 behaviour kept for fidelity: qcow2_alloc_bytes keeps packing
compressed data after ``free_byte_offset`` even when that host cluster was freed and reused
(tests/conformance/test_sequences.py, test_qemu_reuses_a_freed_compressed_cluster).
"""

import os

from model.create import create
from model.image import Image, open
from spec.interface import CheckResult, Repair


def check(path: str | os.PathLike[str], *, repair: Repair = None) -> CheckResult:
    """``qemu-img check [-r leaks|all]``: the shared engine, spec.check.check. Imported on
    first use: the check engine weighs ~30 ms of start-up that ``qcow2lab map`` never needs."""
    from spec.check import check as shared_check

    return shared_check(path, repair=repair)

__all__ = ["Image", "check", "create", "open"]
