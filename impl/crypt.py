"""Encrypted images in the impl: the cipher plumbing between the request code and
spec/encryption.py, which owns the ciphers, the LUKS key slots and the sector numbering.

An encrypted image (crypt_method 1, legacy AES, or 2, LUKS) is opened as
image.EncryptedImage, which has none of Image's hot paths (the host bytes are ciphertext)
and routes its requests through here:

- reads: every host-contiguous run of NORMAL data is read in one host request, as on a
  plain image, and decrypted (read_data); a run that does not start or end on a 512-byte
  sector (a plain overlay reading an encrypted backing file at any offset) reads the
  sectors around it. Zero, unallocated and compressed clusters are never decrypted
  (spec CRYPT-ZERO, CRYPT-COMPRESSED).
- writes: the request is widened to whole sectors first, the edges filled with what they
  read as now (block/io.c pads requests to the driver's request alignment, 512 bytes on an
  encrypted image: qcow2_refresh_limits); cluster.py then encrypts whatever it writes to a
  data cluster, the COW regions included, for the host offset it lands at, and never
  zeroes COW regions on the host instead of writing them (block/qcow2.c
  qcow2_co_pwritev_task and handle_alloc_space; block/qcow2-cluster.c perform_cow, which
  reads the COW regions as plaintext and encrypts them for the new cluster).
- zero writes: the partial sectors at either end are written as zero data, the whole
  sectors between zeroed as on a plain image (write_zeroes, block/io.c
  bdrv_co_do_zero_pwritev).

Nothing here touches a plain image: Image never calls it, and cluster.py and status.py ask
only ``s.crypto is None``.

Errors: what spec.encryption.image_crypto raises at open (RequestError without a key or
with one that is not text, WrongKey, FormatError for a damaged LUKS header,
UnsupportedFeature for an algorithm the cryptography package lacks).
"""

from __future__ import annotations

from typing import Any

from impl import cluster as cl
from impl.hostfile import HostFile
from impl.state import ImageView
from spec import encryption as enc
from spec.encryption import SECTOR_SIZE, Qcow2Crypto
from spec.errors import RequestError
from spec.geometry import align_down, align_up
from spec.image import ImageFile

KEY_OPTIONS = ("key_secret", "backing_key_secret")
"""QEMU's ``encrypt.key-secret`` and ``backing.encrypt.key-secret`` (the secrets' data): the
first unlocks this image, the second every encrypted image below it, as in the model."""


def check_keys(options: dict[str, Any]) -> None:
    """RequestError unless each key option given is text or bytes (checked before the file
    is opened, as the model checks it)."""
    for name in KEY_OPTIONS:
        v = options.get(name)
        if v is not None and not isinstance(v, (bytes, str)):
            raise RequestError("key_secret and backing_key_secret must be bytes or str")


def unlock(img: ImageFile, key_secret: bytes | str | None) -> Qcow2Crypto | None:
    """The image's payload cipher, or None for a plain image (a key given for one is
    ignored, as QEMU ignores encrypt.key-secret there). qcow2_do_open sets the cipher up
    before anything reads guest data."""
    if not img.header.crypt_method:
        return None
    return enc.image_crypto(img, key_secret)


def read_data(crypto: Qcow2Crypto, target: HostFile, buf: memoryview, host: int, guest: int) -> None:
    """Fill ``buf`` with the plaintext of the data at ``host`` (guest offset ``guest``): one
    host read, of the whole sectors around the range (host and guest offsets agree modulo
    the cluster size, so one head serves both)."""
    n = len(buf)
    head = host % SECTOR_SIZE
    if not head and not n % SECTOR_SIZE:
        target.preadv_into([buf], host)
        buf[:] = crypto.decrypt(host, guest, bytes(buf))
        return
    raw = target.pread(host - head, align_up(head + n, SECTOR_SIZE))
    buf[:] = crypto.decrypt(host - head, guest - head, raw)[head:head + n]


def write(img: ImageView, offset: int, data: memoryview) -> None:
    """A guest write widened to whole sectors, the edges keeping what they read as
    (bdrv_co_pwritev_part's padding), then cluster.write (which encrypts)."""
    end = offset + len(data)
    start, stop = align_down(offset, SECTOR_SIZE), align_up(end, SECTOR_SIZE)
    if start < offset and end < stop and stop - start <= 2 * SECTOR_SIZE:
        # Both edges within one or two sectors: one read of them (bdrv_init_padding's
        # merge_reads), else each edge sector alone (bdrv_padding_rmw_read).
        old = bytearray(img.read_internal(start, stop - start))
        old[offset - start:end - start] = data
        data = memoryview(old)
    elif start < offset or end < stop:
        head = img.read_internal(start, offset - start) if offset > start else b""
        tail = img.read_internal(end, stop - end) if stop > end else b""
        data = memoryview(head + bytes(data) + tail)
    cl.write(img, start, data)


def write_zeroes(img: ImageView, offset: int, n: int, unmap: bool) -> None:
    """bdrv_co_do_zero_pwritev on an encrypted image: the partial head sector is written as
    zero data first, then the whole sectors between are zeroed (cluster.write_zeroes), then
    the partial tail sector is written, after the middle as in QEMU (zeroing the middle asks
    whether the rest of its last subcluster reads as zeros, and the tail sector may lie
    there). A request whose padded span is one sector, or two with both edges partial, is
    one data write."""
    end = offset + n
    start_al, end_al = align_up(offset, SECTOR_SIZE), align_down(end, SECTOR_SIZE)
    head, tail = offset % SECTOR_SIZE, -end % SECTOR_SIZE
    padded = align_up(end, SECTOR_SIZE) - align_down(offset, SECTOR_SIZE)
    if (head or tail) and (padded == SECTOR_SIZE or (head and tail and padded == 2 * SECTOR_SIZE)):
        write(img, offset, memoryview(bytes(n)))
        return
    if head:
        write(img, offset, memoryview(bytes(start_al - offset)))
    if end_al > start_al:
        cl.write_zeroes(img, start_al, end_al - start_al, unmap)
    if tail:
        write(img, end_al, memoryview(bytes(end - end_al)))
