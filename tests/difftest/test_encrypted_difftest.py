"""Encrypted configurations in the differential tester (issue #16): LUKS and legacy AES top
images and LUKS backing layers, drawn by the configuration strategy, made once by qemu-img,
opened with the keys everywhere, and reproduced with the secret objects."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import model
import model.image
from difftest.core import qemuio, teardown
from difftest.core import targets as core_targets
from difftest.core.campaign import Shard, run_shard
from difftest.core.config import KEY_SECRET, LUKS_CIPHERS, Config, configs, parse_overrides
from difftest.core.divergence import Divergence
from difftest.core.lockstep import Lockstep
from spec import encryption
from spec.errors import UnsupportedFeature
from spec.header import QCOW2_EXT_MAGIC_CRYPTO_HEADER
from spec.image import open_image

needs_qemu = pytest.mark.skipif(not qemuio.available(), reason="qemu-io/qemu-img not installed")


def impl_opens_encrypted(tmp: Path) -> bool:
    """Whether impl opens an encrypted image (its create is not asked: the model makes it)."""
    import impl

    path = tmp / "probe.qcow2"
    model.create(str(path), 1 << 20, encrypt_format="luks", encrypt_key_secret=KEY_SECRET,
                 encrypt_iter_time=1)
    try:
        impl.open(str(path), key_secret=KEY_SECRET).close()
    except UnsupportedFeature as e:
        assert e.feature == "encryption"
        return False
    return True


def test_encryption_fields_are_validated_and_pinnable() -> None:
    assert parse_overrides(["encrypt=luks", "encrypt_cipher=aes-128-cbc-essiv", "encrypt_backing=on"]) == {
        "encrypt": "luks", "encrypt_cipher": "aes-128-cbc-essiv", "encrypt_backing": True}
    for bad in (Config(encrypt="twofish"), Config(encrypt_cipher="serpent-256-xts-plain64"),
                Config(encrypt="luks", data_file=True), Config(encrypt_backing=True, backing="raw")):
        with pytest.raises(ValueError):
            bad.validate()
    cfg = Config(encrypt="luks", backing="qcow2x2", encrypt_backing=True)
    assert cfg.encrypted and cfg.features() == {"encryption"} and not Config().features()
    assert set(cfg.key_options()) == {"key_secret", "backing_key_secret"}
    assert "luks=aes-256-xts-plain64" in cfg.short() and "luks-backing" in cfg.short()


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_the_strategy_draws_every_encryption_and_pins_it(data: st.DataObject) -> None:
    cfg = data.draw(configs())
    cfg.validate()
    pinned = data.draw(configs({"encrypt": "luks", "encrypt_backing": True}))
    assert pinned.encrypt == "luks" and pinned.encrypt_backing and not pinned.data_file
    assert pinned.backing in ("qcow2", "qcow2x2") and pinned.encrypt_cipher in LUKS_CIPHERS


def test_secrets_name_images_for_qemu_img(tmp_path: Path) -> None:
    keys = qemuio.Secrets("k0", "k1", 2)
    assert keys.objects() == ["--object", "secret,id=sec0,data=k0", "--object", "secret,id=sec1,data=k1"]
    assert keys.image_opts("/a,b/t.qcow2") == (
        "driver=qcow2,file.filename=/a,,b/t.qcow2,encrypt.key-secret=sec0,"
        "backing.encrypt.key-secret=sec1,backing.backing.encrypt.key-secret=sec1")
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    assert qemuio.img_args([a, b]) == ["-f", "qcow2", "-F", "qcow2", str(a), str(b)]
    qemuio.remember(a, qemuio.Secrets("k0"))
    try:
        # The other file is named the same way, without keys; the secret is given once.
        assert qemuio.img_args([a, b]) == ["--object", "secret,id=sec0,data=k0", "--image-opts",
                                           f"driver=qcow2,file.filename={a},encrypt.key-secret=sec0",
                                           f"driver=qcow2,file.filename={b}"]
    finally:
        qemuio.forget(a)
    assert qemuio.secrets_for(a) is None


ENCRYPTED = [
    # QEMU's default LUKS cipher over a LUKS-encrypted qcow2 backing file (two keys).
    Config(cluster_size=4096, size=4096 * 37 + 1536, encrypt="luks", backing="qcow2", encrypt_backing=True),
    # CBC with ESSIV, 512-byte clusters (one sector each) over a longer raw backing file.
    Config(cluster_size=512, size=4096 * 37 + 1536, encrypt="luks", encrypt_cipher="aes-128-cbc-essiv",
           backing="raw", backing_size="longer"),
    # 32-bit plain IVs, subclusters: COW of partial subclusters re-encrypts whole sectors.
    Config(cluster_size=65536, size=1 << 22, encrypt="luks", encrypt_cipher="aes-256-cbc-plain",
           extended_l2=True, backing="qcow2"),
    # Legacy AES (guest-offset IVs) over two shorter LUKS layers.
    Config(cluster_size=4096, size=4096 * 37 + 1536, encrypt="aes", backing="qcow2x2",
           backing_size="shorter", encrypt_backing=True),
    # AES, v2, no backing file.
    Config(version=2, cluster_size=4096, size=4096 * 20, encrypt="aes"),
]


@needs_qemu
@pytest.mark.parametrize("cfg", ENCRYPTED, ids=lambda c: c.short())
def test_encrypted_images_run_in_lockstep_with_the_same_file(tmp_path: Path, cfg: Config) -> None:
    """One shared encrypted image (same master key): model, impl (when it opens encrypted
    images) and qemu agree step by step, through writes, COW over the backing file,
    compressed writes, zeroes, discards, snapshots, resize and reopen, and their files
    are byte-identical at the end."""
    targets = ["model", "impl", "qemu"]
    impl_in = impl_opens_encrypted(tmp_path)
    c = cfg.cluster_size
    with Lockstep(tmp_path / "run", cfg, targets) as ls:
        assert [t.name for t in ls.targets] == (targets if impl_in else ["model", "qemu"])
        assert ls.write(1, 5000, 0x11)  # unaligned: read-modify-write of encrypted sectors, COW
        assert ls.write_random(c * 3 - 7, 9000, 5)
        assert ls.write_compressed(c * 6, c, seed=3)  # QEMU 7.2 stores it compressed, unencrypted
        assert ls.write_zeroes(100, 3000)
        assert ls.write_zeroes(c * 8, 2 * c, unmap=True)
        assert ls.discard(c * 2, c * 2)
        assert ls.check_live()
        assert ls.resize(cfg.size + 3 * c) and ls.write(cfg.size - 100, 700, 0x77)
        assert ls.snapshot_create("s0") and ls.write(7, 513, 0x5A) and ls.snapshot_apply("s0")
        assert ls.reopen() and ls.read(0, c * 12)
        assert ls.compare_map()
        ls.finish()
        assert not ls.oracle_broken
        assert "layout-identical: model = qemu" in ls.notes
        assert impl_in == ("layout-identical: impl = qemu" in ls.notes)
        assert impl_in != ("target-skipped: impl lacks encryption" in ls.notes)
    # The qemu target's file really is encrypted with the configuration's format.
    info = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(tmp_path / "run/qemu/top.qcow2")],
                          capture_output=True, text=True, check=True).stdout
    assert json.loads(info)["format-specific"]["data"]["encrypt"]["format"] == cfg.encrypt
    assert qemuio.secrets_for(tmp_path / "run/qemu/top.qcow2") is None  # forgotten at close


@needs_qemu
def test_a_layout_divergence_shows_no_ciphertext(tmp_path: Path) -> None:
    """The layout comparison quotes the differing bytes, except where an encrypted file
    holds ciphertext or key material: a data cluster, the LUKS area. A plain structure
    (here the L1 table) is still quoted."""
    cfg = Config(cluster_size=4096, size=4096 * 16, encrypt="luks")
    with Lockstep(tmp_path, cfg, ["model", "qemu"]) as ls:
        assert ls.write(0, 4096, 0x42)
        ls.finish()
    model_file = tmp_path / "model/top.qcow2"
    with open_image(str(model_file)) as img:
        l1 = int(img.header.l1_table_offset)
        luks = img.extension(QCOW2_EXT_MAGIC_CRYPTO_HEADER)
        assert luks is not None
        luks_at = int(luks.data.offset)
    raw = model_file.read_bytes()
    # Guest cluster 0's host cluster, through L1[0] and L2[0] (qemu-img map hides the host
    # offsets of an encrypted image).
    offset_mask = 0x00FF_FFFF_FFFF_FE00
    l2 = int.from_bytes(raw[l1:l1 + 8], "big") & offset_mask
    data_at = int.from_bytes(raw[l2:l2 + 8], "big") & offset_mask
    assert data_at and raw[data_at:data_at + 4096] != b"\x42" * 4096  # written, and encrypted
    original = raw
    for at, shown in ((luks_at + 100, False), (data_at, False), (l1, True)):
        raw = bytearray(original)
        raw[at] ^= 0xFF
        model_file.write_bytes(bytes(raw))
        with pytest.raises(Divergence) as found:
            teardown._same_layout(ls)
        message = str(found.value)
        assert found.value.kind == "layout" and f"host offset {at}" in message
        assert bool(re.search(r"[0-9a-f]{32}", message)) == shown, message
        assert ("not shown" in message) != shown
        assert KEY_SECRET not in message
    model_file.write_bytes(original)


@needs_qemu
def test_secret_data_is_redacted_from_errors(tmp_path: Path) -> None:
    """A failing qemu-img run is reported without the secret's data (repro.sh alone spells
    it out, since it must run)."""
    with pytest.raises(RuntimeError) as failed:
        core_targets._run(["qemu-img", "create", "--object", f"secret,id=sec0,data={KEY_SECRET}", "-f",
                           "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=nosuch", "x.qcow2", "1M"],
                          tmp_path)
    assert KEY_SECRET not in str(failed.value) and "secret,id=sec0,data=***" in str(failed.value)


def test_an_unencrypted_file_never_inherits_remembered_keys(tmp_path: Path) -> None:
    """Keys are remembered per path for qemu-img; a later unencrypted set-up at the same
    path drops them (remember(path, None)), so its qemu-img runs name it plainly."""
    path = tmp_path / "top.qcow2"
    qemuio.remember(path, qemuio.Secrets("k0"))
    qemuio.remember(path, core_targets.secrets_of(Config()))
    assert qemuio.secrets_for(path) is None
    assert qemuio.img_args([path]) == ["-f", "qcow2", str(path)]


@needs_qemu
def test_short_encrypted_campaign_agrees(tmp_path: Path) -> None:
    targets = ["model", "impl", "qemu"]
    impl_in = impl_opens_encrypted(tmp_path)
    stats = run_shard(Shard(targets, seed=16, examples=3, steps=15, overrides={"encrypt": "luks"},
                            db_dir=None, repro_dir=str(tmp_path / "repro"), workdir=str(tmp_path / "w"),
                            shrink=False))
    assert stats.divergences == [], stats.divergences
    assert stats.examples == 3 and all("luks=" in c for c in stats.configs)
    skipped = stats.notes.get("target-skipped: impl lacks encryption", 0)
    assert skipped == (0 if impl_in else stats.examples)


def _plant_guest_sector_ivs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plausible model bug: LUKS sectors numbered by guest offset, as legacy AES does,
    instead of by host offset. Symmetric, so the model reads its own writes back correctly;
    only another reader of its file can tell."""
    real = encryption.image_crypto

    def planted(img: Any, key: Any) -> encryption.Qcow2Crypto:
        crypto = real(img, key)
        crypto.physical = False
        return crypto

    # Only the model's view of spec.encryption changes (impl, if it uses it, keeps QEMU's).
    patched = types.SimpleNamespace(**{**vars(encryption), "image_crypto": planted})
    monkeypatch.setattr(model.image, "enc", patched)


@needs_qemu
def test_planted_iv_bug_is_caught_and_reproduced_with_the_keys(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _plant_guest_sector_ivs(monkeypatch)
    targets = ["model", "qemu"]
    repro = tmp_path / "repro"
    stats = run_shard(Shard(targets, seed=3, examples=4, steps=10,
                            overrides={"encrypt": "luks", "backing": "none", "cluster_size": 4096},
                            db_dir=None, repro_dir=str(repro), workdir=str(tmp_path / "w"), shrink=False))
    assert stats.divergences, "the planted IV bug went unnoticed"
    found = stats.divergences[0]
    assert found.kind in ("crossread", "layout", "bytes"), found
    # No ciphertext in the message: nothing that looks like a hex dump of file bytes.
    assert not re.search(r"[0-9a-f]{32}", found.message), found.message
    assert KEY_SECRET not in found.message and not any(KEY_SECRET in n for n in stats.notes)
    assert found.repro_dir is not None
    where = Path(found.repro_dir)

    # repro.sh runs as written: it makes its own LUKS image (retrying QEMU's PBKDF2
    # benchmark), and every qemu-io and qemu-img in it opens the image with the keys.
    script = (where / "repro.sh").read_text()
    assert f"secret,id=sec0,data={KEY_SECRET}" in script and "encrypt.key-secret=sec0" in script
    run = tmp_path / "sh"
    run.mkdir()
    r = subprocess.run(["sh", str(where / "repro.sh")], cwd=run, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "key-secret' is required" not in out and "Could not open" not in out, out
    assert "No errors were found on the image" in out

    # test_repro.py replays through Lockstep with the keys and still fails (bug planted).
    spec = importlib.util.spec_from_file_location("difftest_repro_enc", where / "test_repro.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.pop("difftest_repro_enc", None)
    spec.loader.exec_module(mod)
    (tmp_path / "py").mkdir()
    with pytest.raises(Divergence):
        mod.test_repro(tmp_path / "py")
