"""The ``difftest`` row of ``qcow2lab bench impl``: steady-state lockstep throughput, measured
by the harness of ``qcow2lab bench difftest`` (difftest/bench/harness.py), for impl against a
second impl (the harness's own cost with the fast engine) and for the three-way set."""

from __future__ import annotations

from difftest.bench import harness
from difftest.bench.impl.common import Progress, RowResult, Workspace
from difftest.core.config import Config

OPS = 2000
SETS = (["impl", "impl2"], ["model", "impl", "qemu"])
TARGETS = (20000.0, 1500.0)


def difftest(ws: Workspace, rounds: int, progress: Progress) -> RowResult:
    cfg = Config(cluster_size=4096, size=64 << 20)
    available = harness.target_sets()
    figs: dict[str, float] = {}
    floors: dict[str, float] = {}
    missing = []
    for targets in SETS:
        key = "+".join(targets)
        if targets not in available:
            missing.append(key)
            continue
        progress(f"difftest {key}")
        figs[key] = harness.steady_state(targets, OPS, cfg, rounds=rounds)["ops_per_second"]
        progress(f"difftest {key} floor")
        floors[key] = harness.steady_floor(targets, OPS, cfg, rounds=rounds)
    pair, three = (figs.get("+".join(t), 0.0) for t in SETS)
    ok = not missing and pair >= TARGETS[0] and three >= TARGETS[1]
    figs.update({f"{k} floor": v for k, v in floors.items()})
    # The floor: the same steps made as bare calls (the request, then a read and a map of
    # the touched clusters on each engine, read -q and alloc on qemu-io), one target after
    # the other, nothing compared (harness.steady_floor). What the lockstep costs on top is
    # the harness's; the rest is the engines' and qemu-io's own time.
    note = "; ".join(f"floor {k}: {v:,.0f} ops/s (bare calls, nothing compared)" for k, v in floors.items())
    if missing:
        note = f"not in harness.target_sets(): {', '.join(missing)}; {note}"
    return RowResult("difftest", f"steady lockstep, 4 KiB clusters, {OPS} ops x {rounds} rounds",
                     pair, three, "ops/s", pair / three if three else 0.0,
                     f">= {TARGETS[0]:.0f} and >= {TARGETS[1]:.0f} ops/s", ok,
                     ours_label="impl+impl2", peer_label="model+impl+qemu", figures=figs, note=note)
