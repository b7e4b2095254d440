"""``qcow2lab map`` prints what ``qemu-img map`` prints, on every image of the catalogue.

The CLI computes its extents with the reference model (difftest/cli/map.py), so these are
tests of the CLI, not of an engine: the engine's own ``map()``, ``info()``, ``check()`` and
reads on the same images are in tests/conformance/test_catalogue.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.images import BUILDERS, corpus_images

NAMES = sorted(BUILDERS) + [f"corpus:{p.name}" for p in corpus_images()]


@pytest.mark.parametrize("name", ["v3", "data-file"])
@pytest.mark.parametrize("output", ["json", "human"])
def test_cli_map_prints_what_qemu_img_prints(name: str, output: str, qemu_images: dict[str, Path]) -> None:
    path = str(qemu_images[name])
    cwd = qemu_images[name].parent
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    ours = subprocess.run([sys.executable, "-m", "difftest.cli", "map", f"--output={output}", path],
                          capture_output=True, text=True, cwd=cwd, env=env)
    theirs = subprocess.run(["qemu-img", "map", f"--output={output}", path], capture_output=True, text=True,
                            cwd=cwd)
    assert ours.stdout == theirs.stdout
    assert (ours.returncode == 0) == (theirs.returncode == 0)


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
