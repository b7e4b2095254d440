"""impl on encrypted images: what a request costs in counted host I/O (Image.stats()), that a
plain image keeps its hot paths, and byte identity with qemu-io where impl's own options
(L2 slice sizes, O_DIRECT) are in play. The guest-visible behaviour, on both engines, is
tests/conformance/test_encryption.py's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import impl
from impl.image import EncryptedImage, Image
from spec import header as hd
from spec.image import open_image
from tests.qemu import qemu_img

K, M = 1 << 10, 1 << 20
PASS = "impl-secret"
SECRET = ["--object", f"secret,id=sec0,data={PASS}"]


def _luks(path: Path, size: int = 8 * M, **opts: object) -> Path:
    impl.create(path, size, encrypt_format="luks", encrypt_key_secret=PASS, encrypt_iter_time=10,
                **opts)  # type: ignore[arg-type]
    return path


def _data(img: Image) -> tuple[int, int, int, int]:
    st = img.stats()
    return st["data_reads"], st["data_read_bytes"], st["data_writes"], st["data_write_bytes"]


def _host_cluster(path: Path, guest: int) -> int:
    """The host offset of the data cluster mapping ``guest`` (read with spec/, no key)."""
    mask = ((1 << 56) - 1) & ~0x1FF
    with open_image(path) as img:
        cs = img.cluster_size
        img.f.seek(int(img.header.l1_table_offset) + 8 * (guest // (cs * (cs // 8))))
        l2 = int.from_bytes(img.f.read(8), "big") & mask
        img.f.seek(l2 + 8 * (guest // cs % (cs // 8)))
        return int.from_bytes(img.f.read(8), "big") & mask


def test_plain_images_keep_their_hot_paths(tmp_path: Path) -> None:
    """Only an encrypted image is an EncryptedImage; a plain one keeps the inline read."""
    plain = tmp_path / "p.qcow2"
    impl.create(plain, M)
    with impl.open(plain, key_secret="ignored") as img:
        assert type(img) is Image and img._fast_read is not None and img.s.crypto is None
    with impl.open(_luks(tmp_path / "e.qcow2"), key_secret=PASS) as img:
        assert isinstance(img, EncryptedImage) and img._fast_read is None and img.s.crypto is not None


def test_reads_are_one_host_read_of_whole_sectors(tmp_path: Path) -> None:
    p = _luks(tmp_path / "a.qcow2")
    with impl.open(p, key_secret=PASS) as img:
        img.write(0, b"\x5a" * (128 * K))
    with impl.open(p, key_secret=PASS) as img:
        img.read(0, 512)  # loads the L2 slice
        img.reset_stats()
        assert img.read(4 * K, 4 * K) == b"\x5a" * (4 * K)
        assert _data(img) == (1, 4 * K, 0, 0)
        img.reset_stats()
        assert img.read(100, 1000) == b"\x5a" * 1000  # sectors 0-2
        assert _data(img) == (1, 1536, 0, 0)
        img.reset_stats()
        assert img.read(1000, 100 * K) == b"\x5a" * (100 * K)  # two host-contiguous clusters
        assert _data(img)[:2] == (1, 512 * 202 - 512)  # sectors 1 to 201


def test_overwrites_in_place(tmp_path: Path) -> None:
    """A sector-aligned overwrite is one encrypted host write and no metadata; a sub-sector
    one first reads its sector (one read, both edges merged, as bdrv_init_padding does)."""
    p = _luks(tmp_path / "a.qcow2")
    with impl.open(p, key_secret=PASS) as img:
        img.write(0, b"\x5a" * (64 * K))
        img.reset_stats()
        img.write(4 * K, b"\x11" * (4 * K))
        assert _data(img) == (0, 0, 1, 4 * K)
        assert img.stats()["meta_writes"] == 0
        img.reset_stats()
        img.write(8 * K + 100, b"\x22" * 10)
        assert _data(img) == (1, 512, 1, 512)
        img.reset_stats()
        img.write(12 * K + 100, b"\x33" * 1000)  # head and tail sectors apart: two reads
        assert _data(img) == (2, 1024, 1, 1536)
        expected = bytearray(b"\x5a" * (64 * K))
        expected[4 * K:8 * K] = b"\x11" * (4 * K)
        expected[8 * K + 100:8 * K + 110] = b"\x22" * 10
        expected[12 * K + 100:12 * K + 1100] = b"\x33" * 1000
        assert img.read(0, 64 * K) == bytes(expected)


def test_cow_write_over_an_encrypted_backing_file_is_one_read_and_one_write(tmp_path: Path) -> None:
    """The backing file's plaintext (one read there) and the new data are encrypted for
    the overlay's new cluster and written in one host write; nothing is read from the
    overlay and no COW region is zeroed on the host."""
    base = _luks(tmp_path / "base.qcow2")
    with impl.open(base, key_secret=PASS) as img:
        img.write(0, b"\x5a" * (8 * M))
    top = _luks(tmp_path / "top.qcow2", backing_file=base.name, backing_fmt="qcow2")
    with impl.open(top, key_secret=PASS, backing_key_secret=PASS) as img:
        img.write(0, b"a" * 512)  # allocates the L2 table
        img.reset_stats()
        img.write(64 * K + 1024, b"b" * 3072)  # head and tail COW, merged (perform_cow)
        assert _data(img) == (0, 0, 1, 64 * K)
        assert img.backing.stats()["data_reads"] == 1
        assert img.stats()["meta_writes"] == 0
        assert img.read(64 * K, 64 * K) == b"\x5a" * 1024 + b"b" * 3072 + b"\x5a" * (60 * K)


def test_cow_out_of_a_snapshot_is_one_read_and_one_write(tmp_path: Path) -> None:
    """The shared cluster is read and decrypted once (both COW regions merged), and
    re-encrypted for its new host offset. A write that does not cover whole sectors
    first reads its partial head and tail sectors, as QEMU's block layer pads it
    (bdrv_padding_rmw_read) before the driver's COW reads the cluster: three reads."""
    p = _luks(tmp_path / "a.qcow2")
    with impl.open(p, key_secret=PASS) as img:
        img.write(0, b"\x5a" * (128 * K))
        img.snapshot_create("s")
        img.reset_stats()
        img.write(1024, b"\x11" * 3072)
        assert _data(img) == (1, 64 * K, 1, 64 * K)
        img.reset_stats()
        img.write(64 * K + 1000, b"\x22" * 3000)
        assert _data(img) == (3, 64 * K + 1024, 1, 64 * K)
        assert img.read(0, 128 * K) == (b"\x5a" * 1024 + b"\x11" * 3072 + b"\x5a" * (60 * K)
                                        + b"\x5a" * 1000 + b"\x22" * 3000 + b"\x5a" * (60 * K + 96))


def test_zero_cow_regions_are_written_encrypted(tmp_path: Path) -> None:
    """No handle_alloc_space shortcut on an encrypted image: the COW regions of a fresh
    cluster are encrypted zeros in the file, not a hole, and cost no host read."""
    p = _luks(tmp_path / "a.qcow2")
    with impl.open(p, key_secret=PASS) as img:
        img.write(0, b"x")  # allocates the L2 table; cluster 0 now holds data
        img.reset_stats()
        img.write(2 * 64 * K + 1000, b"\x11" * 3000)
        assert _data(img) == (0, 0, 1, 64 * K)
    host = _host_cluster(p, 2 * 64 * K)
    tail = p.read_bytes()[host + 8 * K:host + 64 * K]
    assert len(tail) == 56 * K and tail.count(0) < len(tail) // 2


def test_legacy_aes_counts(tmp_path: Path) -> None:
    """Legacy AES numbers sectors by guest offset; the costs are LUKS's."""
    p = tmp_path / "a.qcow2"
    impl.create(p, 4 * M, encrypt_format="aes", encrypt_key_secret=PASS)
    with impl.open(p, key_secret=PASS) as img:
        img.write(0, b"\x5a" * (64 * K))
        img.reset_stats()
        assert img.read(512, 1024) == b"\x5a" * 1024
        assert _data(img) == (1, 1024, 0, 0)


# --- byte identity with qemu-io under impl's own options --------------------------------------


def _qemu_io(path: Path, cmds: list[str], entry_size: int | None) -> None:
    spec = f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"
    if entry_size:
        spec += f",l2-cache-entry-size={entry_size}"
    argv = ["qemu-io", *SECRET, "-t", "unsafe", "--image-opts", spec]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=path.parent)
    assert "failed" not in r.stdout and "error" not in r.stdout.lower(), r.stdout


def _apply(img: Image, cmd: str) -> None:
    words = cmd.split()
    off, n = int(words[-2]), int(words[-1])
    if words[0] == "discard":
        img.discard(off, n)
    elif "-z" in words:
        img.write_zeroes(off, n, unmap="-u" in words)
    elif "-c" in words:
        img.write_compressed(off, bytes([int(words[words.index("-P") + 1], 16)]) * n)
    else:
        img.write(off, bytes([int(words[words.index("-P") + 1], 16)]) * n)


def _ops(cs: int, per_slice: int) -> list[str]:
    """Partial sectors and clusters, COW on both sides, zeroing, discard, compression, and
    writes across L2 slice ends."""
    return [
        "write -P 0x11 0 4096",
        f"write -P 0x22 {cs - 100} {cs + 300}",
        f"write -P 0x33 {5 * cs + 7} 1000",
        f"write -z {8 * cs} {2 * cs}",
        f"write -z {cs + 100} 3000",
        f"discard {5 * cs} {cs}",
        f"write -c -P 0x55 {20 * cs} {cs}",
        f"write -P 0x44 {per_slice - 3000} 9000",
        f"write -P 0x66 {2 * per_slice - cs - 7} {2 * cs + 14}",
        f"write -z {per_slice - cs} {3 * cs}",
        f"write -P 0x77 {20 * cs + 512} 512",
    ]


@pytest.mark.parametrize(("entry_size", "extended_l2", "cache"), [
    (None, False, "writeback"), (4096, False, "writeback"), (4096, True, "writeback"),
    (None, False, "none"),
], ids=["whole-tables", "4k-slices", "4k-slices-extl2", "o-direct"])
def test_requests_match_qemu_io(tmp_path: Path, entry_size: int | None, extended_l2: bool,
                                cache: str) -> None:
    cs = 65536
    per_slice = (entry_size or cs) // (16 if extended_l2 else 8) * cs
    size = 3 * per_slice
    q, i = tmp_path / "q.qcow2", tmp_path / "i.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", *SECRET, "-o",
             f"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,"
             f"extended_l2={'on' if extended_l2 else 'off'}", str(q), str(size), cwd=tmp_path)
    i.write_bytes(q.read_bytes())
    ops = _ops(cs, per_slice)
    _qemu_io(q, ops, entry_size)
    kw = {"l2_cache_entry_size": entry_size} if entry_size else {}
    with impl.open(i, key_secret=PASS, cache=cache, **kw) as img:
        for op in ops:
            _apply(img, op)
    assert q.read_bytes() == i.read_bytes()
    with open_image(i) as img:
        assert img.extension(hd.QCOW2_EXT_MAGIC_CRYPTO_HEADER) is not None
