"""One damaged-image example: the damage, the requests, and running them on every engine.

A ``Case`` names a corpus mutant (difftest/corpus/mutate.py) by its name and corpus seed, so
its base image, backing files and file name are rebuilt exactly; the damage itself is kept
as a list of (offset, xor mask) per changed byte, so that shrinking can drop whole bytes and
single bits. ``run_case`` applies it to a copy of the base for every engine and qemu-io, and
returns the first disagreement (a ``Finding``) or None.

What is compared, in order:
- open: every side opens the image, or every side refuses it (QEMU's messages name no
  class, so a refusal is a refusal; the classes are in the message);
- each request: the bytes read, or success, or the error class (qemu-io's EIO on a request
  inside the image is CorruptionError, ENOTSUP UnsupportedFeature; difftest/core/qemuio.py).
  A CorruptionError on every side ends the requests: QEMU has dropped the node when it
  flagged the image (qcow2_signal_corruption), and nothing after it is comparable;
- close (which writes back the caches), then the corrupt bit in every file's header (v3);
- a read-write reopen: opens, or is refused, on every side;
- ``qemu-img check``'s verdict on every file: its class (clean, leaks, corruptions,
  check-errors, refused) and its corruption and leak counts.
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from difftest.core import qemuio
from difftest.core.qemuio import QemuImage
from difftest.corpus.mutate import Base, Mutant, qemu_verdict
from spec.errors import CorruptionError, Qcow2Error
from spec.features import QCOW2_INCOMPAT_CORRUPT

HANG_SECONDS = 20
"""An in-process engine call that takes longer is a hang (qemu-io has its own limit)."""

OPS = ("read", "write", "write_zeroes", "discard", "flush")


@dataclass(frozen=True)
class Op:
    """A guest request; ``byte`` is the pattern of a write, ``unmap`` the flag of write_zeroes."""

    kind: str
    offset: int = 0
    n: int = 0
    byte: int = 0
    unmap: bool = False

    def qemu_io(self) -> str:
        """The request as a qemu-io command (for repro.sh)."""
        if self.kind == "read":
            return f"read {self.offset} {self.n}"
        if self.kind == "write":
            return f"write -P {self.byte:#x} {self.offset} {self.n}"
        if self.kind == "write_zeroes":
            return f"write -z{' -u' if self.unmap else ''} {self.offset} {self.n}"
        if self.kind == "discard":
            return f"discard {self.offset} {self.n}"
        return "flush"

    def __str__(self) -> str:
        if self.kind == "flush":
            return "flush()"
        extra = f", byte={self.byte:#x}" if self.kind == "write" else f", unmap={self.unmap}" \
            if self.kind == "write_zeroes" else ""
        return f"{self.kind}({self.offset:#x}, {self.n:#x}{extra})"


Damage = tuple[tuple[int, int], ...]
"""(offset, xor mask) for every byte the damage changes, in offset order."""


def damage_of(base: Base, mutant: Mutant) -> Damage:
    """The mutant's changes to its base, byte by byte (a truncation is kept apart)."""
    out = []
    for e in mutant.edits:
        for i, (old, new) in enumerate(zip(e.old, e.new, strict=True)):
            if old != new:
                out.append((e.offset + i, old ^ new))
    return tuple(sorted(out))


def count_bits(damage: Damage) -> int:
    return sum(bin(mask).count("1") for _, mask in damage)


@dataclass(frozen=True)
class Case:
    mutant: str
    """The corpus mutant's name (``flip-12@v3``, ``refcount-too-low@snap``)."""
    seed: int
    """The corpus seed it was generated with."""
    base: str
    filename: str
    damage: Damage
    truncated_to: int | None
    ops: tuple[Op, ...]

    def image_bytes(self, base: Base) -> bytes:
        data = bytearray(base.data)
        for off, mask in self.damage:
            if off >= len(data):
                data.extend(bytes(off + 1 - len(data)))
            data[off] ^= mask
        if self.truncated_to is not None:
            del data[self.truncated_to:]
        return bytes(data)

    def to_json(self) -> dict[str, Any]:
        return {"mutant": self.mutant, "seed": self.seed, "base": self.base, "filename": self.filename,
                "damage": [[off, mask] for off, mask in self.damage], "truncated_to": self.truncated_to,
                "ops": [vars(op) for op in self.ops]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Case:
        return cls(d["mutant"], int(d["seed"]), d["base"], d["filename"],
                   tuple((int(o), int(m)) for o, m in d["damage"]), d["truncated_to"],
                   tuple(Op(**op) for op in d["ops"]))


@dataclass(frozen=True)
class Finding:
    kind: str
    """What disagreed: open, read, write, ..., close, corrupt-flag, reopen, check, or crash
    (an engine raised something that is not a spec.errors class) or hang."""
    step: int
    """The request's index; -1 before the requests, len(ops) after them."""
    outcomes: dict[str, str] = field(compare=False)

    def signature(self) -> str:
        return self.kind

    def __str__(self) -> str:
        sides = "; ".join(f"{k}={v}" for k, v in self.outcomes.items())
        return f"[{self.kind}] step {self.step}: {sides}"


class Hang(Exception):
    pass


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _outcome(fn: Any, *args: Any, **kw: Any) -> tuple[str, Any]:
    """(outcome text, result): "ok", a spec.errors class name, "crash:Type: msg" or "hang"."""
    out, result, _ = _outcome_detail(fn, *args, **kw)
    return out, result


def _outcome_detail(fn: Any, *args: Any, **kw: Any) -> tuple[str, Any, str]:
    """_outcome, and the exception's own class and message ("" on success), for the notes."""
    # qemu-io has its own, longer limit (qemuio.TIMEOUT): QEMU may legitimately take 15 s
    # or more on a damaged image, writing a refcount table of millions of entries (damaged
    # seed 13, flip-2627@v3), and must not be called hung at an engine's limit.
    limit = int(qemuio.TIMEOUT) if isinstance(getattr(fn, "__self__", None), QemuImage) else HANG_SECONDS
    try:
        with _time_limit(limit):
            return "ok", fn(*args, **kw), ""
    except Hang:
        return "hang", None, "hang"
    except Qcow2Error as e:
        # Subclasses of CorruptionError (an engine's unflagged variant) are the same class to QEMU.
        out = "CorruptionError" if isinstance(e, CorruptionError) else type(e).__name__
        return out, None, f"{type(e).__name__}: {e}"
    except Exception as e:  # anything else from an engine is itself the finding
        return f"crash:{type(e).__name__}: {e}", None, f"{type(e).__name__}: {e}"


def _open(engine: str, path: Path, readonly: bool = False, log: list[str] | None = None) -> Any:
    if engine == "qemu":
        img = QemuImage(path, readonly=readonly)
        if log is not None and img.io is not None:
            _keep_log(img.io, log)
        return img
    return importlib.import_module(engine).open(path, readonly=readonly)


def _keep_log(io: Any, log: list[str]) -> None:
    """Keep everything qemu-io prints (and why it died), for the notes (notes.py): QEMU's
    messages are the only evidence of why it did what it did."""
    cmd = io.cmd

    def logged(line: str) -> str:
        try:
            out: str = cmd(line)
        except Exception as e:
            log.append(str(e))
            raise
        log.append(out)
        return out
    io.cmd = logged


def _close(engine: str, img: Any) -> Any:
    """Close an image; qemu-io closes it with its ``close`` command first, so that what the
    write-back of its caches prints is logged (``quit`` prints nothing). Its reply is not
    judged, as ``quit``'s never was: what the close did shows in the corrupt bit and check."""
    if engine == "qemu" and img.io is not None and img.io.proc.poll() is None:
        img.io.cmd("close")
    return img.close()


def _corrupt_bit(path: Path) -> bool:
    if not path.exists():
        return False
    with path.open("rb") as f:  # only the header: a damaged image may have grown huge (sparse)
        head = f.read(80)
    return len(head) >= 80 and head[4:8] == b"\0\0\0\x03" and \
        bool(struct.unpack_from(">Q", head, 72)[0] & QCOW2_INCOMPAT_CORRUPT)


def _verdict(path: Path) -> str:
    v = qemu_verdict(path)
    r = v.report or {}
    return f"{v.kind} corruptions={r.get('corruptions', 0)} leaks={r.get('leaks', 0)}"


def _disagree(outcomes: dict[str, str]) -> bool:
    return len(set(outcomes.values())) > 1


@dataclass
class Run:
    """What one run of a case did (for the campaign's counts)."""

    finding: Finding | None = None
    opened: bool = False
    steps: int = 0
    qemu_log: list[str] = field(default_factory=list)
    """What qemu-io printed, command by command (the evidence notes.py reads)."""
    flagged_everywhere: bool = False
    """A request failed with CorruptionError on every side (and ended the requests)."""
    errors: dict[str, str] = field(default_factory=dict)
    """Each side's last failed request: its exception class (not folded) and message."""
    paths: dict[str, Path] = field(default_factory=dict)
    """Each side's image file."""
    case: Case | None = None
    image: bytes = b""
    """The damaged image every side started from."""
    model_table_punched: bool = False
    """After some request, the model's file had its L1 or refcount table punched to zeros."""
    trail: list[dict[str, str]] = field(default_factory=list)
    """Every request's outcome on each side, in order (the finding's request last)."""
    qemu_varied: bool = False
    """A replay of the same case had QEMU answer a request otherwise while the engines
    answered every request alike (campaign.qemu_varies; notes.QEMU_NONDETERMINISTIC)."""


def run_case(case: Case, base: Base, sidecars: dict[str, bytes], engines: list[str], workdir: Path) -> Run:
    """Run ``case`` on every engine (module names, or "qemu") in its own directory."""
    paths: dict[str, Path] = {}
    data = case.image_bytes(base)
    for e in engines:
        d = workdir / e
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for name, blob in sidecars.items():
            (d / name).write_bytes(blob)
        paths[e] = d / case.filename
        paths[e].write_bytes(data)
    run = Run(paths=paths, case=case, image=data)
    images: dict[str, Any] = {}
    try:
        opened = {}
        for e in engines:
            out, img = _outcome(_open, e, paths[e], False, run.qemu_log)
            opened[e] = "ok" if out == "ok" else f"refused ({out})"
            if img is not None:
                images[e] = img
        broken = any(v.startswith(("refused (crash", "refused (hang")) for v in opened.values())
        if broken or len({v == "ok" for v in opened.values()}) > 1:
            run.finding = Finding("open", -1, opened)
            return run
        run.opened = bool(images)
        if images:
            run.finding = _requests(case, images, run)
            if run.finding is not None:
                return run
            closed = {e: _outcome(_close, e, img)[0] for e, img in images.items()}
            images.clear()
            if _disagree(closed):
                run.finding = Finding("close", len(case.ops), closed)
                return run
        flags = {e: str(_corrupt_bit(p)) for e, p in paths.items()}
        if _disagree(flags):
            run.finding = Finding("corrupt-flag", len(case.ops), flags)
            return run
        reopened = {}
        for e in engines:
            out, img = _outcome(_open, e, paths[e], False, run.qemu_log)
            reopened[e] = "ok" if out == "ok" else "refused"
            if img is not None:
                _outcome(img.close)
        if _disagree(reopened):
            run.finding = Finding("reopen", len(case.ops), reopened)
            return run
        verdicts = {e: _verdict(p) for e, p in paths.items()}
        if _disagree(verdicts):
            run.finding = Finding("check", len(case.ops), verdicts)
        return run
    finally:
        for img in images.values():
            _outcome(img.close)


def _requests(case: Case, images: dict[str, Any], run: Run) -> Finding | None:
    for i, op in enumerate(case.ops):
        run.steps += 1
        results: dict[str, str] = {}
        for e, img in images.items():
            if op.kind == "read":
                out, got, detail = _outcome_detail(img.read, op.offset, op.n)
                results[e] = out if got is None else f"ok sha256:{hashlib.sha256(got).hexdigest()[:16]}"
            elif op.kind == "write":
                results[e], _, detail = _outcome_detail(img.write, op.offset, bytes([op.byte]) * op.n)
            elif op.kind == "write_zeroes":
                results[e], _, detail = _outcome_detail(img.write_zeroes, op.offset, op.n, unmap=op.unmap)
            elif op.kind == "discard":
                results[e], _, detail = _outcome_detail(img.discard, op.offset, op.n)
            else:
                results[e], _, detail = _outcome_detail(img.flush)
            if detail:
                run.errors[e] = detail
        run.trail.append(results)
        if "model" in images and not run.model_table_punched:
            run.model_table_punched = table_punched(run.image, run.paths["model"])
        if _disagree(results) or any(r.startswith("crash") or r == "hang" for r in results.values()):
            return Finding(op.kind, i, results)
        if "CorruptionError" in results.values():
            run.flagged_everywhere = True  # they agree (checked above), so every side failed so
            break
    return None


def table_punched(image: bytes, model_file: Path) -> bool:
    """The refcount table or the active L1 table (as the damaged image's header places them)
    holds something in ``image`` and reads as all zeros in ``model_file`` now: a discard
    punched it out (notes.TABLE_PUNCHED). Bounded reads: a damaged header may say anything."""
    if len(image) < 104 or image[:4] != b"QFI\xfb":
        return False
    cluster_bits = int.from_bytes(image[20:24], "big")
    if not 9 <= cluster_bits <= 21:
        return False
    l1 = (int.from_bytes(image[40:48], "big"), 8 * min(int.from_bytes(image[36:40], "big"), 1 << 16))
    reftable = (int.from_bytes(image[48:56], "big"),
                min(int.from_bytes(image[56:60], "big"), 16) << cluster_bits)
    try:
        with model_file.open("rb") as f:
            for off, n in (l1, reftable):
                before = image[off:off + n]
                f.seek(off)
                if before.strip(b"\0") and not f.read(n).strip(b"\0"):
                    return True
    except (OSError, ValueError, OverflowError):
        return False
    return False
