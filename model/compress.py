"""Compressed clusters (qcow2.rst "Compressed Clusters Descriptor", "compression_type";
block/qcow2-threads.c qcow2_zlib_compress/decompress and qcow2_zstd_compress/decompress).

"zlib" in QEMU's naming is raw deflate (RFC 1951) with no zlib header. QEMU writes it with
a 4 KiB window (windowBits -12, memLevel 9, default level); the model compresses with the
same parameters so that it produces the same bytes, and decompresses with the largest
window (-15), which accepts any deflate stream. zstd is one frame at the default level.

A compressed cluster must decompress to exactly one cluster. The descriptor's sector count
may cover bytes after the end of the stream (the next compressed cluster's data, or
padding); decoders stop at the end of the stream and ignore them, as QEMU's do.

Errors: CorruptionError when the stream does not decode to a full cluster (QEMU returns
-EIO for the request and does not set the corrupt bit; neither does the model).
"""

from __future__ import annotations

import zlib

import zstandard

from spec.errors import CorruptionError
from spec.features import CompressionType


def compress(data: bytes, ctype: CompressionType, limit: int) -> bytes | None:
    """Compressed ``data``, or None when it would not be shorter than ``limit`` bytes
    (QEMU then writes the cluster uncompressed: qcow2_co_pwritev_compressed_task)."""
    if ctype is CompressionType.ZSTD:
        out = zstandard.ZstdCompressor(level=3).compress(data)
    else:
        co = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        out = co.compress(data) + co.flush()
    return out if len(out) <= limit else None


def decompress(data: bytes, ctype: CompressionType, cluster_size: int) -> bytes:
    """The cluster that ``data`` (a compressed stream, possibly followed by junk) encodes."""
    try:
        if ctype is CompressionType.ZSTD:
            out = _zstd_frames(data, cluster_size)
        else:
            d = zlib.decompressobj(-15)
            out = d.decompress(data, cluster_size)
    except (zlib.error, zstandard.ZstdError) as e:
        raise CorruptionError(f"compressed cluster does not decode: {e}") from None
    if len(out) < cluster_size or (ctype is CompressionType.ZSTD and len(out) > cluster_size):
        raise CorruptionError("compressed cluster does not decode to exactly one cluster")
    return out[:cluster_size]


def _zstd_frames(data: bytes, cluster_size: int) -> bytes:
    """What the frames at the start of ``data`` decode to, stopping at one cluster and a
    byte: QEMU decodes into a one-cluster buffer, so a frame with more output, however
    much it claims, only fails the read (block/qcow2-threads.c qcow2_zstd_decompress)."""
    out = b""
    while len(out) < cluster_size:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        got = reader.read(cluster_size - len(out) + 1)
        out += got
        if not got or len(out) >= cluster_size:
            break
        d = zstandard.ZstdDecompressor().decompressobj()  # where the next frame starts
        d.decompress(data)
        data = d.unused_data
    return out
