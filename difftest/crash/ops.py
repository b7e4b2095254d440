"""The guest operations a crash campaign runs, and their Hypothesis strategy.

A subset of the lockstep's operations (difftest/core/machine.py), with its edge-biased offsets
and lengths: the guest I/O whose crash behaviour has a simple guest-visible meaning (write,
write_zeroes, discard, write_compressed), plus flush and close-and-reopen, which are the
points where data must become durable. Snapshots and resize are not drawn yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from difftest.core.config import Config
from difftest.core.machine import lengths, offsets
from difftest.core.targets import random_bytes

KINDS = ("write", "write_zeroes", "discard", "write_compressed", "flush", "reopen")
FLUSHING = ("flush", "reopen")
"""Operations after which everything written before is durable (a guest flush; close flushes)."""


@dataclass(frozen=True)
class Op:
    """One guest operation. ``arg``: for write, a pattern byte (1..255) or the seed of random
    data (above 255); for write_zeroes, 1 to unmap; for write_compressed, the pattern byte."""

    kind: str
    off: int = 0
    n: int = 0
    arg: int = 0

    def data(self) -> bytes:
        if self.arg < 256:
            return bytes([self.arg]) * self.n
        return random_bytes(self.arg, self.n)

    def span(self) -> tuple[int, int] | None:
        """The guest range whose content the operation may change, or None."""
        if self.kind in ("flush", "reopen") or self.n == 0:
            return None
        return self.off, self.off + self.n

    def __str__(self) -> str:
        if self.kind in FLUSHING:
            return self.kind
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
    else:
        raise ValueError(f"not a guest operation: {op.kind}")


@st.composite
def ops(draw: st.DrawFn, cfg: Config) -> Op:
    size = cfg.size
    # Guest I/O first and most often: Hypothesis shrinks towards the start of the list.
    kind = draw(st.sampled_from(["write", "write", "write", "write_zeroes", "discard",
                                 "write_compressed", "flush", "reopen"]))
    if kind in FLUSHING:
        return Op(kind)
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


def op_lists(cfg: Config, max_ops: int) -> st.SearchStrategy[list[Op]]:
    return st.lists(ops(cfg), min_size=1, max_size=max_ops)
