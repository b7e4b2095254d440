"""Fault injection in the manner of QEMU's blkdebug (iotest 026): the N-th host read, write or
flush of a request fails with EIO or ENOSPC (spec.hostio.FaultInjector). For every N the
request must fail (no error is reported as success), with HostIOError, without flagging the
image corrupt, and the file must stay consistent: qemu-img check finds no corruption (leaks,
which an interrupted allocation leaves, are allowed), and the image opens read-write again.
"""

from __future__ import annotations

import errno
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from difftest.crash import engines
from spec import hostio
from spec.errors import CorruptionError

Op = Callable[[Any], object]

# Requests that allocate (L2 table, refcounts, COW), write in place, free, and flush.
SCENARIOS: dict[str, tuple[list[Op], Op]] = {
    "allocating write": ([], lambda img: img.write(1000, b"\x5a" * 9000)),
    "write over an L1 boundary": ([], lambda img: img.write((512 << 10) - 700, b"\x33" * 1400)),
    "cow write": ([lambda img: img.write(0, b"\x11" * 8192)],
                  lambda img: img.write(4096 + 100, b"\x22" * 300)),
    "zero with unmap": ([lambda img: img.write(0, b"\x11" * 16384)],
                        lambda img: img.write_zeroes(4096, 8192, unmap=True)),
    "discard": ([lambda img: img.write(0, b"\x11" * 16384)],
                lambda img: img.discard(0, 8192)),
    "flush": ([lambda img: img.write(0, b"\x11" * 5000)], lambda img: img.flush()),
    "read": ([lambda img: img.write(0, b"\x11" * 5000)], lambda img: img.read(0, 8192)),
}
ENGINES = ["model", "impl"]


def _fresh(tmp: Path, lazy: bool) -> Path:
    path = tmp / "f.qcow2"
    path.unlink(missing_ok=True)
    engines.engine_module("model").create(str(path), 2 << 20, cluster_size=4096,
                                          lazy_refcounts=lazy)
    return path


def _count(engine: str, path: Path, setup: list[Op], op: Op, kind: str) -> int:
    counter = hostio.FaultInjector(kind, nth=0)
    with engines.monitored(engine) as m:
        img = m.open(str(path))
        try:
            for s in setup:
                s(img)
            with hostio.monitoring(counter):
                op(img)
        finally:
            img.close()
    return counter.seen


def _check(path: Path) -> dict[str, int]:
    r = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True,
                       text=True)
    rep = json.loads(r.stdout)
    return {k: int(rep.get(k, 0)) for k in ("corruptions", "leaks", "check-errors")}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("kind", [hostio.WRITE, hostio.FLUSH, hostio.READ])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_failing_host_call_fails_the_request_and_keeps_the_image_consistent(
        tmp_path: Path, engine: str, lazy: bool, kind: str, scenario: str) -> None:
    setup, op = SCENARIOS[scenario]
    total = _count(engine, _fresh(tmp_path, lazy), setup, op, kind)
    if total == 0:
        pytest.skip(f"{scenario} makes no host {kind}")
    for nth in range(1, total + 1):
        for err in (errno.EIO, errno.ENOSPC):
            path = _fresh(tmp_path, lazy)
            fault = hostio.FaultInjector(kind, nth, err)
            with engines.monitored(engine) as m:
                img = m.open(str(path))
                for s in setup:
                    s(img)
                failed: CorruptionError | None = None
                with hostio.monitoring(fault):
                    try:
                        op(img)
                    except CorruptionError as e:
                        failed = e
                assert fault.fired is not None
                assert failed is None or isinstance(failed, hostio.HostIOError), failed
                assert not img.broken, "a host I/O error must not flag the image corrupt"
                img.close()
            rep = _check(path)
            assert rep["corruptions"] == 0 and rep["check-errors"] == 0, (nth, err, rep)
            if failed is None:
                # Only QEMU's one swallowed failure may pass: a refcount decrement whose
                # read, write or barrier fails after the request's own work is done
                # (qcow2_free_clusters reports it and goes on; spec/refblocks.free_clusters).
                # It must show as a leak.
                assert rep["leaks"] > 0, (nth, err, fault.fired, rep)
            with engines.monitored(engine) as m, m.open(str(path)) as img:
                img.read(0, 4096)


def test_fault_injector_counts_and_fires_once() -> None:
    f = hostio.FaultInjector(hostio.WRITE, nth=2, err=errno.ENOSPC)
    op = hostio.HostOp(hostio.WRITE, "x", 0, 1, b"a")
    f.host_op(op)
    with pytest.raises(OSError) as e:
        f.host_op(op)
    assert e.value.errno == errno.ENOSPC
    f.host_op(op)
    f.host_op(hostio.HostOp(hostio.READ, "x", 0, 1))
    assert (f.seen, f.fired) == (3, op)
