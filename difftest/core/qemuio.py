"""A qcow2 image driven through ONE persistent ``qemu-io`` process (the oracle target).

Protocol, found by experiment with qemu-io 7.2 (qemu-io.c, command_loop):
- With stdin not a tty, qemu-io reads one line with stdio, runs it, prints the prompt
  ``qemu-io> `` and flushes. It reads stdin only when its event loop sees the fd readable,
  so commands sent ahead are stuck in the stdio buffer: we send one command, wait for the
  prompt, then send the next. The prompt is therefore the response delimiter.
- A prompt counts only at the very end of the output and at the start of a line: hexdump
  lines of ``read -v`` begin with an offset, so their ASCII column cannot fake it.
- stderr is merged into stdout so an error message stays in order with its prompt.
- ``-t unsafe``: qemu-io defaults to writethrough, which fdatasyncs after every write
  (2 ms each here). ``unsafe`` still writes the qcow2 metadata caches to the file on
  ``flush`` (bdrv_co_flush calls bdrv_co_flush_to_os; only the host sync is skipped), which
  is all ``qemu-img map -U`` and the teardown checks need.

Bytes come back through ``read -v`` (hexdump, parsed); long runs of one byte are verified
with ``read -P`` instead, which is exact and transfers nothing. Arbitrary bytes go in with
``write -s FILE`` (qemu-io 7.2's pattern-file option: the file is the buffer).
Snapshot operations close the process's image, run ``qemu-img snapshot`` and reopen it.

Encrypted images (``Secrets``): the passphrases go on qemu-io's and qemu-img's command
lines as ``--object secret,id=sec0,data=...`` and the image is named by driver options
(``encrypt.key-secret=sec0``, ``backing.encrypt.key-secret=sec1``): ``open -o`` inside
qemu-io, ``--image-opts`` for qemu-img. Every qemu-img run on a file needs its keys, also
the ones made outside a target (core/oracle.py), so a target ``remember``s them per path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from difftest.adapters.isolation import OUT_OF_MEMORY, Limits
from spec.errors import CorruptionError, Qcow2Error, RequestError, UnsupportedFeature

PROMPT = b"qemu-io> "
TIMEOUT = 120.0
"""Seconds without output after which qemu-io is considered hung (a 2 MiB-cluster
compressed write of a whole cluster is the slowest legitimate command)."""


def available() -> bool:
    return shutil.which("qemu-io") is not None and shutil.which("qemu-img") is not None


PBKDF2_FLAKE = "Unable to get accurate CPU usage"
"""What qemu-img prints when its PBKDF2 benchmark (crypto/pbkdf.c, qcrypto_pbkdf2_count_iters,
run when a LUKS key slot is created) measured too little CPU time: it reads the process's
CPU usage, which a busy machine makes unreliable. The refusal says nothing about the request,
so it is retried (50-70% of LUKS creates failed so on this 2-core machine under load)."""
PBKDF2_RETRIES = 200


def run_qemu_img(argv: Sequence[str], cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a qemu-img command line (``argv[0]`` is the program), retrying the PBKDF2
    benchmark's spurious refusal (PBKDF2_FLAKE) and nothing else. The one place in difftest
    that retries it (tests/qemu.py has the tests' own)."""
    for _ in range(PBKDF2_RETRIES):
        r = subprocess.run(list(argv), cwd=None if cwd is None else str(cwd), capture_output=True,
                           text=True)
        if r.returncode == 0 or PBKDF2_FLAKE not in r.stderr:
            break
    return r


@dataclass(frozen=True)
class Secrets:
    """The passphrases of an image chain, as QEMU takes them: the top image's under id sec0,
    the encrypted backing layers' under sec1 (one key for all of them, the model's
    ``backing_key_secret``). ``backing_depth`` is how many qcow2 layers below the top are
    encrypted: each needs its own ``backing.``-prefixed option."""

    key: str | None = None
    backing_key: str | None = None
    backing_depth: int = 0

    def objects(self) -> list[str]:
        """``--object`` arguments for qemu-io and qemu-img (the data has no commas)."""
        out = []
        if self.key is not None:
            out += ["--object", f"secret,id=sec0,data={self.key}"]
        if self.backing_key is not None:
            out += ["--object", f"secret,id=sec1,data={self.backing_key}"]
        return out

    def open_options(self) -> str:
        """The driver options that unlock the chain (for ``open -o`` and ``--image-opts``)."""
        opts = ["encrypt.key-secret=sec0"] if self.key is not None else []
        if self.backing_key is not None:
            opts += ["backing." * d + "encrypt.key-secret=sec1" for d in range(1, self.backing_depth + 1)]
        return ",".join(opts)

    def image_opts(self, path: str | Path, fmt: str = "qcow2") -> str:
        """An ``--image-opts`` image: driver, file name (commas doubled, QEMU's escape) and keys."""
        opts = self.open_options()
        return f"driver={fmt},file.filename={str(path).replace(',', ',,')}" + (f",{opts}" if opts else "")


_SECRET_DATA = re.compile(r"(secret,id=[^,\s]+,data=)[^,\s']+")


def redact(text: str) -> str:
    """``text`` (a command line, an error) with the data of every ``--object secret``
    replaced: the harness's messages and notes name the objects, never the keys (repro.sh,
    which must run, is the one place that spells them out)."""
    return _SECRET_DATA.sub(r"\1***", text)


_SECRETS: dict[str, Secrets] = {}
"""Per file (resolved path), the keys every qemu-img run on it needs (see ``remember``)."""


def remember(path: str | Path, secrets: Secrets | None) -> None:
    """Record the keys of ``path`` for every later qemu-img run on it in this process
    (None: it has none, and any earlier entry for the path is dropped)."""
    if secrets is None:
        forget(path)
    else:
        _SECRETS[str(Path(path).resolve())] = secrets


def forget(path: str | Path) -> None:
    _SECRETS.pop(str(Path(path).resolve()), None)


def secrets_for(path: str | Path) -> Secrets | None:
    return _SECRETS.get(str(Path(path).resolve()))


def img_args(paths: Sequence[str | Path], fmt: str = "qcow2") -> list[str]:
    """The tail of a qemu-img command line naming ``paths`` (one, or two for compare):
    ``-f fmt [-F fmt] PATH...``, or, when any of them has keys (``remember``), the secret
    objects, ``--image-opts`` and one driver-options string per path (qemu-img then takes
    every image that way). The files of one run share their keys, so one set of objects
    serves them all."""
    found = [secrets_for(p) for p in paths]
    if not any(found):
        return ["-f", fmt, *(["-F", fmt] if len(paths) > 1 else []), *map(str, paths)]
    # Each secret once: the objects of every path, keeping the ``--object`` flags apart.
    objs = dict.fromkeys(o for sec in found if sec for o in sec.objects()[1::2])
    objects = [a for o in objs for a in ("--object", o)]
    return [*objects, "--image-opts", *((sec or Secrets()).image_opts(p, fmt)
                                        for p, sec in zip(paths, found, strict=True))]


class QemuIoDied(Qcow2Error):
    """qemu-io exited or hung: an oracle crash, reported as a divergence of its own.
    ``finding_class`` says which, in the classes of a foreign implementation
    (difftest/adapters/isolation.py): hang, crash or memory."""

    def __init__(self, message: str, finding_class: str = "crash") -> None:
        self.finding_class = finding_class
        super().__init__(message)


COMMAND_MEMORY_BASE = 512 << 20
"""Address space a command adapter (``cmd:``) gets besides the adapter memory limit: it is a
whole program (an interpreter, say), not a worker measured after its imports."""


def error_class(text: str) -> type[Qcow2Error]:
    """The spec.errors class a qemu-io/qemu-img failure message stands for.

    qemu reports errno strings. Out-of-range and misaligned requests are EIO/EINVAL
    (block/block-backend.c, blk_check_byte_request; block/io.c), which are the caller's
    fault; ENOTSUP means the image uses a combination qemu refuses (e.g. compressed
    writes with an external data file, qcow2_co_pwritev_compressed_task); a corrupt flag
    (qcow2_signal_corruption prints "Marking image as corrupt") is CorruptionError.
    """
    low = text.lower()
    if "marking image as corrupt" in low or "image is corrupt" in low or "no medium found" in low:
        return CorruptionError
    if "not supported" in low:
        return UnsupportedFeature
    return RequestError


_FAIL = re.compile(r"(failed|error|not found|can't|cannot|could not|unable|must|invalid|not supported"
                   r"|^qemu-io: )", re.IGNORECASE | re.MULTILINE)
"""What marks a qemu-io reply as a failure: block-layer errors print "... failed: <errno>",
and error_report() lines start with the program name ("qemu-io: The new size must be...")."""


_LOGGED_ONLY = re.compile(r"^(qcow2_free_clusters failed: [^\n]*"
                          r"|qcow2: Image is corrupt: [^\n]*; further non-fatal corruption events will be "
                          r"suppressed"
                          r"|qcow2: Marking image as corrupt: [^\n]*; further corruption events will be "
                          r"suppressed"
                          r"|qemu-io: warning: [^\n]*)(\n|$)", re.MULTILINE)
"""Messages QEMU logs without failing the request by themselves: a failed refcount
decrement (block/qcow2-refcount.c, qcow2_free_clusters); a non-fatal corruption event
(qcow2_signal_corruption with fatal=false, block/qcow2.c: e.g. "Cannot free unaligned
cluster" from qcow2_free_any_cluster), which neither sets the corrupt bit nor fails the
request; a warning (warn_report: e.g. "a program lacking bitmap support modified this
file", when the bitmaps autoclear bit is clear and the extension is there), which neither
fails an open nor a request; and the fatal kind, "Marking image as corrupt", which drops the node
(QemuIo.dropped) but fails the request only if the request says so itself: a free inside a
zero write that meets an unaligned refcount block flags the image and the write still
succeeds ("wrote ..."). Every later request then fails with ENOMEDIUM, which is what an
engine's flagged image answers with CorruptionError (error_class)."""


_UNTERMINATED = b"on the image file to fix."
"""The end of the one message QEMU 7.2 prints without a newline (qcow2_do_open, after
clearing the bitmaps autoclear bit: "Some clusters may be leaked, run 'qemu-img check -r'
on the image file to fix."), so the prompt follows it on the same line."""


class QemuIo:
    """The raw command channel: ``cmd(line) -> output text`` (prompt stripped)."""

    def __init__(self, path: str | Path, *, fmt: str = "qcow2", readonly: bool = False,
                 command: list[str] | None = None, options: str = "",
                 objects: Sequence[str] = ()) -> None:
        argv = list(command) if command else ["qemu-io", "-t", "unsafe", "-f", fmt]
        argv += objects  # --object secret,... (Secrets.objects)
        if readonly:
            argv.append("-r")
        if not options:
            argv.append(str(path))
        # else: qemu-io 7.2 takes driver options on its command line only with --image-opts,
        # which then refuses every later ``open -o`` (QemuImage.resume); so the process
        # starts without an image and opens it with ``open -o`` like every reopen.
        self.argv = argv
        self.foreign = bool(command)
        """A command adapter: foreign code, held to the adapter limits (isolation.Limits):
        a wall-clock limit on every command (not only on silence, as qemu-io has) and an
        address-space cap; its own process group, so a kill ends whatever it started."""
        self.limits = Limits.from_env()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, bufsize=0, cwd=str(Path(path).parent),
                                     start_new_session=self.foreign)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.foreign and self.limits.memory_mib > 0:
            # Set from outside once it runs: a preexec_fn is unsafe in a threaded harness.
            cap = COMMAND_MEMORY_BASE + (self.limits.memory_mib << 20)
            with contextlib.suppress(OSError):
                resource.prlimit(self.proc.pid, resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
        self._out = self.proc.stdout.fileno()
        self._in = self.proc.stdin
        # poll(), not select(): a long campaign's descriptors can be numbered above 1024.
        # One poller for the process's life: _response runs for every command.
        self._poller = select.poll()
        self._poller.register(self._out, select.POLLIN | select.POLLHUP | select.POLLERR)
        self.commands = 0
        self.dropped = False
        """qemu-io printed "Marking image as corrupt" (qcow2_signal_corruption, fatal): QEMU
        has dropped the node, and every later request fails with ENOMEDIUM."""
        self.banner = self._response()
        if options:
            self.banner += self.cmd(f"open -t unsafe {'-r ' if readonly else ''}-o driver={fmt},{options} "
                                    f"{path}")

    def _response(self) -> str:
        chunks: list[bytes] = []
        tail = b""
        poller = self._poller
        deadline = time.monotonic() + self.limits.seconds if self.foreign else None
        who = "the command adapter" if self.foreign else "qemu-io"
        while True:
            wait = TIMEOUT if deadline is None else deadline - time.monotonic()
            if wait <= 0 or not poller.poll(wait * 1000):
                self.kill()
                raise QemuIoDied(f"{who} hung; output so far: {b''.join(chunks)[-500:]!r}", "hang")
            chunk = os.read(self._out, 1 << 20)
            if not chunk:
                code = self.kill()
                out = b"".join(chunks)[-500:]
                how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else \
                    f"exit {code}"
                memory = any(m.encode() in out for m in OUT_OF_MEMORY)
                raise QemuIoDied(f"{who} exited ({how}); output: {out!r}", "memory" if memory else "crash")
            chunks.append(chunk)
            tail = (tail + chunk)[-(len(PROMPT) + len(_UNTERMINATED)):]
            before = tail[-len(PROMPT) - 1:-len(PROMPT)]
            if tail.endswith(PROMPT) and (len(tail) == len(PROMPT) or before == b"\n"
                                          or tail.endswith(_UNTERMINATED + PROMPT)):
                break
            if len(chunks) == 1 and chunk == PROMPT:
                break
        data = b"".join(chunks)
        return data[: -len(PROMPT)].decode("latin-1")

    def cmd(self, line: str) -> str:
        if self.proc.poll() is not None:
            raise QemuIoDied(f"qemu-io is not running (exit {self.proc.returncode})")
        self.commands += 1
        try:
            self._in.write(line.encode() + b"\n")
        except BrokenPipeError as e:
            raise QemuIoDied("qemu-io closed its stdin") from e
        out = self._response()
        if "Marking image as corrupt" in out:
            self.dropped = True
        return out

    def checked(self, line: str, *, quiet: bool = False) -> str:
        """Run ``line``; raise the matching spec.errors class if qemu-io reports a failure.

        ``quiet``: the command prints nothing when it succeeds (``-q`` I/O, flush, truncate,
        open, close), so any output at all is the failure message; qemu-io's messages have
        no common form ("write failed: ...", "16385 is not a sector-aligned value for
        'offset'", "qemu-io: The new size must be a multiple of 512").
        """
        out = self.cmd(line)
        if not out:
            return out  # nothing printed: a success, whatever the command
        # A refcount decrement that fails after the request's own work is only logged
        # (qcow2_free_clusters reports it and goes on; the request succeeds, the clusters
        # leak): that line is not the request's failure.
        judged = _LOGGED_ONLY.sub("", out)
        if quiet:
            if judged.strip():
                raise error_class(out)(f"qemu-io {line!r}: {out.strip()}")
            return out
        # A reply that starts with a hexdump line is a successful ``read -v`` (qemu-io dumps
        # only what it read); its ASCII column could spell anything, so it is not searched.
        if judged and not _HEXLINE.match(judged) and _FAIL.search(judged):
            raise error_class(out)(f"qemu-io {line!r}: {out.strip()}")
        return out

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                self._in.write(b"quit\n")
                self._in.close()
                self.proc.wait(30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                pass
        self.kill()  # reaps it, ends what a command adapter left running, closes the pipes

    def kill(self) -> int | None:
        """End the process (and, for a command adapter, its process group), reap it and
        close our ends of its pipes, which would otherwise stay open as long as anything
        (a kept exception) refers to this object; its exit status."""
        if self.foreign:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        elif self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()
        return code


def parse_hexdump(text: str, n: int) -> bytes:
    """The bytes of ``read -v``'s dump (qemu_hexdump: 16 bytes a line, offset first)."""
    parts: list[str] = []
    got = 0
    for line in text.splitlines():
        if got >= n:
            break
        if len(line) < 11 or line[8] != ":":
            continue
        k = min(16, n - got)
        parts.append(line[11: 11 + 3 * k - 1])
        got += k
    try:
        out = bytes.fromhex("".join(parts))
    except ValueError as e:
        raise QemuIoDied(f"unreadable hexdump: {text[:200]!r}") from e
    if len(out) != n:
        raise QemuIoDied(f"short hexdump: {len(out)} of {n} bytes")
    return out


def runs(data: bytes, min_run: int) -> list[tuple[int, int, int | None]]:
    """Split ``data`` into (start, length, byte) runs of one byte at least ``min_run`` long
    and (start, length, None) pieces in between: the maximal runs of one byte, the long
    ones kept, the rest merged into the pieces around them."""
    n = len(data)
    if data and data.count(data[:1]) == n:
        return [(0, n, data[0])] if n >= min_run else [(0, n, None)]
    a = np.frombuffer(data, np.uint8)
    # Where each maximal run starts (numpy finds the byte changes at C speed; random data
    # has one every byte), and the long runs among them.
    bounds = np.concatenate(([0], np.flatnonzero(a[1:] != a[:-1]) + 1, [n]))
    long_runs = np.flatnonzero(bounds[1:] - bounds[:-1] >= min_run)
    out: list[tuple[int, int, int | None]] = []
    last = 0
    for j in long_runs.tolist():
        i, k = int(bounds[j]), int(bounds[j + 1])
        if last < i:
            out.append((last, i - last, None))
        out.append((i, k - i, data[i]))
        last = k
    if last < n:
        out.append((last, n - last, None))
    return out


_HEXLINE = re.compile(r"[0-9a-f]{8}:  ")
_ALLOC_LINE = re.compile(r"(\d+)/(\d+) bytes allocated at offset ")
_MAP_LINE = re.compile(r"\((0x[0-9a-f]+)\) bytes\s+(not )?allocated at offset .*?\((0x[0-9a-f]+)\)")


class QemuImage:
    """spec.interface.Image over a persistent qemu-io. ``path`` is the qcow2 file."""

    READ_V_MAX = 1 << 20
    """Longest hexdump we ask for; longer reads are split."""

    def __init__(self, path: str | Path, *, readonly: bool = False, command: list[str] | None = None,
                 size: int | None = None, cluster_size: int | None = None, options: str = "",
                 secrets: Secrets | None = None) -> None:
        # Absolute: qemu-io and qemu-img run in the image's folder (where QEMU 7.2 looks for a
        # relative data file), so a path relative to ours would name nothing there.
        self.path = Path(path).absolute()
        self.readonly = readonly
        self.secrets = secrets if secrets is not None else secrets_for(self.path)
        """The keys of an encrypted image (None: the ones ``remember``ed for the path, if any)."""
        if self.secrets is not None and self.secrets.open_options():
            options = ",".join(o for o in (options, self.secrets.open_options()) if o)
        self.options = options
        """QEMU driver options for every open (``l2-cache-size=...,overlap-check=...``, keys)."""
        self.io: QemuIo | None = QemuIo(self.path, readonly=readonly, command=command, options=options,
                                        objects=self.secrets.objects() if self.secrets else ())
        if _FAIL.search(_LOGGED_ONLY.sub("", self.io.banner)):
            err = self.io.banner
            self.io.kill()
            self.io = None
            raise error_class(err)(f"qemu-io could not open {path}: {err.strip()}")
        # The file that ``write -s`` reads arbitrary bytes from (one per image, reused).
        self._src_fd, self._src = tempfile.mkstemp(prefix="qcow2lab-src-", suffix=".bin")
        self._src_len = 0
        self._src_exact = command is not None
        if size is None or cluster_size is None:
            info = self.info()
            size, cluster_size = int(info["virtual-size"]), int(info.get("cluster-size", 65536))
        self.size = size
        self.cluster_size = cluster_size

    # -- plumbing ---------------------------------------------------------------------
    @property
    def dropped(self) -> bool:
        """QEMU flagged the image corrupt and dropped the node (see QemuIo.dropped)."""
        return self.io is not None and self.io.dropped

    def _io(self) -> QemuIo:
        if self.io is None:
            raise RequestError("image is closed")
        return self.io

    def _failure(self, text: str, offset: int, n: int, *, compressed: bool = False) -> Qcow2Error:
        """The spec.errors exception for a failed guest request. qemu reports both an
        out-of-range request and an image it cannot read (a compressed cluster that does not
        decode, qcow2_co_preadv_compressed, met by a read or a copy-on-write) as EIO; for a
        request inside the image only the second is possible, and that is what the model
        calls CorruptionError. A compressed write is the exception: EIO there means the
        cluster is already allocated (qcow2_alloc_compressed_cluster_offset), the caller's
        fault. So is a host file error that QEMU passes on as its errno (EFBIG for a table
        a damaged offset puts past the host's file size limit, ENOSPC): the engines raise
        spec.hostio.HostIOError there, the CorruptionError that flags nothing."""
        cls = error_class(text)
        host_errno = "File too large" in text or "No space left on device" in text
        if cls is RequestError and not compressed and ("Input/output error" in text or host_errno) and \
                offset >= 0 and offset + n <= self.size:
            cls = CorruptionError
        return cls(text.strip())

    def _request(self, line: str, offset: int, n: int, *, quiet: bool = True,
                 compressed: bool = False) -> str:
        """Run a guest I/O command on [offset, offset+n); see _failure for its errors."""
        try:
            return self._io().checked(line, quiet=quiet)
        except RequestError as e:
            raise self._failure(str(e), offset, n, compressed=compressed) from None

    def __enter__(self) -> QemuImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- guest I/O ----------------------------------------------------------------------
    def read(self, offset: int, n: int) -> bytes:
        if n == 0:
            self._request(f"read -q {offset} 0", offset, 0)
            return b""
        out = bytearray()
        pos = offset
        while pos < offset + n:
            k = min(self.READ_V_MAX, offset + n - pos)
            text = self._request(f"read -v {pos} {k}", pos, k, quiet=False)
            out += parse_hexdump(text, k)
            pos += k
        return bytes(out)

    def matches(self, offset: int, expected: bytes) -> bool:
        """Whether qemu reads ``expected`` at ``offset``; runs of one byte are checked with
        ``read -P`` (no transfer), the rest through the hexdump."""
        io = self._io()
        for start, length, byte in runs(expected, 512):
            if byte is None:
                if self.read(offset + start, length) != expected[start: start + length]:
                    return False
            else:
                out = io.cmd(f"read -q -P {byte:#x} {offset + start} {length}")
                if "verification failed" in out:
                    return False
                if out.strip():  # quiet on success: anything else is a failure
                    raise self._failure(out, offset + start, length)
        return True

    def _put_source(self, data: bytes) -> None:
        """Make ``data`` the start of the ``write -s`` file. qemu-io reads only as many
        bytes as the request is long (qemu-io-cmds.c, qemu_io_alloc_from_file), so the file
        is overwritten in place, not truncated and rewritten (an open with O_TRUNC cost a
        millisecond on a busy machine); a command adapter gets a file exactly as long as
        the data, as it may read the whole file."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self._src_fd, view[done:], done)
        if self._src_exact and self._src_len > len(data):
            os.ftruncate(self._src_fd, len(data))
        self._src_len = len(data) if self._src_exact else max(self._src_len, len(data))

    def write(self, offset: int, data: bytes) -> None:
        if data and data == bytes([data[0]]) * len(data):
            self._request(f"write -q -P {data[0]:#x} {offset} {len(data)}", offset, len(data))
            return
        self._put_source(data)
        if not data:
            self._request(f"write -q {offset} 0", offset, 0)
            return
        self._request(f"write -q -s {self._src} {offset} {len(data)}", offset, len(data))

    def write_zeroes(self, offset: int, n: int, *, unmap: bool = False) -> None:
        self._request(f"write -q -z{' -u' if unmap else ''} {offset} {n}", offset, n)

    def discard(self, offset: int, n: int) -> None:
        self._request(f"discard -q {offset} {n}", offset, n)

    def write_compressed(self, offset: int, data: bytes) -> None:
        if not data:  # ``-s`` refuses an empty pattern file
            self._request(f"write -q -c {offset} 0", offset, 0, compressed=True)
            return
        if data == bytes([data[0]]) * len(data):
            self._request(f"write -q -c -P {data[0]:#x} {offset} {len(data)}", offset, len(data),
                          compressed=True)
            return
        self._put_source(data)
        self._request(f"write -q -c -s {self._src} {offset} {len(data)}", offset, len(data),
                      compressed=True)

    def flush(self) -> None:
        """The guest's flush. qemu-io prints nothing when a flush fails (flush_f returns
        blk_flush's error unprinted), so the failure shows only as the "Marking image as
        corrupt" of a write-back the overlap check refused, or, once the node is dropped,
        not at all (ENOMEDIUM): both are the flagged image's CorruptionError."""
        io = self._io()
        dropped = io.dropped
        out = self.sync()
        if dropped or "Marking image as corrupt" in out:
            raise CorruptionError(f"qemu-io 'flush': {out.strip() or 'no medium, the node was dropped'}")

    def sync(self) -> str:
        """Write QEMU's caches to the file before qemu-img reads it (map, info)."""
        return self._io().checked("flush", quiet=True)

    def resize(self, new_size: int, *, shrink: bool = False) -> None:
        # qemu-img resize refuses to shrink without --shrink (qemu-img.c, img_resize);
        # qemu-io's truncate has no such guard, so the guard is applied here.
        if new_size < self.size and not shrink:
            raise RequestError("shrinking needs shrink=True (qemu-img resize --shrink)")
        self._io().checked(f"truncate {new_size}", quiet=True)
        # qemu may round the request (qcow2_co_truncate); take the size it settled on.
        self.size = int(self.info()["virtual-size"])

    # -- open/close -------------------------------------------------------------------
    def close(self) -> None:
        if self.io is not None:
            self.io.quit()
            self.io = None
        if self._src_fd >= 0:
            os.close(self._src_fd)
            self._src_fd = -1
        if os.path.exists(self._src):
            os.unlink(self._src)

    def suspend(self) -> None:
        """Close the image inside qemu-io (the process stays) so qemu-img can use the file."""
        self._io().checked("close", quiet=True)

    def resume(self) -> None:
        opts = "-r " if self.readonly else ""
        extra = f",{self.options}" if self.options else ""
        self._io().checked(f"open -t unsafe {opts}-o driver=qcow2{extra} {self.path}", quiet=True)

    def reopen(self) -> None:
        self.suspend()
        self.resume()

    # -- metadata through qemu-img (the image is flushed first, read with -U) -----------
    def _img(self, *args: str, keys: bool = True, fmt: bool = True, driver: bool = False) -> str:
        """Run qemu-img ``args`` on this image (with its keys, by ``--image-opts``, when
        encrypted). ``qemu-img info`` takes none (``keys=False``): it opens the image
        without its backing chain (BDRV_O_NO_BACKING, then walks the chain itself), so it
        refuses ``backing.*`` options, and it reads no guest data, so it needs no key.
        ``qemu-img snapshot`` has no ``-f`` (``fmt=False``), but takes ``--image-opts``;
        ``driver`` opens it with this image's driver options (overlap-check, cache sizes)
        as well, the keys included."""
        argv = ["qemu-img", *args]
        if driver and self.options:
            objects = self.secrets.objects() if self.secrets is not None else ()
            argv += [*objects, "--image-opts",
                     f"driver=qcow2,file.filename={str(self.path).replace(',', ',,')},{self.options}"]
        elif self.secrets is not None and keys:
            argv += [*self.secrets.objects(), "--image-opts", self.secrets.image_opts(self.path)]
        else:
            argv += [*(["-f", "qcow2"] if fmt else []), str(self.path)]
        r = subprocess.run(argv, capture_output=True, text=True, cwd=str(self.path.parent))
        if r.returncode != 0:
            raise error_class(r.stderr)(f"qemu-img {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def map(self, offset: int = 0, n: int | None = None) -> list[dict[str, Any]]:
        if self.io is not None and not self.readonly:
            self.sync()
        args = ["map", "--output=json", "-U"]
        if offset:
            args += ["--start-offset", str(offset)]
        if n is not None:
            args += ["--max-length", str(n)]
        return list(json.loads(self._img(*args)))

    def present_runs(self) -> list[tuple[int, int, bool]]:
        """(start, length, allocated) over the whole image from qemu-io's ``map`` command,
        which asks bdrv_is_allocated of the top image (qemu-io-cmds.c, map_is_allocated):
        allocation in this layer, without spawning a process."""
        out = self._io().cmd("map")
        found = _MAP_LINE.findall(out)
        if len(found) != len(out.strip().splitlines()):  # every line of a good reply is an extent
            raise error_class(out)(f"qemu-io 'map': {out.strip()[:500]}")
        return [(int(start, 16), int(length, 16), not_ == "") for length, not_, start in found]

    def allocated_bytes(self, offset: int, n: int) -> int:
        """How many bytes of [offset, offset+n) the top image allocates: qemu-io's ``alloc``
        (bdrv_is_allocated summed over the range, qemu-io-cmds.c alloc_f), one short line
        however fragmented the image is."""
        out = self._io().cmd(f"alloc {offset} {n}")
        m = _ALLOC_LINE.match(out)
        if m is None:
            raise error_class(out)(f"qemu-io 'alloc {offset} {n}': {out.strip()[:500]}")
        return int(m.group(1))

    def info(self) -> dict[str, Any]:
        if self.io is not None and not self.readonly and hasattr(self, "size"):
            self.sync()  # qemu-img reads the file: the metadata caches must be in it
        return dict(json.loads(self._img("info", "--output=json", "-U", keys=False)))

    def _snapshot(self, flag: str, name: str) -> None:
        self.suspend()
        try:
            # The engines run a snapshot operation on the image they have open, with its
            # options; qemu-img gets the same ones. overlap-check=all decides there: a
            # snapshot's L2 tables are inactive ones, and QEMU 7.2 refuses its own
            # write-back of an L2 table a new snapshot shares ("overlaps with inactive L2
            # table") where the default mode lets it through.
            self._img("snapshot", "-q", flag, name, fmt=False, driver=True)
        except Qcow2Error as e:
            self._after_snapshot(flag)
            if "Marking image as corrupt" in str(e):
                # qemu-img flagged the image (qcow2_signal_corruption). A v3 file keeps the
                # corrupt bit and refuses the read-write reopen: the qemu side then holds a
                # flagged image, as after qemu-io printed this (QemuIo.dropped), and the
                # reopen's error must not take the operation's place. A v2 header has no
                # such bit, and the reopened image serves requests again.
                try:
                    self.resume()
                except Qcow2Error:
                    self._io().dropped = True
            else:
                self.resume()
            raise
        self._after_snapshot(flag)
        self.resume()

    def _after_snapshot(self, flag: str) -> None:
        if flag == "-a":
            # Applying a snapshot restores its virtual size first (qcow2_snapshot_goto
            # truncates, then takes references), so even a failed apply, such as a
            # refcount overflow, can leave the image at the snapshot's size.
            self.size = int(json.loads(self._img("info", "--output=json", keys=False))["virtual-size"])

    def snapshot_create(self, name: str) -> None:
        self._snapshot("-c", name)

    def snapshot_apply(self, name: str) -> None:
        self._snapshot("-a", name)

    def snapshot_delete(self, name: str) -> None:
        self._snapshot("-d", name)

    def snapshots(self) -> list[dict[str, Any]]:
        return list(self.info().get("snapshots", []))
