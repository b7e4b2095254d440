"""``--config KEY=VAL`` sets and exclusions (difftest/core/config.py, issue 14): what the
parser makes of them and that the configuration strategy draws only what they allow."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from difftest.core.config import Choice, Config, configs, parse_overrides, restrict


def test_a_single_value_still_pins_and_sets_and_exclusions_become_choices() -> None:
    assert parse_overrides(["backing=raw", "cluster_size=4k"]) == {"backing": "raw", "cluster_size": 4096}
    ov = parse_overrides(["backing=none,qcow2", "backing_size=!shorter", "cluster_size=!512,1k",
                          "extended_l2=!on", "l2_cache_size=!default"])
    assert ov["backing"] == Choice(("none", "qcow2"))
    assert ov["backing_size"] == Choice(("shorter",), exclude=True)
    assert ov["cluster_size"] == Choice((512, 1024), exclude=True)
    assert ov["extended_l2"] == Choice((True,), exclude=True)
    assert ov["l2_cache_size"] == Choice((None,), exclude=True)


def test_exclusions_add_up_and_a_later_value_replaces() -> None:
    both = Choice(("qcow2x2", "raw"), exclude=True)
    assert parse_overrides(["backing=!raw", "backing=!qcow2x2"])["backing"] == both
    assert parse_overrides(["backing=!raw", "backing=qcow2"])["backing"] == "qcow2"
    assert parse_overrides(["backing=none,raw,qcow2", "backing=!raw"])["backing"] == Choice(("none", "qcow2"))
    with pytest.raises(ValueError):
        parse_overrides(["backing=raw", "backing=!raw"])  # nothing left to draw
    with pytest.raises(ValueError):
        parse_overrides(["backing=none,,raw"])


def test_a_bool_exclusion_does_not_exclude_an_equal_int() -> None:
    assert Choice((True,), exclude=True).allows(False) and not Choice((True,), exclude=True).allows(True)
    assert Choice((1,)).allows(1) and not Choice((1,)).allows(True)


def test_restrict_merges_a_capability_into_the_overrides() -> None:
    ov: dict[str, object] = {"backing": Choice(("raw", "qcow2"))}
    restrict(ov, "backing", {"raw"}, "the reader takes no raw backing file")
    restrict(ov, "compression_type", {"zstd"}, "no zstd")
    assert ov == {"backing": Choice(("qcow2",)), "compression_type": Choice(("zstd",), exclude=True)}
    with pytest.raises(ValueError, match="no zstd"):
        restrict({"compression_type": "zstd"}, "compression_type", {"zstd"}, "no zstd")


SETS = parse_overrides(["backing=none,qcow2", "cluster_size=!512,1k", "extended_l2=!on",
                        "compression_type=!zstd", "data_file=!on", "version=3", "l2_cache_size=!default"])


@settings(max_examples=120, database=None, deadline=None)
@given(configs(SETS))
def test_drawn_configurations_respect_sets_and_exclusions(cfg: Config) -> None:
    cfg.validate()
    assert cfg.backing in ("none", "qcow2") and cfg.cluster_size >= 4096
    assert not cfg.extended_l2 and cfg.compression_type == "zlib" and not cfg.data_file
    assert cfg.version == 3 and cfg.l2_cache_size is not None


@settings(max_examples=60, database=None, deadline=None)
@given(configs(parse_overrides(["encrypt=!none"])))
def test_excluding_the_default_of_a_dependent_field_still_draws(cfg: Config) -> None:
    # encrypt is drawn after data_file, which must then stay off (Config.validate).
    assert cfg.encrypt in ("luks", "aes") and not cfg.data_file
