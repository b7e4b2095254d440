"""The corruption-mutant corpus (difftest/corpus/mutate.py): deterministic, aimed where it says, and
judged by qemu-img check the way each mutation intends.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from difftest.corpus import mutate as mu
from spec import entries as en
from spec.errors import FormatError, UnsupportedFeature
from spec.image import open_image
from spec.rules.check import check

PAIRS = [(m.name, b) for m in mu.MUTATIONS.values() for b in m.bases]
CHECK_EXIT_KIND = {0: "clean", 1: "check-errors", 2: "corruptions", 3: "leaks"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mu.Base]:
    return mu.build_bases(tmp_path_factory.mktemp("mutant-bases"))


@pytest.fixture(scope="module")
def targeted(bases: dict[str, mu.Base]) -> dict[str, mu.Mutant]:
    return {m.name: m for m in mu.targeted(bases, seed=0)}


@pytest.fixture(scope="module")
def layouts(bases: dict[str, mu.Base], tmp_path_factory: pytest.TempPathFactory) -> dict[str, mu.Layout]:
    d = tmp_path_factory.mktemp("layouts")
    out = {}
    for name, b in bases.items():
        (d / b.filename).write_bytes(b.data)
        out[name] = mu.layout_of(d / b.filename)
    return out


def _key(m: mu.Mutant) -> tuple[object, ...]:
    return (m.name, m.data, m.edits, m.filename, m.sidecars, m.expect, m.oracle)


def test_bases_are_reproducible(bases: dict[str, mu.Base], tmp_path: Path) -> None:
    again = mu.build_bases(tmp_path)
    assert {n: b.data for n, b in again.items()} == {n: b.data for n, b in bases.items()}
    assert {n: b.sidecars for n, b in again.items()} == {n: b.sidecars for n, b in bases.items()}


def test_generator_is_deterministic(bases: dict[str, mu.Base]) -> None:
    first = [_key(m) for m in mu.corpus(bases, 150, seed=7)]
    second = [_key(m) for m in mu.corpus(bases, 150, seed=7)]
    assert first == second
    assert len(first) == 150
    assert len({k[0] for k in first}) == 150  # names are unique
    other = [_key(m) for m in mu.corpus(bases, 150, seed=8)]
    assert [k[0] for k in other] == [k[0] for k in first]  # same mutations, same order...
    assert sum(a[1] != b[1] for a, b in zip(first, other, strict=True)) > 100  # ...other choices


def test_a_mutant_does_not_depend_on_the_others(bases: dict[str, mu.Base]) -> None:
    """Each mutant draws from its own seeded stream, so a corpus prefix is stable."""
    short = [_key(m) for m in mu.corpus(bases, 90, seed=3)]
    long = [_key(m) for m in mu.corpus(bases, 120, seed=3)]
    assert long[:90] == short


def test_every_named_mutation_applies_to_every_listed_base(targeted: dict[str, mu.Mutant]) -> None:
    assert sorted(targeted) == sorted(f"{n}@{b}" for n, b in PAIRS)


def test_edits_are_exactly_the_changed_bytes(bases: dict[str, mu.Base],
                                             targeted: dict[str, mu.Mutant]) -> None:
    for m in targeted.values():
        base = bases[m.base].data
        if m.truncated_to is not None:
            assert m.data == base[:m.truncated_to] and not m.edits, m.name
            continue
        assert m.edits, m.name
        rebuilt = bytearray(base)
        for e in m.edits:
            assert e.old != e.new and len(e.old) == len(e.new)
            assert bytes(rebuilt[e.offset:e.offset + len(e.old)]).ljust(len(e.old), b"\0") == e.old
            if e.offset + len(e.new) > len(rebuilt):
                rebuilt.extend(bytes(e.offset + len(e.new) - len(rebuilt)))
            rebuilt[e.offset:e.offset + len(e.new)] = e.new
        assert bytes(rebuilt) == m.data, m.name


def _words(base: bytes, m: mu.Mutant) -> list[tuple[int, int, int]]:
    """(offset, old word, new word) of every 8-byte-aligned 64-bit word the edits changed."""
    offsets = sorted({(e.offset + i) // 8 * 8 for e in m.edits for i in range(len(e.new))})
    old = base.ljust(len(m.data), b"\0")
    return [(off, int.from_bytes(old[off:off + 8], "big"), int.from_bytes(m.data[off:off + 8], "big"))
            for off in offsets]


def _in_l1(lay: mu.Layout, off: int) -> bool:
    return lay.l1_offset <= off < lay.l1_offset + 8 * len(lay.l1)


def _in_l2(lay: mu.Layout, off: int) -> bool:
    return any(t <= off < t + lay.cluster_size for t in lay.l2_tables)


def _in_refblock(lay: mu.Layout, off: int) -> bool:
    blocks = [r & en.REFT_OFFSET_MASK for r in lay.reftable if r]
    return any(b <= off < b + lay.cluster_size for b in blocks)


HEADER_FIELDS = {
    "header-incompatible-unknown-bit": mu.OFF_INCOMPATIBLE_FEATURES,
    "header-compatible-unknown-bit": mu.OFF_COMPATIBLE_FEATURES,
    "header-autoclear-unknown-bit": mu.OFF_AUTOCLEAR_FEATURES,
    "header-corrupt-bit": mu.OFF_INCOMPATIBLE_FEATURES,
    "header-l1-offset-misaligned": mu.OFF_L1_TABLE_OFFSET,
    "header-refcount-table-offset-misaligned": mu.OFF_REFCOUNT_TABLE_OFFSET,
    "header-snapshots-offset-misaligned": mu.OFF_SNAPSHOTS_OFFSET,
    "header-huge-l1-size": mu.OFF_L1_SIZE - 4,  # the word holding l1_size (bytes 36-39)
    "header-huge-refcount-table-clusters": mu.OFF_REFCOUNT_TABLE_CLUSTERS,
    "header-huge-nb-snapshots": mu.OFF_NB_SNAPSHOTS - 4,
    "header-huge-header-length": mu.OFF_HEADER_LENGTH - 4,
}


@pytest.mark.parametrize(("mutation", "base"), PAIRS)
def test_mutation_changes_the_intended_bytes(mutation: str, base: str, targeted: dict[str, mu.Mutant],
                                             layouts: dict[str, mu.Layout],
                                             bases: dict[str, mu.Base]) -> None:
    m = targeted[f"{mutation}@{base}"]
    lay = layouts[base]
    words = _words(bases[base].data, m)
    if mutation in HEADER_FIELDS:
        assert [w[0] for w in words] == [HEADER_FIELDS[mutation]]
        off, old, new = words[0]
        if mutation.endswith("-bit"):
            assert bin(old ^ new).count("1") == 1 and new & ~old
        if mutation == "header-incompatible-unknown-bit":
            assert (old ^ new) & ~0x1F
        if mutation.endswith("-misaligned"):
            assert new % lay.cluster_size and new % 8 == 0
        if mutation == "header-huge-l1-size":
            assert new & 0xFFFFFFFF > (1 << 22)  # l1_size: beyond 32 MiB of entries
        if mutation == "header-huge-nb-snapshots":
            assert new & 0xFFFFFFFF > 65536
        return
    if mutation == "header-huge-extension-length":
        assert [w[0] for w in words] == [lay.header_length]
        assert words[0][2] & 0xFFFFFFFF >= lay.cluster_size
    elif mutation.startswith(("header-backing", "backing-loop")):
        assert all(off < lay.cluster_size for off, _, _ in words)
        assert any(off <= mu.OFF_BACKING_FILE_SIZE < off + 8 for off, _, _ in words)
        size = int.from_bytes(m.data[16:20], "big")
        name = m.data[lay.backing_file_offset:lay.backing_file_offset + size]
        if mutation == "header-backing-name-too-long":
            assert size > 1023 and name == b"b" * size
        elif mutation == "backing-loop-self":
            assert name.decode() == m.filename
        else:
            assert name == b"loop-b.qcow2" and m.filename == "loop-a.qcow2"
            partner = m.sidecars["loop-b.qcow2"]
            assert partner[lay.backing_file_offset:lay.backing_file_offset + 12] == b"loop-a.qcow2"
    elif mutation.startswith("l1-"):
        [(off, old, new)] = words
        assert _in_l1(lay, off)
        if mutation == "l1-reserved-bits":
            assert (old ^ new) & ~en.L1E_RESERVED_MASK == 0 and new & en.L1E_RESERVED_MASK
        elif mutation == "l1-copied-cleared":
            assert old ^ new == en.QCOW_OFLAG_COPIED and not new & en.QCOW_OFLAG_COPIED
        else:
            assert (new & en.L1E_OFFSET_MASK) % lay.cluster_size
    elif mutation.startswith("refcount-table-"):
        [(off, old, new)] = words
        assert lay.reftable_offset <= off < lay.reftable_offset + 8 * len(lay.reftable)
        if mutation == "refcount-table-reserved-bits":
            assert (old ^ new) & ~en.REFT_RESERVED_MASK == 0
        else:
            assert (new & en.REFT_OFFSET_MASK) % lay.cluster_size
    elif mutation.startswith(("l2-", "compressed-")):
        [(off, old, new)] = words
        assert _in_l2(lay, off)
        if mutation == "l2-reserved-bits":
            assert (old ^ new) & ~en.L2E_STD_RESERVED_MASK == 0
        elif mutation.startswith("l2-copied") or mutation == "compressed-with-copied":
            assert old ^ new == en.QCOW_OFLAG_COPIED
        elif mutation == "l2-entry-into-header":
            assert new & en.QCOW_OFLAG_COMPRESSED
            assert en.compressed_host_offset(new, lay.cluster_bits) < lay.cluster_size
        else:
            target = new & en.L2E_OFFSET_MASK
            want = {"l2-entry-into-l1-table": lay.l1_offset - lay.l1_offset % lay.cluster_size,
                    "l2-entry-into-refcount-table": lay.reftable_offset}.get(mutation)
            assert target == want if want is not None else target in lay.l2_tables
            assert old & ~en.L2E_OFFSET_MASK == new & ~en.L2E_OFFSET_MASK
    elif mutation.startswith("subcluster-"):
        [(off, old, new)] = words
        assert _in_l2(lay, off) and off % 16 == 8  # the bitmap half of an extended entry
        entry = int.from_bytes(m.data[off - 8:off], "big")
        if mutation == "subcluster-alloc-and-zero":
            assert (new >> 32) & new & en.QCOW_L2_BITMAP_ALL_ALLOC
        elif mutation == "subcluster-alloc-on-unallocated":
            assert not entry & en.L2E_OFFSET_MASK and new & en.QCOW_L2_BITMAP_ALL_ALLOC
        else:
            assert entry & en.QCOW_OFLAG_COMPRESSED and new
    elif mutation.startswith("refcount-"):
        old_data = bases[base].data

        def rc(data: bytes, host: int) -> int:
            entry, width = lay.refcount_entry(host)
            return int.from_bytes(data[entry:entry + width], "big")

        changed = [host for _, w, _ in lay.normal for host in [w & en.L2E_OFFSET_MASK]
                   if rc(old_data, host) != rc(m.data, host)]
        if mutation == "refcount-too-high":
            [(_, old, new)] = [w for w in words if _in_l2(lay, w[0])]
            assert old ^ new == en.QCOW_OFLAG_COPIED
            host = old & en.L2E_OFFSET_MASK
            assert changed == [host] and (rc(old_data, host), rc(m.data, host)) == (1, 2)
        elif mutation == "refcount-too-high-copied-stale":
            assert len(changed) == 1 and (rc(old_data, changed[0]), rc(m.data, changed[0])) == (1, 2)
        elif mutation == "refcount-too-low":
            assert len(changed) == 1 and (rc(old_data, changed[0]), rc(m.data, changed[0])) == (1, 0)
        elif mutation == "refcount-metadata-zero":
            assert (rc(old_data, lay.l1_offset), rc(m.data, lay.l1_offset)) == (1, 0)
        else:  # refcount-leak-appended-cluster
            end = len(m.data) - lay.cluster_size
            assert end >= len(old_data) and (rc(old_data, end), rc(m.data, end)) == (0, 1)
        assert all(_in_refblock(lay, w[0]) or _in_l2(lay, w[0]) or w[0] >= len(old_data) for w in words)
    elif mutation.startswith("truncated-"):
        assert m.truncated_to is not None and not words
        if mutation == "truncated-header":
            assert m.truncated_to < 24
        elif mutation == "truncated-before-l1":
            assert m.truncated_to < lay.l1_offset + 8 * len(lay.l1)
        else:
            last = max(w & en.L2E_OFFSET_MASK for _, w, _ in lay.normal)
            assert (m.truncated_to == last) if mutation == "truncated-data" else \
                last < m.truncated_to < last + lay.cluster_size
    else:
        raise AssertionError(f"no target check for {mutation}")


@pytest.mark.parametrize(("mutation", "base"), PAIRS)
def test_qemu_verdict_is_the_intended_one(mutation: str, base: str, targeted: dict[str, mu.Mutant],
                                          tmp_path: Path) -> None:
    m = targeted[f"{mutation}@{base}"]
    path = m.write(tmp_path)
    v = mu.qemu_verdict(path, oracle=m.oracle)
    assert v.kind in m.expect, (m.description, v.stderr)
    if v.kind == "refused":
        assert v.report is None and v.exit_code != 0
    elif m.oracle == "check":
        assert v.report is not None and v.report["format"] == "qcow2"
        assert v.report.get("leaks", 0) > 0 if v.kind == "leaks" else True
        assert v.report.get("corruptions", 0) > 0 if v.kind == "corruptions" else True


@pytest.mark.parametrize(("mutation", "base"), [p for p in PAIRS if not p[0].startswith("backing-loop")])
def test_spec_check_agrees_with_qemu(mutation: str, base: str, targeted: dict[str, mu.Mutant],
                                     tmp_path: Path) -> None:
    """qcow2lab check (spec.rules) gives qemu-img check's verdict on every targeted mutant."""
    m = targeted[f"{mutation}@{base}"]
    path = m.write(tmp_path)
    theirs = mu.qemu_verdict(path, oracle=m.oracle).kind
    try:
        open_image(path).close()
        opens = True
    except (FormatError, UnsupportedFeature):
        opens = False
    ours = "refused" if not opens else CHECK_EXIT_KIND[check(path).exit_code]
    assert ours == theirs, m.description


def test_random_flips_change_only_metadata_clusters(bases: dict[str, mu.Base],
                                                   layouts: dict[str, mu.Layout]) -> None:
    flips = [m for m in mu.corpus(bases, 300, seed=11) if m.name.startswith("flip-")]
    assert len(flips) > 200
    for m in flips:
        lay = layouts[m.base]
        assert not m.expect and m.edits and m.truncated_to is None
        for e in m.edits:
            cluster = e.offset - e.offset % lay.cluster_size
            assert cluster in lay.metadata_clusters, (m.name, e)
