"""Judging one crash state: is the file QEMU and every engine would find after the power cut
a valid image holding what the guest may expect?

- ``qemu-img check``: no corruptions and no check errors (leaks are what an interrupted
  allocation leaves, and are allowed). An image with lazy refcounts may have refcounts that
  are too low only while it carries the dirty bit (the next read-write open repairs them),
  and a dirty one must come out of ``qemu-img check -r all`` clean, with the bit cleared.
- Guest content, per 512-byte sector, read by qemu (``qemu-img convert -O raw``): flushed
  data intact, a sector written since the last flush holding one of its values since then
  (oracle.GuestOracle).
- Every engine opens the state read-only and reads the same bytes as qemu.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from difftest.core.config import Config
from difftest.crash.oracle import GuestOracle
from spec import features as ft
from spec.errors import Qcow2Error

INCOMPAT_OFFSET = 72
"""Byte offset of incompatible_features in a version 3 header (qcow2.rst "Header")."""


def dirty(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(INCOMPAT_OFFSET)
        bits = int.from_bytes(f.read(8), "big")
    return bool(bits & ft.QCOW2_INCOMPAT_DIRTY)


def qemu_check(path: Path, *, repair: bool = False) -> dict[str, int] | str:
    """qemu-img check's counters, or the reason it gave no report."""
    argv = ["qemu-img", "check", "--output=json"] + (["-r", "all"] if repair else []) + [str(path)]
    r = subprocess.run(argv, capture_output=True, text=True)
    try:
        rep = json.loads(r.stdout)
    except json.JSONDecodeError:
        return f"qemu-img check exit {r.returncode}: {r.stderr.strip()}"
    return {k: int(rep.get(k, 0)) for k in ("corruptions", "leaks", "check-errors")}


def qemu_content(path: Path, scratch: Path) -> bytes | str:
    r = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(scratch)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"qemu-img convert: {r.stderr.strip()}"
    data = scratch.read_bytes()
    scratch.unlink()
    return data


def engine_content(module: ModuleType, path: Path, size: int) -> bytes | str:
    try:
        with module.open(str(path), readonly=True) as img:
            return bytes(img.read(0, size))
    except Qcow2Error as e:
        return f"{type(e).__name__}: {e}"


def judge(path: Path, cfg: Config, oracle: GuestOracle, readers: Sequence[tuple[str, ModuleType]],
          ) -> list[str]:
    """The problems of the crash state at ``path`` (an empty list: a good state)."""
    problems: list[str] = []
    rep = qemu_check(path)
    if isinstance(rep, str):
        return [f"qemu cannot check it: {rep}"]
    if cfg.lazy_refcounts and dirty(path):
        # Refcounts may be anything while the bit is set: QEMU repairs them at the next
        # read-write open (qcow2_do_open runs qcow2_check with BDRV_FIX_ERRORS).
        problems += _repaired(path)
    elif rep["corruptions"] or rep["check-errors"]:
        problems.append(f"qemu-img check: {rep['corruptions']} corruptions, "
                        f"{rep['check-errors']} check errors"
                        + (" and the dirty bit is clear" if cfg.lazy_refcounts else ""))
    content = qemu_content(path, path.with_suffix(".raw"))
    if isinstance(content, str):
        return [*problems, content]
    bad = oracle.bad_sectors(content)
    if bad:
        problems.append(f"guest sectors {_ranges(bad)} hold data never written there since the "
                        "last flush")
    for name, module in readers:
        got = engine_content(module, path, cfg.size)
        if isinstance(got, str):
            problems.append(f"{name} cannot read it: {got}")
        elif got != content:
            diff = next(i for i in range(len(content)) if got[i:i + 1] != content[i:i + 1])
            problems.append(f"{name} reads other bytes than qemu (first at {diff:#x})")
    return problems


def _repaired(path: Path) -> list[str]:
    copy = path.with_name(path.name + ".repair")
    shutil.copyfile(path, copy)
    try:
        qemu_check(copy, repair=True)
        after = qemu_check(copy)
        out = []
        if isinstance(after, str) or any(after.values()):
            out.append(f"qemu-img check -r all does not leave it clean: {after}")
        if dirty(copy):
            out.append("qemu-img check -r all leaves the dirty bit set")
        return out
    finally:
        copy.unlink(missing_ok=True)


def _ranges(sectors: list[int]) -> str:
    out: list[str] = []
    start = prev = sectors[0]
    for s in [*sectors[1:], -2]:
        if s != prev + 1:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = s
        prev = s
    return ",".join(out[:8]) + (" ..." if len(out) > 8 else "")
