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


def test_a_lowered_shrink_limit_is_reported_as_itself(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Hypothesis's fixed "more than five minutes ... PLEASE REPORT THIS" text becomes one
    true line when the campaign lowered the limit (the shard's run reports through the
    wrapper); other reports pass through untouched; without a lowered limit the text stays."""
    import inspect

    from hypothesis.internal.conjecture import engine
    from hypothesis.reporting import report

    from difftest.core import campaign
    from difftest.core.campaign import SLOW_SHRINK_TEXT, Shard

    assert SLOW_SHRINK_TEXT in inspect.getsource(engine)  # the text this replaces is Hypothesis's

    def reporting_run(*_: Any) -> None:  # stands in for the Hypothesis run of the shard
        report(SLOW_SHRINK_TEXT + " a failing test case, and stopped ...\n\nPLEASE REPORT THIS ...")
        report("Falsifying example: ...")

    monkeypatch.setattr(campaign, "_run_seeded", reporting_run)
    for limit in (10.0, None):
        campaign.run_shard(Shard(["model"], 0, 1, 1, {}, db_dir=None, repro_dir=None, shrink_seconds=limit))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln]
    assert lines[:2] == ["Hypothesis stopped shrinking at the time limit of 10 s; the deletion pass goes "
                         "on from the smallest example so far", "Falsifying example: ..."]
    assert lines[2].startswith(SLOW_SHRINK_TEXT) and lines[3].startswith("PLEASE REPORT THIS")
    assert lines[4:] == ["Falsifying example: ..."]
