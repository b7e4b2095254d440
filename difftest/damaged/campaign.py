"""The damaged-image campaign: examples drawn from the corpus, findings shrunk and saved.

Examples are deterministic in (seed, mutant): the corpus's targeted mutations first, then its
endless stream of bit-flip mutants, each with up to ``MAX_OPS`` requests drawn from
``random.Random(f"{seed}:{mutant}")`` (offsets near the bases' data and table boundaries).
A finding is shrunk by deletion, as difftest/core/minimize.py does for the lockstep: chunks
of requests, then whole damaged bytes, then single flipped bits, each kept out while the same
kind of disagreement remains. The case is then saved as JSON with a repro.sh
(difftest/damaged/repro.py). Equal signatures (kind of disagreement, mutation family) are
reported once, with how often they were hit.

A finding that one of the named differences explains (difftest/damaged/notes.py, from what
qemu-io printed) is counted under the note's name instead: reported, with its hits and an
unshrunk reproducer, but not a failure. Shrinking keeps only candidates that stay unexplained.
"""

from __future__ import annotations

import itertools
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from difftest.corpus.mutate import Base, Mutant, build_bases, random_flips, targeted
from difftest.damaged.case import Case, Finding, Op, Run, count_bits, damage_of, run_case
from difftest.damaged.notes import Note, explain
from difftest.damaged.repro import write_repro

MAX_OPS = 12
SHRINK_SECONDS = 60.0
KiB, MiB = 1024, 1 << 20
POINTS = (0, 4 * KiB, 8 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 1 * MiB, 3 * MiB)
"""Where the bases keep data, zeros and compressed clusters (mutate._build)."""
LENGTHS = (512, 2 * KiB, 4 * KiB, 8 * KiB, 32 * KiB, 64 * KiB)


def draw_ops(rng: random.Random, size: int) -> tuple[Op, ...]:
    ops = []
    for _ in range(rng.randrange(1, MAX_OPS + 1)):
        kind = rng.choices(("read", "write", "write_zeroes", "discard", "flush"), (40, 25, 12, 13, 10))[0]
        if kind == "flush":
            ops.append(Op("flush"))
            continue
        n = rng.choice(LENGTHS)
        if rng.random() < 0.6:
            off = rng.choice(POINTS) + rng.choice((0, 0, 512, -512))
        else:
            off = rng.randrange(size // 512) * 512
        off = max(0, min(off, size - n))
        ops.append(Op(kind, off, n, byte=rng.randrange(1, 256) if kind == "write" else 0,
                      unmap=kind == "write_zeroes" and rng.random() < 0.5))
    return tuple(ops)


def family(mutant: str) -> str:
    """``flip-12@v3`` -> ``flip@v3``: what groups findings of one mutation kind."""
    name, _, base = mutant.partition("@")
    return f"{'flip' if name.startswith('flip-') else name}@{base}"


@dataclass
class Found:
    case: Case
    finding: Finding
    hits: int = 1
    repro: str | None = None
    note: Note | None = None
    """The named difference that explains it (notes.py); None: unexplained."""


@dataclass
class Stats:
    examples: int = 0
    opened: int = 0
    refused: int = 0
    operations: int = 0
    elapsed: float = 0.0
    kinds: Counter[str] = field(default_factory=Counter)
    found: dict[str, Found] = field(default_factory=dict)
    """Unexplained findings, by kind and mutation family: the campaign's failures."""
    noted: dict[str, Found] = field(default_factory=dict)
    """Findings a note explains, by note, kind and mutation family."""


class Corpus:
    """The bases and mutants of one seed, and the files each case needs."""

    def __init__(self, workdir: Path, seed: int) -> None:
        self.seed = seed
        self.bases: dict[str, Base] = build_bases(workdir)
        self._by_name: dict[str, Mutant] = {}

    def mutants(self) -> Iterator[Mutant]:
        for m in itertools.chain(targeted(self.bases, self.seed), random_flips(self.bases, self.seed)):
            if m.oracle == "chain":
                # Backing loops: refused at open by every side, but qemu-io takes minutes to
                # give up on one; the fuzz harness covers them (qemu-img info --backing-chain).
                continue
            self._by_name[m.name] = m
            yield m

    def mutant(self, name: str) -> Mutant:
        """A mutant by name (regenerated for a replayed case)."""
        if name not in self._by_name:
            if name.startswith("flip-"):
                start = int(name.split("@")[0][5:])
                m = next(random_flips(self.bases, self.seed, start))
                self._by_name[m.name] = m
            else:
                for m in targeted(self.bases, self.seed):
                    self._by_name[m.name] = m
        return self._by_name[name]

    def case(self, m: Mutant, ops: tuple[Op, ...]) -> Case:
        base = self.bases[m.base]
        return Case(m.name, self.seed, m.base, m.filename, damage_of(base, m), m.truncated_to, ops)

    def run(self, case: Case, engines: list[str], workdir: Path) -> Run:
        m = self.mutant(case.mutant)
        return run_case(case, self.bases[case.base], m.sidecars, engines, workdir)


REPLAYS = 10
"""How often an unexplained finding's case is run again to see whether QEMU answers alike: seed
19's flip-531@snap took QEMU's rarer branch in 6 of 20 runs on a quiet machine, fewer under load."""


def qemu_varies(first: list[dict[str, str]], again: list[dict[str, str]]) -> bool:
    """Two runs of one case (their trails): at the first request QEMU answered otherwise, the
    engines answered alike in both runs and agreed with QEMU's answer in one of them, and
    every earlier request had every side answer as before (QEMU_NONDETERMINISTIC)."""
    for a, b in zip(first, again, strict=False):  # up to the shorter run's last request
        engines = {k: v for k, v in a.items() if k != "qemu"}
        if engines != {k: v for k, v in b.items() if k != "qemu"}:
            return False
        if a.get("qemu") != b.get("qemu"):
            theirs = set(engines.values())
            return len(theirs) == 1 and bool(theirs & {a.get("qemu"), b.get("qemu")})
    return False


def explain_run(corpus: Corpus, run: Run, engines: list[str], workdir: Path) -> Note | None:
    """The note that explains ``run``'s finding; when none does, the case is run again
    (REPLAYS times at most) and ``run.qemu_varied`` set once QEMU answers otherwise
    (qemu_varies), which explain names."""
    assert run.finding is not None
    note = explain(run.finding, run)
    if note is not None or "qemu" not in engines or run.case is None:
        return note
    for _ in range(REPLAYS):
        if qemu_varies(run.trail, corpus.run(run.case, engines, workdir).trail):
            run.qemu_varied = True
            return explain(run.finding, run)
    return None


def shrink(corpus: Corpus, case: Case, finding: Finding, engines: list[str], workdir: Path,
           seconds: float = SHRINK_SECONDS) -> tuple[Case, Finding]:
    """Fewer requests, then fewer damaged bytes, then fewer flipped bits, while a finding of
    the same kind remains."""
    deadline = time.monotonic() + seconds

    def same(c: Case) -> Finding | None:
        run = corpus.run(c, engines, workdir)
        got = run.finding
        if got is None or got.signature() != finding.signature() or \
                explain(got, run):
            return None
        return got

    def deletions(items: tuple[Any, ...], rebuild: Callable[[tuple[Any, ...]], Case]) -> None:
        nonlocal case, finding
        chunk = max(len(items) // 2, 1)
        while items and time.monotonic() < deadline:
            i, removed = len(items), False
            while i > 0 and time.monotonic() < deadline:
                lo = max(i - chunk, 0)
                candidate = rebuild(items[:lo] + items[i:])
                got = same(candidate)
                if got is not None:
                    case, finding, items, removed = candidate, got, items[:lo] + items[i:], True
                i = lo
            if chunk == 1 and not removed:
                break
            chunk = max(chunk // 2, 1)

    deletions(case.ops, lambda ops: replace(case, ops=ops))
    deletions(case.damage, lambda dmg: replace(case, damage=dmg))
    # Single bits of the bytes that remain.
    for idx in range(len(case.damage)):
        off, mask = case.damage[idx]
        for bit in range(8):
            if time.monotonic() >= deadline or bin(mask).count("1") <= 1:
                break
            if mask >> bit & 1:
                trial = (*case.damage[:idx], (off, mask & ~(1 << bit)), *case.damage[idx + 1:])
                candidate = replace(case, damage=trial)
                got = same(candidate)
                if got is not None:
                    case, finding, mask = candidate, got, mask & ~(1 << bit)
    return case, finding


def campaign(*, seed: int, engines: list[str], time_budget: float | None, examples: int | None,
             repro_dir: Path, shrink_seconds: float = SHRINK_SECONDS,
             on_example: Callable[[Stats], None] | None = None) -> Stats:
    """Run examples until ``examples`` are done or ``time_budget`` seconds are spent."""
    stats = Stats()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qcow2lab-damaged-") as tmp:
        work = Path(tmp)
        corpus = Corpus(work, seed)
        for m in corpus.mutants():
            if examples is not None and stats.examples >= examples:
                break
            if time_budget is not None and time.monotonic() - start >= time_budget:
                break
            rng = random.Random(f"{seed}:{m.name}")
            case = corpus.case(m, draw_ops(rng, 4 * MiB))
            run = corpus.run(case, engines, work / "run")
            stats.examples += 1
            stats.operations += run.steps
            stats.opened += run.opened
            stats.refused += not run.opened
            note = None if run.finding is None else explain_run(corpus, run, engines, work / "again")
            if run.finding is not None and note is not None:
                key = f"{note.name}/{run.finding.signature()}:{family(m.name)}"
                if key in stats.noted:
                    stats.noted[key].hits += 1
                else:
                    stats.noted[key] = Found(case, run.finding, note=note)
                    stats.noted[key].repro = str(write_repro(repro_dir / "noted", key, case, run.finding))
            elif run.finding is not None:
                key = f"{run.finding.signature()}:{family(m.name)}"
                stats.kinds[run.finding.kind] += 1
                if key in stats.found:
                    stats.found[key].hits += 1
                else:
                    small, f = shrink(corpus, case, run.finding, engines, work / "shrink", shrink_seconds)
                    found = Found(small, f)
                    found.repro = str(write_repro(repro_dir, key, small, f))
                    stats.found[key] = found
            stats.elapsed = time.monotonic() - start
            if on_example is not None:
                on_example(stats)
    stats.elapsed = time.monotonic() - start
    return stats


def describe(found: Found) -> str:
    c = found.case
    noted = f"[note {found.note.name}{', open' if found.note.open else ''}] " if found.note else ""
    return (f"{noted}{found.finding} | mutant {c.mutant}, {len(c.damage)} damaged byte(s), "
            f"{count_bits(c.damage)} bit(s), {len(c.ops)} request(s): "
            f"{', '.join(str(op) for op in c.ops) or '-'} (hit {found.hits}x)")
