"""``qcow2lab info``, ``check`` and ``map`` load only what they use (DESIGN.md, "Performance":
a CLI command should cost little more than the interpreter's start-up).

Each case runs in a fresh interpreter, since this one has imported everything already, and
reads ``sys.modules`` after the command ran. Timings are never asserted (DESIGN.md); what is
loaded is the deterministic measure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.qemu import create

HEAVY = ("hypothesis", "rich", "numpy", "model", "impl")
"""Packages no fast command needs, except where a case below says otherwise."""


def loaded_after(code: str) -> set[str]:
    """The top-level packages and difftest modules loaded once ``code`` has run."""
    probe = (f"import sys\n{code}\n"
             "print('\\n' + __import__('json').dumps(sorted({m.split('.')[0] for m in sys.modules}"
             " | {m for m in sys.modules if m.startswith('difftest.')})))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(r.stdout.splitlines()[-1]))


def run_command(argv: list[str]) -> str:
    return f"from difftest.cli import main\nrc = main({argv!r})\nassert rc == 0, rc"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("startup") / "small.qcow2"
    create(path, "5M")
    return path


def test_importing_the_cli_loads_no_verb() -> None:
    loaded = loaded_after("import difftest.cli")
    assert not loaded & {*HEAVY, "construct"}, loaded
    assert not {m for m in loaded if m.startswith("difftest.cli.")}


def test_info_loads_neither_the_engines_nor_the_tester(image: Path) -> None:
    loaded = loaded_after(run_command(["info", str(image)]))
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert {m for m in loaded if m.startswith("difftest.")} == {"difftest.cli", "difftest.cli.info"}


def test_check_loads_the_rules_not_the_model(image: Path) -> None:
    # numpy is the rules engine's own: it recomputes every refcount (spec/rules).
    loaded = loaded_after(run_command(["check", str(image)]))
    assert not loaded & (set(HEAVY) - {"numpy"}), loaded & set(HEAVY)
    assert "difftest.cli.difftest" not in loaded and "difftest.core" not in loaded


def test_map_loads_the_model_not_the_tester(image: Path) -> None:
    loaded = loaded_after(run_command(["map", "--output=json", str(image)]))
    assert "model" in loaded
    assert not loaded & {"hypothesis", "rich", "impl"}, loaded
    assert not {m for m in loaded if m.startswith(("difftest.core", "difftest.corpus", "difftest.bench"))}


def test_help_still_lists_every_verb() -> None:
    from difftest.cli import COMMANDS

    r = subprocess.run([sys.executable, "-m", "difftest.cli", "--help"], capture_output=True, text=True,
                       check=True)
    assert all(name in r.stdout for name in COMMANDS)
