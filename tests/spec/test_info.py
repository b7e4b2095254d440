"""``qcow2lab info`` against ``qemu-img info``: the same bytes on stdout, JSON and human.

Every image of the catalogue (and the shared corpus) is described by both tools, with and
without --backing-chain, and the outputs must be identical byte for byte. For JSON the parsed
dicts, and the key order at every level, are compared too, so a failure says what differs.
Beyond the catalogue, images are crafted here for what QEMU prints in rarer cases: AES and
several LUKS headers, bitmaps without flags or in use, snapshot tables with unusual names,
sizes, clocks and extra data, odd virtual sizes, the corrupt and dirty bits, backing names
with NUL or non-UTF-8 bytes, relative and raw backing chains, and the failures (missing files,
loops, locks held by a writer).

The files are quiescent while both tools look at them, so actual-size is compared exactly.
Snapshot dates are printed in local time by both; the two processes share the TZ setting.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from difftest.cli import main
from difftest.cli.info import (
    image_info,
    info_output,
    json_string,
    probe_format,
    size_to_str,
)
from spec import info as si
from spec.errors import FormatError, Qcow2Error, RequestError, UnsupportedFeature
from spec.image import open_image
from spec.luks import LUKS_HEADER_SIZE, LuksHeader, luks_info, read_luks_header
from tests.images import BUILDERS, corpus_images
from tests.qemu import create, qemu_img, qemu_io

IMAGE_NAMES = [*BUILDERS, *(f"corpus:{p.name}" for p in corpus_images())]


# --- the two tools -------------------------------------------------------------------------

def qemu_info(path: str | Path, *, output: str, chain: bool = False, cwd: Path | None = None,
              share: bool = True, fmt: str | None = None) -> subprocess.CompletedProcess[bytes]:
    argv = ["qemu-img", "info", f"--output={output}"]
    argv += ["-U"] if share else []
    argv += ["--backing-chain"] if chain else []
    argv += ["-f", fmt] if fmt else []
    return subprocess.run([*argv, str(path)], capture_output=True, cwd=cwd)


def ours(path: str | Path, *, output: str, chain: bool = False, cwd: Path | None = None,
         share: bool = True, fmt: str | None = None) -> bytes:
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return info_output(str(path), output=output, chain=chain, fmt=fmt, force_share=share)
    finally:
        os.chdir(old)


def key_order(obj: Any) -> Any:
    """The keys of every dict, in order, at every level: dict equality ignores order."""
    if isinstance(obj, dict):
        return [(k, key_order(v)) for k, v in obj.items()]
    if isinstance(obj, list):
        return [key_order(v) for v in obj]
    return None


def assert_same(path: str | Path, *, chain: bool = False, cwd: Path | None = None,
                fmt: str | None = None) -> dict[str, bytes]:
    """Both outputs of both tools agree; returns our outputs by format."""
    got = {}
    for output in ("json", "human"):
        q = qemu_info(path, output=output, chain=chain, cwd=cwd, fmt=fmt)
        assert q.returncode == 0, q.stderr.decode()
        o = ours(path, output=output, chain=chain, cwd=cwd, fmt=fmt)
        if output == "json":
            mine, theirs = json.loads(o), json.loads(q.stdout)
            assert mine == theirs
            assert key_order(mine) == key_order(theirs)
        assert o.decode("utf-8", "replace") == q.stdout.decode("utf-8", "replace")
        assert o == q.stdout
        got[output] = o
    return got


def assert_both_fail(path: str | Path, error: type[Qcow2Error], *, chain: bool = False,
                     cwd: Path | None = None, fmt: str | None = None) -> None:
    q = qemu_info(path, output="json", chain=chain, cwd=cwd, fmt=fmt)
    assert q.returncode == 1 and q.stdout == b""
    with pytest.raises(error):
        ours(path, output="json", chain=chain, cwd=cwd, fmt=fmt)


# --- every catalogue image -----------------------------------------------------------------

@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_same_as_qemu_img(qemu_images: dict[str, Path], name: str) -> None:
    assert_same(qemu_images[name])


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_backing_chain_same_as_qemu_img(qemu_images: dict[str, Path], name: str) -> None:
    out = assert_same(qemu_images[name], chain=True)
    chain = json.loads(out["json"])
    assert isinstance(chain, list) and chain[0]["filename"] == str(qemu_images[name])


def test_catalogue_covers_backing_files(qemu_images: dict[str, Path]) -> None:
    """The chain test above means something only if some images have backing files."""
    with_backing = [n for n in ("v2-backing", "extended-l2")
                    if "backing-filename" in image_info(str(qemu_images[n]))]
    assert with_backing == ["v2-backing", "extended-l2"]
    chain = json.loads(ours(qemu_images["v2-backing"], output="json", chain=True))
    assert [i["format"] for i in chain] == ["qcow2", "qcow2"]
    assert chain[1]["filename"] == chain[0]["full-backing-filename"]


def test_dirty_flag(qemu_images: dict[str, Path]) -> None:
    """A lazy-refcounts image left open by a killed writer is reported dirty, as by QEMU."""
    info = image_info(str(qemu_images["lazy-dirty"]))
    assert info["dirty-flag"] is True
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    assert b"cleanly shut down: no\n" in ours(qemu_images["lazy-dirty"], output="human")
    assert image_info(str(qemu_images["v3"]))["dirty-flag"] is False


def test_luks_without_secret(qemu_images: dict[str, Path]) -> None:
    """qemu-img info reads the LUKS header without the key; so do we, field for field."""
    info = image_info(str(qemu_images["luks"]))
    enc = info["format-specific"]["data"]["encrypt"]
    assert info["encrypted"] is True
    assert (enc["format"], enc["cipher-alg"], enc["cipher-mode"]) == ("luks", "aes-256", "xts")
    assert [s["active"] for s in enc["slots"]] == [True] + [False] * 7
    assert "ivgen-hash-alg" not in enc


def test_image_info_is_qemu_json(qemu_images: dict[str, Path]) -> None:
    """image_info() (used by ``qcow2lab run``) is the parsed qemu-img JSON, keys in order."""
    for name in ("v3", "snapshots", "bitmap", "luks", "v2-backing"):
        path = qemu_images[name]
        theirs = json.loads(qemu_info(path, output="json").stdout)
        mine = image_info(str(path))
        assert mine == theirs
        assert key_order(mine) == key_order(theirs)


def test_image_file_info_for_model_and_impl(qemu_images: dict[str, Path]) -> None:
    """The entry point model/ and impl/ use: an ImageFile in, the qemu-img info data out."""
    path = qemu_images["snapshots"]
    with open_image(str(path)) as img:
        info = si.image_file_info(img)
    assert info == image_info(str(path))
    assert key_order(info) == key_order(image_info(str(path)))


# --- relative and raw backing chains ---------------------------------------------------------

@pytest.fixture
def raw_chain(tmp_path: Path) -> Path:
    """sub/top.qcow2 -> ../mid.qcow2 (qcow2) -> base.raw (raw), all with relative names."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * 1000)  # not a multiple of 512: raw rounds the size up
    create(tmp_path / "mid.qcow2", "1M", backing="base.raw", backing_fmt="raw")
    (tmp_path / "sub").mkdir()
    create(tmp_path / "sub" / "top.qcow2", "2M", backing="../mid.qcow2", backing_fmt="qcow2")
    return tmp_path


def test_raw_backing_chain_relative(raw_chain: Path) -> None:
    out = assert_same("sub/top.qcow2", chain=True, cwd=raw_chain)
    chain = json.loads(out["json"])
    assert [i["filename"] for i in chain] == ["sub/top.qcow2", "sub/../mid.qcow2", "sub/../base.raw"]
    assert chain[2] == si.raw_info("sub/../base.raw", 1000, chain[2]["actual-size"])
    assert chain[2]["virtual-size"] == 1024
    assert b"(actual path: sub/../mid.qcow2)" in out["human"]


def test_raw_backing_chain_absolute(raw_chain: Path) -> None:
    assert_same(raw_chain / "sub" / "top.qcow2", chain=True)
    assert_same(raw_chain / "sub" / "top.qcow2")


def test_raw_image_and_forced_format(raw_chain: Path) -> None:
    """A raw file is probed as raw; -f raw on a qcow2 file describes the file as raw."""
    assert_same(raw_chain / "base.raw")
    assert_same(raw_chain / "mid.qcow2", fmt="raw")
    assert_both_fail(raw_chain / "base.raw", FormatError, fmt="qcow2")


def test_probed_backing_formats(tmp_path: Path) -> None:
    """Without a backing format QEMU probes each backing file (raw or qcow2)."""
    create(tmp_path / "q.qcow2", "1M")
    (tmp_path / "r.raw").write_bytes(bytes(4096))
    for backing in ("q.qcow2", "r.raw"):
        top = create(tmp_path / f"over-{backing}.qcow2", "1M", backing=backing, backing_fmt="raw")
        # qemu-img 7.2 insists on -F; turn the backing format extension into an unknown one
        # (which QEMU skips), leaving the image without a backing format.
        head = top.read_bytes()[:4096]
        patch(top, head.index(bytes.fromhex("e2792aca")), bytes.fromhex("12345678"))
        chain = json.loads(assert_same(top, chain=True)["json"])
        assert "backing-filename-format" not in chain[0]
        assert chain[1]["format"] == ("qcow2" if backing == "q.qcow2" else "raw")


def test_file_names_as_given(tmp_path: Path) -> None:
    """qemu-img prints the name it was given, unnormalised; "file:" is dropped, other
    protocols are not ours to open."""
    create(tmp_path / "base.qcow2", "1M")
    (tmp_path / "d").mkdir()
    create(tmp_path / "d" / "x.qcow2", "1M", backing="../base.qcow2")
    (tmp_path / "a:b.qcow2").write_bytes((tmp_path / "base.qcow2").read_bytes())
    for name in ("./d/x.qcow2", "d//x.qcow2", "file:d/x.qcow2", "file:a:b.qcow2", "./a:b.qcow2",
                 f"{tmp_path}/../{tmp_path.name}/d/x.qcow2"):
        assert_same(name, chain=True, cwd=tmp_path)
    assert json.loads(ours("file:a:b.qcow2", output="json", cwd=tmp_path))["filename"] == "./a:b.qcow2"
    assert_both_fail("a:b.qcow2", UnsupportedFeature, cwd=tmp_path)


def test_absolute_backing_name(tmp_path: Path) -> None:
    base = create(tmp_path / "base.qcow2", "1M")
    top = create(tmp_path / "top.qcow2", "1M", backing=str(base))
    chain = json.loads(assert_same("top.qcow2", chain=True, cwd=tmp_path)["json"])
    assert chain[0]["full-backing-filename"] == chain[0]["backing-filename"] == str(base)
    assert assert_same(top)["human"].count(b"backing file: ") == 1


# --- failures --------------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    assert_both_fail(tmp_path / "nope.qcow2", FormatError)


def test_missing_backing_file(tmp_path: Path) -> None:
    create(tmp_path / "base.qcow2", "1M")
    top = create(tmp_path / "top.qcow2", "1M", backing="base.qcow2")
    (tmp_path / "base.qcow2").unlink()
    assert_same(top)  # without --backing-chain the backing file is never opened
    assert_both_fail(top, FormatError, chain=True)


def test_backing_loop(tmp_path: Path) -> None:
    a = create(tmp_path / "a.qcow2", "1M")
    create(tmp_path / "b.qcow2", "1M", backing="a.qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(a))
    assert_same(a)
    assert_both_fail(a, FormatError, chain=True)


def test_not_qcow2_formats(tmp_path: Path) -> None:
    """Formats we do not read are refused, not misreported as raw."""
    v1 = tmp_path / "v1.img"
    v1.write_bytes(b"QFI\xfb" + (1).to_bytes(4, "big") + bytes(504))
    with pytest.raises(UnsupportedFeature):
        ours(v1, output="json")
    with pytest.raises(UnsupportedFeature):
        probe_format(b"LUKS\xba\xbe\0\1" + bytes(100), "x")
    assert probe_format(b"QFI\xfb\0\0\0\3" + bytes(100), "x") == "qcow2"
    assert probe_format(bytes(512), "x") == "raw"


@contextmanager
def live_writer(path: Path) -> Iterator[None]:
    """An interactive qemu-io holding ``path`` open read-write (and locked) until the block ends."""
    proc = subprocess.Popen(["qemu-io", "-f", "qcow2", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        # Once it answers a command it has opened (and locked) the image.
        proc.stdin.write(b"help help\n")
        proc.stdin.flush()
        proc.stdout.readline()
        yield
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=20)
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def test_locked_by_a_writer(tmp_path: Path) -> None:
    """Without -U qemu-img info refuses an image a writer holds; with -U it reads it."""
    img = create(tmp_path / "busy.qcow2", "1M")
    with live_writer(img):
        q = qemu_info(img, output="json", share=False)
        assert q.returncode == 1 and b"lock" in q.stderr
        with pytest.raises(RequestError):
            ours(img, output="json", share=False)
        assert ours(img, output="json", share=True) == qemu_info(img, output="json").stdout
    assert ours(img, output="json", share=False) == qemu_info(img, output="json", share=False).stdout


# --- the command line -------------------------------------------------------------------------

def test_cli(qemu_images: dict[str, Path], capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    path = qemu_images["snapshots"]
    for argv, qargs in ((["--output=json"], ["--output=json"]), ([], []),
                        (["--backing-chain", "-U"], ["--backing-chain", "-U"])):
        assert main(["info", *argv, str(path)]) == 0
        out = capsysbinary.readouterr().out
        assert out == subprocess.run(["qemu-img", "info", *qargs, str(path)], capture_output=True).stdout
    assert main(["info", str(path.parent / "does-not-exist.qcow2")]) == 1


# --- crafted images --------------------------------------------------------------------------

def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def read_be(path: Path, offset: int, n: int) -> int:
    with path.open("rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(n), "big")


def set_incompatible(path: Path, bits: int) -> None:
    patch(path, 72, (read_be(path, 72, 8) | bits).to_bytes(8, "big"))


def test_aes_encryption(tmp_path: Path) -> None:
    """crypt_method 1 (legacy AES): "encrypt" holds only the format, v2 and v3 alike."""
    for compat in ("0.10", "1.1"):
        p = create(tmp_path / f"aes-{compat}.qcow2", "1M", compat=compat)
        patch(p, 32, (1).to_bytes(4, "big"))
        info = json.loads(assert_same(p)["json"])
        assert info["encrypted"] is True
        assert info["format-specific"]["data"]["encrypt"] == {"format": "aes"}


def luks_copy(tmp_path: Path, qemu_images: dict[str, Path]) -> tuple[Path, int]:
    """A copy of the catalogue's LUKS image and the file offset of its LUKS header."""
    p = tmp_path / "luks.qcow2"
    p.write_bytes(qemu_images["luks"].read_bytes())
    with open_image(p) as img:
        ext = img.extension(0x0537BE77)  # full disk encryption header pointer
        assert ext is not None
        return p, int(ext.data.offset)


# LUKS headers QEMU reads without the key (BDRV_O_NO_IO), made by rewriting the algorithm fields
# of a real header: qemu-img create would spend seconds timing PBKDF2 for each. Fields:
# cipher_name, cipher_mode, hash_spec (NUL-padded, 32 bytes each) and key_bytes.
LUKS_VARIANTS = [
    (b"aes", b"cbc-essiv:sha256", b"sha1", 16, None),
    (b"twofish", b"xts-plain64", b"sha512", 64, None),
    (b"serpent", b"cbc-plain", b"sha384", 24, None),
    (b"cast5", b"cbc-essiv:md5", b"sha224", 16, None),          # md5 digest == cast5 key length
    (b"aes", b"ecb-plain64:sha256", b"ripemd160", 32, None),  # a hash after plain64 is ignored
    (b"aes", b"ctr-plain", b"md5", 24, None),
    (b"aes", b"cbc-essiv:sha1", b"sha256", 16, UnsupportedFeature),  # no AES key of 20 bytes
    (b"cast5", b"cbc-essiv:sha256", b"sha256", 16, UnsupportedFeature),
    (b"aes", b"cbc-essiv", b"sha256", 16, FormatError),             # essiv needs a hash
    (b"aes", b"xts-plain64", b"sha256", 40, UnsupportedFeature),    # 20-byte XTS half keys
    (b"AES", b"xts-plain64", b"sha256", 64, UnsupportedFeature),    # names are case-sensitive
    (b"aes", b"xts", b"sha256", 64, FormatError),                   # no "-ivgen"
]


@pytest.mark.parametrize(("cipher", "mode", "hash_spec", "key_bytes", "error"), LUKS_VARIANTS)
def test_luks_variants(tmp_path: Path, qemu_images: dict[str, Path], cipher: bytes, mode: bytes,
                       hash_spec: bytes, key_bytes: int, error: type[Qcow2Error] | None) -> None:
    p, start = luks_copy(tmp_path, qemu_images)
    fields = b"".join(f.ljust(32, b"\0") for f in (cipher, mode, hash_spec))
    patch(p, start + 8, fields)
    patch(p, start + 108, key_bytes.to_bytes(4, "big"))
    if error is not None:
        assert_both_fail(p, error)
        return
    enc = json.loads(assert_same(p)["json"])["format-specific"]["data"]["encrypt"]
    assert enc["cipher-alg"].startswith(cipher.decode()) and enc["hash-alg"] == hash_spec.decode()
    assert ("ivgen-hash-alg" in enc) == (enc["ivgen-alg"] == "essiv")


def test_luks_slots(tmp_path: Path, qemu_images: dict[str, Path]) -> None:
    """Iterations and stripes are reported for active slots only."""
    p, start = luks_copy(tmp_path, qemu_images)
    slot3 = start + 208 + 3 * 48
    patch(p, slot3, (0x00AC71F3).to_bytes(4, "big") + (777).to_bytes(4, "big"))
    slots = json.loads(assert_same(p)["json"])["format-specific"]["data"]["encrypt"]["slots"]
    assert [s["active"] for s in slots] == [True, False, False, True] + [False] * 4
    assert slots[3]["iters"] == 777 and "iters" not in slots[2]


def test_luks_header_schema_round_trip(qemu_images: dict[str, Path]) -> None:
    with open_image(qemu_images["luks"]) as img:
        raw = read_luks_header(img)
    assert len(raw) == LUKS_HEADER_SIZE
    parsed = LuksHeader.parse(raw)
    assert LuksHeader.build(parsed) == raw
    assert parsed.version == 1 and parsed.key_bytes == 64


def _luks_raw(qemu_images: dict[str, Path]) -> bytes:
    with open_image(qemu_images["luks"]) as img:
        return read_luks_header(img)


@pytest.mark.parametrize(("offset", "value", "error"), [
    (0, b"LUKX", FormatError),                           # magic
    (6, b"\0\2", UnsupportedFeature),                    # version 2
    (40, b"xts\0", FormatError),                         # mode without "-ivgen"
    (40, b"gcm-plain64\0", UnsupportedFeature),          # unknown mode
    (8, b"camellia\0", UnsupportedFeature),              # unknown cipher
    (72, b"whirlpool\0", UnsupportedFeature),            # unknown hash
    (104, (1).to_bytes(4, "big"), FormatError),          # payload before the key slots
    (208, (0x1234).to_bytes(4, "big"), FormatError),     # slot 0 state corrupt
    (208 + 44, (0).to_bytes(4, "big"), FormatError),     # slot 0 stripes == 0
    (208 + 44, (3999).to_bytes(4, "big"), FormatError),  # anything but 4000 stripes
    (208 + 48 + 40, (8).to_bytes(4, "big"), FormatError),  # slot 1 overlaps slot 0
    (208 + 40, (7).to_bytes(4, "big"), FormatError),     # slot 0 inside the header area
    (208 + 4, (0).to_bytes(4, "big"), FormatError),      # active slot 0 without iterations
    (164, (0).to_bytes(4, "big"), FormatError),          # master key iterations zero
    (8, b"a" * 32, FormatError),                         # cipher name not NUL-terminated
    (72, b"s" * 32, FormatError),                        # hash spec not NUL-terminated
])
def test_luks_header_errors(qemu_images: dict[str, Path], offset: int, value: bytes,
                            error: type[Qcow2Error]) -> None:
    raw = bytearray(_luks_raw(qemu_images))
    raw[offset:offset + len(value)] = value
    with pytest.raises(error):
        luks_info(bytes(raw))


def test_broken_luks_header_fails_like_qemu(tmp_path: Path, qemu_images: dict[str, Path]) -> None:
    p, start = luks_copy(tmp_path, qemu_images)
    patch(p, start + 208, (0x1234).to_bytes(4, "big"))
    assert_both_fail(p, FormatError)


def test_bitmaps_without_flags_and_in_use(tmp_path: Path) -> None:
    """A disabled bitmap has no flags (an empty JSON list); a writer that dies leaves in-use."""
    p = create(tmp_path / "bm.qcow2", "1M")
    qemu_img("bitmap", "--add", "--disable", str(p), "off")
    qemu_img("bitmap", "--add", "-g", "512", str(p), "small")
    info = json.loads(assert_same(p)["json"])
    assert [b["flags"] for b in info["format-specific"]["data"]["bitmaps"]] == [[], ["auto"]]
    with pytest.raises(subprocess.CalledProcessError):
        qemu_io(p, "write 0 4k", "abort")
    info = json.loads(assert_same(p)["json"])
    assert [b["flags"] for b in info["format-specific"]["data"]["bitmaps"]] == [["in-use"],
                                                                               ["in-use", "auto"]]


def test_bitmaps_ignored_without_autoclear_bit(tmp_path: Path) -> None:
    p = create(tmp_path / "bm.qcow2", "1M")
    qemu_img("bitmap", "--add", str(p), "b0")
    patch(p, 88, (read_be(p, 88, 8) & ~1).to_bytes(8, "big"))
    info = json.loads(assert_same(p)["json"])
    assert "bitmaps" not in info["format-specific"]["data"]


def test_corrupt_dirty_and_odd_size(tmp_path: Path) -> None:
    p = create(tmp_path / "flags.qcow2", "1M")
    set_incompatible(p, 0b11)  # dirty and corrupt (read-only open allows both)
    info = json.loads(assert_same(p)["json"])
    assert info["dirty-flag"] is True and info["format-specific"]["data"]["corrupt"] is True
    q = create(tmp_path / "odd.qcow2", "1M")
    patch(q, 24, (1000).to_bytes(8, "big"))  # not a multiple of 512: QEMU rounds down
    assert json.loads(assert_same(q)["json"])["virtual-size"] == 512


def test_data_file_name_without_feature_bit(tmp_path: Path) -> None:
    """With BDRV_O_NO_IO QEMU reports the extension's name even when the bit is clear."""
    p = create(tmp_path / "df.qcow2", "1M", data_file=str(tmp_path / "df.data"))
    assert_same(p)
    patch(p, 72, (read_be(p, 72, 8) & ~4).to_bytes(8, "big"))
    data = json.loads(assert_same(p)["json"])["format-specific"]["data"]
    assert data["data-file"] == str(tmp_path / "df.data") and "data-file-raw" not in data


def test_data_file_bit_hides_snapshots(tmp_path: Path, qemu_images: dict[str, Path]) -> None:
    """qcow2_snapshot_list refuses images with a data file, so info lists no snapshots."""
    p = tmp_path / "snap-df.qcow2"
    p.write_bytes(qemu_images["snapshots"].read_bytes())
    assert "snapshots" in json.loads(assert_same(p)["json"])
    set_incompatible(p, 4)
    info = json.loads(assert_same(p)["json"])
    assert "snapshots" not in info and info["format-specific"]["data"]["data-file-raw"] is False


def test_backing_names_are_c_strings(tmp_path: Path) -> None:
    """A NUL ends the backing name; bytes that are not UTF-8 print raw (human) or as U+FFFD."""
    create(tmp_path / "base.qcow2", "1M")
    p = create(tmp_path / "top.qcow2", "1M", backing="base.qcow2")
    start = read_be(p, 8, 8)
    patch(p, start, b"b\xffse.qcow2")
    out = assert_same(p)
    assert json.loads(out["json"])["backing-filename"] == "b\ufffdse.qcow2"
    assert b"backing file: b\xffse.qcow2" in out["human"]
    patch(p, start, b"ba\0e.qcow2")
    assert json.loads(assert_same(p)["json"])["backing-filename"] == "ba"


# --- crafted snapshot tables ------------------------------------------------------------------

def snapshot_entry(l1_offset: int, l1_size: int, id_str: bytes, name: bytes, *, date: int = 0,
                   date_nsec: int = 0, vm_clock: int = 0, vm_state: int = 0,
                   extra: bytes = b"") -> bytes:
    """One snapshot table entry, packed by hand from qcow2.rst "Snapshots" (not via spec/)."""
    e = struct.pack(">QIHHIIQII", l1_offset, l1_size, len(id_str), len(name), date, date_nsec,
                    vm_clock, vm_state, len(extra)) + extra + id_str + name
    return e + bytes(-len(e) % 8)


def extra_data(vm_state_large: int | None = None, disk_size: int | None = None,
               icount: int | None = None, tail: bytes = b"") -> bytes:
    out = b""
    for v in (vm_state_large, disk_size, icount):
        if v is None:
            break
        out += v.to_bytes(8, "big")
    return out + tail


def with_snapshots(tmp_path: Path, name: str, entries: list[dict[str, Any]], compat: str = "1.1") -> Path:
    """An image whose snapshot table is replaced by ``entries``, appended at a new cluster."""
    p = create(tmp_path / name, "4M", compat=compat)
    qemu_io(p, "write -P 0x11 0 64k")
    qemu_img("snapshot", "-c", "seed", str(p))
    sn_off = read_be(p, 64, 8)
    l1_off, l1_size = read_be(p, sn_off, 8), read_be(p, sn_off + 8, 4)
    table = b"".join(snapshot_entry(l1_off, l1_size, **e) for e in entries)
    size = p.stat().st_size
    new_off = size + (-size % 65536)
    patch(p, new_off, table + bytes(-len(table) % 65536))
    patch(p, 60, len(entries).to_bytes(4, "big") + new_off.to_bytes(8, "big"))
    return p


def test_snapshot_fields(tmp_path: Path) -> None:
    entries: list[dict[str, Any]] = [
        # v2-style: no extra data, so no icount and the 32-bit VM state size.
        {"id_str": b"10", "name": "schön ☃ 😀".encode(), "date": 86400 * 365, "date_nsec": 999999999,
         "vm_clock": 3725_500_000_000, "vm_state": 123456789, "extra": b""},
        # vm_state_size_large and disk size, still no icount; the 32-bit field is ignored.
        {"id_str": b"2", "name": b"big", "vm_state": 7,
         "extra": extra_data(5 << 30, 4 << 20)},
        # icount present; a name with a tab, a quote, a backslash and invalid UTF-8.
        {"id_str": b"3", "name": b'a\t"q"\\ \xff\xfe \xc0\x80 \xed\xa0\x80 \xef\xbf\xbf',
         "extra": extra_data(0, 4 << 20, 12345)},
        # Extremes: all-ones sizes and clock, icount with the top bit set, unknown extra data.
        {"id_str": b"4", "name": b"", "date": 0xFFFFFFFF, "date_nsec": 0xFFFFFFFF,
         "vm_clock": (1 << 64) - 1, "extra": extra_data((1 << 64) - 1, 0, 1 << 63, b"\1" * 8)},
        # icount == -1 means "not recorded": no icount key.
        {"id_str": b"5", "name": b"no-icount", "extra": extra_data(1, 1, (1 << 64) - 1)},
        # Longer than QEMU's buffers (id 127, name 255 bytes), cut inside a UTF-8 sequence.
        {"id_str": b"7" * 130, "name": b"n" * 254 + "é".encode() + b"tail" * 20,
         "extra": extra_data(0, 0, 0)},
        # A NUL ends the name.
        {"id_str": b"8", "name": b"abc\0def", "extra": extra_data(0, 0, 0)},
    ]
    p = with_snapshots(tmp_path, "snaps.qcow2", entries)
    out = assert_same(p)
    snaps = json.loads(out["json"])["snapshots"]
    assert [s["id"] for s in snaps] == ["10", "2", "3", "4", "5", "7" * 127, "8"]
    assert ["icount" in s for s in snaps] == [False, False, True, True, False, True, True]
    assert snaps[1]["vm-state-size"] == 5 << 30
    assert snaps[3]["vm-state-size"] == -1 and snaps[3]["icount"] == -(1 << 63)
    assert snaps[6]["name"] == "abc"
    assert (snaps[0]["vm-clock-sec"], snaps[0]["vm-clock-nsec"]) == (3725, 500_000_000)
    assert b"01:02:05.500" in out["human"]


def test_snapshots_in_v2_image(tmp_path: Path) -> None:
    p = with_snapshots(tmp_path, "v2snap.qcow2", [
        {"id_str": b"1", "name": b"old", "vm_state": 1 << 20, "extra": b""},
        {"id_str": b"2", "name": b"newer", "extra": extra_data(2 << 20, 4 << 20)},
    ], compat="0.10")
    assert_same(p)


def test_snapshot_dates_follow_tz(tmp_path: Path) -> None:
    """Both tools print snapshot dates in the local time zone."""
    p = with_snapshots(tmp_path, "tz.qcow2", [{"id_str": b"1", "name": b"t", "date": 1_700_000_000,
                                               "extra": extra_data(0, 0, 0)}])
    saved = os.environ.get("TZ")
    try:
        for tz in ("UTC", "Asia/Kolkata", "America/St_Johns"):
            os.environ["TZ"] = tz
            time.tzset()
            assert_same(p)
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


# --- QEMU's formatting primitives --------------------------------------------------------------

def test_size_to_str_against_qemu(tmp_path: Path) -> None:
    """size_to_str against qemu-img's own "virtual size" line, across unit boundaries."""
    p = create(tmp_path / "sizes.qcow2", "16T")  # an L1 table big enough for every size below
    sizes = [512, 1024, 999 * 512, 1023 * 1024, 1000 * 1024, 1024 * 1024 - 512, 10 << 20,
             999 << 20, 1000 << 20, (1 << 30) + 512, 123456789 * 512, 1 << 40, 15 << 40]
    for size in sizes:
        patch(p, 24, size.to_bytes(8, "big"))
        line = qemu_info(p, output="human").stdout.splitlines()[2].decode()
        assert line == f"virtual size: {size_to_str(size)} ({size} bytes)"
    assert size_to_str(0) == "0 B"
    assert size_to_str((1 << 64) - 1) == "16 EiB"


def test_json_string_escapes() -> None:
    """QEMU's quoted_str: ASCII out, upper-case escapes, U+FFFD for what is not valid."""
    assert json_string('a"\\\b\f\n\r\t\x01\x7f') == '"a\\"\\\\\\b\\f\\n\\r\\t\\u0001\\u007F"'
    assert json_string("é😀") == '"\\u00E9\\uD83D\\uDE00"'
    bad = b"\xff\xc3(\xed\xa0\x80\xef\xbf\xbe\xe0\x80\x80\xc0\x80".decode("utf-8", "surrogateescape")
    assert json_string(bad) == '"\\uFFFD\\uFFFD(\\uFFFD\\uFFFD\\uFFFD\\u0000"'


def test_qdict_order_is_qemus() -> None:
    """The key order qemu-img printed for a v3 image and its ImageInfoSpecificQCow2."""
    assert list(si.qdict([(k, 1) for k in ("filename", "format", "dirty-flag", "actual-size",
                                          "virtual-size", "cluster-size", "format-specific")])) == [
        "virtual-size", "filename", "cluster-size", "format", "actual-size", "format-specific",
        "dirty-flag"]
    assert list(si.qdict([("a", None), ("b", 1)])) == ["b"]


def test_paths() -> None:
    assert si.full_backing_filename("sub/top.qcow2", "../b") == "sub/../b"
    assert si.full_backing_filename("top.qcow2", "b") == "b"
    assert si.full_backing_filename("/x/top.qcow2", "/abs/b") == "/abs/b"
    assert si.full_backing_filename("/x/top.qcow2", "nbd:host:10809") == "nbd:host:10809"
    assert si.path_combine("file:dir/top", "b") == "file:dir/b"
    assert si.path_combine("file:top", "b") == "file:b"


# --- differential mutation campaign -----------------------------------------------------------

def _mutation_regions(path: Path) -> list[tuple[int, int]]:
    """Where to flip bytes: the header cluster and every structure info reads."""
    regions = [(0, 112), (0, 4096)]
    with open_image(path) as img:
        crypto = img.extension(0x0537BE77)
        if crypto is not None:
            regions.append((crypto.data.offset, crypto.data.offset + LUKS_HEADER_SIZE))
        bitmaps = img.extension(0x23852875)
        if bitmaps is not None:
            start = bitmaps.data.bitmap_directory_offset
            regions.append((start, start + bitmaps.data.bitmap_directory_size))
            regions += [(e.bitmap_table_offset, e.bitmap_table_offset + 8 * e.bitmap_table_size)
                        for e in img.bitmap_directory()]
        if img.header.nb_snapshots:
            regions.append((img.header.snapshots_offset, img.header.snapshots_offset + 160))
    return regions


def mutation_campaign(qemu_images: dict[str, Path], tmp_path: Path, seed: int, rounds: int) -> dict[str, int]:
    """Mutate catalogue images at random and run both tools on each mutant.

    What must hold: nothing but a spec.errors class escapes; whatever qemu-img refuses, we
    refuse; whenever both succeed, the outputs are the same bytes. We may refuse an image
    qemu-img accepts only where spec/image.py is knowingly stricter than QEMU (it refuses
    structures that run past the end of the file, where QEMU reads zeros); those are counted.
    """
    rng = random.Random(seed)
    sources = [qemu_images[n] for n in ("v3", "snapshots", "bitmap", "luks", "v2-backing", "extended-l2",
                                        "zstd-compressed", "cluster-512", "lazy-dirty")]
    regions = {p: _mutation_regions(p) for p in sources}
    counts = {"same": 0, "both_fail": 0, "we_refuse": 0}
    for n in range(rounds):
        src = rng.choice(sources)
        data = bytearray(src.read_bytes())
        for _ in range(rng.randint(1, 3)):
            lo, hi = rng.choice(regions[src])
            off = min(rng.randrange(lo, hi), len(data) - 8)
            if rng.random() < 0.6:
                data[off] ^= 1 << rng.randrange(8)
            else:
                width = rng.choice([1, 2, 4, 8])
                off -= off % width
                data[off:off + width] = rng.randrange(1 << (8 * width)).to_bytes(width, "big")
        mutant = tmp_path / f"mutant{n}.qcow2"
        mutant.write_bytes(bytes(data))
        output = rng.choice(["json", "human"])
        q = qemu_info(mutant, output=output)
        try:
            mine: bytes | None = ours(mutant, output=output)
        except Qcow2Error:
            mine = None
        if q.returncode != 0:
            assert mine is None, f"qemu-img refused mutant {n} of {src.name}, we did not"
            counts["both_fail"] += 1
        elif mine is None:
            counts["we_refuse"] += 1
        else:
            assert mine == q.stdout, f"mutant {n} of {src.name} ({output})"
            counts["same"] += 1
        mutant.unlink()
    return counts


def test_mutants_agree_with_qemu(qemu_images: dict[str, Path], tmp_path: Path) -> None:
    counts = mutation_campaign(qemu_images, tmp_path, seed=20261121, rounds=60)
    # The campaign must exercise both outcomes to mean anything.
    assert counts["same"] >= 10 and counts["both_fail"] >= 10, counts


@pytest.mark.slow
def test_mutants_agree_with_qemu_long(qemu_images: dict[str, Path], tmp_path: Path) -> None:
    counts = mutation_campaign(qemu_images, tmp_path, seed=7, rounds=2000)
    assert counts["we_refuse"] <= counts["same"] // 10, counts
