"""The reference model of qcow2: clarity, not speed.

This package is the executable meaning of the format (DESIGN.md), in the spirit of the
WebAssembly reference interpreter. Its contract:

- **Clarity, not speed.** No caches. Every metadata update reads the table from the file,
  changes it and writes the whole table back (model/mapping.py, model/refcounts.py).
- **Naive copy-on-write.** A write into a cluster that cannot be written in place reads
  what the cluster reads as now (old cluster, zeros, or backing data), merges the new bytes
  and writes the result to a new cluster (model/image.py, Image._write_clusters).
- **Bulk operations reduce to per-cluster primitives.** Reads are per subcluster,
  writes per host-contiguous run of clusters, zeroing and discarding per cluster.
- **QEMU 7.2's behaviour, cited.** Each case table in a docstring names the QEMU function
  that decides the case; where QEMU's choice looks arbitrary it is still followed. Host
  offsets follow QEMU's allocator, not just valid ones.
- **Errors are listed.** Every public function says which spec.errors classes it raises;
  no other exception escapes, whatever the input file.

The interface is spec.interface's: ``create``, ``open`` (returning an ``Image``) and
``check``. The model never imports impl/ (tests/test_layering.py).

Modules: create.py (qemu-img create's layout), image.py (Image: read/write/zeroes/discard/
compressed writes), qfile.py (the host file and header, QEMU's file operations),
mapping.py (L1/L2), refcounts.py (refcounts and allocation), overlap.py (metadata overlap
checks), backing.py (backing layers), compress.py (deflate, zstd), mapping_report.py
(block status, qemu-img map), snapshots.py (internal snapshots), resize.py, repair.py
(check and ``check -r leaks|all`` as qemu-img, and the refcount rebuild of dirty images).
``open`` takes QEMU's image locks (spec/locking.py) and releases them at close.

Known deliberate QEMU 7.2 behaviour kept for fidelity: qcow2_alloc_bytes keeps packing
compressed data after ``free_byte_offset`` even when that host cluster was freed and reused
(see tests/test_model_qemu.py, test_qemu_reuses_a_freed_compressed_cluster).
"""

from model.create import create
from model.image import Image, open
from model.repair import check

__all__ = ["Image", "check", "create", "open"]
