"""``qcow2lab check -r leaks|all`` (model.check(path, repair=...)) repairs as ``qemu-img check -r``.

Every damaged image is copied twice: ``qemu-img check -r MODE --output=json`` repairs one copy,
``qcow2lab check -r MODE --output=json`` the other. Then:

(a) the guest content (qemu-img convert -O raw, and every internal snapshot with -l) is the
    same before and after our repair, when QEMU could read it before: a repair never loses
    guest data (except where QEMU's own repair does, LOSES_DATA, byte for byte the same);
(b) after our ``-r all``, ``qemu-img check`` finds the image clean, unless the damage is of a
    kind QEMU counts and never repairs (KEEPS_DAMAGE: reserved bits, unaligned tables, bad
    subcluster bitmaps, references past the end of the file...);
(c) our JSON is qemu-img's, byte for byte once the file name is the same, and so is the exit
    code; the repaired files are byte-identical too (same refcount fixes, same rebuilt
    refcount structure in the same clusters, same entries rewritten, same holes punched,
    same file growth, same corrupt bit where QEMU's repair stops on a metadata overlap);
(d) ``-r leaks`` fixes what QEMU's fixes and nothing more: a too-low refcount is left alone
    (QEMU stops with "need to rebuild", exit 1, and the file is untouched), and COPIED
    flags are left alone while an error remains.

The damage comes from difftest/corpus/mutate.py's targeted mutations (refcount too high, too low,
COPIED wrong, refcount block misaligned, reserved bits in L1/L2/refcount table entries,
unaligned L2 tables, COPIED on compressed clusters, bad subcluster bitmaps, L2 entries into
metadata, truncated files) plus some made here: the refcount block missing (its reftable
entry zeroed), misplaced (pointed at an empty cluster), unaligned, shared with the refcount
table or past the end of the file (see _reftable_edit); a preallocated zero cluster with an
unaligned offset (_zero_misaligned); a snapshot whose extra data lacks the version 3 fields
(_snapshot_extra_short); and the leaked clusters of a lazy-refcount image left dirty by a
killed qemu-io.

Expected differences. For every case above there is none in the JSON, the exit code or the
repaired file. Measured over difftest/corpus/mutate.py's targeted mutants plus 300 random metadata
flips (seed 1), both modes, 640 runs (script: each mutant repaired by both, outcomes
bucketed): before this repair work 187 were identical in report, exit code and bytes (337
refused by us while QEMU repaired, 57 refused by both, 52 where QEMU grew the file); now 607
are identical (test_repair_campaign_matches_qemu_img, marked slow, reruns it). With other
flips (seed 2), 612 of 642 are identical, and the rest falls in the same classes. The rest:

==============================  ===========================================================
case                            difference
==============================  ===========================================================
a refcount block far past the   refused (UnsupportedFeature, exit 1) with nothing written:
end of the file, -r all (25)    QEMU grows the file to hold it, here to 8 GiB - 2 TiB
                                (sparse); the model grows it only up to 2^21 clusters
huge nb_snapshots, -r all (3)   same report (none) and exit code 1; QEMU clamps
                                nb_snapshots to 65536 in the header and then stops on a
                                metadata overlap, marking the image corrupt; the model
                                writes nothing
unknown autoclear bits and      same report; QEMU's read-write open rewrites the whole
garbage in the header           header cluster (qcow2_update_header), zeroing the garbage;
cluster's padding (2)           the model rewrites only the header fields
QEMU takes > 20 s (3)           not compared (large growths)
human output of a refused       qemu-img prints only "Check failed" to stderr; we also print
repair (exit 1)                 the violated rules on stdout, as ``qcow2lab check`` does for
                                every image it refuses
stderr                          qemu-img's "Repairing cluster ..." lines are not reproduced
persistent bitmaps              same report and guest data, different bytes: QEMU's
                                read-write open/close re-stores the bitmaps (test below);
                                damage to the bitmaps themselves is refused
==============================  ===========================================================
"""

from __future__ import annotations

import collections
import itertools
import shutil
import subprocess
from pathlib import Path

import pytest

import model
from difftest.cli import main as cli_main
from difftest.corpus import mutate as mu
from spec import entries as en
from spec.check.growth import GROW_LIMIT_CLUSTERS
from spec.errors import UnsupportedFeature
from tests.qemu import qemu_img, raw_content

REPAIR_KINDS = ("refcount-too-high", "refcount-too-high-copied-stale", "refcount-leak-appended-cluster",
                "refcount-too-low", "refcount-metadata-zero", "l2-copied-cleared", "l2-copied-set-on-shared",
                "l1-copied-cleared", "refcount-table-block-misaligned",
                # Damage QEMU counts and keeps (the rest of the image is still repaired), or that
                # makes its repair stop with an error (a rebuild that would overwrite metadata).
                "l1-reserved-bits", "l2-reserved-bits", "refcount-table-reserved-bits",
                "l1-l2-offset-misaligned", "compressed-with-copied", "subcluster-alloc-and-zero",
                "subcluster-alloc-on-unallocated", "subcluster-bitmap-on-compressed",
                "l2-entry-into-own-l2-table", "l2-entry-into-l1-table", "truncated-data",
                "truncated-before-l1")


KEEPS_DAMAGE = frozenset({"l1-reserved-bits", "l2-reserved-bits", "l1-l2-offset-misaligned",
                          "compressed-with-copied", "subcluster-alloc-and-zero",
                          "subcluster-alloc-on-unallocated", "subcluster-bitmap-on-compressed",
                          "l2-entry-into-own-l2-table", "l2-entry-into-l1-table", "truncated-data",
                          "truncated-before-l1"})
"""Damage qemu-img check counts and -r never fixes (the rest of the image is repaired)."""
LOSES_DATA = frozenset({"subcluster-bitmap-on-compressed@extl2", "l2-entry-into-own-l2-table@v2",
                        "l2-entry-into-own-l2-table@v3"})
"""QEMU's repair itself changes guest data here (the model does the same, byte for byte). A
compressed cluster with a subcluster bitmap is not counted as a reference
(check_refcounts_l2), so the repair frees its host cluster as a leak and punches it out:
the guest cluster no longer decompresses. A data cluster that is its own L2 table reads
that table as data, and -r all's COPIED fixes rewrite the table."""

REFBLOCK_DAMAGE = ("missing", "misplaced", "unaligned", "shared", "past-eof")
ZERO_DAMAGE_BASES = ("v3", "extl2")
SNAPSHOT_EXTRA = (0, 8)


def _reftable_edit(path: Path, how: str) -> None:
    """Damage the refcount table. "missing": entry 0 zeroed; "misplaced": entry 0 pointed
    at a new, empty cluster appended to the file (every refcount it covers then reads 0);
    "unaligned": entry 1 (clusters past the end of the file) set to an unaligned offset;
    "shared": entry 1 pointed at the refcount table itself, so that cluster is referenced
    twice. These two are check_refblocks corruptions that force a rebuild. "past-eof": entry
    1 pointed two clusters past the end of the file, which -r all repairs by growing the
    file to hold it (and then rebuilding)."""
    lay = mu.layout_of(path)
    data = bytearray(path.read_bytes())
    entry = lay.reftable_offset
    if how == "missing":
        new = 0
    elif how == "unaligned":
        entry, new = entry + 8, 0x400
    elif how == "shared":
        entry, new = entry + 8, lay.reftable_offset
    elif how == "past-eof":
        entry, new = entry + 8, len(data) + (-len(data) % lay.cluster_size) + 2 * lay.cluster_size
    else:
        new = len(data) + (-len(data) % lay.cluster_size)
        data.extend(bytes(new + lay.cluster_size - len(data)))
    data[entry:entry + 8] = new.to_bytes(8, "big")
    path.write_bytes(bytes(data))


def _zero_misaligned(path: Path) -> None:
    """A data cluster's L2 entry made a preallocated zero cluster (no subcluster holding
    data) whose host offset is off a cluster boundary: -r all rewrites it as a plain zero
    cluster (fix_l2_entry_by_zero), and the data cluster it pointed at is then a leak."""
    lay = mu.layout_of(path)
    data = bytearray(path.read_bytes())
    off, word, _ = lay.normal[0]
    word += 512
    if lay.extended_l2:
        bitmap = int.from_bytes(data[off + 8:off + 16], "big")
        data[off + 8:off + 16] = ((bitmap & en.QCOW_L2_BITMAP_ALL_ALLOC) << 32).to_bytes(8, "big")
    else:
        word |= en.QCOW_OFLAG_ZERO
    data[off:off + 8] = word.to_bytes(8, "big")
    path.write_bytes(bytes(data))


def _snapshot_extra_short(path: Path, extra: int) -> None:
    """The extra data of the (only) snapshot cut to ``extra`` bytes, its ID and name moved up
    so that the table stays readable: a version 3 entry needs 16 bytes (disk size), so
    qemu-img check counts a corruption, which -r all repairs by writing the table anew."""
    lay = mu.layout_of(path)
    assert lay.nb_snapshots == 1
    data = bytearray(path.read_bytes())
    off = lay.snapshots_offset
    old_extra = int.from_bytes(data[off + 36:off + 40], "big")
    names = int.from_bytes(data[off + 12:off + 14], "big") + int.from_bytes(data[off + 14:off + 16], "big")
    old_len = 40 + old_extra + names
    body = data[off + 40:off + old_len]
    new = data[off:off + 36] + extra.to_bytes(4, "big") + body[:extra] + body[old_extra:]
    data[off:off + old_len] = new + bytes(old_len - len(new))
    path.write_bytes(bytes(data))


def _copy_base(bases: dict[str, mu.Base], bname: str, name: str, root: Path) -> Path:
    b = bases[bname]
    mutant = mu.Mutant(name, bname, "", b.data, [], frozenset(), b.filename, dict(b.sidecars))
    return mutant.write(root / name)


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
            out[name] = _copy_base(bases, bname, name, root)
            _reftable_edit(out[name], how)
    for bname in ZERO_DAMAGE_BASES:
        name = f"zero-misaligned@{bname}"
        out[name] = _copy_base(bases, bname, name, root)
        _zero_misaligned(out[name])
    for extra in SNAPSHOT_EXTRA:
        name = f"snapshot-extra-{extra}@snap"
        out[name] = _copy_base(bases, "snap", name, root)
        _snapshot_extra_short(out[name], extra)
    lazy = root / "lazy-dirty" / "lazy-dirty.qcow2"
    lazy.parent.mkdir()
    shutil.copy(qemu_images["lazy-dirty"], lazy)
    out["lazy-dirty"] = lazy
    return out


CASES = sorted({f"{k}@{b}" for k in REPAIR_KINDS for b in mu.MUTATIONS[k].bases}
               | {f"refblock-{how}@{b}" for how in REFBLOCK_DAMAGE for b in ("v3", "snap")}
               | {f"zero-misaligned@{b}" for b in ZERO_DAMAGE_BASES}
               | {f"snapshot-extra-{n}@snap" for n in SNAPSHOT_EXTRA}
               | {"lazy-dirty"})


def _twin(src: Path, dest: Path) -> Path:
    """A copy of src's directory (the image and its sidecars) under dest."""
    shutil.copytree(src.parent, dest)
    return dest / src.name


def _snapshot_names(path: Path) -> list[str]:
    out = qemu_img("snapshot", "-U", "-l", str(path)).stdout.splitlines()
    # Table rows after the two header lines: "ID TAG VM-SIZE DATE VM-CLOCK ICOUNT".
    return [line.split()[1] for line in out[2:] if line.strip()]


def _guest(path: Path) -> dict[str | None, bytes] | None:
    """The guest content (active layer and every snapshot); None if QEMU cannot read it all
    (a damaged mapping makes its reads fail: an unaligned L2 table or cluster offset)."""
    try:
        content: dict[str | None, bytes] = {None: raw_content(path, extra=("-U",))}
        for name in _snapshot_names(path):
            content[name] = raw_content(path, snapshot=name, extra=("-U",))
    except subprocess.CalledProcessError:
        return None
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
    # (a) no guest data lost, in the active layer or any snapshot: what QEMU could read
    # before, it reads the same after our repair, unless QEMU's own repair loses it too.
    guest_after = _guest(ours)
    if guest_before is not None and case not in LOSES_DATA:
        assert guest_after == guest_before
    if q_out:
        # (b) a repair that reported leaves nothing that -r could fix: qemu-img check is clean
        # after -r all unless the image has damage QEMU never repairs (KEEPS_DAMAGE), and
        # leaks are gone after either mode.
        after = subprocess.run(["qemu-img", "check", str(ours)], capture_output=True, text=True)
        if mode == "all" and case.split("@")[0] not in KEEPS_DAMAGE:
            assert after.returncode == 0, after.stdout
        else:
            assert after.returncode in (0, 2), after.stdout


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
                                  "refblock-missing@v3", "lazy-dirty", "zero-misaligned@v3",
                                  "refblock-past-eof@v3"])
def test_check_without_repair_never_writes(case: str, damaged: dict[str, Path], tmp_path: Path) -> None:
    path = _twin(damaged[case], tmp_path / "ro")
    before = path.read_bytes()
    stat = path.stat()
    result = model.check(path)
    assert result.exit_code != 0
    assert path.read_bytes() == before
    assert path.stat().st_mtime_ns == stat.st_mtime_ns


def test_damage_qemu_keeps_is_kept_while_the_rest_is_repaired(damaged: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """Reserved bits in an L2 entry are counted by QEMU and never fixed: the leak beside
    them is still fixed, the reserved bits stay (same bytes), and the second check counts
    them; -r leaks leaves COPIED alone then (it repairs COPIED only when no error remains)."""
    path = _twin(damaged["refcount-too-high@v3"], tmp_path / "x")
    lay = mu.layout_of(path)
    data = bytearray(path.read_bytes())
    # Not the entry the mutation made leak (COPIED cleared): its COPIED flag gets fixed.
    off, word, _ = next(n for n in lay.normal if n[1] & en.QCOW_OFLAG_COPIED)
    data[off:off + 8] = (word | 1 << 2).to_bytes(8, "big")  # bit 2: reserved (L2E reserved mask)
    assert (1 << 2) & en.L2E_STD_RESERVED_MASK
    path.write_bytes(bytes(data))
    r = model.check(path, repair="leaks")
    # The leak is fixed; the reserved bits and the COPIED flag the fix made wrong remain.
    assert (r.leaks_fixed, r.leaks, r.corruptions, r.corruptions_fixed) == (1, 0, 2, 0)
    assert path.read_bytes()[off:off + 8] == data[off:off + 8]
    r = model.check(path, repair="all")
    assert (r.corruptions, r.corruptions_fixed, r.exit_code) == (1, 1, 2)  # COPIED fixed
    assert path.read_bytes()[off:off + 8] == data[off:off + 8]
    assert subprocess.run(["qemu-img", "check", str(path)], capture_output=True).returncode == 2


def test_unrepairable_damage_is_refused_without_writing(damaged: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A refcount block 1 TiB past the end of the file: QEMU's -r all grows the file to hold
    it (a sparse 1 TiB file); the model refuses (UnsupportedFeature, exit 1), with the file
    unchanged."""
    path = _twin(damaged["refcount-too-high@v3"], tmp_path / "x")
    lay = mu.layout_of(path)
    data = bytearray(path.read_bytes())
    data[lay.reftable_offset + 8:lay.reftable_offset + 16] = (1 << 40).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFeature):
        model.check(path, repair="all")
    assert path.read_bytes() == bytes(data)
    rc, out = _ours(path, "all", capsys)
    assert (rc, out) == (1, "")
    assert path.read_bytes() == bytes(data)
    # -r leaks does not grow the file: it counts the block as a corruption and fixes the leak
    # (and, as an error remains, leaves the COPIED flag that is now wrong).
    r = model.check(path, repair="leaks")
    assert (r.leaks_fixed, r.corruptions, r.exit_code) == (1, 2, 2)
    assert path.stat().st_size == len(data)


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
    assert guest_before is not None
    q_rc, q_out = _qemus(theirs, "all")
    o_rc, o_out = _ours(ours, "all", capsys)
    assert (o_rc, o_out.replace(str(ours), str(theirs))) == (q_rc, q_out)
    assert '"leaks-fixed": 1' in q_out
    assert _guest(ours) == guest_before
    assert subprocess.run(["qemu-img", "check", str(ours)], capture_output=True).returncode == 0


CAMPAIGN_FLIPS = 300
CAMPAIGN_DIFFERENCES = {
    # QEMU clamps nb_snapshots, then stops on a metadata overlap (see the module doc).
    ("header-huge-nb-snapshots@v3", "all"), ("header-huge-nb-snapshots@snap", "all"),
    ("flip-229@extl2", "all"),
    # QEMU rewrites the whole header cluster when it clears unknown autoclear bits.
    ("flip-296@overlay", "all"), ("flip-296@overlay", "leaks"),
}


@pytest.mark.slow
def test_repair_campaign_matches_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The measurement of the module doc (about 5 minutes): every targeted mutant and 300
    random flips (seed 1), both modes. Each run gives qemu-img's report, exit code and
    bytes, except CAMPAIGN_DIFFERENCES (same report and exit code, other bytes) and the
    refusals of growths past the model's limit, which write nothing."""
    bases = mu.build_bases(tmp_path / "bases")
    flips = itertools.islice(mu.random_flips(bases, seed=1), CAMPAIGN_FLIPS)
    mutants = list(mu.targeted(bases)) + list(flips)
    outcomes: collections.Counter[str] = collections.Counter()
    differ: set[tuple[str, str]] = set()
    for m in mutants:
        if m.base == "bitmap" or m.oracle != "check":
            continue  # bitmaps: see test_bitmap_image_repair_reports_as_qemu_img
        for mode in ("all", "leaks"):
            d = tmp_path / m.name / mode
            theirs, ours = m.write(d / "qemu"), m.write(d / "ours")
            try:
                q = subprocess.run(["qemu-img", "check", "-r", mode, "--output=json", str(theirs)],
                                   capture_output=True, text=True, timeout=20)
            except subprocess.TimeoutExpired:
                outcomes["qemu-timeout"] += 1
                shutil.rmtree(d)
                continue
            capsys.readouterr()
            rc = cli_main(["check", "-r", mode, "--output=json", str(ours)])
            out, err = capsys.readouterr()
            if "cannot repair" in err:
                outcomes["refused"] += 1
                assert ours.read_bytes() == m.data, m.name
                cs = mu.layout_of(ours).cluster_size
                assert theirs.stat().st_size > GROW_LIMIT_CLUSTERS * cs, (m.name, mode)
            elif (rc, out.replace(str(ours), str(theirs))) != (q.returncode, q.stdout):
                raise AssertionError(f"{m.name} -r {mode}: report {rc} {out!r}, qemu-img {q.returncode} "
                                     f"{q.stdout!r}")
            elif subprocess.run(["cmp", "-s", str(theirs), str(ours)]).returncode:
                differ.add((m.name, mode))
            else:
                outcomes["same"] += 1
            shutil.rmtree(d)
    assert differ <= CAMPAIGN_DIFFERENCES
    assert outcomes["same"] >= 600, outcomes
