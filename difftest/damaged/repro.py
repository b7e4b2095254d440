"""A damaged-image finding, saved so that it can be run again.

``case.json`` holds the case (mutant, corpus seed, damage as (offset, xor mask) per byte,
requests); ``repro.sh`` rebuilds the base the way the corpus does (qemu-img create and
qemu-io, difftest/corpus/mutate.py), applies the damage as a byte patch, and runs the
requests through qemu-io and ``qemu-img check``: what QEMU does, to set beside what the
engines do (``qcow2lab difftest --damaged --replay DIR/case.json`` runs them all again and
exits 1 while they disagree).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from difftest.damaged.case import Case, Finding

SCRIPT = """\
#!/bin/sh
# qcow2lab damaged-image reproducer, qemu side. Run in an empty directory with the project's
# python (its venv) first on PATH; replay every engine with:
#   qcow2lab difftest --damaged --replay {json}
# finding: {finding}
set -e
python3 - <<'PY'
import json
from pathlib import Path
from difftest.damaged.campaign import Corpus
from difftest.damaged.case import Case
case = Case.from_json(json.loads(Path({json!r}).read_text()))
corpus = Corpus(Path("."), case.seed)  # the bases: qemu-img create + qemu-io (mutate._build)
for name, blob in corpus.mutant(case.mutant).sidecars.items():
    Path(name).write_bytes(blob)
Path(case.filename).write_bytes(case.image_bytes(corpus.bases[case.base]))  # the byte patch
PY
set +e -x
{qemu_io}
qemu-img check {file}
"""


def write_repro(root: Path, key: str, case: Case, finding: Finding) -> Path:
    """Write the case as ``root/<key>/`` (case.json, repro.sh); the directory."""
    d = root / re.sub(r"[^A-Za-z0-9_.@-]+", "_", key)
    d.mkdir(parents=True, exist_ok=True)
    (d / "case.json").write_text(json.dumps({**case.to_json(), "finding": str(finding)}, indent=1))
    argv = ["qemu-io", "-f", "qcow2"]
    for op in case.ops:
        argv += ["-c", op.qemu_io()]
    script = SCRIPT.format(json=str((d / "case.json").resolve()), finding=str(finding).replace("\n", " "),
                           qemu_io=shlex.join([*argv, case.filename]) if case.ops else "# no requests",
                           file=shlex.quote(case.filename))
    (d / "repro.sh").write_text(script)
    (d / "repro.sh").chmod(0o755)
    return d
