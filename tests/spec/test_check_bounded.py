"""``qcow2lab check`` stays bounded on a wrecked image (README, "Bounded check").

The image is difftest/bench/damaged.py's with 1 MiB of guest data: the active L1 table reaches
into the data, and qemu-img check counts about 300,000 corruptions. Findings are counted and
streamed, never all kept: the number held in memory and the resident growth are asserted
here; the time ratio against qemu-img is the bench row's (timings never go in tests).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from difftest.bench.damaged import RSS_TARGET, create_damaged_image
from spec.rules.catalogue import Finding
from spec.rules.check import KEEP_FINDINGS, check
from tests.qemu import qemu_img


@pytest.fixture(scope="module")
def wrecked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bounded") / "wrecked.qcow2"
    create_damaged_image(path, data="1M")
    return path


def test_findings_kept_are_bounded_and_counters_are_qemus(wrecked: Path) -> None:
    seen = 0

    def sink(fs: list[Finding]) -> None:
        nonlocal seen
        seen += len(fs)

    result = check(wrecked, sink=sink)
    assert len(result.findings) <= KEEP_FINDINGS
    assert result.findings_omitted == seen - len(result.findings) > 100_000
    q = qemu_img("check", "-f", "qcow2", "--output=json", str(wrecked), check=False)
    assert q.returncode == result.exit_code == 2
    assert result.corruptions > 100_000
    assert json.loads(q.stdout) == result.to_json()


PROBE = """
import os, sys
from difftest.cli import main
import difftest.cli.check, spec.rules.check  # start-up: what the command imports

def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

base = hwm()
out = sys.stdout
sys.stdout = sys.stderr = open(os.devnull, "w")
rc = main(["check", "--output=json", sys.argv[1]])
out.write(f"{rc} {hwm() - base}\\n")
"""


def test_cli_resident_growth_is_bounded(wrecked: Path) -> None:
    r = subprocess.run([sys.executable, "-c", PROBE, str(wrecked)], capture_output=True, text=True,
                       check=True)
    rc, growth = map(int, r.stdout.split())
    assert rc == 2
    assert growth <= RSS_TARGET, f"resident growth {growth / 2**20:.1f} MiB"
