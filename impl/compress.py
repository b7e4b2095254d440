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
            import zstandard

            out = zstandard.ZstdDecompressor().decompressobj().decompress(stream)
            if len(out) != cluster_size:
                raise CorruptionError("zstd cluster does not decode to one cluster")
            return out
        z = zlib.decompressobj(-15)
        out = z.decompress(stream, cluster_size)
    except (zlib.error, ValueError) as e:
        raise CorruptionError(f"compressed cluster does not decode: {e}") from None
    except Exception as e:  # zstandard.ZstdError, imported lazily
        raise CorruptionError(f"compressed cluster does not decode: {e}") from None
    if len(out) < cluster_size:
        raise CorruptionError("deflate cluster decodes short")
    return out
