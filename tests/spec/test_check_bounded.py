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
rc = main(["check", "--output=json", *sys.argv[2:], sys.argv[1]])
out.write(f"{rc} {hwm() - base}\\n")
"""


def _growth(image: Path, *args: str) -> tuple[int, int]:
    r = subprocess.run([sys.executable, "-c", PROBE, str(image), *args], capture_output=True,
                       text=True, check=True)
    rc, growth = map(int, r.stdout.split())
    return rc, growth


def test_cli_resident_growth_is_bounded(wrecked: Path) -> None:
    rc, growth = _growth(wrecked)
    assert rc == 2
    assert growth <= RSS_TARGET, f"resident growth {growth / 2**20:.1f} MiB"


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_repair_is_bounded_and_leaves_qemus_file(tmp_path: Path, mode: str) -> None:
    """``check -r`` walks the image several times (the check that decides, the fix pass, the
    check it reports) and keeps only what it acts on; it once held every finding (520 MiB
    on the bench's 3 MiB image). Exit code and file are qemu-img's, byte for byte: -r leaks
    reports the corruptions (2). -r all frees and punches the L1 table's first cluster (a
    leak here), goes on with the L1 table as the open read it, as QEMU does, and stops at the
    overlap check of the first L2 write (1); the refcounts it had repaired are still in
    QEMU's refcount cache then and are dropped with the node (spec/check/refcache.py). It
    once re-read the punched table, found nothing to fix, took minutes over a report QEMU
    never makes, and kept those refcounts."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    create_damaged_image(ours, data="256K")  # still far more findings than KEEP_FINDINGS
    theirs.write_bytes(ours.read_bytes())
    rc, growth = _growth(ours, "-r", mode)
    q = qemu_img("check", "-f", "qcow2", "-r", mode, str(theirs), check=False)
    assert rc == q.returncode == (2 if mode == "leaks" else 1)
    assert growth <= RSS_TARGET, f"resident growth {growth / 2**20:.1f} MiB"
    assert ours.read_bytes() == theirs.read_bytes()
