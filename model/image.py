"""The model's Image: the facade over one open qcow2 image (spec.interface.Image).

``open`` opens the file and its backing chain and takes QEMU's locks; ``Image`` checks each
request (closed, read-only, range), runs the operation module that answers it on the open
image's State (model/state.py), and turns a CorruptionError from the tables into QEMU's
corrupt flag (Image._guard). What each operation does is in its module: read.py, write.py,
zeroes.py, compressed.py, resize.py, snapshots.py, mapping_report.py.
"""

from __future__ import annotations

import builtins
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from model import backing as bk
from model import compressed as cp
from model import mapping_report as mr
from model import read as rd
from model import resize as rs
from model import snapshots as sn
from model import write as wr
from model import zeroes as zr
from model.overlap import check_metadata_write
from model.state import ModelFile, State, UnflaggedError, check_range
from spec import bitmap_store as bms
from spec import encryption as enc
from spec import features as ft
from spec import refblocks as rb
from spec.errors import CorruptionError, FormatError, Qcow2Error, RequestError
from spec.hostio import HostIOError
from spec.image import ImageFile, open_image
from spec.info import allocated_size, full_backing_filename, qcow2_info
from spec.limits import QCOW2_MAX_BACKING_DEPTH
from spec.locking import ImageLock, Locking

T = TypeVar("T")

IMPL_OPTIONS = frozenset({"l2_cache_size", "l2_cache_entry_size", "refcount_cache_size",
                          "cache_clean_interval", "overlap_check", "cache"})
"""Options of the impl's open (DESIGN.md). The model has no caches: it accepts them so that
one call works for both packages, and ignores them, except ``cache="unsafe"``: as qemu-io's
``-t unsafe`` (BDRV_O_NO_FLUSH), flush then skips the fsync (block/io.c bdrv_co_flush)."""


def open(path: str | os.PathLike[str], *, readonly: bool = False,
         snapshot: str | None = None, **options: Any) -> Image:
    """Open a qcow2 image (block/qcow2.c, qcow2_do_open, and block.c for the backing chain).

    ``snapshot`` opens an internal snapshot's state, read-only (block/snapshot.c,
    bdrv_snapshot_load_tmp refuses a writable node).

    Encryption: ``key_secret`` (bytes or str) is QEMU's ``encrypt.key-secret``, the passphrase
    of a LUKS image or the key of a legacy AES image; ``backing_key_secret`` is
    ``backing.encrypt.key-secret``, used for every encrypted image in the backing chain (see
    Keys). Guest data is decrypted and encrypted per 512-byte sector as QEMU does
    (spec/encryption.py; model/read.py, model/write.py).

    Locking (spec/locking.py): the image file (and its external data file, and every
    backing file, read-only) is locked on the descriptor the Image keeps, with the OFD lock
    bytes QEMU 7.2 uses, until close(): read-write as qemu-io takes them, read-only as
    qemu-io -r. ``force_share=True`` is -U (read-only only); ``locking="auto"|"on"|"off"``
    is file-posix's option. Two opens of one image in the same process are two openers
    and conflict like two QEMU processes; open the second with ``force_share=True``.

    Raises:
        RequestError: an unknown option; ``snapshot`` without ``readonly``; ``force_share``
            without ``readonly``; another process (or open) holds a conflicting lock; a corrupt image
            opened read-write (QEMU: "Image is corrupt; cannot be opened read/write");
            no snapshot of that name or id.
        FormatError: the file, or a file in its backing chain, is not a valid qcow2 image,
            or a backing file is missing; the chain is too deep.
        UnsupportedFeature: a cipher or hash of an encrypted image that the cryptography
            package lacks (spec/encryption.py); unknown incompatible feature bits; a backing
            format other than qcow2/raw.
        WrongKey (a RequestError): ``key_secret`` unlocks no LUKS key slot (or the slot's key
            material is damaged: LUKS cannot tell). An encrypted image opened without
            ``key_secret`` is RequestError; a damaged LUKS header is FormatError.
        CorruptionError: inconsistency found while rebuilding a dirty image's refcounts.
    """
    options = dict(options)
    keys = Keys(options.pop("key_secret", None), options.pop("backing_key_secret", None))
    for k in (keys.top, keys.backing):
        if k is not None and not isinstance(k, (bytes, str)):
            raise RequestError("key_secret and backing_key_secret must be bytes or str")
    force_share = options.pop("force_share", False)
    locking = options.pop("locking", "auto")
    if not isinstance(force_share, bool):
        raise RequestError("force_share must be a bool")
    if locking not in ("auto", "on", "off"):
        raise RequestError("locking must be 'auto', 'on' or 'off'")
    if force_share and not readonly:
        # block.c bdrv_open_common: "force-share=on can only be used with read-only images".
        raise RequestError("force_share can only be used with read-only images")
    lock = LockOptions(force_share=force_share, locking=locking)
    return _open(str(path), readonly=readonly, snapshot=snapshot, depth=0, options=options, lock=lock,
                 keys=keys)


@dataclass(frozen=True)
class Keys:
    """Passphrases for encrypted images: ``key_secret`` is QEMU's ``encrypt.key-secret`` (the
    secret's data), ``backing_key_secret`` its ``backing.encrypt.key-secret``. QEMU takes one
    per layer (backing.backing.encrypt.key-secret, ...); the model uses the backing key for
    every encrypted layer below the top. A key given for an image that is not encrypted is
    ignored, as QEMU ignores encrypt.key-secret there."""

    top: bytes | str | None = None
    backing: bytes | str | None = None


@dataclass(frozen=True)
class LockOptions:
    """QEMU's image locking for one open (spec/locking.py; block/file-posix.c).

    ``force_share`` is qemu-io/qemu-img ``-U``: a read-only open that shares every
    permission with other processes. ``locking`` is file-posix's option: "auto" (default;
    silently unlocked where the file system has no OFD locks), "on", "off".
    """

    force_share: bool = False
    locking: Locking = "auto"


def _validate_options(options: dict[str, Any]) -> None:
    """Unknown names, and values QEMU would reject for the impl's options, are the caller's
    mistake (RequestError); valid ones are accepted and ignored (see IMPL_OPTIONS)."""
    bad = set(options) - IMPL_OPTIONS
    if bad:
        raise RequestError(f"unknown option(s): {', '.join(sorted(bad))}")
    for name in ("l2_cache_size", "l2_cache_entry_size", "refcount_cache_size", "cache_clean_interval"):
        v = options.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise RequestError(f"{name} must be a non-negative integer")
    if options.get("cache", "writeback") not in ("writeback", "none", "unsafe"):
        raise RequestError("cache must be 'writeback', 'none' or 'unsafe'")
    # The model's overlap check is QEMU's default, "cached" (model/overlap.py); the other modes
    # change behaviour, so they are refused rather than accepted and ignored (DESIGN.md).
    mode = options.get("overlap_check", "cached")
    if mode != "cached":
        if mode in ("none", "constant", "all"):
            raise RequestError(f"overlap_check={mode} is not implemented by the model (only 'cached')")
        raise RequestError("overlap_check must be one of none, constant, cached, all")


def _open(path: str, *, readonly: bool, snapshot: str | None, depth: int,
          options: dict[str, Any], lock: LockOptions, keys: Keys = Keys()) -> Image:
    _validate_options(options)
    if snapshot is not None and not readonly:
        raise RequestError("a snapshot can only be opened read-only")
    if depth > QCOW2_MAX_BACKING_DEPTH:
        raise FormatError("backing chain too deep (a loop?)", "backing_file")
    img = open_image(path)
    try:
        image = _open_image(img, path, readonly=readonly, snapshot=snapshot, depth=depth, lock=lock,
                            keys=keys)
    except BaseException:
        img.close()
        raise
    image.no_flush = options.get("cache") == "unsafe"
    image.q.sync = not image.no_flush
    return image


def _open_image(img: ImageFile, path: str, *, readonly: bool, snapshot: str | None,
                depth: int, lock: LockOptions, keys: Keys = Keys()) -> Image:
    crypto = None
    if img.header.crypt_method:
        # qcow2_do_open sets up the cipher before anything reads guest data: no key is
        # RequestError, a key no slot accepts is WrongKey (spec/encryption.py). The model
        # never hands out ciphertext.
        crypto = enc.image_crypto(img, keys.top)
    incompat = img.incompatible_features
    if incompat & ft.QCOW2_INCOMPAT_CORRUPT and not readonly:
        raise RequestError("image is corrupt; it can only be opened read-only")
    f: BinaryIO = img.f
    if not readonly:
        try:
            f = builtins.open(path, "r+b")  # noqa: SIM115 - owned by the Image
        except OSError as e:
            raise FormatError(f"cannot open for writing: {e.strerror}", path) from None
        img.f.close()
        img.f = f
    # QEMU locks the image before it reads or writes anything beyond the header probe
    # (raw_open_common, then raw_check_perm/raw_set_perm as the node gets its permissions).
    # The lock lives on the descriptor the Image keeps, so closing it releases the lock.
    locks = [ImageLock(f, locking=lock.locking, path=path)]
    locks[0].acquire(write=not readonly, force_share=lock.force_share)
    data_f = None
    if img.has_data_file:
        if img.data_file is None:
            raise FormatError("external data file flag set but no data file name", "extensions")
        # QEMU opens the data file by the name in the header as given, relative to the
        # current directory, not to the image (qcow2_do_open opens the "data-file" child
        # from that name); the model does the same.
        data_path = img.data_file
        try:
            data_f = builtins.open(data_path, "rb" if readonly else "r+b")  # noqa: SIM115
        except OSError as e:
            raise FormatError(f"could not open data file: {e.strerror}", data_path) from None
        try:
            data_lock = ImageLock(data_f, locking=lock.locking, path=data_path)
            data_lock.acquire(write=not readonly, force_share=lock.force_share, data_file=True)
        except Qcow2Error:
            data_f.close()
            raise
        locks.append(data_lock)
    q = ModelFile(img, f, readonly=readonly, data_f=data_f)
    backing: bk.Layer | None = None
    if img.backing_file:
        bpath = full_backing_filename(path, img.backing_file)
        kind = bk.backing_kind(bpath, img.backing_format)
        if kind == "raw":
            raw_backing = bk.open_raw(bpath)
            raw_lock = ImageLock(raw_backing.f, locking=lock.locking, path=bpath)
            try:
                raw_lock.acquire(write=False, force_share=lock.force_share)
            except Qcow2Error:
                raw_backing.close()
                raise
            locks.append(raw_lock)
            backing = raw_backing
        else:
            # A backing file is opened read-only and locked as qemu-io -r locks it (-U
            # applies to the whole chain).
            backing = _open(bpath, readonly=True, snapshot=None, depth=depth + 1, options={},
                            lock=lock, keys=Keys(keys.backing, keys.backing))
    state = State(q, backing)
    state.crypto = crypto
    image = Image(state, locks)
    if snapshot is not None:
        sn.load_for_reading(state, snapshot)
    elif not readonly:
        image._open_read_write()
    return image


class Image:
    """An open qcow2 image (spec.interface.Image). See the module doc.

    Every public method raises only spec.errors classes. Common to all of them:
    RequestError for a closed image; CorruptionError after the image was found corrupt
    (QEMU drops the node: every later request fails).
    """

    def __init__(self, state: State, locks: list[ImageLock]) -> None:
        self.state = state
        """The open image's state, which the operation modules take."""
        self.locks = locks
        """QEMU's locks on the image file (and the data file); released by close()."""
        self.closed = False
        self.broken = False
        self.no_flush = False
        """``cache="unsafe"``: flush does not fsync (BDRV_O_NO_FLUSH)."""
        self.bitmaps: bms.BitmapSet | None = None
        """The persistent bitmaps a read-write open loaded (spec/bitmap_store.py), or None."""

    # --- what the interface and the backing chain read (model/backing.py Layer) ---------------
    @property
    def q(self) -> ModelFile:
        """The raw file and header (spec.qfile)."""
        return self.state.q

    @property
    def size(self) -> int:
        return self.state.size

    @property
    def cluster_size(self) -> int:
        return self.state.cluster_size

    @property
    def filename(self) -> str:
        return self.state.filename

    @property
    def readonly(self) -> bool:
        return self.state.readonly

    @property
    def backing(self) -> bk.Layer | None:
        return self.state.backing

    @property
    def metadata_preallocation(self) -> bool | None:
        """Whether this open looks preallocated to QEMU (State.metadata_preallocation)."""
        return self.state.metadata_preallocation

    @property
    def packed_into_live_cluster(self) -> bool:
        """Whether a compressed write of this open reproduced QEMU 7.2's packing into a
        cluster that something else owns (compressed.alloc_bytes): the image is damaged as
        QEMU's would be."""
        return self.q.packed_into_live_cluster

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- request checks and the corrupt flag --------------------------------------------------
    def _usable(self) -> None:
        if self.closed:
            raise RequestError("image is closed")
        if self.broken:
            raise CorruptionError("image was found corrupt; no further requests are served")

    def _writable(self) -> None:
        self._usable()
        if self.readonly:
            raise RequestError("image is opened read-only")

    def corrupt(self, message: str) -> CorruptionError:
        """Flag the image corrupt as qcow2_signal_corruption(fatal=true) does: set the
        corrupt bit when writable, and refuse every further request. Returns the error."""
        if not self.readonly and not self.broken:
            with contextlib.suppress(Qcow2Error):
                self.q.set_incompatible_bit(ft.QCOW2_INCOMPAT_CORRUPT, True)
        self.broken = True
        return CorruptionError(message)

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an operation; a CorruptionError from the tables flags the image. A
        compressed cluster that does not decode, here or in a backing file, fails the
        request with a plain CorruptionError and flags nothing (QEMU: -EIO from
        qcow2_co_preadv_compressed); see state.UnflaggedError. Nor does a failed host
        call (spec.hostio.HostIOError: QEMU returns the errno and sets no corrupt bit)."""
        try:
            result = fn(*args)
        except HostIOError:
            self._take_signal()
            raise
        except UnflaggedError as e:
            self._take_signal()
            raise CorruptionError(str(e)) from None
        except CorruptionError as e:
            self._take_signal()
            if not self.broken:
                raise self.corrupt(str(e)) from None
            raise
        self._take_signal()
        return result

    def _take_signal(self) -> None:
        """A corruption QEMU signals inside a step whose failure it ignores (a free whose
        refcount block would land on the header, Qcow2File.signalled): the image is flagged,
        and the operation's own outcome stands."""
        if self.q.signalled is not None:
            message, self.q.signalled = self.q.signalled, None
            self.corrupt(message)

    def _open_read_write(self) -> None:
        """What a read-write open changes (qcow2_do_open, qcow2_update_options):

        - unknown autoclear bits are cleared and the persistent bitmaps loaded, each one not
          in use marked in use in the directory, rewritten in place (spec/bitmap_store.py;
          an overlap there flags the image and fails the open, as QEMU's
          "Can't update bitmap directory");
        - a dirty image (lazy refcounts left unclean) is repaired as ``check -r all``
          repairs it (spec.check.repair_dirty) and the dirty bit cleared.
        """
        h = self.q.header
        if h.v3 is None:
            return
        q = self.q
        self.bitmaps = self._guard(bms.load_on_open, q,
                                   lambda off, n: check_metadata_write(q, off, n, "bitmap directory"))
        if h.v3.incompatible_features & ft.QCOW2_INCOMPAT_DIRTY:
            # Imported here: only a dirty lazy-refcount image needs the repair engine, and
            # loading it at import cost every command ~30 ms of start-up.
            from spec.check import repair_dirty

            self._guard(repair_dirty, self.q)
            self.q.set_incompatible_bit(ft.QCOW2_INCOMPAT_DIRTY, False)

    # --- guest I/O ------------------------------------------------------------------------------
    def read(self, offset: int, n: int) -> bytes:
        """Guest bytes [offset, offset+n) (model/read.py).
        Raises RequestError (range, closed), CorruptionError."""
        self._usable()
        check_range(self.state, offset, n)
        return self._guard(rd.read, self.state, offset, n)

    def write(self, offset: int, data: bytes) -> None:
        """Write guest bytes (model/write.py).
        Raises RequestError (range, read-only, closed), CorruptionError."""
        self._writable()
        check_range(self.state, offset, len(data))
        if data:
            try:
                self._guard(wr.write, self.state, offset, bytes(data))
            finally:
                if self.bitmaps is not None:
                    self.bitmaps.mark_dirty(offset, len(data))

    def write_zeroes(self, offset: int, n: int, *, unmap: bool = False) -> None:
        """Make [offset, offset+n) read as zeros (model/zeroes.py).
        Raises RequestError (range, read-only, closed), CorruptionError."""
        self._writable()
        check_range(self.state, offset, n)
        if n:
            try:
                self._guard(zr.write_zeroes, self.state, offset, n, unmap)
            finally:
                if self.bitmaps is not None:
                    self.bitmaps.mark_dirty(offset, n)

    def discard(self, offset: int, n: int) -> None:
        """Discard [offset, offset+n) (model/zeroes.py).
        Raises RequestError (range, read-only, closed), CorruptionError."""
        self._writable()
        check_range(self.state, offset, n)
        if n:
            try:
                self._guard(zr.discard, self.state, offset, n)
            finally:
                if self.bitmaps is not None:
                    self.bitmaps.mark_dirty(offset, n)

    def write_compressed(self, offset: int, data: bytes) -> None:
        """Write one cluster compressed (model/compressed.py).
        Raises RequestError (alignment, size, range, an allocated cluster, read-only,
        closed), UnsupportedFeature (external data file), CorruptionError."""
        self._writable()
        cp.check_request(self.state, offset, len(data))
        try:
            self._guard(cp.write_compressed, self.state, offset, bytes(data))
        finally:
            if self.bitmaps is not None and data:
                self.bitmaps.mark_dirty(offset, len(data))

    # --- flush / close -----------------------------------------------------------------------
    def flush(self) -> None:
        """Every update is already in the file (no caches); flush makes it durable, the data
        file included, unless the image was opened with ``cache="unsafe"`` (then a monitor
        still sees the flush, spec/hostio.py).

        Raises RequestError (closed), CorruptionError (host I/O error)."""
        self._usable()
        if not self.readonly:
            self.q.flush_all(sync=not self.no_flush)

    def close(self) -> None:
        """Close the image, its data file and its backing chain. On a writable image the
        dirty bit is cleared (qcow2_close -> qcow2_mark_clean), after a barrier: everything
        lazy is durable first. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            if not self.readonly and not self.broken:
                self.q.l1_released = True
                if self._store_bitmaps():
                    self.q.set_incompatible_bit(ft.QCOW2_INCOMPAT_DIRTY, False)
                # bdrv_close flushes, cache=unsafe or not: after fdatasync the file's holes
                # are stable, so that SEEK_HOLE (and qemu-img map, see mapping_report) sees
                # what QEMU's would.
                self.q.flush_all(sync=True)
        finally:
            for lock in self.locks:
                lock.release()
            self.q.f.close()
            if self.q.data_f is not None:
                self.q.data_f.close()
            if self.backing is not None:
                self.backing.close()

    def _store_bitmaps(self) -> bool:
        """qcow2_inactivate's qcow2_store_persistent_dirty_bitmaps (spec/bitmap_store.py).
        False when it failed: QEMU reports "Lost persistent bitmaps", flags the image for
        an overlap, and leaves the image unmarked clean."""
        if self.bitmaps is None:
            return True
        try:
            self.bitmaps.store(_BitmapHost(self.q), self.q.header)
        except HostIOError:
            return False
        except CorruptionError as e:
            self.corrupt(str(e))
            return False
        return True

    # --- the rest of the interface ------------------------------------------------------------
    def map(self, offset: int = 0, n: int | None = None) -> list[dict[str, Any]]:
        """Extents of [offset, offset+n) as ``qemu-img map --output=json`` lists them.
        See model/mapping_report.py. Raises RequestError (range, closed), CorruptionError."""
        self._usable()
        n = self.size - offset if n is None else n
        check_range(self.state, offset, n)
        return self._guard(mr.image_map, self, offset, n)

    def layer_status(self, offset: int, n: int, want_zero: bool = True) -> bk.Status:
        """This image's own block status at ``offset`` (qcow2_co_block_status plus the
        generic part of bdrv_co_block_status). See model/mapping_report.py."""
        return mr.qcow2_layer_status(self.state, offset, n, want_zero)

    def info(self) -> dict[str, Any]:
        """``qemu-img info --output=json`` of the file as it is now (spec.info.qcow2_info).
        Raises RequestError (closed), FormatError."""
        self._usable()
        img = open_image(self.filename)
        try:
            return qcow2_info(img, self.filename, allocated_size(os.stat(self.filename)))
        finally:
            img.close()

    def resize(self, new_size: int, *, shrink: bool = False) -> None:
        """Change the virtual size (qcow2_co_truncate). See model/resize.py.
        Raises RequestError (size, shrink without ``shrink``, snapshots, read-only, closed),
        CorruptionError."""
        self._writable()
        if self.bitmaps is not None:
            self.bitmaps.check_resize()
        self._guard(rs.resize, self.state, new_size, shrink)
        if self.bitmaps is not None:
            self.bitmaps.resize(self.state.size)

    def snapshot_create(self, name: str) -> None:
        """See model/snapshots.py (qcow2_snapshot_create)."""
        self._writable()
        self._guard(sn.create, self.state, name)

    def snapshot_apply(self, name: str) -> None:
        """See model/snapshots.py (qcow2_snapshot_goto)."""
        self._writable()
        self._guard(sn.apply, self.state, name)

    def snapshot_delete(self, name: str) -> None:
        """See model/snapshots.py (qcow2_snapshot_delete)."""
        self._writable()
        self._guard(sn.delete, self.state, name)

    def snapshots(self) -> list[dict[str, Any]]:
        """See model/snapshots.py (qcow2_snapshot_list)."""
        self._usable()
        return sn.listing(self.state)


class _BitmapHost:
    """spec.bitmap_store.BitmapHost over the model's file: spec/refblocks.py allocates and
    frees, every write is overlap-checked with nothing ignored, flushes reach the image file."""

    def __init__(self, q: ModelFile) -> None:
        self.q = q
        self.cluster_size = q.cluster_size

    def bitmap_alloc(self, nbytes: int) -> int:
        return rb.alloc_clusters(self.q, -(-nbytes // self.cluster_size))

    def bitmap_free(self, offset: int, nbytes: int, *, discard: bool) -> None:
        rb.free_clusters(self.q, offset, nbytes, discard=discard)

    def bitmap_overlap_check(self, offset: int, n: int) -> None:
        check_metadata_write(self.q, offset, n, "")

    def bitmap_pread(self, offset: int, n: int) -> bytes:
        return self.q.pread(offset, n)

    def bitmap_pwrite(self, offset: int, data: bytes) -> None:
        self.q.pwrite(offset, data)

    def bitmap_flush_caches(self) -> None:
        self.q.flush(sync=self.q.sync)

    def bitmap_flush(self) -> None:
        self.q.flush(sync=self.q.sync)

    def bitmap_directory_moved(self, offset: int, size: int) -> None:
        # model/overlap.py reads the directory's place from the parsed extension.
        bms.update_extension(self.q.image_file, offset, size)
