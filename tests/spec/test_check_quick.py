"""spec/rules/quick.py, the numpy-free proof that a small image is clean, against the full walk.

``check`` asks the proof first and takes the full walk when it says "don't know". It must
never say "clean" where the full walk finds anything, nor report other counters: every test
image, 600 damaged ones from the fuzz corpus (whose bases mostly take the full walk at once)
and 1,200 bit flips in the metadata of images the proof does walk are checked both ways, and
the results compared whole (JSON, exit code, findings). It must also say "clean" where it is
meant to, or the start-up it exists for is lost.
"""

from __future__ import annotations

import importlib
import random
import struct
from pathlib import Path

import pytest

from difftest.corpus.mutate import build_bases, iter_corpus
from spec.image import open_image
from spec.interface import CheckResult
from spec.rules.quick import clean_small_image
from tests.qemu import create, qemu_io

# The module, not the package's ``check`` function of the same name.
rc = importlib.import_module("spec.rules.check")


def both_ways(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CheckResult, CheckResult]:
    fast = rc.check(path)
    with monkeypatch.context() as m:
        m.setattr(rc, "clean_small_image", lambda img: None)
        full = rc.check(path)
    return fast, full


def same(a: CheckResult, b: CheckResult) -> bool:
    return (a.to_json(), a.exit_code, a.findings) == (b.to_json(), b.exit_code, b.findings)


def proven_clean(path: Path) -> bool:
    try:
        with open_image(path, check_mode=True) as img:
            return clean_small_image(img) is not None
    except Exception:
        return False


def test_agrees_with_the_full_walk_on_every_test_image(qemu_images: dict[str, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    proven = []
    for name, path in qemu_images.items():
        fast, full = both_ways(path, monkeypatch)
        assert same(fast, full), name
        if proven_clean(path):
            proven.append(name)
            assert full.exit_code == 0 and not full.findings, name
    assert {"v3", "cluster-512", "refcount-bits-8", "refcount-bits-64"} <= set(proven), proven


@pytest.mark.parametrize("opts,writes", [
    ({}, []),
    ({}, ["write -P 0x11 0 64k", "write -P 0x22 1M 300k", "write -z 2M 64k"]),
    ({"extended_l2": True}, ["write -P 0x11 0 4k", "write -P 0x22 100k 200k", "discard 100k 32k"]),
    ({"cluster_size": 512}, ["write -P 0x11 0 3k", "write -P 0x22 2M 8k"]),
    ({"refcount_bits": 64}, ["write -P 0x11 0 64k"]),
    ({"refcount_bits": 8, "cluster_size": 4096}, ["write -P 0x33 1M 1M"]),
])
def test_proves_simple_clean_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    opts: dict[str, object], writes: list[str]) -> None:
    path = create(tmp_path / "clean.qcow2", "5M", **opts)
    if writes:
        qemu_io(path, *writes)
    assert proven_clean(path)
    fast, full = both_ways(path, monkeypatch)
    assert same(fast, full) and fast.exit_code == 0


def test_agrees_with_the_full_walk_on_damaged_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bases = build_bases(tmp_path)
    for i, mutant in enumerate(iter_corpus(bases, 600, seed=3)):
        path = mutant.write(tmp_path / f"m{i}")
        fast, full = both_ways(path, monkeypatch)
        assert same(fast, full), mutant.name


def metadata_ranges(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of the header, the L1 table, the refcount table, every L2 table and
    every refcount block of a clean image (read directly, not with the code under test)."""
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_size, l1_off, rt_off, rt_clusters = struct.unpack_from(">IQQI", data, 36)
    out = [(0, min(cs, 512)), (l1_off, l1_size * 8), (rt_off, rt_clusters * cs)]
    l2_size = cs * (2 if struct.unpack_from(">Q", data, 72)[0] & 16 else 1)  # extended L2 bit
    for (e,) in struct.iter_unpack(">Q", data[l1_off:l1_off + l1_size * 8]):
        if e & 0x00FFFFFFFFFFFE00:
            out.append((e & 0x00FFFFFFFFFFFE00, min(cs, l2_size)))
    for (e,) in struct.iter_unpack(">Q", data[rt_off:rt_off + rt_clusters * cs]):
        if e:
            out.append((e & ~0x1FF, cs))
    return out


@pytest.mark.parametrize("opts,writes", [
    ({}, ["write -P 0x11 0 64k", "write -P 0x22 1M 300k", "write -z 2M 64k"]),
    ({"extended_l2": True, "cluster_size": 16384},
     ["write -P 0x11 0 4k", "write -P 0x22 100k 200k", "write -P 0x33 1M 1k", "discard 100k 32k"]),
    ({"cluster_size": 512, "refcount_bits": 8}, ["write -P 0x11 0 3k", "write -P 0x22 2M 8k"]),
])
def test_agrees_with_the_full_walk_on_flipped_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   opts: dict[str, object], writes: list[str]) -> None:
    base = create(tmp_path / "base.qcow2", "5M", **opts)
    qemu_io(base, *writes)
    assert proven_clean(base)
    data = base.read_bytes()
    ranges = metadata_ranges(data)
    rng = random.Random(2026)
    path = tmp_path / "flipped.qcow2"
    for _ in range(400):
        off, n = rng.choice(ranges)
        bit = rng.randrange(min(n, len(data) - off) * 8)
        flipped = bytearray(data)
        flipped[off + bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(flipped)
        fast, full = both_ways(path, monkeypatch)
        assert same(fast, full), (off, bit)
