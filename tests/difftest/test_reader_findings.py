"""Reader findings (issue 14, parts 3 to 5): signatures, shrinking, reproducers that fail
while the bug is there, no flooding, and the conformance matrix, on a planted reader bug
(tests/difftest/planted_reader.py: zero clusters over a backing file read as 0xEE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from difftest.cli import main
from difftest.conformance.areas import BY_NAME, select
from difftest.conformance.matrix import Cell, CellFinding, classify, declared_unsupported
from difftest.conformance.render import to_markdown
from difftest.core import qemuio
from difftest.core.campaign import Found, Shard, Stats, _once_per_campaign, run_shards
from difftest.core.config import Config
from difftest.core.divergence import Divergence
from difftest.core.repro import PROJECT
from difftest.core.signature import covers, finding_class, normalise, signature

PLANTED = "py:tests.difftest.planted_reader:reader"
ZERO_OVER_BACKING = {"backing": "qcow2", "backing_size": "same", "cluster_size": 4096, "version": 3,
                     "encrypt": "none", "data_file": False, "size": 8 * 4096}
Findings = list[tuple[Found, int, list[Found]]]
needs_qemu = pytest.mark.skipif(not qemuio.available(), reason="qemu-img/qemu-io not installed")


# -- signatures ---------------------------------------------------------------------------------

def test_the_class_comes_from_the_message_prefix_or_the_older_message_forms() -> None:
    assert finding_class(Divergence("reader", "finish", "hang: dissect gave no answer")) == "hang"
    assert finding_class(Divergence("reader", "finish", "libqcow reads qemu's file differently "
                                    "from model at guest offset 4096: b1b1 vs 0000")) == "wrong-bytes"
    assert finding_class(Divergence("reader", "finish", "libqcow reading [0, 512) of qemu's file: "
                                    "OSError: unable to read")) == "error"
    assert finding_class(Divergence("bytes", "write(off=0)", "differ")) is None


def test_a_signature_is_stable_across_offsets_paths_and_cache_options() -> None:
    cfg = Config(backing="qcow2", cluster_size=4096)
    a = Divergence("reader", "finish", "libqcow reads qemu's file differently from model at guest "
                   "offset 4096: b1 vs 00")
    b = Divergence("reader", "finish", "libqcow reads model's file differently from model at guest "
                   "offset 12288: b1 vs 00")
    sig = signature(a, cfg, ["dissect", "libqcow"])
    assert sig == signature(b, cfg.replace(l2_cache_size=8192, size=1 << 20), ["dissect", "libqcow"])
    assert sig == "reader-wrong-bytes-read-libqcow--v3,c4K,qcow2"
    # Another class, another reader or another feature set is another finding.
    assert signature(a, cfg, ["libqcow"]) != signature(a, cfg.replace(backing="raw"), ["libqcow"])
    err = Divergence("reader", "finish", "libqcow cannot open qemu's file: OSError: x")
    assert signature(err, cfg, ["libqcow"]).startswith("reader-error-open-libqcow--")
    assert "/" not in signature(Divergence("bytes", "read(off=1, n=2)", "/tmp/x"), cfg)


def test_temporary_paths_are_normalised_away() -> None:
    msg = "cannot open /tmp/difftest-abc123/qemu/top.qcow2: no <obj at 0x7f3a2b4c5d6e>"
    assert normalise(msg) == "cannot open <tmp>: no <obj at 0x…>"
    # The project's own sources and numbers in hex stay.
    kept = "at /work/main/difftest/core/teardown.py: unsupported flags 0x00000004"
    assert normalise(kept) == kept


def test_a_known_finding_covers_meetings_with_more_features() -> None:
    known = "reader-error-read-libqcow--v3,c4K,qcow2,shorter-backing"
    assert covers(known, "reader-error-read-libqcow--v3,c4K,lazy,qcow2,shorter-backing")
    assert not covers(known, "reader-error-read-libqcow--v3,c4K,qcow2")
    assert not covers(known, "reader-wrong-bytes-read-libqcow--v3,c4K,qcow2,shorter-backing")
    # A finding simplified to a backing file of the image's size covers a short one too.
    assert covers("reader-wrong-bytes-read-x--v3,c4K,qcow2",
                  "reader-wrong-bytes-read-x--v3,c4K,qcow2,shorter-backing")


def test_saved_failures_are_replayed_by_the_first_shard_only() -> None:
    shards = _once_per_campaign([Shard(["model", "impl"], seed=k, examples=1, steps=1) for k in range(4)])
    assert [s.reuse for s in shards] == [True, False, False, False]


# -- the planted reader bug, end to end ------------------------------------------------------------

@pytest.fixture(scope="module")
def planted_campaign(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Findings]:
    """Three shards on the planted reader: the first finds and shrinks, the others meet it."""
    root = tmp_path_factory.mktemp("planted")
    shards = [Shard(["model", "qemu"], seed=3 + k, examples=3, steps=4, overrides=ZERO_OVER_BACKING,
                    db_dir=str(root / "db"), repro_dir=str(root / "repro"), workdir=str(root / "work"),
                    readers=[PLANTED], shrink_seconds=10) for k in range(3)]
    stats = run_shards(shards, 1)
    return root, stats.findings()


@needs_qemu
def test_a_reader_finding_is_shrunk_named_and_counted_once(planted_campaign: tuple[Path, Findings]) -> None:
    root, findings = planted_campaign
    assert len(findings) == 1, findings  # one distinct finding, whatever the shards
    best, hits, _ = findings[0]
    assert hits == 3  # met by every shard, shrunk by the first
    assert best.steps <= 3
    assert best.signature == "reader-wrong-bytes-read-planted_reader--v3,c4K,qcow2"
    assert best.repro_dir is not None and Path(best.repro_dir).name == best.signature
    # The configurations the shrinker passed through left no folders behind.
    folders = [p.name for p in (root / "repro").glob("seed-*/*")]
    assert folders == [best.signature]


@needs_qemu
def test_repro_sh_runs_the_reader_and_fails_while_the_bug_is_there(
        planted_campaign: tuple[Path, Findings], tmp_path: Path) -> None:
    best = planted_campaign[1][0][0]
    script = Path(best.repro_dir) / "repro.sh"
    assert "difftest.core.readcheck" in script.read_text()
    for fixed, want in (("", 1), ("1", 0)):
        where = tmp_path / f"run{fixed}"
        where.mkdir()
        env = {**os.environ, "PLANTED_READER_FIXED": fixed}
        r = subprocess.run(["sh", str(script)], cwd=where, capture_output=True, text=True, env=env)
        assert r.returncode == want, r.stderr[-2000:]
    assert "wrong-bytes" in subprocess.run(["sh", str(script)], cwd=tmp_path / "run", capture_output=True,
                                           text=True).stderr


@needs_qemu
def test_test_repro_includes_the_reader_and_fails_while_the_bug_is_there(
        planted_campaign: tuple[Path, Findings]) -> None:
    best = planted_campaign[1][0][0]
    test = Path(best.repro_dir) / "test_repro.py"
    assert repr([PLANTED]) in test.read_text()
    for fixed, want in (("", 1), ("1", 0)):
        env = {**os.environ, "PLANTED_READER_FIXED": fixed,
               "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                           cwd=PROJECT, capture_output=True, text=True, env=env)
        assert r.returncode == want, r.stdout[-2000:]


# -- the conformance matrix ----------------------------------------------------------------------------

def test_areas_pin_valid_configurations() -> None:
    for area in select(None):
        Config(**{k: v for k, v in area.overrides.items()}).validate()
    with pytest.raises(ValueError):
        select("plain,nosuch")


def test_a_declared_unsupported_value_makes_the_cell_unsupported() -> None:
    assert declared_unsupported("libqcow", BY_NAME["zstd"]) == "declares compression_type=zstd unsupported"
    assert declared_unsupported("libqcow", BY_NAME["zero-over-backing"]) is None
    assert declared_unsupported(PLANTED, BY_NAME["zstd"]) is None


def test_markdown_matrix_has_a_row_per_area_and_a_column_per_reader() -> None:
    two = Cell("short-backing", "libqcow", "error", repro="r/e", steps=0,
               others=[CellFinding("wrong-bytes", 1, "r/w", 1, "")])
    cells = [Cell("plain", "dissect", "pass"), Cell("plain", "libqcow", "wrong-bytes", repro="r/x", steps=1),
             Cell("short-backing", "dissect", "pass"), two]
    md = to_markdown(cells).splitlines()
    assert md[0] == "| area | dissect | libqcow |"
    assert md[2].endswith("| pass | wrong bytes, 1 op: r/x |")
    assert md[3].endswith("| pass | error, 0 ops: r/e<br>wrong bytes, 1 op: r/w |")


def test_a_cell_keeps_every_distinct_finding_the_most_met_first() -> None:
    stats = Stats(examples=3)
    stats.ops["write"] = 3
    for sig, steps, hits in (("reader-wrong-bytes-read-x--v3", 1, 1), ("reader-error-read-x--v3", 0, 1),
                             ("reader-hang-read-x--v3", 2, 4)):
        stats.divergences.append(Found("reader", "m", 1, f"r/{sig}", steps, sig))
        stats.hits[sig] = hits
    cell = classify(Cell("a", "x"), stats)
    assert (cell.outcome, cell.hits) == ("hang", 4)
    assert [(o.outcome, o.steps) for o in cell.others] == [("error", 0), ("wrong-bytes", 1)]


@needs_qemu
def test_conformance_cli_finds_the_planted_bug_in_its_cell(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["conformance", "--readers", PLANTED, "--areas", "zero-over-backing,v2", "--time-budget", "6",
               "--seed", "3", "--out", str(tmp_path), "--output", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    cells = {c["area"]: c for c in out["cells"]}
    zero = cells["zero-over-backing"]
    assert zero["outcome"] == "wrong-bytes", zero
    assert zero["steps"] <= 3 and Path(zero["repro"], "repro.sh").exists()
    # No backing file, no zero cluster over one: the planted bug cannot show.
    assert cells["v2"]["outcome"] == "pass", cells["v2"]
