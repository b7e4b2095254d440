"""Shared fixtures: the QEMU-written image catalogue, built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.images import BUILDERS, corpus_images


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("qemu-img") is None:
        pytest.fail("qemu-img is required (make test installs qemu-utils)")
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
def qemu_images(image_dir: Path) -> dict[str, Path]:
    """name -> path of every catalogue image, plus ``corpus:<file>`` for the shared corpus."""
    out = {name: build(image_dir) for name, build in BUILDERS.items()}
    for p in corpus_images():
        out[f"corpus:{p.name}"] = p
    return out
