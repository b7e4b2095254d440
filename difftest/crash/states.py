"""Crash states: what a power cut can leave on the disk, given the recorded host calls.

The model of the disk is the one QEMU's ordering is written for (block/qcow2-cache.c,
qcow2_cache_set_dependency and qcow2_cache_depends_on_flush): a call that returned reached
the disk only once a later flush returned; until then the disk may hold any subset of the
calls since the last flush, and the call in flight may be torn at 512-byte sectors. So a
crash state is: every call up to the last flush before the cut, plus a chosen subset of the
calls after it, each whole or, for the one torn call, only some of its sectors. A flush makes
durable the calls to its own file only: with an external data file, the image's flushes do
not cover the data file's writes (each file's epochs are its own).

Three families are drawn from one stream (``states``):
- prefix: the first k calls, for every k (a power cut between two calls, nothing reordered);
- reordered: subsets of the calls after the last flush, at the end of every epoch (the disk
  kept some of the unflushed writes and lost others): of whole calls, and with one of them
  kept in part, some of its sectors (a disk orders sectors, not requests);
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


def _epoch(stream: Sequence[HostOp], end: int) -> tuple[tuple[int, ...], list[int]]:
    """The calls before ``end`` that are durable (each before a later flush of its own
    file: fdatasync makes one file durable, not the image's data file too) and the ones
    that are not yet, in stream order."""
    synced: dict[str, int] = {}
    for i in range(end):
        if stream[i].kind == hostio.FLUSH:
            synced[stream[i].path] = i
    durable: list[int] = []
    pending: list[int] = []
    for i in range(end):
        op = stream[i]
        if op.kind != hostio.FLUSH:
            (durable if i < synced.get(op.path, -1) else pending).append(i)
    return tuple(durable), pending


def states(stream: Sequence[HostOp], rng: random.Random, *, reorders: int = 24,
           torn: bool = True, bases: dict[str, bytes] | None = None) -> Iterator[CrashState]:
    """Every prefix state, up to ``reorders`` reordered states per epoch, and one torn state
    per write that changes several sectors; see the module doc. ``bases``: each file's
    bytes before the stream (a file not named starts empty), to tell which sectors of a
    write change anything (tearing a write between sectors it leaves as they were gives
    a state already drawn).

    The reordered states of an epoch (the calls after one flush, up to the next flush or
    the end): first its whole-call subsets that no prefix covers, all of them when there
    are at most ``reorders`` (an epoch of n calls has 2**n - n - 1), else that many drawn
    at random; then, for what is left of the budget, subsets in which one write reached the
    disk only in part (some of the sectors it changes) and which are not a prefix followed
    by that write torn (a disk reorders sectors, not only requests). The campaign judges
    each distinct file once, so a draw that repeats a file costs only its rebuilding."""
    changed = _changed_sectors(stream, bases or {})
    n = len(stream)
    for cut in range(n + 1):
        if cut and stream[cut - 1].kind == hostio.FLUSH:
            continue  # the same disk as the cut before the flush
        yield CrashState("prefix", cut, tuple(_changes(stream, 0, cut)))
    # The end of each epoch: just before each flush, and the end of the stream.
    ends = [i for i, op in enumerate(stream) if op.kind == hostio.FLUSH] + [n]
    for end in ends:
        durable, pending = _epoch(stream, end)
        if len(pending) < 2:
            continue
        picks = _whole_subsets(pending, rng, reorders)
        for pick in picks:
            yield CrashState("reordered", end, durable + pick)
        tearable = [i for i in pending if len(changed.get(i, ())) > 1]
        for _ in range(reorders - len(picks) if tearable else 0):
            i = rng.choice(tearable)
            keep = tuple(j for j in pending if j != i and rng.random() < 0.5)
            if keep == tuple(j for j in pending if j < i):
                continue  # the calls before it, then it torn: the torn family's state
            sectors = _some(changed[i], rng)
            if sectors:
                yield CrashState("reordered", end, durable + keep, (i, sectors))
    if torn:
        for i in range(n):
            sectors = _some(changed.get(i, ()), rng)
            if sectors:
                yield CrashState("torn", i + 1, tuple(_changes(stream, 0, i)), (i, sectors))


def _some(sectors: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
    """A random non-empty proper subset of ``sectors`` (empty when there is none)."""
    pick = tuple(s for s in sectors if rng.random() < 0.5)
    return pick if 0 < len(pick) < len(sectors) else ()


def _changed_sectors(stream: Sequence[HostOp], bases: dict[str, bytes],
                     ) -> dict[int, tuple[int, ...]]:
    """For each write of the stream, the 512-byte sectors whose content it changes in the
    file as every call before it left it."""
    files: dict[str, bytearray] = {}
    out: dict[int, tuple[int, ...]] = {}
    for i, op in enumerate(stream):
        buf = files.get(op.path)
        if buf is None:
            buf = files[op.path] = bytearray(bases.get(op.path, b""))
        if op.kind != hostio.WRITE:
            _apply(buf, op)
            continue
        lo, hi = op.offset // SECTOR * SECTOR, -(-(op.offset + op.length) // SECTOR) * SECTOR
        before = bytes(buf[lo:hi])
        _apply(buf, op)
        after = bytes(buf[lo:hi])
        before += bytes(len(after) - len(before))
        out[i] = tuple(lo // SECTOR + k for k in range(0, (hi - lo) // SECTOR)
                       if before[k * SECTOR:(k + 1) * SECTOR] != after[k * SECTOR:(k + 1) * SECTOR])
    return out


def _whole_subsets(pending: list[int], rng: random.Random, limit: int) -> list[tuple[int, ...]]:
    """Subsets of ``pending`` that are not a prefix of it (a prefix is no reordering): all
    of them in a fixed order when there are at most ``limit``, else ``limit`` distinct ones
    drawn at random (or fewer, when the draws keep repeating)."""
    n = len(pending)
    prefixes = {tuple(pending[:k]) for k in range(n + 1)}
    if n < 20 and 2 ** n - n - 1 <= limit:
        every = (tuple(p for b, p in enumerate(pending) if mask >> b & 1) for mask in range(1, 2 ** n))
        return [s for s in every if s not in prefixes]
    out: dict[tuple[int, ...], None] = {}
    for _ in range(4 * limit):
        if len(out) >= limit:
            break
        pick = tuple(i for i in pending if rng.random() < 0.5)
        if pick not in prefixes:
            out[pick] = None
    return list(out)


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
        runs = [(first, stop)] if i in applied else [(sec, sec + 1) for sec in torn_sectors]
        for a, b in runs:
            lo, hi = a * SECTOR, min(b * SECTOR, len(logical))
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
