"""``qcow2lab bench check --damaged``: both checks on a wrecked image, in one run.

The image (``create_damaged_image``) is what makes a check report the most for its size: a
64 MiB image with extended L2 entries and 3 MiB of guest data written by qemu-io (pattern
0x01), then one bit flipped in the header's ``l1_size`` (bit 16 of the big-endian u32 at
offset 36), so the active L1 table grows from 1 to 65,537 entries and reaches through the L2
table into the guest data. Every data word then reads as an L1 entry with reserved bits set
and an L2 table far past the end of the file, every L2 entry as an entry with reserved bits
and a bad subcluster bitmap: ``qemu-img check`` reports 688,323 corruptions (and prints about
1.77 million ERROR lines). The file is 3.3 MiB.

Both sides are timed as whole processes (``qemu-img check --output=json`` and
``qcow2lab check --output=json``, the findings on stderr going to /dev/null), alternately,
``repeat`` times; the figures are medians. Resident memory is each process's peak
(its VmHWM); ours is also given as growth over the same command's peak on a
small clean image, which is its start-up (the interpreter and the modules it imports). The
row passes when qcow2lab takes at most 3x qemu-img's time, grows by at most 64 MiB, and
prints the same JSON (same bytes: both run in the image's directory on the same name) with
the same exit code. Timings are printed, never asserted in tests (DESIGN.md, "Performance");
tests/spec/test_check_bounded.py asserts the memory bound.
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TIME_TARGET = 3.0
"""qcow2lab's time over qemu-img's, at most."""
RSS_TARGET = 64 << 20
"""qcow2lab's resident growth over its start-up, at most (bytes)."""

L1_SIZE_OFFSET = 36
"""``l1_size`` in the qcow2 header (qcow2.rst "Header"), a big-endian u32."""


def create_damaged_image(path: Path, data: str = "3M", bit: int = 16) -> None:
    """The wrecked image of the module doc (``data``: guest bytes written first)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", str(path), "64M"],
                   check=True, capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x01 0 {data}", str(path)],
                   check=True, capture_output=True)
    with open(path, "r+b") as f:
        (l1_size,) = struct.unpack(">I", os.pread(f.fileno(), 4, L1_SIZE_OFFSET))
        os.pwrite(f.fileno(), struct.pack(">I", l1_size ^ (1 << bit)), L1_SIZE_OFFSET)


def _measure(argv: list[str], cwd: Path) -> tuple[float, int, int, bytes]:
    """(seconds, peak RSS in bytes, exit code, stdout) of one whole process.

    The peak is the process's own high-water mark (VmHWM in /proc/PID/status, polled every
    2 ms), not wait4's ru_maxrss: Linux carries the forking parent's resident size over into
    the child's ru_maxrss, so every child of this (numpy-sized) process would seem to use at
    least as much as the parent."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.DEVNULL)
        peak = 0
        while p.poll() is None:
            peak = max(peak, _vm_hwm(p.pid))
            time.sleep(0.002)
        seconds = time.perf_counter() - t0
        out.seek(0)
        return seconds, peak, p.returncode, out.read()


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


OURS = [sys.executable, "-m", "difftest.cli", "check", "--output=json"]
QEMU = ["qemu-img", "check", "-f", "qcow2", "--output=json"]


def run(repeat: int = 3, directory: str | None = None) -> dict[str, Any]:
    """Create the images, time both checks ``repeat`` times each, return the figures."""
    with tempfile.TemporaryDirectory(prefix="qcow2lab-bench-damaged-", dir=directory) as name:
        d = Path(name)
        create_damaged_image(d / "damaged.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "small.qcow2", "5M"], cwd=d, check=True)
        startup = min(_measure([*OURS, "small.qcow2"], d)[1] for _ in range(3))
        qemu: list[tuple[float, int]] = []
        ours: list[tuple[float, int]] = []
        codes: set[tuple[int, int]] = set()
        same_json = True
        for _ in range(max(1, repeat)):
            qt, qrss, qcode, qout = _measure([*QEMU, "damaged.qcow2"], d)
            ot, orss, ocode, oout = _measure([*OURS, "damaged.qcow2"], d)
            qemu.append((qt, qrss))
            ours.append((ot, orss))
            codes.add((qcode, ocode))
            same_json &= qout == oout
        corruptions = json.loads(qout).get("corruptions", 0)
    q = statistics.median(t for t, _ in qemu)
    o = statistics.median(t for t, _ in ours)
    rss = max(r for _, r in ours)
    r: dict[str, Any] = {
        "image": "64M extended_l2, 3M of data, l1_size bit 16 flipped", "corruptions": corruptions,
        "repeat": max(1, repeat), "qemu_img_seconds": q, "qcow2lab_seconds": o,
        "ratio": o / q if q else float("inf"), "ratio_target": TIME_TARGET,
        "qemu_img_peak_rss": max(r for _, r in qemu), "qcow2lab_peak_rss": rss,
        "qcow2lab_startup_rss": startup, "qcow2lab_rss_growth": rss - startup,
        "rss_growth_target": RSS_TARGET,
        "exit_codes": sorted(codes), "same_json": same_json,
    }
    r["pass"] = (r["ratio"] <= TIME_TARGET and r["qcow2lab_rss_growth"] <= RSS_TARGET and same_json
                 and all(a == b for a, b in codes))
    return r


def human(r: dict[str, Any]) -> str:
    """The report ``qcow2lab bench check --damaged`` prints: one line per measure, then the row."""
    mib = 2.0 ** 20
    codes = ", ".join(f"qemu-img {a} / qcow2lab {b}" for a, b in r["exit_codes"])
    growth = r["qcow2lab_rss_growth"] / mib
    return "\n".join([
        f"image: {r['image']} ({r['corruptions']} corruptions)",
        f"exit codes: {codes}; JSON {'identical' if r['same_json'] else 'DIFFERENT'}",
        f"qemu-img check: {r['qemu_img_seconds']:.2f} s, peak RSS {r['qemu_img_peak_rss'] / mib:.1f} MiB",
        f"qcow2lab check: {r['qcow2lab_seconds']:.2f} s, peak RSS {r['qcow2lab_peak_rss'] / mib:.1f} MiB "
        f"(start-up {r['qcow2lab_startup_rss'] / mib:.1f} MiB, growth {growth:.1f} MiB)",
        f"damaged: ratio {r['ratio']:.2f}x (target <= {r['ratio_target']:.0f}x), "
        f"RSS growth {growth:.1f} MiB (target <= {r['rss_growth_target'] / mib:.0f} MiB) "
        f"{'PASS' if r['pass'] else 'MISS'}  (medians of {r['repeat']})",
    ])
