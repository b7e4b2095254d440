"""Crash states: what a power cut can leave on the disk, given the recorded host calls.

The model of the disk is the one QEMU's ordering is written for (block/qcow2-cache.c,
qcow2_cache_set_dependency and qcow2_cache_depends_on_flush): a call that returned reached
the disk only once a later flush returned; until then the disk may hold any subset of the
calls since the last flush, and the call in flight may be torn at 512-byte sectors. So a
crash state is: every call up to the last flush before the cut, plus a chosen subset of the
calls after it, each whole or, for the one torn call, only some of its sectors.

Three families are drawn from one stream (``states``):
- prefix: the first k calls, for every k (a power cut between two calls, nothing reordered);
- reordered: random subsets of the calls after the last flush, at the end of every epoch
  (the disk kept some of the unflushed writes and lost others);
- torn: the first k calls whole, then some 512-byte sectors of call k+1.

The file is rebuilt from the image as it was before the stream (``materialize``): writes
set bytes, truncate sets the size, fallocate punches or zeroes (and extends the file unless
KEEP_SIZE), flushes change nothing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from spec import hostio
from spec.hostio import HostOp

SECTOR = 512


@dataclass(frozen=True)
class CrashState:
    """Which recorded calls reached the disk: ``applied`` (indices into the stream, whole),
    and for ``torn`` = (index, sectors) only those 512-byte sectors of that call. ``cut``
    is the stream position of the power cut: every call before it was issued."""

    family: str
    cut: int
    applied: tuple[int, ...]
    torn: tuple[int, tuple[int, ...]] | None = None

    def describe(self, stream: Sequence[HostOp]) -> str:
        lost = [i for i in range(self.cut) if i not in set(self.applied)
                and stream[i].kind != hostio.FLUSH and (self.torn is None or i != self.torn[0])]
        text = f"{self.family} cut after call {self.cut}"
        if lost:
            text += f", lost calls {lost}"
        if self.torn is not None:
            text += f", call {self.torn[0]} torn to sectors {list(self.torn[1])}"
        return text

    def to_json(self) -> dict[str, object]:
        return {"family": self.family, "cut": self.cut, "applied": list(self.applied),
                "torn": None if self.torn is None else [self.torn[0], list(self.torn[1])]}

    @staticmethod
    def from_json(d: dict[str, object]) -> CrashState:
        torn = d.get("torn")
        applied = d["applied"]
        assert isinstance(applied, list)
        return CrashState(str(d["family"]), int(str(d["cut"])), tuple(int(i) for i in applied),
                          None if not isinstance(torn, list) else (int(torn[0]), tuple(torn[1])))


def _changes(stream: Sequence[HostOp], lo: int, hi: int) -> list[int]:
    return [i for i in range(lo, hi) if stream[i].kind != hostio.FLUSH]


def _last_flush(stream: Sequence[HostOp], cut: int) -> int:
    """Index just past the last flush before ``cut`` (0 when none)."""
    for i in range(cut - 1, -1, -1):
        if stream[i].kind == hostio.FLUSH:
            return i + 1
    return 0


def states(stream: Sequence[HostOp], rng: random.Random, *, reorders: int = 4,
           torn: bool = True) -> Iterator[CrashState]:
    """Every prefix state, ``reorders`` random reordered states per epoch (more when the
    epoch allows), and one torn state per multi-sector write; see the module doc."""
    n = len(stream)
    for cut in range(n + 1):
        if cut and stream[cut - 1].kind == hostio.FLUSH:
            continue  # the same disk as the cut before the flush
        yield CrashState("prefix", cut, tuple(_changes(stream, 0, cut)))
    # The end of each epoch: just before each flush, and the end of the stream.
    ends = [i for i, op in enumerate(stream) if op.kind == hostio.FLUSH] + [n]
    for end in ends:
        start = _last_flush(stream, end)
        durable = _changes(stream, 0, start)
        pending = _changes(stream, start, end)
        if len(pending) < 2:
            continue
        seen: set[tuple[int, ...]] = set()
        for _ in range(min(reorders, 2 ** len(pending) - 2)):
            pick = tuple(i for i in pending if rng.random() < 0.5)
            # A subset a prefix already covers is not a reordering.
            if pick in seen or pick == tuple(pending[:len(pick)]):
                continue
            seen.add(pick)
            yield CrashState("reordered", end, tuple(durable) + pick)
    if torn:
        for i, op in enumerate(stream):
            if op.kind != hostio.WRITE or op.length <= SECTOR:
                continue
            first, last = op.offset // SECTOR, (op.offset + op.length - 1) // SECTOR
            sectors = tuple(s for s in range(first, last + 1) if rng.random() < 0.5)
            if 0 < len(sectors) <= last - first:
                yield CrashState("torn", i + 1, tuple(_changes(stream, 0, i)), (i, sectors))


def materialize(base: bytes, stream: Sequence[HostOp], state: CrashState,
                path: str) -> bytearray:
    """The bytes of file ``path`` in ``state``, starting from ``base``.

    A write reaches the disk as whole 512-byte sectors holding what the page cache held
    when it was issued: the file as every call up to it left it, earlier writes to the same
    sector included (the kernel merges them; a disk never stores part of a sector's
    cache content). So a reordered or torn write copies its sectors from the in-order file
    at its own position in the stream."""
    logical = bytearray(base)
    out = bytearray(base)
    applied = set(state.applied)
    torn_at, torn_sectors = state.torn if state.torn is not None else (-1, ())
    last = max([*applied, torn_at], default=-1)
    for i in range(last + 1):
        op = stream[i]
        if op.path != path:
            continue
        _apply(logical, op)
        if i not in applied and i != torn_at:
            continue
        if op.kind != hostio.WRITE:
            _apply(out, op)
            continue
        first, stop = op.offset // SECTOR, -(-(op.offset + op.length) // SECTOR)
        sectors = range(first, stop) if i in applied else torn_sectors
        for sec in sectors:
            lo, hi = sec * SECTOR, min((sec + 1) * SECTOR, len(logical))
            if hi > len(out):
                out.extend(bytes(hi - len(out)))
            out[lo:hi] = logical[lo:hi]
    return out


def _apply(buf: bytearray, op: HostOp) -> None:
    if op.kind == hostio.WRITE:
        end = op.offset + len(op.data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[op.offset:end] = op.data
    elif op.kind == hostio.TRUNCATE:
        if op.offset < len(buf):
            del buf[op.offset:]
        else:
            buf.extend(bytes(op.offset - len(buf)))
    elif op.kind == hostio.FALLOCATE:
        end = op.offset + op.length
        if not op.mode & hostio.FALLOC_FL_KEEP_SIZE and end > len(buf):
            buf.extend(bytes(end - len(buf)))
        if op.mode & (hostio.FALLOC_FL_PUNCH_HOLE | hostio.FALLOC_FL_ZERO_RANGE):
            hi = min(end, len(buf))
            if hi > op.offset:
                buf[op.offset:hi] = bytes(hi - op.offset)
