"""SectorCipher's batched paths (one long-lived context per direction for ECB, CBC and the
ESSIV IVs) give exactly what a fresh ``cryptography`` context per sector gives, across
calls of any length and in any order (spec/encryption.py, SectorCipher)."""

from __future__ import annotations

import hashlib
import random

import pytest
from cryptography.hazmat.decrepit.ciphers.algorithms import CAST5
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from spec import encryption as enc

SPECS = [
    ("aes-128", "cbc", "plain64", None, 16),
    ("aes-256", "cbc", "plain", None, 32),
    ("aes-256", "cbc", "essiv", "sha256", 32),
    ("aes-128", "cbc", "essiv", "sha256", 16),
    ("aes-256", "ecb", "plain64", None, 32),
    ("aes-256", "xts", "plain64", None, 64),
    ("aes-128", "ctr", "plain64", None, 16),
    ("cast5-128", "cbc", "plain64", None, 16),
]


def _alg(name: str, key: bytes) -> object:
    return CAST5(key) if name.startswith("cast5") else algorithms.AES(key)


def _reference(alg: str, mode: str, ivgen: str, ivhash: str | None, key: bytes, sector: int,
               data: bytes, encrypt: bool) -> bytes:
    """One fresh context per 512-byte sector, IVs computed here from their definitions."""
    block = 8 if alg.startswith("cast5") else 16
    out = b""
    for i in range(0, len(data), 512):
        n = sector + i // 512
        if ivgen == "plain":
            iv = (n & 0xFFFFFFFF).to_bytes(4, "little")
        else:
            iv = (n & (2**64 - 1)).to_bytes(8, "little")
        if ivgen == "essiv":
            assert ivhash == "sha256"
            salt = hashlib.sha256(key).digest()  # 32 bytes: AES-256 keys the ESSIV cipher
            e = Cipher(algorithms.AES(salt), modes.ECB()).encryptor()
            iv = e.update(iv.ljust(16, b"\0")) + e.finalize()
        iv = iv[:block].ljust(block, b"\0")
        m = {"cbc": modes.CBC, "xts": modes.XTS, "ctr": modes.CTR}.get(mode)
        c = Cipher(_alg(alg, key), modes.ECB() if m is None else m(iv))  # type: ignore[arg-type]
        ctx = c.encryptor() if encrypt else c.decryptor()
        out += ctx.update(data[i:i + 512]) + ctx.finalize()
    return out


@pytest.mark.parametrize(("alg", "mode", "ivgen", "ivhash", "klen"), SPECS)
def test_batched_cipher_matches_a_context_per_sector(alg: str, mode: str, ivgen: str,
                                                     ivhash: str | None, klen: int) -> None:
    rnd = random.Random(f"{alg}{mode}{ivgen}")
    key = rnd.randbytes(klen)
    c = enc.SectorCipher(enc.CipherSpec(alg, mode, ivgen, ivhash), key)
    # Calls of varied lengths and sectors, interleaved, so the long-lived contexts carry
    # state from one call into the next; sector numbers near both wrap-arounds.
    for sector, sectors in [(0, 1), (7, 3), (2**32 - 2, 4), (2**64 - 1, 2), (123456, 128), (5, 1)]:
        data = rnd.randbytes(512 * sectors)
        ct = c.encrypt(sector, data)
        assert ct == _reference(alg, mode, ivgen, ivhash, key, sector, data, True)
        assert c.decrypt(sector, ct) == data
        other = rnd.randbytes(512 * sectors)
        assert c.decrypt(sector + 1, other) == _reference(alg, mode, ivgen, ivhash, key, sector + 1,
                                                          other, False)
    assert c.encrypt(0, b"") == b"" == c.decrypt(0, b"")
