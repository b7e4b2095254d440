"""The guest operations a crash campaign runs, and their Hypothesis strategy.

A subset of the lockstep's operations (difftest/core/machine.py), with its edge-biased offsets
and lengths: the guest I/O whose crash behaviour has a simple guest-visible meaning (write,
write_zeroes, discard, write_compressed), flush and close-and-reopen, which are the points
where data must become durable, and the operations that rewrite metadata wholesale: resize
(grow, and shrink, which both engines and qemu-io's ``truncate`` do) and internal snapshots
(create, apply, delete; refused with an external data file, as QEMU refuses them, and resize
is refused while a snapshot exists). An operation an engine refuses is skipped (recorded in
Recorded.errors); the guest oracle follows what the live engine reads after each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from difftest.core.config import Config
from difftest.core.machine import lengths, offsets
from difftest.core.targets import random_bytes

KINDS = ("write", "write_zeroes", "discard", "write_compressed", "flush", "reopen", "resize",
         "snapshot_create", "snapshot_apply", "snapshot_delete")
SNAPSHOTS = ("snapshot_create", "snapshot_apply", "snapshot_delete")
SNAPSHOT_NAMES = ("s0", "s1")
FLUSHING = ("flush", "reopen")
"""Operations after which everything written before is durable (a guest flush; close flushes)."""


@dataclass(frozen=True)
class Op:
    """One guest operation. ``arg``: for write, a pattern byte (1..255) or the seed of random
    data (above 255); for write_zeroes, 1 to unmap; for write_compressed, the pattern byte;
    for a snapshot operation, the index of its name in SNAPSHOT_NAMES. ``n``: for resize,
    the new virtual size."""

    kind: str
    off: int = 0
    n: int = 0
    arg: int = 0

    def data(self) -> bytes:
        if self.arg < 256:
            return bytes([self.arg]) * self.n
        return random_bytes(self.arg, self.n)

    @property
    def name(self) -> str:
        """A snapshot operation's snapshot name."""
        return SNAPSHOT_NAMES[self.arg % len(SNAPSHOT_NAMES)]

    def span(self, size_before: int, size_after: int) -> tuple[int, int] | None:
        """The guest range whose content the operation may have changed, or None, given
        the virtual size before and after it."""
        if self.kind == "snapshot_apply":
            return 0, size_after
        if self.kind == "resize":
            # A grown tail reads as what the engine made of it (zeros, QEMU's choice since
            # a longer backing file must not show through); a shrink changes no sector left.
            return (size_before, size_after) if size_after > size_before else None
        if self.kind in ("flush", "reopen", "close", "snapshot_create", "snapshot_delete") \
                or self.n == 0:
            return None
        return self.off, self.off + self.n

    def __str__(self) -> str:
        if self.kind in FLUSHING:
            return self.kind
        if self.kind == "resize":
            return f"resize {self.n:#x}"
        if self.kind in SNAPSHOTS:
            return f"{self.kind} {self.name}"
        extra = f" arg={self.arg}" if self.kind != "discard" else ""
        return f"{self.kind} {self.off:#x} +{self.n:#x}{extra}"

    def as_list(self) -> list[Any]:
        return [self.kind, self.off, self.n, self.arg]


def apply(image: Any, op: Op) -> None:
    """Run ``op`` on an open image (reopen is the caller's, see campaign.Session)."""
    if op.kind == "write":
        image.write(op.off, op.data())
    elif op.kind == "write_zeroes":
        image.write_zeroes(op.off, op.n, unmap=bool(op.arg))
    elif op.kind == "discard":
        image.discard(op.off, op.n)
    elif op.kind == "write_compressed":
        image.write_compressed(op.off, op.data())
    elif op.kind == "flush":
        image.flush()
    elif op.kind == "resize":
        image.resize(op.n, shrink=op.n < image.size)
    elif op.kind == "snapshot_create":
        image.snapshot_create(op.name)
    elif op.kind == "snapshot_apply":
        image.snapshot_apply(op.name)
    elif op.kind == "snapshot_delete":
        image.snapshot_delete(op.name)
    else:
        raise ValueError(f"not a guest operation: {op.kind}")


@st.composite
def ops(draw: st.DrawFn, cfg: Config, skip: frozenset[str] = frozenset()) -> Op:
    """One operation; none of the kinds in ``skip``."""
    size = cfg.size
    # Guest I/O first and most often: Hypothesis shrinks towards the start of the list.
    kind = draw(st.sampled_from([k for k in ["write", "write", "write", "write_zeroes", "discard",
                                             "write_compressed", "flush", "reopen", "metadata"]
                                 if k not in skip]))
    if kind in FLUSHING:
        return Op(kind)
    if kind == "metadata":
        kind = draw(st.sampled_from([k for k in ("resize", *SNAPSHOTS) if k not in skip]))
        if kind == "resize":
            # Sizes around the drawn one, so that the image grows and shrinks back over
            # cluster and sector boundaries (a shrink below data written frees it).
            c = cfg.cluster_size
            delta = draw(st.sampled_from([512, c, c + 512, 3 * c]))
            return Op(kind, 0, max(512, size + delta * draw(st.sampled_from([1, -1]))))
        return Op(kind, 0, 0, draw(st.integers(0, len(SNAPSHOT_NAMES) - 1)))
    if kind == "write_compressed":
        c = cfg.cluster_size
        at = min(offsets(draw, cfg, size) // c * c, (size // c - 1) * c)
        return Op(kind, at, c, draw(st.integers(1, 255)))
    off = min(offsets(draw, cfg, size), size - 1)
    n = max(1, min(lengths(draw, cfg, size - off), 64 * 1024))
    if kind == "write":
        return Op(kind, off, n, draw(st.one_of(st.integers(1, 255), st.integers(256, 1 << 30))))
    if kind == "write_zeroes":
        return Op(kind, off, n, draw(st.integers(0, 1)))
    return Op(kind, off, n)


def op_lists(cfg: Config, max_ops: int, skip: frozenset[str] = frozenset(),
             ) -> st.SearchStrategy[list[Op]]:
    unknown = skip - set(KINDS)
    if unknown or {"write", "write_zeroes", "discard", "write_compressed"} <= skip:
        raise ValueError(f"cannot skip {sorted(skip)}: operation kinds are {', '.join(KINDS)}, "
                         "and one kind of guest write must stay")
    if {"resize", *SNAPSHOTS} <= skip:
        skip = skip | {"metadata"}
    return st.lists(ops(cfg, skip), min_size=1, max_size=max_ops)
