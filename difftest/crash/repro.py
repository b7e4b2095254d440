"""Crash reproducers: a fresh image, the operations, and which recorded host calls reached
the disk (the crash state). ``replay`` rebuilds that one state from them and judges it again:

    qcow2lab crash --replay crash-repro/model-seed-1.json
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from difftest.core.config import Config
from difftest.crash.campaign import Failure, Result, run_example
from difftest.crash.ops import Op
from difftest.crash.states import CrashState


def save(f: Failure, where: Path, name: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{name}.json"
    doc = {"engine": f.engine, "config": dataclasses.asdict(f.cfg),
           "ops": [op.as_list() for op in f.ops], "seed": f.seed, "state": f.state.to_json(),
           "problems": f.problems, "description": f.describe().splitlines()}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def replay(path: Path) -> Result:
    doc = json.loads(path.read_text())
    cfg = Config(**doc["config"])
    ops = [Op(str(k), int(o), int(n), int(a)) for k, o, n, a in doc["ops"]]
    state = CrashState.from_json(doc["state"])
    with tempfile.TemporaryDirectory(prefix="crash-replay-") as d:
        return run_example(str(doc["engine"]), cfg, ops, int(doc["seed"]), Path(d) / "ex",
                           Path(d) / "backing", only=state)
