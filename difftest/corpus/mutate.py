"""A deterministic corpus of corrupted qcow2 images, and QEMU's verdict on each.

Valid *base* images are written by qemu-img/qemu-io (``build_bases``). Each *mutation* then
changes a few bytes on purpose, using the schemas' reading of the base (spec.image) to find
its target: a reserved bit, a table offset, an L2 entry, a refcount, a length field. A mutant
carries its name, a description, the exact byte edits and the verdict ``qemu-img check``
is meant to give (``expect``); tests/difftest/test_mutants.py holds QEMU to those intentions.
Random bit flips in metadata clusters complete the corpus for the fuzz harness
(difftest/corpus/fuzz.py); they have no intended verdict.

Determinism: every random choice comes from ``random.Random(f"{seed}:{mutant name}")``, so
a mutant does not depend on which others were generated. The bases are reproducible too
(snapshot timestamps are pinned after qemu-img writes them).

Verdicts (``qemu_verdict``), from qemu-img check's exit code, JSON and stderr (qemu-img.c,
img_check / collect_image_check): ``clean`` (0), ``check-errors`` (1 with a report),
``corruptions`` (2), ``leaks`` (3), ``refused`` (qemu-img could not open the image, so no
report) and ``hang`` (no answer within the time limit).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spec import entries as en
from spec import header as hd
from spec import limits as lim
from spec.errors import Qcow2Error
from spec.image import ImageFile, open_image
from spec.snapshot import SNAPSHOT_HEADER_SIZE

VERDICTS = ("clean", "leaks", "corruptions", "check-errors", "refused", "hang")

# Header field offsets (qcow2.rst "Header"): byte positions of the fields mutations touch.
OFF_BACKING_FILE_OFFSET = 8
OFF_BACKING_FILE_SIZE = 16
OFF_L1_SIZE = 36
OFF_L1_TABLE_OFFSET = 40
OFF_REFCOUNT_TABLE_OFFSET = 48
OFF_REFCOUNT_TABLE_CLUSTERS = 56
OFF_NB_SNAPSHOTS = 60
OFF_SNAPSHOTS_OFFSET = 64
OFF_INCOMPATIBLE_FEATURES = 72
OFF_COMPATIBLE_FEATURES = 80
OFF_AUTOCLEAR_FEATURES = 88
OFF_HEADER_LENGTH = 100

# The snapshot timestamps qemu-img writes are pinned to these, so bases are reproducible.
PINNED_DATE_SEC = 1_700_000_000


# --- base images ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Base:
    """A valid image written by QEMU, plus the files it needs beside it (its backing file)."""

    name: str
    filename: str
    data: bytes
    sidecars: dict[str, bytes] = field(default_factory=dict)


def _run(*argv: str) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0 or "error" in r.stdout.lower():
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr or r.stdout}")


def _create(path: Path, size: str, opts: str, *extra: str) -> None:
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, *extra, str(path), size)


def _io(path: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for cmd in cmds:
        argv += ["-c", cmd]
    _run(*argv, str(path))


def _pin_snapshot_dates(path: Path) -> None:
    """Overwrite the snapshot table's wall-clock fields (qcow2.rst "Snapshots", bytes 16-31)."""
    with open_image(path) as img:
        offsets = []
        off = img.header.snapshots_offset
        for sn in img.snapshot_table():
            offsets.append(off)
            n = SNAPSHOT_HEADER_SIZE + sn.extra_data_size + sn.id_str_size + sn.name_size
            off += n + (-n % 8)
    with path.open("r+b") as f:
        for i, off in enumerate(offsets):
            f.seek(off + 16)
            f.write((PINNED_DATE_SEC + i).to_bytes(4, "big") + bytes(4) + (i + 1).to_bytes(8, "big"))


def _build(name: str, d: Path) -> Base:
    """Build one base image in ``d``. Small clusters keep the files (and the campaign) small."""
    p = d / f"{name}.qcow2"
    side: dict[str, bytes] = {}
    if name == "v3":
        _create(p, "4M", "cluster_size=4096")
        _io(p, "write -P 0x11 0 8k", "write -c -P 0x22 64k 4k", "write -z 128k 4k", "write -P 0x33 3M 4k")
    elif name == "v2":
        _create(p, "4M", "cluster_size=4096,compat=0.10")
        _io(p, "write -P 0x11 0 8k", "write -c -P 0x22 64k 4k", "write -P 0x33 3M 4k")
    elif name == "extl2":
        _create(p, "4M", "cluster_size=32768,extended_l2=on")
        _io(p, "write -P 0x11 0 2k", "write -P 0x22 64k 32k", "write -z 128k 2k", "write -c -P 0x44 256k 32k")
    elif name == "snap":
        _create(p, "4M", "cluster_size=4096")
        _io(p, "write -P 0x11 0 16k")
        _run("qemu-img", "snapshot", "-c", "s1", str(p))
        _io(p, "write -P 0x22 8k 8k")
        _pin_snapshot_dates(p)
    elif name == "bitmap":
        _create(p, "4M", "cluster_size=4096")
        _io(p, "write -P 0x11 0 64k")
        _run("qemu-img", "bitmap", "--add", str(p), "b0")
        _run("qemu-img", "bitmap", "--add", "-g", "128k", str(p), "b1")
        _io(p, "write -P 0x22 1M 64k")
    elif name == "overlay":
        b = d / "overlay-backing.qcow2"
        _create(b, "4M", "cluster_size=4096")
        _io(b, "write -P 0x55 0 64k")
        _create(p, "4M", "cluster_size=4096", "-b", b.name, "-F", "qcow2")
        _io(p, "write -P 0x66 4k 4k")
        side[b.name] = b.read_bytes()
    else:
        raise ValueError(f"unknown base {name!r}")
    return Base(name, p.name, p.read_bytes(), side)


BASE_NAMES = ("v3", "v2", "extl2", "snap", "bitmap", "overlay")


def build_bases(workdir: str | os.PathLike[str]) -> dict[str, Base]:
    """Build (or reuse, if ``workdir`` already has them) every base image."""
    d = Path(workdir) / "bases"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in BASE_NAMES:
        marker = d / f"{name}.done"
        if marker.exists():
            side = {s: (d / s).read_bytes() for s in marker.read_text().split()}
            out[name] = Base(name, f"{name}.qcow2", (d / f"{name}.qcow2").read_bytes(), side)
        else:
            out[name] = _build(name, d)
            marker.write_text(" ".join(out[name].sidecars))
    return out


# --- the layout of a base, read through the schemas -------------------------------------------

@dataclass
class Layout:
    """Where a base's metadata lives, found with spec.image (so mutations aim at real targets)."""

    cluster_size: int
    cluster_bits: int
    version: int
    header_length: int
    extended_l2: bool
    refcount_bits: int
    refblock_entries: int
    l1_offset: int
    l1: list[int]
    reftable_offset: int
    reftable: list[int]
    snapshots_offset: int
    nb_snapshots: int
    backing_file_offset: int
    backing_file_size: int
    first_extension: int | None
    # (file offset of the entry, entry value, L2 table offset) per allocated L2 entry kind
    normal: list[tuple[int, int, int]] = field(default_factory=list)
    compressed: list[tuple[int, int, int]] = field(default_factory=list)
    unallocated: list[tuple[int, int, int]] = field(default_factory=list)
    l2_tables: list[int] = field(default_factory=list)
    metadata_clusters: list[int] = field(default_factory=list)

    def refcount_entry(self, host_offset: int) -> tuple[int, int]:
        """(file offset, byte width) of a cluster's refcount entry; refcount_bits >= 8 only."""
        idx = host_offset // self.cluster_size
        block = self.reftable[idx // self.refblock_entries] & en.REFT_OFFSET_MASK
        width = self.refcount_bits // 8
        return block + (idx % self.refblock_entries) * width, width


def layout_of(path: Path) -> Layout:
    with open_image(path) as img:
        return _layout(img)


def _layout(img: ImageFile) -> Layout:
    h = img.header
    g = img.geometry
    ext_types = [e.type for e in img.extensions]
    lay = Layout(
        cluster_size=g.cluster_size, cluster_bits=g.cluster_bits, version=img.version,
        header_length=img.header_length, extended_l2=g.extended_l2, refcount_bits=g.refcount_bits,
        refblock_entries=g.refcount_block_entries, l1_offset=h.l1_table_offset, l1=img.l1_table(),
        reftable_offset=h.refcount_table_offset, reftable=img.refcount_table(),
        snapshots_offset=h.snapshots_offset, nb_snapshots=h.nb_snapshots,
        backing_file_offset=h.backing_file_offset, backing_file_size=h.backing_file_size,
        first_extension=img.header_length if ext_types else None,
    )
    esize = g.l2_entry_size
    for l1e in lay.l1:
        l2_off = l1e & en.L1E_OFFSET_MASK
        if not l2_off:
            continue
        lay.l2_tables.append(l2_off)
        for i, e in enumerate(img.l2_table(l2_off)):
            word = int(e.l2_entry) if g.extended_l2 else int(e)
            item = (l2_off + i * esize, word, l2_off)
            ctype = en.cluster_type(word, extended_l2=g.extended_l2)
            if ctype is en.ClusterType.NORMAL:
                lay.normal.append(item)
            elif ctype is en.ClusterType.COMPRESSED:
                lay.compressed.append(item)
            elif ctype is en.ClusterType.UNALLOCATED:
                lay.unallocated.append(item)
    refblocks = [r & en.REFT_OFFSET_MASK for r in lay.reftable if r & en.REFT_OFFSET_MASK]
    cs = lay.cluster_size
    reftable = [lay.reftable_offset + i * cs for i in range(h.refcount_table_clusters)]
    extra: set[int] = set()
    if lay.nb_snapshots:
        extra.add(lay.snapshots_offset - lay.snapshots_offset % cs)
    bitmaps = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
    if bitmaps is not None:
        extra.add(bitmaps.data.bitmap_directory_offset)
        extra |= {e.bitmap_table_offset for e in img.bitmap_directory()}
    lay.metadata_clusters = sorted({0, lay.l1_offset - lay.l1_offset % cs, *reftable, *refblocks,
                                    *lay.l2_tables} | extra)
    return lay


# --- mutants ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Edit:
    """``old`` replaced by ``new`` at ``offset`` (same length)."""

    offset: int
    old: bytes
    new: bytes


@dataclass
class Mutant:
    name: str
    base: str
    description: str
    data: bytes
    edits: list[Edit]
    expect: frozenset[str]
    """QEMU verdicts the mutation intends; empty for random flips (anything goes)."""
    filename: str
    sidecars: dict[str, bytes] = field(default_factory=dict)
    truncated_to: int | None = None
    oracle: str = "check"
    """How QEMU judges it: "check" (qemu-img check) or "chain" (qemu-img info --backing-chain)."""

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write the image (as ``filename``) and its sidecar files into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.sidecars.items():
            (d / name).write_bytes(data)
        p = d / self.filename
        p.write_bytes(self.data)
        return p


class _Buf:
    """The base's bytes being mutated; every change is recorded as an Edit."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.edits: list[Edit] = []

    def put(self, offset: int, new: bytes) -> None:
        if offset + len(new) > len(self.data):
            self.data.extend(bytes(offset + len(new) - len(self.data)))
        old = bytes(self.data[offset:offset + len(new)])
        if old != new:
            self.edits.append(Edit(offset, old, new))
            self.data[offset:offset + len(new)] = new

    def u(self, offset: int, width: int) -> int:
        return int.from_bytes(self.data[offset:offset + width], "big")

    def put_u(self, offset: int, width: int, value: int) -> None:
        self.put(offset, value.to_bytes(width, "big"))


Ctx = tuple[Base, Layout, _Buf, random.Random]
MutationFn = Callable[[Base, Layout, _Buf, random.Random], "str | None"]
"""Applies the mutation to the buffer; returns None if the base has no target for it, or an
optional file name override (backing loops need fixed names)."""


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    expect: frozenset[str]
    bases: tuple[str, ...]
    fn: MutationFn


MUTATIONS: dict[str, Mutation] = {}


def mutation(name: str, description: str, expect: str | tuple[str, ...],
             bases: tuple[str, ...] = ("v3",)) -> Callable[[MutationFn], MutationFn]:
    def deco(fn: MutationFn) -> MutationFn:
        ex = frozenset((expect,) if isinstance(expect, str) else expect)
        assert ex <= set(VERDICTS), ex
        MUTATIONS[name] = Mutation(name, description, ex, bases, fn)
        return fn
    return deco


def _bit(rng: random.Random, mask: int) -> int:
    return 1 << rng.choice([b for b in range(64) if mask >> b & 1])


def _flip_bits(buf: _Buf, offset: int, mask: int) -> None:
    buf.put_u(offset, 8, buf.u(offset, 8) | mask)


# Header ------------------------------------------------------------------------------------

@mutation("header-incompatible-unknown-bit",
          "An incompatible feature bit QEMU does not know (bits 5-63) is set: QEMU must refuse.",
          "refused", ("v3", "extl2"))
def _m_incompat(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _flip_bits(buf, OFF_INCOMPATIBLE_FEATURES, _bit(rng, ~0x1F & (2**64 - 1)))
    return ""


@mutation("header-compatible-unknown-bit",
          "An unknown compatible feature bit (1-63) is set: readers ignore it, the image stays clean.",
          "clean", ("v3", "snap"))
def _m_compat(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _flip_bits(buf, OFF_COMPATIBLE_FEATURES, _bit(rng, ~0x1 & (2**64 - 1)))
    return ""


@mutation("header-autoclear-unknown-bit",
          "An unknown autoclear feature bit (2-63) is set: a read-only check leaves it and finds "
          "nothing wrong.", "clean")
def _m_autoclear(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _flip_bits(buf, OFF_AUTOCLEAR_FEATURES, _bit(rng, ~0x3 & (2**64 - 1)))
    return ""


@mutation("header-corrupt-bit", "The incompatible 'corrupt' bit (1) is set: check still opens "
          "the image read-only and finds nothing else wrong.", "clean")
def _m_corrupt(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _flip_bits(buf, OFF_INCOMPATIBLE_FEATURES, 0x2)
    return ""


@mutation("header-l1-offset-misaligned",
          "l1_table_offset is moved off a cluster boundary (by a multiple of 8 bytes): refused at open.",
          "refused", ("v3", "v2"))
def _m_l1_misaligned(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    buf.put_u(OFF_L1_TABLE_OFFSET, 8, lay.l1_offset + 8 * rng.randrange(1, lay.cluster_size // 8))
    return ""


@mutation("header-refcount-table-offset-misaligned",
          "refcount_table_offset is moved off a cluster boundary: refused at open.", "refused", ("v3", "v2"))
def _m_rt_misaligned(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    buf.put_u(OFF_REFCOUNT_TABLE_OFFSET, 8, lay.reftable_offset + 8 * rng.randrange(1, lay.cluster_size // 8))
    return ""


@mutation("header-snapshots-offset-misaligned",
          "snapshots_offset is moved off a cluster boundary: refused at open.", "refused", ("snap",))
def _m_sn_misaligned(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    buf.put_u(OFF_SNAPSHOTS_OFFSET, 8, lay.snapshots_offset + 8 * rng.randrange(1, lay.cluster_size // 8))
    return ""


@mutation("header-huge-l1-size",
          "l1_size beyond QEMU's 32 MiB L1 limit: refused before anything is allocated.", "refused",
          ("v3", "v2"))
def _m_huge_l1(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    buf.put_u(OFF_L1_SIZE, 4, rng.randrange(lim.QCOW_MAX_L1_SIZE // 8 + 1, 2**32))
    return ""


@mutation("header-huge-refcount-table-clusters",
          "refcount_table_clusters beyond QEMU's 8 MiB refcount table limit: refused at open.",
          "refused", ("v3", "v2"))
def _m_huge_rtc(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    buf.put_u(OFF_REFCOUNT_TABLE_CLUSTERS, 4,
              rng.randrange(lim.QCOW_MAX_REFTABLE_SIZE // lay.cluster_size + 1, 2**32))
    return ""


@mutation("header-huge-nb-snapshots",
          "nb_snapshots beyond QEMU's 65536 snapshot limit: refused at open.", "refused", ("v3", "snap"))
def _m_huge_nbsn(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    buf.put_u(OFF_NB_SNAPSHOTS, 4, rng.randrange(lim.QCOW_MAX_SNAPSHOTS + 1, 2**32))
    return ""


@mutation("header-huge-header-length",
          "header_length larger than a cluster: refused at open.", "refused", ("v3",))
def _m_huge_hlen(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    buf.put_u(OFF_HEADER_LENGTH, 4, rng.randrange(lay.cluster_size + 8, 2**32, 8))
    return ""


@mutation("header-huge-extension-length",
          "The first header extension (the end marker, if it is the only one) claims a length "
          "running past the end of the header cluster: refused at open.", "refused", ("v3", "overlay"))
def _m_huge_ext(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    if lay.first_extension is None:
        return None
    buf.put_u(lay.first_extension + 4, 4, rng.randrange(lay.cluster_size, 2**32))
    return ""


@mutation("header-backing-name-too-long",
          "backing_file_size above 1023 (the name bytes are rewritten to match): refused at open.",
          "refused", ("overlay",))
def _m_backing_long(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    room = lay.cluster_size - lay.backing_file_offset
    n = rng.randrange(lim.BACKING_FILE_NAME_MAX + 1, room + 1)
    buf.put_u(OFF_BACKING_FILE_SIZE, 4, n)
    buf.put(lay.backing_file_offset, b"b" * n)
    return ""


def _set_backing_name(buf: _Buf, lay: Layout, name: str) -> None:
    buf.put_u(OFF_BACKING_FILE_SIZE, 4, len(name))
    buf.put(lay.backing_file_offset, name.encode())


@mutation("backing-loop-self",
          "The image names itself as its backing file. QEMU 7.2's qemu-img check does not notice the "
          "loop (it keeps opening the chain and never answers); qemu-img info --backing-chain refuses "
          "it, so that is the oracle for this mutant.", "refused", ("overlay",))
def _m_loop_self(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    name = "loop-self.qcow2"
    _set_backing_name(buf, lay, name)
    return name


@mutation("backing-loop-pair",
          "The image's backing file has the image as its own backing file (A -> B -> A); the oracle "
          "is qemu-img info --backing-chain, as for backing-loop-self.", "refused", ("overlay",))
def _m_loop_pair(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _set_backing_name(buf, lay, "loop-b.qcow2")
    return "loop-a.qcow2"


# L1 / L2 / refcount table entries ---------------------------------------------------------

def _nonzero_l1(lay: Layout) -> list[int]:
    return [lay.l1_offset + 8 * i for i, e in enumerate(lay.l1) if e & en.L1E_OFFSET_MASK]


@mutation("l1-reserved-bits", "A reserved bit (56-62 or 0-8) of an allocated L1 entry is set.",
          "corruptions", ("v3", "v2", "extl2"))
def _m_l1_res(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _flip_bits(buf, rng.choice(_nonzero_l1(lay)), _bit(rng, en.L1E_RESERVED_MASK))
    return ""


@mutation("l2-reserved-bits", "A reserved bit (56-61 or 1-8) of a standard allocated L2 entry is set.",
          "corruptions", ("v3", "v2", "extl2"))
def _m_l2_res(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off, _, _ = rng.choice(lay.normal)
    _flip_bits(buf, off, _bit(rng, en.L2E_STD_RESERVED_MASK))
    return ""


@mutation("refcount-table-reserved-bits", "A reserved bit (0-8) of an allocated refcount table entry is set.",
          "corruptions", ("v3", "v2"))
def _m_rt_res(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    idx = rng.choice([i for i, e in enumerate(lay.reftable) if e])
    _flip_bits(buf, lay.reftable_offset + 8 * idx, _bit(rng, en.REFT_RESERVED_MASK))
    return ""


@mutation("l1-l2-offset-misaligned", "An L1 entry's L2 table offset is moved off a cluster boundary.",
          "corruptions", ("v3", "v2"))
def _m_l2_misaligned(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off = rng.choice(_nonzero_l1(lay))
    buf.put_u(off, 8, buf.u(off, 8) + 512 * rng.randrange(1, lay.cluster_size // 512))
    return ""


@mutation("refcount-table-block-misaligned",
          "A refcount table entry's refcount block offset is moved off a cluster boundary. QEMU "
          "counts the entry as a corruption but then cannot read any refcount: check-errors (exit 1).",
          "check-errors", ("v3", "v2"))
def _m_rb_misaligned(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    idx = rng.choice([i for i, e in enumerate(lay.reftable) if e])
    off = lay.reftable_offset + 8 * idx
    buf.put_u(off, 8, buf.u(off, 8) + 512 * rng.randrange(1, lay.cluster_size // 512))
    return ""


def _retarget(buf: _Buf, lay: Layout, rng: random.Random, target: int) -> None:
    off, word, _ = rng.choice(lay.normal)
    buf.put_u(off, 8, (word & ~en.L2E_OFFSET_MASK) | target)


@mutation("l2-entry-into-l1-table", "A data cluster's L2 entry points at the cluster holding the L1 table.",
          "corruptions", ("v3", "v2", "extl2"))
def _m_into_l1(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _retarget(buf, lay, rng, lay.l1_offset - lay.l1_offset % lay.cluster_size)
    return ""


@mutation("l2-entry-into-refcount-table", "A data cluster's L2 entry points at the refcount table.",
          "corruptions", ("v3", "v2"))
def _m_into_rt(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _retarget(buf, lay, rng, lay.reftable_offset)
    return ""


@mutation("l2-entry-into-own-l2-table", "A data cluster's L2 entry points at its own L2 table.",
          "corruptions", ("v3", "v2"))
def _m_into_l2(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off, word, l2 = rng.choice(lay.normal)
    buf.put_u(off, 8, (word & ~en.L2E_OFFSET_MASK) | l2)
    return ""


@mutation("l2-entry-into-header",
          "A compressed L2 entry's data offset points into the header cluster (cluster 0).",
          "corruptions", ("v3", "v2"))
def _m_into_header(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off, word, _ = rng.choice(lay.compressed)
    target = rng.randrange(0, min(lay.cluster_size, 4096) - 512, 8)
    buf.put_u(off, 8, (word & ~en.cluster_offset_mask(lay.cluster_bits)) | target)
    return ""


def _refcount_put(buf: _Buf, lay: Layout, host: int, value: int) -> None:
    entry, width = lay.refcount_entry(host)
    buf.put_u(entry, width, value)


@mutation("refcount-too-high",
          "A data cluster's refcount is raised from 1 to 2 and its L2 entry's COPIED flag cleared "
          "to stay consistent: a leak and nothing else.", "leaks", ("v3", "v2"))
def _m_rc_high(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off, word, _ = rng.choice([n for n in lay.normal if n[1] & en.QCOW_OFLAG_COPIED])
    buf.put_u(off, 8, word & ~en.QCOW_OFLAG_COPIED)
    _refcount_put(buf, lay, word & en.L2E_OFFSET_MASK, 2)
    return ""


@mutation("refcount-too-high-copied-stale",
          "A data cluster's refcount is raised from 1 to 2 but COPIED stays set: a leak plus a "
          "COPIED corruption.", "corruptions", ("v3",))
def _m_rc_high_copied(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _, word, _ = rng.choice([n for n in lay.normal if n[1] & en.QCOW_OFLAG_COPIED])
    _refcount_put(buf, lay, word & en.L2E_OFFSET_MASK, 2)
    return ""


@mutation("refcount-leak-appended-cluster",
          "One cluster is appended to the file and given refcount 1 without any reference: a leak.",
          "leaks", ("v3", "snap"))
def _m_rc_leak(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    end = len(buf.data) + (-len(buf.data) % lay.cluster_size)
    buf.put(end, bytes([rng.randrange(1, 256)]) * lay.cluster_size)
    _refcount_put(buf, lay, end, 1)
    return ""


@mutation("refcount-too-low", "A referenced data cluster's refcount is lowered to 0.",
          "corruptions", ("v3", "v2", "extl2"))
def _m_rc_low(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _, word, _ = rng.choice(lay.normal)
    _refcount_put(buf, lay, word & en.L2E_OFFSET_MASK, 0)
    return ""


@mutation("refcount-metadata-zero", "The refcount of the L1 table's cluster is set to 0.",
          "corruptions", ("v3", "v2"))
def _m_rc_meta(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    _refcount_put(buf, lay, lay.l1_offset, 0)
    return ""


@mutation("l2-copied-cleared", "COPIED is cleared on a data cluster whose refcount is 1.",
          "corruptions", ("v3", "extl2"))
def _m_l2_copied(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off, word, _ = rng.choice([n for n in lay.normal if n[1] & en.QCOW_OFLAG_COPIED])
    buf.put_u(off, 8, word & ~en.QCOW_OFLAG_COPIED)
    return ""


@mutation("l2-copied-set-on-shared", "COPIED is set on a data cluster shared with a snapshot (refcount 2).",
          "corruptions", ("snap",))
def _m_l2_copied_shared(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    shared = [n for n in lay.normal if not n[1] & en.QCOW_OFLAG_COPIED]
    if not shared:
        return None
    off, word, _ = rng.choice(shared)
    buf.put_u(off, 8, word | en.QCOW_OFLAG_COPIED)
    return ""


@mutation("l1-copied-cleared", "COPIED is cleared on an L1 entry whose L2 table has refcount 1.",
          "corruptions", ("v3", "v2"))
def _m_l1_copied(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off = rng.choice(_nonzero_l1(lay))
    buf.put_u(off, 8, buf.u(off, 8) & ~en.QCOW_OFLAG_COPIED)
    return ""


@mutation("compressed-with-copied", "COPIED is set on a compressed cluster descriptor (never allowed).",
          "corruptions", ("v3", "v2"))
def _m_comp_copied(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off, word, _ = rng.choice(lay.compressed)
    buf.put_u(off, 8, word | en.QCOW_OFLAG_COPIED)
    return ""


@mutation("subcluster-alloc-and-zero",
          "Extended L2: a subcluster of an allocated cluster is marked both allocated and zero.",
          "corruptions", ("extl2",))
def _m_sc_both(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off, _, _ = rng.choice(lay.normal)
    bitmap = buf.u(off + 8, 8)
    allocated = [i for i in range(32) if bitmap >> i & 1]
    sc = rng.choice(allocated)
    buf.put_u(off + 8, 8, bitmap | en.QCOW_OFLAG_SUB_ZERO(sc))
    return ""


@mutation("subcluster-alloc-on-unallocated",
          "Extended L2: an unallocated cluster's bitmap marks a subcluster allocated.",
          "corruptions", ("extl2",))
def _m_sc_unalloc(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off, _, _ = rng.choice(lay.unallocated)
    buf.put_u(off + 8, 8, buf.u(off + 8, 8) | en.QCOW_OFLAG_SUB_ALLOC(rng.randrange(32)))
    return ""


@mutation("subcluster-bitmap-on-compressed",
          "Extended L2: a compressed cluster has a non-zero subcluster bitmap.", "corruptions", ("extl2",))
def _m_sc_comp(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    off, _, _ = rng.choice(lay.compressed)
    buf.put_u(off + 8, 8, 1 << rng.randrange(64))
    return ""


def _last_data_cluster(lay: Layout, buf: _Buf) -> int | None:
    """The last data cluster, if it is the file's last cluster (so a cut hits only data)."""
    last = max(w & en.L2E_OFFSET_MASK for _, w, _ in lay.normal)
    if last + lay.cluster_size < len(buf.data) or any(m > last for m in lay.metadata_clusters):
        return None
    return last


@mutation("truncated-data", "The file is cut at the start of its last data cluster, so that cluster "
          "is wholly missing: QEMU counts a reference past the end of the file as a corruption.",
          "corruptions", ("v3", "v2"))
def _m_trunc_data(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    last = _last_data_cluster(lay, buf)
    if last is None:
        return None
    del buf.data[last:]
    return ""


@mutation("truncated-data-partial", "The file is cut inside its last data cluster. QEMU reads the "
          "missing tail as zeros and check tolerates a cluster that runs past the end of the file by "
          "less than a cluster (qcow2-refcount.c, qcow2_inc_refcounts_imrt): clean.",
          "clean", ("v3", "v2"))
def _m_trunc_partial(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    last = _last_data_cluster(lay, buf)
    if last is None:
        return None
    del buf.data[last + rng.randrange(512, lay.cluster_size, 512):]
    return ""


@mutation("truncated-header", "The file is cut before the end of cluster_bits (byte 24): refused at "
          "open. (Cut later, QEMU reads the missing header bytes as zeros and may accept the image, "
          "as file-posix zero-fills reads past the end of the file; spec.image refuses any cut header.)",
          "refused", ("v3", "v2"))
def _m_trunc_header(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    del buf.data[rng.randrange(4, 24):]
    return ""


@mutation("truncated-before-l1", "The file is cut before the end of the L1 table. QEMU reads the "
          "missing entries as zeros (unallocated), so it does not refuse the image: clean, or corrupt "
          "if a refcount block was cut off too. spec.image refuses it (FormatError) when it reads L1.",
          ("clean", "corruptions"), ("v3", "v2"))
def _m_trunc_l1(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str | None:
    del buf.data[rng.randrange(lay.header_length + 8, lay.l1_offset + 8 * len(lay.l1)):]
    return ""


def _interesting(lay: Layout, rng: random.Random, width: int) -> int:
    """A value likely to hit a boundary: 0, all ones, powers of two, sizes near a limit."""
    top = (1 << (8 * width)) - 1
    cands = [0, top, top >> 1, (top >> 1) + 1, 1, lay.cluster_size, lay.cluster_size - 8,
             1 << rng.randrange(8 * width), rng.randrange(top + 1)]
    return rng.choice(cands) & top


def _flip_mutant(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> None:
    """1-8 random changes, each in a random metadata cluster (header, L1, L2, refcounts,
    snapshots): mostly single bit flips, sometimes a random byte, sometimes an aligned 2-, 4-
    or 8-byte field set to a boundary value (so length and count fields get huge or zero)."""
    for _ in range(rng.randrange(1, 9)):
        cluster = rng.choice(lay.metadata_clusters)
        span = lay.cluster_size if cluster else min(lay.cluster_size, 4096)
        off = cluster + rng.randrange(span)
        if off >= len(buf.data):
            continue
        kind = rng.random()
        if kind < 0.6:
            buf.put(off, bytes([buf.data[off] ^ (1 << rng.randrange(8))]))
        elif kind < 0.75:
            buf.put(off, bytes([rng.randrange(256)]))
        else:
            width = rng.choice((2, 4, 8))
            off -= off % width
            if off + width <= len(buf.data):
                buf.put_u(off, width, _interesting(lay, rng, width))


# --- generation --------------------------------------------------------------------------------

def _make(base: Base, lay: Layout, name: str, description: str, expect: frozenset[str],
          fn: Callable[[Base, Layout, _Buf, random.Random], str | None], seed: int) -> Mutant | None:
    rng = random.Random(f"{seed}:{name}")
    buf = _Buf(base.data)
    try:
        filename = fn(base, lay, buf, rng)
    except IndexError:  # rng.choice on an empty candidate list: the base has no target
        return None
    if filename is None:
        return None
    data = bytes(buf.data)
    truncated = len(data) if len(data) < len(base.data) else None
    if data == base.data:
        return None
    filename = filename or f"{name}.qcow2"
    sidecars = dict(base.sidecars)
    if filename == "loop-a.qcow2":
        sidecars["loop-b.qcow2"] = _loop_partner(base, lay)
    oracle = "chain" if filename.startswith("loop-") else "check"
    return Mutant(name, base.name, description, data, buf.edits, expect, filename, sidecars, truncated,
                  oracle)


def _loop_partner(base: Base, lay: Layout) -> bytes:
    b = _Buf(base.data)
    _set_backing_name(b, lay, "loop-a.qcow2")
    return bytes(b.data)


def targeted(bases: dict[str, Base], seed: int = 0) -> Iterator[Mutant]:
    """Every named mutation applied to every base it lists, in a fixed order."""
    layouts = _layouts(bases)
    for m in MUTATIONS.values():
        for bname in m.bases:
            mut = _make(bases[bname], layouts[bname], f"{m.name}@{bname}", m.description, m.expect,
                        m.fn, seed)
            if mut is not None:
                yield mut


def random_flips(bases: dict[str, Base], seed: int = 0, start: int = 0) -> Iterator[Mutant]:
    """An endless deterministic stream of bit-flip mutants, cycling through the bases."""
    layouts = _layouts(bases)
    names = sorted(bases)
    i = start
    while True:
        bname = names[i % len(names)]

        def fn(base: Base, lay: Layout, buf: _Buf, rng: random.Random) -> str:
            _flip_mutant(base, lay, buf, rng)
            return ""

        mut = _make(bases[bname], layouts[bname], f"flip-{i}@{bname}",
                    "random bit flips in metadata clusters", frozenset(), fn, seed)
        if mut is not None:
            yield mut
        i += 1


def iter_corpus(bases: dict[str, Base], count: int, seed: int = 0) -> Iterator[Mutant]:
    """``count`` mutants, lazily: the targeted ones first, then random flips to make up the number."""
    return itertools.islice(itertools.chain(targeted(bases, seed), random_flips(bases, seed)), count)


def corpus(bases: dict[str, Base], count: int, seed: int = 0) -> list[Mutant]:
    """``iter_corpus`` as a list, for callers that need every mutant at once."""
    return list(iter_corpus(bases, count, seed))


_LAYOUT_CACHE: dict[tuple[str, str], Layout] = {}


def _layouts(bases: dict[str, Base]) -> dict[str, Layout]:
    out = {}
    for name, b in bases.items():
        key = (name, hashlib.sha256(b.data).hexdigest())
        if key not in _LAYOUT_CACHE:
            tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"qcow2lab-layout-{os.getpid()}-{name}.qcow2"
            tmp.write_bytes(b.data)
            try:
                _LAYOUT_CACHE[key] = layout_of(tmp)
            except Qcow2Error as e:  # a base QEMU wrote must read cleanly
                raise RuntimeError(f"base {name} does not read: {e}") from e
            finally:
                tmp.unlink()
        out[name] = _LAYOUT_CACHE[key]
    return out


# --- QEMU's verdict ---------------------------------------------------------------------------

@dataclass
class Verdict:
    kind: str
    exit_code: int | None
    report: dict[str, Any] | None
    stderr: str


def qemu_verdict(path: str | os.PathLike[str], *, oracle: str = "check", timeout: float = 60) -> Verdict:
    """Run ``qemu-img check --output=json`` and classify the outcome (see the module doc).

    qemu-img prints the JSON report only when it could open the image; without one, a
    non-zero exit means it refused the image at open. ``oracle="chain"`` asks
    ``qemu-img info --backing-chain`` instead (refused or clean), for backing loops.
    """
    if shutil.which("qemu-img") is None:
        raise RuntimeError("qemu-img is not installed")
    if oracle == "chain":
        r = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json", str(path)],
                           capture_output=True, text=True, errors="replace",
                           timeout=timeout)
        return Verdict("clean" if r.returncode == 0 else "refused", r.returncode, None, r.stderr)
    try:
        r = subprocess.run(["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)],
                           capture_output=True, text=True, errors="replace",
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return Verdict("hang", None, None, "")
    try:
        report = json.loads(r.stdout) if r.stdout.strip() else None
    except json.JSONDecodeError:
        report = None
    if report is None:
        kind = "clean" if r.returncode == 0 else "refused"
    else:
        kind = {0: "clean", 1: "check-errors", 2: "corruptions", 3: "leaks"}.get(r.returncode, "check-errors")
    return Verdict(kind, r.returncode, report, r.stderr)
