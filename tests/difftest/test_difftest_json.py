"""``qcow2lab difftest --output=json``: stdout holds the JSON report alone, even when something
prints during the campaign (Hypothesis reports a shrink that hit its time limit on stdout, in
the harness and in its shard workers alike)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

from difftest.cli import difftest as cli
from difftest.cli import main
from difftest.core.campaign import Stats


def test_campaign_output_goes_to_stderr_under_json(monkeypatch: pytest.MonkeyPatch,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    def noisy(_args: Any) -> tuple[Stats, list[str]]:
        print("WARNING: Hypothesis has spent more than five minutes working to shrink")
        sys.stdout.flush()
        os.write(1, b"a worker's report on the inherited descriptor\n")
        return Stats(examples=1), ["model", "impl"]

    monkeypatch.setattr(cli, "campaign", noisy)
    assert main(["difftest", "--output", "json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["examples"] == 1
    assert "five minutes" in err and "worker's report" in err


def test_a_lowered_shrink_limit_is_reported_as_itself() -> None:
    """Hypothesis's fixed "more than five minutes ... PLEASE REPORT THIS" text becomes one
    true line when the campaign lowered the limit; other reports pass through untouched."""
    from hypothesis.reporting import with_reporter

    from difftest.core.campaign import SLOW_SHRINK_TEXT, _shrink_limit_reporter

    seen: list[object] = []
    with with_reporter(seen.append):
        lowered = _shrink_limit_reporter(10.0)
        lowered(SLOW_SHRINK_TEXT + " a failing test case, and stopped ...\n\nPLEASE REPORT THIS ...")
        lowered("Falsifying example: ...")
        _shrink_limit_reporter(None)(SLOW_SHRINK_TEXT)
    assert seen == ["Hypothesis stopped shrinking at the time limit of 10 s; the deletion pass goes on "
                    "from the smallest example so far", "Falsifying example: ...", SLOW_SHRINK_TEXT]
