"""open() takes QEMU 7.2's image locks (spec/locking.py) on the descriptor it keeps.

Checked against a live ``qemu-io`` in both directions (tests/spec/test_locking.py's
``live_qemu_io`` keeps one running with the image open): the engine is refused while qemu-io
writes, qemu-io is refused while the engine writes, readers coexist, and ``force_share=True``
behaves as ``-U``. A conflict is RequestError (spec/locking.py says why).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from spec.errors import RequestError
from spec.locking import BLK_PERM_CONSISTENT_READ, conflicts
from tests.qemu import create, qemu_io
from tests.spec.test_locking import RW_PERM, UNSHARED, live_qemu_io, qemu_opens

NOTHING = {"perm": 0, "unshared": 0}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = create(tmp_path / "lock.qcow2", "1M")
    qemu_io(p, "write -P 0x5a 0 64k")
    return p


def test_takes_the_lock_bytes_qemu_io_takes(engine: ModuleType, image: Path) -> None:
    with engine.open(image) as img:
        assert conflicts(image) == {"perm": RW_PERM, "unshared": UNSHARED}
        img.write(0, b"x" * 512)
    assert conflicts(image) == NOTHING  # released on close
    with engine.open(image, readonly=True):
        assert conflicts(image) == {"perm": BLK_PERM_CONSISTENT_READ, "unshared": UNSHARED}
    with engine.open(image, readonly=True, force_share=True):
        assert conflicts(image) == {"perm": BLK_PERM_CONSISTENT_READ, "unshared": 0}
    assert conflicts(image) == NOTHING


def test_is_refused_while_qemu_io_writes(engine: ModuleType, image: Path) -> None:
    with live_qemu_io(image, expect_perm=RW_PERM):
        with pytest.raises(RequestError):
            engine.open(image)
        # A plain read-only open unshares WRITE, which qemu-io holds (as qemu-io -r is refused).
        with pytest.raises(RequestError):
            engine.open(image, readonly=True)
        # -U: shares everything, so it may read beside the writer.
        with engine.open(image, readonly=True, force_share=True) as img:
            assert img.read(0, 4) == b"\x5a" * 4
        # A failed open leaves none of its lock bytes behind.
        assert conflicts(image) == {"perm": RW_PERM, "unshared": UNSHARED}
        # Repair opens read-write as qemu-img check -r does: refused too, nothing written.
        before = image.read_bytes()
        with pytest.raises(RequestError):
            engine.check(image, repair="all")
        assert image.read_bytes() == before
        # A report needs no write lock (check reads as qemu-img check -U).
        assert engine.check(image).check_errors == 0
    with engine.open(image) as img:
        img.write(0, b"y")


def test_qemu_io_is_refused_while_the_engine_writes(engine: ModuleType, image: Path) -> None:
    p = str(image)
    with engine.open(image):
        assert not qemu_opens("qemu-io", "-f", "qcow2", "-c", "read 0 512", p)
        assert not qemu_opens("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", p)
        assert not qemu_opens("qemu-img", "check", p)
        assert qemu_opens("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x5a 0 512", p)
    assert qemu_opens("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 512", p)


def test_readers_coexist(engine: ModuleType, image: Path) -> None:
    p = str(image)
    with live_qemu_io(image, "-r", expect_perm=BLK_PERM_CONSISTENT_READ):
        with engine.open(image, readonly=True) as img:
            assert img.read(0, 2) == b"\x5a\x5a"
            assert qemu_opens("qemu-img", "check", p)
            # Both readers unshare WRITE: no writer on either side.
            assert not qemu_opens("qemu-io", "-f", "qcow2", "-c", "write 0 512", p)
        with pytest.raises(RequestError):
            engine.open(image)


def test_force_share_is_read_only(engine: ModuleType, image: Path) -> None:
    with pytest.raises(RequestError):
        engine.open(image, force_share=True)
    with pytest.raises(RequestError):
        engine.open(image, readonly=True, locking="sometimes")
    assert conflicts(image) == NOTHING
    # While the engine reads with force_share, a writing qemu-io may open the image.
    with engine.open(image, readonly=True, force_share=True):
        assert qemu_opens("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 512", str(image))


def test_locking_off_takes_and_checks_nothing(engine: ModuleType, image: Path) -> None:
    with live_qemu_io(image, expect_perm=RW_PERM), engine.open(image, readonly=True, locking="off") as img:
        assert img.read(0, 1) == b"\x5a"
        assert conflicts(image) == {"perm": RW_PERM, "unshared": UNSHARED}


def test_two_writable_opens_in_one_process_conflict(engine: ModuleType, image: Path) -> None:
    """OFD locks belong to the open file description: a second open() of the same image in
    the same process is another opener, as a second QEMU block node would be."""
    with engine.open(image):
        with pytest.raises(RequestError):
            engine.open(image)
        with pytest.raises(RequestError):
            engine.open(image, readonly=True)
        with engine.open(image, readonly=True, force_share=True):
            pass
    with engine.open(image, readonly=True), engine.open(image, readonly=True):
        pass


def test_backing_file_is_locked_as_a_reader(engine: ModuleType, tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "1M")
    top = create(tmp_path / "top.qcow2", "1M", backing="base.qcow2", backing_fmt="qcow2")
    with engine.open(top):
        assert conflicts(base) == {"perm": BLK_PERM_CONSISTENT_READ, "unshared": UNSHARED}
        assert not qemu_opens("qemu-io", "-f", "qcow2", "-c", "write 0 512", str(base))
        assert qemu_opens("qemu-io", "-r", "-f", "qcow2", "-c", "read 0 512", str(base))
    assert conflicts(base) == NOTHING
