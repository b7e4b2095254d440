"""spec/locking.py against live QEMU 7.2 processes: the same lock bytes, the same conflicts.

A real ``qemu-io`` is started interactively with its stdin held open, so it keeps the
image open (and locked) until the test closes stdin.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from spec.errors import RequestError
from spec.locking import (
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    ImageLock,
    LockMode,
    conflicts,
    lock_mode,
)
from tests.qemu import create

RW_PERM = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE
UNSHARED = BLK_PERM_WRITE | BLK_PERM_RESIZE


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return create(tmp_path / "lock.qcow2", "1M")


@contextmanager
def live_qemu_io(path: Path, *flags: str, expect_perm: int,
                 watch: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """An interactive qemu-io holding ``path`` open until the block ends.

    Waits until its locks are visible on ``watch`` (default ``path``): ``expect_perm`` held
    bits, so the test never races the open. It runs in the image's directory, because QEMU
    7.2 resolves a relative external data file name against the working directory.
    """
    proc = subprocess.Popen(["qemu-io", *flags, "-f", "qcow2", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=path.parent)
    try:
        deadline = time.monotonic() + 20
        while conflicts(watch or path)["perm"] != expect_perm:
            if proc.poll() is not None:
                raise AssertionError(f"qemu-io exited: {proc.stderr.read() if proc.stderr else b''!r}")
            if time.monotonic() > deadline:
                raise AssertionError("qemu-io did not take its locks")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=20)
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


def qemu_opens(*argv: str) -> bool:
    """True if a one-shot qemu-io / qemu-img command could open the image."""
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0:
        assert "lock" in r.stderr, r.stderr  # refused for locking, not for anything else
    return r.returncode == 0


def test_lock_modes_match_what_qemu_7_2_takes() -> None:
    assert lock_mode(write=True) == LockMode(RW_PERM, 0xF & ~UNSHARED)
    assert lock_mode(write=False) == LockMode(BLK_PERM_CONSISTENT_READ, 0xF & ~UNSHARED)
    assert lock_mode(write=False, no_io=True) == LockMode(0, 0xF & ~UNSHARED)
    assert lock_mode(write=False, force_share=True) == LockMode(BLK_PERM_CONSISTENT_READ, 0xF)
    assert lock_mode(write=False, force_share=True, no_io=True) == LockMode(0, 0xF)
    assert lock_mode(write=True).perm_bytes == [100, 101, 103]
    assert lock_mode(write=True).unshared_bytes == [201, 203]
    with pytest.raises(RequestError):
        lock_mode(write=True, force_share=True)


@pytest.mark.parametrize(("flags", "write", "force_share"), [
    ((), True, False), (("-r",), False, False), (("-r", "-U"), False, True)])
def test_our_lock_bytes_equal_qemu_io_lock_bytes(image: Path, flags: tuple[str, ...], write: bool,
                                                 force_share: bool) -> None:
    mode = lock_mode(write=write, force_share=force_share)
    with live_qemu_io(image, *flags, expect_perm=mode.perm):
        theirs = conflicts(image)
    with open(image, "rb") as f, ImageLock(f) as lock:
        lock.acquire(write=write, force_share=force_share)
        ours = conflicts(image)
    assert ours == theirs == {"perm": mode.perm, "unshared": 0xF & ~mode.shared}
    assert conflicts(image) == {"perm": 0, "unshared": 0}  # released


@pytest.mark.parametrize(("flags", "write", "force_share"), [
    ((), True, False), (("-r",), False, False), (("-r", "-U"), False, True)])
def test_data_file_lock_bytes_equal_qemu_io(tmp_path: Path, flags: tuple[str, ...], write: bool,
                                            force_share: bool) -> None:
    """QEMU locks an external data file too, sharing WRITE on it but not RESIZE."""
    img = create(tmp_path / "df.qcow2", "1M", data_file="df.data")
    data = tmp_path / "df.data"
    mode = lock_mode(write=write, force_share=force_share, data_file=True)
    assert not mode.shared & BLK_PERM_RESIZE or force_share
    assert mode.shared & BLK_PERM_WRITE
    with live_qemu_io(img, *flags, expect_perm=mode.perm, watch=data):
        theirs = conflicts(data)
    with open(data, "rb") as f, ImageLock(f) as lock:
        lock.acquire(write=write, force_share=force_share, data_file=True)
        ours = conflicts(data)
    assert ours == theirs == {"perm": mode.perm, "unshared": 0xF & ~mode.shared}


def test_write_acquire_fails_while_qemu_io_holds_image_rw(image: Path) -> None:
    with live_qemu_io(image, expect_perm=RW_PERM), open(image, "rb+") as f:
        lock = ImageLock(f)
        with pytest.raises(RequestError):
            lock.acquire(write=True)
        assert not lock.held
        # A plain read-only open unshares WRITE, which qemu-io holds: refused too, as qemu-io -r is.
        with pytest.raises(RequestError):
            lock.acquire(write=False)
        # The failed attempts left none of our bytes behind.
        assert conflicts(image) == {"perm": RW_PERM, "unshared": UNSHARED}
    # Once qemu-io has gone, the same request succeeds.
    with open(image, "rb+") as f, ImageLock(f) as lock:
        assert lock.acquire(write=True).perm == RW_PERM


def test_qemu_refuses_to_open_while_we_hold_the_write_lock(image: Path) -> None:
    p = str(image)
    with open(image, "rb+") as f, ImageLock(f, path=p) as lock:
        lock.acquire(write=True)
        assert not qemu_opens("qemu-io", "-f", "qcow2", "-c", "read 0 512", p)
        assert not qemu_opens("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", p)
        assert not qemu_opens("qemu-img", "info", p)
        assert not qemu_opens("qemu-img", "check", p)
        # -U shares everything and needs only CONSISTENT_READ, which we share.
        assert qemu_opens("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read 0 512", p)
        assert qemu_opens("qemu-img", "info", "-U", p)
    assert qemu_opens("qemu-io", "-f", "qcow2", "-c", "read 0 512", p)


def test_read_only_acquire_coexists_with_read_only_qemu(image: Path) -> None:
    p = str(image)
    with live_qemu_io(image, "-r", expect_perm=BLK_PERM_CONSISTENT_READ), open(image, "rb") as f:
        lock = ImageLock(f, path=p)
        assert lock.acquire(write=False).perm == BLK_PERM_CONSISTENT_READ
        assert qemu_opens("qemu-img", "info", p)
        assert qemu_opens("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", p)
        # A writer is still refused: both readers unshare WRITE.
        assert not qemu_opens("qemu-io", "-f", "qcow2", "-c", "read 0 512", p)
        lock.release()
        # qemu-io -r alone still unshares WRITE, so our write acquire fails.
        with pytest.raises(RequestError):
            lock.acquire(write=True)


def test_force_share_works_like_dash_u(image: Path) -> None:
    p = str(image)
    with live_qemu_io(image, expect_perm=RW_PERM), open(image, "rb") as f:
        lock = ImageLock(f, path=p)
        mode = lock.acquire(write=False, force_share=True)
        assert mode == LockMode(BLK_PERM_CONSISTENT_READ, 0xF)
        lock.release()
        assert lock.acquire(write=False, force_share=True, no_io=True).perm == 0
        lock.release()
        with pytest.raises(RequestError):
            lock.acquire(write=True, force_share=True)
    # While we hold a force-share read lock, a read-write qemu-io may open the image.
    with open(image, "rb") as f, ImageLock(f) as lock:
        lock.acquire(write=False, force_share=True)
        assert qemu_opens("qemu-io", "-f", "qcow2", "-c", "write 0 512", p)


def test_second_open_in_the_same_process_conflicts(image: Path) -> None:
    """OFD locks belong to the open file description, not the process (as in QEMU)."""
    with open(image, "rb+") as f1, open(image, "rb+") as f2, ImageLock(f1) as a:
        a.acquire(write=True)
        with pytest.raises(RequestError):
            ImageLock(f2).acquire(write=True)
        a.release()
        ImageLock(f2).acquire(write=True)


def test_locking_off_takes_nothing(image: Path) -> None:
    with live_qemu_io(image, expect_perm=RW_PERM), open(image, "rb") as f:
        lock = ImageLock(f, locking="off")
        lock.acquire(write=True)
        assert lock.held
        assert conflicts(image) == {"perm": RW_PERM, "unshared": UNSHARED}
    with pytest.raises(RequestError):
        ImageLock(0, locking="maybe")  # type: ignore[arg-type]
