"""The impl's Image: spec.interface.Image over the caches (block/qcow2.c).

Open builds QEMU's in-memory state (State: header, L1 table, refcount table, the L2 slice
cache and the refcount-block cache), opens the backing chain (qcow2 layers are impl Images
opened read-only, raw layers RawLayer) and takes QEMU's image locks. Requests go to
cluster.py; block status and map to status.py. Every public method raises only spec.errors
classes; a CorruptionError from the tables flags the image corrupt, as
qcow2_signal_corruption does, except the unflagged kind (a compressed cluster that does not
decode, a failing backing file).
"""

from __future__ import annotations

import builtins
import contextlib
import os
import struct
from array import array
from collections.abc import Callable
from typing import Any, NoReturn

from impl import cluster as cl
from impl import compress as cz
from impl import crypt
from impl import options as opt
from impl import overlap as ov
from impl import refcount as rc
from impl import status as stt
from impl.cache import Qcow2Cache
from impl.hostfile import HostFile, IOStats
from impl.state import State
from spec import bitmap_store as bms
from spec import features as ft
from spec import header_update as hu
from spec.entries import (
    HOST_OFFSET_TYPES,
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    QCOW_OFLAG_COMPRESSED,
    QCOW_OFLAG_COPIED,
    QCOW_OFLAG_ZERO,
    SubclusterType,
    compressed_range,
    csize_shift,
    subcluster_type,
)
from spec.errors import CorruptionError, FormatError, Qcow2Error, RequestError, UnsupportedFeature
from spec.geometry import align_up
from spec.hostio import HostIOError
from spec.image import ImageFile, open_image
from spec.info import full_backing_filename, virtual_size
from spec.limits import QCOW2_MAX_BACKING_DEPTH, QCOW_MAGIC
from spec.locking import ImageLock

ST = SubclusterType
BDRV_SECTOR_SIZE = 512
_NOT_PLAIN_DATA = QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO
"""Bits that make an allocated entry something else than NORMAL data (qcow2.rst)."""


def open(path: str | os.PathLike[str], *, readonly: bool = False, snapshot: str | None = None,
         **options: Any) -> Image:
    """Open a qcow2 image (qcow2_do_open; options in impl/options.py).

    Encrypted images take ``key_secret`` (QEMU's ``encrypt.key-secret``: a LUKS passphrase
    or a legacy AES key) and ``backing_key_secret`` (``backing.encrypt.key-secret``, used
    for every encrypted image below the top), as the model's open; see impl/crypt.py.

    Raises RequestError (bad option, snapshot without readonly, lock conflict, corrupt image
    opened read-write, unknown snapshot; an encrypted image without its key), WrongKey (a
    RequestError: no LUKS key slot accepts the key), FormatError (bad image or backing
    chain, a damaged LUKS header), UnsupportedFeature (a cipher or hash the cryptography
    package lacks, unknown incompatible bits), CorruptionError (a dirty lazy-refcount image
    opened read-write and found beyond repair).
    """
    crypt.check_keys(options)
    return _open(str(path), readonly=readonly, snapshot=snapshot, depth=0, options=dict(options))


def _open(path: str, *, readonly: bool, snapshot: str | None, depth: int,
          options: dict[str, Any]) -> Image:
    if snapshot is not None and not readonly:
        raise RequestError("a snapshot can only be opened read-only")
    if options.get("force_share") and not readonly:
        raise RequestError("force_share can only be used with read-only images")
    if depth > QCOW2_MAX_BACKING_DEPTH:
        raise FormatError("backing chain too deep (a loop?)", "backing_file")
    img = open_image(path)
    try:
        cls = EncryptedImage if img.header.crypt_method else Image
        return cls(img, path, readonly=readonly, snapshot=snapshot, depth=depth, options=options)
    finally:
        img.close()


def _words(data: bytes) -> list[int]:
    return list(struct.unpack(f">{len(data) // 8}Q", data))


class _FastCounts:
    """What the inline read (Image._bind_fast_read) counts per hit: ``reads`` cache hits
    that were one data read each, of ``nbytes`` in all. Image.stats() adds them to the
    L2 cache's hits and to iostats (Image._fold_counts)."""

    __slots__ = ("nbytes", "reads")

    def __init__(self) -> None:
        self.reads = 0
        self.nbytes = 0


class Image:
    """An open qcow2 image (spec.interface.Image); see the module doc."""

    host_file_class: type[HostFile] = HostFile
    """What the image and data file are opened with: a crash-safety recorder sets a
    subclass here to see every host write and flush in order."""

    def __init__(self, img: ImageFile, path: str, *, readonly: bool, snapshot: str | None,
                 depth: int, options: dict[str, Any]) -> None:
        options = dict(options)
        self._header_memory = hu.memory_of(img)
        """What QEMU keeps of the header cluster (spec/header_update.py), taken before the
        open changes anything; shared by every writer of this open."""
        crypto = crypt.unlock(img, options.pop("key_secret", None))
        self.backing_key_secret = options.pop("backing_key_secret", None)
        if img.incompatible_features & ft.QCOW2_INCOMPAT_CORRUPT and not readonly:
            raise RequestError("image is corrupt; it can only be opened read-only")
        self.filename = path
        self._size = virtual_size(int(img.header.size))
        self._closed = False
        self._broken = False
        self._limit = self._size
        self.cluster_size = img.cluster_size
        self.readonly = readonly
        self.last_host_end = 0
        self.close_error: HostIOError | None = None
        """A cache write-back the host refused at the close (QEMU only prints it)."""
        self.metadata_preallocation: bool | None = None
        self.snapshot_l1: list[int] | None = None
        self.backing: Any = None
        self.locks: list[ImageLock] = []
        self.data_filename: str | None = img.data_file
        self.iostats = IOStats()  # the inline read's reads join it in stats() (_fold_counts)
        o = opt.parse(options, cluster_size=img.cluster_size, virtual_size=self.size,
                      l2_entry_size=img.geometry.l2_entry_size)
        self.options = o
        self._files: list[HostFile] = []
        self._fast_read: Callable[[int, int], bytes] | None = None
        self._fast_counts = _FastCounts()
        self.bitmaps: bms.BitmapSet | None = None
        """The persistent bitmaps a read-write open loaded (spec/bitmap_store.py), or None:
        the write paths test this one attribute."""
        try:
            self._setup(img, o, snapshot, depth)
            self.s.crypto = crypto
        except BaseException:
            self._release()
            raise

    # The inline read (_bind_fast_read) tests one number instead of three attributes:
    # _limit is the virtual size while the image serves requests, -1 once it is closed or
    # found corrupt. These properties keep it right whoever sets them (resize.py sets size).
    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value
        self._set_limit()

    @property
    def closed(self) -> bool:
        return self._closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self._closed = value
        self._set_limit()

    @property
    def broken(self) -> bool:
        return self._broken

    @broken.setter
    def broken(self, value: bool) -> None:
        self._broken = value
        self._set_limit()

    def _set_limit(self) -> None:
        self._limit = -1 if self._closed or self._broken else self._size

    # --- open -----------------------------------------------------------------------------------
    def _setup(self, img: ImageFile, o: opt.Options, snapshot: str | None, depth: int) -> None:
        direct = o.cache == "none"
        host = self.host_file_class(self.filename, readonly=self.readonly, direct=direct,
                                    stats=self.iostats)
        self._files.append(host)
        # QEMU locks before it reads anything beyond the header probe (raw_open_common).
        lock = ImageLock(host.fd, locking=o.locking, path=self.filename)  # type: ignore[arg-type]
        lock.acquire(write=not self.readonly, force_share=o.force_share)
        self.locks.append(lock)
        data: HostFile | None = None
        if img.has_data_file:
            if img.data_file is None:
                raise FormatError("external data file flag set but no data file name", "extensions")
            # Relative to the current directory, as QEMU 7.2 opens it (qcow2_do_open).
            try:
                data = self.host_file_class(img.data_file, readonly=self.readonly, direct=direct,
                                            stats=self.iostats)
            except CorruptionError as e:
                raise FormatError(f"could not open data file: {e}", img.data_file) from None
            self._files.append(data)
            dlock = ImageLock(data.fd, locking=o.locking, path=img.data_file)  # type: ignore[arg-type]
            dlock.acquire(write=not self.readonly, force_share=o.force_share, data_file=True)
            self.locks.append(dlock)
        if not self.readonly and snapshot is None:
            self._open_read_write(img)
        s = State(host, img.header, img.geometry, data=data, compression_type=img.compression_type)
        s.header_memory = self._header_memory
        s.sync = o.cache != "unsafe"
        s.lazy_refcounts = bool(img.compatible_features & ft.QCOW2_COMPAT_LAZY_REFCOUNTS)
        g = img.geometry
        decode_rb, encode_rb = rc.block_codec(g.refcount_order)
        s.l2_cache = Qcow2Cache(host, o.l2_cache_entry_size, o.l2_cache_entries, cl.decode_l2,
                                cl.encode_l2, name="l2", flush_file=s.flush_file)
        s.rc_cache = Qcow2Cache(host, g.cluster_size, o.refcount_cache_entries, decode_rb,  # type: ignore[arg-type]
                                encode_rb, name="refcount", flush_file=s.flush_file)  # type: ignore[arg-type]
        s.set_slice_size(o.l2_cache_entry_size)
        for cache in (s.l2_cache, s.rc_cache):
            cache.start_clean_timer(o.cache_clean_interval)
        # Both tables are kept in memory, as QEMU keeps them (qcow2_do_open reads the L1
        # table, qcow2_refcount_init the refcount table); decoded with struct, not construct.
        s.l1_table = _words(host.pread(s.l1_table_offset, 8 * s.l1_size, meta=True))
        s.reftable = _words(host.pread(s.refcount_table_offset, 8 * s.reftable_entries, meta=True))
        self.s = s
        from impl import snapshot as sn

        snaps = sn.read_table(s)
        bm = img.extension(0x23852875)
        bitmap_dir = (0, 0)
        if bm is not None and img.bitmaps_enabled:
            # QCOW2_OL_BITMAP_DIRECTORY: only while the autoclear bit vouches for the extension.
            bitmap_dir = (int(bm.data.bitmap_directory_offset), int(bm.data.bitmap_directory_size))
        s.overlap = ov.OverlapChecker(s, o.overlap_check,
                                      [(int(x.l1_table_offset), int(x.l1_size)) for x in snaps],
                                      sn.table_span(s, snaps), bitmap_dir)
        # Each cache's write-back is checked against every other kind (qcow2_cache_entry_flush);
        # s.overlap is looked up at each call, as snapshot.py may replace it.
        s.l2_cache.check_write = lambda off, n: s.overlap.check_metadata(off, n, ov.QCOW2_OL_ACTIVE_L2)
        s.rc_cache.check_write = lambda off, n: s.overlap.check_metadata(off, n, ov.QCOW2_OL_REFCOUNT_BLOCK)
        if not self.readonly and snapshot is None and img.header.v3 is not None:
            self._load_bitmaps(img)
        if img.backing_file:
            self.backing = self._open_backing(img, depth, o)
        if snapshot is not None:
            x = snaps[sn.find(snaps, snapshot)]
            # qcow2_snapshot_load_tmp validates the table first ("Snapshot L1 table too large").
            self.snapshot_l1 = s.read_snapshot_l1(int(x.l1_table_offset), int(x.l1_size))
        # Image.read's inline cache hit: plain L2 entries, the active L1, a buffered file
        # whose reads nobody intercepts (a recorder subclass overriding pread keeps them all).
        target = s.data_host()
        plain = not s.extended_l2 and self.snapshot_l1 is None and not img.header.crypt_method
        # A subclass that overrides read or _read keeps its own path.
        mine = type(self).read is Image.read and type(self)._read is Image._read
        if plain and mine and type(target).pread is HostFile.pread:
            self._fast_read = self._bind_fast_read(s, target)
            # The instance attribute shadows the method: ``img.read`` is the closure itself.
            self.__dict__["read"] = self._fast_read

    def _open_backing(self, img: ImageFile, depth: int, o: opt.Options) -> Any:
        bpath = full_backing_filename(self.filename, img.backing_file or "")
        fmt = img.backing_format
        if fmt is not None and fmt not in ("qcow2", "raw"):
            raise UnsupportedFeature(f"backing format {fmt}")
        try:
            with builtins.open(bpath, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise FormatError(f"could not open backing file: {e.strerror}", bpath) from None
        kind = fmt or ("qcow2" if magic == QCOW_MAGIC else "raw")
        if kind == "raw":
            layer = stt.RawLayer(bpath)
            lock = ImageLock(layer.fd, locking=o.locking, path=bpath)  # type: ignore[arg-type]
            try:
                lock.acquire(write=False, force_share=o.force_share)
            except Qcow2Error:
                layer.close()
                raise
            self.locks.append(lock)
            return layer
        # Backing files are read-only and locked as qemu-io -r locks them; -U covers the chain.
        # The chain inherits the cache mode, as QEMU's children inherit cache.direct and
        # cache.no-flush (block.c bdrv_inherited_options / bdrv_backing_options).
        bopts: dict[str, Any] = {"locking": o.locking, "cache": o.cache}
        if o.force_share:
            bopts["force_share"] = True
        if self.backing_key_secret is not None:
            bopts["key_secret"] = bopts["backing_key_secret"] = self.backing_key_secret
        return _open(bpath, readonly=True, snapshot=None, depth=depth + 1, options=bopts)

    def _open_read_write(self, img: ImageFile) -> None:
        """qcow2_do_open for a writer, before any cache exists (the bitmaps come later,
        _load_bitmaps); a dirty image
        (lazy refcounts left unclean) is repaired by the shared engine as qcow2_do_open
        repairs it (qcow2_co_check_locked with BDRV_FIX_ERRORS | BDRV_FIX_LEAKS:
        spec.check.repair_dirty) and the dirty bit cleared."""
        h = img.header
        if h.v3 is None:
            return
        from spec.qfile import Qcow2File

        try:
            f = builtins.open(self.filename, "r+b")  # noqa: SIM115 - closed below
        except OSError as e:
            raise FormatError(f"cannot open for writing: {e.strerror}", self.filename) from None
        try:
            q = Qcow2File(img, f, readonly=False)
            q.header_memory = self._header_memory
            if h.v3.incompatible_features & ft.QCOW2_INCOMPAT_DIRTY:
                from spec.check import repair_dirty

                repair_dirty(q)
                q.set_incompatible_bit(ft.QCOW2_INCOMPAT_DIRTY, False)
        finally:
            f.close()

    def _load_bitmaps(self, img: ImageFile) -> None:
        """qcow2_do_open's autoclear masking and qcow2_load_dirty_bitmaps (spec/bitmap_store.py):
        unknown autoclear bits cleared, the bitmaps loaded, the directory's in-use flags
        rewritten in place, that write overlap-checked with the directory itself ignored.
        QEMU does this before it repairs a dirty image; here it comes after the repair
        (_open_read_write), once the checker exists: neither step changes what the other
        reads or writes. An overlap flags the image and fails the open ("Can't update
        bitmap directory")."""
        from spec.qfile import Qcow2File

        s = self.s
        try:
            f = builtins.open(self.filename, "r+b")  # noqa: SIM115 - closed below
        except OSError as e:
            raise FormatError(f"cannot open for writing: {e.strerror}", self.filename) from None
        try:
            q = Qcow2File(img, f, readonly=False)
            q.header_memory = self._header_memory
            self.bitmaps = bms.load_on_open(
                q, lambda off, n: s.overlap.check_metadata(off, n, ov.QCOW2_OL_BITMAP_DIRECTORY))
        except CorruptionError as e:
            if not isinstance(e, (HostIOError, cl.UnflaggedError)):
                self._flag_corrupt()
            raise
        finally:
            f.close()

    # --- plumbing -------------------------------------------------------------------------------
    @property
    def packed_into_live_cluster(self) -> bool:
        return self.s.packed_into_live_cluster

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ready(self, *, write: bool = False) -> None:
        """What every request checks first: the image is open, not found corrupt
        (QEMU drops the node), and writable when it writes. The cache clean timer is
        serviced here, there being no event loop."""
        if self.closed or self.broken or (write and self.readonly):
            if self.closed:
                raise RequestError("image is closed")
            if not self.broken:
                raise RequestError("image is opened read-only")
            raise CorruptionError("image was found corrupt; no further requests are served")
        s = self.s
        l2c = s.l2_cache
        # Both caches share the interval (opt.Options): one clock reading says whether
        # either is due, and only then does each look for itself.
        if l2c.clean_interval and l2c.clock() >= min(l2c.next_clean, s.rc_cache.next_clean):
            l2c.maybe_clean()
            s.rc_cache.maybe_clean()

    def _range(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.size:
            raise RequestError(f"request [{offset}, {offset + n}) outside the image (size {self.size})")

    def _guard(self, fn: Any, *args: Any) -> Any:
        """Run a request. A CorruptionError from the tables is fatal, as
        qcow2_signal_corruption(fatal=true) makes it: the corrupt bit is set when the
        image is writable and every later request is refused. The unflagged kind (a
        compressed cluster that does not decode, a failing backing file) only fails the
        request (QEMU: -EIO)."""
        try:
            result = fn(*args)
        except CorruptionError as e:
            if self.s.signalled is not None:
                self._take_signal()
            self._failed(e)
        if self.s.signalled is not None:
            # A free met a corruption QEMU signals and then ignores: flagged, request ok.
            self._take_signal()
        return result

    def _take_signal(self) -> None:
        """qcow2_signal_corruption met inside a step whose failure QEMU ignores (State.signalled)."""
        self.s.signalled = None
        self._flag_corrupt()

    def _failed(self, e: CorruptionError) -> NoReturn:
        """What _guard does with a CorruptionError (also called by ``read`` directly, to
        keep one call off the hot path)."""
        if isinstance(e, cl.UnflaggedError):
            raise CorruptionError(str(e)) from None
        if isinstance(e, HostIOError):
            # A failed host call (EIO, ENOSPC, EFBIG) fails only this request: QEMU
            # returns the errno and sets the corrupt bit only for inconsistent metadata
            # (qcow2_signal_corruption), so later requests are still served.
            raise HostIOError(str(e)) from None
        if self.broken:
            raise e
        self._flag_corrupt()
        raise CorruptionError(str(e)) from None

    def _flag_corrupt(self) -> None:
        """qcow2_signal_corruption(fatal): the corrupt bit set when the image is writable,
        every later request refused."""
        if not self.readonly and not self.broken:
            with contextlib.suppress(Qcow2Error):
                self.s.set_incompatible_bit(ft.QCOW2_INCOMPAT_CORRUPT, True)
        self.broken = True

    def mark_dirty(self) -> None:
        """qcow2_mark_dirty: with lazy refcounts the dirty bit is set before the first
        allocating write links new clusters into an L2 table (qcow2_alloc_cluster_link_l2,
        its only caller on the request paths; overwrites in place, zero writes, discards,
        compressed writes and resizes leave it clear), and cleared on a clean close."""
        s = self.s
        if not s.lazy_refcounts:
            return  # without lazy refcounts there is no dirty bit to set (the common case)
        v3 = s.header.v3
        if v3 is not None and not int(v3.incompatible_features) & ft.QCOW2_INCOMPAT_DIRTY:
            # The bit is durable before any lazy metadata may reach the disk.
            s.set_incompatible_bit(ft.QCOW2_INCOMPAT_DIRTY, True)
            s.flush_file()

    # --- reading ---------------------------------------------------------------------------------
    def _bind_fast_read(self, s: State, f: HostFile) -> Callable[[int, int], bytes]:
        """The read of a plain image (no extended L2, no snapshot, no encryption) whose data
        file nobody intercepts, as a closure installed as ``self.read``: a request inside
        one cluster whose L2 slice is cached and whose entry is plain NORMAL data is one dict
        lookup and one os.pread; everything else goes to ``Image.read``. Every name it needs
        is a cell of the closure: on this machine each bytecode of the hit costs a few ns,
        and the attribute lookups and the tuple unpacking of the former inline path were a
        good part of what it cost above the bare pread (the read-hit row's peer; issue 13).

        On a hit it does what the general path does, in the same order: the clean timer
        (_ready), the hit (Qcow2Cache.get: counted, moved to the LRU end, marked used) and
        one counted data read (HostFile.pread, O_DIRECT through it); tests/impl/test_counts.py
        holds the counts and the cache order to the general path's."""
        img = self
        general = self._read_general
        cs = s.cluster_size
        cmask = cs - 1
        l1_shift, cbits, smask = s.l1_shift, s.cluster_bits, s.slice_mask
        # The slice's cache key is l2off + (l2i >> slice_shift << entry_shift), l2i being
        # (offset >> cluster_bits) & l2_mask: the same bits of the offset taken in one shift
        # and one mask (the shift is cluster_bits - 3, never negative).
        kshift = cbits + s.slice_shift - s.entry_shift
        kmask = (s.l2_mask >> s.slice_shift) << s.entry_shift
        c = s.l2_cache
        lookup = c.tables.get
        to_end = c.tables.move_to_end
        used = c.used_since_clean.add
        cstats = c.stats
        clock = c.clock
        fc = self._fast_counts
        fd = f.fd
        pread = os.pread
        direct = f.direct
        direct_read = f.pread
        l1_mask = L1E_OFFSET_MASK
        l2_offset_mask = L2E_OFFSET_MASK
        # An entry is plain NORMAL data when its offset is set and none of these is: the
        # compressed and zero flags, the offset bits below the cluster size (unaligned).
        not_plain = _NOT_PLAIN_DATA | (cmask & L2E_OFFSET_MASK)

        def read(offset: int, n: int) -> bytes:
            within = offset & cmask
            # One chained comparison: offset >= 0, n > 0, the end inside the image and the
            # image open and not found corrupt (_limit is -1 then); then the one-cluster
            # test and the clean timer (next_clean is inf when it is off).
            if 0 <= offset < offset + n <= img._limit and within + n <= cs and clock() < c.next_clean:
                try:  # the L1 table is looked up each time: a resize replaces it
                    l2off = s.l1_table[offset >> l1_shift] & l1_mask
                except IndexError:  # past the L1 table (offset >= 0 here)
                    l2off = 0
                if l2off and not l2off & cmask:
                    key = l2off + (offset >> kshift & kmask)
                    words = lookup(key)  # a miss is loaded by the general path
                    if words is not None:
                        e = words[offset >> cbits & smask]
                        host = e & l2_offset_mask
                        if host and not e & not_plain:
                            if key != c.mru:  # else it is at the LRU end and marked used
                                to_end(key)
                                used(key)
                                c.mru = key
                            if direct:  # O_DIRECT wants its bounce buffer; pread counts it
                                cstats.hits += 1
                                return direct_read(host + within, n)
                            # One L2 hit and one data read, added to the cache's and the
                            # file's counters by stats() (_fold_counts): two updates here
                            # instead of three.
                            fc.reads += 1
                            fc.nbytes += n
                            try:
                                data = pread(fd, n, host + within)
                            except (OSError, OverflowError) as err:
                                # HostFile.pread's error: the request fails, nothing is flagged.
                                raise HostIOError(f"host read of {n} bytes at {host + within} "
                                                  f"failed: {err}") from None
                            if len(data) == n:
                                return data
                            return data + bytes(n - len(data))  # zeros past the end of the file
            return general(offset, n)

        return read

    def read(self, offset: int, n: int) -> bytes:
        """Guest bytes (qcow2_co_preadv_part): NORMAL from the host (host-contiguous runs in
        one read), ZERO as zeros, UNALLOCATED from the backing chain (zeros past its end),
        COMPRESSED decompressed, INVALID a corruption. A plain image reads through the
        closure of _bind_fast_read, installed over this method at open."""
        return self._read_general(offset, n)

    def _read_general(self, offset: int, n: int) -> bytes:
        self._ready()
        if offset < 0 or n < 0 or offset + n > self.size:
            self._range(offset, n)
        try:
            return self._read(offset, n)
        except CorruptionError as e:
            self._failed(e)

    def _read(self, offset: int, n: int) -> bytes:
        """The hot path first: a request inside one NORMAL cluster of a plain L2 table is
        one cache lookup (dict + array index) and one host read."""
        s = self.s
        cs = s.cluster_size
        if (not s.extended_l2 and self.snapshot_l1 is None and 0 < n <= cs - (offset & (cs - 1))):
            found = cl.l2_slice(s, offset)
            if found is not None:
                e = found[0][found[1]]
                host = e & L2E_OFFSET_MASK
                if host and not e & _NOT_PLAIN_DATA and not host & (cs - 1):
                    return s.data_host().pread(host + (offset & (cs - 1)), n)
        elif not s.extended_l2 and self.snapshot_l1 is None and n > 0:
            host = self._contiguous(offset, n)
            if host is not None:
                return s.data_host().pread(host, n)
        return self.read_internal(offset, n)

    def _contiguous(self, offset: int, n: int) -> int | None:
        """The host offset of [offset, offset+n) when all its clusters are plain NORMAL data
        laid out in guest order on the host, their slices cached: one host read into the
        returned bytes, no buffer to fill and copy (a large sequential read). None otherwise.

        Each slice's share of the request is tested at once: its entries must be the first
        one plus a cluster each (flags and all), one comparison of arrays in C instead of a
        Python loop per cluster (issue 13, the read-seq row). The cache then sees what
        read_into's lookups would show it, one get per cluster: the hits counted, each
        slice moved to the LRU end in guest order, marked used."""
        s = self.s
        cs = s.cluster_size
        cmask = cs - 1
        cbits = s.cluster_bits
        l1 = s.l1_table
        c = s.l2_cache
        lookup = c.tables.get  # no load, no hit counted: only a look
        not_plain = _NOT_PLAIN_DATA | (cmask & L2E_OFFSET_MASK)
        guest = offset - (offset & cmask)
        left = ((offset + n - 1 - guest) >> cbits) + 1  # clusters still to look at
        delta: int | None = None
        seen: list[tuple[int, int]] = []  # (slice key, clusters read through it)
        while left:
            i1 = guest >> s.l1_shift
            if i1 >= len(l1):
                return None
            l2off = l1[i1] & L1E_OFFSET_MASK
            if not l2off or l2off & cmask:
                return None
            l2i = (guest >> cbits) & s.l2_mask
            key = l2off + (l2i >> s.slice_shift << s.entry_shift)
            words = lookup(key)
            if words is None:
                return None
            w = l2i & s.slice_mask
            k = min(left, s.slice_entries - w)
            e = words[w]
            host = e & L2E_OFFSET_MASK
            if not host or e & not_plain or host + k * cs > L2E_OFFSET_MASK:
                return None
            if delta is None:
                delta = host - guest
            elif host - guest != delta:
                return None
            if k > 1 and words[w:w + k] != array("Q", range(e, e + k * cs, cs)):
                return None
            seen.append((key, k))
            guest += k * cs
            left -= k
        stats, to_end, used = c.stats, c.tables.move_to_end, c.used_since_clean.add
        for key, k in seen:
            stats.hits += k
            to_end(key)
            used(key)
        c.mru = seen[-1][0]
        return None if delta is None else offset + delta

    def read_internal(self, offset: int, n: int) -> bytes:
        """Read without the range check (COW reads reach past the end of the last cluster)."""
        out = bytearray(n)
        self.read_into(offset, memoryview(out))
        return bytes(out)

    def read_into(self, offset: int, buf: memoryview) -> None:
        s = self.s
        g = s.geometry
        cs, scs = s.cluster_size, g.subcluster_size
        ext, dfile = s.extended_l2, s.has_data_file
        pos, end = offset, offset + len(buf)
        run_host = run_start = -1
        run_len = 0
        target = s.data_host()
        crypto = s.crypto
        first: tuple[int, int] | None = None
        if not ext and crypto is None and 0 < len(buf) <= cs - (pos & (cs - 1)):
            # One plain NORMAL cluster (a backing read under a COW, most often): one lookup,
            # one host read into the buffer, as the loop below would do it.
            first = cl.get_entry(s, pos, self.snapshot_l1)
            e = first[0]
            host = e & L2E_OFFSET_MASK
            if host and not e & _NOT_PLAIN_DATA and not host & (cs - 1):
                target.preadv_into([buf], host + (pos & (cs - 1)))
                return
        while pos < end:
            if first is None:
                e, b = cl.get_entry(s, pos, self.snapshot_l1)
            else:
                (e, b), first = first, None
            cend = min(end, pos - pos % cs + cs)
            while pos < cend:
                piece_end = cend if not ext else min(cend, pos - pos % scs + scs)
                t = subcluster_type(e, b, (pos >> g.subcluster_bits) & (g.subclusters_per_cluster - 1),
                                    extended_l2=ext, has_data_file=dfile)
                if ext:
                    # Following subclusters of the same type join this piece.
                    while piece_end < cend and subcluster_type(
                            e, b, g.subcluster_index(piece_end), extended_l2=ext,
                            has_data_file=dfile) is t:
                        piece_end = min(cend, piece_end + scs)
                k = piece_end - pos
                host = e & L2E_OFFSET_MASK
                if host % cs and t in HOST_OFFSET_TYPES:
                    raise CorruptionError(f"cluster allocation offset {host:#x} unaligned (guest {pos:#x})")
                if (t is ST.ZERO_PLAIN or t is ST.ZERO_ALLOC) and s.header.version < 3:
                    # qcow2_get_host_offset: a v2 image has no zero flag; one set is corruption.
                    raise CorruptionError(f"zero cluster entry found in pre-v3 image (guest {pos:#x})")
                if t is ST.NORMAL:
                    host += pos % cs
                    if run_len and run_host + run_len == host and run_start + run_len == pos:
                        run_len += k
                    else:
                        if run_len:
                            lo = run_start - offset
                            if crypto is None:
                                target.preadv_into([buf[lo:lo + run_len]], run_host)
                            else:
                                crypt.read_data(crypto, target, buf[lo:lo + run_len], run_host, run_start)
                        run_host, run_start, run_len = host, pos, k
                    pos = piece_end
                    continue
                if t is ST.UNALLOCATED_PLAIN or t is ST.UNALLOCATED_ALLOC:
                    self._backing_read(pos, buf[pos - offset:piece_end - offset])
                elif t is ST.COMPRESSED:
                    data = self._decompress(e)
                    buf[pos - offset:piece_end - offset] = data[pos % cs:pos % cs + k]
                elif t is ST.ZERO_PLAIN or t is ST.ZERO_ALLOC:
                    pass  # the buffer starts zeroed
                else:
                    raise CorruptionError(f"invalid cluster entry {e:#x}/{b:#x} (guest {pos:#x})")
                pos = piece_end
        if run_len:
            lo = run_start - offset
            if crypto is None:
                target.preadv_into([buf[lo:lo + run_len]], run_host)
            else:
                crypt.read_data(crypto, target, buf[lo:lo + run_len], run_host, run_start)

    def read_below(self, offset: int, n: int) -> bytes:
        """What [offset, offset+n) inside one plain unallocated cluster of this image reads
        as: the backing chain's bytes, zeros past its end (read_internal's answer there,
        without this image's lookup). A bytearray, which the caller only slices and writes."""
        out = bytearray(n)
        self._backing_read(offset, memoryview(out))
        return out  # type: ignore[return-value]

    def _backing_read(self, pos: int, buf: memoryview) -> None:
        if self.backing is None or pos >= self.backing.size:
            return
        inside = min(len(buf), self.backing.size - pos)
        try:
            self.backing.read_into(pos, buf[:inside])
        except CorruptionError as e:
            raise cl.UnflaggedError(str(e)) from None

    def _decompress(self, entry: int) -> bytes:
        s = self.s
        coff, csize = compressed_range(entry, s.cluster_bits)
        try:
            return cz.inflate(s.host.pread(coff, csize), s.compression_type, s.cluster_size)
        except CorruptionError as e:
            raise cl.UnflaggedError(str(e)) from None

    # --- block status --------------------------------------------------------------------------
    def layer_status(self, offset: int, n: int, want_zero: bool = True) -> stt.Status:
        return stt.qcow2_status(self, offset, n, want_zero)

    def is_zero(self, offset: int, n: int) -> bool:
        """is_zero (block/qcow2.c): every chain answer over the range says ZERO (asked in
        a loop: one answer may stop short)."""
        n = min(n, self.size - offset)
        while n > 0:
            if self.s.signalled is not None:
                return False  # the node was dropped: bdrv_co_block_status answers ENOMEDIUM
            flags, pnum = stt.status_above(self, offset, n)
            if not flags & stt.BDRV_BLOCK_ZERO or pnum <= 0:
                return False
            offset += pnum
            n -= pnum
        return True

    def is_zero_fast(self, offset: int, n: int) -> bool:
        """bdrv_co_is_zero_fast as handle_alloc_space asks it: one chain answer without
        want_zero covers the range and says ZERO; no clamp to the image end."""
        if n <= 0:
            return True
        if self.s.signalled is not None:
            return False  # the node was dropped: bdrv_co_block_status answers ENOMEDIUM
        flags, pnum = stt.status_above(self, offset, n, want_zero=False)
        return pnum == n and bool(flags & stt.BDRV_BLOCK_ZERO)

    def is_zero_fast_below(self, offset: int, n: int) -> bool:
        """is_zero_fast over a range inside one plain unallocated cluster of this image
        (no subclusters). This image's own answer there is "not allocated, covering the
        range" unless the range passes the image's end (then it covers less: not zero), so
        the chain below decides; the first block-status query of this image still decides
        its metadata preallocation, as qcow2_co_block_status does at its first call."""
        if n <= 0:
            return True
        if self.s.signalled is not None:
            return False  # the node was dropped: bdrv_co_block_status answers ENOMEDIUM
        if self.metadata_preallocation is None:
            self.metadata_preallocation = stt.detect_metadata_preallocation(self)
        if offset + n > self.size:
            return False
        if self.backing is None:
            return True  # unallocated with nothing below: the generic layer's zeros
        flags, pnum = stt.status_above(self, offset, n, want_zero=False, below=True)
        return pnum == n and bool(flags & stt.BDRV_BLOCK_ZERO)

    # --- writing ----------------------------------------------------------------------------------
    def write(self, offset: int, data: bytes) -> None:
        """Guest write (qcow2_co_pwritev_part); see cluster.write."""
        self._ready(write=True)
        self._range(offset, len(data))
        if data:
            try:
                self._guard(self._write, offset, memoryview(data))
            finally:
                if self.bitmaps is not None:
                    self.bitmaps.mark_dirty(offset, len(data))

    def _write(self, offset: int, data: memoryview) -> None:
        s = self.s
        cs = s.cluster_size
        if not s.extended_l2 and len(data) <= cs - (offset & (cs - 1)):
            # The hot paths, inside one cluster of a table this image owns alone (COPIED in
            # the L1 entry): the lookup of slice_for_write, inline.
            l1e = s.l1_table[offset >> s.l1_shift]
            l2off = l1e & L1E_OFFSET_MASK
            if l1e & QCOW_OFLAG_COPIED and l2off and not l2off & (cs - 1):
                l2i = (offset >> s.cluster_bits) & s.l2_mask
                key = l2off + (l2i >> s.slice_shift << s.entry_shift)
                w = l2i & s.slice_mask
                e = s.l2_cache.get(key)[w]
                host = e & L2E_OFFSET_MASK
                if (e & QCOW_OFLAG_COPIED and host and not e & _NOT_PLAIN_DATA
                        and not host & (cs - 1)):
                    # An overwrite of a cluster owned alone: one host write, no metadata
                    # (handle_copied).
                    host += offset & (cs - 1)
                    s.overlap.check(host, len(data))
                    s.data_host().pwrite(host, data)
                    return
                if not e and not s.has_data_file:
                    # A plain unallocated cluster: one new cluster (cluster.write_new_cluster).
                    cl.write_new_cluster(self, offset, data, key, w)
                    return
        cl.write(self, offset, data)

    def write_zeroes(self, offset: int, n: int, *, unmap: bool = False) -> None:
        """qcow2_co_pwrite_zeroes; see cluster.write_zeroes."""
        self._ready(write=True)
        self._range(offset, n)
        if n:
            try:
                self._guard(self._write_zeroes, offset, n, unmap)
            finally:
                if self.bitmaps is not None:
                    self.bitmaps.mark_dirty(offset, n)

    def _write_zeroes(self, offset: int, n: int, unmap: bool) -> None:
        cl.write_zeroes(self, offset, n, unmap)

    def discard(self, offset: int, n: int) -> None:
        """qcow2_co_pdiscard; see cluster.discard."""
        self._ready(write=True)
        self._range(offset, n)
        if n:
            try:
                self._guard(cl.discard, self, offset, n)
            finally:
                if self.bitmaps is not None:
                    self.bitmaps.mark_dirty(offset, n)

    def write_compressed(self, offset: int, data: bytes) -> None:
        """One whole cluster, compressed (qcow2_co_pwritev_compressed_part,
        qcow2_alloc_compressed_cluster_offset, qcow2_alloc_bytes); checks in QEMU's order:
        sector alignment (qemu-io), range, external data file, empty write (pads the file
        to a sector), cluster alignment and size."""
        self._ready(write=True)
        if offset % BDRV_SECTOR_SIZE or len(data) % BDRV_SECTOR_SIZE:
            raise RequestError("compressed writes must be sector aligned (qemu-io write -c)")
        self._range(offset, len(data))
        if self.bitmaps is not None:
            # bdrv_co_write_req_finish sets the bits whatever the driver answers below.
            self.bitmaps.mark_dirty(offset, len(data))
        cs = self.cluster_size
        if self.s.has_data_file:
            raise UnsupportedFeature("compressed writes with an external data file")
        if not data:
            self._guard(self._pad_to_sector)
            return
        if offset % cs:
            raise RequestError("compressed writes must be cluster aligned")
        if len(data) != cs and not (0 < len(data) < cs and offset + len(data) == self.size):
            raise RequestError("compressed writes must cover exactly one cluster")
        self._guard(self._write_compressed, offset, bytes(data) + bytes(cs - len(data)))

    def _pad_to_sector(self) -> None:
        self.s.l2_cache.write(barrier=True)
        self.s.rc_cache.write(barrier=True)
        size = self.s.host.size()
        if size % BDRV_SECTOR_SIZE:
            self.s.host.truncate(align_up(size, BDRV_SECTOR_SIZE))

    def _write_compressed(self, offset: int, data: bytes) -> None:
        s = self.s
        # No dirty bit: QEMU's compressed path does not call qcow2_mark_dirty (7.2; seen
        # with qemu-io "write -c" then "abort" on a lazy_refcounts image).
        out = cz.deflate(data, s.compression_type, s.cluster_size - 1)
        if out is None:
            cl.write(self, offset, memoryview(data)[:min(len(data), self.size - offset)])
            return
        key, words, w = cl.slice_for_write(s, offset)
        if words[w] & L2E_OFFSET_MASK:
            raise RequestError("compressed writes need an unallocated cluster (QEMU: -EIO)")
        host = rc.alloc_bytes(s, len(out))
        s.overlap.check(host, len(out))
        nb_additional = ((host + len(out) - 1) >> 9) - (host >> 9)
        # The refcount is not lazy here even with lazy refcounts: QEMU's compressed path
        # sets no dirty bit, and qcow2_alloc_bytes orders the refcount block before the L2
        # table (qcow2_cache_set_dependency). Setting the dependency may write the slice
        # back, so the entry is changed only after it, and after the compressed data is
        # written; a file flush then comes before the slice reaches the file.
        s.l2_cache.set_dependency(s.rc_cache)
        s.host.pwrite(host, out)
        words = s.l2_cache.get(key)
        words[w] = QCOW_OFLAG_COMPRESSED | (nb_additional << csize_shift(s.cluster_bits)) | host
        if s.extended_l2:
            words[w + 1] = 0
        s.l2_cache.depends_on_flush()
        s.l2_cache.mark_dirty(key)

    # --- flush / close ------------------------------------------------------------------------------
    def flush(self) -> None:
        """qcow2_co_flush_to_os then the file flush: dirty L2 slices and refcount blocks
        reach the file in dependency order, then fdatasync (skipped with cache=unsafe)."""
        self._ready()
        if not self.readonly:
            self._guard(self._flush)

    def _flush(self) -> None:
        self.s.l2_cache.write()
        self.s.rc_cache.write()
        self.s.flush_file()

    def close(self) -> None:
        """Flush the caches (qcow2_inactivate), clear the dirty bit (qcow2_mark_clean),
        close the chain. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.close_error = None
        try:
            if not self.readonly and not self.broken:
                s = self.s
                if isinstance(s.overlap, ov.OverlapChecker):
                    # qcow2_close frees the L1 table before qcow2_inactivate, and
                    # qcow2_check_metadata_overlap looks at active L2 tables only while it
                    # exists: the bitmaps' store and the cache write-backs below skip them.
                    s.overlap.mask &= ~ov.QCOW2_OL_ACTIVE_L2
                    s.overlap.stale = True
                refused: CorruptionError | None = self._store_bitmaps()
                try:
                    s.l2_cache.flush()
                except HostIOError as e:
                    # QEMU's qcow2_inactivate prints 'Failed to flush the L2 table cache' and
                    # goes on; its close reports nothing to the caller (qcow2_close ignores the
                    # result), so a write-back the host refuses (EFBIG: a table a damaged
                    # offset put past the file size limit) leaves the dirty bit set and is
                    # kept in close_error, not raised.
                    refused = refused or e
                    self.close_error = e
                except CorruptionError as e:
                    # The overlap check refused a write-back (impl/cache.py). QEMU's
                    # qcow2_inactivate flags the image, prints 'Failed to flush the L2 table
                    # cache' and goes on with the refcount cache; its close reports nothing
                    # to the caller, so the refusal shows in the corrupt bit (and the dirty
                    # bit, left set), not as an exception.
                    refused = refused or e
                    if not isinstance(e, cl.UnflaggedError):
                        self._flag_corrupt()
                try:
                    s.rc_cache.flush()
                except HostIOError as e:
                    refused = refused or e  # 'Failed to flush the refcount block cache'
                    self.close_error = self.close_error or e
                except CorruptionError as e:
                    refused = refused or e
                    if not isinstance(e, cl.UnflaggedError):
                        self._flag_corrupt()
                if refused is None:
                    s.set_incompatible_bit(ft.QCOW2_INCOMPAT_DIRTY, False)
                # bdrv_close flushes; after fdatasync the file's holes are stable for map.
                for f in self._files:
                    with contextlib.suppress(OSError):
                        os.fdatasync(f.fd)
        finally:
            self._release()

    def _store_bitmaps(self) -> CorruptionError | None:
        """qcow2_inactivate's qcow2_store_persistent_dirty_bitmaps (spec/bitmap_store.py),
        before the caches are flushed. A failure is QEMU's "Lost persistent bitmaps": the
        close goes on, the image is not marked clean, an overlap flags it."""
        if self.bitmaps is None:
            return None
        try:
            self.bitmaps.store(_BitmapHost(self.s), self.s.header)
        except HostIOError as e:
            return e
        except CorruptionError as e:
            if not isinstance(e, cl.UnflaggedError):
                self._flag_corrupt()
            return e
        return None

    def _release(self) -> None:
        for lock in self.locks:
            with contextlib.suppress(Qcow2Error):
                lock.release()
        self.locks = []
        for f in self._files:
            f.close()
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    # --- the rest -----------------------------------------------------------------------------------
    def map(self, offset: int = 0, n: int | None = None) -> list[dict[str, Any]]:
        """The extents of ``qemu-img map --output=json`` (status.image_map)."""
        self._ready()
        n = self.size - offset if n is None else n
        self._range(offset, n)
        return self._guard(stt.image_map, self, offset, n)

    def info(self) -> dict[str, Any]:
        """``qemu-img info --output=json`` of the file as QEMU would leave it now: dirty
        cache entries are written first (without fsync)."""
        from spec.info import allocated_size, qcow2_info

        self._ready()
        if not self.readonly:
            self._guard(self._write_back)
        img = open_image(self.filename)
        try:
            return qcow2_info(img, self.filename, allocated_size(os.stat(self.filename)))
        finally:
            img.close()

    def _write_back(self) -> None:
        self.s.l2_cache.write()
        self.s.rc_cache.write()

    def _fold_counts(self) -> None:
        """Add the inline read's hits (_FastCounts) to the L2 cache's hits and the data
        reads: iostats and the caches' stats are complete after this, and only then."""
        fc = self._fast_counts
        if fc.reads:
            self.s.l2_cache.stats.hits += fc.reads
            self.iostats.data_reads += fc.reads
            self.iostats.data_read_bytes += fc.nbytes
            fc.reads = fc.nbytes = 0

    def stats(self) -> dict[str, int]:
        """Counted host I/O of this image's file and data file (reads, writes, flushes and
        bytes, data and metadata apart, plus totals) and the two caches' hits, misses,
        evictions and write-backs."""
        self._fold_counts()
        out = self.iostats.as_dict()
        out["reads"] = out["data_reads"] + out["meta_reads"]
        out["writes"] = out["data_writes"] + out["meta_writes"]
        out["read_bytes"] = out["data_read_bytes"] + out["meta_read_bytes"]
        out["write_bytes"] = out["data_write_bytes"] + out["meta_write_bytes"]
        for name, cache in (("l2", self.s.l2_cache), ("refcount", self.s.rc_cache)):
            st = cache.stats
            out[f"{name}_cache_hits"] = st.hits
            out[f"{name}_cache_misses"] = st.misses
            out[f"{name}_cache_evictions"] = st.evictions
            out[f"{name}_cache_writebacks"] = st.writebacks
        return out

    def reset_stats(self) -> None:
        """Zero every counter (benchmarks and tests measure one request at a time)."""
        self._fold_counts()
        for k in self.iostats.as_dict():
            setattr(self.iostats, k, 0)
        for cache in (self.s.l2_cache, self.s.rc_cache):
            cache.stats.__init__()  # type: ignore[misc]
        if isinstance(self.backing, Image):
            self.backing.reset_stats()

    def resize(self, new_size: int, *, shrink: bool = False) -> None:
        """qcow2_co_truncate; see impl/resize.py."""
        from impl import resize as rs

        self._ready(write=True)
        if self.bitmaps is not None:
            self.bitmaps.check_resize()
        self._guard(rs.resize, self, new_size, shrink)
        if self.bitmaps is not None:
            self.bitmaps.resize(self.size)

    def snapshot_create(self, name: str) -> None:
        """qcow2_snapshot_create; see impl/snapshot.py."""
        from impl import snapshot as sn

        self._ready(write=True)
        self._guard(sn.create, self, name)

    def snapshot_apply(self, name: str) -> None:
        """qcow2_snapshot_goto; see impl/snapshot.py."""
        from impl import snapshot as sn

        self._ready(write=True)
        self._guard(sn.apply, self, name)

    def snapshot_delete(self, name: str) -> None:
        """qcow2_snapshot_delete; see impl/snapshot.py."""
        from impl import snapshot as sn

        self._ready(write=True)
        self._guard(sn.delete, self, name)

    def snapshots(self) -> list[dict[str, Any]]:
        """The snapshots as ``qemu-img info --output=json`` lists them (spec.info)."""
        from spec.info import snapshot_list

        self._ready()
        img = open_image(self.filename)
        try:
            return list(snapshot_list(img) or [])
        finally:
            img.close()


class EncryptedImage(Image):
    """An encrypted image (crypt_method 1 or 2): Image without its hot paths, whose host
    bytes would be ciphertext, and with requests widened to whole 512-byte sectors, the
    request alignment QEMU gives an encrypted image (impl/crypt.py). read_into decrypts
    and cluster.py encrypts, through ``State.crypto``."""

    def _read(self, offset: int, n: int) -> bytes:
        return self.read_internal(offset, n)

    def _write(self, offset: int, data: memoryview) -> None:
        crypt.write(self, offset, data)

    def _write_zeroes(self, offset: int, n: int, unmap: bool) -> None:
        crypt.write_zeroes(self, offset, n, unmap)


class _BitmapHost:
    """spec.bitmap_store.BitmapHost over the impl's state: impl/refcount.py allocates and
    frees (through the refcount cache), writes are overlap-checked with nothing ignored,
    flush_caches writes both caches back and flushes the file (qcow2_flush_caches)."""

    def __init__(self, s: State) -> None:
        self.s = s
        self.cluster_size = s.cluster_size

    def bitmap_alloc(self, nbytes: int) -> int:
        return rc.alloc_clusters(self.s, -(-nbytes // self.cluster_size))

    def bitmap_free(self, offset: int, nbytes: int, *, discard: bool) -> None:
        rc.free_clusters(self.s, offset, nbytes, discard=discard)

    def bitmap_overlap_check(self, offset: int, n: int) -> None:
        self.s.overlap.check_metadata(offset, n, 0)

    def bitmap_pread(self, offset: int, n: int) -> bytes:
        return self.s.host.pread(offset, n, meta=True)

    def bitmap_pwrite(self, offset: int, data: bytes) -> None:
        self.s.host.pwrite(offset, data, meta=True)

    def bitmap_flush_caches(self) -> None:
        self.s.l2_cache.write()
        self.s.rc_cache.write()
        self.s.flush_file()

    def bitmap_flush(self) -> None:
        self.s.flush_file()

    def bitmap_directory_moved(self, offset: int, size: int) -> None:
        self.s.overlap.bitmap_dir = (offset, size)
        self.s.overlap.stale = True
