"""Whatever a file claims, only spec.errors classes leave the model (DESIGN.md, "Errors").

A model-written image with snapshots, compressed and zero clusters is damaged byte by byte
in its header, refcount structures and tables; every public operation then either works or
raises a Qcow2Error subclass. Derandomized, so the damage is the same on every run.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import pytest

import model
from spec.errors import Qcow2Error

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("pristine") / "src.qcow2"
    model.create(path, 4 * MiB, cluster_size=4096)
    with model.open(path) as img:
        img.write(0, b"a" * 100000)
        img.write_compressed(200 * KiB, b"b" * 4096)
        img.write_zeroes(50000, 30000)
        img.snapshot_create("s")
        img.write(10000, b"c" * 9000)
    return path.read_bytes()


def _exercise(path: Path) -> None:
    try:
        with model.open(path) as img:
            img.read(0, img.size)
            img.map()
            img.snapshots()
            img.write(3000, b"z" * 20000)
            img.write_zeroes(0, 8192)
            img.discard(0, 65536)
            img.write_compressed(4096 * 50, b"q" * 4096)
            img.snapshot_create("t")
            img.snapshot_apply("s")
            img.snapshot_delete("t")
            img.resize(8 * MiB)
    except Qcow2Error:
        pass
    with contextlib.suppress(Qcow2Error):
        model.check(path)


@pytest.mark.parametrize("seed", range(40))
def test_damaged_images_raise_only_spec_errors(pristine: bytes, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    data = bytearray(pristine)
    regions = [(0, 200), (4096, 8192), (8192, 12288), (12288, 16384), (16384, 24576), (0, len(data))]
    for _ in range(rng.randint(1, 6)):
        lo, hi = rng.choice(regions)
        data[rng.randrange(lo, min(hi, len(data)))] = rng.randrange(256)
    path = tmp_path / "x.qcow2"
    path.write_bytes(bytes(data))
    _exercise(path)  # any other exception fails the test
