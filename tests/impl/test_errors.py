"""Reviewer findings on impl's error handling, each against what qemu-io does with the same
image: a failing host call, and headers whose numbers would exhaust memory."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import impl
from spec.errors import CorruptionError, Qcow2Error
from spec.hostio import HostIOError
from tests import qemu
from tests.impl.helpers import corrupt_bit

K, M = 1 << 10, 1 << 20


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE as a full disk: a write past ``limit`` fails with EFBIG (SIGXFSZ
    ignored), as ENOSPC or EIO would."""
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_sig)


def test_failed_host_write_fails_the_request_but_flags_nothing(tmp_path: Path) -> None:
    """Finding 1: a failing host write (disk full) is a HostIOError; the image is not
    flagged corrupt and later reads are served, as qemu-io does."""
    p = tmp_path / "i.qcow2"
    impl.create(p, 64 * M)
    img = impl.open(p)
    errors: list[Exception] = []
    with _file_size_limit(os.path.getsize(p) + 3 * 64 * K):
        for i in range(8):
            try:
                img.write(i * M, b"x" * 64 * K)
            except Qcow2Error as e:
                errors.append(e)
        assert img.read(0, 512) == b"x" * 512
    img.close()
    assert errors and all(isinstance(e, HostIOError) for e in errors)
    assert all(isinstance(e, CorruptionError) for e in errors)  # the documented class
    assert not corrupt_bit(p)

    q = tmp_path / "q.qcow2"
    qemu.create(q, "64M")
    argv = ["qemu-io", "-f", "qcow2"]
    for i in range(8):
        argv += ["-c", f"write -P 0x78 {i}M 64k"]
    argv += ["-c", "read -P 0x78 0 512", str(q)]
    limit = os.path.getsize(q) + 3 * 64 * K

    def child_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    r = subprocess.run(argv, capture_output=True, text=True, preexec_fn=child_limit)
    out = r.stdout + r.stderr
    assert "write failed" in out and "read 512/512" in out and "Pattern verification" not in out
    assert not corrupt_bit(q)


def test_failed_host_calls_are_host_io_errors(tmp_path: Path) -> None:
    """Every failing host call of HostFile (here a write and a truncate on a descriptor
    that refuses them) is a HostIOError, never a plain CorruptionError or an OSError."""
    from impl.hostfile import HostFile

    p = tmp_path / "i.qcow2"
    impl.create(p, 1 * M)
    h = HostFile(str(p), readonly=False)
    os.close(h.fd)
    h.fd = os.open(os.devnull, os.O_RDONLY)
    try:
        with pytest.raises(HostIOError):
            h.pwrite(0, b"x")
        with pytest.raises(HostIOError):
            h.truncate(0)
    finally:
        h.close()
