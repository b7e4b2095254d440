"""The rows of ``qcow2lab bench impl``, in the order they print, and the runner."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from difftest.bench.impl import cache_rows, difftest_row, io_rows
from difftest.bench.impl.common import Progress, RowResult, Workspace

Row = Callable[[Workspace, int, Progress], RowResult]

ROWS: dict[str, Row] = {
    "read-hit": io_rows.read_hit,
    "read-hit-qemu": io_rows.read_hit_qemu,
    "read-seq": io_rows.read_seq,
    "write-alloc": io_rows.write_alloc,
    "write-cow": io_rows.write_cow,
    "subclusters": io_rows.subclusters,
    "cow-ops": io_rows.cow_ops,
    "cache-size": cache_rows.cache_size,
    "slices-16G": cache_rows.slices_16g,
    "slices-2T": cache_rows.slices_2t,
    "overlap": io_rows.overlap,
    "open-2T": cache_rows.open_2t,
    "difftest": difftest_row.difftest,
}


def run(names: list[str], rounds: int, progress: Progress, directory: str | None = None,
        done: Callable[[RowResult], None] | None = None) -> list[RowResult]:
    """Run the named rows in one temporary directory (on the disk, not tmpfs: cache="none"
    needs O_DIRECT), sharing the images they have in common."""
    out = []
    with tempfile.TemporaryDirectory(prefix="qcow2lab-bench-impl-", dir=directory) as d:
        ws = Workspace(Path(d))
        for name in names:
            r = ROWS[name](ws, rounds, progress)
            out.append(r)
            if done:
                done(r)
    return out
