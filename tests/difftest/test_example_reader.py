"""The example reader the README's "Writing a reader" starts from (examples/qemu_img_reader.py)
works as documented: run from its own directory, outside the package, it passes the matrix's
cells (it reads through qemu-img, QEMU itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from difftest.core import qemuio

PROJECT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not qemuio.available(), reason="qemu-img/qemu-io not installed")
def test_the_example_reader_passes_from_its_own_directory(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    r = subprocess.run([sys.executable, "-m", "difftest.cli", "conformance", "--readers",
                        "py:qemu_img_reader:reader", "--areas", "plain,zero-over-backing",
                        "--time-budget", "5", "--seed", "1", "--output", "json",
                        "--out", str(tmp_path / "out")],
                       cwd=PROJECT / "examples", env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cells = json.loads(r.stdout)["cells"]
    assert [(c["area"], c["outcome"]) for c in cells] == [("plain", "pass"), ("zero-over-backing", "pass")]
    assert all(c["examples"] > 0 for c in cells)
