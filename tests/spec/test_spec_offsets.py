"""The byte and bit ranges spec/render.py computes from the schemas, held against qcow2.rst.

EXPECTED below is typed by hand from QEMU's docs/interop/qcow2.rst (the section is named on
each table), never derived from the code: it is the independent reading that stops the
schemas and the spec from drifting apart. Ranges are inclusive, as qcow2.rst writes them;
for bit tables, (low, high) with bit 0 the least significant. ``None`` marks what qcow2.rst
calls "variable": a start that depends on earlier variable fields, or a size that depends on
the data. Rows the spec does not name but the schema needs (header_tail, unknown extra data,
padding) are typed too, so a field added to a schema without a row here fails.

Two more checks keep the computation itself honest: the computed ranges are compared with
where construct really reads and writes each field, and a deliberately wrong table or schema
must be reported.
"""

from __future__ import annotations

from typing import Any

import construct as c
import pytest

from spec import entries
from spec.header import Header, HeaderExtension
from spec.registry import COMPRESSED_DESCRIPTOR_CLUSTER_BITS, STRUCTURES, Structure
from spec.render import Row, bit_runs, layout, ranges, refcount_layouts, structure_rows
from spec.tables import compressed_descriptor

Span = tuple[int | None, int | None]

V = None  # "variable"

EXPECTED: dict[str, dict[str, Span]] = {
    # qcow2.rst "Header"
    "header_v2": {
        "magic": (0, 3),
        "version": (4, 7),
        "backing_file_offset": (8, 15),
        "backing_file_size": (16, 19),
        "cluster_bits": (20, 23),
        "size": (24, 31),
        "crypt_method": (32, 35),
        "l1_size": (36, 39),
        "l1_table_offset": (40, 47),
        "refcount_table_offset": (48, 55),
        "refcount_table_clusters": (56, 59),
        "nb_snapshots": (60, 63),
        "snapshots_offset": (64, 71),
    },
    "header_v3": {
        "v3.incompatible_features": (72, 79),
        "v3.compatible_features": (80, 87),
        "v3.autoclear_features": (88, 95),
        "v3.refcount_order": (96, 99),
        "v3.header_length": (100, 103),
    },
    # qcow2.rst "Additional fields (version 3 and higher)", "Header padding": padding from
    # 105 up to header_length, so its end depends on the data.
    "header_additional": {
        "ext.compression_type": (104, 104),
        "ext.header_tail": (105, V),
    },
    # qcow2.rst "Header extensions": 0-3 type, 4-7 length, 8-n data, n-m padding.
    "header_extension": {
        "type": (0, 3),
        "length": (4, 7),
        "data": (8, V),
        "padding": (V, V),
    },
    # qcow2.rst "Feature name table"
    "feature_name_entry": {
        "type": (0, 0),
        "bit": (1, 1),
        "name": (2, 47),
    },
    # qcow2.rst "Bitmaps extension"
    "bitmaps_extension": {
        "nb_bitmaps": (0, 3),
        "reserved32": (4, 7),
        "bitmap_directory_size": (8, 15),
        "bitmap_directory_offset": (16, 23),
    },
    # qcow2.rst "Full disk encryption header pointer"
    "crypto_header_pointer": {
        "offset": (0, 7),
        "length": (8, 15),
    },
    # The LUKS area the pointer names: qcow2.rst "Full disk encryption header pointer" (the
    # LUKS header at its start) and the LUKS1 spec 2.4: key material no earlier than 4096.
    "luks_area": {
        "phdr_padding": (592, 4095),
        "key_material_areas": (4096, V),
    },
    # LUKS1 on-disk format 1.2.1, "2.4 The partition header", Figure 2 (PHDR layout).
    "luks_header": {
        "magic": (0, 5),
        "version": (6, 7),
        "cipher_name": (8, 39),
        "cipher_mode": (40, 71),
        "hash_spec": (72, 103),
        "payload_offset": (104, 107),
        "key_bytes": (108, 111),
        "mk_digest": (112, 131),
        "mk_digest_salt": (132, 163),
        "mk_digest_iter": (164, 167),
        "uuid": (168, 207),
        "key_slots": (208, 591),
    },
    # LUKS1 on-disk format, "2.4", Figure 3 (key slot layout), offsets within one slot.
    "luks_key_slot": {
        "active": (0, 3),
        "iterations": (4, 7),
        "salt": (8, 39),
        "key_material_offset": (40, 43),
        "stripes": (44, 47),
    },
    # LUKS1 "2.2 AF-Splitter": stripes * key_bytes of split key, then padding to 4 KiB.
    "luks_key_material": {
        "stripes": (0, V),
        "padding": (V, V),
    },
    # qcow2.rst "String header extensions": the whole payload is the string.
    "backing_format_extension": {"backing_format": (0, V)},
    "data_file_extension": {"data_file": (0, V)},
    # qcow2.rst "Header extensions", last paragraph: the name fills backing_file_size bytes.
    "backing_file_name": {"backing_file_name": (0, V)},
    # qcow2.rst "Cluster mapping", L1 table entry
    "l1_entry": {
        "reserved_0_8": (0, 8),
        "l2_offset_9_55": (9, 55),
        "reserved_56_62": (56, 62),
        "copied": (63, 63),
    },
    # qcow2.rst "Cluster mapping", L2 table entry + Standard Cluster Descriptor
    "l2_entry": {
        "zero": (0, 0),
        "reserved_1_8": (1, 8),
        "host_offset_9_55": (9, 55),
        "reserved_56_61": (56, 61),
        "compressed": (62, 62),
        "copied": (63, 63),
    },
    # qcow2.rst "Extended L2 Entries": 128 bits, the standard entry then the bitmap.
    "extended_l2_entry": {
        "l2_entry": (0, 7),
        "l2_bitmap": (8, 15),
    },
    # qcow2.rst "Extended L2 Entries", Subcluster Allocation Bitmap (standard clusters)
    "subcluster_bitmap": {
        "alloc": (0, 31),
        "zero": (32, 63),
    },
    # qcow2.rst "Host cluster management", refcount table entry
    "refcount_table_entry": {
        "reserved_0_8": (0, 8),
        "refblock_offset_9_63": (9, 63),
    },
    # qcow2.rst "Snapshots", snapshot table entry; extra data offsets are relative to the entry.
    "snapshot_header": {
        "l1_table_offset": (0, 7),
        "l1_size": (8, 11),
        "id_str_size": (12, 13),
        "name_size": (14, 15),
        "date_sec": (16, 19),
        "date_nsec": (20, 23),
        "vm_clock_nsec": (24, 31),
        "vm_state_size": (32, 35),
        "extra_data_size": (36, 39),
        "extra_data": (40, V),
        "extra_data.vm_state_size_large": (40, 47),
        "extra_data.disk_size": (48, 55),
        "extra_data.icount": (56, 63),
        "extra_data.unknown": (64, V),
        "id_str": (V, V),
        "name": (V, V),
        "padding": (V, V),
    },
    # qcow2.rst "Bitmap directory"
    "bitmap_directory_entry": {
        "bitmap_table_offset": (0, 7),
        "bitmap_table_size": (8, 11),
        "flags": (12, 15),
        "type": (16, 16),
        "granularity_bits": (17, 17),
        "name_size": (18, 19),
        "extra_data_size": (20, 23),
        "extra_data": (24, V),
        "name": (V, V),
        "padding": (V, V),
    },
    # qcow2.rst "Bitmap table"
    "bitmap_table_entry": {
        "all_ones": (0, 0),
        "reserved_1_8": (1, 8),
        "offset_9_55": (9, 55),
        "reserved_56_63": (56, 63),
    },
}

# qcow2.rst "Compressed Clusters Descriptor" with x = 62 - (cluster_bits - 8), worked out by
# hand: host offset in bits 0..x-1, additional sector count in bits x..61.
_COMPRESSED_FLAGS: dict[str, Span] = {"compressed": (62, 62), "copied": (63, 63)}
COMPRESSED_BY_HAND: dict[int, dict[str, Span]] = {
    9: {"host_offset": (0, 60), "nb_additional_sectors": (61, 61), **_COMPRESSED_FLAGS},
    12: {"host_offset": (0, 57), "nb_additional_sectors": (58, 61), **_COMPRESSED_FLAGS},
    16: {"host_offset": (0, 53), "nb_additional_sectors": (54, 61), **_COMPRESSED_FLAGS},
    21: {"host_offset": (0, 48), "nb_additional_sectors": (49, 61), **_COMPRESSED_FLAGS},
}
for _cb in COMPRESSED_DESCRIPTOR_CLUSTER_BITS:
    EXPECTED[f"compressed_descriptor_{_cb}"] = COMPRESSED_BY_HAND[_cb]


def mismatches(expected: dict[str, Span], rows: list[Row]) -> list[str]:
    """Human-readable differences between a hand table and computed rows (empty = agree)."""
    computed = {r.path: r.span for r in rows}
    out = [f"{p}: qcow2.rst {expected[p]}, schema {computed.get(p, 'missing')}"
           for p in expected if computed.get(p, "missing") != expected[p]]
    out += [f"{p}: in the schema at {computed[p]} but not in the qcow2.rst table"
            for p in computed if p not in expected]
    return out


# --- The spec table against the computed ranges ---------------------------------------------


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.key)
def test_computed_ranges_match_qcow2_rst(structure: Structure) -> None:
    assert structure.key in EXPECTED, f"{structure.key}: add its qcow2.rst rows to EXPECTED"
    assert mismatches(EXPECTED[structure.key], structure_rows(structure)) == []


def test_every_hand_table_is_used() -> None:
    assert set(EXPECTED) == {s.key for s in STRUCTURES}


def test_header_parts_tile_the_whole_header() -> None:
    """The three header parts together are every Header field, the groups aside."""
    parts = [s for s in STRUCTURES if s.schema is Header]
    covered = [r.path for s in parts for r in structure_rows(s)]
    every = [r.path for r in layout(Header) if not r.nested]
    assert sorted(covered) == sorted(every)
    assert len(covered) == len(set(covered))


def test_header_groups_span_their_fields() -> None:
    got = ranges(Header)
    assert got["v3"] == (72, 103)       # qcow2.rst: version 3 fields run through header_length
    assert got["ext"] == (104, V)       # additional fields: byte 104 up to header_length


@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_compressed_descriptor_split_for_every_cluster_bits(cluster_bits: int) -> None:
    x = 62 - (cluster_bits - 8)  # qcow2.rst "Compressed Clusters Descriptor"
    assert ranges(compressed_descriptor(cluster_bits)) == {
        "copied": (63, 63), "compressed": (62, 62),
        "nb_additional_sectors": (x, 61), "host_offset": (0, x - 1),
    }


def test_refcount_block_entry_positions() -> None:
    """qcow2.rst "Host cluster management": refcount_bits-wide entries; below a byte, bit 0 is
    the least significant bit; wider entries are big-endian integers."""
    by_order = {rl.refcount_order: rl for rl in refcount_layouts()}
    assert sorted(by_order) == list(range(7))
    for order, rl in by_order.items():
        bits = 1 << order
        assert rl.refcount_bits == bits
        assert rl.per_64k_cluster == 65536 * 8 // bits
        assert rl.max_refcount == (1 << bits) - 1
        for idx, pos in enumerate(rl.entry_positions):
            first_bit = idx * bits
            expected = {((first_bit + k) // 8, (first_bit + k) % 8) for k in range(bits)}
            assert set(pos) == expected, (order, idx)
        if bits >= 16:
            assert rl.big_endian


# --- QEMU's masks against the same table -------------------------------------------------------

# Which hand-table rows each spec/entries.py mask must cover, exactly.
MASK_ROWS: dict[str, tuple[str, list[str]]] = {
    "QCOW_OFLAG_COPIED": ("l2_entry", ["copied"]),
    "QCOW_OFLAG_COMPRESSED": ("l2_entry", ["compressed"]),
    "QCOW_OFLAG_ZERO": ("l2_entry", ["zero"]),
    "L1E_OFFSET_MASK": ("l1_entry", ["l2_offset_9_55"]),
    "L1E_RESERVED_MASK": ("l1_entry", ["reserved_0_8", "reserved_56_62"]),
    "L2E_OFFSET_MASK": ("l2_entry", ["host_offset_9_55"]),
    "L2E_STD_RESERVED_MASK": ("l2_entry", ["reserved_1_8", "reserved_56_61"]),
    "REFT_OFFSET_MASK": ("refcount_table_entry", ["refblock_offset_9_63"]),
    "REFT_RESERVED_MASK": ("refcount_table_entry", ["reserved_0_8"]),
    "BME_TABLE_ENTRY_OFFSET_MASK": ("bitmap_table_entry", ["offset_9_55"]),
    "BME_TABLE_ENTRY_FLAG_ALL_ONES": ("bitmap_table_entry", ["all_ones"]),
    "BME_TABLE_ENTRY_RESERVED_MASK": ("bitmap_table_entry", ["reserved_1_8", "reserved_56_63"]),
    "QCOW_L2_BITMAP_ALL_ALLOC": ("subcluster_bitmap", ["alloc"]),
    "QCOW_L2_BITMAP_ALL_ZEROES": ("subcluster_bitmap", ["zero"]),
}


@pytest.mark.parametrize("name", sorted(MASK_ROWS))
def test_qemu_masks_cover_the_spec_rows(name: str) -> None:
    key, fields = MASK_ROWS[name]
    spans = sorted(EXPECTED[key][f] for f in fields)
    assert [(lo, hi) for lo, hi in spans] == bit_runs(getattr(entries, name))


def test_bit_runs() -> None:
    assert bit_runs(0) == []
    assert bit_runs(0b1011_0001) == [(0, 0), (4, 5), (7, 7)]
    assert bit_runs(1 << 63) == [(63, 63)]


# --- The computation against construct itself -------------------------------------------------


def _lookup(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[part]
    return obj


def _pattern(n: int) -> bytearray:
    # 251 is prime, so no field of up to 8 bytes repeats a neighbour's bytes at any shift.
    return bytearray((i * 7 + 3) % 251 for i in range(n))


def _put(buf: bytearray, span: Span, value: int) -> None:
    start, end = span
    assert start is not None and end is not None
    buf[start:end + 1] = value.to_bytes(end - start + 1, "big")


def _assert_parse_positions(schema: c.Construct, buf: bytes | bytearray) -> int:
    """Parse ``buf`` and check every fixed-range leaf reads exactly its computed bytes."""
    parsed = schema.parse(bytes(buf))
    checked = 0
    for row in layout(schema):
        if row.nested or row.start is None or row.end is None:
            continue
        raw = bytes(buf[row.start:row.end + 1])
        value = _lookup(parsed, row.path)
        assert value == (int.from_bytes(raw, "big") if isinstance(value, int) else raw), row.path
        checked += 1
    return checked


def test_header_ranges_are_where_construct_reads() -> None:
    h = EXPECTED["header_v2"] | EXPECTED["header_v3"]
    buf = _pattern(112)
    buf[0:4] = b"QFI\xfb"
    _put(buf, h["version"], 3)
    _put(buf, h["v3.header_length"], 112)
    assert _assert_parse_positions(Header, buf) == 19


def test_extension_payload_ranges_are_where_construct_reads() -> None:
    for key in ("feature_name_entry", "bitmaps_extension", "crypto_header_pointer", "extended_l2_entry"):
        s = next(s for s in STRUCTURES if s.key == key)
        assert _assert_parse_positions(s.schema, _pattern(64)[:s.schema.sizeof()]) == len(EXPECTED[key])
    ext = _pattern(8 + 24)
    _put(ext, EXPECTED["header_extension"]["type"], 0x23852875)
    _put(ext, EXPECTED["header_extension"]["length"], 24)
    assert _assert_parse_positions(HeaderExtension, ext) == 2


def test_luks_ranges_are_where_construct_reads() -> None:
    header = next(s for s in STRUCTURES if s.key == "luks_header").schema
    slot = next(s for s in STRUCTURES if s.key == "luks_key_slot").schema
    buf = _pattern(592)
    buf[0:6] = b"LUKS\xba\xbe"
    parsed = header.parse(bytes(buf))
    for path, (start, end) in EXPECTED["luks_header"].items():
        assert start is not None and end is not None
        raw = bytes(buf[start:end + 1])
        value = parsed[path]
        if path == "key_slots":  # eight slot descriptors, each where the slot table puts it
            assert [slot.build(v) for v in value] == [raw[48 * i:48 * (i + 1)] for i in range(8)]
        else:
            assert value == (int.from_bytes(raw, "big") if isinstance(value, int) else raw), path
    assert _assert_parse_positions(slot, _pattern(48)) == 5


def test_snapshot_and_bitmap_entry_ranges_are_where_construct_reads() -> None:
    snap = next(s for s in STRUCTURES if s.key == "snapshot_header")
    e = EXPECTED["snapshot_header"]
    buf = _pattern(64 + 8)
    _put(buf, e["id_str_size"], 1)
    _put(buf, e["name_size"], 7)
    _put(buf, e["extra_data_size"], 24)
    assert _assert_parse_positions(snap.schema, buf) == 12

    bmp = next(s for s in STRUCTURES if s.key == "bitmap_directory_entry")
    e = EXPECTED["bitmap_directory_entry"]
    buf = _pattern(24 + 8)
    _put(buf, e["name_size"], 8)
    _put(buf, e["extra_data_size"], 0)
    assert _assert_parse_positions(bmp.schema, buf) == 7


@pytest.mark.parametrize("structure", [s for s in STRUCTURES if s.unit == "bits"], ids=lambda s: s.key)
def test_bit_ranges_are_where_construct_writes(structure: Structure) -> None:
    """Build each field all-ones, the others zero: exactly its computed bits are set."""
    rows = layout(structure.schema)
    width = structure.schema.sizeof() * 8
    for row in rows:
        assert row.start is not None and row.end is not None
        value = {r.path: 0 for r in rows}
        value[row.path] = (1 << (row.end - row.start + 1)) - 1
        word = int.from_bytes(structure.schema.build(value), "big")
        assert word == ((1 << (row.end + 1)) - 1) ^ ((1 << row.start) - 1), row.path
    assert sum(r.end - r.start + 1 for r in rows if r.start is not None and r.end is not None) == width


# --- The check can fail -----------------------------------------------------------------------


def test_a_shifted_table_row_is_detected() -> None:
    rows = structure_rows(next(s for s in STRUCTURES if s.key == "header_v2"))
    wrong = dict(EXPECTED["header_v2"], size=(25, 32))
    assert mismatches(wrong, rows) == ["size: qcow2.rst (25, 32), schema (24, 31)"]
    bits = layout(next(s for s in STRUCTURES if s.key == "l2_entry").schema)
    wrong = dict(EXPECTED["l2_entry"], reserved_56_61=(56, 62))
    assert len(mismatches(wrong, bits)) == 1


def test_a_missing_or_extra_row_is_detected() -> None:
    rows = structure_rows(next(s for s in STRUCTURES if s.key == "bitmaps_extension"))
    fewer = {k: v for k, v in EXPECTED["bitmaps_extension"].items() if k != "reserved32"}
    assert len(mismatches(fewer, rows)) == 1
    more = dict(EXPECTED["bitmaps_extension"], flags=(24, 27))
    assert len(mismatches(more, rows)) == 1


def test_a_drifted_schema_is_detected() -> None:
    """A schema edit that moves fields (version as 16 bits) no longer matches qcow2.rst."""
    drifted = c.Struct(*(("version" / c.Int16ub) if sc.name == "version" else sc for sc in Header.subcons))
    v2 = [r for r in layout(drifted) if "." not in r.path and r.path not in ("v3", "ext")]
    found = mismatches(EXPECTED["header_v2"], v2)
    assert found and all(not f.startswith("magic") for f in found)
    assert len(found) == len(EXPECTED["header_v2"]) - 1

    shifted_bits = c.BitStruct("copied" / c.Flag, "reserved_56_62" / c.BitsInteger(8),
                               "l2_offset_9_55" / c.BitsInteger(46), "reserved_0_8" / c.BitsInteger(9))
    assert sorted(mismatches(EXPECTED["l1_entry"], layout(shifted_bits))) == [
        "l2_offset_9_55: qcow2.rst (9, 55), schema (9, 54)",
        "reserved_56_62: qcow2.rst (56, 62), schema (55, 62)",
    ]
