"""The shortcuts the lockstep takes for speed answer as the long ways do: run splitting
(numpy instead of a backreference regex), the ``write -s`` source file overwritten in place,
and maps compared before they are normalized."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from difftest.core import qemuio
from difftest.core.config import Config
from difftest.core.divergence import Divergence
from difftest.core.lockstep import Lockstep


def _runs_by_regex(data: bytes, min_run: int) -> list[tuple[int, int, int | None]]:
    """The definition: leftmost-longest runs of one byte, ``min_run`` long at least."""
    out: list[tuple[int, int, int | None]] = []
    last = 0
    for m in re.finditer(rb"(.)\1{%d,}" % (min_run - 1), data, re.DOTALL):
        i, j = m.span()
        if last < i:
            out.append((last, i - last, None))
        out.append((i, j - i, data[i]))
        last = j
    if last < len(data):
        out.append((last, len(data) - last, None))
    return out


def test_runs_match_their_regex_definition() -> None:
    rnd = random.Random(7)
    for _ in range(3000):
        parts = [rnd.randbytes(k) if rnd.random() < 0.3 else bytes([rnd.choice([0, 1, 0x11])]) * k
                 for k in (rnd.choice([0, 1, 2, 511, 512, 513, 4096]) for _ in range(rnd.randrange(6)))]
        data = b"".join(parts)
        for min_run in (1, 2, 512):
            assert qemuio.runs(data, min_run) == _runs_by_regex(data, min_run)


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_a_shorter_random_write_after_a_longer_one_writes_only_its_bytes(tmp_path: Path) -> None:
    cfg = Config(cluster_size=4096, size=1 << 20)
    with Lockstep(tmp_path, cfg, ["impl", "qemu"]) as ls:
        ls.write_random(0, 8192, 1)
        ls.write_random(100, 300, 2)  # the source file still holds 8192 bytes of the first
        ls.read(0, 8192)
        q = next(t for t in ls.targets if t.name == "qemu").image
        want = random.Random(1).randbytes(8192)
        want = want[:100] + random.Random(2).randbytes(300) + want[400:]
        assert q.read(0, 8192) == want


def test_maps_that_differ_only_in_host_offsets_agree_and_others_diverge(tmp_path: Path) -> None:
    cfg = Config(cluster_size=4096, size=1 << 20)
    with Lockstep(tmp_path, cfg, ["impl", "impl2"]) as ls:
        ls.write(0, 4096, 0x11)
        a = ls.targets[0]
        real = a.image.map

        def moved(off: int = 0, n: int | None = None) -> list[dict[str, object]]:
            return [dict(e, offset=int(e["offset"]) + (1 << 20)) if "offset" in e else e
                    for e in real(off, n)]

        a.image.map = moved
        ls.write(8192, 4096, 0x22)  # host offsets differ: not a divergence
        a.image.map = lambda off=0, n=None: [dict(e, zero=True) for e in real(off, n)]
        with pytest.raises(Divergence) as e:
            ls.write(16384, 4096, 0x33)
        assert e.value.kind == "map"
