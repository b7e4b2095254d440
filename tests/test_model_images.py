"""The model reads every QEMU-written image of the catalogue as QEMU does.

For each ``qemu_images`` image: the guest content equals ``qemu-img convert -O raw``, each
internal snapshot's content equals ``convert -l``, ``map()`` equals ``qemu-img map
--output=json``, and ``qcow2lab map`` prints what ``qemu-img map`` prints. The LUKS image
declares encryption, which the model refuses with UnsupportedFeature.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import model
from spec.errors import UnsupportedFeature
from tests.images import BUILDERS, corpus_images
from tests.qemu import qemu_img, raw_content

NAMES = sorted(BUILDERS) + [f"corpus:{p.name}" for p in corpus_images()]
ENCRYPTED = {"luks"}


def _qemu_map(path: Path) -> list[dict[str, object]]:
    return json.loads(qemu_img("map", "--output=json", str(path)).stdout)


@pytest.mark.parametrize("name", NAMES)
def test_model_reads_like_qemu(name: str, qemu_images: dict[str, Path],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = qemu_images[name]
    # QEMU opens an external data file relative to the current directory, and the
    # catalogue's qemu-img ran in the image's directory.
    monkeypatch.chdir(path.parent)
    if name in ENCRYPTED:
        with pytest.raises(UnsupportedFeature) as e:
            model.open(path, readonly=True)
        assert e.value.feature == "encryption"
        return
    with model.open(path, readonly=True) as img:
        content = img.read(0, img.size)
        extents = img.map()
        snaps = [s["name"] for s in img.snapshots()]
    assert content == raw_content(path)
    assert extents == _qemu_map(path)
    for sn in snaps:
        with model.open(path, readonly=True, snapshot=sn) as img:
            assert img.read(0, img.size) == raw_content(path, snapshot=sn)


@pytest.mark.parametrize("name", ["v3", "data-file"])
@pytest.mark.parametrize("output", ["json", "human"])
def test_cli_map_prints_what_qemu_img_prints(name: str, output: str, qemu_images: dict[str, Path]) -> None:
    path = str(qemu_images[name])
    cwd = qemu_images[name].parent
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    ours = subprocess.run([sys.executable, "-m", "difftest.cli", "map", f"--output={output}", path],
                          capture_output=True, text=True, cwd=cwd, env=env)
    theirs = subprocess.run(["qemu-img", "map", f"--output={output}", path], capture_output=True, text=True,
                            cwd=cwd)
    assert ours.stdout == theirs.stdout
    assert (ours.returncode == 0) == (theirs.returncode == 0)


def test_snapshot_fixture_lists_both_snapshots(qemu_images: dict[str, Path]) -> None:
    with model.open(qemu_images["snapshots"], readonly=True) as img:
        assert [s["name"] for s in img.snapshots()] == ["first", "second"]


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ENCRYPTED])
def test_model_check_matches_qemu_img_check(name: str, qemu_images: dict[str, Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = qemu_images[name]
    monkeypatch.chdir(path.parent)
    theirs = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True)
    expected = json.loads(theirs.stdout)
    result = model.check(path)
    ours = result.to_json()
    for d in (ours, expected):
        d.pop("filename")
    assert ours == expected
    assert result.exit_code == theirs.returncode


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("output", ["json", "human"])
def test_map_verb_matches_qemu_img_on_every_image(name: str, output: str, qemu_images: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """In-process, so every catalogue and corpus image is covered cheaply."""
    from difftest.cli import main

    path = qemu_images[name]
    monkeypatch.chdir(path.parent)
    theirs = subprocess.run(["qemu-img", "map", f"--output={output}", str(path)], capture_output=True,
                            text=True)
    code = main(["map", f"--output={output}", str(path)])
    assert capsys.readouterr().out == theirs.stdout
    assert (code == 0) == (theirs.returncode == 0)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ENCRYPTED])
def test_model_info_matches_qemu_img_info(name: str, qemu_images: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = qemu_images[name]
    monkeypatch.chdir(path.parent)
    theirs = json.loads(qemu_img("info", "--output=json", str(path)).stdout)
    with model.open(path, readonly=True) as img:
        ours = img.info()
    assert ours == theirs
    assert list(ours) == list(theirs)  # qemu-img's key order too
