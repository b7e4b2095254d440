"""Judging one crash state: is the file QEMU and every engine would find after the power cut
a valid image holding what the guest may expect?

- ``qemu-img check``: no corruptions and no check errors (leaks are what an interrupted
  allocation leaves, and are allowed), except COPIED flags out of step with refcounts in a
  way that loses nothing (harmless_copied), which ``qemu-img check -r all`` must repair.
  An image with lazy refcounts may have refcounts that are too low only while it carries
  the dirty bit (the next read-write open repairs them),
  and a dirty one must come out of ``qemu-img check -r all`` clean, with the bit cleared.
- Guest content, per 512-byte sector, read by qemu (``qemu-img convert -O raw``): flushed
  data intact, a sector written since the last flush holding one of its values since then
  (oracle.GuestOracle).
- Every engine opens the state read-only and reads the same bytes as qemu.

With an external data file, the state is the pair of files: campaign.run_example writes both
in place before judging, and every reader (qemu-img included) reaches the data file through
the name in the image header.
"""

from __future__ import annotations

import json
import re
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


def qemu_check(path: Path, *, repair: bool = False, cluster_bits: int = 16,
               ) -> dict[str, int] | str:
    """qemu-img check's counters, or the reason it gave no report. ``harmless``: how many
    of the corruptions are COPIED flags out of step with a refcount in a way that loses
    nothing (harmless_copied)."""
    argv = ["qemu-img", "check", "--output=json"] + (["-r", "all"] if repair else []) + [str(path)]
    r = subprocess.run(argv, capture_output=True, text=True)
    try:
        rep = json.loads(r.stdout)
    except json.JSONDecodeError:
        return f"qemu-img check exit {r.returncode}: {r.stderr.strip()}"
    out = {k: int(rep.get(k, 0)) for k in ("corruptions", "leaks", "check-errors")}
    out["harmless"] = harmless_copied(r.stderr, cluster_bits) if out["corruptions"] else 0
    return out


COPIED_ERROR = re.compile(r"ERROR OFLAG_COPIED (?:data|L2) cluster: .*?l[12]_entry=([0-9a-f]+) "
                          r"refcount=(\d+)")
LEAKED = re.compile(r"Leaked cluster (\d+) refcount=(\d+) reference=(\d+)")
QCOW_OFLAG_COPIED = 1 << 63
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00


def harmless_copied(stderr: str, cluster_bits: int) -> int:
    """How many of qemu-img check's "ERROR OFLAG_COPIED" reports cost nothing: the flag
    clear on a cluster whose refcount is 1 (a write copies it needlessly), or set on one
    whose refcount is above 1 while only one table maps it (the extra count is a leak, the
    leak report says so). QEMU counts both as corruptions (qcow2-refcount.c,
    check_oflag_copied), yet no order of writes avoids them while a snapshot is created,
    applied or deleted: the refcounts and the flags live in different clusters, and either
    going first leaves one of the two. QEMU has the same window; check -r all repairs it."""
    leaked = {int(c) for c, _r, ref in LEAKED.findall(stderr) if int(ref) == 1}
    n = 0
    for entry_hex, refcount in COPIED_ERROR.findall(stderr):
        entry, rc = int(entry_hex, 16), int(refcount)
        flag = bool(entry & QCOW_OFLAG_COPIED)
        only_one_map = (entry & OFFSET_MASK) >> cluster_bits in leaked
        n += (not flag and rc == 1) or (flag and rc > 1 and only_one_map)
    return n




def qemu_content(path: Path, scratch: Path) -> bytes | str:
    r = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(scratch)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return f"qemu-img convert: {r.stderr.strip()}"
    data = scratch.read_bytes()
    scratch.unlink()
    return data


def engine_content(module: ModuleType, path: Path) -> bytes | str:
    """The whole guest content as the engine reads it (its virtual size may be any the
    oracle allows: a resize or snapshot apply may be lost)."""
    try:
        with module.open(str(path), readonly=True) as img:
            return bytes(img.read(0, img.size))
    except Qcow2Error as e:
        return f"{type(e).__name__}: {e}"


def judge(path: Path, cfg: Config, oracle: GuestOracle, readers: Sequence[tuple[str, ModuleType]],
          ) -> list[str]:
    """The problems of the crash state at ``path`` (an empty list: a good state)."""
    problems: list[str] = []
    rep = qemu_check(path, cluster_bits=cfg.cluster_size.bit_length() - 1)
    if isinstance(rep, str):
        return [f"qemu cannot check it: {rep}"]
    if cfg.lazy_refcounts and dirty(path):
        # Refcounts may be anything while the bit is set: QEMU repairs them at the next
        # read-write open (qcow2_do_open runs qcow2_check with BDRV_FIX_ERRORS).
        problems += _repaired(path)  # the flags must come out right
    elif rep["corruptions"] > rep["harmless"] or rep["check-errors"]:
        problems.append(f"qemu-img check: {rep['corruptions']} corruptions, "
                        f"{rep['check-errors']} check errors"
                        + (" and the dirty bit is clear" if cfg.lazy_refcounts else ""))
    elif rep["harmless"]:
        problems += _repaired(path, dirty_bit=False)  # the flags must come out right
    content = qemu_content(path, path.with_suffix(".raw"))
    if isinstance(content, str):
        return [*problems, content]
    if len(content) not in oracle.allowed_sizes():
        problems.append(f"virtual size {len(content)} is none of the sizes since the last "
                        f"flush {sorted(oracle.allowed_sizes())}")
    bad = oracle.bad_sectors(content)
    if bad:
        problems.append(f"guest sectors {_ranges(bad)} hold data never written there since the "
                        "last flush")
    for name, module in readers:
        got = engine_content(module, path)
        if isinstance(got, str):
            problems.append(f"{name} cannot read it: {got}")
        elif got != content:
            diff = next((i for i in range(min(len(got), len(content)))
                         if got[i:i + 1] != content[i:i + 1]), min(len(got), len(content)))
            problems.append(f"{name} reads other bytes than qemu (first at {diff:#x}; sizes "
                            f"{len(got)} and {len(content)})")
    return problems


def _repaired(path: Path, *, dirty_bit: bool = True) -> list[str]:
    """The problems left after ``qemu-img check -r all`` on a copy; ``dirty_bit``: the
    image is one with lazy refcounts (version 3), whose dirty bit repair must clear (a
    version 2 header has no incompatible_features field to read)."""
    copy = path.with_name(path.name + ".repair")
    shutil.copyfile(path, copy)
    try:
        qemu_check(copy, repair=True)
        after = qemu_check(copy)
        out = []
        if isinstance(after, str) or any(v for k, v in after.items() if k != "harmless"):
            out.append(f"qemu-img check -r all does not leave it clean: {after}")
        if dirty_bit and dirty(copy):
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
