"""Speed of ``qcow2lab check`` against ``qemu-img check`` (``qcow2lab bench check``).

The image is what makes a check work hardest without costing disk space: ``qemu-img create
-o preallocation=metadata`` allocates every cluster of the guest (all L2 tables and refcount
blocks written, data clusters left as holes), so the host file stays a few MiB while the check
walks every L2 entry and every refcount. Both checks run on that same image in the same run,
alternately, ``repeat`` times; the figures are medians. Timings are printed, never asserted in
tests (DESIGN.md, "Performance").

What is timed:
- qemu-img: the whole ``qemu-img check -f qcow2`` process (exec, open, check, report);
- qcow2lab: ``spec.rules.check.check(path)`` in this process (open, walk, compare), i.e.
  without the Python interpreter's start-up, which is a fixed cost unrelated to the image
  (it is measured separately and printed as ``cli_startup_seconds``).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spec.rules.check import check, verdict

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A size as qemu-img takes it: a number with an optional K/M/G/T suffix (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTB]?)\s*", text.upper())
    if m is None:
        raise ValueError(f"invalid size {text!r} (use e.g. 64M, 16G)")
    return int(m.group(1)) * _SUFFIXES[m.group(2)]


def create_image(path: Path, size: int, cluster_size: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"preallocation=metadata,cluster_size={cluster_size}", str(path), str(size)],
                   check=True, capture_output=True)


def _time_qemu(path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True)
    return time.perf_counter() - t0, r.returncode


def _time_ours(path: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    result = check(path)
    return time.perf_counter() - t0, verdict(result)


def _startup() -> float:
    """Wall time of a Python process that imports the checker and does nothing else."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import spec.rules.check"], check=True, capture_output=True)
    return time.perf_counter() - t0


def run(size: int, cluster_size: int = 65536, repeat: int = 5,
        directory: str | None = None) -> dict[str, Any]:
    """Create the image, time both checks ``repeat`` times each, return the figures."""
    with tempfile.TemporaryDirectory(prefix="qcow2lab-bench-check-", dir=directory) as d:
        path = Path(d) / "prealloc.qcow2"
        create_image(path, size, cluster_size)
        host_bytes = path.stat().st_blocks * 512
        qemu: list[float] = []
        ours: list[float] = []
        qemu_codes: set[int] = set()
        our_verdicts: set[str] = set()
        _time_ours(path)  # warm the page cache and the imports once, for both sides
        for _ in range(max(1, repeat)):
            t, code = _time_qemu(path)
            qemu.append(t)
            qemu_codes.add(code)
            t, v = _time_ours(path)
            ours.append(t)
            our_verdicts.add(v)
    q, o = statistics.median(qemu), statistics.median(ours)
    return {
        "size": size, "cluster_size": cluster_size, "clusters": size // cluster_size,
        "host_file_bytes": host_bytes, "repeat": max(1, repeat),
        "qemu_img_seconds": q, "qcow2lab_seconds": o, "ratio": o / q if q else float("inf"),
        "qemu_img_exit_codes": sorted(qemu_codes), "qcow2lab_verdicts": sorted(our_verdicts),
        "cli_startup_seconds": _startup(),
    }


def human(r: dict[str, Any]) -> str:
    """The report ``qcow2lab bench check`` prints; the last line is the ratio."""
    ok = r["qemu_img_exit_codes"] == [0] and r["qcow2lab_verdicts"] == ["clean"]
    return "\n".join([
        f"image: {r['size']} bytes, cluster_size {r['cluster_size']}, preallocation=metadata "
        f"({r['clusters']} clusters allocated; host file {r['host_file_bytes'] / 2**20:.1f} MiB)",
        f"verdicts: qemu-img exit {r['qemu_img_exit_codes']}, qcow2lab {r['qcow2lab_verdicts']}"
        + ("" if ok else "  <- NOT BOTH CLEAN"),
        f"qemu-img check: {r['qemu_img_seconds'] * 1000:.1f} ms (median of {r['repeat']}, whole process)",
        f"qcow2lab check: {r['qcow2lab_seconds'] * 1000:.1f} ms (median of {r['repeat']}, in process; "
        f"Python start-up adds {r['cli_startup_seconds'] * 1000:.0f} ms to a CLI run)",
        f"ratio qcow2lab/qemu-img: {r['ratio']:.2f}x (target: within 3x)",
    ])
