"""qemu-img as the oracle of a file: what QEMU itself makes of an image a target wrote.

Used during a run (core/lockstep.py asks whether QEMU's own image is already corrupt when
the targets disagree) and at its end (core/teardown.py checks and compares every file).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from difftest.core.qemuio import img_args


def qemu_check(path: str, *, force_share: bool = False) -> dict[str, Any]:
    """``qemu-img check`` of ``path`` (``-U`` with force_share: a live qemu-io holds it)."""
    # img_args: "-f qcow2 PATH", or the keys an encrypted file was remembered with.
    r = subprocess.run(["qemu-img", "check", "--output=json", *(["-U"] if force_share else []),
                        *img_args([path])], capture_output=True, text=True)
    if r.returncode not in (0, 2, 3) or not r.stdout.strip():
        return {"check-errors": 1, "stderr": r.stderr.strip(), "exit": r.returncode}
    out = dict(json.loads(r.stdout))
    out["exit"] = r.returncode
    return out


def qemu_compare(a: str, b: str) -> subprocess.CompletedProcess[str]:
    """qemu-img compare: exit 0 same, 1 different, 4 an error reading either image."""
    return subprocess.run(["qemu-img", "compare", "-q", *img_args([a, b])], capture_output=True, text=True)


def qemu_cannot_read(paths: list[str]) -> bool:
    """Whether qemu-img fails to read every one of ``paths`` (non-empty) as itself."""
    return bool(paths) and all(qemu_compare(p, p).returncode == 4 for p in paths)
