"""The Hypothesis state machine that drives ``Lockstep`` (difftest/core/lockstep.py).

One configuration is drawn per run by ``initialize`` (difftest/core/config.py); every rule is one
guest operation whose offsets and lengths come from strategies biased to the edges where
qcow2 implementations go wrong: subcluster, cluster, L2-slice and L1 (L2-table reach)
boundaries, plus or minus one byte and one sector, the end of the backing file and the end
of the image. A few requests fall outside the image on purpose: every target must refuse
them with the same error class.

Every step is ``note()``d, one ``maintenance`` rule holds the non-I/O operations, and on a divergence the
machine writes the two reproducers (difftest/core/repro.py) before re-raising: the last run
Hypothesis makes is the shrunk one, so the files left behind are minimal.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import note, reject
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from difftest.adapters.isolation import AdapterFailed
from difftest.core.config import Config, configs, edge_points
from difftest.core.divergence import Divergence
from difftest.core.lockstep import Lockstep, foreign_failure
from difftest.core.repro import ReproStore
from difftest.core.signature import covers, signature
from difftest.core.targets import narrowed

Draw = Callable[..., Any]
"""``data.draw``: takes a strategy, returns a value."""

SNAPSHOT_NAMES = ("s0", "s1")
RANDOM_WRITE_MAX = 64 * 1024
READ_MAX = 256 * 1024


@dataclass
class Hooks:
    """Campaign plumbing: where reproducers go and what to call as the run advances."""

    targets: list[str]
    readers: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None
    repro_dir: Path | None = None
    store: ReproStore | None = None
    """Made from repro_dir when not given."""
    on_step: Callable[[str], None] | None = None
    on_example: Callable[[Config], None] | None = None
    on_divergence: Callable[[Divergence, Lockstep], None] | None = None
    on_close: Callable[[Lockstep], None] | None = None
    """Called once per example, when its Lockstep is closed (see Lockstep.on_close)."""
    finish: bool = True
    """Run the teardown checks (qemu-img check, rules, cross-reads) after every example."""
    known: frozenset[str] = frozenset()
    """Signatures (difftest/core/signature.py) the campaign has already found and shrunk in
    an earlier shard: meeting one again is counted (``on_known``) and ends the example's
    comparisons, which then passes, so it is neither shrunk nor saved again (issue 14: one
    permanent bug was reported once per shard, x512). Not Hypothesis's ``reject``: a shard
    that meets a known bug in every example would draw some 460 of them before giving up."""
    on_known: Callable[[str], None] | None = None


def offsets(draw: Draw, cfg: Config, size: int) -> int:
    if size == 0:
        return 0
    if draw(st.integers(0, 3)) == 0:
        return draw(st.integers(0, size))
    base = draw(st.sampled_from(edge_points(cfg, size)))
    delta = draw(st.sampled_from([0, 0, 0, -1, 1, -512, 512, 4096 - 512]))
    return min(max(0, base + delta), size)


def lengths(draw: Draw, cfg: Config, limit: int) -> int:
    g = cfg.geometry
    c = cfg.cluster_size
    choices = [1, 511, 512, 513, g.subcluster_size, c - 1, c, c + 1, c + 512, 2 * c, 3 * c - 512]
    if draw(st.integers(0, 3)) == 0:
        n = draw(st.integers(1, max(1, min(limit, 4 * c))))
    else:
        n = draw(st.sampled_from(choices))
    return max(0, min(n, limit))


def _fit(draw: Draw, off: int, n: int, size: int) -> int:
    """Mostly keep the request inside the image; one time in ten let it run past the end."""
    if draw(st.integers(0, 9)) == 0:
        return n
    return max(0, min(n, size - off))


MAINTENANCE = ("flush", "reopen", "compare_map", "check_live", "resize", "snapshot_create",
               "snapshot_apply", "snapshot_delete")
"""The maintenance operations, simplest first (Hypothesis shrinks towards the first); the
last two need a snapshot to exist."""


def make_machine(hooks: Hooks) -> type[RuleBasedStateMachine]:
    # What a py: target declares unsupported is never drawn (targets.narrowed).
    cfg_strategy = configs(narrowed(hooks.overrides, hooks.targets))
    if hooks.store is None and hooks.repro_dir is not None:
        hooks.store = ReproStore(hooks.repro_dir, hooks.readers)
    if hooks.workdir is not None:
        hooks.workdir.mkdir(parents=True, exist_ok=True)
    # Backing chains built once per distinct chain for the life of this machine class (one
    # shard); removed when the class is collected or at exit.
    backing_cache = tempfile.TemporaryDirectory(prefix="difftest-backing-", dir=hooks.workdir)

    def _is_known(d: Divergence, cfg: Config, log: list[tuple[str, dict[str, Any]]]) -> bool:
        """Whether an earlier shard reported ``d``'s finding (counted through on_known)."""
        if not hooks.known:
            return False
        key = signature(d, cfg, hooks.readers, log)
        key = next((k for k in hooks.known if covers(k, key)), "")
        if not key:
            return False
        if hooks.on_known:
            hooks.on_known(key)
        return True

    class DiffMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.ls: Lockstep | None = None
            self.failed = False
            self.snaps: list[str] = []
            self.steps = 0
            self._tmp: tempfile.TemporaryDirectory[str] | None = None

        # -- plumbing ---------------------------------------------------------------------------
        def _do(self, op: Callable[[Lockstep], Any], what: str) -> Any:
            assert self.ls is not None
            if self.failed:  # a known finding ended the comparisons (Hooks.known)
                return False
            note(what)
            self.steps += 1
            if hooks.on_step:
                hooks.on_step(what)
            try:
                # qemu's whole map (a qemu-img process) is compared by the compare_map
                # operation and at teardown, not every N steps: a check tied to the step
                # number would stop the shrinker from deleting steps.
                return op(self.ls)
            except Divergence as d:
                if self._known(d):
                    return False
                self._fail(d)
                raise
            except AdapterFailed as e:  # a foreign target hung, crashed, ran out of memory
                div = foreign_failure(e, what)
                self._fail(div)
                raise div from None
            except Exception as e:  # a bug in the harness or a target: still a finding
                div = Divergence("exception", what, f"{type(e).__name__}: {e}")
                self._fail(div)
                raise div from e

        def _known(self, d: Divergence) -> bool:
            """Whether ``d`` is a finding an earlier shard reported: then it is counted and
            nothing more of this example is run or compared."""
            if self.ls is None or not _is_known(d, self.ls.cfg, self.ls.log):
                return False
            self.failed = True
            return True

        def _fail(self, d: Divergence) -> None:
            self.failed = True
            if self.ls is not None and hooks.store is not None:
                hooks.store.record(self.ls.cfg, self.ls.log, hooks.targets, d)
            if hooks.on_divergence and self.ls is not None:
                hooks.on_divergence(d, self.ls)

        @property
        def cfg(self) -> Config:
            assert self.ls is not None
            return self.ls.cfg

        @property
        def size(self) -> int:
            assert self.ls is not None
            return self.ls.size

        # -- set-up -----------------------------------------------------------------------------
        @initialize(cfg=cfg_strategy)
        def setup(self, cfg: Config) -> None:
            note(f"config: {cfg!r}")
            self._tmp = tempfile.TemporaryDirectory(prefix="difftest-", dir=hooks.workdir)
            if hooks.on_example:
                hooks.on_example(cfg)
            try:
                self.ls = Lockstep(Path(self._tmp.name), cfg, hooks.targets, hooks.readers,
                                   backing_cache=Path(backing_cache.name),
                                   on_close=[hooks.on_close] if hooks.on_close else [])
            except Divergence as d:
                self.failed = True
                if _is_known(d, cfg, []):
                    reject()  # no Lockstep to run the rules on: drop the example
                if hooks.store is not None:
                    hooks.store.record(cfg, [], hooks.targets, d)
                raise

        # -- operations ---------------------------------------------------------------------------
        @rule(data=st.data())
        def write(self, data: st.DataObject) -> None:
            off = offsets(data.draw, self.cfg, self.size)
            n = _fit(data.draw, off, lengths(data.draw, self.cfg, 4 * self.cfg.cluster_size), self.size)
            byte = data.draw(st.sampled_from([0x00, 0x11, 0x5A, 0xFF]))
            self._do(lambda ls: ls.write(off, n, byte), f"write(off={off}, n={n}, byte={byte:#x})")

        @rule(data=st.data())
        def write_random(self, data: st.DataObject) -> None:
            off = offsets(data.draw, self.cfg, self.size)
            n = _fit(data.draw, off, lengths(data.draw, self.cfg, RANDOM_WRITE_MAX), self.size)
            seed = data.draw(st.integers(0, 2**16))
            self._do(lambda ls: ls.write_random(off, n, seed), f"write_random(off={off}, n={n}, seed={seed})")

        @rule(data=st.data(), unmap=st.booleans())
        def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
            off = offsets(data.draw, self.cfg, self.size)
            n = _fit(data.draw, off, lengths(data.draw, self.cfg, 4 * self.cfg.cluster_size), self.size)
            self._do(lambda ls: ls.write_zeroes(off, n, unmap),
                     f"write_zeroes(off={off}, n={n}, unmap={unmap})")

        @rule(data=st.data())
        def discard(self, data: st.DataObject) -> None:
            off = offsets(data.draw, self.cfg, self.size)
            n = _fit(data.draw, off, lengths(data.draw, self.cfg, 4 * self.cfg.cluster_size), self.size)
            self._do(lambda ls: ls.discard(off, n), f"discard(off={off}, n={n})")

        @rule(data=st.data())
        def write_compressed(self, data: st.DataObject) -> None:
            c = self.cfg.cluster_size
            clusters = max(1, -(-self.size // c))
            idx = data.draw(st.integers(0, clusters - 1))
            off = idx * c
            n = min(c, self.size - off)
            if data.draw(st.integers(0, 15)) == 0:  # misaligned or short: must fail alike
                off += data.draw(st.sampled_from([0, 512, 1]))
                n = data.draw(st.sampled_from([c, c - 512, 512]))
            if data.draw(st.booleans()):
                seed = data.draw(st.integers(0, 2**16))
                self._do(lambda ls: ls.write_compressed(off, n, seed=seed),
                         f"write_compressed(off={off}, n={n}, seed={seed})")
            else:
                byte = data.draw(st.sampled_from([0x00, 0x33, 0xC4]))
                self._do(lambda ls: ls.write_compressed(off, n, byte=byte),
                         f"write_compressed(off={off}, n={n}, byte={byte:#x})")

        @rule(data=st.data())
        def read(self, data: st.DataObject) -> None:
            off = offsets(data.draw, self.cfg, self.size)
            n = _fit(data.draw, off, lengths(data.draw, self.cfg, READ_MAX), self.size)
            self._do(lambda ls: ls.read(off, n), f"read(off={off}, n={n})")

        @rule(data=st.data())
        def maintenance(self, data: st.DataObject) -> None:
            """One of the operations around the guest I/O: flush, reopen, compare_map,
            check_live, resize or a snapshot operation. They share one rule so that Hypothesis, which
            picks uniformly among rules, spends most steps on guest I/O (where the bugs are),
            without a precondition tied to the step number: such a precondition made a
            step's meaning depend on its position, and shrinking could not delete steps."""
            kinds = MAINTENANCE if self.snaps else MAINTENANCE[:-2]
            getattr(self, "_" + data.draw(st.sampled_from(kinds)))(data)

        def _flush(self, data: st.DataObject) -> None:
            self._do(lambda ls: ls.flush(), "flush()")

        def _reopen(self, data: st.DataObject) -> None:
            self._do(lambda ls: ls.reopen(), "reopen()")

        def _compare_map(self, data: st.DataObject) -> None:
            off = offsets(data.draw, self.cfg, self.size)
            n = lengths(data.draw, self.cfg, 16 * self.cfg.cluster_size)
            self._do(lambda ls: ls.compare_map(off, n), f"compare_map(off={off}, n={n})")

        def _check_live(self, data: st.DataObject) -> None:
            self._do(lambda ls: ls.check_live(), "check_live()")

        def _resize(self, data: st.DataObject) -> None:
            c = self.cfg.cluster_size
            grow = data.draw(st.booleans())
            delta = data.draw(st.sampled_from([512, c, c + 512, 3 * c, 1]))
            new = self.size + delta if grow else max(0, self.size - delta)
            shrink = not grow and data.draw(st.integers(0, 7)) > 0
            self._do(lambda ls: ls.resize(new, shrink), f"resize(new_size={new}, shrink={shrink})")

        def _snapshot_create(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(SNAPSHOT_NAMES))
            if self._do(lambda ls: ls.snapshot_create(name), f"snapshot_create({name!r})") and \
                    name not in self.snaps:
                self.snaps.append(name)

        def _snapshot_apply(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from([*self.snaps, "nosuch"]))
            self._do(lambda ls: ls.snapshot_apply(name), f"snapshot_apply({name!r})")

        def _snapshot_delete(self, data: st.DataObject) -> None:
            name = data.draw(st.sampled_from(self.snaps))
            if self._do(lambda ls: ls.snapshot_delete(name), f"snapshot_delete({name!r})"):
                self.snaps.remove(name)

        @invariant()
        def sizes_agree(self) -> None:
            if self.ls is not None and not self.failed:
                try:
                    sizes = {t.name: int(t.image.size) for t in self.ls.targets}
                except AdapterFailed as e:
                    d = foreign_failure(e, "invariant")
                    self._fail(d)
                    raise d from None
                if len(set(sizes.values())) > 1:
                    d = Divergence("size", "invariant", f"virtual sizes differ: {sizes}")
                    if self._known(d):
                        return
                    self._fail(d)
                    raise d

        def teardown(self) -> None:
            try:
                if self.ls is not None and not self.failed and hooks.finish:
                    note("finish()")
                    try:
                        self.ls.finish()
                    except Divergence as d:
                        if not self._known(d):
                            self._fail(d)
                            raise
            finally:
                if self.ls is not None:
                    self.ls.close()
                if self._tmp is not None:
                    self._tmp.cleanup()

    return DiffMachine
