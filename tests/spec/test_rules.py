"""The rules catalogue as data, the refcount arithmetic, and clean evaluation of every
QEMU-written image (spec/rules, spec/refcounts.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from spec.geometry import Geometry
from spec.image import open_image
from spec.refcounts import Kind, Tally, decode_refcount_block
from spec.rules import RULES, RULES_BY_ID, Severity, evaluate
from spec.tables import refcount_block

RULE_ID = re.compile(r"^[A-Z0-9]+(-[A-Z0-9]+)+$")


def test_catalogue_is_well_formed() -> None:
    assert len(RULES) >= 40
    assert len({r.id for r in RULES}) == len(RULES)
    for r in RULES:
        assert RULE_ID.match(r.id), r.id
        assert r.statement.strip() and "\n" not in r.statement, r.id
        assert r.source.strip(), r.id
        assert "qcow2.rst" in r.source or "block/" in r.source or "qemu-img.c" in r.source, r.id
        assert isinstance(r.severity, Severity)
        assert r.severity.value in {"corruption", "leak", "check-error"}


def test_catalogue_names_the_required_rules() -> None:
    for rid in ("L2-RESERVED-ZERO", "REFCOUNT-MATCHES-REFERENCES", "COPIED-IFF-REFCOUNT-1",
                "REFCOUNT-NO-LEAK", "METADATA-NO-OVERLAP", "SUBCLUSTER-BITMAP-VALID",
                "COMPRESSED-NO-COPIED", "FEATURE-BITMAPS-EXTENSION", "FEATURE-RAW-NEEDS-DATA-FILE",
                "FEATURE-COMPRESSION-TYPE", "FEATURE-LUKS-CRYPTO-HEADER", "BITMAP-DIRECTORY-VALID",
                "SNAPSHOT-L1-ALIGNED", "REFBLOCK-REFCOUNT-1"):
        assert rid in RULES_BY_ID
    assert RULES_BY_ID["REFCOUNT-NO-LEAK"].severity is Severity.LEAK
    assert RULES_BY_ID["REFCOUNT-READABLE"].severity is Severity.CHECK_ERROR


@pytest.mark.parametrize("order", range(7))
def test_decode_refcount_block_agrees_with_schema(order: int) -> None:
    g = Geometry(cluster_bits=9, refcount_order=order)
    rng = np.random.default_rng(order)
    data = rng.integers(0, 256, size=g.cluster_size, dtype=np.uint8).tobytes()
    ours = decode_refcount_block(data, g.refcount_bits)
    theirs = list(refcount_block(g).parse(data))
    assert ours.tolist() == [int(x) for x in theirs]


def test_tally_counts_overflow_and_overlap() -> None:
    g = Geometry(cluster_bits=16, refcount_order=1)  # refcount_max = 3
    t = Tally(g, file_size=8 * 65536 + 100)
    t.add_range(0, 65536, Kind.HEADER)
    t.add_clusters(np.array([2, 2, 2, 2, 2], dtype=np.int64), Kind.DATA)
    assert t.get(2) == 3
    assert t.overflows == [(2, 2)]
    t.add_range(2 << 16, 100, Kind.ACTIVE_L1)
    assert [(o.cluster, o.first, o.second) for o in t.overlaps] == [(2, Kind.DATA, Kind.ACTIVE_L1)]
    # The last, partly written cluster (index 8) and one past it still count, as in QEMU.
    assert t.file_clusters == 9
    assert t.add_range(9 * 65536 - 36, 100, Kind.COMPRESSED)
    assert t.get(8) == 1 and t.get(9) == 1 and t.nb_clusters == 10


def test_tally_refuses_references_a_cluster_past_eof() -> None:
    t = Tally(Geometry(cluster_bits=9), file_size=4 * 512)
    assert not t.add_range(1 << 60, 512, Kind.DATA)
    assert not t.add_range(4 * 512, 512, Kind.DATA)
    offs = np.array([0, 3 * 512, 4 * 512, 1 << 55], dtype=np.uint64)
    refused = t.add_regions(offs, np.full(4, 512, dtype=np.uint64), Kind.DATA)
    assert refused.tolist() == [4 * 512, 1 << 55]
    assert t.nb_clusters == 4 and t.get(0) == 1 and t.get(3) == 1


def test_catalogue_images_have_no_findings(qemu_images: dict[str, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name, path in qemu_images.items():
        monkeypatch.chdir(path.parent)  # relative data file names are relative to the CWD, as in QEMU
        with open_image(path) as img:
            findings = evaluate(img)
        if name == "lazy-dirty":
            # Left dirty on purpose: the refcount of its one data cluster was never written.
            assert {f.rule for f in findings} == {"REFCOUNT-MATCHES-REFERENCES", "COPIED-IFF-REFCOUNT-1"}
        else:
            assert findings == [], name
