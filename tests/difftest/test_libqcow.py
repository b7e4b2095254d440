"""The libqcow reader (difftest/adapters/libqcow.py): pip-installed at first use, it
resolves backing chains itself and says what it cannot read. Skipped when pip cannot
reach the package index and pyqcow is not installed yet."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from difftest.core import qemuio
from spec.errors import UnsupportedFeature

pytestmark = pytest.mark.skipif(not qemuio.available(), reason="qemu-img/qemu-io not installed")


@pytest.fixture(scope="module")
def libqcow() -> Any:
    from difftest.adapters import libqcow as mod
    try:
        mod.ensure_installed()
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"libqcow-python cannot be installed here: {e}")
    return mod


def _img(where: Path, name: str, *opts: str, size: str = "1M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, name, size], cwd=where, check=True)
    return where / name


def _io(path: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def test_reads_a_chain_it_resolves_itself_relative_to_the_image(libqcow: Any, tmp_path: Path) -> None:
    base = _img(tmp_path, "base.qcow2", "-o", "cluster_size=4096")
    _io(base, "write -q -P 0xb1 0 1M")
    mid = _img(tmp_path, "mid.qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2")
    _io(mid, "write -q -P 0xc2 8192 4096")
    top = _img(tmp_path, "top.qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2")
    _io(top, "write -q -P 0x22 0 512")
    img = libqcow.reader.open(str(top))
    try:
        assert img.size == 1 << 20
        assert img.read(0, 512) == b"\x22" * 512
        assert img.read(512, 512) == b"\xb1" * 512  # the rest of the cluster, from the bottom layer
        assert img.read(8192, 4096) == b"\xc2" * 4096
    finally:
        img.close()


@pytest.mark.parametrize(("opts", "field", "value"), [("compression_type=zstd", "compression_type", "zstd"),
                                                    ("extended_l2=on", "extended_l2", True),
                                                    ("data_file=top.data", "data_file", True)])
def test_what_libqcow_refuses_at_open_is_unsupported(libqcow: Any, tmp_path: Path, opts: str, field: str,
                                                     value: Any) -> None:
    top = _img(tmp_path, "top.qcow2", "-o", opts)
    with pytest.raises(UnsupportedFeature):
        libqcow.reader.open(str(top))
    assert value in libqcow.UNSUPPORTED[field]  # declared, so a campaign does not draw it


def test_a_raw_backing_file_is_unsupported(libqcow: Any, tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(bytes(1 << 20))
    top = _img(tmp_path, "top.qcow2", "-b", "base.raw", "-F", "raw")
    with pytest.raises(UnsupportedFeature):
        libqcow.reader.open(str(top))


def test_the_reader_is_known_by_its_short_name(libqcow: Any) -> None:
    from difftest.adapters import load
    assert load("libqcow") is libqcow.reader
