"""One crash example end to end, and the Hypothesis campaign over many.

``run_example``: a fresh image (the engine's own create(), over the lockstep's backing
chains), the operations run with the recorder on, then every crash state of the recorded
stream (states.py) rebuilt next to the backing files and judged (judge.py) against the guest
oracle of the operation the cut fell in. Identical files are judged once. The first bad
state ends the example (prefix states come first, by cut, so it is the earliest cut).

``campaign``: Hypothesis draws the configuration, the operations and the seed of the random
subsets; a bad state fails the example, and Hypothesis shrinks it to the fewest operations.
The smallest failure seen is kept (a shrink cut short by the time budget still reports it).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st

from difftest.core.config import Config, configs
from difftest.core.targets import cached_backing, copy_backing
from difftest.crash import engines
from difftest.crash.judge import judge, qemu_check
from difftest.crash.ops import Op, op_lists
from difftest.crash.recording import Recorded, data_file_of, record
from difftest.crash.states import CrashState, materialize, states
from spec import hostio
from spec.errors import Qcow2Error

TOP = "top.qcow2"
REORDERS = 64
"""Reordered states drawn per epoch (states.states; ``--reorder-samples``)."""
SIZE_CAP = 32 << 20
"""Virtual sizes are kept small: every state is read whole by qemu and each engine."""


def crash_configs(overrides: dict[str, Any] | None = None, engine: str = "model",
                  ) -> st.SearchStrategy[Config]:
    """The lockstep's configurations with at most SIZE_CAP of virtual size. qemu gets no
    external data file: its writes are logged by one blklogwrites filter per file, and two
    logs do not tell in which order the two files' writes were issued (qemu.py)."""
    ov = dict(overrides or {})
    if engine == "qemu":
        ov["data_file"] = False
    return configs(ov).map(
        lambda c: c if c.size <= SIZE_CAP or "size" in ov else c.replace(size=8 * c.cluster_size))


@dataclass
class Failure:
    engine: str
    cfg: Config
    ops: list[Op]
    seed: int
    state: CrashState
    problems: list[str]
    stream: list[hostio.HostOp]

    def describe(self) -> str:
        lines = [f"engine {self.engine}, config {self.cfg.short()}, seed {self.seed}",
                 f"operations ({len(self.ops)}):"] + [f"  {i}: {op}" for i, op in enumerate(self.ops)]
        lines.append(f"state: {self.state.describe(self.stream)}")
        lines.append("host calls up to the cut:")
        lines += [f"  {i}: {c}" for i, c in enumerate(self.stream[:self.state.cut])]
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class Result:
    judged: Counter[str] = field(default_factory=Counter)
    """Distinct states judged, per family."""
    bad: Counter[str] = field(default_factory=Counter)
    failure: Failure | None = None
    errors: list[str] = field(default_factory=list)
    """Operations the live engine refused (RequestError: a compressed write over data)."""
    live_corrupt: bool = False
    """The run left the file corrupt with no crash at all; no state was judged."""
    named: Counter[str] = field(default_factory=Counter)
    """With ``survey``: bad states per kind (name_of)."""
    samples: dict[str, Failure] = field(default_factory=dict)
    """With ``survey``: the first bad state of each kind."""


def _readers() -> list[tuple[str, ModuleType]]:
    out = [("model", engines.engine_module("model"))]
    with contextlib.suppress(ImportError):
        out.append(("impl", engines.engine_module("impl")))
    return out


def prepare(cfg: Config, where: Path, backing_cache: Path, *, absolute_backing: bool = False,
            ) -> Path:
    """A directory with the backing chain; returns the path the top image goes to (its data
    file, if any, beside it: recording.data_file_of, named by its absolute path, since QEMU
    resolves a relative data file name against its working directory).
    ``absolute_backing``: name the backing file by its absolute path (qemu-io over
    blklogwrites resolves no relative name: its qcow2 node has no plain file name)."""
    where.mkdir(parents=True, exist_ok=True)
    backing_cache.mkdir(parents=True, exist_ok=True)
    src, backing = cached_backing(cfg, backing_cache)
    copy_backing(cfg, src, where)
    path = where / TOP
    path.unlink(missing_ok=True)
    kw: dict[str, Any] = dict(cfg.create_options())
    if backing is not None:
        kw["backing_file"], kw["backing_fmt"] = backing
        if absolute_backing:
            kw["backing_file"] = str((where / backing[0]).resolve())
    if cfg.data_file:
        data = data_file_of(path)
        data.unlink(missing_ok=True)
        kw["data_file"], kw["data_file_raw"] = str(data.resolve()), cfg.data_file_raw
    engines.engine_module("model").create(str(path), cfg.size, **kw)
    return path


def run_example(engine: str, cfg: Config, ops: Sequence[Op], seed: int, where: Path,
                backing_cache: Path, *, reorders: int = REORDERS, stop: Callable[[], bool] | None = None,
                only: CrashState | None = None, survey: bool = False) -> Result:
    """Judge every crash state of ``ops`` (see the module doc). ``survey``: go on after a
    bad state, counting them by kind (for QEMU, whose bad states are reported, not fixed)."""
    path = prepare(cfg, where, backing_cache, absolute_backing=engine == "qemu")
    res = Result()
    try:
        rec: Recorded
        if engine == "qemu":
            from difftest.crash.qemu import record_qemu
            rec = record_qemu(cfg, ops, path)
        else:
            rec = record(engine, cfg, ops, path)
    except Qcow2Error as e:
        res.errors.append(f"live run failed: {type(e).__name__}: {e}")
        return res
    res.errors = rec.errors
    # A file the run itself leaves corrupt is not a crash-safety finding: the model
    # reproduces QEMU 7.2's packing of compressed data into a reused cluster on purpose
    # (model/compressed.py alloc_bytes), and the lockstep reports that as qemu-corrupt.
    final = qemu_check(path)
    if only is None and (isinstance(final, str) or final["corruptions"] or final["check-errors"]):
        res.live_corrupt = True
        res.errors.append(f"the file is corrupt without a crash: {final}")
        return res
    readers = _readers()
    seen: set[bytes] = set()
    todo = [only] if only is not None else states(rec.stream, random.Random(seed), reorders=reorders,
                                                  bases=rec.files)
    for state in todo:
        if stop is not None and stop():
            break
        files = {name: materialize(base, rec.stream, state, name) for name, base in rec.files.items()}
        h = hashlib.blake2b(digest_size=16)
        for data in files.values():
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        key = h.digest()
        if key in seen:
            continue
        seen.add(key)
        for name, data in files.items():
            Path(name).write_bytes(data)
        problems = judge(path, cfg, rec.oracle_at(state.cut), readers)
        res.judged[state.family] += 1
        if problems:
            res.bad[state.family] += 1
            failure = Failure(engine, cfg, list(ops), seed, state, problems, rec.stream)
            if not survey:
                res.failure = failure
                break
            name = name_of(cfg, state, problems)
            res.named[name] += 1
            res.samples.setdefault(name, failure)
    return res


def name_of(cfg: Config, state: CrashState, problems: list[str]) -> str:
    """A kind of bad state: what went wrong, in which family, on which kind of image."""
    text = " ".join(problems)
    if "Input/output error" in text or "cannot read" in text:
        what = "unreadable"
    elif "corruptions" in text or "does not leave it clean" in text:
        what = "corrupt metadata"
    elif "guest sectors" in text:
        what = "flushed or written data lost"
    else:
        what = "engines disagree"
    image = "lazy refcounts" if cfg.lazy_refcounts else "eager refcounts"
    return f"{what} ({state.family}, {image})"


@dataclass
class Report:
    engine: str
    examples: int = 0
    judged: Counter[str] = field(default_factory=Counter)
    bad: Counter[str] = field(default_factory=Counter)
    configs: Counter[str] = field(default_factory=Counter)
    failure: Failure | None = None
    named: Counter[str] = field(default_factory=Counter)
    samples: dict[str, Failure] = field(default_factory=dict)
    live_corrupt: int = 0
    """Examples whose run left the file corrupt without a crash (QEMU's packing bug)."""

    @property
    def total(self) -> int:
        return sum(self.judged.values())


def campaign(engine: str, *, seconds: float, seed: int = 0, max_ops: int = 12,
             overrides: dict[str, Any] | None = None, workdir: Path | None = None,
             shrink_seconds: float = 120.0, on_example: Callable[[Report], None] | None = None,
             survey: bool = False, reorders: int = REORDERS,
             skip_ops: frozenset[str] = frozenset()) -> Report:
    """Run examples until ``seconds`` are spent or one fails (then shrink it). ``survey``
    (QEMU): count every bad state by kind and keep the smallest example of each, unshrunk
    beyond that choice, instead of stopping. ``skip_ops``: operation kinds not drawn."""
    report = Report(engine)
    op_lists(Config(), 1, skip_ops)  # refuse an unknown kind before any work
    root = Path(tempfile.mkdtemp(prefix="crash-", dir=workdir))
    cache = root / "backing"
    cache.mkdir()
    t0 = time.monotonic()
    deadline = t0 + seconds
    shrink_deadline: list[float] = []

    def over() -> bool:
        now = time.monotonic()
        return now > (shrink_deadline[0] if shrink_deadline else deadline)

    def example(data: st.DataObject) -> None:
        cfg = data.draw(crash_configs(overrides, engine), label="config")
        ops = data.draw(op_lists(cfg, max_ops, skip_ops), label="ops")
        rseed = data.draw(st.integers(0, 2**31), label="seed")
        if over():
            return  # after the draws: Hypothesis wants the same draws on every replay
        where = root / "ex"
        shutil.rmtree(where, ignore_errors=True)
        res = run_example(engine, cfg, ops, rseed, where, cache, stop=over, survey=survey,
                          reorders=reorders)
        report.named += res.named
        for name, sample in res.samples.items():
            old = report.samples.get(name)
            if old is None or len(sample.ops) < len(old.ops):
                report.samples[name] = sample
        if not shrink_deadline:
            report.examples += 1
            report.judged += res.judged
            report.bad += res.bad
            report.configs[cfg.short()] += 1
            report.live_corrupt += res.live_corrupt
            if on_example:
                on_example(report)
        f = res.failure
        if f is not None:
            if not shrink_deadline:
                shrink_deadline.append(time.monotonic() + shrink_seconds)
            best = report.failure
            if best is None or (len(f.ops), len(f.state.applied)) < (len(best.ops), len(best.state.applied)):
                report.failure = f
            raise AssertionError(f.describe())

    rnd = random.Random(seed)
    try:
        while not over() and report.failure is None:
            # Shards of Hypothesis runs, each with its own seed, until the budget is spent.
            run = settings(max_examples=20, deadline=None, database=None,
                           suppress_health_check=list(HealthCheck),
                           phases=[Phase.generate, Phase.shrink],
                           report_multiple_bugs=False)(given(data=st.data())(example))
            hseed(rnd.getrandbits(64))(run)()
    except Exception:
        if report.failure is None:
            raise
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report
