"""What the conformance tests share: QEMU's verdicts on a file, and the file read through spec/.

Nothing here knows an engine; every helper works on paths, so a test compares the file an
engine wrote with the one QEMU wrote, or looks inside it with spec.image.open_image.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spec.entries import L1E_OFFSET_MASK, REFT_OFFSET_MASK
from spec.errors import RequestError
from spec.image import open_image
from tests.qemu import create as qemu_create
from tests.qemu import qemu_img, qemu_io

KiB, MiB = 1024, 1024 * 1024


def check_json(path: Path) -> dict[str, Any]:
    """``qemu-img check --output=json`` of ``path``, run beside it, whatever its exit code."""
    return json.loads(qemu_img("check", "--output=json", str(path), check=False, cwd=path.parent).stdout)


def check_without_name(path: Path) -> dict[str, Any]:
    out = check_json(path)
    out.pop("filename")
    return out


def clean(path: Path) -> bool:
    """qemu-img check finds no corruption, leak or check error."""
    c = check_json(path)
    return not (c.get("corruptions") or c.get("leaks") or c.get("check-errors"))


def qemu_map(path: Path) -> Any:
    """``qemu-img map --output=json`` of ``path``, run beside it."""
    return json.loads(qemu_img("map", "--output=json", str(path), cwd=path.parent).stdout)


def base(tmp: Path, size: int = 4 * MiB, pattern: int = 0xAA) -> Path:
    """``tmp/base.qcow2``, written whole with ``pattern`` by qemu-io."""
    b = qemu_create(tmp / "base.qcow2", size)
    qemu_io(b, f"write -P {pattern} 0 {size}")
    return b


def pair(tmp: Path, backing: str, backing_fmt: str, size: int, **opts: Any) -> tuple[Path, Path]:
    """The same starting image written by qemu-img twice: ``q.qcow2`` for qemu-io, ``m.qcow2``
    for the engine (an empty ``backing`` means none)."""
    q = qemu_create(tmp / "q.qcow2", size, backing=backing, backing_fmt=backing_fmt, **opts)
    m = tmp / "m.qcow2"
    shutil.copyfile(q, m)
    return q, m


def qemu_io_fails(path: Path, cmd: str) -> str:
    """Run one qemu-io command that must fail; returns its message."""
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(path.resolve())],
                       capture_output=True, text=True, cwd=path.parent)
    assert r.returncode != 0
    return r.stdout + r.stderr


def mask_snapshot_dates(path: Path) -> bytes:
    """The file with every snapshot's date (bytes 16-23 of its entry) zeroed."""
    data = bytearray(path.read_bytes())
    with open_image(path) as img:
        off = img.header.snapshots_offset
        for s in img.snapshot_table():
            data[off + 16:off + 24] = bytes(8)
            n = 40 + s.extra_data_size + s.id_str_size + s.name_size
            off += n + (-n % 8)
    return bytes(data)


def l2_table_offset(path: Path, guest_offset: int) -> int:
    """Host offset of the L2 table that maps ``guest_offset`` (0 if there is none)."""
    with open_image(path) as img:
        return int(img.l1_table()[img.geometry.l1_index(guest_offset)] & L1E_OFFSET_MASK)


def l2_entry(path: Path, guest_offset: int) -> int:
    """The 64-bit L2 entry that maps ``guest_offset`` in the active L1 table (qcow2.rst,
    "Cluster mapping"), read from the file; 0 where no L2 table exists."""
    with open_image(path) as img:
        l2 = int(img.l1_table()[img.geometry.l1_index(guest_offset)] & L1E_OFFSET_MASK)
        if not l2:
            return 0
        e = img.l2_table(l2)[img.geometry.l2_index(guest_offset)]
        return int(e.l2_entry if img.geometry.extended_l2 else e)


def set_refcount(path: Path, host_offset: int, value: int) -> None:
    """Write the refcount of the cluster at ``host_offset`` into its refcount block, which
    must exist (16-bit refcounts only: the default every test here uses)."""
    with open_image(path) as img:
        g = img.geometry
        assert g.refcount_bits == 16
        idx = host_offset // g.cluster_size
        block = img.refcount_table()[idx // g.refcount_block_entries] & REFT_OFFSET_MASK
    assert block
    with open(path, "r+b") as f:
        f.seek(block + 2 * (idx % g.refcount_block_entries))
        f.write(value.to_bytes(2, "big"))


def set_header_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(8, "big"))


def backing_with_holes_in_refcounted_clusters(tmp_path: Path) -> Path:
    """``tmp_path/base.qcow2``, 2 MiB clusters, 64 KiB of data at guest 0 and real holes dug
    in the rest of its host cluster: it looks preallocated to
    qcow2_detect_metadata_preallocation."""
    b = qemu_create(tmp_path / "base.qcow2", 8 * MiB, cluster_size=2 * MiB)
    qemu_io(b, "write -q -P 0xb1 0 64k")
    host = json.loads(qemu_img("map", "--output=json", str(b)).stdout)[0]["offset"]
    # Real holes: the zeros QEMU wrote with FALLOC_FL_ZERO_RANGE are unwritten extents,
    # which SEEK_DATA reports as data once the page cache holds them.
    subprocess.run(["fallocate", "-p", "-o", str(host + 64 * KiB), "-l", str(2 * MiB - 64 * KiB),
                    str(b)], check=True)
    subprocess.run(["fallocate", "-d", str(b)], check=True)
    return b


Step = tuple[str, int, int, int | bytes]
"""(kind, offset, length, fill) with kind ``write``, ``compress``, ``zero`` or ``flush``;
fill is a pattern byte or the data itself."""


def run_steps(img: Any, tmp: Path, steps: list[Step]) -> tuple[list[str], int]:
    """Apply ``steps`` to an open engine image; a step it refuses must be a RequestError.
    Returns the same steps as qemu-io commands (data goes through files in ``tmp``) and the
    number the engine refused."""
    cmds, refused = [], 0
    for i, (kind, off, n, fill) in enumerate(steps):
        buf = fill if isinstance(fill, bytes) else bytes([fill]) * n
        if isinstance(fill, bytes):
            (tmp / f"step{i}.bin").write_bytes(fill)
        pat = f"-s step{i}.bin" if isinstance(fill, bytes) else f"-P {fill}"
        try:
            if kind == "compress":
                cmds.append(f"write -q -c {pat} {off} {n}")
                img.write_compressed(off, buf)
            elif kind == "write":
                cmds.append(f"write -q {pat} {off} {n}")
                img.write(off, buf)
            elif kind == "zero":
                cmds.append(f"write -q -z {off} {n}")
                img.write_zeroes(off, n)
            else:
                cmds.append("flush")
                img.flush()
        except RequestError:
            refused += 1
    return cmds, refused


def qemu_io_failures(path: Path, *cmds: str) -> int:
    """Run ``cmds`` in one qemu-io process, beside ``path``; the number of commands that
    failed (qemu-io goes on after a failed command and prints "<command> failed: ...")."""
    argv = ["qemu-io", "-f", "qcow2"]
    for cmd in cmds:
        argv += ["-c", cmd]
    r = subprocess.run([*argv, str(path.resolve())], capture_output=True, text=True, cwd=path.parent)
    return sum(" failed: " in line for line in (r.stdout + r.stderr).splitlines())


@contextlib.contextmanager
def cwd(path: Path) -> Iterator[None]:
    """QEMU opens external data files relative to the current directory (and the wrappers
    in tests/qemu.py run qemu in the image's directory), so the engine runs there too."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
