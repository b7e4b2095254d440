"""The impl's caches put each entry in the slot QEMU 7.2 puts it in (block/qcow2-cache.c
qcow2_cache_do_get), so a write-back walks the dirty entries in QEMU's order. QEMU's own
placements come from its trace events (qemu-io --trace: qcow2_cache_get names the offset,
qcow2_cache_get_done the slot index), over a run of requests with small caches of slices
that evict all the time; the model has no cache, so only the impl is compared."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import impl
from impl.cache import Qcow2Cache

KiB, GiB = 1 << 10, 1 << 30
_GET = re.compile(r"qcow2_cache_get co (\S+) is_l2_cache (\d) offset 0x([0-9a-f]+)")
_DONE = re.compile(r"qcow2_cache_get_done co (\S+) is_l2_cache (\d) index (\d+)")


def _qemu_placements(trace: str) -> dict[bool, list[tuple[int, int]]]:
    """Every (offset, slot) QEMU placed, in order: a get whose slot held another offset."""
    pending: dict[str, tuple[bool, int]] = {}
    held: dict[bool, dict[int, int]] = {True: {}, False: {}}
    out: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
    for line in trace.splitlines():
        if m := _GET.match(line):
            pending[m[1]] = (m[2] == "1", int(m[3], 16))
        elif m := _DONE.match(line):
            l2, offset = pending.pop(m[1])
            slot = int(m[3])
            if held[l2].get(slot) != offset:
                out[l2].append((offset, slot))
                held[l2][slot] = offset
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_every_cache_entry_takes_qemus_slot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            seed: int) -> None:
    rng = random.Random(seed)
    base = tmp_path / "b.qcow2"
    # 512-byte clusters: each refcount block covers 128 KiB of file, so the refcount cache
    # (6 slots) evicts too; L2: 5 slots of 512-byte tables ((offset / 512 * 4) % 5 varies).
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(base), "8G"],
                   check=True)
    ops: list[tuple[str, int, int]] = []
    for _ in range(120):
        off = rng.randrange(0, 8 * GiB // (4 * KiB)) * 4 * KiB
        ops.append((rng.choice(["write", "write", "write", "read", "discard"]), off, 4 * KiB))
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "e.qcow2"
    shutil.copy(base, theirs)
    shutil.copy(base, ours)
    cmds = [a for op, off, n in ops
            for a in ("-c", f"write -q -P 1 {off} {n}" if op == "write" else f"{op} -q {off} {n}")]
    r = subprocess.run(["qemu-io", "--trace", "qcow2_cache_get*", "--image-opts", *cmds,
                        f"driver=qcow2,file.filename={theirs},l2-cache-size=2560,l2-cache-entry-size=512,"
                        "refcount-cache-size=3k"], capture_output=True, text=True, check=True)
    qemu = _qemu_placements(r.stdout + r.stderr)
    assert len(qemu[True]) > 50 and len(qemu[False]) > 6  # both caches evicted, many times

    placed: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
    take = Qcow2Cache._take_slot

    def record(self: Qcow2Cache, offset: int) -> Any:
        take(self, offset)
        placed[self.name == "l2"].append((offset, self.slot[offset]))

    monkeypatch.setattr(Qcow2Cache, "_take_slot", record)
    img = impl.open(ours, l2_cache_size=2560, l2_cache_entry_size=512, refcount_cache_size=3 * KiB)
    for op, off, n in ops:
        if op == "write":
            img.write(off, b"\1" * n)
        elif op == "read":
            img.read(off, n)
        else:
            img.discard(off, n)
    img.close()
    assert placed == qemu
    assert ours.read_bytes() == theirs.read_bytes()
