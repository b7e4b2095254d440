"""The damaged-image mode (difftest/damaged/): images of the fuzz corpus, opened and driven by
the engines and qemu-io side by side; a planted bug is found, shrunk to the damage and
requests it needs, and saved with a reproducer that fails while the bug is there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from difftest.cli.damaged import replay
from difftest.damaged.campaign import Corpus, campaign, qemu_varies
from difftest.damaged.case import Case, Finding, Op, Run, count_bits, table_punched
from difftest.damaged.notes import (
    CACHED_METADATA_READ,
    DROPPED_CACHES,
    METADATA_OVERLAP,
    MODEL_WRITE_THROUGH,
    QEMU_ABORTED,
    QEMU_NONDETERMINISTIC,
    REFCOUNT_INDEX_WRAP,
    REFCOUNTS_GROWN_ON_FREE,
    TABLE_PUNCHED,
    TABLE_WRITTEN_BEFORE_PUNCH,
    explain,
)
from spec import features as ft
from spec.header import QCOW2_EXT_MAGIC_BITMAPS
from spec.image import open_image


def test_the_first_damaged_images_agree_on_every_side(tmp_path: Path) -> None:
    stats = campaign(seed=0, engines=["model", "impl", "qemu"], time_budget=None, examples=12,
                     repro_dir=tmp_path / "repro")
    assert stats.examples == 12
    assert stats.opened and stats.refused  # both outcomes are met among the first mutants
    assert not stats.found, [str(f.finding) for f in stats.found.values()]


def test_a_planted_bug_is_found_shrunk_and_reproduced(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # The bug: the engines forget that a corrupt image may not be opened read-write.
    monkeypatch.setattr(ft, "QCOW2_INCOMPAT_CORRUPT", 0)
    stats = campaign(seed=0, engines=["model", "qemu"], time_budget=None, examples=6,
                     repro_dir=tmp_path / "repro", shrink_seconds=30)
    found = stats.found["open:header-corrupt-bit@v3"]
    assert found.finding.kind == "open"
    assert found.case.ops == () and count_bits(found.case.damage) == 1  # the corrupt bit alone
    assert found.repro is not None
    d = Path(found.repro)
    case_json = d / "case.json"
    # incompatible_features is bytes 72-79, big-endian: the corrupt bit (bit 1) is in byte 79.
    assert json.loads(case_json.read_text())["damage"] == [[79, 2]]
    assert replay(case_json, ["model", "qemu"]) == 1
    run = tmp_path / "sh"
    run.mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the venv's python3
    r = subprocess.run(["sh", str(d / "repro.sh")], cwd=run, capture_output=True, text=True, env=env)
    assert "corrupt" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr  # qemu-img check says so
    monkeypatch.undo()
    assert replay(case_json, ["model", "qemu"]) == 0


def test_a_note_needs_qemus_words_and_engines_that_agree() -> None:
    overlap = ("qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with "
               "refcount block); further corruption events will be suppressed\n"
               "write failed: Input/output error")
    qemu_only = Finding("write", 1, {"model": "ok", "impl": "ok", "qemu": "CorruptionError"})
    # QEMU refused a write both engines made: they check every writer QEMU 7.2 checks, the
    # impl in QEMU's write-back order, so no cause is known: unexplained, with QEMU's words ...
    assert explain(qemu_only, Run(qemu_log=[overlap])) is None
    # ... or without.
    assert explain(qemu_only, Run(qemu_log=["write failed: Input/output error"])) is None
    flag = Finding("corrupt-flag", 2, {"model": "False", "impl": "False", "qemu": "True"})
    assert explain(flag, Run(qemu_log=[overlap])) is None
    # The impl refused the write-back QEMU refused; the model, with no cache, had none.
    split = Finding("corrupt-flag", 2, {"model": "False", "impl": "True", "qemu": "True"})
    assert explain(split, Run(qemu_log=[overlap])) is METADATA_OVERLAP
    refused = Finding("flush", 3, {"model": "ok", "impl": "CorruptionError", "qemu": "CorruptionError"})
    assert explain(refused, Run(qemu_log=[overlap])) is METADATA_OVERLAP
    # Otherwise one engine against another is never a named difference, whatever QEMU printed:
    # the impl that went on where QEMU and the model refused ...
    impl_only = Finding("corrupt-flag", 2, {"model": "True", "impl": "False", "qemu": "True"})
    assert explain(impl_only, Run(qemu_log=[overlap])) is None
    # ... or a model that refused what QEMU and the impl did not.
    model_only = Finding("write", 1, {"model": "CorruptionError", "impl": "ok", "qemu": "ok"})
    assert explain(model_only, Run(qemu_log=[overlap])) is None
    # Check counts where QEMU and the impl flagged at the close: only for a v2 image, which has
    # no corrupt bit that would have differed first.
    closed = Finding("check", 2, {"model": "corruptions corruptions=2 leaks=0",
                                  "impl": "corruptions corruptions=2 leaks=8",
                                  "qemu": "corruptions corruptions=2 leaks=8"})
    v2, v3 = b"QFI\xfb\0\0\0\x02" + bytes(96), b"QFI\xfb\0\0\0\x03" + bytes(96)
    assert explain(closed, Run(qemu_log=[overlap], image=v2)) is METADATA_OVERLAP
    assert explain(closed, Run(qemu_log=[overlap], image=v3)) is None
    died = Finding("discard", 0, {"model": "ok", "impl": "ok", "qemu": "QemuIoDied"})
    abort = "qemu-io exited (killed by SIGABRT); output: b\"Assertion `x' failed.\\nAborted\""
    assert explain(died, Run(qemu_log=[abort])) is QEMU_ABORTED
    assert explain(died, Run(qemu_log=["qemu-io hung"])) is None
    # Engines that disagree are named only for the in-use table QEMU's cache asserts on.
    split_died = Finding("write_zeroes", 0, {"model": "ok", "impl": "CorruptionError", "qemu": "QemuIoDied"})
    assert explain(split_died, Run(qemu_log=[abort])) is None
    in_use = "qemu-io exited (killed by SIGABRT); output: b'qcow2_cache_discard: Assertion failed.'"
    assert explain(split_died, Run(qemu_log=[in_use])) is QEMU_ABORTED
    # Check counts after the image was flagged: only when one request failed on every side.
    counts = Finding("check", 1, {"model": "clean corruptions=0 leaks=0",
                                  "impl": "corruptions corruptions=1 leaks=0",
                                  "qemu": "corruptions corruptions=1 leaks=0"})
    assert explain(counts, Run(qemu_log=[overlap], flagged_everywhere=True)) is DROPPED_CACHES
    # Not after a QEMU-only flag (a v2 image flagged at close, say).
    assert explain(counts, Run(qemu_log=[overlap], flagged_everywhere=False)) is None
    # The model's write-through: only with its own host error as evidence.
    flags = Finding("corrupt-flag", 1, {"model": "False", "impl": "True", "qemu": "True"})
    efbig = "HostIOError: host write of 4096 bytes at 2305843009213702144 failed: [Errno 27] File too large"
    assert explain(flags, Run(qemu_log=[overlap], errors={"model": efbig})) is MODEL_WRITE_THROUGH
    assert explain(flags, Run(qemu_log=[overlap], errors={"model": "CorruptionError: x"})) is None
    failed = Finding("write_zeroes", 0, {"model": "CorruptionError", "impl": "ok", "qemu": "ok"})
    assert explain(failed, Run(errors={"model": efbig})) is MODEL_WRITE_THROUGH
    assert explain(failed, Run(errors={"model": "CorruptionError: overlap"})) is None


def test_a_read_of_a_table_the_model_already_rewrote_is_named(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 1 0 8k", str(img)], check=True)
    f = open_image(img)
    l2, refblock = f.l1_table()[0] & ((1 << 56) - 512), f.refcount_table()[0]
    f.close()
    with img.open("r+b") as fh:  # guest cluster 1 -> the refcount block
        fh.seek(l2 + 8)
        fh.write((refblock | 1 << 63).to_bytes(8, "big"))
    case = Case("x", 0, "v3", "t.qcow2", (), None, (Op("write", 1 << 20, 512, 1), Op("read", 4096, 512)))
    read = Finding("read", 1, {"model": "ok sha256:a", "impl": "ok sha256:b", "qemu": "ok sha256:b"})
    assert explain(read, Run(paths={"model": img}, case=case)) is CACHED_METADATA_READ
    elsewhere = replace(case, ops=(case.ops[0], Op("read", 0, 512)))  # cluster 0 maps to data
    assert explain(read, Run(paths={"model": img}, case=elsewhere)) is None
    assert explain(Finding("read", 1, {"model": "ok sha256:a", "impl": "ok sha256:b", "qemu": "ok sha256:c"}),
                   Run(paths={"model": img}, case=case)) is None  # impl and QEMU must agree


def test_a_read_of_a_table_written_back_before_a_punch_is_named(tmp_path: Path) -> None:
    """Damaged seed 17, flip-4126@v2: a discard changed the L2 table a damaged entry maps a
    later read onto; QEMU punched with the table still dirty, the engines wrote it first."""
    img = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 1 0 8k", str(img)], check=True)
    f = open_image(img)
    l2 = f.l1_table()[0] & ((1 << 56) - 512)
    f.close()
    with img.open("r+b") as fh:  # guest cluster 3 -> the L2 table itself
        fh.seek(l2 + 24)
        fh.write(l2.to_bytes(8, "big"))
    ops = (Op("discard", 4096, 4096), Op("read", 3 * 4096, 512))
    case = Case("x", 0, "v3", "t.qcow2", (), None, ops)
    read = Finding("read", 1, {"model": "ok sha256:a", "impl": "ok sha256:a", "qemu": "ok sha256:b"})
    assert explain(read, Run(paths={"model": img}, case=case)) is TABLE_WRITTEN_BEFORE_PUNCH
    no_free = replace(case, ops=(Op("write", 4096, 512, 1), ops[1]))
    assert explain(read, Run(paths={"model": img}, case=no_free)) is None  # no discard before the read
    elsewhere = replace(case, ops=(ops[0], Op("read", 0, 512)))  # cluster 0 maps to data
    assert explain(read, Run(paths={"model": img}, case=elsewhere)) is None
    split = Finding("read", 1, {"model": "ok sha256:a", "impl": "ok sha256:c", "qemu": "ok sha256:b"})
    assert explain(split, Run(paths={"model": img}, case=case)) is None  # the engines must agree


def test_refcount_blocks_the_host_cannot_write_are_named_only_against_the_model() -> None:
    # The seed-1 finding (write:flip@snap): QEMU's free built refcount blocks past the host's
    # file size limit, which stay dirty in its cache and fail a later write; the impl's cache
    # does the same, the cacheless model went on.
    log = ["qcow2_free_clusters failed: File too large\n", "write failed: File too large\n"]
    write = Finding("write", 1, {"model": "ok", "impl": "CorruptionError", "qemu": "CorruptionError"})
    assert explain(write, Run(qemu_log=log)) is REFCOUNTS_GROWN_ON_FREE
    two = "leaks corruptions=0 leaks=2"
    leaks = Finding("check", 2, {"model": "leaks corruptions=0 leaks=1", "impl": two, "qemu": two})
    assert explain(leaks, Run(qemu_log=log)) is REFCOUNTS_GROWN_ON_FREE
    assert explain(write, Run(qemu_log=["write failed: File too large\n"])) is None  # no failed free
    both = Finding("write", 1, {"model": "ok", "impl": "ok", "qemu": "CorruptionError"})
    assert explain(both, Run(qemu_log=log)) is None  # the impl, with QEMU's cache, must agree
    again = ["qcow2_free_clusters failed: Resource temporarily unavailable\n"]
    assert explain(write, Run(qemu_log=again)) is None  # a grown table the engines now build too
    # Seed 15, flip-4773@snap: a flush fails on such a block in QEMU and in the impl, but
    # qemu-io prints nothing for a failed flush.
    flush = Finding("flush", 1, {"model": "ok", "impl": "CorruptionError", "qemu": "ok"})
    refused = "HostIOError: host write of 4096 bytes at 17592194441216 failed: [Errno 27] File too large"
    assert explain(flush, Run(qemu_log=log[:1], errors={"impl": refused})) is REFCOUNTS_GROWN_ON_FREE
    assert explain(flush, Run(qemu_log=log[:1], errors={"impl": "CorruptionError: overlap"})) is None
    assert explain(flush, Run(qemu_log=[], errors={"impl": refused})) is None  # no failed free


def test_a_refcount_index_past_32_bits_is_named(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,compat=0.10",
                    str(img), "4M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 1 0 4k", str(img)], check=True)
    with open_image(img) as f:
        l2 = f.l1_table()[0] & ((1 << 56) - 512)
    data = bytearray(img.read_bytes())
    clean = "clean corruptions=0 leaks=0"
    check = Finding("check", 1, {"model": clean, "impl": clean, "qemu": "corruptions corruptions=1 leaks=0"})
    assert explain(check, Run(image=bytes(data))) is None
    data[l2 + 8 * 25 + 1] |= 0x80  # entry 25: host offset 2^55, refcount-table index 2^32 with 4 KiB clusters
    assert explain(check, Run(image=bytes(data))) is REFCOUNT_INDEX_WRAP
    # Seed 19, flip-4349@v3: a discard frees that cluster, QEMU's wrap drops the header's
    # refcount, and the next allocating write gets cluster 0, which QEMU's overlap check refuses.
    write = Finding("write", 1, {"model": "ok", "impl": "ok", "qemu": "CorruptionError"})
    refused = ["qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with "
               "qcow2_header); further corruption events will be suppressed\n",
               "write failed: Input/output error\n"]
    assert explain(write, Run(image=bytes(data), qemu_log=refused)) is REFCOUNT_INDEX_WRAP
    assert explain(write, Run(image=bytes(data), qemu_log=refused[1:])) is None  # no overlap refusal
    flagged = Finding("write", 1, {"model": "ok", "impl": "CorruptionError", "qemu": "CorruptionError"})
    # The impl flagged as QEMU did: a refused write-back of its own (metadata-overlap), not the wrap.
    assert explain(flagged, Run(image=bytes(data), qemu_log=refused)) is METADATA_OVERLAP
    data[l2 + 8 * 25 + 1] &= 0x7F
    assert explain(write, Run(image=bytes(data), qemu_log=refused)) is None  # no wrapping offset
    data[l2 + 8 * 4] |= 0x42  # entry 4 compressed, offset bit 57: index 2^34
    assert explain(check, Run(image=bytes(data))) is REFCOUNT_INDEX_WRAP


def test_a_bitmap_table_offset_past_32_bit_indices_is_named(tmp_path: Path) -> None:
    # The close's bitmap store frees the old bitmap tables (block/qcow2-bitmap.c): a damaged
    # directory entry's table offset wraps QEMU's refcount-table index as an L2 entry's does
    # (seed 1, check:flip@bitmap, the table offset's top byte flipped to 2^60).
    img = tmp_path / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M"],
                   check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 1 0 4k", str(img)], check=True)
    with open_image(img) as f:
        ext = f.extension(QCOW2_EXT_MAGIC_BITMAPS)
        assert ext is not None
        directory = int(ext.data.bitmap_directory_offset)
    data = bytearray(img.read_bytes())
    three = "leaks corruptions=0 leaks=3"
    check = Finding("check", 0, {"model": three, "impl": three, "qemu": "leaks corruptions=0 leaks=1"})
    assert explain(check, Run(image=bytes(data))) is None
    data[directory] ^= 0x10  # bitmap_table_offset + 2^60
    assert explain(check, Run(image=bytes(data))) is REFCOUNT_INDEX_WRAP


def test_a_table_punched_out_of_the_models_file_is_named(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(img), "4M"],
                   check=True)
    before = img.read_bytes()
    assert not table_punched(before, img)
    with img.open("r+b") as f:  # the refcount table's cluster reads as zeros, as after a punch
        f.seek(int.from_bytes(before[48:56], "big"))
        f.write(bytes(4096))
    assert table_punched(before, img)
    write = Finding("write", 1, {"model": "CorruptionError", "impl": "ok", "qemu": "ok"})
    assert explain(write, Run(model_table_punched=True, paths={"model": img})) is TABLE_PUNCHED
    assert explain(write, Run(model_table_punched=False, paths={"model": img})) is None


def test_a_request_that_flags_the_image_and_succeeds_agrees_with_qemu(tmp_path: Path) -> None:
    """Damaged seed 3, ``write_zeroes:refcount-table-block-misaligned@v2``: the zero write
    frees a cluster whose refcount block offset is unaligned. QEMU marks the image corrupt
    inside the free, which only logs its failure, and the write itself succeeds ("wrote"):
    the qemu side once took the "Marking image as corrupt" line for the request's failure.
    The engines succeed and flag too; after it QEMU answers ENOMEDIUM (the node dropped),
    the engines CorruptionError: the same class (difftest/core/qemuio.py, error_class)."""
    case = Case("refcount-table-block-misaligned@v2", 3, "v2", "refcount-table-block-misaligned@v2.qcow2",
                ((4102, 8),), None, (Op("write_zeroes", 65536, 65536, 0, True), Op("read", 0, 512)))
    run = Corpus(tmp_path, case.seed).run(case, ["model", "impl", "qemu"], tmp_path / "run")
    assert run.finding is None, run.finding
    assert run.flagged_everywhere  # the read after it failed alike on every side


def test_a_write_back_refused_inside_a_write_flags_and_a_silent_flush_fails(tmp_path: Path) -> None:
    """Damaged seed 12, both with a refcount-table entry flipped onto an L2 table:
    - flip-250@v2: the write's qcow2_alloc_cluster_link_l2 forces the L2 cache's write-back
      (qcow2_cache_set_dependency, the refcount cache depending on it after the zero
      write's free), the overlap check refuses it and flags the image, and the write still
      succeeds: link_l2 ignores what set_dependency returns (impl/cluster.py);
    - flip-149@v3: a flush's refused write-back fails the flush, which qemu-io does not
      print: only "Marking image as corrupt" shows it (QemuImage.flush). The model, which
      has no cache, goes on: the named model-only difference."""
    v2 = Case("flip-250@v2", 12, "v2", "flip-250@v2.qcow2", ((4862, 64),), None,
              (Op("write_zeroes", 65024, 65536), Op("write", 2664448, 32768, 73)))
    run = Corpus(tmp_path, 12).run(v2, ["model", "impl", "qemu"], tmp_path / "v2")
    assert run.finding is None, run.finding
    v3 = Case("flip-149@v3", 12, "v3", "flip-149@v3.qcow2", ((6702, 128),), None,
              (Op("write", 2821120, 32768, 61), Op("flush")))
    run = Corpus(tmp_path, 12).run(v3, ["model", "impl", "qemu"], tmp_path / "v3")
    assert run.finding is not None
    assert run.finding.outcomes == {"model": "ok", "impl": "CorruptionError", "qemu": "CorruptionError"}
    assert explain(run.finding, run) is METADATA_OVERLAP


def test_a_bitmap_name_with_a_nul_fails_the_open_after_the_bitmaps_bit_is_gone(tmp_path: Path) -> None:
    """Damaged seed 13, flip-1242@bitmap: the first byte of a bitmap's name is zeroed. QEMU
    keeps the name up to the NUL (g_strndup), so the directory it would store in place is
    shorter: bitmap_list_store refuses it ("Can't update bitmap directory") after the
    bitmaps autoclear bit was written off, and the open fails; the next open warns that the
    bitmaps are inconsistent and prints a message with no newline before qemu-io's prompt
    (QemuIo._response). Every side refuses, then reopens, alike (spec/bitmap_store.py)."""
    case = Case("flip-1242@bitmap", 13, "bitmap", "flip-1242@bitmap.qcow2", ((188472, 98),), None, ())
    run = Corpus(tmp_path, 13).run(case, ["model", "impl", "qemu"], tmp_path / "run")
    assert run.finding is None, run.finding


def test_a_slow_qemu_request_is_not_a_hang(tmp_path: Path) -> None:
    """Damaged seed 13, flip-2627@v3: the write's allocation makes QEMU grow the refcount
    table to millions of entries, which takes qemu-io 15 s or more on a loaded machine; the
    qemu side has qemu-io's own limit (qemuio.TIMEOUT), not an engine call's 20 s."""
    case = Case("flip-2627@v3", 13, "v3", "flip-2627@v3.qcow2",
                ((3654, 15), (3655, 248), (10111, 64), (15076, 64), (15121, 179), (16426, 15), (16427, 248),
                 (33219, 1)), None,
                (Op("discard", 1334272, 4096), Op("discard", 0, 65536), Op("write", 3426304, 512, 110)))
    run = Corpus(tmp_path, 13).run(case, ["model", "impl", "qemu"], tmp_path / "run")
    assert run.finding is None, run.finding


def test_qemu_answering_a_replay_otherwise_is_named_only_when_the_engines_did_not() -> None:
    """Seed 19, flip-531@snap: QEMU ran a write's pieces concurrently and flagged the image in
    one request or the next from run to run; the engines took one of those ways each time."""
    ok = {"model": "ok", "impl": "ok", "qemu": "ok"}
    failed = {"model": "ok", "impl": "ok", "qemu": "CorruptionError"}
    flagged = {"model": "ok", "impl": "CorruptionError", "qemu": "CorruptionError"}
    first, again = [ok, ok, failed], [ok, ok, ok, flagged]
    assert qemu_varies(first, again) and qemu_varies(again, first)
    assert not qemu_varies(first, first)  # the same answers: nothing varied
    assert qemu_varies(first, [ok, failed]) and qemu_varies([ok, failed], first)  # flagged a request earlier
    # An engine answered otherwise in the replay: not QEMU alone.
    assert not qemu_varies(first, [ok, {"model": "ok", "impl": "CorruptionError", "qemu": "ok"}, ok])
    # QEMU's two answers, neither of them the engines': they took none of QEMU's ways.
    assert not qemu_varies([{"model": "HostIOError", "impl": "HostIOError", "qemu": "ok"}],
                           [{"model": "HostIOError", "impl": "HostIOError", "qemu": "CorruptionError"}])
    finding = Finding("write", 2, failed)
    assert explain(finding, Run()) is None
    assert explain(finding, Run(qemu_varied=True)) is QEMU_NONDETERMINISTIC
