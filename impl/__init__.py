"""The optimized qcow2 implementation (DESIGN.md, "impl/"): QEMU's driver structure, with a
sliced L2 cache and a refcount-block cache, QEMU's write ordering, subcluster allocation,
two-operation copy-on-write and overlap checks, over a counted host-file layer.

Module map, from the bottom up: hostfile (counted, optionally O_DIRECT host I/O), cache
(the metadata cache), state (BDRVQcow2State and the view of the image the request code
uses), refcount (refcounts and the allocator), overlap (metadata overlap checks), cluster
(mapping, allocation, COW, subclusters, zeroing, discard), status (block status, map, raw
backing files), compress, resize, snapshot, crypt (encrypted images: unlocking, sector
padding, decryption of reads), options (open options and cache sizing), image (the facade),
create.

``check`` is the shared check-and-repair engine (spec/check/), as for the model.
"""

from __future__ import annotations

import os

from impl.create import create
from impl.image import Image, open
from spec.interface import CheckResult, Repair


def check(path: str | os.PathLike[str], *, repair: Repair = None) -> CheckResult:
    """``qemu-img check [-r leaks|all]`` (spec.check.check; imported on first use)."""
    from spec.check import check as shared_check

    return shared_check(path, repair=repair)


__all__ = ["Image", "check", "create", "open"]
