"""What every row of ``qcow2lab bench impl`` shares: the row result, timing by medians,
image making, ``qemu-img bench`` and the disk's own O_DIRECT latencies.

Figures are medians of ``rounds`` runs taken alternately (ours, peer, ours, peer...), so a
burst of load from another user of this small shared machine hits both sides alike; single
runs vary by about 10%. Timings are printed, never asserted in tests (DESIGN.md,
"Performance"); the counted I/O each row also reports is deterministic and is asserted in
tests/impl/test_counts.py.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

K, M, G, T = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclass
class RowResult:
    """One row: ``ours`` and ``peer`` in ``unit`` (higher is better unless ``lower_is_better``),
    ``ratio`` = ours / peer (or the row's own figure), and the verdict against ``target``."""

    row: str
    workload: str
    ours: float
    peer: float
    unit: str
    ratio: float
    target: str
    passed: bool
    ours_label: str = "impl"
    peer_label: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[str], None]
"""Rows call it with a short description of what they are doing now."""


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def alternate(rounds: int, sides: Sequence[Callable[[], float]], progress: Progress | None = None,
              label: str = "") -> list[list[float]]:
    """Run each side once per round, in turn; returns the figures per side."""
    out: list[list[float]] = [[] for _ in sides]
    for r in range(rounds):
        if progress:
            progress(f"{label} round {r + 1}/{rounds}")
        for i, fn in enumerate(sides):
            out[i].append(fn())
    return out


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def qemu_img_create(path: Path, size: int, *, cluster_size: int = 64 * K, prealloc: str = "off",
                    extended_l2: bool = False, backing: Path | None = None) -> Path:
    opts = f"cluster_size={cluster_size},preallocation={prealloc}"
    if extended_l2:
        opts += ",extended_l2=on"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    run(*argv, str(path), str(size))
    return path


def written_backing(path: Path, size: int) -> Path:
    """A qcow2 image whose every cluster holds data (the seed's "fully populated backing
    file"), written by qemu-io in 64 MiB requests."""
    qemu_img_create(path, size)
    cmds: list[str] = []
    for off in range(0, size, 64 * M):
        cmds += ["-c", f"write -P 0x5a {off} {min(64 * M, size - off)}"]
    run("qemu-io", "-f", "qcow2", *cmds, str(path))
    return path


_RUN_COMPLETED = re.compile(r"Run completed in ([0-9.]+) seconds")


def qemu_img_bench(path: Path, *, count: int, size: int, step: int, write: bool = False,
                   aio: str = "threads", cache: str = "writeback", offset: int = 0,
                   flush_at_end: bool = False) -> float:
    """Seconds ``qemu-img bench`` reports for its requests at queue depth 1 (its own timer:
    open and process start-up excluded, as ours are)."""
    argv = ["qemu-img", "bench", "-f", "qcow2", "-d", "1", "-c", str(count), "-s", str(size),
            "-S", str(step), "-o", str(offset), "-i", aio, "-t", cache]
    if write:
        argv += ["-w", "--pattern=0x61"]
        if flush_at_end:
            argv.append(f"--flush-interval={count}")
    m = _RUN_COMPLETED.search(run(*argv, str(path)))
    if m is None:
        raise RuntimeError("qemu-img bench printed no run time")
    return float(m.group(1))


def qemu_aio_modes(cache: str) -> list[str]:
    """The aio modes qemu-img bench accepts with this cache mode (aio=native needs O_DIRECT)."""
    return ["threads", "io_uring"] + (["native"] if cache == "none" else [])


class DirectReader:
    """O_DIRECT reads from one file into a page-aligned buffer, for the disk's own latencies."""

    def __init__(self, path: Path, max_size: int) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        self.buf = mmap.mmap(-1, max_size)

    def read(self, offset: int, n: int) -> None:
        os.preadv(self.fd, [memoryview(self.buf)[:n]], offset)

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)


def disk_latency(path: Path, offsets: Sequence[int], n: int) -> float:
    """Median seconds of one O_DIRECT read of ``n`` bytes at each of ``offsets``."""
    r = DirectReader(path, n)
    try:
        ts = []
        for off in offsets:
            t0 = time.perf_counter()
            r.read(off, n)
            ts.append(time.perf_counter() - t0)
    finally:
        r.close()
    return median(ts)


def random_offsets(seed: int, count: int, span: int, align: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(span // align) * align for _ in range(count)]


def verdict(value: float, target: float, *, at_most: bool = False) -> bool:
    return value <= target if at_most else value >= target


class Workspace:
    """A temporary directory and the images rows share (made once per run, on first use)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        return self.root / name

    def shared(self, name: str, make: Callable[[Path], object]) -> Path:
        if name not in self._made:
            p = self.root / name
            make(p)
            self._made[name] = p
        return self._made[name]

    def prealloc(self, size: int, cluster_size: int) -> Path:
        """A fully allocated, sparse image: every L2 entry points at a data cluster, and
        the data clusters are holes in the host file (preallocation=metadata)."""
        return self.shared(f"prealloc-{size}-{cluster_size}.qcow2",
                           lambda p: qemu_img_create(p, size, cluster_size=cluster_size,
                                                     prealloc="metadata"))

    def backing(self, size: int) -> Path:
        return self.shared(f"backing-{size}.qcow2", lambda p: written_backing(p, size))
