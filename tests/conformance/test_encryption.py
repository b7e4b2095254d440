"""Each engine on encrypted images, against qemu-io (QEMU 7.2).

The strongest check runs the same operations with qemu-io and with the engine on two copies
of one encrypted image qemu-img made, so both use the same master key: the two files must
then be byte-identical (ciphertext, COW, metadata and all), and each side must read what the
other wrote. Then: images the engine creates against qemu-img's (same layout, the random LUKS
area aside; legacy AES images entirely equal), qemu-io reading what the engine wrote into its
own images, backing files, and the errors of opening with no key, a wrong key or a damaged
header.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from spec import header as hd
from spec.errors import FormatError, Qcow2Error, RequestError, UnsupportedFeature, WrongKey
from spec.image import open_image
from tests.qemu import qemu_img

PASS = "qcow2lab-model"  # the passphrase; the name is historical
SECRET = ["--object", f"secret,id=sec0,data={PASS}"]

Op = tuple[object, ...]


def qemu_create(path: Path, size: str = "4M", fmt: str = "luks", opts: str = "") -> Path:
    o = f"encrypt.format={fmt},encrypt.key-secret=sec0"
    if fmt == "luks":
        o += ",encrypt.iter-time=10"
    qcow2_opts = ("cluster_size", "compat", "preallocation", "extended_l2", "data_file", "data_file_raw")
    for opt in filter(None, opts.split(",")):
        o += "," + (opt if opt.split("=")[0] in qcow2_opts else f"encrypt.{opt}")
    r = qemu_img("create", "-q", "-f", "qcow2", *SECRET, "-o", o, str(path), size, cwd=path.parent,
                 check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    return path


def image_opts(path: Path, backing: bool = False) -> str:
    o = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"
    return o + (",backing.encrypt.key-secret=sec0" if backing else "")


def qemu_io(path: Path, *cmds: str, backing: bool = False, check: bool = True) -> str:
    argv = ["qemu-io", *SECRET, "--image-opts", image_opts(path, backing)]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=path.parent)
    if check and (r.returncode or "error" in r.stdout.lower() or "fail" in r.stdout.lower()):
        raise AssertionError(f"qemu-io {cmds}: {r.stdout}{r.stderr}")
    return r.stdout


def qemu_content(path: Path, backing: bool = False) -> bytes:
    out = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", *SECRET, "--image-opts", image_opts(path, backing), "-O", "raw",
                    str(out)], check=True, capture_output=True, cwd=path.parent)
    return out.read_bytes()


def qemu_map(path: Path, backing: bool = False) -> str:
    return subprocess.run(["qemu-img", "map", "--output=json", *SECRET, "--image-opts",
                           image_opts(path, backing)], check=True, capture_output=True, text=True,
                          cwd=path.parent).stdout


def qemu_check(path: Path) -> str:
    return subprocess.run(["qemu-img", "check", *SECRET, "--image-opts", image_opts(path)],
                          check=True, capture_output=True, text=True).stdout


def qemu_ran_on_a_copy(base: Path, tmp_path: Path, ops: list[Op]) -> tuple[Path, Path]:
    """Two copies of ``base``: the first after qemu-io ran ``ops``, the second untouched, for
    the engine to run them on; the files are then compared byte for byte."""
    theirs, ours = tmp_path / "qemu.qcow2", tmp_path / "ours.qcow2"
    theirs.write_bytes(base.read_bytes())
    ours.write_bytes(base.read_bytes())
    qemu_io(theirs, *(qemu_cmd(op) for op in ops))
    return theirs, ours


def qemu_cmd(op: Op) -> str:
    kind, off, n, *rest = op
    if kind == "write":
        return f"write -P {rest[0]:#x} {off} {n}"
    if kind == "zero":
        return f"write -z {'-u ' if rest and rest[0] else ''}{off} {n}"
    if kind == "discard":
        return f"discard {off} {n}"
    if kind == "compressed":
        return f"write -c -P {rest[0]:#x} {off} {n}"
    raise ValueError(kind)


def engine_apply(img: Any, op: Op) -> None:
    kind, off, n, *rest = op
    assert isinstance(off, int) and isinstance(n, int)
    if kind == "write":
        assert isinstance(rest[0], int)
        img.write(off, bytes([rest[0]]) * n)
    elif kind == "zero":
        img.write_zeroes(off, n, unmap=bool(rest and rest[0]))
    elif kind == "discard":
        img.discard(off, n)
    elif kind == "compressed":
        assert isinstance(rest[0], int)
        img.write_compressed(off, bytes([rest[0]]) * n)


K = 1024
SEQUENCES: dict[str, list[Op]] = {
    "aligned": [("write", 0, 64 * K, 0x5A), ("write", 1 << 20, 128 * K, 0x11)],
    "sub-sector": [("write", 100, 1000, 0x22), ("write", 64 * K - 7, 20, 0x33), ("write", 3 << 20, 1, 0x44)],
    "cow-in-place": [("write", 0, 64 * K, 0x5A), ("write", 4 * K + 13, 333, 0x66), ("write", 0, 512, 0x77)],
    "zeroes": [("write", 0, 192 * K, 0x5A), ("zero", 100, 70 * K, False), ("zero", 64 * K, 64 * K, True),
               ("zero", 200 * K + 1, 10, False), ("zero", 1 << 20, 64 * K + 512, False)],
    "discard": [("write", 0, 256 * K, 0x5A), ("discard", 64 * K, 64 * K), ("discard", 1000, 5000),
                ("write", 70 * K, 512, 0x12)],
    "compressed": [("compressed", 0, 64 * K, 0x13), ("compressed", 64 * K, 64 * K, 0x14),
                   ("write", 64 * K + 4 * K, 100, 0x15)],
}


def byte_diff(a: bytes, b: bytes) -> list[int]:
    """Offsets of the first few differing 512-byte sectors (for a readable failure)."""
    out = [i for i in range(0, max(len(a), len(b)), 512) if a[i:i + 512] != b[i:i + 512]]
    return out[:8] + ([len(a), len(b)] if len(a) != len(b) else [])


@pytest.fixture(scope="module")
def luks_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qemu_create(tmp_path_factory.mktemp("enc") / "base.qcow2")


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_same_operations_same_file(engine: ModuleType, tmp_path: Path, luks_base: Path, name: str) -> None:
    """qemu-io and the engine on copies of one LUKS image: byte-identical files afterwards."""
    ops = SEQUENCES[name]
    theirs, ours = qemu_ran_on_a_copy(luks_base, tmp_path, ops)
    with engine.open(ours, key_secret=PASS) as img:
        for op in ops:
            engine_apply(img, op)
        content = img.read(0, img.size)
        our_map = img.map()
    a, b = theirs.read_bytes(), ours.read_bytes()
    assert a == b, f"files differ at sectors {byte_diff(a, b)}"
    assert content == qemu_content(theirs)
    assert '"offset"' not in qemu_map(theirs)  # QEMU hides host offsets of encrypted images
    assert all("offset" not in e for e in our_map)


@pytest.mark.parametrize("opts", ["", "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
                                  "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=plain",
                                  "cipher-alg=aes-256,cipher-mode=ctr"],
                         ids=["default", "aes-128-cbc-essiv", "cast5-cbc-plain", "aes-256-ctr"])
def test_ciphers_read_both_ways(engine: ModuleType, tmp_path: Path, opts: str) -> None:
    """qemu-io writes, the engine reads; the engine writes, qemu-io reads; several ciphers."""
    p = qemu_create(tmp_path / "a.qcow2", opts=opts)
    qemu_io(p, "write -P 0x5a 0 64k", "write -P 0xa5 1000 3000")
    expected = qemu_content(p)
    with engine.open(p, key_secret=PASS) as img:
        assert img.read(0, img.size) == expected
        img.write(2 << 20, b"\x42" * 5000)
        img.write(30, b"\x43" * 10)
    qemu_io(p, "read -P 0x42 2M 5000", "read -P 0x43 30 10", "read -P 0x5a 40 960")


def test_extended_l2_and_v2(engine: ModuleType, tmp_path: Path) -> None:
    for opts, ops in (("cluster_size=65536,extended_l2=on", [("write", 5000, 3000, 0x21),
                                                             ("zero", 8 * K, 2 * K, False),
                                                             ("write", 2 * K + 1, 10, 0x22)]),
                      ("compat=0.10", [("write", 0, 3000, 0x31), ("zero", 0, 64 * K, False),
                                       ("write", 512, 512, 0x32)])):
        base = qemu_create(tmp_path / "base.qcow2", opts=opts)
        theirs, ours = qemu_ran_on_a_copy(base, tmp_path, ops)
        with engine.open(ours, key_secret=PASS) as img:
            for op in ops:
                engine_apply(img, op)
        assert theirs.read_bytes() == ours.read_bytes(), opts
        base.unlink()


def test_backing_files(engine: ModuleType, tmp_path: Path) -> None:
    """An encrypted overlay over an encrypted backing file (each with its key) and over a plain
    one: COW copies the backing plaintext and encrypts it for the overlay's cluster."""
    base = qemu_create(tmp_path / "base.qcow2", "1M")
    qemu_io(base, "write -P 0x44 0 1M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *SECRET, "-b", "base.qcow2", "-F", "qcow2",
             "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", str(top), "1M",
             cwd=tmp_path)
    theirs, ours = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    theirs.write_bytes(top.read_bytes())
    ours.write_bytes(top.read_bytes())
    qemu_io(theirs, "write -P 0x55 512 512", "write -z 128k 4k", backing=True)
    with pytest.raises(RequestError):  # the backing file needs its own key, as in QEMU
        engine.open(ours, key_secret=PASS)
    with engine.open(ours, key_secret=PASS, backing_key_secret=PASS) as img:
        img.write(512, b"\x55" * 512)
        img.write_zeroes(128 * K, 4 * K)
    assert theirs.read_bytes() == ours.read_bytes()
    assert qemu_content(theirs, backing=True) == b"\x44" * 512 + b"\x55" * 512 + b"\x44" * (127 * K) + \
        bytes(4 * K) + b"\x44" * (1024 * K - 132 * K)

    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x66 0 1M", str(plain)], check=True,
                   capture_output=True)
    over = tmp_path / "over.qcow2"
    engine.create(over, 1 << 20, backing_file="plain.qcow2", backing_fmt="qcow2", encrypt_format="luks",
                 encrypt_key_secret=PASS, encrypt_iter_time=1)
    with engine.open(over, key_secret=PASS) as img:
        img.write(100, b"\x77")
        assert img.read(0, 200) == b"\x66" * 100 + b"\x77" + b"\x66" * 99
    qemu_io(over, "read -P 0x66 0 100", "read -P 0x77 100 1", "read -P 0x66 101 64k")


def _masked(path: Path) -> bytes:
    """The file with its LUKS area blanked (random salts, keys and digests)."""
    data = bytearray(path.read_bytes())
    with open_image(path) as img:
        ext = img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        if ext is not None:
            start, n = int(ext.data.offset), int(ext.data.length)
            data[start:start + n] = bytes(n)
    return bytes(data)


@pytest.mark.parametrize(("size", "opts", "kw"), [
    ("4M", "", {}),
    ("64G", "cluster_size=4096", {"cluster_size": 4096}),
    ("4M", "compat=0.10", {"version": 2}),
    ("1M", "preallocation=metadata", {"preallocation": "metadata"}),
    ("4M", "cluster_size=16384,extended_l2=on,cipher-alg=aes-128,ivgen-alg=essiv",
     {"cluster_size": 16384, "extended_l2": True, "encrypt_cipher_alg": "aes-128",
      "encrypt_ivgen_alg": "essiv"}),
], ids=["default", "4k-64G", "v2", "prealloc-metadata", "extl2-essiv"])
def test_create_layout_matches_qemu_img(engine: ModuleType, tmp_path: Path, size: str, opts: str,
                                        kw: dict[str, object]) -> None:
    theirs = qemu_create(tmp_path / "q.qcow2", size, opts=opts)
    ours = tmp_path / "m.qcow2"
    nbytes = int(size[:-1]) << {"M": 20, "G": 30}[size[-1]]
    engine.create(ours, nbytes, encrypt_format="luks", encrypt_key_secret=PASS, encrypt_iter_time=10,
                 **kw)  # type: ignore[arg-type]
    assert _masked(theirs) == _masked(ours)
    qemu_io(ours, "write -P 0x5a 0 4k", "read -P 0x5a 0 4k")
    assert "No errors" in qemu_check(ours)
    info = subprocess.run(["qemu-img", "info", "--output=json", str(ours)], check=True, capture_output=True,
                          text=True).stdout
    assert '"format": "luks"' in info


def test_legacy_aes_images_are_identical(engine: ModuleType, tmp_path: Path) -> None:
    """crypt_method 1 has nothing random: create and the same writes give qemu-img's very file."""
    theirs = qemu_create(tmp_path / "q.qcow2", fmt="aes")
    ours = tmp_path / "m.qcow2"
    engine.create(ours, 4 << 20, encrypt_format="aes", encrypt_key_secret=PASS)
    assert theirs.read_bytes() == ours.read_bytes()
    ops: list[Op] = [("write", 100, 70 * K, 0x5A), ("zero", 4 * K, 4 * K, False), ("write", 1 << 20, 1, 0x1)]
    qemu_io(theirs, *(qemu_cmd(op) for op in ops))
    with engine.open(ours, key_secret=PASS) as img:
        for op in ops:
            engine_apply(img, op)
    assert theirs.read_bytes() == ours.read_bytes()
    with engine.open(ours, key_secret="wrong", readonly=True) as img:  # nothing checks an AES key
        assert img.read(100, 10) != b"\x5a" * 10


def test_open_errors(engine: ModuleType, tmp_path: Path, luks_base: Path) -> None:
    p = tmp_path / "a.qcow2"
    p.write_bytes(luks_base.read_bytes())
    with pytest.raises(RequestError) as e:
        engine.open(p)
    assert not isinstance(e.value, WrongKey)
    with pytest.raises(WrongKey):
        engine.open(p, key_secret="not the key")
    with pytest.raises(RequestError):
        engine.open(p, key_secret=12345)
    with open_image(p) as img:
        ext = img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        assert ext is not None
        start = int(ext.data.offset)
    data = bytearray(p.read_bytes())
    data[start + 592 - 8 * 48 + 44:start + 592 - 8 * 48 + 48] = (1).to_bytes(4, "big")  # slot 0 stripes
    p.write_bytes(bytes(data))
    with pytest.raises(FormatError):
        engine.open(p, key_secret=PASS)
    p.write_bytes(luks_base.read_bytes()[:start + 3000])
    with pytest.raises(FormatError):
        engine.open(p, key_secret=PASS)
    plain = tmp_path / "plain.qcow2"
    engine.create(plain, 1 << 20)
    with engine.open(plain, key_secret="ignored") as img:  # QEMU ignores encrypt.key-secret here
        img.write(0, b"x")


def test_unsupported_cipher_is_named(engine: ModuleType, tmp_path: Path) -> None:
    p = qemu_create(tmp_path / "a.qcow2", "1M", opts="cipher-alg=twofish-128")
    with pytest.raises(UnsupportedFeature) as e:
        engine.open(p, key_secret=PASS)
    assert "twofish-128" in e.value.feature
    with pytest.raises(UnsupportedFeature):
        engine.create(tmp_path / "b.qcow2", 1 << 20, encrypt_format="luks", encrypt_key_secret=PASS,
                     encrypt_cipher_alg="serpent-256")


@pytest.mark.parametrize("kw", [
    {"encrypt_key_secret": PASS},                                              # format missing
    {"encrypt_format": "luks"},                                                # key missing
    {"encrypt_format": "aes", "encrypt_key_secret": PASS, "encrypt_cipher_alg": "aes-128"},
    {"encrypt_format": "foo", "encrypt_key_secret": PASS},
    {"encrypt_format": "luks", "encrypt_key_secret": PASS, "encrypt_cipher_alg": "3des"},
    {"encrypt_format": "luks", "encrypt_key_secret": PASS, "encrypt_iter_time": -1},
    {"encrypt_format": "luks", "encrypt_key_secret": PASS, "encrypt_cipher_alg": "aes-192",
     "encrypt_cipher_mode": "cbc"},                                            # qemu-img aborts
], ids=["no-format", "no-key", "aes-options", "bad-format", "3des", "iter-time", "aes-192-cbc"])
def test_create_refusals(engine: ModuleType, tmp_path: Path, kw: dict[str, object]) -> None:
    with pytest.raises(RequestError):
        engine.create(tmp_path / "x.qcow2", 1 << 20, **kw)  # type: ignore[arg-type]


def test_snapshots_on_encrypted_images(engine: ModuleType, tmp_path: Path, luks_base: Path) -> None:
    p = tmp_path / "a.qcow2"
    p.write_bytes(luks_base.read_bytes())
    with engine.open(p, key_secret=PASS) as img:
        img.write(0, b"\x01" * 4096)
        img.snapshot_create("s1")
        img.write(0, b"\x02" * 4096)
    qemu_io(p, "read -P 2 0 4k")
    with engine.open(p, key_secret=PASS) as img:
        img.snapshot_apply("s1")
    qemu_io(p, "read -P 1 0 4k")


def _random_ops(rnd: random.Random, size: int, cluster: int) -> list[Op]:
    """Offsets near cluster and sector boundaries, lengths from 1 byte to a few clusters."""
    def point() -> int:
        within = rnd.choice([0, 0, 512, cluster // 2, cluster - 512])
        base = rnd.randrange(0, size // cluster) * cluster + within
        return max(0, min(size - 1, base + rnd.choice([0, 0, 0, -1, 1, -7, 100])))

    ops: list[Op] = []
    for _ in range(rnd.randint(3, 8)):
        off = point()
        n = max(1, min(size - off, rnd.choice([1, 511, 512, 4096, cluster, cluster + 3, 3 * cluster])))
        kind = rnd.choice(["write", "write", "write", "zero", "zero_unmap", "discard", "compressed"])
        if kind == "compressed":
            off, n = off - off % cluster, cluster
            if off + n > size:
                continue
            ops.append(("compressed", off, n, rnd.randrange(1, 256)))
        elif kind == "write":
            ops.append(("write", off, n, rnd.randrange(1, 256)))
        elif kind == "discard":
            ops.append(("discard", off, n))
        else:
            ops.append(("zero", off, n, kind == "zero_unmap"))
    return ops


@pytest.mark.parametrize("opts", ["cluster_size=4096", "cluster_size=16384,extended_l2=on"])
def test_random_sequences_give_qemus_file(engine: ModuleType, tmp_path: Path, opts: str) -> None:
    """Fixed-seed random sequences of writes, zero writes, discards and compressed writes at
    unaligned offsets: qemu-io and the engine, from one LUKS image, write identical files."""
    size = 256 * K
    base = qemu_create(tmp_path / "base.qcow2", f"{size // K}K", opts=opts)
    cluster = 4096 if "4096" in opts else 16384
    rnd = random.Random(f"luks-{opts}")
    for i in range(15):
        ops = _random_ops(rnd, size, cluster)
        theirs, ours = tmp_path / f"q{i}.qcow2", tmp_path / f"m{i}.qcow2"
        theirs.write_bytes(base.read_bytes())
        ours.write_bytes(base.read_bytes())
        # A compressed write over an allocated cluster fails in QEMU (EIO) and in the engine
        # (RequestError); the rest of the sequence goes on on both sides.
        out = qemu_io(theirs, *(qemu_cmd(op) for op in ops), check=False)
        failed = 0
        with engine.open(ours, key_secret=PASS) as img:
            for op in ops:
                try:
                    engine_apply(img, op)
                except Qcow2Error:
                    failed += 1
        assert out.count("failed") == failed, (ops, out)
        a, b = theirs.read_bytes(), ours.read_bytes()
        assert a == b, f"{ops}: files differ at sectors {byte_diff(a, b)}"
        theirs.unlink()
        ours.unlink()
