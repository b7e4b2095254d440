"""Running the state machine as a campaign: profiles, seeds, shards, statistics.

A campaign is one or more shards; a shard is one Hypothesis run of the state machine
(``max_examples`` examples of up to ``steps`` operations, from one seed). Shards run in this
process or, with ``jobs > 1``, in worker processes that report progress through a queue.
Failing examples are kept in a Hypothesis example database (``db_dir``), so the next run
replays them first; the shrunk reproducers of shard S land in ``repro_dir/seed-S/<signature>``.

No flooding (issue 14): the saved failures are replayed by the first shard of a campaign
only, and a shard that meets a finding an earlier shard already reported (same signature,
difftest/core/signature.py) counts the hit and moves on instead of shrinking it again.
``Stats.hits`` says how often each distinct finding was met.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import seed as hyp_seed
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Unsatisfiable
from hypothesis.internal.conjecture import engine, providers
from hypothesis.reporting import current_reporter, with_reporter
from hypothesis.stateful import run_state_machine_as_test

from difftest.core.config import Config
from difftest.core.divergence import Divergence
from difftest.core.lockstep import Lockstep
from difftest.core.machine import Hooks, make_machine
from difftest.core.minimize import minimize, simplify
from difftest.core.procpool import run_forked
from difftest.core.repro import ReproStore
from difftest.core.signature import normalise

PROFILES: dict[str, dict[str, int]] = {
    "quick": {"examples": 20, "steps": 40},
    "ci": {"examples": 40, "steps": 40},
    "deep": {"examples": 400, "steps": 200},
}


@dataclass
class Found:
    """One divergence, after shrinking."""

    kind: str
    message: str
    seed: int
    repro_dir: str | None
    steps: int = 0
    signature: str = ""
    """What groups it with the other meetings of the same bug (difftest/core/signature.py);
    the message when there is none (a harness error)."""
    reproduced: bool = True
    """False when replaying the recorded reproducer in a fresh Lockstep did not fail the same
    way: the finding is flaky (timing, the machine's load, a limit), and its reproducers may
    pass."""

    @property
    def key(self) -> str:
        return self.signature or normalise(self.message)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "seed": self.seed,
                "repro_dir": self.repro_dir, "steps": self.steps, "signature": self.key,
                "reproduced": self.reproduced}


@dataclass
class Stats:
    examples: int = 0
    steps: int = 0
    elapsed: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)
    configs: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    divergences: list[Found] = field(default_factory=list)
    shards: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    """Per finding signature, how many examples met it: the one a shard shrank, plus every
    later meeting that was only counted (Hooks.known)."""

    def merge(self, other: Stats) -> None:
        self.examples += other.examples
        self.steps += other.steps
        self.ops.update(other.ops)
        self.configs.update(other.configs)
        self.notes.update(other.notes)
        self.divergences += other.divergences
        self.shards += other.shards
        self.hits.update(other.hits)

    def findings(self) -> list[tuple[Found, int, list[Found]]]:
        """The distinct findings: per signature the smallest reported instance, how often
        the signature was met, and every instance reported."""
        groups: dict[str, list[Found]] = {}
        for d in self.divergences:
            groups.setdefault(d.key, []).append(d)
        return [(min(ds, key=lambda d: (d.repro_dir is None, d.steps)), max(self.hits[k], len(ds)), ds)
                for k, ds in groups.items()]

    def one_folder_per_finding(self) -> None:
        """Keep only the best instance's reproducer folder of each finding. Two shards can
        shrink to one signature from different starts (one met it with lazy refcounts, which
        the simplification then dropped), each into its own seed-N folder; the others are
        removed and their instances point at the kept one."""
        for best, _, ds in self.findings():
            for d in ds:
                if d.repro_dir and best.repro_dir and d.repro_dir != best.repro_dir:
                    shutil.rmtree(d.repro_dir, ignore_errors=True)
                    d.repro_dir = best.repro_dir

    @property
    def ops_per_second(self) -> float:
        return sum(self.ops.values()) / self.elapsed if self.elapsed > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"examples": self.examples, "steps": self.steps, "shards": self.shards,
                "elapsed_s": round(self.elapsed, 3), "ops": dict(self.ops),
                "ops_per_second": round(self.ops_per_second, 1),
                "configurations": len(self.configs), "configs": dict(self.configs),
                "notes": dict(self.notes), "divergences": [d.to_json() for d in self.divergences],
                "findings": [{**best.to_json(), "hits": hits} for best, hits, _ in self.findings()]}


@dataclass
class Shard:
    targets: list[str]
    seed: int
    examples: int
    steps: int
    overrides: dict[str, Any] = field(default_factory=dict)
    db_dir: str | None = ".hypothesis/difftest"
    repro_dir: str | None = "difftest-repro"
    workdir: str | None = None
    shrink: bool = True
    readers: list[str] = field(default_factory=list)
    finish: bool = True
    multiple_bugs: bool = True
    """Shrink every distinct failure (Hypothesis report_multiple_bugs); off: only the first."""
    shrink_seconds: float | None = None
    """Stop shrinking after this long (Hypothesis's own limit, 300 s, when None)."""
    reuse: bool = True
    """Replay the example database's saved failures first (the first shard of a campaign
    only: run_shards turns it off for the others)."""
    known: frozenset[str] = frozenset()
    """Signatures an earlier shard of the campaign reported: counted, not shrunk again."""


def run_shard(shard: Shard, on_event: Callable[[str, Any], None] | None = None) -> Stats:
    """One Hypothesis run. ``on_event(kind, value)`` gets "step", "example", "divergence"."""
    stats = Stats(shards=1)
    repro = Path(shard.repro_dir) / f"seed-{shard.seed}" if shard.repro_dir else None
    last: dict[str, Any] = {}

    def step(_what: str) -> None:
        stats.steps += 1
        if on_event:
            on_event("step", 1)

    def example(cfg: Config) -> None:
        stats.examples += 1
        stats.configs[cfg.short()] += 1
        if on_event:
            on_event("example", cfg.short())

    def divergence(d: Divergence, ls: Lockstep) -> None:
        last["d"], last["steps"] = d, len(ls.log)

    def closed(ls: Lockstep) -> None:
        stats.ops.update(ls.ops)
        stats.notes.update(ls.notes)

    def known(key: str) -> None:
        stats.hits[key] += 1
        if on_event:
            on_event("known", key)

    hooks = Hooks(targets=shard.targets, readers=shard.readers, overrides=shard.overrides,
                  finish=shard.finish,
                  workdir=Path(shard.workdir) if shard.workdir else None, repro_dir=repro,
                  on_step=step, on_example=example, on_divergence=divergence, on_close=closed,
                  known=shard.known, on_known=known)

    phases = [Phase.explicit, Phase.generate, Phase.target]
    if shard.reuse:
        phases.insert(1, Phase.reuse)
    if shard.shrink:
        phases.append(Phase.shrink)
    db = DirectoryBasedExampleDatabase(str(Path(shard.db_dir) / "-".join(shard.targets))) \
        if shard.db_dir else None
    s = settings(max_examples=shard.examples, stateful_step_count=shard.steps, deadline=None,
                 database=db, phases=phases, suppress_health_check=list(HealthCheck),
                 report_multiple_bugs=shard.multiple_bugs, print_blob=False)
    machine = make_machine(hooks)
    t0 = time.perf_counter()
    # Hypothesis bounds shrinking by time with a module constant and no setting; a campaign
    # under a time budget lowers it (every shrink attempt replays a whole example).
    shrink_limit = engine.MAX_SHRINKING_SECONDS
    if shard.shrink_seconds is not None:
        engine.MAX_SHRINKING_SECONDS = shard.shrink_seconds  # type: ignore[assignment]
    # Hypothesis (6.13x and later) draws 5% of its values from the literals of the project's
    # modules that happen to be imported (providers._get_local_constants), so a seed gave
    # different examples from the CLI, from pytest, and after an import of difftest.bench.harness.
    # A campaign is reproduced from its seed alone: no local constants.
    local_constants = providers._get_local_constants
    providers._get_local_constants = _no_local_constants
    providers.CONSTANTS_CACHE.cache.clear()  # it may hold local constants picked earlier
    try:
        with with_reporter(_shrink_limit_reporter(shard.shrink_seconds)):
            _run_seeded(machine, s, shard.seed,
                        f"qcow2lab-difftest:{sorted(shard.overrides.items())}".encode())
    except Unsatisfiable:
        pass  # every example met a known finding (Hooks.known): counted in stats.hits
    except Exception as e:  # Flaky failures and oracle trouble are findings too
        # report_multiple_bugs: Hypothesis shrinks every distinct failure (kind + place) on
        # its own and raises them together.
        errors = list(e.exceptions) if isinstance(e, BaseExceptionGroup) else [e]
        for err in errors:
            d = err if isinstance(err, Divergence) else last.get("d")
            if isinstance(d, Divergence):
                reproduced = True
                if hooks.store is not None and shard.shrink:
                    d, reproduced = _delete_operations(hooks.store, d, shard)
                where, steps = hooks.store.lookup(d) if hooks.store is not None else (None, 0)
                key = where.name if where is not None else str(getattr(d, "signature", ""))
                stats.divergences.append(Found(d.kind, normalise(str(d)), shard.seed,
                                               str(where) if where else None, steps, key, reproduced))
                if key:
                    stats.hits[key] += 1
            else:
                msg = "".join(traceback.format_exception_only(err)).strip()
                stats.divergences.append(Found(type(err).__name__, msg, shard.seed, None, 0))
    finally:
        if hooks.store is not None:
            # Only the reported findings keep a folder: the configurations the shrinker
            # passed through on the way left theirs (same bug, larger reproducer).
            hooks.store.prune({d.signature for d in stats.divergences if d.signature})
        engine.MAX_SHRINKING_SECONDS = shrink_limit
        providers._get_local_constants = local_constants
        providers.CONSTANTS_CACHE.cache.clear()
        stats.elapsed = time.perf_counter() - t0
    if on_event and stats.divergences:
        on_event("divergence", stats.divergences[-1].kind)
    return stats


MINIMIZE_SECONDS = 60.0
"""Time for the deletion pass after Hypothesis's shrinking, per distinct divergence."""


def _delete_operations(store: ReproStore, d: Divergence, shard: Shard) -> tuple[Divergence, bool]:
    """Drop operations from ``d``'s smallest reproducer while it still fails the same way,
    then the configuration's features the failure does not need (difftest/core/minimize.py),
    rewriting the reproducer; the divergence it now shows, and whether the recorded
    reproducer failed again when replayed (False: flaky)."""
    key = store.signature_of(d)
    case = store.cases.get(key) if key is not None else None
    if case is None:
        return d, True
    cfg, ops, finish = case
    seconds = MINIMIZE_SECONDS if shard.shrink_seconds is None else min(shard.shrink_seconds,
                                                                        MINIMIZE_SECONDS)
    t0 = time.monotonic()
    workdir = Path(shard.workdir) if shard.workdir else None
    readers = tuple(shard.readers)
    # Also with no operations left: the replay is what proves the reproducer reproduces.
    found = minimize(cfg, ops, shard.targets, d, finish=finish, seconds=seconds, readers=readers,
                     workdir=workdir)
    if found is None:
        return d, False  # it no longer reproduces: the recorded reproducer is left as it is
    ops, d = found
    simpler, d2 = simplify(cfg, ops, shard.targets, d, finish=finish, pinned=frozenset(shard.overrides),
                           seconds=max(seconds - (time.monotonic() - t0), 0.0), readers=readers,
                           workdir=workdir)
    if simpler == cfg and len(ops) >= len(case[1]):
        return d, True
    # The log as the machine records it: a teardown finding's reproducer runs finish().
    store.record(simpler, ops + ([("finish", {})] if finish else []), shard.targets, d2)
    return d2, True


_NO_CONSTANTS = providers.Constants()


SLOW_SHRINK_TEXT = "WARNING: Hypothesis has spent more than five minutes working to shrink"


def _shrink_limit_reporter(limit: float | None) -> Callable[[object], None]:
    """Hypothesis's reporter, except for the fixed text it prints when its shrink time limit
    stops a shrink ("more than five minutes ... PLEASE REPORT THIS"): under a lowered limit
    that text is wrong about the time and asks for a report of nothing, so it becomes one
    line that says what happened. Every other report passes through."""
    report = current_reporter()
    if limit is None:
        return report

    def reporter(value: object) -> None:
        if isinstance(value, str) and value.startswith(SLOW_SHRINK_TEXT):
            report(f"Hypothesis stopped shrinking at the time limit of {limit:g} s; the deletion "
                   "pass goes on from the smallest example so far")
        else:
            report(value)

    return reporter


def _no_local_constants() -> providers.Constants:
    return _NO_CONSTANTS


def _run_seeded(machine: Any, s: settings, seed: int, db_key: bytes = b"qcow2lab-difftest") -> None:
    """run_state_machine_as_test with a fixed seed (Hypothesis' @seed on the machine test).

    Hypothesis' @seed switches the example database off (hypothesis/core.py, ``seed``:
    "deterministic CI tests rather than reproducing observed failures"), and a forced seed
    also drops the database key. A campaign wants both a seed and failures replayed first,
    so the settings and the key are put back after @seed.
    """
    try:
        from hypothesis.stateful import get_state_machine_test
    except ImportError:  # older Hypothesis: no seed control, still a valid run
        run_state_machine_as_test(machine, settings=s)
        return
    test = get_state_machine_test(machine, settings=s)
    test = hyp_seed(seed)(test)
    test._hypothesis_internal_use_settings = s  # type: ignore[attr-defined]
    test._hypothesis_internal_database_key = db_key  # type: ignore[attr-defined]
    test()


def _once_per_campaign(shards: list[Shard]) -> list[Shard]:
    """The saved failures are replayed by the first shard only: every shard shares the
    example database, and each replaying them made one permanent bug count once per shard."""
    return [dataclasses.replace(sh, reuse=False) if i else sh for i, sh in enumerate(shards)]


# -- multi-process ----------------------------------------------------------------------------

def run_shards(shards: list[Shard], jobs: int, on_event: Callable[[str, Any], None] | None = None,
               deadline: float | None = None) -> Stats:
    """Run ``shards`` on ``jobs`` processes (in this process when jobs == 1). With a
    ``deadline`` (time.monotonic()), no shard starts after it."""
    total = Stats()
    t0 = time.perf_counter()
    shards = _once_per_campaign(shards)

    def primed(sh: Shard) -> Shard:
        """``sh`` told which findings the campaign already has (see Hooks.known)."""
        return dataclasses.replace(sh, known=sh.known | {d.signature for d in total.divergences
                                                         if d.signature})

    if jobs <= 1:
        for sh in shards:
            if deadline is not None and time.monotonic() >= deadline:
                break
            total.merge(run_shard(primed(sh), on_event))
        total.one_folder_per_finding()
        total.elapsed = time.perf_counter() - t0
        return total
    # A shard's process is forked when it starts, so it is primed with what the campaign
    # has found by then.
    run_forked(len(shards), lambda i, ev: run_shard(primed(shards[i]), ev), jobs,
               on_result=lambda _i, stats: total.merge(stats),
               on_died=lambda i, why: total.divergences.append(Found("worker-died", why, shards[i].seed,
                                                                     None)),
               on_event=on_event,
               may_start=None if deadline is None else lambda: time.monotonic() < deadline)
    total.one_folder_per_finding()
    total.elapsed = time.perf_counter() - t0
    return total
