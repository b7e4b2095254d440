"""Encryption at the spec level (spec/encryption.py, spec/luks.py), held against QEMU 7.2.

QEMU writes an encrypted image (qemu-img create -o encrypt.*, data by qemu-io with the key);
the spec code unlocks the key slot, finds the host clusters through the L1/L2 tables and
decrypts them, and must see exactly what qemu-io wrote. The other direction: the spec code
encrypts new plaintext into the same host clusters (and builds whole LUKS headers), and
qemu-io must read it back. Damaged keys, slots and headers must give the documented
spec.errors classes, and QEMU must refuse the same images.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from spec import encryption as enc
from spec import entries as en
from spec import header as hd
from spec import luks as lk
from spec.errors import FormatError, Qcow2Error, RequestError, UnsupportedFeature, WrongKey
from spec.image import ImageFile, open_image
from tests.qemu import qemu_img

PASS = "qcow2lab-luks"


def secret_args(secret: str = PASS) -> list[str]:
    return ["--object", f"secret,id=sec0,data={secret}"]


def qemu_create(path: Path, size: str = "4M", *, encrypt_format: str = "luks", **opts: object) -> Path:
    """qemu-img create with ``encrypt.<name>=value`` for each option (underscores -> dashes);
    a refusal raises RuntimeError with qemu-img's message."""
    o = [f"encrypt.format={encrypt_format}", "encrypt.key-secret=sec0"]
    if encrypt_format == "luks":
        o.append("encrypt.iter-time=10")
    o += [f"encrypt.{k.replace('_', '-')}={v}" for k, v in opts.items() if not k.startswith("q_")]
    o += [f"{k[2:]}={v}" for k, v in opts.items() if k.startswith("q_")]
    r = qemu_img("create", "-q", "-f", "qcow2", *secret_args(), "-o", ",".join(o), str(path), size,
                 check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return path


def qemu_io(path: Path, *cmds: str, secret: str = PASS,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["qemu-io", *secret_args(secret), "--image-opts",
            f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv, capture_output=True, text=True)
    failed = r.returncode != 0 or "error" in r.stdout.lower() or "fail" in r.stdout.lower()
    if check and failed:
        raise RuntimeError(f"qemu-io {cmds}: {r.stdout}{r.stderr}")
    return r


def qemu_refuses(path: Path, secret: str = PASS) -> bool:
    r = qemu_io(path, "read 0 512", secret=secret, check=False)
    return r.returncode != 0 or "can't open" in r.stderr


def host_clusters(img: ImageFile) -> Iterator[tuple[int, int]]:
    """(guest offset, host offset) of every allocated data cluster, through L1 and L2."""
    g = img.geometry
    span = img.cluster_size * g.l2_entries
    for i, l1e in enumerate(img.l1_table()):
        l2_off = l1e & en.L1E_OFFSET_MASK
        if not l2_off:
            continue
        for j, e in enumerate(img.l2_table(l2_off)):
            word = e.l2_entry if g.extended_l2 else e
            host = word & en.L2E_OFFSET_MASK
            if host and not word & (en.QCOW_OFLAG_COMPRESSED | en.QCOW_OFLAG_ZERO):
                yield i * span + j * img.cluster_size, host


def decrypt_all(path: Path, secret: str | bytes | None = PASS) -> dict[int, bytes]:
    """Guest offset -> plaintext of each allocated cluster, decrypted by the spec code."""
    with open_image(path) as img:
        crypto = enc.image_crypto(img, secret)
        return {guest: crypto.decrypt(host, guest, img.read(host, img.cluster_size, "data"))
                for guest, host in host_clusters(img)}


def reencrypt(path: Path, plain: dict[int, bytes], secret: str = PASS) -> None:
    """Write ``plain`` (guest offset -> cluster bytes) over the allocated clusters, encrypted."""
    with open_image(path) as img:
        crypto = enc.image_crypto(img, secret)
        where = dict(host_clusters(img))
    with open(path, "r+b") as f:
        for guest, data in plain.items():
            f.seek(where[guest])
            f.write(crypto.encrypt(where[guest], guest, data))


def luks_area(path: Path) -> tuple[int, int]:
    with open_image(path) as img:
        ext = img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        assert ext is not None
        return int(ext.data.offset), int(ext.data.length)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# --- The payload cipher against QEMU -------------------------------------------------------------

# (encrypt.* options, what `info` must report). Every cipher mode, IV generator and PBKDF2/AF
# hash that both QEMU and the cryptography package have, in combinations qemu-img accepts.
COMBOS: list[dict[str, str]] = [
    {},                                                                   # aes-256-xts-plain64, sha256
    {"cipher_alg": "aes-128", "cipher_mode": "cbc", "ivgen_alg": "plain", "hash_alg": "sha1"},
    {"cipher_alg": "aes-256", "cipher_mode": "cbc", "ivgen_alg": "essiv", "hash_alg": "sha512"},
    {"cipher_alg": "aes-128", "cipher_mode": "xts", "ivgen_alg": "essiv", "hash_alg": "md5"},
    {"cipher_alg": "aes-256", "cipher_mode": "ctr", "ivgen_alg": "plain64", "hash_alg": "sha384"},
    {"cipher_alg": "aes-128", "cipher_mode": "ecb", "hash_alg": "sha224"},
    {"cipher_alg": "cast5-128", "cipher_mode": "cbc", "ivgen_alg": "essiv", "ivgen_hash_alg": "md5"},
    {"cipher_alg": "aes-256", "cipher_mode": "xts", "ivgen_alg": "plain64", "ivgen_hash_alg": "sha1"},
]


def combo_id(opts: dict[str, str]) -> str:
    return "-".join(opts.values()) or "default"


@pytest.mark.parametrize("opts", COMBOS, ids=combo_id)
def test_qemu_written_data_decrypts_and_ours_reads_back(tmp_path: Path, opts: dict[str, str]) -> None:
    p = qemu_create(tmp_path / "a.qcow2", **opts)
    # 64 KiB clusters: a whole cluster, a partial one (qemu COWs the rest of it as zeros) and
    # one far away, so host and guest offsets differ.
    qemu_io(p, "write -P 0x5a 0 64k", "write -P 0xa5 65536 4k", "write -P 0x33 3M 512")
    plain = decrypt_all(p)
    assert sorted(plain) == [0, 65536, 3 << 20]
    assert plain[0] == b"\x5a" * 65536
    assert plain[65536] == b"\xa5" * 4096 + bytes(61440)
    assert plain[3 << 20] == b"\x33" * 512 + bytes(65024)

    # The other direction: new plaintext, encrypted by the spec code, read by qemu-io.
    new = {g: bytes([0x11 + k]) * 65536 for k, g in enumerate(sorted(plain))}
    reencrypt(p, new)
    qemu_io(p, "read -P 0x11 0 64k", "read -P 0x12 64k 64k", "read -P 0x13 3M 64k", "read -P 0 128k 64k")


def test_info_names_match_the_cipher_we_unlock(tmp_path: Path) -> None:
    p = qemu_create(tmp_path / "a.qcow2", cipher_alg="aes-128", ivgen_alg="essiv")
    with open_image(p) as img:
        info = lk.luks_info(lk.read_luks_header(img))
        crypto = enc.image_crypto(img, PASS)
    # aes-128-xts with essiv:sha256: the ESSIV cipher is AES-256 (the digest length), keyed
    # by the hash of both XTS halves.
    assert enc.cipher_spec(info) == enc.CipherSpec("aes-128", "xts", "essiv", "sha256")
    assert crypto.cipher.spec == enc.cipher_spec(info)
    assert enc.essiv_cipher_alg("aes-128", "sha256") == "aes-256"


def test_sector_numbers_are_host_offsets_for_luks(tmp_path: Path) -> None:
    """block/qcow2.c qcow2_co_encdec: LUKS keys each sector by its host offset, so the same
    plaintext in two clusters encrypts differently, and decrypting with the guest offset fails."""
    p = qemu_create(tmp_path / "a.qcow2")
    qemu_io(p, "write -P 0x5a 1M 64k")
    with open_image(p) as img:
        crypto = enc.image_crypto(img, PASS)
        (guest, host), = host_clusters(img)
        raw = img.read(host, 65536, "data")
    assert guest != host
    assert crypto.decrypt(host, guest, raw) == b"\x5a" * 65536
    assert crypto.cipher.decrypt(guest // 512, raw) != b"\x5a" * 65536


# --- Legacy AES (crypt_method 1) ----------------------------------------------------------------


@pytest.mark.parametrize("secret", ["short", "a-passphrase-longer-than-16-bytes"])
def test_legacy_aes_both_directions(tmp_path: Path, secret: str) -> None:
    """qemu-img 7.2 still creates crypt_method 1 images (only system emulators refuse to open
    them). Sectors are numbered by *guest* offset; the key is the passphrase's first 16 bytes."""
    p = tmp_path / "aes.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *secret_args(secret), "-o",
                    "encrypt.format=aes,encrypt.key-secret=sec0", str(p), "4M"], check=True)
    with open_image(p) as img:
        assert img.header.crypt_method == 1 and img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER) is None
    qemu_io(p, "write -P 0x5a 1M 64k", "write -P 0x77 0 512", secret=secret)
    plain = decrypt_all(p, secret)
    assert plain[1 << 20] == b"\x5a" * 65536
    assert plain[0] == b"\x77" * 512 + bytes(65024)
    with open_image(p) as img:
        crypto = enc.image_crypto(img, secret)
        host = dict(host_clusters(img))[1 << 20]
        raw = img.read(host, 65536, "data")
    assert host != 1 << 20
    assert crypto.cipher.decrypt((1 << 20) // 512, raw) == b"\x5a" * 65536   # guest sector numbers
    reencrypt(p, {1 << 20: b"\x42" * 65536}, secret)
    qemu_io(p, "read -P 0x42 1M 64k", secret=secret)
    # A wrong key cannot be detected with legacy AES: QEMU and we both return garbage.
    assert decrypt_all(p, "not-it")[1 << 20] != b"\x42" * 65536


# --- Key slots, headers and their errors --------------------------------------------------------


@pytest.fixture(scope="module")
def luks_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = qemu_create(tmp_path_factory.mktemp("luks") / "base.qcow2")
    qemu_io(p, "write -P 0x5a 0 64k")
    return p


@pytest.fixture
def copy(tmp_path: Path, luks_image: Path) -> Path:
    p = tmp_path / "copy.qcow2"
    p.write_bytes(luks_image.read_bytes())
    return p


def test_wrong_passphrase(copy: Path) -> None:
    with pytest.raises(WrongKey):
        decrypt_all(copy, "wrong")
    assert issubclass(WrongKey, RequestError)
    assert qemu_refuses(copy, "wrong")


def test_no_key(copy: Path) -> None:
    with pytest.raises(RequestError) as e:
        decrypt_all(copy, None)
    assert not isinstance(e.value, WrongKey)


def test_key_is_cut_at_nul_and_must_be_utf8(copy: Path) -> None:
    """QEMU reads secrets as UTF-8 C strings: bytes after a NUL do not count."""
    assert decrypt_all(copy, PASS.encode() + b"\0ignored")[0] == b"\x5a" * 65536
    with pytest.raises(RequestError):
        decrypt_all(copy, b"\xff\xfe")


def test_damaged_key_material_is_a_wrong_key(copy: Path) -> None:
    """LUKS1's only check is the master key digest: flipped key material cannot be told from a
    wrong passphrase (QEMU: "Invalid password, cannot unlock any keyslot")."""
    start, _ = luks_area(copy)
    with open_image(copy) as img:
        h = lk.parse_luks_header(lk.read_luks_header(img))
    material = start + h.key_slots[0].key_material_offset * 512
    patch(copy, material + 1000, b"\xff" * 16)
    with pytest.raises(WrongKey):
        decrypt_all(copy)
    assert qemu_refuses(copy)


@pytest.mark.parametrize(("field_offset", "value"), [
    (lk.LUKS_HEADER_SIZE - 8 * 48 + 44, (3999).to_bytes(4, "big")),       # slot 0 stripes
    (lk.LUKS_HEADER_SIZE - 8 * 48 + 0, (0x12345678).to_bytes(4, "big")),  # slot 0 state
    (lk.LUKS_HEADER_SIZE - 8 * 48 + 40, (1).to_bytes(4, "big")),          # slot 0 inside the header
    (lk.LUKS_HEADER_SIZE - 7 * 48 + 40, (8).to_bytes(4, "big")),          # slot 1 overlaps slot 0
], ids=["stripes", "state", "offset-in-header", "overlap"])
def test_damaged_key_slot_descriptor(copy: Path, field_offset: int, value: bytes) -> None:
    start, _ = luks_area(copy)
    patch(copy, start + field_offset, value)
    with pytest.raises(FormatError):
        decrypt_all(copy)
    assert qemu_refuses(copy)


@pytest.mark.parametrize("keep", [300, 4096 + 1000], ids=["in-header", "in-key-material"])
def test_truncated_luks_area(copy: Path, keep: int) -> None:
    """A file ending inside the LUKS header or key material is FormatError. (QEMU reads zeros
    past the end of the file, so it fails too, as a bad header or as a wrong password.)"""
    start, _ = luks_area(copy)
    os.truncate(copy, start + keep)
    with pytest.raises(FormatError):
        decrypt_all(copy)
    assert qemu_refuses(copy)


def test_key_material_outside_the_declared_area(copy: Path) -> None:
    """qcow2_crypto_hdr_read_func refuses reads past the length the extension declares."""
    with open_image(copy) as img:
        ext = img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        assert ext is not None
        length_at = ext.offset + 8 + 8  # type, length, then offset (8 bytes), then length
    patch(copy, length_at, (4096 + 512).to_bytes(8, "big"))
    with pytest.raises(FormatError):
        decrypt_all(copy)
    assert qemu_refuses(copy)


def test_unsupported_algorithms_are_named(tmp_path: Path) -> None:
    """QEMU accepts these; cryptography lacks them: UnsupportedFeature naming the algorithm."""
    cases = [({"cipher_alg": "serpent-256"}, "serpent-256"), ({"cipher_alg": "twofish-128",
              "cipher_mode": "cbc"}, "twofish-128"), ({"cipher_alg": "aes-192"}, "aes-192-xts"),
             ({"cipher_alg": "cast5-128", "cipher_mode": "ctr"}, "cast5-128-ctr"),
             ({"hash_alg": "ripemd160"}, "ripemd160")]
    for opts, name in cases:
        p = qemu_create(tmp_path / f"{name}.qcow2", "1M", **opts)
        qemu_io(p, "write -P 0x5a 0 4k")
        with pytest.raises(UnsupportedFeature) as e:
            decrypt_all(p)
        assert name in e.value.feature


def test_iteration_count_is_bounded(copy: Path) -> None:
    start, _ = luks_area(copy)
    patch(copy, start + lk.LUKS_HEADER_SIZE - 8 * 48 + 4, (0xFFFFFFFF).to_bytes(4, "big"))
    with pytest.raises(UnsupportedFeature):
        decrypt_all(copy)


# --- Creating LUKS headers ----------------------------------------------------------------------


@pytest.mark.parametrize("opts", [
    {},
    {"cipher_alg": "aes-128", "cipher_mode": "cbc", "ivgen_alg": "essiv", "hash_alg": "sha1"},
    {"cipher_alg": "cast5-128", "cipher_mode": "ecb", "ivgen_alg": "plain", "hash_alg": "sha512"},
], ids=combo_id)
def test_our_luks_header_opens_in_qemu(tmp_path: Path, opts: dict[str, str]) -> None:
    """build_luks_area's header, key slot and digest are accepted by QEMU with the passphrase:
    it is planted into an image qemu-img made with the same algorithms (same layout), qemu-io
    writes through it and the spec code decrypts what it wrote with our master key."""
    p = qemu_create(tmp_path / "a.qcow2", **opts)
    area, master = enc.build_luks_area("our-secret", enc.LuksCreateOptions(iter_time=1, **opts))  # type: ignore[arg-type]
    start, length = luks_area(p)
    assert len(area) == length
    patch(p, start, area)
    assert qemu_refuses(p, PASS)
    qemu_io(p, "write -P 0x6b 0 64k", secret="our-secret")
    with open_image(p) as img:
        key = enc.unlock_luks(enc.file_reader(img.f.fileno(), start, img.file_size), length, "our-secret")
    assert key.master_key == master and key.slot == 0
    assert decrypt_all(p, "our-secret")[0] == b"\x6b" * 65536
    info = subprocess.run(["qemu-img", "info", str(p)], capture_output=True, text=True, check=True).stdout
    assert "iters: 1000" in info and "master key iters: 1000" in info


def test_our_header_layout_is_qemus(tmp_path: Path) -> None:
    """Field for field, what differs between our header and qemu-img's is only what is random
    or measured: salts, digests, the UUID and the iteration counts."""
    p = qemu_create(tmp_path / "a.qcow2")
    with open_image(p) as img:
        theirs = lk.parse_luks_header(lk.read_luks_header(img))
    area, _ = enc.build_luks_area(PASS, enc.LuksCreateOptions(iter_time=10))
    ours = lk.parse_luks_header(area)
    # Not compared: mk_digest, mk_digest_salt, mk_digest_iter, uuid, and slot 0's salt and iterations.
    for name in ("version", "cipher_name", "cipher_mode", "hash_spec", "payload_offset", "key_bytes"):
        assert ours[name] == theirs[name], name
    for a, b in zip(ours.key_slots, theirs.key_slots, strict=True):
        assert (a.active, a.key_material_offset, a.stripes) == (b.active, b.key_material_offset, b.stripes)
        if a.active == lk.LUKS_KEY_SLOT_DISABLED:
            assert (a.iterations, a.salt) == (b.iterations, b.salt)
    assert len(str(ours.uuid.rstrip(b"\0").decode())) == 36


@pytest.mark.parametrize(("opts", "qemu_says"), [
    ({"cipher_alg": "3des"}, "not supported"),
    ({"cipher_alg": "cast5-128", "cipher_mode": "xts"}, "Unsupported cipher mode xts"),
    ({"ivgen_alg": "essiv", "ivgen_hash_alg": "sha512"}, "No AES cipher with key size 64"),
    ({"cipher_alg": "cast5-128", "cipher_mode": "cbc", "ivgen_alg": "essiv"}, "not supported with essiv"),
    ({"iter_time": -1}, "too large to scale"),
], ids=["3des", "cast5-xts", "essiv-sha512", "cast5-essiv-sha256", "negative-iter-time"])
def test_create_refusals_match_qemu(tmp_path: Path, opts: dict[str, object], qemu_says: str) -> None:
    with pytest.raises(RequestError):
        enc.LuksCreateOptions(**opts).resolved()  # type: ignore[arg-type]
    q = {k: v for k, v in opts.items()}
    if "iter_time" in q:  # qemu_create sets iter-time itself
        q = {}
        r = qemu_img("create", "-q", "-f", "qcow2", *secret_args(), "-o",
                     "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=-1",
                     str(tmp_path / "x.qcow2"), "1M", check=False)
        assert r.returncode != 0
        assert qemu_says in r.stderr, r.stderr
        return
    with pytest.raises(RuntimeError, match=qemu_says):
        qemu_create(tmp_path / "x.qcow2", "1M", **q)


def test_create_refuses_what_qemu_aborts_on() -> None:
    """aes-192 outside XTS: 24 * 4000 bytes of key material is not whole sectors, and qemu-img
    7.2 dies on an assertion in crypto/block.c (checked by hand: exit 134). We refuse it."""
    for mode in ("cbc", "ecb", "ctr"):
        with pytest.raises(RequestError):
            enc.LuksCreateOptions(cipher_alg="aes-192", cipher_mode=mode).resolved()


def test_create_defaults_and_iterations() -> None:
    o = enc.LuksCreateOptions().resolved()
    assert (o.cipher_alg, o.cipher_mode, o.ivgen_alg, o.ivgen_hash_alg, o.hash_alg, o.iter_time) == \
        ("aes-256", "xts", "plain64", None, "sha256", 2000)
    assert enc.LuksCreateOptions(ivgen_alg="essiv").resolved().ivgen_hash_alg == "sha256"
    assert enc.iterations_for(2000, 1000) == 2_000_000
    assert enc.iterations_for(2000, 1000, 8) == 250_000
    assert enc.iterations_for(0, 1000) == 1000
    assert enc.slot_sectors(64) == 504 and enc.slot_sectors(32) == 256


# --- Primitives against independent references ----------------------------------------------------


def test_pbkdf2_matches_hashlib() -> None:
    for h in enc.SUPPORTED_HASHES:
        salt = b"salt" * 8
        assert enc.pbkdf2(h, b"pw", salt, 1000, 64) == hashlib.pbkdf2_hmac(h, b"pw", salt, 1000, 64)


def test_af_split_merge_round_trip_and_diffusion() -> None:
    key = bytes(range(64))
    for h in ("sha1", "sha256", "sha512"):
        stripes = enc.af_split(h, key, 50, os.urandom)
        assert len(stripes) == 50 * 64
        assert enc.af_merge(h, 64, 50, stripes) == key
        flipped = bytes([stripes[0] ^ 1]) + stripes[1:]
        assert enc.af_merge(h, 64, 50, flipped) != key
    # Diffusion: pieces of the digest length, piece i hashed after its big-endian index; the
    # last, shorter piece (64 = 3 * 20 + 4 with sha1) is cut to length.
    block = bytes(range(64))
    expected = b"".join(hashlib.sha1(i.to_bytes(4, "big") + block[i * 20:i * 20 + 20]).digest()
                        [:len(block[i * 20:i * 20 + 20])] for i in range(4))
    assert enc.af_diffuse("sha1", block) == expected


def test_ivgens() -> None:
    xts = enc.SectorCipher(enc.CipherSpec("aes-128", "xts", "plain"), bytes(range(32)))
    assert xts.iv(0x1_0000_0002) == (2).to_bytes(16, "little")   # plain keeps 32 bits
    xts64 = enc.SectorCipher(enc.CipherSpec("aes-128", "xts", "plain64"), bytes(range(32)))
    assert xts64.iv(0x1_0000_0002) == (0x1_0000_0002).to_bytes(16, "little")
    ecb = enc.SectorCipher(enc.CipherSpec("aes-256", "ecb", "plain64"), bytes(32))
    assert ecb.iv(5) == b""
    cast = enc.SectorCipher(enc.CipherSpec("cast5-128", "cbc", "plain64"), bytes(16))
    assert cast.iv(7) == (7).to_bytes(8, "little")


def test_sector_cipher_refuses_misuse() -> None:
    c = enc.SectorCipher(enc.CipherSpec("aes-256", "xts", "plain64"), bytes(range(64)))
    with pytest.raises(RequestError):
        c.encrypt(0, b"x" * 100)
    with pytest.raises(RequestError):
        enc.SectorCipher(enc.CipherSpec("aes-256", "xts", "plain64"), bytes(16))
    with pytest.raises(UnsupportedFeature):   # OpenSSL refuses equal XTS halves
        enc.SectorCipher(enc.CipherSpec("aes-256", "xts", "plain64"), bytes(64)).encrypt(0, bytes(512))


def test_only_spec_errors_escape_on_garbage_headers(copy: Path) -> None:
    """Random bytes over the LUKS header: whatever happens is a spec.errors class."""
    start, _ = luks_area(copy)
    original = copy.read_bytes()[start:start + lk.LUKS_HEADER_SIZE]
    # Iteration counts are left alone: a large one is valid and only slow (up to 2**26).
    slow = {*range(164, 168), *(208 + 48 * i + k for i in range(8) for k in range(4, 8))}
    rnd = random.Random(16)
    for _ in range(40):
        data = bytearray(original)
        for _ in range(rnd.randint(1, 6)):
            i = rnd.choice([i for i in range(6, len(data)) if i not in slow])
            data[i] = rnd.randrange(256)
        patch(copy, start, bytes(data))
        with contextlib.suppress(Qcow2Error):
            decrypt_all(copy)


def test_qemu_stores_compressed_clusters_unencrypted(tmp_path: Path) -> None:
    """CRYPT-COMPRESSED: QEMU 7.2's `write -c` on a LUKS image succeeds, and the compressed
    cluster holds plain deflate data: it is read back without decryption."""
    p = qemu_create(tmp_path / "a.qcow2", "1M")
    qemu_io(p, "write -c -P 0x11 0 64k")
    with open_image(p) as img:
        l2 = img.l2_table(img.l1_table()[0] & en.L1E_OFFSET_MASK)
        word = l2[0]
        assert word & en.QCOW_OFLAG_COMPRESSED
        cb = img.cluster_bits
        off = en.compressed_host_offset(word, cb)
        n = en.compressed_nb_sectors(word, cb) * 512 - (off % 512)
        raw = img.read(off, min(n, img.file_size - off), "compressed")
    assert zlib.decompressobj(-15).decompress(raw)[:65536] == b"\x11" * 65536
    qemu_io(p, "read -P 0x11 0 64k")
