"""Feature bits at open (qcow2.rst, "Header": incompatible, compatible and autoclear
features), encryption, and lazy refcounts with the dirty bit they rely on."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pytest

from spec import features as ft
from spec.errors import RequestError, UnsupportedFeature, WrongKey
from spec.image import open_image
from tests.conformance.helpers import (
    MiB,
    Step,
    clean,
    pair,
    qemu_io_failures,
    qemu_map,
    run_steps,
    set_header_u64,
)
from tests.qemu import qemu_io, raw_content


def test_image_declaring_encryption_needs_its_key(engine: ModuleType, qemu_images: dict[str, Path]) -> None:
    """No key: RequestError (QEMU: "Parameter 'encrypt.key-secret' is required for cipher")."""
    with pytest.raises(RequestError) as e:
        engine.open(qemu_images["luks"])
    assert not isinstance(e.value, WrongKey)


def test_feature_bits(engine: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "f.qcow2"
    engine.create(path, MiB)
    set_header_u64(path, 72, 1 << 40)       # unknown incompatible bit
    with pytest.raises(UnsupportedFeature):
        engine.open(path, readonly=True)
    set_header_u64(path, 72, 0)
    set_header_u64(path, 88, (1 << 40) | ft.QCOW2_AUTOCLEAR_BITMAPS)  # unknown + bitmaps autoclear
    with engine.open(path, readonly=True):
        pass
    assert open_image(path).autoclear_features == (1 << 40) | ft.QCOW2_AUTOCLEAR_BITMAPS
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(path, theirs)
    qemu_io(theirs, "read -q 0 512")
    with engine.open(path):
        pass
    # A read-write open clears the unknown autoclear bits and keeps the bitmaps bit, even with
    # no bitmaps extension (QCOW2_AUTOCLEAR_MASK; spec/bitmap_store.py), as QEMU does.
    assert open_image(path).autoclear_features == open_image(theirs).autoclear_features \
        == ft.QCOW2_AUTOCLEAR_BITMAPS
    # With that bit and no extension QEMU checks every write against a bitmap directory at
    # (0, 0) and refuses it (tests/conformance/test_bitmaps_kept.py): clear it to go on.
    set_header_u64(path, 88, 0)
    set_header_u64(path, 80, 1 << 33)        # unknown compatible bit: ignored
    with engine.open(path) as img:
        img.write(0, b"ok")
    assert clean(path)


def test_lazy_refcounts_dirty_image_is_repaired_on_read_write_open(
        engine: ModuleType, qemu_images: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "dirty.qcow2"
    shutil.copy(qemu_images["lazy-dirty"], path)
    assert open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_DIRTY
    content = raw_content(path)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(path, theirs)
    qemu_io(theirs, "read 0 1")  # QEMU repairs a dirty image when it opens it read-write
    with engine.open(path) as img:
        assert img.read(0, img.size) == content
    assert not open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_DIRTY
    assert clean(path)
    assert raw_content(path) == content
    assert path.read_bytes() == theirs.read_bytes()  # same rebuilt refcount structure


def test_lazy_refcounts_set_the_dirty_bit_while_open(engine: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "lazy.qcow2"
    engine.create(path, MiB, lazy_refcounts=True)
    with engine.open(path) as img:
        img.write(0, b"x")
        assert open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_DIRTY
    assert not open_image(path).incompatible_features & ft.QCOW2_INCOMPAT_DIRTY
    assert clean(path)


def test_lazy_refcounts_leave_the_map_qemu_leaves(engine: ModuleType, tmp_path: Path) -> None:
    """With lazy refcounts QEMU's flush keeps refcount blocks in its cache; after the close
    the file's refcounts decide qcow2_detect_metadata_preallocation, so qemu-img map of the
    engine's file and of QEMU's must agree (zero=true,data=true against data only at the
    tail of a partly written cluster; a difftest seed-0 divergence of the quick profile).
    The second compressed write, to an allocated cluster, fails in both."""
    q, m = pair(tmp_path, "", "", 524288, lazy_refcounts=True)
    steps: list[Step] = [("compress", 0, 65536, 0), ("flush", 0, 0, 0), ("write", 262144, 153382, 0),
                         ("compress", 0, 65536, 0)]
    with engine.open(m) as img:
        cmds, refused = run_steps(img, tmp_path, steps)
        extents = img.map()
    assert refused == 1
    assert qemu_io_failures(q, *cmds) == 1
    assert qemu_map(m) == qemu_map(q)
    assert extents == qemu_map(q)
    assert m.read_bytes() == q.read_bytes()
