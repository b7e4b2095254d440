"""Reader findings (issue 14, parts 3 to 5): signatures, shrinking, reproducers that fail
while the bug is there, no flooding, and the conformance matrix, on a planted reader bug
(tests/difftest/planted_reader.py: zero clusters over a backing file read as 0xEE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def test_a_backing_file_the_image_was_grown_past_is_a_shorter_one() -> None:
    """A resize past the backing file's end meets what a short backing file gives: the
    signature says shorter-backing, so the finding is the short-backing cell's one and not a
    second finding of the same bug (found in the zero-over-backing cell, 2026-12-07)."""
    d = Divergence("reader", "finish", "error: libqcow reading [0, 37376): OSError: parent file")
    cfg = Config(backing="qcow2", cluster_size=4096, size=32768)
    grown = [("resize", {"new_size": 37376, "shrink": False})]
    shrunk = [("resize", {"new_size": 16384, "shrink": True})]
    short = cfg.replace(backing_size="shorter")
    assert signature(d, cfg, ["libqcow"], grown) == signature(d, short, ["libqcow"])
    assert signature(d, cfg, ["libqcow"], grown).endswith("--v3,c4K,qcow2,shorter-backing")
    assert signature(d, cfg, ["libqcow"], shrunk).endswith(",qcow2")
    assert signature(d, cfg.replace(backing="none"), ["libqcow"], grown).endswith("--v3,c4K")


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
    # One simplified to 64 KiB clusters and no backing file covers any cluster size and backing.
    assert covers("reader-wrong-bytes-read-x--v3,c64K", "reader-wrong-bytes-read-x--v3,c512,raw")
    assert not covers("reader-wrong-bytes-read-x--v3,c4K", "reader-wrong-bytes-read-x--v3,c512")


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
    assert best.signature == "reader-wrong-bytes-read-planted_reader.reader--v3,c4K,qcow2"
    assert best.repro_dir is not None and Path(best.repro_dir).name == best.signature
    # The configurations the shrinker passed through left no folders behind.
    folders = [p.name for p in (root / "repro").glob("seed-*/*")]
    assert folders == [best.signature]


def test_one_finding_keeps_one_folder(tmp_path: Path) -> None:
    """Two shards that shrink to the same signature from different starts each wrote a
    seed-N folder; the campaign keeps the best one (fewest operations) only."""
    sig = "reader-wrong-bytes-read-m.r--v3,c512,raw"
    dirs = [tmp_path / f"seed-{n}" / sig for n in (1, 2)]
    for d in dirs:
        d.mkdir(parents=True)
        (d / "repro.sh").write_text("exit 1\n")
    stats = Stats(divergences=[Found("reader", "m", 1, str(dirs[0]), 3, sig),
                               Found("reader", "m", 2, str(dirs[1]), 0, sig)])
    stats.one_folder_per_finding()
    assert not dirs[0].exists() and dirs[1].exists()
    assert {d.repro_dir for d in stats.divergences} == {str(dirs[1])}


@needs_qemu
def test_a_finding_that_does_not_fail_again_on_replay_is_flaky(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that fails once and then reads right: the replay of its reproducer passes,
    so the finding is reported as flaky (Found.reproduced, the summary, the matrix cell),
    not as confirmed."""
    from difftest.conformance.matrix import Cell, classify
    from difftest.conformance.render import cell_text

    monkeypatch.setenv("PLANTED_READER_ONCE", str(tmp_path / "failed-once"))
    shard = Shard(["model", "qemu"], seed=1, examples=1, steps=2, overrides={"backing": "none", "version": 3},
                  db_dir=None, repro_dir=str(tmp_path / "repro"), workdir=str(tmp_path / "work"),
                  readers=["py:tests.difftest.planted_reader:once"], shrink_seconds=10)
    stats = run_shards([shard], 1)
    [(best, _, met)] = stats.findings()
    assert "first open fails" in best.message and not any(d.reproduced for d in met)
    assert best.to_json()["reproduced"] is False
    cell = classify(Cell("plain", "once"), stats)
    assert cell.flaky and "flaky" in cell_text(cell)


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


def test_two_readers_of_one_module_are_two_names() -> None:
    """Folders and signatures name a py: reader by its module's last part and its object, so
    two readers of one module never share a reproducer folder (a newcomer's conformance run
    had py:m:buggy's cell point at py:m:buggy2's script)."""
    cfg = Config(backing="qcow2", cluster_size=4096)
    d = Divergence("reader", "finish", "py:m:buggy reads qemu's file differently from model")
    e = Divergence("reader", "finish", "py:m:buggy2 reads qemu's file differently from model")
    readers = ["py:m:buggy", "py:m:buggy2"]
    assert signature(d, cfg, readers) == "reader-wrong-bytes-read-m.buggy--v3,c4K,qcow2"
    assert signature(e, cfg, readers) == "reader-wrong-bytes-read-m.buggy2--v3,c4K,qcow2"


@needs_qemu
def test_reproducers_of_a_reader_outside_the_checkout_import_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader module beside where the campaign ran (not in the project): repro.sh and
    test_repro.py put its directory on the path, so they fail with the bug from an empty
    directory and pass once it is fixed; they used to fail with ModuleNotFoundError either
    way."""
    from difftest.core.repro import write_reproducers

    mine = tmp_path / "my-readers"
    mine.mkdir()
    (mine / "outside_reader.py").write_text("from tests.difftest.planted_reader import reader\n")
    monkeypatch.syspath_prepend(str(mine))
    spec = "py:outside_reader:reader"
    d = Divergence("reader", "finish", f"wrong-bytes: {spec} reads qemu's file differently from model")
    sh, py = write_reproducers(tmp_path / "repro", Config(**ZERO_OVER_BACKING),
                               [("discard", {"off": 0, "n": 8192})], ["model", "qemu"], d, [spec])
    assert str(mine) in sh.read_text() and str(mine) in py.read_text()
    # A py: target from there gets the same path in test_repro.py (the worker imports it too).
    from difftest.core.repro import pytest_body
    assert str(mine) in pytest_body(Config(), [], ["py:outside_reader:reader", "qemu"])
    assert "sys.path" not in pytest_body(Config(), [], ["model", "qemu"], d, ["dissect"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for fixed, want in (("", 1), ("1", 0)):
        where = tmp_path / f"run{fixed}"
        where.mkdir()
        r = subprocess.run(["sh", str(sh)], cwd=where, capture_output=True, text=True,
                           env={**env, "PLANTED_READER_FIXED": fixed})
        assert r.returncode == want and "ModuleNotFoundError" not in r.stderr, r.stderr[-2000:]
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(py)],
                           cwd=where, capture_output=True, text=True,
                           env={**env, "PLANTED_READER_FIXED": fixed, "PYTHONPATH": str(PROJECT)})
        assert r.returncode == want and "ModuleNotFoundError" not in r.stdout, r.stdout[-2000:]


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


def test_a_short_backing_finding_met_through_a_grow_is_marked_and_comes_after_the_areas_own() -> None:
    from difftest.conformance.render import cell_text

    stats = Stats(examples=2)
    for sig, hits in (("reader-error-read-x--v3,c4K,qcow2,shorter-backing", 5),
                      ("reader-wrong-bytes-read-x--v3,c4K,qcow2", 1)):
        stats.divergences.append(Found("reader", "m", 1, f"r/{sig}", 1, sig))
        stats.hits[sig] = hits
    cell = classify(Cell("zero-over-backing", "x"), stats)
    assert (cell.outcome, cell.grown) == ("wrong-bytes", False)  # the area's own, though met less
    assert [(o.outcome, o.grown) for o in cell.others] == [("error", True)]
    assert cell_text(cell).split("; ")[1].startswith("error (short-backing's, through a grow")
    assert cell.to_json()["others"][0]["grown_past_backing"] is True
    # In the short-backing area the same name is the area's own finding.
    own = classify(Cell("short-backing", "x"), stats)
    assert not own.grown and not any(o.grown for o in own.others) and own.outcome == "error"


@needs_qemu
def test_conformance_cli_finds_the_planted_bug_in_its_cell(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["conformance", "--readers", PLANTED, "--areas", "zero-over-backing,v2", "--time-budget", "6",
               "--seed", "3", "--jobs", "2", "--out", str(tmp_path), "--output", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1
    cells = {c["area"]: c for c in out["cells"]}
    zero = cells["zero-over-backing"]
    assert zero["outcome"] == "wrong-bytes", zero
    assert zero["steps"] <= 3 and Path(zero["repro"], "repro.sh").exists()
    # No backing file, no zero cluster over one: the planted bug cannot show.
    assert cells["v2"]["outcome"] == "pass", cells["v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["zero-over-backing"]  # no empty folder for v2


def test_parallel_cells_come_back_in_matrix_order_and_a_dead_one_is_not_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs: cells run in forked processes (which inherit this patched run_cell). The
    first cell waits until the third has run (which starts only once the second's death
    was noticed), and the second's process dies without reporting. Which of the first and
    third reports first is a race (the third's flag lets the first return at once), so only
    the dead cell's place in the report order is asserted; that the first saw the third's
    flag (rather than its deadline) shows they overlapped."""
    import time

    from difftest.conformance import matrix

    flag = tmp_path / "zlib-done"

    def fake_cell(area: Any, reader: str, **_: Any) -> Cell:
        if area.name == "v2":
            os._exit(3)
        if area.name == "zlib":
            flag.touch()
        deadline = time.monotonic() + 60
        while area.name == "plain" and not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return Cell(area.name, reader, outcome="pass", examples=1 if flag.exists() else 0)

    monkeypatch.setattr(matrix, "run_cell", fake_cell)
    started: list[str] = []
    ended: list[str] = []
    cells = matrix.run_matrix(select("plain,v2,zlib"), ["r"], budget=1, seed=0, out=tmp_path, jobs=2,
                              on_start=lambda c: started.append(c.area),
                              on_cell=lambda c: ended.append(c.area))
    assert [(c.area, c.outcome, c.died) for c in cells] == [("plain", "pass", False), ("v2", "not run", True),
                                                            ("zlib", "pass", False)]
    assert "exit 3" in cells[1].detail
    assert cells[0].examples == 1
    assert started == ["plain", "v2", "zlib"] and ended[0] == "v2" and sorted(ended[1:]) == ["plain", "zlib"]


@needs_qemu
def test_a_dead_cell_process_fails_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from difftest.conformance import matrix

    def fake_cell(area: Any, reader: str, **_: Any) -> Cell:
        if area.name == "v2":
            os._exit(3)
        return Cell(area.name, reader, outcome="pass", examples=1)

    monkeypatch.setattr(matrix, "run_cell", fake_cell)
    rc = main(["conformance", "--readers", PLANTED, "--areas", "plain,v2", "--jobs", "2",
               "--out", str(tmp_path), "--output", "json"])
    out = capsys.readouterr()
    assert rc == 1
    assert [c["outcome"] for c in json.loads(out.out)["cells"]] == ["pass", "not run"]
    assert "v2 × " in out.err and "did not run" in out.err and "exit 3" in out.err
