"""A deletion pass after Hypothesis's shrinking: the reproducer's operations, one chunk at a
time, are dropped while the same divergence still happens.

Hypothesis shrinks the choices that drew an example, not the operations themselves. When a
failure needs requests in three different L2 slices, moving an offset towards 0 puts two of
them in one slice and the failure goes away, so its shrinker can stop at 7 to 9 operations
where 5 suffice (the impl's planted cache bugs, tests/difftest/test_planted_bugs.py). This
pass replays the recorded operations through a fresh ``Lockstep``, exactly as the generated
``test_repro.py`` does, and so also proves that the reproducer it keeps reproduces.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from difftest.core.config import Config
from difftest.core.divergence import Divergence
from difftest.core.lockstep import Lockstep
from difftest.core.signature import operation_identity

Op = tuple[str, dict[str, Any]]


def replay(cfg: Config, ops: list[Op], targets: list[str], *, finish: bool,
           readers: tuple[str, ...] = (), workdir: Path | None = None) -> Divergence | None:
    """Run ``ops`` (and the teardown checks when ``finish``) in lockstep: the divergence, or None."""
    with tempfile.TemporaryDirectory(prefix="difftest-min-", dir=workdir) as where:
        try:
            with Lockstep(Path(where), cfg, targets, readers) as ls:
                for name, kw in ops:
                    getattr(ls, name)(**kw)
                if finish:
                    ls.finish()
        except Divergence as d:
            return d
    return None


def minimize(cfg: Config, ops: list[Op], targets: list[str], d: Divergence, *, finish: bool, seconds: float,
             readers: tuple[str, ...] = (),
             workdir: Path | None = None) -> tuple[list[Op], Divergence] | None:
    """The shortest subsequence of ``ops`` found within ``seconds`` that still gives a
    divergence with ``d``'s identity (kind and operation; a reader finding's class, operation
    and reader too: signature.operation_identity), with that divergence; None when
    ``ops`` itself no longer reproduces it (then the recorded reproducer is left as it is).
    ``finish``: ``d`` came from the teardown checks, so every replay runs them.

    Chunks of half the list, then a quarter, down to single operations, are tried from the
    end (later operations depend on earlier ones more often than the reverse)."""
    deadline = time.monotonic() + seconds
    want = operation_identity(d, readers)

    def fails(candidate: list[Op]) -> Divergence | None:
        got = replay(cfg, candidate, targets, finish=finish, readers=readers, workdir=workdir)
        return got if got is not None and operation_identity(got, readers) == want else None

    best = fails(ops)
    if best is None:
        return None
    chunk = max(len(ops) // 2, 1)
    while ops and time.monotonic() < deadline:
        i, removed = len(ops), False
        while i > 0 and time.monotonic() < deadline:
            lo = max(i - chunk, 0)
            candidate = ops[:lo] + ops[i:]
            got = fails(candidate)
            if got is not None:
                ops, best, removed = candidate, got, True
            i = lo
        if chunk == 1 and not removed:
            break
        chunk = max(chunk // 2, 1)
    return ops, best


SIMPLER: tuple[tuple[str, Any], ...] = (
    ("version", 3), ("data_file", False), ("extended_l2", False), ("compression_type", "zlib"),
    ("backing_size", "same"), ("lazy_refcounts", False), ("refcount_bits", 16), ("l2_cache_size", None),
    ("l2_cache_entry_size", None), ("refcount_cache_size", None), ("overlap_check", "cached"),
    ("backing", "none"), ("cluster_size", 65536),
)
"""Configuration fields and the plain value each is tried at, after the operations: the
finding's signature (difftest/core/signature.py) names the image features, so a feature the
finding does not need would split one bug into several findings (lazy refcounts drawn in one
shard, not in the next; a reader bug met at 512 B, 1 KiB and 4 KiB clusters was three). The
backing file and the cluster size come last, once the rest is plain: they change the most.
``backing`` qcow2x2 is tried as a single qcow2 layer first."""


def simplify(cfg: Config, ops: list[Op], targets: list[str], d: Divergence, *, finish: bool,
             seconds: float, pinned: frozenset[str] = frozenset(), readers: tuple[str, ...] = (),
             workdir: Path | None = None) -> tuple[Config, Divergence]:
    """``cfg`` with every field of SIMPLER that the finding does not need set to its plain
    value (the ``pinned`` fields, a campaign's ``--config``, are kept), and the divergence
    the simplest configuration gives; ``(cfg, d)`` when nothing could be dropped."""
    deadline = time.monotonic() + seconds
    want = operation_identity(d, readers)
    tries = list(SIMPLER)
    if cfg.backing == "qcow2x2":
        tries.insert(0, ("backing", "qcow2"))
    for name, value in tries:
        if time.monotonic() >= deadline:
            break
        if name in pinned or getattr(cfg, name) == value:
            continue
        candidate = cfg.replace(**{name: value, **({"data_file_raw": False} if name == "data_file" else {})})
        try:
            candidate.validate()
        except ValueError:
            continue
        got = replay(candidate, ops, targets, finish=finish, readers=readers, workdir=workdir)
        if got is not None and operation_identity(got, readers) == want:
            cfg, d = candidate, got
    return cfg, d
