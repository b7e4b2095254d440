"""A ``py:`` reader beside where qcow2lab runs imports without PYTHONPATH (README, "Writing a
reader"): the console script's sys.path starts with its own directory, not the current one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from difftest.adapters import load


def test_a_reader_module_in_the_current_directory_loads(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "newcomer_reader.py").write_text("UNSUPPORTED = {'backing': {'raw'}}\n")
    (tmp_path / "model.py").write_text("raise AssertionError('shadowed the project model')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    mod = load("py:newcomer_reader")
    assert {"backing": {"raw"}} == mod.UNSUPPORTED
    # Last on the path: a file in the current directory never shadows the project's modules.
    assert sys.path[-1] == os.getcwd()
    assert Path(load("py:model").__file__).parent.name == "model"
