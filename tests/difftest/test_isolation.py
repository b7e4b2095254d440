"""Foreign implementations run in worker processes (issue 14, part 1; difftest/adapters/isolation.py).

A reader that hangs where SIGALRM cannot reach, kills its own process, exhausts memory or
leaks descriptors becomes a finding of its class; the harness survives and keeps no
descriptor. The hostile adapters are in tests/difftest/hostile_adapters.py.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from difftest.adapters import isolation
from difftest.core import qemuio, teardown
from difftest.core.config import Config
from difftest.core.divergence import Divergence
from difftest.core.lockstep import Lockstep

HOSTILE = "py:tests.difftest.hostile_adapters:"
LIMIT = 3.0


@pytest.fixture(autouse=True)
def tight_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(isolation.TIMEOUT_ENV, str(LIMIT))
    monkeypatch.setenv(isolation.MEMORY_ENV, "256")


def open_fds() -> set[tuple[str, str]]:
    """This process's descriptors, each as (number, what it refers to): a harness that keeps
    one shows as a pair missing from the earlier set. Not a count: a thread an earlier test
    left (a process pool shut down without waiting, say) may still be closing its pipes, and
    that must not read as the harness closing, or hide it opening, a descriptor."""
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile (the listing's own, too)
            fds.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
    return fds


def read_with(tmp_path: Path, reader: str, cfg: Config | None = None) -> Lockstep:
    """One small example through the model, then ``reader`` reads its file (teardown)."""
    ls = Lockstep(tmp_path, cfg or Config(cluster_size=4096, size=1 << 20), ["model"], [reader])
    with ls:
        ls.write(off=4095, n=2, byte=0x5A)
        ls.finish()
    return ls


def finding(tmp_path: Path, reader: str) -> Divergence:
    with pytest.raises(Divergence) as found:
        read_with(tmp_path, HOSTILE + reader)
    d = found.value
    assert d.kind == "reader" and d.op == "finish"
    assert str(tmp_path) not in str(d), "a temporary path in the message splits one finding into many"
    return d


def test_a_reader_that_ignores_sigalrm_and_spins_is_a_hang_within_the_limit(tmp_path: Path) -> None:
    before = open_fds()
    t0 = time.monotonic()
    d = finding(tmp_path, "spins")
    assert d.finding_class == "hang" and "[reader] finish: hang: " in str(d)
    assert time.monotonic() - t0 < LIMIT + 15  # the limit, plus one example's own checks
    assert open_fds() - before == set()


@pytest.mark.parametrize("reader", ["segfaults", "exits"])
def test_a_reader_that_kills_its_own_process_is_a_crash(tmp_path: Path, reader: str) -> None:
    finding(tmp_path / "first", reader)  # loads the adapter's worker, which outlives a session
    before = open_fds()
    d = finding(tmp_path / "again", reader)
    assert d.finding_class == "crash" and "crash: " in str(d)
    assert ("SIGSEGV" if reader == "segfaults" else "status 3") in str(d)
    assert open_fds() - before == set()


def test_a_reader_that_allocates_without_bound_is_a_memory_finding(tmp_path: Path) -> None:
    d = finding(tmp_path, "hoards")
    assert d.finding_class == "memory" and "memory: " in str(d)


def test_an_exception_is_an_error_and_other_bytes_are_wrong_bytes(tmp_path: Path) -> None:
    d = finding(tmp_path / "a", "raises")
    assert d.finding_class == "error" and "KeyError" in str(d)
    d = finding(tmp_path / "b", "wrong")
    assert d.finding_class == "wrong-bytes" and "at guest offset 0" in str(d)


def test_a_reader_leaking_descriptors_leaves_none_in_the_harness(tmp_path: Path) -> None:
    with Lockstep(tmp_path, Config(cluster_size=4096, size=1 << 20), ["model"]) as ls:
        ls.write(off=0, n=8192, byte=0x11)
        ls.close_targets()
        teardown._reader(ls, HOSTILE + "leaks_fds")  # starts the capability cache
        before = open_fds()
        for _ in range(50):
            teardown._reader(ls, HOSTILE + "leaks_fds")  # 100 files per read, never closed
        assert open_fds() - before == set()


def test_the_harness_goes_on_after_a_reader_crashed(tmp_path: Path) -> None:
    with pytest.raises(Divergence):
        read_with(tmp_path / "a", HOSTILE + "segfaults")
    ls = read_with(tmp_path / "b", HOSTILE + "good")
    assert not any(n.startswith("unsupported") for n in ls.notes)


@pytest.mark.parametrize("reader", ["refuses", "not_implemented"])
def test_refusing_at_open_is_noted_unsupported_not_a_finding(tmp_path: Path, reader: str) -> None:
    ls = read_with(tmp_path, HOSTILE + reader)
    notes = [n for n in ls.notes if n.startswith("unsupported: ")]
    assert len(notes) == 1 and "planted" in notes[0]


def test_a_declared_unsupported_configuration_is_not_read(tmp_path: Path) -> None:
    ls = read_with(tmp_path / "a", HOSTILE + "no_raw", Config(cluster_size=512, size=65536))
    assert f"unsupported: {HOSTILE}no_raw: cluster_size=512" in ls.notes
    ls = read_with(tmp_path / "b", HOSTILE + "no_raw", Config(cluster_size=4096, size=65536))
    assert not any(n.startswith("unsupported") for n in ls.notes)


def test_a_worker_answers_with_builtin_data_only(tmp_path: Path) -> None:
    import model

    path = tmp_path / "t.qcow2"
    model.create(str(path), 1 << 20)
    with isolation.Worker("good", isolation.Limits(5.0, 256)) as w:
        reader = w.load(HOSTILE + "good")
        img = reader.open(str(path), readonly=True)
        assert isinstance(img, isolation.Remote) and img.size == 1 << 20 and img.read(0, 3) == bytes(3)
        with pytest.raises(AttributeError):
            _ = img.no_such_attribute
        img.close()


# -- py: targets ------------------------------------------------------------------------------

def test_a_py_target_runs_in_a_worker_and_its_hang_or_crash_is_a_finding(tmp_path: Path) -> None:
    cfg = Config(cluster_size=4096, size=1 << 20)
    with Lockstep(tmp_path / "ok", cfg, ["model", HOSTILE + "plain_target"]) as ls:
        assert ls.write(off=4095, n=2, byte=0x5A) and ls.read(off=0, n=8192)
        assert isinstance(ls.targets[1].image, isolation.Remote)
        ls.finish()
    before: set[tuple[str, str]] = set()
    for rnd in range(2):  # an adapter's loaded worker stays (three descriptors), sessions do not
        for name, cls in (("spinning_target", "hang"), ("crashing_target", "crash")):
            with pytest.raises(Divergence) as found, \
                    Lockstep(tmp_path / f"{name}{rnd}", cfg, ["model", HOSTILE + name]) as ls:
                ls.write(off=0, n=512, byte=1)
            assert found.value.finding_class == cls and found.value.kind == "crash"
            assert f"{cls}: {name}" in str(found.value)
        before = before or open_fds()
    assert open_fds() - before == set()


def test_a_target_refusing_at_open_sits_out_with_an_unsupported_note(tmp_path: Path) -> None:
    cfg = Config(cluster_size=4096, size=1 << 20)
    with Lockstep(tmp_path, cfg, ["model", HOSTILE + "refusing_target"]) as ls:
        assert [t.name for t in ls.targets] == ["model"]
        assert any(n.startswith("unsupported: refusing_target: UnsupportedFeature") for n in ls.notes)


def test_what_a_target_declares_unsupported_is_never_drawn() -> None:
    from hypothesis import given, settings

    from difftest.core.config import configs
    from difftest.core.targets import narrowed

    ov = narrowed({"version": 3}, ["model", HOSTILE + "plain_target"])

    @settings(max_examples=80, database=None, deadline=None)
    @given(configs(ov))
    def check(cfg: Config) -> None:
        assert cfg.compression_type == "zlib" and not cfg.extended_l2

    check()
    with pytest.raises(ValueError, match="declares it unsupported"):
        narrowed({"compression_type": "zstd"}, [HOSTILE + "plain_target"])


# -- cmd: targets -----------------------------------------------------------------------------

@pytest.mark.skipif(not qemuio.available(), reason="needs qemu-img to make the command's image")
@pytest.mark.parametrize(("program", "cls"), [
    # Never answers, and SIGALRM would not stop it either.
    ("import signal, time; signal.signal(signal.SIGALRM, signal.SIG_IGN); time.sleep(600)", "hang"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "crash"),
])
def test_a_command_adapter_that_hangs_or_dies_is_a_finding(tmp_path: Path, program: str, cls: str) -> None:
    import shlex
    import sys

    spec = f"cmd:mute={shlex.join([sys.executable, '-c', program])}"
    before = open_fds()
    t0 = time.monotonic()
    with pytest.raises(Divergence) as found:
        Lockstep(tmp_path, Config(cluster_size=4096, size=1 << 20), ["model", spec])
    assert found.value.finding_class == cls and f"{cls}: mute" in str(found.value)
    assert time.monotonic() - t0 < LIMIT + 10
    assert open_fds() - before == set()


def test_the_cli_sets_the_limits_and_reports_the_class(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from difftest.cli import main

    rc = main(["difftest", "--targets", f"model,{HOSTILE}plain_target", "--readers", f"{HOSTILE}spins",
               "--adapter-timeout", "2", "--adapter-memory", "300", "--examples", "1", "--steps", "2",
               "--db", "none", "--no-shrink", "--repro", str(tmp_path / "r"), "--config", "cluster_size=4k",
               "--config", "backing=none", "--config", "encrypt=none", "--output", "json"])
    out = json.loads(capsys.readouterr().out)
    assert os.environ[isolation.TIMEOUT_ENV] == "2.0" and os.environ[isolation.MEMORY_ENV] == "300"
    assert rc == 1 and out["divergences"]
    assert all("[reader] finish: hang: " in d["message"] for d in out["divergences"])


def test_what_a_session_leaves_running_is_ended_with_it(tmp_path: Path) -> None:
    """An adapter that starts a program and never stops it (a qemu-io it opened, say): the
    program is in the session's process group and ends with the session."""
    import model

    path = tmp_path / "t.qcow2"
    model.create(str(path), 1 << 20)
    pidfile = tmp_path / "pid"
    with isolation.Worker("good", isolation.Limits(5.0, 256)) as w:
        reader = w.load(HOSTILE + "starts_a_program")
        reader.open(str(path), str(pidfile))
    pid = int(pidfile.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail("the program the session started is still running")


def _dissect_installed() -> bool:
    import importlib.metadata

    from difftest.adapters.dissect_qcow2 import CACHE
    names = {d.metadata["Name"] for d in importlib.metadata.distributions(path=[str(CACHE)])}
    return "dissect.hypervisor" in names


@pytest.mark.skipif(not _dissect_installed(), reason="dissect.hypervisor is installed on first use only")
def test_the_dissect_reader_reads_through_its_worker(tmp_path: Path) -> None:
    ls = read_with(tmp_path, "dissect", Config(cluster_size=65536, size=1 << 20))
    assert not any(n.startswith("unsupported") for n in ls.notes)


def test_overlapping_sessions_of_one_adapter_get_a_worker_each(tmp_path: Path) -> None:
    """A worker waits for its session, which reads the worker's pipe: a second session of
    the same adapter at the same time (a reader and a replay, say) needs its own worker."""
    import model

    path = tmp_path / "t.qcow2"
    model.create(str(path), 1 << 20)
    limits = isolation.Limits(5.0, 256)
    with isolation.Worker("a", limits) as a, isolation.Worker("b", limits) as b:
        img_a = a.load(HOSTILE + "good").open(str(path), readonly=True)
        img_b = b.load(HOSTILE + "good").open(str(path), readonly=True)
        assert img_a.read(0, 2) == img_b.read(0, 2) == bytes(2)
        assert a.channel is not b.channel
    assert len(isolation._LOADED[(os.getpid(), HOSTILE + "good", limits)]) == 1  # one idle kept
