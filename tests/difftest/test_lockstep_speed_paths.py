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
from spec.errors import RequestError


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


def _three_way(tmp_path: Path) -> Lockstep:
    return Lockstep(tmp_path, Config(cluster_size=4096, size=1 << 20), ["model", "impl", "qemu"])


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_overlapped_checks_judge_in_target_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-io's part runs in the helper thread while the engines are checked; a divergence
    of an in-process target is still the one reported when qemu disagrees too, and qemu-io
    is left with no reply pending."""
    with _three_way(tmp_path) as ls:
        ls.write(0, 4096, 0x11)
        impl_t, qemu_t = ls.targets[1], ls.targets[2]
        assert (impl_t.name, qemu_t.name) == ("impl", "qemu")
        real = impl_t.image.read
        monkeypatch.setattr(impl_t.image, "read", lambda off, n: b"\x99" + bytes(real(off, n))[1:])
        monkeypatch.setattr(qemu_t.introspection, "matches", lambda off, want: False)
        with pytest.raises(Divergence) as e:
            ls.write(8192, 512, 0x22)
        assert e.value.kind == "bytes" and "model and impl differ" in str(e.value)
        monkeypatch.undo()
        assert qemu_t.image.read(0, 4096) == b"\x11" * 4096


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_overlapped_allocation_check_still_diverges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _three_way(tmp_path) as ls:
        qemu_t = ls.targets[2]
        monkeypatch.setattr(qemu_t.introspection, "allocated_bytes", lambda off, n: 0)
        monkeypatch.setattr(qemu_t.introspection, "top_layer_runs", lambda off, n: [(off, n, False)])
        with pytest.raises(Divergence) as e:
            ls.write(4096, 4096, 0x33)
        assert e.value.kind == "map" and "top-layer allocation" in str(e.value)


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_overlapped_request_failure_is_judged_like_a_sequential_one(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu's request runs in the helper thread: its failure, when the engines succeeded, is
    an outcome disagreement naming it; an exception of qemu-io's death is a crash."""
    with _three_way(tmp_path) as ls:
        qemu_t = ls.targets[2]

        def refuse(off: int, data: bytes) -> None:
            raise RequestError("refused")

        monkeypatch.setattr(qemu_t.image, "write", refuse)
        with pytest.raises(Divergence) as e:
            ls.write(0, 512, 0x44)
        assert e.value.kind == "error" and "qemu=RequestError" in str(e.value)

        def died(off: int, data: bytes) -> None:
            raise qemuio.QemuIoDied("gone")

        monkeypatch.setattr(qemu_t.image, "write", died)
        with pytest.raises(Divergence) as e:
            ls.write(0, 512, 0x44)
        assert e.value.kind == "crash"


@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-io")
def test_a_forked_process_starts_its_own_helper(tmp_path: Path) -> None:
    """A campaign forks its shards from a process that may have stepped a lockstep already:
    the child must not wait for a helper thread it did not inherit."""
    import multiprocessing as mp

    with _three_way(tmp_path / "parent") as ls:
        ls.write(0, 512, 0x11)
    ctx = mp.get_context("fork")
    p = ctx.Process(target=_child_steps, args=(tmp_path / "child",))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
    assert p.exitcode == 0


def _child_steps(where: Path) -> None:
    with _three_way(where) as ls:
        ls.write(0, 512, 0x22)
        ls.read(0, 4096)
