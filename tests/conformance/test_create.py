"""create() writes the file ``qemu-img create`` writes, and refuses what it refuses."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from spec.errors import RequestError
from spec.image import open_image
from tests.conformance.helpers import KiB, MiB, base, clean
from tests.qemu import create as qemu_create
from tests.qemu import qemu_img, qemu_io, raw_content


@pytest.mark.parametrize("kwargs", [
    {"version": 4}, {"cluster_size": 1000}, {"cluster_size": 256}, {"refcount_bits": 3},
    {"version": 2, "refcount_bits": 8}, {"extended_l2": True, "cluster_size": 4096},
    {"compression_type": "lz4"}, {"version": 2, "lazy_refcounts": True}, {"backing_fmt": "qcow2"},
    {"data_file_raw": True}, {"preallocation": "sparse"},
])
def test_create_refuses_what_qemu_refuses(engine: ModuleType, tmp_path: Path,
                                          kwargs: dict[str, object]) -> None:
    with pytest.raises(RequestError):
        engine.create(tmp_path / "x.qcow2", MiB, **kwargs)


@pytest.mark.parametrize("opts", [
    {}, {"version": 2}, {"cluster_size": 512}, {"cluster_size": 4096, "refcount_bits": 64},
    {"cluster_size": 2 * MiB}, {"extended_l2": True}, {"compression_type": "zstd"},
    {"lazy_refcounts": True}, {"preallocation": "metadata"},
])
def test_create_matches_qemu_img_create(engine: ModuleType, tmp_path: Path, opts: dict[str, Any]) -> None:
    m = tmp_path / "m.qcow2"
    engine.create(m, 64 * MiB + 512, **opts)
    qopts = {k: v for k, v in opts.items() if k != "version"}
    if opts.get("version") == 2:
        qopts["compat"] = "0.10"
    q = qemu_create(tmp_path / "q.qcow2", 64 * MiB + 512, **qopts)
    assert m.read_bytes() == q.read_bytes()
    info = json.loads(qemu_img("info", "--output=json", str(m)).stdout)
    assert info["virtual-size"] == 64 * MiB + 512
    assert clean(m)
    with engine.open(m, readonly=True) as img:
        assert img.info()["virtual-size"] == 64 * MiB + 512
        assert img.map() == json.loads(qemu_img("map", "--output=json", str(m)).stdout)


def test_v2_image_with_header_extensions(engine: ModuleType, tmp_path: Path) -> None:
    """A v2 header is 72 bytes, yet extensions (here the backing format) follow it."""
    base(tmp_path)
    m = tmp_path / "m.qcow2"
    engine.create(m, 4 * MiB, version=2, backing_file="base.qcow2", backing_fmt="qcow2")
    q = qemu_create(tmp_path / "q.qcow2", "4M", backing="base.qcow2", compat="0.10")
    assert m.read_bytes() == q.read_bytes()
    img_file = open_image(m)
    try:
        assert img_file.version == 2 and img_file.backing_format == "qcow2"
    finally:
        img_file.close()
    with engine.open(m) as img:
        img.write(100 * KiB, b"\x02" * 3000)
        img.write_zeroes(0, 64 * KiB)  # v2 with backing: written as data
    qemu_io(q, "write -P 2 102400 3000", "write -z 0 65536")
    assert m.read_bytes() == q.read_bytes()
    assert raw_content(m) == raw_content(q)


@pytest.mark.parametrize("version", [2, 3])
def test_create_512_byte_clusters_with_raw_backing_matches_qemu(engine: ModuleType, tmp_path: Path,
                                                                version: int) -> None:
    """v3 images with clusters of 4 KiB or less carry no feature name table
    (qcow2_update_header), so the header, the backing format and the name fit in 512 bytes."""
    (tmp_path / "base.raw").write_bytes(b"\xb1" * 4096)
    q = qemu_create(tmp_path / "q.qcow2", 4096, backing="base.raw", backing_fmt="raw",
                    cluster_size=512, compat="1.1" if version == 3 else "0.10")
    m = tmp_path / "m.qcow2"
    engine.create(m, 4096, version=version, cluster_size=512, backing_file="base.raw", backing_fmt="raw")
    assert m.read_bytes() == q.read_bytes()
    with engine.open(m) as img:
        assert img.read(0, 4096) == b"\xb1" * 4096


@pytest.mark.parametrize(("cluster_size", "extended_l2"), [(64 * KiB, True), (16 * KiB, True),
                                                           (64 * KiB, False)])
def test_metadata_preallocation_ends_the_file_at_a_subcluster_like_qemu(
        engine: ModuleType, tmp_path: Path, cluster_size: int, extended_l2: bool) -> None:
    """preallocate_co extends the file to the end of the last allocation, which with
    extended L2 entries is the last subcluster, not the whole cluster."""
    size = 3 * cluster_size + 512
    q = qemu_create(tmp_path / "q.qcow2", size, cluster_size=cluster_size, extended_l2=extended_l2,
                    preallocation="metadata")
    m = tmp_path / "m.qcow2"
    engine.create(m, size, cluster_size=cluster_size, extended_l2=extended_l2, preallocation="metadata")
    assert m.read_bytes() == q.read_bytes()
