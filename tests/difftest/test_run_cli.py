"""``qcow2lab run`` (make run): the lockstep, the damaged-image mode and the crash campaign
share one budget, and the closing summary reports all three."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from difftest.cli import build_parser, crash, damaged
from difftest.cli import run as run_cli
from difftest.damaged.campaign import Stats


def _args(*extra: str) -> argparse.Namespace:
    return build_parser(["run"]).parse_args(["run", *extra])


def test_the_three_shares_make_up_the_budget() -> None:
    args = _args()
    assert args.time_budget + run_cli.DAMAGED_SHARE + run_cli.CRASH_SHARE == run_cli.TOTAL
    assert run_cli.DAMAGED_SHARE > 0


def test_run_gives_the_damaged_mode_its_share_and_summarises_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    calls: list[str] = []
    seen: dict[str, object] = {}

    def lockstep(args: argparse.Namespace) -> int:
        calls.append("lockstep")
        return 0

    def damaged_campaign(ns: argparse.Namespace, engines: list[str]) -> tuple[int, Stats]:
        calls.append("damaged")
        seen.update(vars(ns), engines=engines)
        return 1, Stats(examples=7, opened=6, refused=1, operations=40, elapsed=19.5)

    def crash_run(args: argparse.Namespace) -> int:
        calls.append("crash")
        seen["crash_budget"] = args.time_budget
        return 0

    monkeypatch.setattr(run_cli, "difftest_run", lockstep)
    monkeypatch.setattr(damaged, "run_campaign", damaged_campaign)
    monkeypatch.setattr(crash, "run", crash_run)
    monkeypatch.setattr("difftest.core.qemuio.available", lambda: True)
    status = run_cli.run(_args("--seed", "5", "--targets", "model,qemu", "--repro", str(tmp_path)))
    assert status == 1  # an unexplained damaged-image finding fails the run
    assert calls == ["lockstep", "damaged", "crash"]
    assert seen["time_budget"] == run_cli.DAMAGED_SHARE and seen["crash_budget"] == run_cli.CRASH_SHARE
    assert seen["seed"] == 5 and seen["engines"] == ["model", "qemu"] and seen["repro"] == str(tmp_path)
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("qcow2lab run: lockstep ok; damaged FAILED: 7 damaged images")
    assert "40 requests" in err and err.endswith("crash ok")


def test_the_damaged_part_drives_the_engines_it_knows_beside_qemu() -> None:
    ns, engines = run_cli.damaged_args(_args("--targets", "cmd:x=foo,impl"))
    assert engines == ["impl", "qemu"] and ns.output == "human"  # qemu-io is always the oracle
    assert run_cli.damaged_args(_args())[1] == ["model", "impl", "qemu"]
