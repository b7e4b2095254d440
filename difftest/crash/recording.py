"""Recording one engine's host calls while it runs the operations, split per operation, with
what the guest may read if the power is cut during each (oracle.GuestOracle)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difftest.core.config import Config
from difftest.crash import engines
from difftest.crash.ops import FLUSHING, Op, apply
from difftest.crash.oracle import SECTOR, GuestOracle
from spec import hostio
from spec.errors import RequestError


@dataclass
class Segment:
    """The stream calls of one operation, and what the guest may read if the power is cut
    during it."""

    lo: int
    hi: int
    oracle: GuestOracle


@dataclass
class Recorded:
    base: bytes
    stream: list[hostio.HostOp]
    segments: list[Segment]
    initial: GuestOracle
    errors: list[str]

    def oracle_at(self, cut: int) -> GuestOracle:
        for seg in self.segments:
            if seg.lo < cut <= seg.hi:
                return seg.oracle
        return self.initial


def record(engine: str, cfg: Config, ops: Sequence[Op], path: Path) -> Recorded:
    """Run ``ops`` on the image at ``path`` with the recorder on (see the module doc)."""
    base = path.read_bytes()
    rec = hostio.Recorder(paths={str(path)})
    segments: list[Segment] = []
    errors: list[str] = []
    with engines.monitored(engine) as module, hostio.monitoring(rec):
        img = engines.open_rw(module, str(path))
        try:
            oracle = GuestOracle(img.read(0, cfg.size))
            initial = oracle.copy()
            for op in [*ops, Op("close")]:
                lo = rec.mark()
                try:
                    if op.kind == "reopen":
                        img.close()
                        img = engines.open_rw(module, str(path))
                    elif op.kind == "close":
                        img.close()
                    else:
                        apply(img, op)
                except RequestError as e:
                    errors.append(f"{op}: {type(e).__name__}: {e}")
                span = op.span()
                if span is not None and op.kind != "close":
                    a = span[0] // SECTOR * SECTOR
                    b = min(cfg.size, -(-span[1] // SECTOR) * SECTOR)
                    oracle.wrote(a, img.read(a, b - a))
                segments.append(Segment(lo, rec.mark(), oracle.copy()))
                if op.kind in FLUSHING:
                    oracle.flushed(img.read(0, cfg.size))
        finally:
            img.close()
    return Recorded(base, rec.ops, segments, initial, errors)
