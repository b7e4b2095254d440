"""The model and the raw-file primitives it shares with the repair engine (spec.refblocks)
decode tables with struct, numpy and integer arithmetic for speed; the spec schemas
(spec.tables) are the reference. Both readings must agree on every table and entry width."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import model
from model import mapping as mp
from spec import refblocks as rc
from spec.geometry import Geometry
from spec.refcounts import decode_refcount_block
from spec.tables import l1_table, l2_table, refcount_block, refcount_table


@pytest.mark.parametrize("order", range(7))
def test_refcount_entries_agree_with_the_schema(order: int) -> None:
    g = Geometry(9, False, order)
    rng = random.Random(order)
    data = bytes(rng.getrandbits(8) for _ in range(g.cluster_size))
    values = list(refcount_block(g).parse(data))
    assert [rc.refcount_get(data, i, g.refcount_bits) for i in range(g.refcount_block_entries)] == values
    rebuilt = bytearray(g.cluster_size)
    for i, v in enumerate(values):
        rc.refcount_set(rebuilt, i, g.refcount_bits, v)
    assert bytes(rebuilt) == refcount_block(g).build(values) == data
    # The bulk codecs (numpy) agree too.
    assert decode_refcount_block(data, g.refcount_bits).tolist() == values
    assert rc.encode_refblock(values, g.refcount_bits) == data


@pytest.mark.parametrize("extended", [False, True])
def test_l1_l2_and_reftable_decoding_agree_with_the_schema(tmp_path: Path, extended: bool) -> None:
    path = tmp_path / "t.qcow2"
    model.create(path, 64 * 1024 * 1024, cluster_size=16384, extended_l2=extended)
    with model.open(path) as img:
        for i in range(0, 40):
            img.write(i * 1_000_003 % img.size, b"t" * 3000)
        img.write_zeroes(5 * 16384, 3 * 16384)
        q = img.q
        raw_l1 = q.pread(q.header.l1_table_offset, q.header.l1_size * 8)
        assert mp.read_l1(q) == list(l1_table(q.header.l1_size).parse(raw_l1))
        for e in mp.read_l1(q):
            if not e:
                continue
            off = mp.l2_offset(q, e, 0)
            parsed = l2_table(q.geometry).parse(q.pread(off, q.cluster_size))
            expect = [(int(x.l2_entry), int(x.l2_bitmap)) if extended else (int(x), 0) for x in parsed]
            assert mp.read_l2(q, off) == expect
            assert [mp.read_l2_entry(q, off, i) for i in range(len(expect))] == expect
            table = mp.read_l2(q, off)
            for start, count in ((0, 1), (3, 17), (len(expect) - 2, 5), (len(expect), 1)):
                assert table.pairs(start, count) == expect[start:start + count]
            table[1] = (0x200 | 1 << 63, 3 if extended else 0)  # a write copies, then changes
            assert table[1] == (0x200 | 1 << 63, 3 if extended else 0) and table[2] == expect[2]
            mp.write_l2(q, off, mp.read_l2(q, off))  # writing back what was read changes nothing
            assert l2_table(q.geometry).parse(q.pread(off, q.cluster_size)) == parsed
        n = q.header.refcount_table_clusters * q.cluster_size // 8
        raw_rt = q.pread(q.header.refcount_table_offset, n * 8)
        assert rc.read_reftable(q) == list(refcount_table(n).parse(raw_rt))
