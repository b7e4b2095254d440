"""Every QEMU-written image of the catalogue and of the shared corpus, read as QEMU reads it.

For each ``qemu_images`` image (tests/images.py, and ``corpus:<file>`` for /work/shared/corpus):
the guest content equals ``qemu-img convert -O raw``, each internal snapshot's content equals
``convert -l``, ``map()`` equals ``qemu-img map --output=json``, ``info()`` equals ``qemu-img
info --output=json`` (key order too) and ``check()`` equals ``qemu-img check --output=json``.
The LUKS image needs its key (RequestError without it) and reads with it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from spec.errors import RequestError, WrongKey
from tests.images import BUILDERS, corpus_images
from tests.qemu import SECRET_ARGS, qemu_img, raw_content

NAMES = sorted(BUILDERS) + [f"corpus:{p.name}" for p in corpus_images()]
ENCRYPTED = {"luks"}
LUKS_KEY = SECRET_ARGS[1].split("data=", 1)[1]
READABLE = [n for n in NAMES if n not in ENCRYPTED]


@pytest.fixture
def image(request: pytest.FixtureRequest, qemu_images: dict[str, Path],
          monkeypatch: pytest.MonkeyPatch) -> Path:
    """The catalogue image named by the test's ``name`` parameter, with the working directory
    beside it: QEMU opens an external data file relative to the current directory, and the
    catalogue's qemu-img ran in the image's directory."""
    path = qemu_images[request.node.callspec.params["name"]]
    monkeypatch.chdir(path.parent)
    return path


@pytest.mark.parametrize("name", NAMES)
def test_reads_like_qemu(engine: ModuleType, name: str, image: Path) -> None:
    if name in ENCRYPTED:
        # Without the key: RequestError, and not the wrong-key kind.
        with pytest.raises(RequestError) as e:
            engine.open(image, readonly=True).close()
        assert not isinstance(e.value, WrongKey)
        with engine.open(image, readonly=True, key_secret=LUKS_KEY) as img:
            assert img.read(0, img.size) == bytes(img.size)  # the catalogue writes nothing to it
        return
    with engine.open(image, readonly=True) as img:
        content = img.read(0, img.size)
        snaps = [s["name"] for s in img.snapshots()]
    assert content == raw_content(image)
    for sn in snaps:
        with engine.open(image, readonly=True, snapshot=sn) as img:
            assert img.read(0, img.size) == raw_content(image, snapshot=sn)


@pytest.mark.parametrize("name", READABLE)
def test_map_matches_qemu_img_map(engine: ModuleType, name: str, image: Path) -> None:
    with engine.open(image, readonly=True) as img:
        extents = img.map()
    assert extents == json.loads(qemu_img("map", "--output=json", str(image)).stdout)


@pytest.mark.parametrize("name", READABLE)
def test_info_matches_qemu_img_info(engine: ModuleType, name: str, image: Path) -> None:
    theirs = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    with engine.open(image, readonly=True) as img:
        ours = img.info()
    assert ours == theirs
    assert list(ours) == list(theirs)  # qemu-img's key order too


@pytest.mark.parametrize("name", READABLE)
def test_check_matches_qemu_img_check(engine: ModuleType, name: str, image: Path) -> None:
    theirs = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True,
                            text=True)
    expected = json.loads(theirs.stdout)
    result = engine.check(image)
    ours = result.to_json()
    for d in (ours, expected):
        d.pop("filename")
    assert ours == expected
    assert result.exit_code == theirs.returncode


def test_snapshot_image_lists_both_snapshots(engine: ModuleType, qemu_images: dict[str, Path]) -> None:
    with engine.open(qemu_images["snapshots"], readonly=True) as img:
        assert [s["name"] for s in img.snapshots()] == ["first", "second"]
