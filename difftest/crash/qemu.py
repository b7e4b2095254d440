"""Recording QEMU's own host writes: qemu-io over QEMU's ``blklogwrites`` filter.

blklogwrites (block/blklogwrites.c, built into Debian's qemu-utils 7.2) sits between the
qcow2 node and its file and appends every write, write-zeroes, discard and flush that reaches
the file to a log in the dm-log-writes format (Linux drivers/md/dm-log-writes.c): a
superblock sector (magic, version, entry count, sector size; little-endian), then per request
one sector holding (sector, nr_sectors, flags, data_len) followed by the written sectors
(none for a discard or a flush). Truncates are not logged: a shrink's truncation of the file
tail is missing from the stream, which leaves unreferenced bytes past the image's end in the
rebuilt states (harmless to every check).

qemu-io runs with ``-t writeback``, QEMU's default cache mode, so that its flushes (and the
flushes its metadata caches put between dependent writes) reach the log. One process serves
every operation (a reopen starts a new one that appends to the log), driven over stdin one
command at a time, and the log is read after each command, which splits the stream per
operation. What the guest may read after each operation comes from the model running the
same operations beside it (the lockstep holds the two to the same content), and it decides
which operations are refused (a refused one is not sent to qemu).

Resize is qemu-io's ``truncate`` (blk_truncate on the qcow2 node: qcow2_co_truncate, which
grows and shrinks). qemu-io has no snapshot commands: a snapshot operation closes qemu-io, runs
``qemu-img snapshot --image-opts`` over the same blklogwrites filter appending to the same
log, and opens qemu-io again, so its writes are in the stream in order. That close and
reopen flush as a guest reopen does, so for qemu a snapshot operation is also a flush point
(the oracle is told so). No external data file: blklogwrites logs one file per filter, and
two logs would not say in which order the image's and the data file's writes went out
(campaign.crash_configs leaves data files out for qemu).
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

from difftest.core.config import Config
from difftest.crash import engines
from difftest.crash.ops import FLUSHING, SNAPSHOTS, Op, apply
from difftest.crash.oracle import SECTOR, GuestOracle
from difftest.crash.recording import REFUSED, Recorded, Segment, observe
from spec import hostio
from spec.hostio import HostOp

WRITE_LOG_MAGIC = 0x6A736677736872
LOG_FLUSH_FLAG, LOG_FUA_FLAG, LOG_DISCARD_FLAG = 1, 2, 4
PROMPT = b"qemu-io> "


def parse_log(data: bytes, path: str) -> list[HostOp]:
    """The host calls in a blklogwrites log, in order (see the module doc)."""
    if len(data) < SECTOR:
        return []
    magic, _version, _n, ss = struct.unpack_from("<QQQI", data, 0)
    if magic != WRITE_LOG_MAGIC:
        raise ValueError("not a blklogwrites log")
    ops: list[HostOp] = []
    pos = ss
    while pos + 32 <= len(data):
        sector, nr, flags, _len = struct.unpack_from("<QQQQ", data, pos)
        if not (sector or nr or flags):
            break  # past the last entry (the log is preallocated by nothing; zeros end it)
        pos += ss
        if flags & LOG_FLUSH_FLAG:
            ops.append(HostOp(hostio.FLUSH, path))
        elif flags & LOG_DISCARD_FLAG:
            ops.append(HostOp(hostio.FALLOCATE, path, sector * ss, nr * ss,
                              mode=hostio.FALLOC_FL_PUNCH_HOLE | hostio.FALLOC_FL_KEEP_SIZE))
        else:
            body = data[pos:pos + nr * ss]
            ops.append(HostOp(hostio.WRITE, path, sector * ss, len(body), body))
            pos += nr * ss
    return ops


def logged_opts(image: Path, log: Path, *, append: bool) -> str:
    """--image-opts for the qcow2 node over blklogwrites."""
    return (f"driver=qcow2,file.driver=blklogwrites,file.file.filename={image},"
            f"file.log.filename={log}" + (",file.log-append=on" if append else ""))


def logged_snapshot(image: Path, log: Path, flag: str, name: str) -> str:
    """``qemu-img snapshot`` (-c, -a or -d) over blklogwrites; its error output, or ""."""
    r = subprocess.run(["qemu-img", "snapshot", "-q", flag, name, "--image-opts",
                        logged_opts(image, log, append=True)], capture_output=True, text=True,
                       cwd=str(image.parent))
    return "" if r.returncode == 0 else r.stderr.strip()


class LoggedQemuIo:
    """One qemu-io process on ``image`` through blklogwrites into ``log``."""

    def __init__(self, image: Path, log: Path, *, append: bool) -> None:
        opts = logged_opts(image, log, append=append)
        self.proc = subprocess.Popen(["qemu-io", "-t", "writeback", "--image-opts", opts],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, bufsize=0, cwd=str(image.parent))
        banner = self._response()
        if "could not" in banner.lower() or "error" in banner.lower():
            self.close()
            raise RuntimeError(f"qemu-io over blklogwrites: {banner.strip()}")

    def _response(self) -> str:
        assert self.proc.stdout is not None
        out = b""
        fd = self.proc.stdout.fileno()
        while not out.endswith(PROMPT):
            ready, _, _ = select.select([fd], [], [], 120)
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                raise RuntimeError(f"qemu-io stopped: {out.decode(errors='replace')}")
            out += chunk
        return out[:-len(PROMPT)].decode(errors="replace")

    def cmd(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        return self._response()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(60)


def command(op_kind: str, off: int, n: int, arg: int, src: Path, data: bytes) -> str:
    """The qemu-io command of a guest operation (the shape difftest/core/qemuio.py uses)."""
    if op_kind == "write":
        if arg < 256:
            return f"write -q -P {arg} {off} {n}"
        src.write_bytes(data)
        return f"write -q -s {src} {off} {n}"
    if op_kind == "write_zeroes":
        return f"write -q -z {'-u ' if arg else ''}{off} {n}"
    if op_kind == "discard":
        return f"discard -q {off} {n}"
    if op_kind == "write_compressed":
        return f"write -q -c -P {arg} {off} {n}"
    if op_kind == "flush":
        return "flush"
    if op_kind == "resize":
        return f"truncate {n}"
    raise ValueError(op_kind)


def read_log(log: Path, path: str) -> list[HostOp]:
    return parse_log(log.read_bytes(), path) if log.exists() else []


def run_logged(image: Path, log: Path, commands: Sequence[str | None]) -> list[int]:
    """Run ``commands`` (None: close and reopen) through blklogwrites; returns the number of
    logged calls after each command, and after the final close."""
    io = LoggedQemuIo(image, log, append=False)
    marks: list[int] = []
    try:
        for line in commands:
            if line is None:
                io.close()
                io = LoggedQemuIo(image, log, append=True)
            else:
                io.cmd(line)
            marks.append(len(read_log(log, str(image))))
    finally:
        io.close()
    marks.append(len(read_log(log, str(image))))
    return marks


def record_qemu(cfg: Config, ops: Sequence[Op], path: Path) -> Recorded:
    """Run ``ops`` through qemu-io over blklogwrites on ``path`` (see the module doc); the
    model runs them beside it on a copy, for the guest oracle."""
    base = path.read_bytes()
    beside = path.with_name("oracle.qcow2")
    beside.write_bytes(base)
    log = path.with_name("writes.log")
    log.write_bytes(b"")
    src = path.with_name("src.bin")
    module = engines.engine_module("model")
    img = engines.open_rw(module, str(beside))
    segments: list[Segment] = []
    errors: list[str] = []
    io = LoggedQemuIo(path, log, append=False)
    lo = 0
    try:
        oracle = GuestOracle(img.read(0, img.size))
        initial = oracle.copy()
        for op in ops:
            size = int(img.size)
            flushes = op.kind in FLUSHING
            if op.kind == "reopen":
                io.close()
                io = LoggedQemuIo(path, log, append=True)
                img.close()
                img = engines.open_rw(module, str(beside))
            else:
                try:
                    apply(img, op)
                except REFUSED as e:
                    errors.append(f"{op}: {type(e).__name__}: {e}")
                    segments.append(Segment(lo, lo, oracle.copy()))
                    continue
                if op.kind in SNAPSHOTS:
                    io.close()
                    flag = {"snapshot_create": "-c", "snapshot_apply": "-a",
                            "snapshot_delete": "-d"}[op.kind]
                    err = logged_snapshot(path, log, flag, op.name)
                    if err:
                        errors.append(f"{op}: qemu-img snapshot: {err}")
                    io = LoggedQemuIo(path, log, append=True)
                    flushes = True
                else:
                    io.cmd(command(op.kind, op.off, op.n, op.arg, src, op.data()))
            observe(oracle, op, img, size, beside)
            hi = len(read_log(log, str(path)))
            segments.append(Segment(lo, hi, oracle.copy()))
            lo = hi
            if flushes:
                oracle.flushed(img.read(0, img.size))
        io.close()
        stream = read_log(log, str(path))
        segments.append(Segment(lo, len(stream), oracle.copy()))
    finally:
        io.close()
        img.close()
    return Recorded({str(path): base}, stream, segments, initial, errors)
