"""Recording one engine's host calls while it runs the operations, split per operation, with
what the guest may read if the power is cut during each (oracle.GuestOracle).

The recorder watches the image and, when it has one, its external data file: a crash state
is a state of both files (states.py keeps each file's flushes apart)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftest.core.config import Config
from difftest.crash import engines
from difftest.crash.ops import FLUSHING, Op, apply
from difftest.crash.oracle import SECTOR, GuestOracle
from spec import hostio
from spec.errors import RequestError, UnsupportedFeature

REFUSED = (RequestError, UnsupportedFeature)
"""What an engine raises for an operation it will not do (a compressed write over data, a
snapshot of an image with a data file, a resize while a snapshot exists): skipped."""


@dataclass
class Segment:
    """The stream calls of one operation, and what the guest may read if the power is cut
    during it."""

    lo: int
    hi: int
    oracle: GuestOracle


@dataclass
class Recorded:
    files: dict[str, bytes]
    """Each recorded file's bytes before the stream, the image first (then its data file)."""
    stream: list[hostio.HostOp]
    segments: list[Segment]
    initial: GuestOracle
    errors: list[str]

    @property
    def base(self) -> bytes:
        return next(iter(self.files.values()))

    def oracle_at(self, cut: int) -> GuestOracle:
        for seg in self.segments:
            if seg.lo < cut <= seg.hi:
                return seg.oracle
        return self.initial


def data_file_of(path: Path) -> Path:
    """Where prepare() puts the external data file of the image at ``path``."""
    return path.with_suffix(".data")


def snapshot_files(path: Path, cfg: Config) -> dict[str, bytes]:
    """The bytes of the image and of its data file (when the config has one)."""
    out = {str(path): path.read_bytes()}
    if cfg.data_file:
        d = data_file_of(path)
        out[str(d)] = d.read_bytes() if d.exists() else b""
    return out


def observe(oracle: GuestOracle, op: Op, img: Any, size_before: int, path: Path) -> None:
    """Tell ``oracle`` what the live image reads after ``op`` where it may have changed.

    A shrink frees the clusters past the new size before it writes the new size (QEMU's
    qcow2_co_truncate does the same), so a crash in between shows the old size with the
    cut-off sectors unmapped: zeros, or what the backing file holds there."""
    size = int(img.size)
    if size != size_before:
        oracle.resized(size)
    if size < size_before:
        oracle.wrote(size, bytes(size_before - size))
        oracle.wrote(size, backing_content(path, size, size_before))
    span = op.span(size_before, size)
    if span is not None:
        a = span[0] // SECTOR * SECTOR
        b = min(size, -(-span[1] // SECTOR) * SECTOR)
        if b > a:
            oracle.wrote(a, img.read(a, b - a))


def backing_content(path: Path, lo: int, hi: int) -> bytes:
    """What the backing chain of the image at ``path`` reads in [lo, hi) (zeros past its
    end, or without one)."""
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                                     capture_output=True, text=True, check=True).stdout)
    backing = info.get("full-backing-filename")
    if not backing:
        return bytes(hi - lo)
    with tempfile.TemporaryDirectory(prefix="crash-backing-") as d:
        raw = Path(d) / "backing.raw"
        argv = ["qemu-img", "convert", "-U", "-O", "raw", backing, str(raw)]
        fmt = info.get("backing-filename-format")
        if fmt:
            argv[3:3] = ["-f", fmt]
        subprocess.run(argv, capture_output=True, check=True)
        data = raw.read_bytes()[lo:hi]
    return data + bytes(hi - lo - len(data))


def record(engine: str, cfg: Config, ops: Sequence[Op], path: Path) -> Recorded:
    """Run ``ops`` on the image at ``path`` with the recorder on (see the module doc)."""
    files = snapshot_files(path, cfg)
    rec = hostio.Recorder(paths=set(files))
    segments: list[Segment] = []
    errors: list[str] = []
    with engines.monitored(engine) as module, hostio.monitoring(rec):
        img = engines.open_rw(module, str(path))
        try:
            oracle = GuestOracle(img.read(0, img.size))
            initial = oracle.copy()
            for op in [*ops, Op("close")]:
                lo = rec.mark()
                size = int(img.size)
                try:
                    if op.kind == "reopen":
                        img.close()
                        img = engines.open_rw(module, str(path))
                    elif op.kind == "close":
                        img.close()
                    else:
                        apply(img, op)
                except REFUSED as e:
                    errors.append(f"{op}: {type(e).__name__}: {e}")
                if op.kind != "close":
                    observe(oracle, op, img, size, path)
                segments.append(Segment(lo, rec.mark(), oracle.copy()))
                if op.kind in FLUSHING:
                    oracle.flushed(img.read(0, img.size))
        finally:
            img.close()
    return Recorded(files, rec.ops, segments, initial, errors)
