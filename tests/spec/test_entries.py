"""The two readings of every table entry agree: the BitStructs of spec/tables.py (the
declarative reference) and the QEMU masks of spec/entries.py (what code runs).

Random 64-bit words go through both; each field of the BitStruct must equal the masked
value, and every BitStruct must build back the same 8 bytes. Refcount blocks round-trip for
every refcount_order and pack sub-byte widths least significant bit first, as QEMU's
get_refcount_ro0..ro2 read them (block/qcow2-refcount.c), which a real image confirms.
Geometry arithmetic is checked against its definition.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spec import entries as en
from spec.geometry import Geometry
from spec.image import open_image
from spec.tables import (
    BitmapTableEntry,
    L1Entry,
    L2Entry,
    RefcountTableEntry,
    SubclusterBitmap,
    compressed_descriptor,
    refcount_block,
)
from tests.qemu import create

WORDS = st.one_of(
    st.integers(0, 2**64 - 1),
    # Words with few bits set reach the single-flag corners more often.
    st.lists(st.integers(0, 63), max_size=4).map(lambda bits: sum(1 << b for b in set(bits))),
)
U64 = 2**64 - 1


def b8(word: int) -> bytes:
    return word.to_bytes(8, "big")


@given(WORDS)
def test_l1_entry(word: int) -> None:
    e = L1Entry.parse(b8(word))
    assert e.copied == bool(word & en.QCOW_OFLAG_COPIED)
    assert e.l2_offset_9_55 << 9 == word & en.L1E_OFFSET_MASK
    reserved = e.reserved_56_62 << 56 | e.reserved_0_8
    assert reserved == word & en.L1E_RESERVED_MASK
    assert L1Entry.build(e) == b8(word)
    # The masks partition the word: nothing is unaccounted for.
    assert en.QCOW_OFLAG_COPIED | en.L1E_OFFSET_MASK | en.L1E_RESERVED_MASK == U64
    assert en.L1E_OFFSET_MASK & en.L1E_RESERVED_MASK == 0


@given(WORDS)
def test_l2_entry(word: int) -> None:
    e = L2Entry.parse(b8(word))
    assert e.copied == bool(word & en.QCOW_OFLAG_COPIED)
    assert e.compressed == bool(word & en.QCOW_OFLAG_COMPRESSED)
    assert e.zero == bool(word & en.QCOW_OFLAG_ZERO)
    assert e.host_offset_9_55 << 9 == word & en.L2E_OFFSET_MASK
    assert e.reserved_56_61 << 56 | e.reserved_1_8 << 1 == word & en.L2E_STD_RESERVED_MASK
    assert L2Entry.build(e) == b8(word)
    assert (en.QCOW_OFLAG_COPIED | en.QCOW_OFLAG_COMPRESSED | en.QCOW_OFLAG_ZERO | en.L2E_OFFSET_MASK
            | en.L2E_STD_RESERVED_MASK) == U64


def _cluster_type_reference(word: int, extended_l2: bool, has_data_file: bool) -> en.ClusterType:
    """qcow2.rst "Cluster mapping" read independently of spec/entries.py, with QEMU's order
    of tests (qcow2_get_cluster_type): compressed first, then the zero flag, then offset 0."""
    e = L2Entry.parse(b8(word))
    if e.compressed:
        return en.ClusterType.COMPRESSED
    if e.zero and not extended_l2:
        return en.ClusterType.ZERO_ALLOC if e.host_offset_9_55 else en.ClusterType.ZERO_PLAIN
    if e.host_offset_9_55 == 0 and not (has_data_file and e.copied):
        return en.ClusterType.UNALLOCATED
    return en.ClusterType.NORMAL


@given(WORDS, st.booleans(), st.booleans())
def test_cluster_type(word: int, extended_l2: bool, has_data_file: bool) -> None:
    got = en.cluster_type(word, extended_l2=extended_l2, has_data_file=has_data_file)
    assert got is _cluster_type_reference(word, extended_l2, has_data_file)


@given(WORDS, WORDS, st.integers(0, 31), st.booleans())
def test_subcluster_type(word: int, bitmap: int, sc: int, has_data_file: bool) -> None:
    """The subcluster table of qcow2.rst "Extended L2 Entries" via the BitStructs."""
    ctype = _cluster_type_reference(word, True, has_data_file)
    b = SubclusterBitmap.parse(b8(bitmap))
    zero, alloc = b.zero >> sc & 1, b.alloc >> sc & 1
    if ctype is en.ClusterType.COMPRESSED:
        want = en.SubclusterType.COMPRESSED
    elif ctype is en.ClusterType.NORMAL:
        if b.zero & b.alloc:
            want = en.SubclusterType.INVALID
        else:
            want = (en.SubclusterType.ZERO_ALLOC if zero else
                    en.SubclusterType.NORMAL if alloc else en.SubclusterType.UNALLOCATED_ALLOC)
    elif b.alloc:
        want = en.SubclusterType.INVALID
    else:
        want = en.SubclusterType.ZERO_PLAIN if zero else en.SubclusterType.UNALLOCATED_PLAIN
    got = en.subcluster_type(word, bitmap, sc, extended_l2=True, has_data_file=has_data_file)
    assert got is want
    if ctype is not en.ClusterType.COMPRESSED:
        assert en.l2_bitmap_is_valid(word, bitmap, has_data_file=has_data_file) == (
            want is not en.SubclusterType.INVALID)


@given(WORDS, st.booleans())
def test_subcluster_type_without_extended_l2(word: int, has_data_file: bool) -> None:
    ctype = en.cluster_type(word, extended_l2=False, has_data_file=has_data_file)
    got = en.subcluster_type(word, 0, 0, extended_l2=False, has_data_file=has_data_file)
    assert got.value == ("unallocated-plain" if ctype is en.ClusterType.UNALLOCATED else ctype.value)


@pytest.mark.parametrize("cluster_bits", range(9, 22))
@settings(max_examples=60)
@given(word=WORDS)
def test_compressed_descriptor(cluster_bits: int, word: int) -> None:
    word |= en.QCOW_OFLAG_COMPRESSED
    schema = compressed_descriptor(cluster_bits)
    d = schema.parse(b8(word))
    x = 62 - (cluster_bits - 8)
    assert en.csize_shift(cluster_bits) == x
    assert d.compressed and d.copied == bool(word & en.QCOW_OFLAG_COPIED)
    assert d.host_offset == en.compressed_host_offset(word, cluster_bits) == word & ((1 << x) - 1)
    assert d.nb_additional_sectors + 1 == en.compressed_nb_sectors(word, cluster_bits)
    assert d.nb_additional_sectors <= en.csize_mask(cluster_bits)
    assert schema.build(d) == b8(word)
    off, n = en.compressed_range(word, cluster_bits)
    assert off == d.host_offset
    # The range ends exactly at the end of the last sector the descriptor names.
    assert (off + n) % 512 == 0 and (off + n) // 512 - off // 512 == d.nb_additional_sectors + 1
    assert en.compressed_entry_reserved_ok(word, cluster_bits) == (
        not d.copied and d.host_offset < 1 << 56)


@pytest.mark.parametrize("cluster_bits", range(9, 22))
@settings(max_examples=40)
@given(data=st.data())
def test_make_compressed_entry(cluster_bits: int, data: st.DataObject) -> None:
    x = 62 - (cluster_bits - 8)
    off = data.draw(st.integers(0, min(1 << x, 1 << 56) - 1))
    size = data.draw(st.integers(1, 1 << cluster_bits))
    last_sector = (off + size - 1) >> 9
    if last_sector - (off >> 9) > en.csize_mask(cluster_bits):
        with pytest.raises(ValueError):
            en.make_compressed_entry(off, size, cluster_bits)
        return
    word = en.make_compressed_entry(off, size, cluster_bits)
    d = compressed_descriptor(cluster_bits).parse(b8(word))
    assert d.compressed and not d.copied and d.host_offset == off
    start, n = en.compressed_range(word, cluster_bits)
    assert start == off and n >= size and n - size < 512


@given(WORDS)
def test_subcluster_bitmap(word: int) -> None:
    b = SubclusterBitmap.parse(b8(word))
    assert b.alloc == word & en.QCOW_L2_BITMAP_ALL_ALLOC
    assert b.zero << 32 == word & en.QCOW_L2_BITMAP_ALL_ZEROES
    for sc in (0, 1, 17, 31):
        assert bool(b.alloc >> sc & 1) == bool(word & en.QCOW_OFLAG_SUB_ALLOC(sc))
        assert bool(b.zero >> sc & 1) == bool(word & en.QCOW_OFLAG_SUB_ZERO(sc))
    assert SubclusterBitmap.build(b) == b8(word)


@given(st.integers(0, 32), st.integers(0, 32))
def test_subcluster_ranges(lo: int, hi: int) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    assert en.QCOW_OFLAG_SUB_ALLOC_RANGE(lo, hi) == sum(en.QCOW_OFLAG_SUB_ALLOC(i) for i in range(lo, hi))
    assert en.QCOW_OFLAG_SUB_ZERO_RANGE(lo, hi) == sum(en.QCOW_OFLAG_SUB_ZERO(i) for i in range(lo, hi))


@given(WORDS)
def test_refcount_table_entry(word: int) -> None:
    e = RefcountTableEntry.parse(b8(word))
    assert e.refblock_offset_9_63 << 9 == word & en.REFT_OFFSET_MASK
    assert e.reserved_0_8 == word & en.REFT_RESERVED_MASK
    assert RefcountTableEntry.build(e) == b8(word)
    assert en.REFT_OFFSET_MASK | en.REFT_RESERVED_MASK == U64


@given(WORDS)
def test_bitmap_table_entry(word: int) -> None:
    e = BitmapTableEntry.parse(b8(word))
    assert e.offset_9_55 << 9 == word & en.BME_TABLE_ENTRY_OFFSET_MASK
    assert e.all_ones == bool(word & en.BME_TABLE_ENTRY_FLAG_ALL_ONES)
    assert e.reserved_56_63 << 56 | e.reserved_1_8 << 1 == word & en.BME_TABLE_ENTRY_RESERVED_MASK
    assert BitmapTableEntry.build(e) == b8(word)
    assert (en.BME_TABLE_ENTRY_OFFSET_MASK | en.BME_TABLE_ENTRY_FLAG_ALL_ONES
            | en.BME_TABLE_ENTRY_RESERVED_MASK) == U64


# --- refcount blocks -------------------------------------------------------------------------

@pytest.mark.parametrize("order", range(7))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_refcount_block_roundtrip(order: int, data: st.DataObject) -> None:
    g = Geometry(9, False, order)  # 512-byte blocks keep the examples small
    bits = g.refcount_bits
    raw = data.draw(st.binary(min_size=g.cluster_size, max_size=g.cluster_size))
    schema = refcount_block(g)
    values = schema.parse(raw)
    assert len(values) == g.refcount_block_entries == 512 * 8 // bits
    assert schema.build(values) == raw
    # Independent reading: entry i occupies bits [i*bits, (i+1)*bits) counted from the least
    # significant bit of each byte for sub-byte widths, and big-endian bytes otherwise.
    i = data.draw(st.integers(0, len(values) - 1))
    if bits < 8:
        want = raw[i * bits // 8] >> (i * bits % 8) & ((1 << bits) - 1)
    else:
        want = int.from_bytes(raw[i * bits // 8:(i + 1) * bits // 8], "big")
    assert values[i] == want


@pytest.mark.parametrize("order", range(3))
def test_refcount_subbyte_is_lsb_first(order: int) -> None:
    g = Geometry(9, False, order)
    values = [0] * g.refcount_block_entries
    values[0] = 1
    raw = refcount_block(g).build(values)
    assert raw[0] == 0x01 and not any(raw[1:])
    values = [0] * g.refcount_block_entries
    values[1] = 1
    assert refcount_block(g).build(values)[0] == 1 << (1 << order)


def test_refcount_bits_1_matches_qemu(tmp_path: Path) -> None:
    """A freshly created refcount_bits=1 image: every cluster up to the end of the file is
    metadata with refcount 1, the rest 0. QEMU's bit order puts cluster 0 in bit 0 of the
    first byte, so the first byte is 2**k - 1 (MSB-first packing would give a different byte)."""
    p = create(tmp_path / "rc1.qcow2", "1M", refcount_bits=1, cluster_size=4096)
    with open_image(p) as img:
        k = -(-img.file_size // img.cluster_size)
        assert 1 < k < 8
        rt = img.refcount_table()
        block_off = rt[0] & en.REFT_OFFSET_MASK
        raw = img.read(block_off, img.cluster_size, "refcount_block")
        assert raw[0] == (1 << k) - 1 and not any(raw[1:])
        block = img.refcount_block(block_off)
        assert block[:k] == [1] * k and not any(block[k:])


# --- geometry ----------------------------------------------------------------------------------

GEOMETRIES = st.builds(
    Geometry,
    cluster_bits=st.integers(9, 21),
    extended_l2=st.booleans(),
    refcount_order=st.integers(0, 6),
).filter(lambda g: not g.extended_l2 or g.cluster_bits >= 14)


@given(GEOMETRIES, st.integers(0, 2**62))
def test_geometry_indices(g: Geometry, off: int) -> None:
    assert g.cluster_size == 1 << g.cluster_bits
    assert g.l2_entries * g.l2_entry_size == g.cluster_size
    assert g.subcluster_size * g.subclusters_per_cluster == g.cluster_size
    assert g.refcount_block_entries * g.refcount_bits == g.cluster_size * 8
    # Guest offset = L1 index * L2 coverage + L2 index * cluster + offset in cluster.
    assert (g.l1_index(off) * g.l2_coverage + g.l2_index(off) * g.cluster_size
            + g.offset_in_cluster(off)) == off
    assert 0 <= g.l2_index(off) < g.l2_entries
    sc = g.subcluster_index(off)
    assert 0 <= sc < g.subclusters_per_cluster
    assert sc == g.offset_in_cluster(off) // g.subcluster_size
    # Host cluster -> (refcount table index, index in the block).
    ci = g.cluster_index(off)
    assert ci == off // g.cluster_size
    assert g.refcount_table_index(off) * g.refcount_block_entries + g.refcount_block_index(off) == ci
    n = off % (1 << 40)
    assert g.l1_size_for(n) * g.l2_coverage >= n > (g.l1_size_for(n) - 1) * g.l2_coverage or n == 0
    assert g.size_to_clusters(n) == -(-n // g.cluster_size)


def test_geometry_known_values() -> None:
    g = Geometry(16)
    assert (g.l2_entries, g.l2_coverage, g.refcount_block_entries) == (8192, 512 << 20, 32768)
    x = Geometry(16, True)
    assert (x.l2_entries, x.subcluster_size, x.l2_coverage) == (4096, 2048, 256 << 20)
    assert Geometry(9, False, 0).refcount_block_entries == 4096
    assert Geometry(21, False, 6).refcount_block_entries == 1 << 18
    assert g.l1_index(512 << 20) == 1 and g.l2_index((512 << 20) + 65536 * 3 + 5) == 3
    assert x.subcluster_index(65536 + 2048 * 31) == 31


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_stored_refcounts_prefix_reads_agree_with_whole_blocks(bits: int) -> None:
    """dense() decodes only the entries a small file needs; with or without the whole block
    already decoded (and cached), it must give the same refcounts."""
    import numpy as np

    from spec.refcounts import StoredRefcounts

    g = Geometry(9, False, bits.bit_length() - 1)
    rng = np.random.default_rng(bits)
    block = rng.integers(0, 256, 512, dtype=np.uint8).tobytes()
    blocks = {512: block, 1024: block[::-1]}

    def read(off: int, n: int) -> bytes:
        return blocks[off][:n].ljust(n, b"\0")

    reftable = np.array([512, 0, 1024], dtype=np.uint64)
    per = g.refcount_block_entries
    whole = StoredRefcounts(g, reftable, read)
    want = np.concatenate([whole.block(0), np.zeros(per, dtype=np.uint64), whole.block(2)])
    for n in (1, 3, per - 1, per + 5, 2 * per + 7, 3 * per):
        fresh = StoredRefcounts(g, reftable, read)
        values, bad = fresh.dense(n)
        assert not bad.any()
        assert values.tolist() == want[:n].tolist(), n
        cached_values, _ = whole.dense(n)  # whole blocks already in its cache
        assert cached_values.tolist() == want[:n].tolist(), n
