"""The feature areas of the conformance matrix, each a campaign whose configurations are
pinned (difftest/core/config.py fields) to exercise one qcow2 feature.

Every area starts from a plain v3 image (zlib, 16-bit refcounts, no backing file, no data
file, no encryption: readers take no keys) and changes what it is about. The fields left
free (lazy refcounts, image size, cache options) are drawn as in any campaign. Areas with
a backing file use 4 KiB clusters, so a campaign of a few seconds still runs many
examples; the compression areas use 1 KiB clusters, where one host cluster holds several
compressed clusters and a reader must find each by its offset within it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PLAIN: dict[str, Any] = {"version": 3, "encrypt": "none", "data_file": False, "data_file_raw": False,
                         "extended_l2": False, "compression_type": "zlib", "backing": "none",
                         "refcount_bits": 16}


@dataclass(frozen=True)
class Area:
    name: str
    title: str
    pins: dict[str, Any] = field(default_factory=dict)
    snapshots: bool = False
    """Readers are also asked for every internal snapshot, ``open(path, snapshot=NAME)``
    (difftest/conformance/snapshots.py)."""

    @property
    def overrides(self) -> dict[str, Any]:
        """The difftest Config fields this area pins (a v2 image drops the v3-only ones)."""
        out = {**PLAIN, **self.pins}
        if out["version"] == 2:
            for k in ("refcount_bits", "compression_type", "extended_l2", "data_file", "data_file_raw"):
                out.pop(k, None)
            out["lazy_refcounts"] = False
        return out


def _backed(kind: str, size: str) -> dict[str, Any]:
    return {"backing": kind, "backing_size": size, "cluster_size": 4096}


AREAS: tuple[Area, ...] = (
    Area("plain", "plain v3, 64 KiB clusters", {"cluster_size": 65536}),
    Area("clusters-512", "512 B clusters", {"cluster_size": 512}),
    Area("clusters-4k", "4 KiB clusters", {"cluster_size": 4096}),
    Area("clusters-2m", "2 MiB clusters", {"cluster_size": 2 << 20}),
    Area("refcount-1", "1-bit refcounts", {"refcount_bits": 1, "cluster_size": 4096}),
    Area("refcount-8", "8-bit refcounts", {"refcount_bits": 8, "cluster_size": 4096}),
    Area("refcount-64", "64-bit refcounts", {"refcount_bits": 64, "cluster_size": 4096}),
    Area("zero-over-backing", "zero clusters over a qcow2 backing file", _backed("qcow2", "same")),
    Area("short-backing", "qcow2 backing file shorter than the image", _backed("qcow2", "shorter")),
    Area("raw-backing", "raw backing file", _backed("raw", "same")),
    Area("chain", "two qcow2 backing layers", _backed("qcow2x2", "same")),
    Area("zlib", "zlib-compressed clusters (1 KiB clusters)",
         {"compression_type": "zlib", "cluster_size": 1024}),
    Area("zstd", "zstd-compressed clusters (1 KiB clusters)",
         {"compression_type": "zstd", "cluster_size": 1024}),
    Area("extended-l2", "extended L2 entries (subclusters)", {"extended_l2": True, "cluster_size": 65536}),
    Area("data-file", "external data file", {"data_file": True, "cluster_size": 4096}),
    Area("snapshots", "internal snapshots read with snapshot=", {"cluster_size": 4096}, snapshots=True),
    Area("v2", "version 2 image", {"version": 2, "cluster_size": 4096}),
)
BY_NAME = {a.name: a for a in AREAS}


def select(names: str | None) -> list[Area]:
    """The areas a comma-separated ``--areas`` list names (all when None or empty)."""
    if not names:
        return list(AREAS)
    out = []
    for n in (x.strip() for x in names.split(",")):
        if n not in BY_NAME:
            raise ValueError(f"unknown area {n!r}: choose from {', '.join(BY_NAME)}")
        out.append(BY_NAME[n])
    return out
