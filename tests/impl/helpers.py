"""Small helpers shared by the impl tests."""

from __future__ import annotations

import struct
from pathlib import Path

from spec import features as ft


def incompatible_features(p: Path) -> int:
    """The header's incompatible_features field (qcow2.rst "Header", bytes 72-79)."""
    with open(p, "rb") as f:
        return int(struct.unpack(">Q", f.read(80)[72:80])[0])


def corrupt_bit(p: Path) -> bool:
    return bool(incompatible_features(p) & ft.QCOW2_INCOMPAT_CORRUPT)
