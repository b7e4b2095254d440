"""impl against qemu-io: the same requests on the same starting image give the same file,
byte for byte (``cmp``), for several configurations and L2 cache entry sizes; and impl's
own create() writes what ``qemu-img create`` writes."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import impl
from spec.features import QCOW2_INCOMPAT_DIRTY
from spec.image import open_image
from tests.qemu import create as qemu_create
from tests.qemu import qemu_img

K, M = 1 << 10, 1 << 20

CONFIGS: dict[str, dict[str, Any]] = {
    "v3-64k": {"cluster_size": 65536},
    "v2-64k": {"version": 2, "cluster_size": 65536},
    "v3-512-rc1": {"cluster_size": 512, "refcount_bits": 1},
    "v3-4k-rc64": {"cluster_size": 4096, "refcount_bits": 64},
    "v3-1k-rc4": {"cluster_size": 1024, "refcount_bits": 4},
    "v3-extl2-64k": {"cluster_size": 65536, "extended_l2": True},
    "v3-extl2-32k-zstd": {"cluster_size": 32768, "extended_l2": True, "compression_type": "zstd"},
    "v3-2m": {"cluster_size": 2 * M},
    "v3-lazy": {"cluster_size": 65536, "lazy_refcounts": True},
}


def _ops(cs: int, size: int) -> list[tuple[str, ...]]:
    """qemu-io commands; offsets scale with the cluster size so that every configuration
    sees partial clusters, COW on both sides, zeroing, discard and compression."""
    return [
        ("write", "-P", "0x11", "0", "4096"),
        ("write", "-P", "0x22", str(cs - 100), str(cs + 300)),
        ("write", "-P", "0x33", str(5 * cs + 512), "512"),
        ("write", "-z", str(8 * cs), str(2 * cs)),
        ("write", "-z", "-u", "0", str(cs)),
        ("discard", str(5 * cs), str(cs)),
        ("write", "-P", "0x44", str(12 * cs + 1024), str(3 * cs)),
        ("write", "-c", "-P", "0x55", str(20 * cs), str(cs)),
        ("write", "-P", "0x66", str(size - cs - 1), "2"),
        ("write", "-z", str(12 * cs + 2048), "1024"),
        ("write", "-P", "0x77", str(20 * cs + 512), "512"),
    ]


def _impl_apply(img: impl.Image, op: tuple[str, ...]) -> None:
    args = list(op[1:])
    if op[0] == "discard":
        img.discard(int(args[0]), int(args[1]))
        return
    if "-z" in args:
        unmap = "-u" in args
        off, n = (int(a) for a in args if not a.startswith("-"))
        img.write_zeroes(off, n, unmap=unmap)
        return
    pat = int(args[args.index("-P") + 1], 16)
    off, n = int(args[-2]), int(args[-1])
    if "-c" in args:
        img.write_compressed(off, bytes([pat]) * n)
    else:
        img.write(off, bytes([pat]) * n)


def _qemu_apply(path: Path, ops: list[tuple[str, ...]], entry_size: int | None) -> None:
    spec = f"driver=qcow2,file.filename={path}"
    if entry_size:
        spec += f",l2-cache-entry-size={entry_size}"
    argv = ["qemu-io", "-t", "unsafe", "--image-opts", spec]
    for op in ops:
        argv += ["-c", " ".join(op)]
    r = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=path.parent)
    assert "failed" not in r.stdout and "error" not in r.stdout.lower(), r.stdout


def _qopts(opts: dict[str, Any]) -> dict[str, Any]:
    """impl.create's keywords as qemu-img create -o names."""
    out = dict(opts)
    version = out.pop("version", 3)
    out["compat"] = "0.10" if version == 2 else "1.1"
    return out


def _check_clean(path: Path) -> None:
    r = qemu_img("check", str(path), check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_create_matches_qemu_img(tmp_path: Path, name: str) -> None:
    opts = CONFIGS[name]
    q = qemu_create(tmp_path / "q.qcow2", 64 * M, **_qopts(opts))
    impl.create(tmp_path / "i.qcow2", 64 * M, **opts)
    assert filecmp.cmp(q, tmp_path / "i.qcow2", shallow=False)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_requests_match_qemu_io(tmp_path: Path, name: str) -> None:
    opts = CONFIGS[name]
    cs = opts["cluster_size"]
    size = max(64 * M, 32 * cs)
    q = qemu_create(tmp_path / "q.qcow2", size, **_qopts(opts))
    i = tmp_path / "i.qcow2"
    shutil.copy(q, i)
    ops = _ops(cs, size)
    _qemu_apply(q, ops, None)
    with impl.open(i, cache="unsafe") as img:
        for op in ops:
            _impl_apply(img, op)
    _check_clean(i)
    assert filecmp.cmp(q, i, shallow=False)


@pytest.mark.parametrize("entry_size", [512, 4096, 16384])
@pytest.mark.parametrize("extended_l2", [False, True])
def test_slice_sizes_match_qemu_io(tmp_path: Path, entry_size: int, extended_l2: bool) -> None:
    """Requests are cut at slice ends as QEMU cuts them; with 4 KiB slices of a 64 KiB
    table a slice maps 32 MiB (16 MiB with extended entries), so writes across those
    boundaries take two pieces."""
    cs = 65536
    per_slice = entry_size // (16 if extended_l2 else 8) * cs
    size = 5 * per_slice
    q = qemu_create(tmp_path / "q.qcow2", size, cluster_size=cs, extended_l2=extended_l2)
    i = tmp_path / "i.qcow2"
    shutil.copy(q, i)
    ops = [
        ("write", "-P", "0x21", str(per_slice - 3000), "9000"),
        ("write", "-P", "0x22", str(3 * per_slice - cs - 7), str(2 * cs + 14)),
        ("write", "-z", str(2 * per_slice - cs), str(3 * cs)),
        ("discard", str(per_slice - cs), str(2 * cs)),
        ("write", "-P", "0x23", str(4 * per_slice - 512), str(4 * cs)),
    ]
    _qemu_apply(q, ops, entry_size)
    with impl.open(i, cache="unsafe", l2_cache_entry_size=entry_size) as img:
        for op in ops:
            _impl_apply(img, op)
    _check_clean(i)
    assert filecmp.cmp(q, i, shallow=False)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_backing_chain_matches_qemu_io(tmp_path: Path, fmt: str) -> None:
    cs = 65536
    base = tmp_path / f"base.{fmt}"
    if fmt == "raw":
        base.write_bytes(bytes(range(256)) * (3 * M // 256))  # shorter than the overlay
    else:
        qemu_create(base, 3 * M, cluster_size=4096)
        subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 3M", str(base)], check=True,
                       capture_output=True)
    q = qemu_create(tmp_path / "q.qcow2", 8 * M, backing=base.name, backing_fmt=fmt,
                    cluster_size=cs)
    i = tmp_path / "i.qcow2"
    impl.create(i, 8 * M, cluster_size=cs, backing_file=base.name, backing_fmt=fmt)
    assert filecmp.cmp(q, i, shallow=False)
    ops = _ops(cs, 8 * M)
    _qemu_apply(q, ops, None)
    with impl.open(i, cache="unsafe") as img:
        for op in ops:
            _impl_apply(img, op)
        got = img.read(0, 8 * M)
    _check_clean(i)
    assert filecmp.cmp(q, i, shallow=False)
    with impl.open(q, readonly=True) as qimg:
        assert qimg.read(0, 8 * M) == got


def test_dirty_lazy_refcount_image_is_repaired_as_qemu_repairs_it(tmp_path: Path) -> None:
    q = qemu_create(tmp_path / "q.qcow2", 4 * M, lazy_refcounts=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x5b 1M 4k", "-c", "abort",
                    str(q)], capture_output=True)
    i = tmp_path / "i.qcow2"
    shutil.copy(q, i)
    with open_image(i) as f:
        assert f.incompatible_features & QCOW2_INCOMPAT_DIRTY
    subprocess.run(["qemu-io", "-c", "write -P 0x11 2M 512", str(q)], check=True, capture_output=True)
    with impl.open(i) as img:
        img.write(2 * M, b"\x11" * 512)
    _check_clean(i)
    assert filecmp.cmp(q, i, shallow=False)


def test_check_is_the_shared_engine(tmp_path: Path) -> None:
    p = tmp_path / "a.qcow2"
    impl.create(p, 4 * M)
    with impl.open(p) as img:
        img.write(0, b"x" * 70000)
    r = impl.check(p)
    assert (r.exit_code, r.allocated_clusters) == (0, 2)


def test_slice_cut_lets_a_refcount_block_split_the_allocation(tmp_path: Path) -> None:
    """With 512-byte slices (64 entries of 1 KiB clusters) a 70000-byte write is two
    allocations, as QEMU cuts it (handle_alloc stops at the slice end). The first one needs
    a new refcount block, which lands right after its clusters, so the second piece is
    not contiguous; with whole-table slices QEMU allocates all 69 clusters in one go."""
    q = qemu_create(tmp_path / "q.qcow2", 4 * M, cluster_size=1024, refcount_bits=32)
    i = tmp_path / "i.qcow2"
    shutil.copy(q, i)
    ops = [("write", "-P", "0x01", str(M), str(240 * K)), ("write", "-P", "0x02", "0", "70000")]
    _qemu_apply(q, ops, 512)
    with impl.open(i, cache="unsafe", l2_cache_entry_size=512) as img:
        for op in ops:
            _impl_apply(img, op)
        extents = img.map(0, 70656)
    assert filecmp.cmp(q, i, shallow=False)
    assert [e["length"] for e in extents] == [65536, 5120]
    assert extents[1]["offset"] != extents[0]["offset"] + 65536


@pytest.mark.parametrize("opts", [{"cluster_size": 65536}, {"cluster_size": 4096, "refcount_bits": 2},
                                  {"cluster_size": 65536, "extended_l2": True}])
def test_metadata_preallocation_matches_qemu_img(tmp_path: Path, opts: dict[str, Any]) -> None:
    q = qemu_create(tmp_path / "q.qcow2", 40 * M, preallocation="metadata", **opts)
    impl.create(tmp_path / "i.qcow2", 40 * M, preallocation="metadata", **opts)
    assert filecmp.cmp(q, tmp_path / "i.qcow2", shallow=False)


def test_data_file_matches_qemu_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # QEMU 7.2 resolves a relative data file name against the working directory.
    monkeypatch.chdir(tmp_path)
    q = qemu_create(tmp_path / "q.qcow2", 8 * M, data_file="q.data", cluster_size=65536)
    i = tmp_path / "i.qcow2"
    impl.create(i, 8 * M, data_file=str(tmp_path / "i.data"), cluster_size=65536)
    ops = [op for op in _ops(65536, 8 * M) if "-c" not in op]
    _qemu_apply(q, ops, None)
    with impl.open(i, cache="unsafe") as img:
        for op in ops:
            _impl_apply(img, op)
    assert filecmp.cmp(tmp_path / "q.data", tmp_path / "i.data", shallow=False)
    with impl.open(q, readonly=True) as a, impl.open(i, readonly=True) as b:
        assert a.read(0, 8 * M) == b.read(0, 8 * M)
        assert a.map() == b.map()
