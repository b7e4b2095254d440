"""The interface model/ and impl/ both export (DESIGN.md, "The interface").

Both packages provide module-level ``create``, ``open`` and ``check`` with these signatures,
and ``open`` returns an object satisfying ``Image``. Every function raises only
spec.errors classes. difftest/ programs against this Protocol, never against either package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Preallocation = Literal["off", "metadata", "falloc", "full"]
Repair = Literal["leaks", "all"] | None


@runtime_checkable
class Image(Protocol):
    """An open qcow2 image. A context manager; ``close`` flushes and clears the dirty bit."""

    size: int
    cluster_size: int

    def read(self, offset: int, n: int) -> bytes: ...
    def write(self, offset: int, data: bytes) -> None: ...
    def write_zeroes(self, offset: int, n: int, *, unmap: bool = False) -> None: ...
    def discard(self, offset: int, n: int) -> None: ...
    def write_compressed(self, offset: int, data: bytes) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def resize(self, new_size: int, *, shrink: bool = False) -> None: ...
    def map(self, offset: int = 0, n: int | None = None) -> list[dict[str, Any]]: ...
    def info(self) -> dict[str, Any]: ...
    def snapshot_create(self, name: str) -> None: ...
    def snapshot_apply(self, name: str) -> None: ...
    def snapshot_delete(self, name: str) -> None: ...
    def snapshots(self) -> list[dict[str, Any]]: ...
    def __enter__(self) -> Image: ...
    def __exit__(self, *exc: object) -> None: ...


BDRV_BLOCK_ALLOCATED = 0x10
"""The block-status bit for "allocated in this layer" (block/block-common.h)."""


class BlockStatus(Protocol):
    """One layer's block-status answer (bdrv_co_block_status): QEMU's BDRV_BLOCK_* bits in
    ``flags``, holding for ``length`` bytes."""

    flags: int
    length: int


@runtime_checkable
class Introspectable(Protocol):
    """What an engine lets a differential tester see beyond ``Image``: state QEMU keeps to
    itself that the tester needs to judge a run (difftest/core/introspect.py). An ``Image``
    without these members is compared through the interface alone, more slowly."""

    broken: bool
    """The image was flagged corrupt during I/O (qcow2_signal_corruption) and serves no
    further requests."""

    @property
    def packed_into_live_cluster(self) -> bool:
        """A compressed write of this open packed data into a host cluster that something
        else owns, as QEMU 7.2's qcow2_alloc_bytes can: the file is damaged as QEMU's is."""

    def layer_status(self, offset: int, n: int, want_zero: bool = True) -> BlockStatus:
        """The top layer's own block status at ``offset``, without the backing chain."""


@dataclass
class CheckResult:
    """The fields of ``qemu-img check --output=json`` (qapi/block-core.json, ImageCheck).

    ``exit_code`` follows qemu-img: 0 clean, 1 check errors, 2 corruptions, 3 leaks only,
    63 the format does not support checks.
    """

    filename: str
    format: str = "qcow2"
    check_errors: int = 0
    image_end_offset: int | None = None
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    total_clusters: int | None = None
    allocated_clusters: int | None = None
    fragmented_clusters: int | None = None
    compressed_clusters: int | None = None
    findings: list[Any] = field(default_factory=list)
    """Violated rules (spec.rules ids with offsets); not part of qemu-img's JSON."""
    findings_omitted: int = 0
    """Findings counted but not kept in ``findings`` (a check keeps a bounded number)."""

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruptions:
            return 2
        if self.leaks:
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        """qemu-img's JSON: zero-valued counters it omits are omitted here too."""
        out: dict[str, Any] = {"image-end-offset": self.image_end_offset,
                               "total-clusters": self.total_clusters,
                               "check-errors": self.check_errors,
                               "allocated-clusters": self.allocated_clusters,
                               "filename": self.filename, "format": self.format,
                               "fragmented-clusters": self.fragmented_clusters,
                               "compressed-clusters": self.compressed_clusters}
        for key, val in (("corruptions", self.corruptions), ("leaks", self.leaks),
                         ("corruptions-fixed", self.corruptions_fixed), ("leaks-fixed", self.leaks_fixed)):
            if val:
                out[key] = val
        return {k: v for k, v in out.items() if v is not None}
