"""Backing files: chains of qcow2 and raw files, relative names, shorter and longer backing
files, and a backing file whose data does not decode."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from spec import features as ft
from spec.entries import compressed_range
from spec.errors import CorruptionError, FormatError
from spec.image import open_image
from tests.conformance.helpers import KiB, MiB, base, clean, l2_entry, pair, qemu_io_fails
from tests.qemu import create as qemu_create
from tests.qemu import qemu_img, qemu_io, raw_content


def test_overlay_longer_than_its_backing_file(engine: ModuleType, tmp_path: Path) -> None:
    base(tmp_path, size=1 * MiB + 512)
    top = tmp_path / "top.qcow2"
    engine.create(top, 3 * MiB, backing_file="base.qcow2", backing_fmt="qcow2")
    with engine.open(top) as img:
        # A write whose cluster straddles the backing file's end copies what is below
        # the end and zeros beyond it.
        img.write(MiB + 4 * KiB, b"\x01" * 512)
        data = img.read(0, img.size)
        extents = img.map()
    assert data == raw_content(top)
    assert data[MiB:MiB + 512] == b"\xaa" * 512
    assert data[MiB + 512:MiB + 4 * KiB] == bytes(4 * KiB - 512)
    assert data[2 * MiB:] == bytes(MiB)
    assert extents == json.loads(qemu_img("map", "--output=json", str(top)).stdout)
    assert clean(top)


def test_missing_backing_file_fails_at_open(engine: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "top.qcow2"
    engine.create(path, MiB, backing_file="nowhere.qcow2", backing_fmt="qcow2")
    with pytest.raises(FormatError):
        engine.open(path)


def test_raw_backing_chain_and_relative_names(engine: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x07" * 300 * KiB)
    mid = tmp_path / "d" / "mid.qcow2"
    engine.create(mid, MiB, backing_file="../base.raw", backing_fmt="raw")
    with engine.open(mid) as img:
        img.write(128 * KiB, b"\x08" * 1000)
    top = tmp_path / "d" / "top.qcow2"
    engine.create(top, 2 * MiB, backing_file="mid.qcow2", backing_fmt="qcow2")
    with engine.open(top) as img:
        img.write(0, b"\x09" * 10)
        data = img.read(0, img.size)
        extents = img.map()
    assert data == raw_content(top)
    assert extents == json.loads(qemu_img("map", "--output=json", str(top)).stdout)


def test_undecodable_backing_cluster_fails_requests_without_flagging_like_qemu(
        engine: ModuleType, tmp_path: Path) -> None:
    """A compressed cluster of the backing file that does not decode fails reads and COW
    writes of the overlay with EIO; QEMU flags neither image (qcow2_co_preadv_compressed).
    The model once flagged the overlay corrupt, because the backing image's CorruptionError
    reached the overlay's guard as if its own tables were bad."""
    b = qemu_create(tmp_path / "base.qcow2", 64 * KiB, cluster_size=4096)
    qemu_io(b, "write -q -c -P 0x11 4096 4096")
    coff, csize = compressed_range(l2_entry(b, 4096), 12)
    with open(b, "r+b") as f:
        f.seek(coff)
        f.write(b"\xff" * csize)
    q, m = pair(tmp_path, "base.qcow2", "qcow2", 64 * KiB, cluster_size=4096)
    msg = qemu_io_fails(q, "write -P 1 4096 512")
    assert "Input/output error" in msg
    with engine.open(m) as img:
        with pytest.raises(CorruptionError):
            img.read(4096, 512)
        with pytest.raises(CorruptionError):
            img.write(4096, b"\x01" * 512)
        assert img.read(0, 512) == bytes(512)  # still serving requests: not flagged
    assert m.read_bytes() == q.read_bytes()
    assert not open_image(m).header.v3.incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT
