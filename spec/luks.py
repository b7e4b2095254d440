"""The LUKS1 partition header that a LUKS-encrypted qcow2 image carries (crypt_method = 2).

qcow2.rst "Full disk encryption header pointer" says where the header lives: the crypto header
extension holds its offset and length in the image file. The layout is the LUKS1 on-disk format
(cryptsetup's docs/on-disk-format.pdf, version 1.2.1), which QEMU implements in
crypto/block-luks.c. Everything is big-endian and the whole header is 592 bytes.

The schemas cover the whole LUKS area: the header (LuksHeader), its key slot descriptors
(LuksKeySlot), each slot's anti-forensic split key material (LuksKeyMaterial) and the area
around them (LuksArea). What is interpreted here is what needs no key, as for ``qemu-img
info``: QEMU parses and sanity-checks the header even when it opens an image without the key
(BDRV_O_NO_IO / QCRYPTO_BLOCK_OPEN_NO_IO), and reports the algorithms, offsets and key slots it
found (qcrypto_block_luks_get_info). Unlocking a slot, the payload ciphers and creating a header
are spec/encryption.py's.

Error classes: a header that breaks the format (bad magic, slots overlapping each other or the
payload, a malformed cipher mode string) is FormatError; a well-formed header naming an
algorithm QEMU 7.2 does not know is UnsupportedFeature.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import construct as c

from spec import header as hd
from spec.errors import FormatError, UnsupportedFeature
from spec.image import parse

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_VERSION = 1
LUKS_HEADER_SIZE = 592
LUKS_NUM_KEY_SLOTS = 8
LUKS_SECTOR_SIZE = 512
"""Offsets in the header count 512-byte sectors (QCRYPTO_BLOCK_LUKS_SECTOR_SIZE)."""
LUKS_KEY_SLOT_OFFSET = 4096
"""Key material is aligned to this many bytes (QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET)."""
LUKS_KEY_SLOT_DISABLED = 0x0000DEAD
LUKS_KEY_SLOT_ENABLED = 0x00AC71F3

LuksKeySlot = c.Struct(
    "active" / c.Int32ub * "0x00AC71F3 enabled, 0x0000DEAD disabled; anything else is corrupt.",
    "iterations" / c.Int32ub * "PBKDF2 iterations for this slot's passphrase.",
    "salt" / c.Bytes(32) * "PBKDF2 salt for this slot.",
    "key_material_offset" / c.Int32ub * "Start sector of the slot's anti-forensic split key material.",
    "stripes" / c.Int32ub * "Number of anti-forensic stripes (4000 when QEMU or cryptsetup write it).",
)
"""One 48-byte key slot descriptor."""

LuksHeader = c.Struct(
    "magic" / c.Const(LUKS_MAGIC) * 'LUKS magic "LUKS\\xba\\xbe".',
    "version" / c.Int16ub * "LUKS version; QEMU reads only version 1.",
    "cipher_name" / c.Bytes(32) * 'Cipher name, NUL-terminated ("aes", "serpent", "twofish", "cast5").',
    "cipher_mode" / c.Bytes(32)
    * 'Cipher mode "<mode>-<ivgen>[:<ivhash>]", NUL-terminated ("xts-plain64", "cbc-essiv:sha256").',
    "hash_spec" / c.Bytes(32) * 'PBKDF2 and anti-forensic hash, NUL-terminated ("sha256").',
    "payload_offset" / c.Int32ub * "Start sector of the encrypted payload.",
    "key_bytes" / c.Int32ub * "Master key length in bytes (twice the cipher key length for XTS).",
    "mk_digest" / c.Bytes(20) * "PBKDF2 digest of the master key, to recognise the right key.",
    "mk_digest_salt" / c.Bytes(32) * "Salt of the master key digest.",
    "mk_digest_iter" / c.Int32ub * "PBKDF2 iterations of the master key digest.",
    "uuid" / c.Bytes(40) * "Partition UUID as ASCII text, NUL-padded.",
    "key_slots" / c.Array(LUKS_NUM_KEY_SLOTS, LuksKeySlot) * "The eight key slot descriptors.",
)
"""The LUKS1 partition header (592 bytes, QCryptoBlockLUKSHeader in crypto/block-luks.c)."""


def _material_padding(ctx: c.Container) -> int:
    p = ctx._params
    return _splitkey_sectors(p.key_bytes, p.stripes) * LUKS_SECTOR_SIZE - p.key_bytes * p.stripes


LuksKeyMaterial = c.Struct(
    "stripes" / c.Array(c.this._params.stripes, c.Bytes(c.this._params.key_bytes))
    * "The slot's `stripes` anti-forensic stripes of `key_bytes` each, encrypted as one run of "
    "512-byte sectors numbered from 0 with the payload cipher, keyed by PBKDF2 of the passphrase "
    "(the slot's salt and iterations). Decrypted, stripes 0 to n-2 are random and the last is "
    "chosen so that the AF merge (xor each stripe into a running block, diffusing the block with "
    "the header's hash after every stripe but the last) gives the master key.",
    "padding" / c.Bytes(_material_padding)
    * "Zeros up to the next 4 KiB boundary, where the next slot's area starts (cryptsetup's "
    "rounding, which QEMU follows).",
)
"""One key slot's key material at key_material_offset sectors into the LUKS area. Parse with
``stripes=`` and ``key_bytes=`` (the header's values) as construct context parameters."""

LuksArea = c.Struct(
    "phdr" / LuksHeader * "The LUKS partition header.",
    "phdr_padding" / c.Bytes(LUKS_KEY_SLOT_OFFSET - LUKS_HEADER_SIZE)
    * "Zeros up to 4 KiB, where key material may start.",
    "key_material_areas" / c.Bytes(lambda ctx: max(ctx.phdr.payload_offset * LUKS_SECTOR_SIZE
                                                  - LUKS_KEY_SLOT_OFFSET, 0))
    * "The eight slots' key material areas back to back, each rounded up to 4 KiB; an inactive "
    "slot's area is zeros. Ends at payload_offset, which in qcow2 is the area's length.",
)
"""The whole LUKS area in a qcow2 file: at the crypto header extension's offset, as long as
its length (QEMU: payload_offset * 512 bytes, in clusters of their own)."""

# QAPI enum names (qapi/crypto.json) of the algorithms QEMU 7.2's LUKS driver maps.
CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")
"""QCryptoCipherMode."""
IVGEN_ALGS = ("plain", "plain64", "essiv")
"""QCryptoIVGenAlgorithm."""
HASH_DIGEST_LEN = {"md5": 16, "sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64,
                   "ripemd160": 20}
"""QCryptoHashAlgorithm names and their digest lengths (crypto/hash.c)."""
LUKS_CIPHERS: dict[str, dict[int, str]] = {
    "aes": {16: "aes-128", 24: "aes-192", 32: "aes-256"},
    "cast5": {16: "cast5-128"},
    "serpent": {16: "serpent-128", 24: "serpent-192", 32: "serpent-256"},
    "twofish": {16: "twofish-128", 24: "twofish-192", 32: "twofish-256"},
}
"""LUKS cipher name -> key bytes -> QCryptoCipherAlgorithm (qcrypto_block_luks_cipher_name_map)."""

U32 = 0xFFFFFFFF
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class LuksInfo:
    """What QEMU reports about a LUKS header (QCryptoBlockInfoLUKS, qapi/crypto.json)."""

    cipher_alg: str
    cipher_mode: str
    ivgen_alg: str
    ivgen_hash_alg: str | None
    """Reported only with the essiv IV generator."""
    hash_alg: str
    payload_offset: int
    """In bytes."""
    master_key_iters: int
    uuid: bytes
    """The raw UUID text up to its first NUL (at most 40 bytes)."""
    slots: tuple[LuksSlotInfo, ...]


@dataclass(frozen=True)
class LuksSlotInfo:
    """QCryptoBlockInfoLUKSSlot: iterations and stripes are reported for active slots only."""

    active: bool
    iters: int | None
    stripes: int | None
    key_offset: int
    """In bytes."""


def parse_luks_header(raw: bytes) -> c.Container:
    """Parse 592 header bytes; a wrong magic or short buffer is FormatError naming the field."""
    if len(raw) < LUKS_HEADER_SIZE:
        raise FormatError(f"LUKS header needs {LUKS_HEADER_SIZE} bytes, got {len(raw)}", "luks")
    return parse(LuksHeader, raw[:LUKS_HEADER_SIZE], "luks")


def _field_string(h: c.Container, name: str) -> bytes:
    """A NUL-terminated name field; check_luks_header made sure the NUL is there."""
    return bytes(h[name]).split(b"\0", 1)[0]


def _name(value: bytes, table: tuple[str, ...] | dict[str, Any], what: str) -> str:
    """QAPI enum lookup (qapi_enum_parse): an exact, case-sensitive match or UnsupportedFeature."""
    text = value.decode("latin-1")
    if text not in table:
        raise UnsupportedFeature(f"LUKS {what} {text!r}")
    return text


LUKS_STRIPES = 4000
"""The only anti-forensic stripe count QEMU 7.2 accepts (as cryptsetup writes it)."""
HEADER_SECTORS = LUKS_KEY_SLOT_OFFSET // LUKS_SECTOR_SIZE


def _splitkey_sectors(key_bytes: int, stripes: int) -> int:
    """Sectors of one slot's key material, rounded to the 4 KiB key slot alignment.

    qcrypto_block_luks_splitkeylen_sectors follows cryptsetup rather than the spec's formula.
    The product key_bytes * stripes is taken in 32-bit unsigned arithmetic there, so it wraps;
    we reproduce the wrap so the checks below accept and refuse what QEMU does.
    """
    splitkeylen = (key_bytes * stripes) & U32
    sectors = -(-splitkeylen // LUKS_SECTOR_SIZE)
    return -(-sectors // HEADER_SECTORS) * HEADER_SECTORS


def _ranges_overlap(first1: int, len1: int, first2: int, len2: int) -> bool:
    """include/qemu/range.h ranges_overlap, in its uint64 arithmetic (a zero length wraps)."""
    last1 = (first1 + len1 - 1) & U64
    last2 = (first2 + len2 - 1) & U64
    return not (last2 < first1 or last1 < first2)


def check_luks_header(h: c.Container) -> None:
    """QEMU 7.2's sanity checks, in its order (crypto/block-luks.c, qcrypto_block_luks_check_header).

    The magic is checked by the schema. Then: version 1; the three name fields NUL-terminated
    within their 32 bytes; the payload after the 4 KiB header area; a non-zero master key
    iteration count; and for each slot: exactly 4000 stripes, a valid state, iterations when
    active, key material after the header area, ending before the payload (32-bit unsigned
    sum, as in QEMU) and overlapping no other slot.
    """
    if h.version != LUKS_VERSION:
        raise UnsupportedFeature(f"LUKS version {h.version}")
    for name in ("cipher_name", "cipher_mode", "hash_spec"):
        if b"\0" not in bytes(h[name]):
            raise FormatError("string is not NUL-terminated", f"luks.{name}")
    if h.payload_offset < HEADER_SECTORS:
        raise FormatError("payload overlaps the LUKS header", "luks.payload_offset")
    if h.mk_digest_iter == 0:
        raise FormatError("master key iteration count is zero", "luks.mk_digest_iter")
    slots = h.key_slots
    for i, s1 in enumerate(slots):
        where = f"luks.key_slots[{i}]"
        start1 = s1.key_material_offset
        len1 = _splitkey_sectors(h.key_bytes, s1.stripes)
        if s1.stripes != LUKS_STRIPES:
            raise FormatError(f"key slot has {s1.stripes} stripes, not {LUKS_STRIPES}", f"{where}.stripes")
        if s1.active not in (LUKS_KEY_SLOT_DISABLED, LUKS_KEY_SLOT_ENABLED):
            raise FormatError("key slot state is corrupted", f"{where}.active")
        if s1.active == LUKS_KEY_SLOT_ENABLED and s1.iterations == 0:
            raise FormatError("active key slot with zero iterations", f"{where}.iterations")
        if start1 < HEADER_SECTORS:
            raise FormatError("key slot overlaps the LUKS header", f"{where}.key_material_offset")
        if (start1 + len1) & U32 > h.payload_offset:
            raise FormatError("key slot overlaps the encrypted payload", f"{where}.key_material_offset")
        for j in range(i + 1, LUKS_NUM_KEY_SLOTS):
            len2 = _splitkey_sectors(h.key_bytes, slots[j].stripes)
            if _ranges_overlap(start1, len1, slots[j].key_material_offset, len2):
                raise FormatError(f"key slots {i} and {j} overlap", f"{where}.key_material_offset")


def _essiv_ok(cipher_alg: str, key_len: int, ivhash: str) -> bool:
    """qcrypto_block_luks_essiv_cipher: ESSIV needs a cipher whose key fits the hash digest.

    The digest may match the block cipher's own key length, or, for the AES, Serpent and
    Twofish families, the key length of another member of the family (16, 24 or 32 bytes).
    """
    digest = HASH_DIGEST_LEN[ivhash]
    if digest == key_len:
        return True
    family = cipher_alg.split("-")[0]
    return family in ("aes", "serpent", "twofish") and digest in (16, 24, 32)


def luks_info(raw: bytes) -> LuksInfo:
    """Parse, check and interpret a LUKS header as QEMU does when it opens the image.

    The order of the checks is QEMU's (qcrypto_block_luks_open with NO_IO: load, check, parse
    the header), so the first error found is the one QEMU would report.
    """
    h = parse_luks_header(raw)
    check_luks_header(h)
    # qcrypto_block_luks_parse_header: "<mode>-<ivgen>[:<ivhash>]".
    mode_spec = _field_string(h, "cipher_mode")
    mode_name, dash, ivgen_part = mode_spec.partition(b"-")
    if not dash:
        raise FormatError("cipher mode is not of the form <mode>-<ivgen>", "luks.cipher_mode")
    ivgen_name, colon, ivhash_name = ivgen_part.partition(b":")
    ivhash = _name(ivhash_name, HASH_DIGEST_LEN, "IV generator hash") if colon else None
    cipher_mode = _name(mode_name, CIPHER_MODES, "cipher mode")
    cipher_name = _field_string(h, "cipher_name").decode("latin-1")
    # XTS uses two keys of half the master key each (qcrypto_block_luks_cipher_name_lookup).
    key_len = h.key_bytes // 2 if cipher_mode == "xts" else h.key_bytes
    cipher_alg = LUKS_CIPHERS.get(cipher_name, {}).get(key_len)
    if cipher_alg is None:
        raise UnsupportedFeature(f"LUKS cipher {cipher_name!r} with {key_len}-byte keys")
    hash_alg = _name(_field_string(h, "hash_spec"), HASH_DIGEST_LEN, "hash algorithm")
    ivgen_alg = _name(ivgen_name, IVGEN_ALGS, "IV generator")
    if ivgen_alg == "essiv":
        if ivhash is None:
            raise FormatError("essiv IV generator without a hash", "luks.cipher_mode")
        if not _essiv_ok(cipher_alg, key_len, ivhash):
            raise UnsupportedFeature(f"LUKS cipher {cipher_alg} with essiv:{ivhash}")
    uuid = bytes(h.uuid).split(b"\0", 1)[0]
    slots = tuple(
        LuksSlotInfo(
            active=s.active == LUKS_KEY_SLOT_ENABLED,
            iters=s.iterations if s.active == LUKS_KEY_SLOT_ENABLED else None,
            stripes=s.stripes if s.active == LUKS_KEY_SLOT_ENABLED else None,
            key_offset=s.key_material_offset * LUKS_SECTOR_SIZE,
        )
        for s in h.key_slots
    )
    return LuksInfo(
        cipher_alg=cipher_alg,
        cipher_mode=cipher_mode,
        ivgen_alg=ivgen_alg,
        # Only essiv reports its hash; with plain/plain64 a ":hash" suffix is parsed and ignored.
        ivgen_hash_alg=ivhash if ivgen_alg == "essiv" else None,
        hash_alg=hash_alg,
        payload_offset=h.payload_offset * LUKS_SECTOR_SIZE,
        master_key_iters=h.mk_digest_iter,
        uuid=uuid,
        slots=slots,
    )


def read_luks_header(img: Any) -> bytes:
    """The raw LUKS header of an opened qcow2 image (a spec.image.ImageFile).

    Checks follow block/qcow2.c: the header must start on a cluster boundary
    (qcow2_read_extensions) and the 592 bytes QEMU reads must lie inside the length the
    extension declares (qcow2_crypto_hdr_read_func). Past the end of the file QEMU's file
    driver reads zeros, and so do we.
    """
    ext = img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    if ext is None:
        raise FormatError("LUKS encryption without a full disk encryption header pointer", "extensions")
    ptr = ext.data
    if ptr.offset % img.cluster_size:
        raise FormatError("encryption header offset is not cluster aligned",
                          "extensions.crypto_header.offset")
    if ptr.length < LUKS_HEADER_SIZE:
        raise FormatError("LUKS header extends past the declared encryption header length",
                          "extensions.crypto_header.length")
    try:
        data = os.pread(img.f.fileno(), LUKS_HEADER_SIZE, ptr.offset)
    except (OSError, OverflowError) as e:
        raise FormatError(f"cannot read the LUKS header: {e}", "luks") from None
    return data + b"\0" * (LUKS_HEADER_SIZE - len(data))
