"""Encryption of guest data in qcow2: the payload ciphers, the LUKS1 key-slot mechanics and
legacy AES-CBC (crypt_method 1), as QEMU 7.2 implements them.

Where the facts come from (QEMU is GPL: facts only, nothing copied):
- crypto/block-luks.c: unlocking a key slot (qcrypto_block_luks_load_key), trying every slot
  (qcrypto_block_luks_find_key), creating a header (qcrypto_block_luks_create), the ESSIV
  cipher choice (qcrypto_block_luks_essiv_cipher).
- crypto/afsplit.c: the anti-forensic split and merge, with the hash diffusion.
- crypto/ivgen-plain.c, ivgen-plain64.c, ivgen-essiv.c: the IV generators.
- crypto/block.c: the per-sector helper (do_qcrypto_block_cipher_encdec): the cipher is
  re-keyed with a fresh IV for every 512-byte sector, so CBC chains and CTR counters restart
  at each sector, and XTS takes the IV as its tweak.
- crypto/block-qcow.c: legacy AES: the first 16 bytes of the passphrase, zero-padded, are the
  AES-128 key; CBC with plain64 IVs over 512-byte sectors.
- block/qcow2.c (qcow2_co_encdec): the sector number of a guest data sector is its *host*
  file offset / 512 for LUKS (``crypt_physical_offset``) and its *guest* offset / 512 for
  legacy AES. So the same plaintext at the same guest offset encrypts differently in two
  LUKS images with different cluster layouts, and moving an encrypted cluster (COW,
  compaction) means decrypting and re-encrypting it. block/qcow2-cluster.c
  (perform_cow) reads the COW regions as plaintext and encrypts them for the new host offset.

Ciphers, hashes and PBKDF2 are the ``cryptography`` package's; nothing here is a hand-written
cipher. What QEMU 7.2 accepts but ``cryptography`` lacks (Serpent, Twofish, AES-192 in XTS
mode, the RIPEMD-160 hash) is UnsupportedFeature naming the algorithm. ``cryptography`` is
imported lazily, so ``import spec.encryption`` (the renderer does) stays cheap.

Errors:
- RequestError: no key given, a key that is not UTF-8 (QEMU's secrets are UTF-8 strings), a
  create option QEMU refuses.
- WrongKey (a RequestError): the passphrase unlocks no active key slot. LUKS1 has one check,
  the master key digest, so a damaged key slot's key material is indistinguishable from a
  wrong passphrase and gives the same error (QEMU: "Invalid password, cannot unlock any
  keyslot").
- FormatError: a damaged or truncated LUKS header (spec.luks.luks_info), key material outside
  the area the header extension declares (QEMU: "Request for data outside of extension
  header") or past the end of the file (QEMU would read zeros, then fail to unlock; we say
  what is wrong, as spec/image.py does for every structure past the end of the file).
- UnsupportedFeature: an algorithm QEMU knows and ``cryptography`` does not; an iteration
  count above MAX_PBKDF2_ITERATIONS.
"""

from __future__ import annotations

import hmac
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spec import header as hd
from spec import luks as lk
from spec.errors import FormatError, RequestError, UnsupportedFeature, WrongKey
from spec.image import QCOW_CRYPT_AES, QCOW_CRYPT_LUKS

if TYPE_CHECKING:
    from spec.image import ImageFile

SECTOR_SIZE = 512
"""Encryption works on 512-byte sectors, in LUKS (QCRYPTO_BLOCK_LUKS_SECTOR_SIZE) and legacy
AES (QCRYPTO_BLOCK_QCOW_SECTOR_SIZE) alike; an encrypted image's request alignment is this."""
LUKS_DIGEST_LEN = 20
"""Bytes of the master key digest (QCRYPTO_BLOCK_LUKS_DIGEST_LEN)."""
LUKS_SALT_LEN = 32
"""Bytes of every PBKDF2 salt in the header (QCRYPTO_BLOCK_LUKS_SALT_LEN)."""
LUKS_MIN_SLOT_KEY_ITERS = 1000
"""QEMU never writes fewer PBKDF2 iterations for a key slot (QCRYPTO_BLOCK_LUKS_MIN_SLOT_KEY_ITERS)."""
LUKS_MIN_MASTER_KEY_ITERS = 1000
"""Nor for the master key digest (QCRYPTO_BLOCK_LUKS_MIN_MASTER_KEY_ITERS)."""
PBKDF2_ITERS_PER_SECOND = 1_000_000
"""qcow2lab's stand-in for QEMU's PBKDF2 benchmark (qcrypto_pbkdf2_count_iters). QEMU measures
how many iterations this machine does in a second and scales by iter_time; we assume this
many, so images are reproducible and create() costs no benchmark. A slot gets
iter_time * this / 1000 iterations and the master key digest an eighth of that (QEMU's and
cryptsetup's ratio), each at least 1000."""
MAX_PBKDF2_ITERATIONS = 1 << 26
"""Unlocking refuses a header asking for more (UnsupportedFeature), so that a hostile header
cannot make open() run for hours. QEMU has no limit; it writes about 2 million iterations
per slot at its default iter_time of 2 s on a fast machine."""
DEFAULT_ITER_TIME = 2000
"""Milliseconds of PBKDF2 per key slot when create() is not told (QEMU's default)."""

LEGACY_AES_KEY_LEN = 16
"""Legacy AES (crypt_method 1) keys AES-128 with the passphrase's first 16 bytes, zero-padded."""

# --- Algorithms --------------------------------------------------------------------------------

CIPHER_KEY_LEN = {
    "aes-128": 16, "aes-192": 24, "aes-256": 32, "cast5-128": 16,
    "serpent-128": 16, "serpent-192": 24, "serpent-256": 32,
    "twofish-128": 16, "twofish-192": 24, "twofish-256": 32,
}
"""Key bytes of each QCryptoCipherAlgorithm a LUKS header can name (crypto/cipher.c)."""
CIPHER_BLOCK_LEN = {alg: 8 if alg.startswith("cast5") else 16 for alg in CIPHER_KEY_LEN}
"""Block bytes: 8 for CAST5, 16 for the others. It is also the IV length of every mode but ECB."""
SUPPORTED_CIPHERS = ("aes-128", "aes-192", "aes-256", "cast5-128")
"""The cipher algorithms ``cryptography`` provides (CAST5 from its ``decrepit`` module).
Two modes of these are missing there as well: AES-192 in XTS and CAST5 in CTR."""
SUPPORTED_HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")
"""The hash algorithms ``cryptography`` provides; ripemd160 is missing from it."""


@dataclass(frozen=True)
class CipherSpec:
    """A payload cipher in QEMU's names: what a LUKS header or crypt_method 1 selects."""

    cipher_alg: str
    """QCryptoCipherAlgorithm of one key: ``aes-256`` (XTS uses two such keys)."""
    cipher_mode: str
    """ecb, cbc, xts or ctr."""
    ivgen_alg: str
    """plain, plain64 or essiv."""
    ivgen_hash_alg: str | None = None
    """The ESSIV hash; None for the other IV generators."""

    @property
    def key_bytes(self) -> int:
        """Master key length: the cipher's key length, doubled for XTS."""
        n = CIPHER_KEY_LEN[self.cipher_alg]
        return 2 * n if self.cipher_mode == "xts" else n

    @property
    def iv_len(self) -> int:
        """qcrypto_cipher_get_iv_len: no IV in ECB mode, one block otherwise."""
        return 0 if self.cipher_mode == "ecb" else CIPHER_BLOCK_LEN[self.cipher_alg]


LEGACY_AES = CipherSpec("aes-128", "cbc", "plain64")
"""crypt_method 1 (crypto/block-qcow.c)."""


def essiv_cipher_alg(cipher_alg: str, ivhash: str) -> str:
    """The cipher ESSIV encrypts sector numbers with (qcrypto_block_luks_essiv_cipher).

    It is keyed with the hash of the master key, so its key length must equal the digest
    length: the payload cipher itself if that fits, else the member of the same family (AES,
    Serpent, Twofish) whose key is as long as the digest. Anything else is refused
    (UnsupportedFeature, as spec.luks.luks_info refuses it).
    """
    digest = lk.HASH_DIGEST_LEN[ivhash]
    if CIPHER_KEY_LEN[cipher_alg] == digest:
        return cipher_alg
    family = cipher_alg.split("-")[0]
    if family in ("aes", "serpent", "twofish") and digest in (16, 24, 32):
        return f"{family}-{digest * 8}"
    raise UnsupportedFeature(f"LUKS cipher {cipher_alg} with essiv:{ivhash}")


def _require_cipher(alg: str, mode: str) -> None:
    if alg not in SUPPORTED_CIPHERS:
        raise UnsupportedFeature(f"cipher {alg}",
                                 f"unsupported feature: cipher {alg} (not in the cryptography package)")
    if mode == "ctr" and alg == "cast5-128":
        raise UnsupportedFeature(f"cipher {alg}-ctr",
                                 f"unsupported feature: cipher {alg}-ctr (OpenSSL has no CAST5-CTR)")
    if mode == "xts" and CIPHER_KEY_LEN[alg] == 24:
        raise UnsupportedFeature(f"cipher {alg}-xts",
                                 f"unsupported feature: cipher {alg}-xts (OpenSSL has no AES-192-XTS)")


def _require_hash(name: str) -> None:
    if name not in SUPPORTED_HASHES:
        raise UnsupportedFeature(f"hash {name}",
                                 f"unsupported feature: hash {name} (the cryptography package lacks it)")


def check_supported(spec: CipherSpec, hash_alg: str | None = None) -> None:
    """UnsupportedFeature unless every algorithm ``spec`` (and the PBKDF2/AF hash) needs is here."""
    _require_cipher(spec.cipher_alg, spec.cipher_mode)
    if spec.ivgen_alg == "essiv":
        if spec.ivgen_hash_alg is None:
            raise FormatError("essiv IV generator without a hash", "luks.cipher_mode")
        _require_hash(spec.ivgen_hash_alg)
        _require_cipher(essiv_cipher_alg(spec.cipher_alg, spec.ivgen_hash_alg), "ecb")
    if hash_alg is not None:
        _require_hash(hash_alg)


def _hash(name: str) -> Any:
    from cryptography.hazmat.primitives import hashes

    _require_hash(name)
    table: dict[str, Any] = {"md5": hashes.MD5, "sha1": hashes.SHA1, "sha224": hashes.SHA224,
                             "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
    return table[name]()


def _algorithm(alg: str, key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers import algorithms

    if alg.startswith("aes"):
        return algorithms.AES(key)
    if alg == "cast5-128":
        from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5

        return CAST5(key)
    raise UnsupportedFeature(f"cipher {alg}")


def digest(hash_alg: str, *parts: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes

    h = hashes.Hash(_hash(hash_alg))
    for p in parts:
        h.update(p)
    return bytes(h.finalize())


def pbkdf2(hash_alg: str, password: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC (qcrypto_pbkdf2), refusing counts over MAX_PBKDF2_ITERATIONS."""
    from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

    if iterations > MAX_PBKDF2_ITERATIONS:
        raise UnsupportedFeature(f"PBKDF2 with {iterations} iterations (limit {MAX_PBKDF2_ITERATIONS})")
    if iterations < 1:
        raise FormatError("PBKDF2 iteration count is zero", "luks")
    kdf = PBKDF2HMAC(algorithm=_hash(hash_alg), length=length, salt=salt, iterations=iterations)
    return bytes(kdf.derive(password))


# --- IV generators and the per-sector cipher ------------------------------------------------------


_CIPHERS: tuple[Any, Any, Any] | None = None


def _ciphers() -> tuple[Any, Any, Any]:
    """(Cipher, modes, UnsupportedAlgorithm) of ``cryptography``, imported at the first use
    and kept: an import statement per sector costs as much as the cipher call."""
    global _CIPHERS
    if _CIPHERS is None:
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives.ciphers import Cipher, modes

        _CIPHERS = (Cipher, modes, UnsupportedAlgorithm)
    return _CIPHERS


class SectorCipher:
    """A payload cipher keyed once, applied to runs of 512-byte sectors.

    Each sector is processed alone with the IV its number gives (crypto/block.c): CBC chains
    and CTR counters restart at every sector and XTS uses the IV as the sector's tweak. Sector
    numbers are taken modulo 2**64 (plain64, essiv) or 2**32 (plain), little-endian, zero-padded
    to the IV length.

    Speed (a cipher context costs tens of microseconds to set up, a 512-byte update a few):
    ECB and the ESSIV IVs go through one long-lived ECB context per direction, a whole run in
    one call; CBC through one long-lived CBC context, whose chaining value is known (the last
    ciphertext block it saw), so each sector's IV is applied by adjusting the first block:
    encryption XORs (IV ^ chaining value) into the first plaintext block of each sector (one
    update per sector, CBC being sequential), decryption decrypts the whole run in one update
    and XORs (previous ciphertext block ^ IV) into the first plaintext block of each sector.
    XTS and CTR take a new context per sector: the ``cryptography`` package fixes the tweak or
    counter when a context is made.
    """

    def __init__(self, spec: CipherSpec, key: bytes) -> None:
        check_supported(spec)
        if len(key) != spec.key_bytes:
            raise RequestError(f"{spec.cipher_alg}-{spec.cipher_mode} needs a {spec.key_bytes}-byte key")
        self.spec = spec
        self.key = key
        self._essiv: Any = None
        if spec.ivgen_alg == "essiv":
            assert spec.ivgen_hash_alg is not None  # check_supported refused it otherwise
            ivalg = essiv_cipher_alg(spec.cipher_alg, spec.ivgen_hash_alg)
            # ivgen-essiv.c: the ESSIV key is the hash of the whole master key (both XTS
            # halves), cut to the ESSIV cipher's key length.
            salt = digest(spec.ivgen_hash_alg, key)[:CIPHER_KEY_LEN[ivalg]]
            self._essiv = (_algorithm(ivalg, salt), CIPHER_BLOCK_LEN[ivalg])
        elif spec.ivgen_alg not in ("plain", "plain64"):
            raise UnsupportedFeature(f"IV generator {spec.ivgen_alg}")
        self._algorithm = _algorithm(spec.cipher_alg, key)
        self._block = CIPHER_BLOCK_LEN[spec.cipher_alg]
        self._essiv_ctx: Any = None
        self._ecb: dict[bool, Any] = {}
        self._cbc: dict[bool, tuple[Any, bytes]] = {}
        """encrypt -> (long-lived CBC context, the chaining value it holds now)."""

    def iv(self, sector: int) -> bytes:
        """The IV of one sector (crypto/ivgen-*.c)."""
        return self._ivs(sector, 1)[0]

    def _ivs(self, first_sector: int, count: int) -> list[bytes]:
        """The IVs of ``count`` sectors from ``first_sector``; ESSIV's in one ECB call."""
        n = self.spec.iv_len
        if self.spec.ivgen_alg == "plain":
            return [((first_sector + i) & 0xFFFFFFFF).to_bytes(4, "little")[:n].ljust(n, b"\0")
                    for i in range(count)]
        mask = (1 << 64) - 1
        if self._essiv is None:
            return [((first_sector + i) & mask).to_bytes(8, "little")[:n].ljust(n, b"\0")
                    for i in range(count)]
        alg, block = self._essiv
        if self._essiv_ctx is None:
            self._essiv_ctx = self._context(alg, None, True)
        plain = b"".join(((first_sector + i) & mask).to_bytes(8, "little")[:block].ljust(block, b"\0")
                         for i in range(count))
        enc = self._essiv_ctx.update(plain)
        return [enc[i * block:i * block + block][:n].ljust(n, b"\0") for i in range(count)]

    def _mode(self, iv: bytes) -> Any:
        modes = _ciphers()[1]
        mode = self.spec.cipher_mode
        if mode == "ecb":
            return modes.ECB()
        if mode == "cbc":
            return modes.CBC(iv)
        if mode == "ctr":
            return modes.CTR(iv)
        if mode == "xts":
            return modes.XTS(iv)
        raise UnsupportedFeature(f"cipher mode {mode}")

    def _context(self, algorithm: Any, mode: Any, encrypt: bool) -> Any:
        """A cipher context (ECB when ``mode`` is None), with the package's refusals turned
        into UnsupportedFeature."""
        Cipher, modes, UnsupportedAlgorithm = _ciphers()
        try:
            c = Cipher(algorithm, modes.ECB() if mode is None else mode)
            return c.encryptor() if encrypt else c.decryptor()
        except ValueError as e:
            # OpenSSL refuses an XTS key whose halves are equal; QEMU's nettle does not.
            raise UnsupportedFeature("XTS key with identical halves",
                                     f"unsupported feature: {e}") from None
        except UnsupportedAlgorithm as e:
            raise UnsupportedFeature(f"cipher {self.spec.cipher_alg}-{self.spec.cipher_mode}",
                                     f"unsupported feature: {e}") from None

    def _run(self, first_sector: int, data: bytes, encrypt: bool) -> bytes:
        if len(data) % SECTOR_SIZE:
            # QEMU asserts sector alignment (crypto/block.c); a caller's bug here.
            raise RequestError(f"encrypted I/O of {len(data)} bytes is not whole 512-byte sectors")
        mode = self.spec.cipher_mode
        if mode in ("ecb", "cbc") and SECTOR_SIZE % self._block:
            raise RequestError(f"{mode} needs whole {self._block}-byte blocks")
        count = len(data) // SECTOR_SIZE
        if not count:
            return b""
        if mode == "ecb":
            # No IV: the sectors are independent blocks anyway, so one call does them all.
            ctx = self._ecb.get(encrypt)
            if ctx is None:
                ctx = self._ecb[encrypt] = self._context(self._algorithm, None, encrypt)
            return bytes(ctx.update(data))
        ivs = self._ivs(first_sector, count)
        if mode == "cbc":
            return self._cbc_encrypt(data, ivs) if encrypt else self._cbc_decrypt(data, ivs)
        out = bytearray()
        view = memoryview(data)
        for i, iv in enumerate(ivs):
            ctx = self._context(self._algorithm, self._mode(iv), encrypt)
            out += ctx.update(view[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE])
            out += ctx.finalize()
        return bytes(out)

    def _cbc_state(self, encrypt: bool) -> tuple[Any, bytes]:
        state = self._cbc.get(encrypt)
        if state is None:
            zero = bytes(self._block)
            state = self._cbc[encrypt] = (self._context(self._algorithm, self._mode(zero), encrypt), zero)
        return state

    def _cbc_encrypt(self, data: bytes, ivs: list[bytes]) -> bytes:
        """CBC per sector through the long-lived context: the first plaintext block of a
        sector XORed with (IV ^ chaining value) enters the cipher as (first block ^ IV)."""
        b = self._block
        ctx, chain = self._cbc_state(True)
        out = bytearray(len(data))
        view = memoryview(data)
        try:
            for i, iv in enumerate(ivs):
                lo = i * SECTOR_SIZE
                first = (int.from_bytes(view[lo:lo + b], "big") ^ int.from_bytes(iv, "big")
                         ^ int.from_bytes(chain, "big")).to_bytes(b, "big")
                enc = ctx.update(first + view[lo + b:lo + SECTOR_SIZE])
                out[lo:lo + SECTOR_SIZE] = enc
                chain = enc[-b:]
        except BaseException:
            del self._cbc[True]  # its chaining value is no longer known
            raise
        self._cbc[True] = (ctx, chain)
        return bytes(out)

    def _cbc_decrypt(self, data: bytes, ivs: list[bytes]) -> bytes:
        """CBC per sector in one call of the long-lived context: each sector's first block
        comes out XORed with the block before it (or the context's chaining value), and is
        put right with (that block ^ the sector's IV)."""
        b = self._block
        ctx, chain = self._cbc_state(False)
        try:
            out = bytearray(ctx.update(data))
        except BaseException:
            del self._cbc[False]
            raise
        view = memoryview(data)
        self._cbc[False] = (ctx, bytes(view[-b:]))
        for i, iv in enumerate(ivs):
            lo = i * SECTOR_SIZE
            prev = chain if i == 0 else view[lo - b:lo]
            fixed = (int.from_bytes(out[lo:lo + b], "big") ^ int.from_bytes(prev, "big")
                     ^ int.from_bytes(iv, "big"))
            out[lo:lo + b] = fixed.to_bytes(b, "big")
        return bytes(out)

    def encrypt(self, first_sector: int, data: bytes) -> bytes:
        return self._run(first_sector, data, True)

    def decrypt(self, first_sector: int, data: bytes) -> bytes:
        return self._run(first_sector, data, False)


# --- Anti-forensic split (crypto/afsplit.c) ------------------------------------------------------


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def af_diffuse(hash_alg: str, block: bytes) -> bytes:
    """The AF hash diffusion: the block in digest-sized pieces, piece i replaced by
    hash(be32(i) || piece), the last (shorter) piece by the same hash cut to its length."""
    d = lk.HASH_DIGEST_LEN[hash_alg]
    out = bytearray()
    for i in range(0, len(block), d):
        piece = block[i:i + d]
        out += digest(hash_alg, (i // d).to_bytes(4, "big"), piece)[:len(piece)]
    return bytes(out)


def af_merge(hash_alg: str, key_bytes: int, stripes: int, material: bytes) -> bytes:
    """Recover a key from its ``stripes`` AF stripes (qcrypto_afsplit_decode): fold every
    stripe but the last into a running block (xor, then diffuse); the key is that block xor
    the last stripe."""
    acc = bytes(key_bytes)
    for i in range(stripes - 1):
        acc = af_diffuse(hash_alg, _xor(acc, material[i * key_bytes:(i + 1) * key_bytes]))
    return _xor(acc, material[(stripes - 1) * key_bytes:stripes * key_bytes])


def af_split(hash_alg: str, key: bytes, stripes: int, random_bytes: Callable[[int], bytes]) -> bytes:
    """The inverse of af_merge (qcrypto_afsplit_encode): stripes - 1 random stripes, and a
    last stripe chosen so that merging gives ``key`` back."""
    acc = bytes(len(key))
    out = bytearray()
    for _ in range(stripes - 1):
        stripe = random_bytes(len(key))
        out += stripe
        acc = af_diffuse(hash_alg, _xor(acc, stripe))
    return bytes(out + _xor(acc, key))


# --- Passphrases ----------------------------------------------------------------------------------


def passphrase(key_secret: bytes | str | None) -> bytes:
    """The passphrase bytes QEMU feeds to PBKDF2 from an ``encrypt.key-secret``.

    QEMU looks the secret up as a UTF-8 string (qcrypto_secret_lookup_as_utf8) and uses it up
    to its first NUL (strlen), so the same applies here. None is "no key given": RequestError,
    as QEMU's "Parameter 'encrypt.key-secret' is required for cipher".
    """
    if key_secret is None:
        raise RequestError("encrypted image: key_secret is required (encrypt.key-secret)")
    raw = key_secret.encode("utf-8") if isinstance(key_secret, str) else bytes(key_secret)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("key_secret is not valid UTF-8 (QEMU's secrets are UTF-8 text)") from None
    return raw.split(b"\0", 1)[0]


def legacy_aes_key(key_secret: bytes | str | None) -> bytes:
    """crypt_method 1: the first 16 passphrase bytes, zero-padded (qcrypto_block_qcow_init)."""
    return passphrase(key_secret)[:LEGACY_AES_KEY_LEN].ljust(LEGACY_AES_KEY_LEN, b"\0")


# --- Unlocking a LUKS header -----------------------------------------------------------------------

Reader = Callable[[int, int], bytes]
"""read(offset, length) relative to the start of the LUKS area; FormatError past its end."""


@dataclass(frozen=True)
class LuksKey:
    """An unlocked LUKS header: the payload cipher spec and the master key."""

    spec: CipherSpec
    hash_alg: str
    master_key: bytes
    slot: int
    """The key slot the passphrase opened."""
    payload_offset: int
    """In bytes; qcow2 keeps guest data in clusters and ignores it (block/qcow2.c)."""

    def cipher(self) -> SectorCipher:
        return SectorCipher(self.spec, self.master_key)


def cipher_spec(info: lk.LuksInfo) -> CipherSpec:
    """The payload cipher a checked header names (spec.luks.luks_info)."""
    return CipherSpec(info.cipher_alg, info.cipher_mode, info.ivgen_alg, info.ivgen_hash_alg)


def split_key_len(key_bytes: int, stripes: int) -> int:
    """Bytes of one slot's key material (key_bytes * stripes, not rounded)."""
    return key_bytes * stripes


def unlock_luks(read: Reader, area_length: int, key_secret: bytes | str | None) -> LuksKey:
    """Find the master key as qcrypto_block_luks_open does: parse and check the header
    (spec.luks.luks_info), then try each active slot in order: PBKDF2 of the passphrase with
    the slot's salt and iterations gives the slot key; it decrypts the slot's key material
    with the payload cipher (sectors numbered from 0 at the material's start); the AF merge
    of that gives a candidate master key, which is right when its PBKDF2 digest (the
    header's salt and iterations, 20 bytes) equals mk_digest.

    Raises:
        RequestError: no key given, or a key that is not UTF-8.
        WrongKey: no active slot accepts the passphrase (or the slot's material is damaged).
        FormatError: the header is damaged or truncated; key material lies outside
            ``area_length`` or past the end of the file.
        UnsupportedFeature: an algorithm ``cryptography`` lacks; too many iterations.
    """
    password = passphrase(key_secret)
    raw = read(0, lk.LUKS_HEADER_SIZE)
    info = lk.luks_info(raw)
    h = lk.parse_luks_header(raw)
    spec = cipher_spec(info)
    check_supported(spec, info.hash_alg)
    key_bytes = int(h.key_bytes)
    for i, slot in enumerate(h.key_slots):
        if slot.active != lk.LUKS_KEY_SLOT_ENABLED:
            continue
        where = f"luks.key_slots[{i}]"
        start = int(slot.key_material_offset) * lk.LUKS_SECTOR_SIZE
        length = split_key_len(key_bytes, int(slot.stripes))
        if length % SECTOR_SIZE:
            # key_bytes 24 outside XTS: QEMU 7.2 asserts on the partial sector and aborts.
            raise UnsupportedFeature(f"LUKS key material of {length} bytes (not whole sectors)")
        if start + length > area_length:
            raise FormatError("key material lies outside the encryption header area",
                              f"{where}.key_material_offset")
        material = read(start, length)
        candidate = pbkdf2(info.hash_alg, password, bytes(slot.salt), int(slot.iterations), key_bytes)
        split = SectorCipher(spec, candidate).decrypt(0, material)
        master = af_merge(info.hash_alg, key_bytes, int(slot.stripes), split)
        check = pbkdf2(info.hash_alg, master, bytes(h.mk_digest_salt), int(h.mk_digest_iter), LUKS_DIGEST_LEN)
        if hmac.compare_digest(check, bytes(h.mk_digest)):
            return LuksKey(spec, info.hash_alg, master, i, info.payload_offset)
    raise WrongKey("the passphrase unlocks no active LUKS key slot (wrong key, or damaged key material)")


def file_reader(fd: int, area_offset: int, file_size: int) -> Reader:
    """A Reader over the LUKS area at ``area_offset`` of an open file: a read past the end of
    the file is FormatError (truncated image)."""

    def read(offset: int, length: int) -> bytes:
        if area_offset + offset + length > file_size:
            raise FormatError("the file ends inside the LUKS header or key material", "luks")
        try:
            data = os.pread(fd, length, area_offset + offset)
        except OSError as e:
            raise FormatError(f"cannot read the LUKS area: {e}", "luks") from None
        if len(data) != length:
            raise FormatError("the file ends inside the LUKS header or key material", "luks")
        return data

    return read


# --- Creating a LUKS header ----------------------------------------------------------------------


@dataclass(frozen=True)
class LuksCreateOptions:
    """``qemu-img create -o encrypt.*`` for LUKS, with QEMU's defaults (qapi/crypto.json,
    QCryptoBlockCreateOptionsLUKS; defaults from qcrypto_block_luks_create)."""

    cipher_alg: str = "aes-256"
    cipher_mode: str = "xts"
    ivgen_alg: str = "plain64"
    ivgen_hash_alg: str | None = None
    """Defaults to sha256 with essiv; accepted (and written, then ignored) with the others."""
    hash_alg: str = "sha256"
    iter_time: int = DEFAULT_ITER_TIME
    """Milliseconds; see PBKDF2_ITERS_PER_SECOND."""

    def resolved(self) -> LuksCreateOptions:
        """Check the options as qemu-img does and fill in the essiv hash default.

        RequestError for what qemu-img refuses (names it does not know, a cipher the LUKS
        name map lacks, cast5 in XTS mode, an ESSIV hash no cipher key fits, a negative
        iter_time) and for the 192-bit ciphers outside XTS, on which qemu-img 7.2 aborts (its
        key material, 24 * 4000 bytes, is not whole sectors: an assertion in crypto/block.c).
        UnsupportedFeature for what QEMU accepts and ``cryptography`` lacks.
        """
        if self.cipher_alg not in CIPHER_KEY_LEN:
            raise RequestError(f"encrypt.cipher-alg {self.cipher_alg!r} is not supported by LUKS")
        if self.cipher_mode not in lk.CIPHER_MODES:
            raise RequestError(f"encrypt.cipher-mode {self.cipher_mode!r} is not a cipher mode")
        if self.ivgen_alg not in lk.IVGEN_ALGS:
            raise RequestError(f"encrypt.ivgen-alg {self.ivgen_alg!r} is not an IV generator")
        for what, name in (("hash-alg", self.hash_alg), ("ivgen-hash-alg", self.ivgen_hash_alg)):
            if name is not None and name not in lk.HASH_DIGEST_LEN:
                raise RequestError(f"encrypt.{what} {name!r} is not a hash algorithm")
        if isinstance(self.iter_time, bool) or not isinstance(self.iter_time, int) or self.iter_time < 0:
            raise RequestError("encrypt.iter-time must be a non-negative integer (milliseconds)")
        refusal = qemu_create_refusal(self.cipher_alg, self.cipher_mode)
        if refusal:
            raise RequestError(f"{self.cipher_alg}-{self.cipher_mode}: {refusal}")
        ivhash = self.ivgen_hash_alg
        if self.ivgen_alg == "essiv" and ivhash is None:
            ivhash = "sha256"
        if self.ivgen_alg == "essiv":
            assert ivhash is not None
            try:
                essiv_cipher_alg(self.cipher_alg, ivhash)
            except UnsupportedFeature:
                raise RequestError(f"cipher {self.cipher_alg} cannot be used with essiv:{ivhash}") from None
        out = LuksCreateOptions(self.cipher_alg, self.cipher_mode, self.ivgen_alg, ivhash,
                                self.hash_alg, self.iter_time)
        check_supported(out.spec(), out.hash_alg)
        return out

    def spec(self) -> CipherSpec:
        # The header records the hash after a ':' whenever one was given, but only ESSIV uses it.
        return CipherSpec(self.cipher_alg, self.cipher_mode, self.ivgen_alg,
                          self.ivgen_hash_alg if self.ivgen_alg == "essiv" else None)

    def mode_string(self) -> str:
        """The header's cipher_mode text: ``<mode>-<ivgen>[:<ivhash>]``."""
        base = f"{self.cipher_mode}-{self.ivgen_alg}"
        return f"{base}:{self.ivgen_hash_alg}" if self.ivgen_hash_alg else base


def mark_encrypted(header: Any, written: bytes, area: tuple[int, int] | None) -> None:
    """Ready ``header`` (the one create built) to be written again once encryption is set
    up: the table fields are taken from ``written``, the header cluster as it is on disk now
    (the L1 table and a refcount table grown by preallocation may have moved since cluster 0
    was built), and the method is set: LUKS when a LUKS area was allocated, else legacy AES."""
    now = hd.Header.parse(written)
    for name in ("l1_size", "l1_table_offset", "refcount_table_offset", "refcount_table_clusters"):
        header[name] = now[name]
    header.crypt_method = QCOW_CRYPT_LUKS if area else QCOW_CRYPT_AES


def create_options(encrypt_format: str | None, key_secret: bytes | str | None,
                   luks_options: dict[str, Any]) -> LuksCreateOptions | None:
    """qemu-img's checks of ``-o encrypt.*`` (qcow2_co_create_opts, qcow2_set_up_encryption,
    qapi/crypto.json), shared by both engines' create: the LUKS options resolved (None
    values are the ones not given), or None for ``aes`` and for no encryption.

    Raises RequestError (an encrypt option without encrypt.format, a format other than luks
    or aes, no key, LUKS options with aes, and what LuksCreateOptions.resolved refuses) and
    UnsupportedFeature (an algorithm the cryptography package lacks).
    """
    given = {k: v for k, v in luks_options.items() if v is not None}
    if encrypt_format is None:
        if given or key_secret is not None:
            raise RequestError("encrypt.format is missing")
        return None
    if encrypt_format not in ("luks", "aes"):
        raise RequestError(f"encrypt.format {encrypt_format!r} is not luks or aes")
    passphrase(key_secret)  # "Parameter 'encrypt.key-secret' is required for cipher"
    if encrypt_format == "aes":
        if given:
            raise RequestError(f"encrypt.{next(iter(given)).replace('_', '-')} is unexpected with "
                               "encrypt.format=aes")
        return None
    return LuksCreateOptions(**given).resolved()


def qemu_create_refusal(cipher_alg: str, cipher_mode: str) -> str | None:
    """Why ``qemu-img create`` (7.2) fails for this LUKS cipher and mode, or None.

    XTS needs a 128-bit block (CAST5 is refused: "Unsupported cipher mode xts"). The 192-bit
    ciphers outside XTS have 24 * 4000 bytes of key material, not whole sectors, and qemu-img
    aborts on an assertion in crypto/block.c (exit 134, seen by hand).
    """
    if cipher_mode == "xts" and CIPHER_BLOCK_LEN[cipher_alg] != 16:
        return "refused (XTS needs a 128-bit block cipher)"
    spec = CipherSpec(cipher_alg, cipher_mode, "plain64")
    if split_key_len(spec.key_bytes, lk.LUKS_STRIPES) % SECTOR_SIZE:
        return "qemu-img aborts (key material is not whole sectors)"
    return None


def qcow2lab_gap(cipher_alg: str, cipher_mode: str) -> str | None:
    """Why qcow2lab cannot use this cipher and mode (``cryptography`` lacks it), or None."""
    try:
        _require_cipher(cipher_alg, cipher_mode)
    except UnsupportedFeature as e:
        return str(e).removeprefix("unsupported feature: ")
    return None


def iterations_for(iter_time: int, minimum: int, divisor: int = 1) -> int:
    """PBKDF2 iterations for ``iter_time`` ms at PBKDF2_ITERS_PER_SECOND, at least ``minimum``."""
    return max(PBKDF2_ITERS_PER_SECOND * iter_time // 1000 // divisor, minimum)


def slot_sectors(key_bytes: int) -> int:
    """Sectors reserved per key slot: the key material rounded up to 4 KiB (cryptsetup's rule,
    which QEMU follows rather than the LUKS1 spec's)."""
    return lk._splitkey_sectors(key_bytes, lk.LUKS_STRIPES)


def build_luks_area(key_secret: bytes | str | None, options: LuksCreateOptions,
                    random_bytes: Callable[[int], bytes] = os.urandom) -> tuple[bytes, bytes]:
    """The whole LUKS area of a new image and its master key, as qcrypto_block_luks_create
    lays it out: the 592-byte header zero-padded to 4 KiB, then eight key slot areas of
    ``slot_sectors`` each (only slot 0 active and filled), ending at payload_offset, which is
    the area's length. Inactive slots are 0x0000DEAD with zero iterations and salt.

    Raises RequestError or UnsupportedFeature as LuksCreateOptions.resolved does.
    """
    opts = options.resolved()
    password = passphrase(key_secret)
    spec = opts.spec()
    key_bytes = spec.key_bytes
    master = random_bytes(key_bytes)
    mk_salt = random_bytes(LUKS_SALT_LEN)
    mk_iters = iterations_for(opts.iter_time, LUKS_MIN_MASTER_KEY_ITERS, 8)
    mk_digest = pbkdf2(opts.hash_alg, master, mk_salt, mk_iters, LUKS_DIGEST_LEN)
    per_slot = slot_sectors(key_bytes)
    first = lk.HEADER_SECTORS
    payload = first + per_slot * lk.LUKS_NUM_KEY_SLOTS
    slot_salt = random_bytes(LUKS_SALT_LEN)
    slot_iters = iterations_for(opts.iter_time, LUKS_MIN_SLOT_KEY_ITERS)
    slot_key = pbkdf2(opts.hash_alg, password, slot_salt, slot_iters, key_bytes)
    material = SectorCipher(spec, slot_key).encrypt(
        0, af_split(opts.hash_alg, master, lk.LUKS_STRIPES, random_bytes))
    slots = [
        {"active": lk.LUKS_KEY_SLOT_ENABLED if i == 0 else lk.LUKS_KEY_SLOT_DISABLED,
         "iterations": slot_iters if i == 0 else 0,
         "salt": slot_salt if i == 0 else bytes(LUKS_SALT_LEN),
         "key_material_offset": first + per_slot * i,
         "stripes": lk.LUKS_STRIPES}
        for i in range(lk.LUKS_NUM_KEY_SLOTS)
    ]
    header = lk.LuksHeader.build({
        "version": lk.LUKS_VERSION,
        "cipher_name": spec.cipher_alg.split("-")[0].encode().ljust(32, b"\0"),
        "cipher_mode": opts.mode_string().encode().ljust(32, b"\0"),
        "hash_spec": opts.hash_alg.encode().ljust(32, b"\0"),
        "payload_offset": payload,
        "key_bytes": key_bytes,
        "mk_digest": mk_digest,
        "mk_digest_salt": mk_salt,
        "mk_digest_iter": mk_iters,
        "uuid": str(uuid.UUID(bytes=random_bytes(16), version=4)).encode().ljust(40, b"\0"),
        "key_slots": slots,
    })
    area = bytearray(payload * lk.LUKS_SECTOR_SIZE)
    area[:len(header)] = header
    start = first * lk.LUKS_SECTOR_SIZE
    area[start:start + len(material)] = material
    return bytes(area), master


# --- Guest data in qcow2 ---------------------------------------------------------------------------


class Qcow2Crypto:
    """Encrypts and decrypts guest data sectors of one qcow2 image (block/qcow2.c,
    qcow2_co_encdec): LUKS numbers sectors by host offset, legacy AES by guest offset."""

    def __init__(self, cipher: SectorCipher, physical: bool) -> None:
        self.cipher = cipher
        self.physical = physical

    def _sector(self, host_offset: int, guest_offset: int) -> int:
        offset = host_offset if self.physical else guest_offset
        if host_offset % SECTOR_SIZE or guest_offset % SECTOR_SIZE:
            raise RequestError("encrypted I/O must be aligned to 512-byte sectors")
        return offset // SECTOR_SIZE

    def encrypt(self, host_offset: int, guest_offset: int, data: bytes) -> bytes:
        return self.cipher.encrypt(self._sector(host_offset, guest_offset), data)

    def decrypt(self, host_offset: int, guest_offset: int, data: bytes) -> bytes:
        return self.cipher.decrypt(self._sector(host_offset, guest_offset), data)


def image_crypto(img: ImageFile, key_secret: bytes | str | None) -> Qcow2Crypto:
    """Unlock an opened image (spec.image.ImageFile) with ``key_secret``: the LUKS header the
    crypto header extension points at (crypt_method 2), or the legacy AES key (crypt_method 1).

    Raises what unlock_luks raises; RequestError for an image that is not encrypted.
    """
    method = int(img.header.crypt_method)
    if method == QCOW_CRYPT_AES:
        return legacy_aes_crypto(key_secret)
    if method != QCOW_CRYPT_LUKS:
        raise RequestError("the image is not encrypted")
    passphrase(key_secret)  # "no key given" comes before anything is read, as in QEMU
    lk.read_luks_header(img)  # the pointer's own checks: cluster aligned, long enough
    ext = img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
    assert ext is not None  # read_luks_header raised otherwise
    ptr = ext.data
    return luks_crypto(unlock_luks(file_reader(img.f.fileno(), int(ptr.offset), img.file_size),
                                   int(ptr.length), key_secret))


def luks_crypto(key: LuksKey) -> Qcow2Crypto:
    return Qcow2Crypto(key.cipher(), physical=True)


def legacy_aes_crypto(key_secret: bytes | str | None) -> Qcow2Crypto:
    return Qcow2Crypto(SectorCipher(LEGACY_AES, legacy_aes_key(key_secret)), physical=False)


# --- The rules, as rendered in docs/spec.md ("Encryption") -------------------------------------


@dataclass(frozen=True)
class EncryptionRule:
    """One fact a valid encrypted image obeys, or one thing QEMU does with it."""

    id: str
    statement: str
    source: str
    """QEMU function or spec section that makes it so."""
    error: str
    """The spec.errors class qcow2lab raises when it does not hold ("-" for behaviour)."""


ENCRYPTION_RULES: tuple[EncryptionRule, ...] = (
    EncryptionRule("CRYPT-METHOD", "crypt_method is 0 (none), 1 (legacy AES-CBC) or 2 (LUKS).",
                   "block/qcow2.c qcow2_do_open", "FormatError"),
    EncryptionRule("LUKS-POINTER", "crypt_method 2 if and only if the full disk encryption header pointer "
                   "extension is present; the extension is 16 bytes.",
                   "block/qcow2.c qcow2_read_extensions, qcow2_do_open", "FormatError"),
    EncryptionRule("LUKS-AREA-ALIGN", "The LUKS area starts on a cluster boundary and its declared length "
                   "holds at least the 592-byte header.",
                   "block/qcow2.c qcow2_read_extensions, qcow2_crypto_hdr_read_func", "FormatError"),
    EncryptionRule("LUKS-AREA-FILE", "The LUKS header and every active slot's key material lie inside the "
                   "file (QEMU would read zeros past its end and fail later).",
                   "qcow2lab (spec/image.py's rule for every structure)", "FormatError"),
    EncryptionRule("LUKS-MAGIC", 'The area starts with "LUKS\\xba\\xbe" and version 1.',
                   "crypto/block-luks.c qcrypto_block_luks_check_header",
                   "FormatError (magic), UnsupportedFeature (version)"),
    EncryptionRule("LUKS-NAMES", "cipher_name, cipher_mode and hash_spec end with a NUL inside their 32 "
                   "bytes; cipher_mode reads <mode>-<ivgen>[:<ivhash>]; essiv has its hash; the names, "
                   "and the cipher with key_bytes (halved for xts), are ones QEMU maps.",
                   "crypto/block-luks.c qcrypto_block_luks_parse_header",
                   "FormatError (syntax), UnsupportedFeature (unknown name)"),
    EncryptionRule("LUKS-PAYLOAD", "payload_offset is at least 8 sectors (past the 4 KiB header area) and "
                   "mk_digest_iter is not zero.", "crypto/block-luks.c qcrypto_block_luks_check_header",
                   "FormatError"),
    EncryptionRule("LUKS-SLOT-STATE", "Every slot has 4000 stripes and is 0x00AC71F3 (active) or 0x0000DEAD "
                   "(inactive); an active slot has non-zero iterations.",
                   "crypto/block-luks.c qcrypto_block_luks_check_header", "FormatError"),
    EncryptionRule("LUKS-SLOT-RANGE", "Every slot's key material, rounded up to 4 KiB, starts at sector 8 "
                   "or later, ends by payload_offset and overlaps no other slot's.",
                   "crypto/block-luks.c qcrypto_block_luks_check_header", "FormatError"),
    EncryptionRule("LUKS-SLOT-INSIDE", "An active slot's key material lies inside the length the "
                   "extension declares.", "block/qcow2.c qcow2_crypto_hdr_read_func", "FormatError"),
    EncryptionRule("LUKS-KEY", "The passphrase unlocks some active slot: PBKDF2 of it gives the slot key, "
                   "which decrypts the key material; its AF merge is the master key, whose PBKDF2 digest "
                   "equals mk_digest. Slots are tried in order.",
                   "crypto/block-luks.c qcrypto_block_luks_find_key, qcrypto_block_luks_load_key",
                   "WrongKey (a RequestError); no key at all: RequestError"),
    EncryptionRule("CRYPT-SECTOR", "Each 512-byte sector of a standard data cluster is encrypted on its own: "
                   "the IV generator turns the sector number into the IV (XTS: the tweak), and CBC chains "
                   "and CTR counters restart at every sector.",
                   "crypto/block.c do_qcrypto_block_cipher_encdec", "-"),
    EncryptionRule("CRYPT-SECTOR-NUMBER", "The sector number is the sector's host file offset / 512 with "
                   "LUKS, and its guest offset / 512 with legacy AES. Moving an encrypted cluster means "
                   "decrypting and encrypting it again.",
                   "block/qcow2.c qcow2_co_encdec (crypt_physical_offset)", "-"),
    EncryptionRule("CRYPT-ALIGN", "An encrypted image's request alignment is 512 bytes; QEMU rounds "
                   "smaller requests out to whole sectors (read-modify-write).",
                   "block/qcow2.c qcow2_refresh_limits", "-"),
    EncryptionRule("CRYPT-ZERO", "Zero clusters and zero subclusters read as zeros without decryption; "
                   "unallocated ones read from the backing file (as that file's own driver reads it) "
                   "or as zeros.", "block/qcow2.c qcow2_co_preadv_task", "-"),
    EncryptionRule("CRYPT-COW", "Copy-on-write reads the untouched parts of the cluster as plaintext "
                   "(the old cluster decrypted, or the backing file) and encrypts them for the new host "
                   "offset; QEMU never replaces zero COW regions by a zeroing request here, so they are "
                   "written as encrypted zeros.",
                   "block/qcow2-cluster.c perform_cow; block/qcow2.c handle_alloc_space", "-"),
    EncryptionRule("CRYPT-COMPRESSED", "A compressed cluster is stored compressed and NOT encrypted, and "
                   "is read back without decryption: qemu-io's `write -c` on an encrypted image succeeds "
                   "(QEMU 7.2; qemu-img convert -c refuses compression with encryption itself).",
                   "block/qcow2.c qcow2_co_pwritev_compressed_task, qcow2_co_preadv_task", "-"),
    EncryptionRule("LEGACY-AES-KEY", "Legacy AES (crypt_method 1) keys AES-128-CBC with the passphrase's "
                   "first 16 bytes, zero-padded, plain64 IVs; nothing checks the key, so a wrong one reads "
                   "garbage (in QEMU too).", "crypto/block-qcow.c qcrypto_block_qcow_init", "-"),
)
"""What docs/spec.md lists under "Encryption": the checks QEMU makes on an encrypted image (with
the error class qcow2lab raises) and how guest data is encrypted."""

IVGEN_DOCS: dict[str, str] = {
    "plain": "The sector number modulo 2^32, 4 bytes little-endian, zero-padded to the IV length.",
    "plain64": "The sector number, 8 bytes little-endian, zero-padded to the IV length (QEMU's default).",
    "essiv": "The plain64 block (padded to the ESSIV cipher's block) encrypted in ECB mode by the ESSIV "
             "cipher, keyed with hash(master key) cut to that cipher's key length. The ESSIV cipher is "
             "the payload cipher if its key is as long as the digest, else the AES/Serpent/Twofish "
             "member whose key is (aes-128 with sha256 uses aes-256).",
}
"""The IV generators (crypto/ivgen-plain.c, ivgen-plain64.c, ivgen-essiv.c)."""

UNLOCK_STEPS: tuple[str, ...] = (
    "Parse and check the header without the key (what qemu-img info does): the rules below.",
    "For each active slot in order: slot key = PBKDF2(hash_spec, passphrase, slot salt, slot iterations, "
    "key_bytes). The passphrase is the secret's UTF-8 bytes up to its first NUL.",
    "Decrypt the slot's key_bytes * 4000 bytes of key material with the payload cipher, mode and IV "
    "generator keyed by the slot key, as 512-byte sectors numbered from 0.",
    "AF merge (hash_spec): a zero block; for each stripe but the last, xor it in and diffuse (split the "
    "block into digest-sized pieces, replace piece i by hash(be32(i) || piece), cut to the piece's "
    "length); the master key is the block xor the last stripe.",
    "The master key is right when PBKDF2(hash_spec, master key, mk_digest_salt, mk_digest_iter, 20) "
    "equals mk_digest; otherwise try the next slot. No slot left: WrongKey.",
)
"""How a key slot is unlocked (crypto/block-luks.c qcrypto_block_luks_load_key, crypto/afsplit.c)."""

CREATE_STEPS: tuple[str, ...] = (
    "A random master key of key_bytes (the cipher key length, doubled for XTS), a random master key "
    "salt, and a version 4 UUID as 36 ASCII characters.",
    "mk_digest_iter and slot 0's iterations from iter_time (see PBKDF2_ITERS_PER_SECOND below, where "
    "QEMU measures the machine instead); both at least 1000.",
    "Slot 0 only: AF split the master key into 4000 stripes (random stripes, the last computed), "
    "encrypt them with the slot key, store them at sector 8. Slots 1-7 are 0x0000DEAD with zero "
    "iterations and salt, their areas laid out but zero.",
    "payload_offset = 8 + 8 * (one slot's area in sectors), which is also the area's length; the area "
    "is allocated as zeroed clusters of its own when the image is created (qemu-img puts it after the "
    "header, refcount table, first refcount block and L1 table: at 0x40000 with 64 KiB clusters).",
)
"""How a LUKS header is created (crypto/block-luks.c qcrypto_block_luks_create)."""
