"""Backing files (qcow2.rst "Header", backing_file_offset; block.c bdrv_open_backing_file).

A backing file is a *layer*: something with a size that can be read and asked for its block
status. A qcow2 backing file is a read-only model Image (model/image.py); a raw one is a
RawLayer here. Reads past a layer's end return zeros (block/io.c, bdrv_aligned_preadv clamps
to the layer's length and zero-fills the rest).

Where the file is: a name that is absolute or has a protocol prefix is used as is, any other
is relative to the directory of the overlay's file name (block.c,
bdrv_make_absolute_filename; spec.info.full_backing_filename). Which format: the backing
format extension when present, otherwise probed like QEMU does (the qcow2 magic means qcow2,
anything else raw).

Errors: FormatError when the backing file cannot be opened (QEMU: "Could not open backing
file"), or when the chain is deeper than QCOW2_MAX_BACKING_DEPTH (a loop);
UnsupportedFeature for a backing format other than qcow2 and raw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from spec.errors import FormatError, UnsupportedFeature
from spec.limits import QCOW_MAGIC

# block/block-common.h BDRV_BLOCK_* bits, as the model's block-status answers use them.
BDRV_BLOCK_DATA = 0x01
BDRV_BLOCK_ZERO = 0x02
BDRV_BLOCK_OFFSET_VALID = 0x04
BDRV_BLOCK_ALLOCATED = 0x10
BDRV_BLOCK_EOF = 0x20


@dataclass
class Status:
    """One answer of a layer's block status (bdrv_co_block_status for one node)."""

    flags: int
    length: int
    offset: int | None = None
    filename: str | None = None
    """Host file that ``offset`` is in (QEMU's ``*file``)."""


class Layer(Protocol):
    """What a backing layer answers: a model Image, or a RawLayer."""

    @property
    def size(self) -> int: ...
    @property
    def filename(self) -> str: ...
    @property
    def backing(self) -> Layer | None: ...


    def read(self, offset: int, n: int) -> bytes: ...
    def layer_status(self, offset: int, n: int, want_zero: bool = True) -> Status: ...
    def close(self) -> None: ...


class RawLayer:
    """A raw backing file: guest offset = file offset."""

    backing: Layer | None = None

    def __init__(self, filename: str, f: BinaryIO) -> None:
        self.filename = filename
        self.f = f
        # The raw driver counts whole sectors (block.c, bdrv_refresh_total_sectors).
        self.size = -(-os.fstat(f.fileno()).st_size // 512) * 512

    def read(self, offset: int, n: int) -> bytes:
        if n <= 0:
            return b""
        try:
            data = os.pread(self.f.fileno(), n, offset)
        except OSError as e:
            raise FormatError(f"cannot read backing file: {e.strerror}", self.filename) from None
        return data + bytes(n - len(data))

    def layer_status(self, offset: int, n: int, want_zero: bool = True) -> Status:
        """The raw driver answers DATA|OFFSET_VALID and recurses into the file, whose holes
        (SEEK_HOLE) are ZERO (block/raw-format.c, block/file-posix.c raw_co_block_status).

        At or past the layer's end the answer is EOF with nothing covered (block/io.c,
        bdrv_co_block_status); the chain above then treats the rest as zeros allocated here
        (bdrv_co_common_block_status_above)."""
        if offset >= self.size:
            return Status(BDRV_BLOCK_EOF, 0)
        n = min(n, self.size - offset)
        if not want_zero:
            # file-posix answers a caller that does not need zeros (bdrv_co_is_zero_fast)
            # with DATA for the whole range, without looking for holes.
            flags = BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED
            return Status(flags | (BDRV_BLOCK_EOF if offset + n == self.size else 0), n, offset,
                          self.filename)
        fd = self.f.fileno()
        file_size = os.fstat(fd).st_size
        if offset >= file_size:
            return Status(BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_EOF,
                          n, offset, self.filename)
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            data = file_size
        if data > offset:
            flags = BDRV_BLOCK_ZERO
            length = min(n, data - offset)
        else:
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
            flags = BDRV_BLOCK_DATA
            length = min(n, hole - offset)
        return Status(flags | BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_ALLOCATED, length, offset, self.filename)

    def close(self) -> None:
        self.f.close()


def probe_is_qcow2(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == QCOW_MAGIC
    except OSError as e:
        raise FormatError(f"could not open backing file: {e.strerror}", path) from None


def open_raw(path: str) -> RawLayer:
    try:
        f = open(path, "rb")  # noqa: SIM115 - owned by the layer
    except OSError as e:
        raise FormatError(f"could not open backing file: {e.strerror}", path) from None
    return RawLayer(path, f)


def backing_kind(path: str, backing_format: str | None) -> str:
    """"qcow2" or "raw" for the backing file at ``path`` (see the module doc)."""
    if backing_format is None:
        return "qcow2" if probe_is_qcow2(path) else "raw"
    if backing_format not in ("qcow2", "raw"):
        raise UnsupportedFeature(f"backing format {backing_format}")
    if not os.path.exists(path):
        raise FormatError("could not open backing file: No such file or directory", path)
    return backing_format
