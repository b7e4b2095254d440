"""The fuzz harness (difftest/corpus/fuzz.py): a fixed-seed campaign finds nothing, and the harness
really does catch crashes, hangs, memory blow-ups and dying workers when they happen.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from difftest.cli import main
from difftest.corpus import fuzz
from difftest.corpus import mutate as mu
from spec.errors import FormatError


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mu.Base]:
    return mu.build_bases(tmp_path_factory.mktemp("fuzz-bases"))


def test_fixed_seed_campaign_has_no_findings(tmp_path: Path) -> None:
    c = fuzz.campaign(200, seed=0, jobs=2, workdir=str(tmp_path))
    assert [(r.name, r.outcome, r.probe, r.error) for r in c.findings] == []
    counts = c.counts()
    assert counts["ok"] + counts["rejected"] == 200
    # The corpus is hostile enough to be refused often, and mild enough to be read often.
    assert counts["ok"] > 20 and counts["rejected"] > 20
    assert "spec.image" in c.probes
    assert all(r.probe_cpu for r in c.results)  # every image went through the probes


def _crash(path: str) -> None:
    raise ValueError("planted bug")


def _hang(path: str) -> None:
    while True:
        pass


def _balloon(path: str) -> None:
    blocks = []
    for _ in range(64):
        blocks.append(bytearray(16 << 20))  # 1 GiB in all, far above the test's 64 MiB cap


def _reject(path: str) -> None:
    raise FormatError("refused", "header")


def _die(path: str) -> None:
    if Path(path).name.startswith("l1-"):
        os._exit(3)


def test_harness_classifies_planted_faults(bases: dict[str, mu.Base],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault-injecting probes; the pool is forked after patching, so workers see them."""
    monkeypatch.setitem(fuzz.PROBES, "crash", ("spec.image", _crash))
    monkeypatch.setitem(fuzz.PROBES, "hang", ("spec.image", _hang))
    monkeypatch.setitem(fuzz.PROBES, "balloon", ("spec.image", _balloon))
    monkeypatch.setitem(fuzz.PROBES, "reject", ("spec.image", _reject))
    mutants = mu.corpus(bases, 2, seed=0)
    results = {}
    for probe in ("crash", "hang", "balloon", "reject", "spec.image"):
        # Only the hanging probe needs a short limit; the others get room for a loaded CI
        # machine (0.2 s for all made the honest probes time out now and then).
        limit = 0.2 if probe == "hang" else 10.0
        results[probe] = list(fuzz.iterate(mutants, jobs=1, time_limit=limit, memory_limit=64 << 20,
                                           probes=[probe]))
    assert [r.outcome for r in results["crash"]] == ["crash", "crash"]
    assert "ValueError" in (results["crash"][0].error or "")
    assert [r.outcome for r in results["hang"]] == ["hang", "hang"]
    assert [r.outcome for r in results["balloon"]] == ["memory", "memory"]
    assert [r.outcome for r in results["reject"]] == ["rejected", "rejected"]
    assert results["reject"][0].rejections == {"reject": "FormatError"}
    assert all(not r.finding for r in results["spec.image"])


def test_harness_survives_a_dying_worker(bases: dict[str, mu.Base], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(fuzz.PROBES, "die", ("spec.image", _die))
    mutants = [m for m in mu.targeted(bases) if m.name.startswith(("header-corrupt", "l1-reserved",
                                                                      "header-compatible"))]
    names = [m.name for m in mutants]
    assert any(n.startswith("l1-") for n in names) and any(n.startswith("header-") for n in names)
    results = list(fuzz.iterate(mutants, jobs=1, probes=["die"]))
    assert [r.name for r in results] == names  # every mutant answered, in order
    for r in results:
        assert r.outcome == ("crash" if r.name.startswith("l1-") else "ok"), r


def test_cli_fuzz_runs_a_short_campaign(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fuzz", "--images", "12", "--seed", "5", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "12 mutants, seed 5" in out and "crash" in out


def test_cli_fuzz_compares_with_qemu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fuzz", "--images", "8", "--seed", "0", "--jobs", "1", "--qemu"]) == 0
    out = capsys.readouterr().out
    assert "qemu-img check's verdict against spec.rules'" in out
    assert "the mutation intends" not in out  # QEMU judged every targeted mutant as intended


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_campaign_has_no_findings(seed: int, tmp_path: Path) -> None:
    c = fuzz.campaign(1500, seed=seed, jobs=2, workdir=str(tmp_path))
    assert [(r.name, r.outcome, r.probe, r.error) for r in c.findings] == []
