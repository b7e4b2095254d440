"""check() and check(repair=...) against qemu-img check on an engine-written image."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from tests.conformance.helpers import KiB, MiB, check_json, clean, set_refcount


def test_check_agrees_with_qemu_img_check(engine: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "k.qcow2"
    engine.create(path, 4 * MiB)
    with engine.open(path) as img:
        img.write(0, b"q" * 300 * KiB)
        img.snapshot_create("s")
        img.write(0, b"r" * 100 * KiB)
    ours = engine.check(path)
    assert ours.exit_code == 0 and ours.corruptions == 0 and ours.leaks == 0
    theirs = check_json(path)
    assert ours.allocated_clusters == theirs["allocated-clusters"]
    assert ours.image_end_offset == theirs["image-end-offset"]
    with open(path, "ab") as f:  # a leaked cluster: refcount 1, referenced by nothing
        f.write(bytes(65536))
    set_refcount(path, path.stat().st_size - 65536, 1)
    assert engine.check(path).leaks == 1 == check_json(path)["leaks"]
    fixed = engine.check(path, repair="leaks")
    assert fixed.leaks_fixed == 1
    assert clean(path)
