"""Compressed clusters (qcow2.rst "Compressed Clusters Descriptor"; block/qcow2-threads.c).

QEMU's "zlib" is raw deflate without a header, written with a 4 KiB window (windowBits -12,
memLevel 9, default level: qcow2_zlib_compress); it is read back with the largest window,
which accepts any raw deflate stream. zstd is one frame at zstd's default level
(qcow2_zstd_compress). Bytes after the end of a stream (the next compressed cluster, or
padding up to the sector) are ignored by both decoders, as in QEMU.
"""

from __future__ import annotations

import zlib

from spec.errors import CorruptionError
from spec.features import CompressionType

ZSTD_LEVEL = 3


def deflate(data: bytes | memoryview, ctype: CompressionType, limit: int) -> bytes | None:
    """The compressed form of one cluster, or None when it is longer than ``limit`` (QEMU
    then writes the cluster uncompressed: qcow2_co_pwritev_compressed_task)."""
    if ctype is CompressionType.ZSTD:
        import zstandard

        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(bytes(data))
    else:
        z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
        packed = z.compress(data) + z.flush()
    return None if len(packed) > limit else packed


def inflate(stream: bytes, ctype: CompressionType, cluster_size: int) -> bytes:
    """One cluster out of ``stream``; CorruptionError when it does not decode to exactly a
    cluster (QEMU: -EIO, the image is not flagged)."""
    try:
        if ctype is CompressionType.ZSTD:
            return _zstd_cluster(stream, cluster_size)
        z = zlib.decompressobj(-15)
        out = z.decompress(stream, cluster_size)
    except (zlib.error, ValueError) as e:
        raise CorruptionError(f"compressed cluster does not decode: {e}") from None
    except Exception as e:  # zstandard.ZstdError, imported lazily
        raise CorruptionError(f"compressed cluster does not decode: {e}") from None
    if len(out) < cluster_size:
        raise CorruptionError("deflate cluster decodes short")
    return out


def _zstd_cluster(stream: bytes, cluster_size: int) -> bytes:
    """Exactly one cluster out of one or more zstd frames, never holding more than a
    cluster and a byte of output whatever the frames claim. QEMU decodes into a buffer of
    one cluster and fails the read (-EIO) when a frame still has output once the buffer is
    full, or when the input ends first (block/qcow2-threads.c qcow2_zstd_decompress);
    bytes after the last frame needed are ignored."""
    import zstandard

    out = bytearray()
    src = stream
    while len(out) < cluster_size:
        need = cluster_size - len(out)
        reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=False)
        got = reader.read(need + 1)
        if len(got) > need:
            raise CorruptionError("zstd cluster decodes to more than one cluster")
        if not got:
            raise CorruptionError("zstd cluster decodes short")
        out += got
        if len(out) < cluster_size:
            # The next frame starts where this one ends: decode it once more, its output
            # now known to fit, to learn its length.
            d = zstandard.ZstdDecompressor().decompressobj()
            d.decompress(src)
            src = d.unused_data
    return bytes(out)
