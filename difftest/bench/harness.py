"""Throughput of the differential harness (``qcow2lab bench difftest``).

Two figures per target set, both printed, never asserted in tests (DESIGN.md, Performance):
- steady state: one long ``Lockstep`` fed a fixed pseudo-random mix of guest I/O (of 10
  operations: 3 pattern writes, 1 random-bytes write, 1 write_zeroes, 1 discard, 3 reads,
  1 flush), every one cross-checked as in a campaign (bytes read back, maps of the touched
  range), without image set-up. The figure is the median of ``rounds`` runs, each on a
  fresh image: one run is a second long, and on a shared machine single runs vary by 10%;
- campaign: a Hypothesis shard, wall clock including set-up, shrinking machinery and the
  teardown checks (qemu-img check, compare, rules, cross-reads).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from difftest.core import qemuio
from difftest.core.campaign import Shard, run_shard
from difftest.core.config import Config
from difftest.core.lockstep import Lockstep
from difftest.core.targets import make_target, module_available, random_bytes


def target_sets() -> list[list[str]]:
    """The rows of ``qcow2lab bench difftest``, for the targets this machine has: each
    engine against a second instance of itself (the harness's own cost), the engines against
    each other and against qemu-io, and the three-way set that ``make run`` uses."""
    model, impl, qemu = module_available("model"), module_available("impl"), qemuio.available()
    sets: list[list[str]] = []
    if model:
        sets.append(["model", "model2"])
    if impl:
        sets.append(["impl", "impl2"])
    if model and impl:
        sets.append(["model", "impl"])
    if qemu:
        if model:
            sets.append(["model", "qemu"])
        if impl:
            sets.append(["impl", "qemu"])
        if model and impl:
            sets.append(["model", "impl", "qemu"])
        sets.append(["qemu", "qemu2"])
    return sets


def steady_state(targets: list[str], ops: int, cfg: Config, seed: int = 0, rounds: int = 3) -> dict[str, Any]:
    runs = sorted((_steady_run(targets, ops, cfg, seed) for _ in range(rounds)),
                  key=lambda r: r["ops_per_second"])
    median = runs[len(runs) // 2]
    return dict(median, rounds=[r["ops_per_second"] for r in runs])


Step = tuple[str, tuple[Any, ...]]
"""One lockstep call: (Lockstep method, arguments)."""


def steady_steps(ops: int, cfg: Config, seed: int) -> list[Step]:
    """The fixed pseudo-random mix of the steady state (see the module doc), drawn before
    the clock starts: the figure is the lockstep's, not the drawing's."""
    rnd = random.Random(seed)
    c = cfg.cluster_size
    out: list[Step] = []
    for _ in range(ops):
        k = rnd.randrange(10)
        off = rnd.randrange(0, cfg.size // 512) * 512 + rnd.choice([0, 0, 1, 511])
        n = min(rnd.choice([512, 4096, c, 2 * c, 777]), cfg.size - off)
        if k < 3:
            out.append(("write", (off, n, rnd.choice([0x11, 0x22, 0]))))
        elif k == 3:
            out.append(("write_random", (off, min(n, 8192), rnd.randrange(1 << 16))))
        elif k == 4:
            out.append(("write_zeroes", (off, n, rnd.random() < 0.5)))
        elif k == 5:
            out.append(("discard", (off, n)))
        elif k < 9:
            out.append(("read", (off, n)))
        else:
            out.append(("flush", ()))
    return out


def _steady_run(targets: list[str], ops: int, cfg: Config, seed: int) -> dict[str, Any]:
    steps = steady_steps(ops, cfg, seed)
    with tempfile.TemporaryDirectory(prefix="difftest-bench-") as d:
        ls = Lockstep(Path(d), cfg, targets)
        try:
            calls = [(getattr(ls, name), args) for name, args in steps]
            t0 = time.perf_counter()
            for fn, args in calls:
                fn(*args)
            dt = time.perf_counter() - t0
            ls.finish()
        finally:
            ls.close()
    return {"targets": targets, "ops": ops, "seconds": round(dt, 3), "ops_per_second": round(ops / dt, 1)}


def steady_floor(targets: list[str], ops: int, cfg: Config, seed: int = 0, rounds: int = 3) -> float:
    """Operations per second of the calls a lockstep step cannot do without, made bare,
    one target after the other, nothing compared: the request on every target; after a
    guest write of any kind, a read and a map of the touched clusters on every engine, and
    on qemu-io a ``read -q`` of them and an ``alloc`` (one round trip each, the fewest its
    byte and allocation checks can take); a read on every target. Median of ``rounds``
    runs on fresh images. The harness's own cost is what the steady state adds to this
    (and the helper thread can hide some qemu-io round trips behind the engines)."""
    return statistics.median(_floor_run(targets, ops, cfg, seed) for _ in range(rounds))


def _floor_run(targets: list[str], ops: int, cfg: Config, seed: int) -> float:
    steps = steady_steps(ops, cfg, seed)
    c = cfg.cluster_size
    data = {i: random_bytes(args[2], args[1]) if name == "write_random" else bytes([args[2]]) * args[1]
            for i, (name, args) in enumerate(steps) if name in ("write", "write_random")}
    with tempfile.TemporaryDirectory(prefix="difftest-floor-") as d:
        ts = [make_target(spec, Path(d)) for spec in targets]
        try:
            for t in ts:
                t.dir.mkdir(parents=True, exist_ok=True)
                t.setup(cfg, None)
            images = [t.image for t in ts]
            qemu = [isinstance(i, qemuio.QemuImage) for i in images]
            t0 = time.perf_counter()
            for i, (name, args) in enumerate(steps):
                if name == "read":
                    for img in images:
                        img.read(*args)
                    continue
                if name == "flush":
                    for img in images:
                        img.flush()
                    continue
                off, n = args[0], args[1]
                for img in images:
                    if name in ("write", "write_random"):
                        img.write(off, data[i])
                    elif name == "write_zeroes":
                        img.write_zeroes(off, n, unmap=args[2])
                    else:
                        img.discard(off, n)
                lo = off - off % c
                k = min(-(-(off + max(n, 1)) // c) * c, cfg.size) - lo
                for img, q in zip(images, qemu, strict=True):
                    if q:
                        img.io.cmd(f"read -q {lo} {k}")
                        img.io.cmd(f"alloc {lo} {k}")
                    else:
                        img.read(lo, k)
                        img.map(lo, k)
            dt = time.perf_counter() - t0
        finally:
            for t in ts:
                t.close()
                t.release()
                qemuio.forget(t.path)
    return round(ops / dt, 1)


def campaign(targets: list[str], examples: int, steps: int, seed: int = 0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="difftest-bench-") as d:
        st = run_shard(Shard(targets, seed, examples, steps, db_dir=None, repro_dir=str(Path(d) / "repro"),
                             shrink=False, multiple_bugs=False))  # a figure, not a hunt
    return {"targets": targets, "examples": st.examples, "ops": sum(st.ops.values()),
            "seconds": round(st.elapsed, 3), "ops_per_second": round(st.ops_per_second, 1),
            "divergences": len(st.divergences)}
