"""The autoclear bits at a read-write open, and the bitmaps they give up (shared by both engines).

qcow2.rst "autoclear_features": a writer that does not maintain a feature clears its bit,
which tells every later reader that the feature's data is stale. Neither engine keeps
persistent dirty bitmaps up to date on writes, so a read-write open clears the bitmaps bit
(bit 0) along with any unknown bit, as QEMU clears the bits it does not know (qcow2_do_open,
``QCOW2_AUTOCLEAR_MASK``).

Clearing the bit alone leaves the bitmap directory, the bitmap tables and the bitmap data
referenced by refcounts that nothing reaches any more: QEMU's next open ignores the extension
("a program lacking bitmap support modified this file") and ``qemu-img check`` counts every
one of those clusters as leaked, where QEMU's own writer (which keeps the bitmaps) leaves the
image clean. So the engines give the bitmaps up properly, in an order where every crash point
leaves a valid image:

1. the header with the bit cleared (after this the bitmap clusters are at worst leaks);
2. the extension area without the bitmaps extension, as qcow2_update_header writes it when
   no bitmaps are loaded (the later extensions move up, the freed tail is zeroed);
3. one reference dropped from every cluster the bitmaps occupied, each cluster once.

A bitmap whose table does not pass QEMU's checks (spec.image.ImageFile.bitmap_table) keeps
its table and data clusters: they were never provably the bitmap's, and freeing a cluster
that is really someone else's would turn a leak into a corruption. A stale extension (bit
already clear) is left as it is: its clusters were leaked by whoever cleared the bit, QEMU
leaves them too, and only ``check -r leaks`` may reclaim them.
"""

from __future__ import annotations

from spec import features as ft
from spec import header as hd
from spec import refblocks as rb
from spec.entries import BME_TABLE_ENTRY_OFFSET_MASK
from spec.errors import FormatError
from spec.qfile import Qcow2File

KEEP = ft.QCOW2_AUTOCLEAR_DATA_FILE_RAW
"""The only autoclear bit the engines maintain (an external data file's raw layout)."""


def bitmap_clusters(q: Qcow2File) -> list[int]:
    """Host cluster indices of the bitmap directory, tables and data, in file order; empty
    unless the image's bitmaps are in use (the extension and the autoclear bit)."""
    img = q.image_file
    if not img.bitmaps_enabled:
        return []
    ext = img.extension(hd.QCOW2_EXT_MAGIC_BITMAPS)
    assert ext is not None
    cs = q.cluster_size
    out: set[int] = set()

    def span(offset: int, n: int) -> None:
        out.update(range(offset // cs, (offset + n + cs - 1) // cs))

    span(int(ext.data.bitmap_directory_offset), int(ext.data.bitmap_directory_size))
    for entry in img.bitmaps:  # read and checked at open (spec.image._read_bitmap_directory)
        try:
            table = img.bitmap_table(entry)
        except FormatError:
            continue  # see the module doc: an unchecked table's clusters are left alone
        span(int(entry.bitmap_table_offset), 8 * int(entry.bitmap_table_size))
        out.update((e & BME_TABLE_ENTRY_OFFSET_MASK) // cs for e in table if e & BME_TABLE_ENTRY_OFFSET_MASK)
    out.discard(0)  # the header cluster is never a bitmap's, whatever a damaged table says
    return sorted(out)


def _extension_area_without_bitmaps(q: Qcow2File) -> tuple[int, bytes] | None:
    """(offset, bytes) of the extension area rewritten without the bitmaps extension, the
    same length as before; None when there is none to drop."""
    exts = q.image_file.extensions
    if not any(e.type == hd.QCOW2_EXT_MAGIC_BITMAPS for e in exts):
        return None
    start = exts[0].offset
    last = exts[-1]
    end = last.offset + 8 + last.length + (-last.length % 8)
    old = q.pread(start, end - start)
    kept = b"".join(old[e.offset - start:e.offset - start + 8 + e.length + (-e.length % 8)]
                    for e in exts if e.type != hd.QCOW2_EXT_MAGIC_BITMAPS)
    if exts[-1].type != hd.QCOW2_EXT_MAGIC_END:
        kept += bytes(8)  # the list ended at the area's end; it now needs an end marker
    if len(kept) > len(old):
        return None  # no room for the marker: keep the (now ignored) extension in place
    return start, kept.ljust(len(old), b"\0")


def clear_on_open(q: Qcow2File) -> None:
    """What a read-write open does to the autoclear bits (see the module doc)."""
    h = q.header
    if h.v3 is None or not h.v3.autoclear_features & ~KEEP:
        return
    freed = bitmap_clusters(q)
    h.v3.autoclear_features &= KEEP
    q.write_header()
    if not freed:
        return
    area = _extension_area_without_bitmaps(q)
    if area is not None:
        q.pwrite(*area)
        q.image_file.extensions = [e for e in q.image_file.extensions
                                   if e.type != hd.QCOW2_EXT_MAGIC_BITMAPS]
    q.image_file.bitmaps = []
    cs = q.cluster_size
    for k in freed:
        # qcow2_free_clusters semantics: a refcount already at 0 (damage) is reported and
        # skipped, the rest still go.
        rb.free_clusters(q, k * cs, cs)
