"""The catalogue of test images that QEMU writes, plus the shared corpus.

Each builder makes one image (and whatever it needs beside it) with qemu-img and qemu-io,
so every structure the schemas describe appears in at least one real file:
v2 with a backing file, v3, every refcount width, 512 B and 2 MiB clusters, extended L2,
zstd and deflate compression, internal snapshots, a persistent bitmap, external data files
and LUKS. tests/conftest.py builds them once per session.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.qemu import SECRET_ARGS, create, qemu_img, qemu_io


def _corpus() -> Path:
    """The shared corpus: $QCOW2LAB_CORPUS, else ../shared/corpus beside the checkout, else
    /work/shared/corpus (a clone made elsewhere, as CI's may be, still finds it)."""
    here = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
    for cand in (os.environ.get("QCOW2LAB_CORPUS"), here, "/work/shared/corpus"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return here


CORPUS = _corpus()

Builder = Callable[[Path], Path]
BUILDERS: dict[str, Builder] = {}


def builder(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        return fn
    return deco


def _pattern_writes(path: Path, cluster: int, extra: tuple[str, ...] = ()) -> None:
    qemu_io(path, f"write -P 0x11 0 {cluster}", f"write -P 0x22 {3 * cluster + 100} 700",
            f"write -z {5 * cluster} {cluster}", f"write -P 0x33 {9 * cluster} {2 * cluster}",
            f"discard {9 * cluster} {cluster}", extra=extra)


@builder("v2-backing")
def v2_backing(d: Path) -> Path:
    base = create(d / "v2-base.qcow2", "4M", compat="0.10")
    qemu_io(base, "write -P 0xaa 0 4M")
    top = create(d / "v2-backing.qcow2", "8M", backing="v2-base.qcow2", compat="0.10")
    qemu_io(top, "write -P 0x55 64k 64k", "write -z 128k 64k", "write -P 0x66 5M 4k")
    return top


@builder("v3")
def v3(d: Path) -> Path:
    p = create(d / "v3.qcow2", "16M")
    _pattern_writes(p, 65536)
    return p


for _bits in (1, 2, 4, 8, 16, 32, 64):
    def _mk(d: Path, bits: int = _bits) -> Path:
        p = create(d / f"refcount-{bits}.qcow2", "8M", refcount_bits=bits, cluster_size=4096)
        _pattern_writes(p, 4096)
        return p
    BUILDERS[f"refcount-bits-{_bits}"] = _mk


@builder("cluster-512")
def cluster_512(d: Path) -> Path:
    p = create(d / "cluster-512.qcow2", "2M", cluster_size=512)
    _pattern_writes(p, 512)
    return p


@builder("cluster-2M")
def cluster_2m(d: Path) -> Path:
    p = create(d / "cluster-2M.qcow2", "64M", cluster_size=2 * 1024 * 1024)
    _pattern_writes(p, 2 * 1024 * 1024)
    return p


@builder("extended-l2")
def extended_l2(d: Path) -> Path:
    base = create(d / "extl2-base.qcow2", "4M")
    qemu_io(base, "write -P 0xbb 0 4M")
    p = create(d / "extended-l2.qcow2", "4M", backing="extl2-base.qcow2", extended_l2=True,
               cluster_size=65536)
    qemu_io(p, "write -P 0x01 0 2k", "write -P 0x02 6k 4k", "write -z 12k 2k",
            "write -P 0x03 64k 64k", "write -z 128k 8k", "discard 192k 64k", "write -P 0x04 300k 1k")
    return p


@builder("zstd-compressed")
def zstd_compressed(d: Path) -> Path:
    p = create(d / "zstd.qcow2", "4M", compression_type="zstd")
    qemu_io(p, "write -c -P 0x41 0 64k", "write -c -P 0x42 64k 64k", "write -P 0x43 128k 64k")
    return p


@builder("deflate-compressed")
def deflate_compressed(d: Path) -> Path:
    raw = d / "deflate-src.raw"
    with raw.open("wb") as f:
        for i in range(64):
            f.write(bytes([i]) * 4096 + bytes(range(256)) * 16 + b"qcow2lab" * 512)
    out = d / "deflate.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", str(raw), str(out))
    return out


@builder("snapshots")
def snapshots(d: Path) -> Path:
    p = create(d / "snapshots.qcow2", "4M")
    qemu_io(p, "write -P 0x10 0 128k")
    qemu_img("snapshot", "-c", "first", str(p))
    qemu_io(p, "write -P 0x20 64k 128k")
    qemu_img("snapshot", "-c", "second", str(p))
    qemu_io(p, "write -z 0 64k")
    return p


@builder("bitmap")
def bitmap(d: Path) -> Path:
    p = create(d / "bitmap.qcow2", "4M")
    qemu_io(p, "write -P 0x77 0 64k")
    qemu_img("bitmap", "--add", str(p), "dirty0")
    qemu_img("bitmap", "--add", "-g", "128k", str(p), "dirty1")
    qemu_io(p, "write -P 0x78 1M 64k")
    return p


@builder("data-file")
def data_file(d: Path) -> Path:
    p = create(d / "data-file.qcow2", "4M", data_file="data-file.data")
    qemu_io(p, "write -P 0x61 0 64k", "write -P 0x62 1M 4k")
    return p


@builder("data-file-raw")
def data_file_raw(d: Path) -> Path:
    p = create(d / "data-file-raw.qcow2", "4M", data_file="data-file-raw.data", data_file_raw=True)
    qemu_io(p, "write -P 0x63 0 64k")
    return p


@builder("luks")
def luks(d: Path) -> Path:
    return create(d / "luks.qcow2", "4M", extra=tuple(SECRET_ARGS), **{"encrypt.format": "luks",
                  "encrypt.key-secret": "sec0", "encrypt.iter-time": 10})


@builder("lazy-dirty")
def lazy_dirty(d: Path) -> Path:
    """Lazy refcounts left dirty: qemu-io aborts before the clean close."""
    p = create(d / "lazy-dirty.qcow2", "4M", lazy_refcounts=True)
    # abort kills qemu-io before its clean close; the dirty image it leaves is the point.
    with contextlib.suppress(subprocess.CalledProcessError):
        qemu_io(p, "write -P 0x5a 0 64k", "abort")
    return p


def corpus_images() -> list[Path]:
    return sorted(CORPUS.glob("*.qcow2"))
