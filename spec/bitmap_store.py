"""Persistent dirty bitmaps kept up to date, as QEMU 7.2 keeps them (shared by both engines).

qcow2.rst "Bitmaps extension", "Bitmap directory", "Bitmap table", "Bitmap data"; QEMU's
block/qcow2-bitmap.c (qcow2_load_dirty_bitmaps, qcow2_store_persistent_dirty_bitmaps),
block/dirty-bitmap.c and block/io.c (bdrv_co_write_req_finish sets the bits).

A read-write open (``load_on_open``, qcow2_do_open):

- unknown autoclear bits are cleared (QCOW2_AUTOCLEAR_MASK keeps the bitmaps bit, set or
  not, with or without an extension: QEMU leaves it as it is);
- every bitmap of the directory is loaded. One already marked in_use was not saved by its
  last writer: QEMU loads it empty and inconsistent, never tracks or stores it, and leaves
  its directory entry, table and data as they are. Every other one is read (table and data
  clusters: a zero entry is all-zero data, an entry with only the all-ones flag is all-ones
  data) and gets the in_use flag; the directory is then rewritten in place
  (update_ext_header_and_dir_in_place): the header with the bitmaps bit cleared, synced;
  the directory at its old offset with the new flags; the header again, synced; the header
  with the bit set, synced. A bitmap without the auto flag is loaded disabled: it is stored
  again at close but no request sets its bits.

Every guest request that reaches the block layer's write path (write, write_zeroes,
discard, compressed write; failed ones too, bdrv_co_write_req_finish does not look at the
result) sets the bits of the enabled bitmaps covering its range (``mark_dirty``).

The close (``BitmapSet.store``, qcow2_store_persistent_dirty_bitmaps from qcow2_inactivate)
rewrites every loaded bitmap, in directory order: one new data cluster per bitmap cluster
with a dirty bit (an all-zero region gets none), written whole (zeros past the serialized
words), then the new table (``8 * entries`` bytes written into a new cluster); then the new
directory in new clusters, the caches flushed, the header with the new extension (bitmaps
bit set) synced; then the old directory is freed, then each old table's data clusters
(with a discard: QCOW2_DISCARD_ALWAYS punches them) and the old table (QCOW2_DISCARD_OTHER:
no discard). The stored flags are auto for an enabled bitmap and nothing else (in_use
cleared). Each write is overlap-checked first with nothing ignored
(qcow2_pre_write_overlap_check(bs, 0, ...)), but at this point of QEMU's close the L1
table is already freed (qcow2_close), so active L2 tables are not checked (the engines
arrange that: model/overlap.py, impl/image.py close). Once the header names the new
directory, the check protects that one (``BitmapHost.bitmap_directory_moved``). A
read-only open changes nothing, at open or at close.

The engines call these with their own allocator and file (``BitmapHost``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import construct as c

from spec import bitmaps as bm
from spec import features as ft
from spec import header as hd
from spec import header_update as hu
from spec.entries import (
    BME_TABLE_ENTRY_FLAG_ALL_ONES,
    BME_TABLE_ENTRY_OFFSET_MASK,
    BME_TABLE_ENTRY_RESERVED_MASK,
)
from spec.errors import FormatError, UnsupportedFeature
from spec.image import ImageFile
from spec.qfile import Qcow2File


class BitmapHost(Protocol):
    """What the store needs from an engine: its allocator, its metadata writes (after the
    overlap check) and its flushes."""

    cluster_size: int

    def bitmap_alloc(self, nbytes: int) -> int:
        """qcow2_alloc_clusters: whole clusters covering ``nbytes``, refcount 1."""
        ...

    def bitmap_free(self, offset: int, nbytes: int, *, discard: bool) -> None:
        """qcow2_free_clusters of [offset, offset+nbytes); ``discard`` punches what drops to 0."""
        ...

    def bitmap_overlap_check(self, offset: int, n: int) -> None:
        """qcow2_pre_write_overlap_check(bs, 0, offset, n): CorruptionError on an overlap."""
        ...

    def bitmap_pread(self, offset: int, n: int) -> bytes:
        ...

    def bitmap_pwrite(self, offset: int, data: bytes) -> None:
        ...

    def bitmap_flush_caches(self) -> None:
        """qcow2_flush_caches: the engine's cached tables written, then the file flushed."""
        ...

    def bitmap_flush(self) -> None:
        """bdrv_flush(bs->file): the image file only."""
        ...

    def bitmap_directory_moved(self, offset: int, size: int) -> None:
        """The header now names the new directory: the overlap check protects it from here on
        (QEMU's s->bitmap_directory_offset changes before the old clusters are freed, whose
        frees may allocate a refcount block, written back under that check)."""
        ...


@dataclass
class Bitmap:
    """One directory entry and, when it was loaded, its bits (hbitmap's serialization:
    little-endian 64-bit words, bit ``i`` covering bytes ``[i << granularity_bits, ...)``)."""

    name: bytes
    flags: int
    granularity_bits: int
    table_offset: int
    table_size: int
    inconsistent: bool
    """Marked in_use when the image was opened: kept as it is, never tracked or stored."""
    data: bytearray = field(default_factory=bytearray)

    @property
    def enabled(self) -> bool:
        return bool(self.flags & bm.BME_FLAG_AUTO) and not self.inconsistent


def serialization_size(disk_size: int, granularity_bits: int) -> int:
    """Bytes of serialized bits for the whole disk (hbitmap_serialization_size): whole
    64-bit words."""
    nbits = -(-disk_size >> granularity_bits) if disk_size else 0
    return -(-nbits // 64) * 8


def _set_bits(buf: bytearray, first: int, last: int) -> None:
    """Set bits ``first..last`` (inclusive) of the little-endian bit string ``buf``."""
    fb, lb = first >> 3, last >> 3
    head = (0xFF << (first & 7)) & 0xFF
    tail = 0xFF >> (7 - (last & 7))
    if fb == lb:
        buf[fb] |= head & tail
        return
    buf[fb] |= head
    if lb > fb + 1:
        buf[fb + 1:lb] = b"\xff" * (lb - fb - 1)
    buf[lb] |= tail


def _any_bit(buf: bytes | bytearray, first: int, end: int) -> bool:
    """Whether any bit in ``[first, end)`` is set (``first`` a multiple of 8)."""
    if end <= first:
        return False
    fb, full = first >> 3, end >> 3
    if buf[fb:full].strip(b"\0"):
        return True
    rem = end & 7
    return bool(rem and buf[full] & ((1 << rem) - 1))


class BitmapSet:
    """The directory as loaded at a read-write open, and the bits of the loaded bitmaps."""

    def __init__(self, bitmaps: list[Bitmap], disk_size: int, ext_offset: int,
                 dir_offset: int, dir_size: int, memory: hu.HeaderMemory) -> None:
        self.bitmaps = bitmaps
        self.memory = memory
        """The engine's header memory (spec/header_update.py): every header this set writes
        is the whole cluster qcow2_update_header rebuilds from it."""
        self.disk_size = disk_size
        """bdrv_getlength of the node: the virtual size rounded down to a sector."""
        self.ext_offset = ext_offset
        """File offset of the bitmaps extension (its type field) in the header cluster."""
        self.dir_offset = dir_offset
        self.dir_size = dir_size
        self._tracking = [b for b in bitmaps if b.enabled]

    # --- tracking --------------------------------------------------------------------------
    def mark_dirty(self, offset: int, length: int) -> None:
        """bdrv_set_dirty: every enabled bitmap gets the bits of [offset, offset+length)."""
        if length <= 0:
            return
        end = min(offset + length, self.disk_size)
        if end <= offset:
            return
        for b in self._tracking:
            g = b.granularity_bits
            _set_bits(b.data, offset >> g, (end - 1) >> g)

    def resize(self, new_size: int) -> None:
        """bdrv_dirty_bitmap_truncate after a resize (hbitmap_truncate): growing adds clear
        bits; shrinking clears the bits from the first whole granule past the new end."""
        new_size = new_size // 512 * 512
        for b in self.bitmaps:
            if b.inconsistent:
                continue
            g = b.granularity_bits
            old_bits = -(-self.disk_size >> g)
            new_bits = -(-new_size >> g)
            for i in range(new_bits, old_bits):
                b.data[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            n = serialization_size(new_size, g)
            del b.data[n:]
            b.data.extend(bytes(n - len(b.data)))
        self.disk_size = new_size

    def check_resize(self) -> None:
        """qcow2_truncate_bitmaps_check: a bitmap loaded inconsistent (in use at open) cannot
        be resized, so QEMU refuses the resize (-ENOTSUP)."""
        for b in self.bitmaps:
            if b.inconsistent:
                raise UnsupportedFeature(f"Bitmap '{b.name.decode(errors='replace')}' is inconsistent "
                                         "and cannot be used; cannot resize qcow2 with it")

    # --- the directory -----------------------------------------------------------------------
    def directory_bytes(self, *, as_loaded: bool = False) -> bytes:
        """bitmap_list_store's buffer: every entry rebuilt without extra data. QEMU keeps a
        name as a C string (bitmap_list_load: g_strndup), so a name with a NUL in it is
        stored up to the NUL; ``as_loaded`` keeps the names as the file has them."""
        out = bytearray()
        for b in self.bitmaps:
            name = b.name if as_loaded else b.name.split(b"\0", 1)[0]
            n = bm.BITMAP_DIR_ENTRY_HEADER_SIZE + len(name)
            out += struct.pack(">QIIBBHI", b.table_offset, b.table_size, b.flags,
                               bm.BT_DIRTY_TRACKING_BITMAP, b.granularity_bits, len(name), 0)
            out += name + bytes(-n % 8)
        return bytes(out)

    # --- the close ------------------------------------------------------------------------------
    def store(self, host: BitmapHost, header: c.Container) -> None:
        """qcow2_store_persistent_dirty_bitmaps (see the module doc); ``header`` is the
        engine's header in memory (its autoclear bits change). On a failure the new tables
        and data are freed again and the error raised; the file keeps the old directory."""
        stored = [b for b in self.bitmaps if not b.inconsistent]
        if not stored:
            return
        cs = host.cluster_size
        # The first loop of qcow2_store_persistent_dirty_bitmaps walks the node's bitmaps
        # newest first (bdrv_create_dirty_bitmap inserts at the head): that is the order the
        # old tables are dropped in.
        drop = [(b.table_offset, b.table_size) for b in reversed(stored)]
        for b in stored:
            b.flags = bm.BME_FLAG_AUTO if b.flags & bm.BME_FLAG_AUTO else 0
            b.table_offset = b.table_size = 0
        done: list[tuple[Bitmap, list[int]]] = []
        try:
            for b in stored:
                table = self._store_data(host, b, cs, done)
                size = 8 * len(table)
                off = host.bitmap_alloc(size)
                b.table_offset, b.table_size = off, len(table)
                host.bitmap_overlap_check(off, size)
                host.bitmap_pwrite(off, struct.pack(f">{len(table)}Q", *table))
            new_dir = self.directory_bytes()
            dir_off = host.bitmap_alloc(len(new_dir))
            try:
                host.bitmap_overlap_check(dir_off, len(new_dir))
                host.bitmap_pwrite(dir_off, new_dir)
                host.bitmap_flush_caches()
            except BaseException:
                host.bitmap_free(dir_off, len(new_dir), discard=False)
                raise
        except BaseException:
            # The fail path: what was stored in this call is freed (free_bitmap_clusters).
            for b, table in done:
                for e in table:
                    if e & BME_TABLE_ENTRY_OFFSET_MASK:
                        host.bitmap_free(e & BME_TABLE_ENTRY_OFFSET_MASK, cs, discard=True)
                if b.table_offset:
                    host.bitmap_free(b.table_offset, 8 * b.table_size, discard=False)
            raise
        old_dir = (self.dir_offset, self.dir_size)
        self.dir_offset, self.dir_size = dir_off, len(new_dir)
        assert header.v3 is not None
        header.v3.autoclear_features = int(header.v3.autoclear_features) | ft.QCOW2_AUTOCLEAR_BITMAPS
        cluster = self.header_cluster(header, cs)
        if cluster is not None:
            host.bitmap_pwrite(0, cluster)
        host.bitmap_flush()
        host.bitmap_directory_moved(dir_off, len(new_dir))
        if old_dir[1]:
            host.bitmap_free(old_dir[0], old_dir[1], discard=False)
        for off, n in drop:
            _free_bitmap_clusters(host, off, n, cs)

    def _store_data(self, host: BitmapHost, b: Bitmap, cs: int,
                    done: list[tuple[Bitmap, list[int]]]) -> list[int]:
        """store_bitmap_data: the new table's entries, each dirty bitmap cluster written."""
        total = serialization_size(self.disk_size, b.granularity_bits)
        nbits = -(-self.disk_size >> b.granularity_bits)
        table = [0] * -(-total // cs)
        done.append((b, table))
        for k in range(len(table)):
            # bdrv_dirty_bitmap_next_dirty looks only at bits inside the disk.
            if not _any_bit(b.data, k * cs * 8, min((k + 1) * cs * 8, nbits)):
                continue
            off = host.bitmap_alloc(cs)
            table[k] = off
            chunk = bytes(b.data[k * cs:min((k + 1) * cs, total)])
            host.bitmap_overlap_check(off, cs)
            host.bitmap_pwrite(off, chunk + bytes(cs - len(chunk)))
        return table

    def header_cluster(self, q_header: c.Container, cluster_size: int) -> bytes | None:
        """The header cluster as qcow2_update_header writes it with this directory in
        memory (None: it does not fit, nothing is written)."""
        self.memory.set_bitmaps(len(self.bitmaps), self.dir_size, self.dir_offset)
        return hu.header_cluster(self.memory, q_header, cluster_size)


def _free_bitmap_clusters(host: BitmapHost, offset: int, n: int, cs: int) -> None:
    """free_bitmap_clusters: the old table read again and checked (bitmap_table_load: a bad
    entry leaves the whole table alone), its data clusters freed with a discard, then the
    table itself without one."""
    if not offset or not n:
        return
    raw = host.bitmap_pread(offset, 8 * n)
    table = struct.unpack(f">{n}Q", raw)
    for e in table:
        off = e & BME_TABLE_ENTRY_OFFSET_MASK
        if e & BME_TABLE_ENTRY_RESERVED_MASK or (off and (e & BME_TABLE_ENTRY_FLAG_ALL_ONES or off % cs)):
            return
    for e in table:
        if e & BME_TABLE_ENTRY_OFFSET_MASK:
            host.bitmap_free(e & BME_TABLE_ENTRY_OFFSET_MASK, cs, discard=True)
    host.bitmap_free(offset, 8 * n, discard=False)


# --- the open --------------------------------------------------------------------------------

def _load_data(q: Qcow2File, entry: c.Container, disk_size: int) -> bytearray:
    """load_bitmap_data: the serialized bits from the table (checked at open, see
    spec.image.ImageFile.bitmap_table) and the data clusters (zeros past the end of the file,
    as QEMU's file driver reads)."""
    img = q.image_file
    cs = q.cluster_size
    g = int(entry.granularity_bits)
    total = serialization_size(disk_size, g)
    data = bytearray(total)
    for i, e in enumerate(img.bitmap_table(entry)):
        lo, hi = i * cs, min((i + 1) * cs, total)
        if hi <= lo:
            break
        off = e & BME_TABLE_ENTRY_OFFSET_MASK
        if off:
            data[lo:hi] = q.pread(off, hi - lo)
        elif e & BME_TABLE_ENTRY_FLAG_ALL_ONES:
            data[lo:hi] = b"\xff" * (hi - lo)
    return data


def load_on_open(q: Qcow2File, overlap_check: Callable[[int, int], None]) -> BitmapSet | None:
    """What a read-write open does to the autoclear bits and the bitmaps (see the module
    doc). Returns the loaded set, or None when the image has no bitmaps QEMU would load."""
    h = q.header
    if h.v3 is None:
        return None
    update_header = bool(int(h.v3.autoclear_features) & ~ft.QCOW2_AUTOCLEAR_MASK)
    if update_header:
        h.v3.autoclear_features = int(h.v3.autoclear_features) & ft.QCOW2_AUTOCLEAR_MASK
    img = q.image_file
    result: BitmapSet | None = None
    if img.bitmaps_enabled and img.bitmaps:
        ext = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
        assert ext is not None
        disk_size = int(h.size) // 512 * 512
        bitmaps: list[Bitmap] = []
        for e in img.bitmaps:
            in_use = bool(e.flags & bm.BME_FLAG_IN_USE)
            b = Bitmap(bytes(e.name), int(e.flags), int(e.granularity_bits),
                       int(e.bitmap_table_offset), int(e.bitmap_table_size), in_use)
            if not in_use:
                b.data = _load_data(q, e, disk_size)
                b.flags |= bm.BME_FLAG_IN_USE
            bitmaps.append(b)
        s = BitmapSet(bitmaps, disk_size, ext.offset, int(ext.data.bitmap_directory_offset),
                      int(ext.data.bitmap_directory_size), q.header_memory)
        if any(not b.inconsistent for b in bitmaps):
            _update_in_place(q, s, overlap_check)
            update_header = False
        result = s  # only in-use bitmaps: nothing tracked or stored, but a resize is refused
    if update_header:
        q.update_header()
    return result


def _update_in_place(q: Qcow2File, s: BitmapSet, overlap_check: Callable[[int, int], None]) -> None:
    """update_ext_header_and_dir_in_place (see the module doc)."""
    h = q.header
    assert h.v3 is not None
    if len(s.directory_bytes(as_loaded=True)) != s.dir_size:
        # bitmap_list_store refuses an in-place store of another size (-EINVAL: "Can't
        # update bitmap directory", the open fails); the directory held extra data or
        # padding QEMU would not write. The header is not touched before that check.
        raise FormatError("Can't update bitmap directory", "bitmap_directory")
    h.v3.autoclear_features = int(h.v3.autoclear_features) & ~ft.QCOW2_AUTOCLEAR_BITMAPS
    _header_sync(q, s)
    new_dir = s.directory_bytes()
    if len(new_dir) != s.dir_size:
        # A name with a NUL in it (damaged seed 13, flip-1242@bitmap): QEMU's copy stops at
        # the NUL, the directory it would store is shorter, and bitmap_list_store refuses it
        # after update_ext_header_and_dir_in_place dropped the bitmaps bit from the header,
        # which stays dropped (the next open warns that the bitmaps are inconsistent).
        raise FormatError("Can't update bitmap directory", "bitmap_directory")
    overlap_check(s.dir_offset, s.dir_size)
    q.pwrite(s.dir_offset, new_dir)
    _header_sync(q, s)
    h.v3.autoclear_features = int(h.v3.autoclear_features) | ft.QCOW2_AUTOCLEAR_BITMAPS
    _header_sync(q, s)


def _header_sync(q: Qcow2File, s: BitmapSet) -> None:
    """update_header_sync on a spec file: the header (one write) then a flush."""
    cluster = s.header_cluster(q.header, q.cluster_size)
    if cluster is not None:
        q.pwrite(0, cluster)
    q.flush()



def update_extension(img: ImageFile, offset: int, size: int) -> None:
    """Keep a parsed image's bitmaps extension in step with a directory the store moved."""
    ext = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
    if ext is not None:
        ext.data.bitmap_directory_offset = offset
        ext.data.bitmap_directory_size = size
