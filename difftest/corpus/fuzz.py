"""The fuzz harness: every mutant of difftest/corpus/mutate.py through every reader, in a sandbox.

DESIGN.md ("Errors") promises that no exception but a spec.errors class escapes for any input
file, and that time and memory stay bounded whatever a header claims. This harness holds the
readers to that. For each mutant, a worker process runs the *probes*:

- ``spec.image``: open_image, then every table it can reach (L1, each L2 an L1 entry names,
  the refcount table and each refcount block, the snapshot table and each snapshot's L1
  table, the bitmap directory);
- ``spec.info``: qcow2_info, what ``qcow2lab info`` prints (if the module is present);
- ``spec.rules``: spec.rules.check.check, the catalogue evaluated as qemu-img check counts it
  (if present);
- ``model``: model.open(path, readonly=True) and 4 small reads spread over the guest (if
  the model exports ``open``).

Optional probes are imported guardedly: a missing module is skipped and listed in the report.

A *finding* is one of:
- ``crash``: an exception that is not a spec.errors.Qcow2Error (or the worker died);
- ``hang``: a probe used more than ``time_limit`` seconds of CPU (SIGPROF timer), or the
  worker did not answer at all (wall-clock backstop);
- ``memory``: MemoryError under the address-space cap (RLIMIT_AS = the worker's size after
  imports + ``memory_limit``), or a resident-memory peak above ``memory_limit``.

Peaks are measured with the kernel's resident high-water mark, reset before each image
(``/proc/self/clear_refs`` "5", Linux 4.0+): tracemalloc would be exact for Python objects
but slows the probes about fourfold, which would make the CPU limit meaningless.

A Qcow2Error is a *rejection*, the right answer for a malformed image.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import importlib
import multiprocessing
import os
import resource
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftest.corpus.mutate import Mutant, build_bases, iter_corpus

TIME_LIMIT = 1.0
MEMORY_LIMIT = 64 * 1024 * 1024
"""Resident growth allowed per probe: the bound ``qcow2lab check`` keeps on any image (README,
"Bounded check": at most 64 MiB above start-up, the figure tests/spec/test_check_bounded.py
holds the check to on a wrecked image). The largest peak seen over 100,000 mutants is 56.8 MiB."""
BACKSTOP = 20.0
"""Wall-clock seconds after which a silent worker is killed (a hang outside Python code)."""

FINDING_KINDS = ("crash", "hang", "memory")


class _Timeout(BaseException):
    """Raised by the SIGPROF handler; a BaseException so code under test cannot swallow it."""


# --- probes (run inside the worker) ------------------------------------------------------------

def _probe_spec_image(path: str) -> None:
    from spec import limits as lim
    from spec.entries import L1E_OFFSET_MASK, REFT_OFFSET_MASK
    from spec.image import open_image

    with open_image(path) as img:
        for l2 in sorted({e & L1E_OFFSET_MASK for e in img.l1_table()} - {0}):
            img.l2_table(l2)
        for rb in sorted({e & REFT_OFFSET_MASK for e in img.refcount_table()} - {0}):
            img.refcount_block(rb)
        for sn in img.snapshot_table():
            # QEMU refuses larger snapshot L1 tables (qcow2-snapshot.c); a caller checks first.
            if sn.l1_size <= lim.QCOW_MAX_L1_SIZE // 8:
                img.l1_table(sn.l1_table_offset, sn.l1_size)
        img.bitmap_directory()


def _probe_spec_info(path: str) -> None:
    from spec.image import open_image
    from spec.info import qcow2_info

    with open_image(path) as img:
        qcow2_info(img, path, None)


def _probe_spec_rules(path: str) -> None:
    from spec.rules.check import check

    check(path)


def _probe_model(path: str) -> None:
    model = importlib.import_module("model")
    with model.open(path, readonly=True) as img:
        # The model re-reads whole tables on every request (clarity, not speed; ~30 ms per read
        # of a 32 KiB extended L2 table), so sample the guest: first, two inner, last sector.
        size = img.size
        for off in sorted({0, size // 3, 2 * size // 3, max(size - 512, 0)}):
            img.read(off, min(512, size - off))


Probe = Callable[[str], None]
PROBES: dict[str, tuple[str, Probe]] = {
    # name: (module that must be importable, probe)
    "spec.image": ("spec.image", _probe_spec_image),
    "spec.info": ("spec.info", _probe_spec_info),
    "spec.rules": ("spec.rules.check", _probe_spec_rules),
    "model": ("model", _probe_model),
}


def available_probes() -> tuple[list[str], dict[str, str]]:
    """(probes that can run here, {skipped probe: why}). Imports guardedly."""
    ok, skipped = [], {}
    for name, (module, _) in PROBES.items():
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # a module mid-edit must not stop the campaign
            skipped[name] = f"import failed: {type(e).__name__}: {e}"
            continue
        if name == "model" and not hasattr(mod, "open"):
            skipped[name] = "model does not export open() yet"
            continue
        ok.append(name)
    return ok, skipped


# --- the worker ----------------------------------------------------------------------------------

@dataclass
class Result:
    """What the probes did with one mutant."""

    name: str
    outcome: str
    """"ok" (every probe accepted it), "rejected" (a Qcow2Error), or a finding kind."""
    probe: str | None = None
    error: str | None = None
    detail: str | None = None
    peak: int = 0
    cpu: float = 0.0
    rejections: dict[str, str] = field(default_factory=dict)
    """probe -> error class name, for the probes that rejected the image."""
    probe_cpu: dict[str, float] = field(default_factory=dict)
    """probe -> CPU seconds it used on this image."""

    @property
    def finding(self) -> bool:
        return self.outcome in FINDING_KINDS


def _on_sigprof(signum: int, frame: Any) -> None:
    raise _Timeout


def _worker_init(memory_limit: int) -> None:
    # Import what the probes need before measuring the baseline, so the cap is on growth.
    for _, (module, _) in PROBES.items():
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    signal.signal(signal.SIGPROF, _on_sigprof)
    with open("/proc/self/statm") as f:
        vsize = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vsize + memory_limit + (64 << 20), resource.RLIM_INFINITY))


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    """Reset the resident high-water mark; returns the current resident size in bytes."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def _peak_since(baseline: int) -> int:
    return max(0, _status_kib("VmHWM") * 1024 - baseline)


def run_one(mutant: Mutant, probes: list[str], time_limit: float = TIME_LIMIT,
            memory_limit: int = MEMORY_LIMIT) -> Result:
    """Probe one mutant (in the worker): write it, run each probe under the limits, clean up."""
    from spec.errors import Qcow2Error

    d = Path(tempfile.mkdtemp(prefix="qcow2lab-fuzz-"))
    res = Result(mutant.name, "ok")
    try:
        path = str(mutant.write(d))
        for name in probes:
            fn = PROBES[name][1]
            baseline = _reset_peak()
            t0 = time.process_time()
            signal.setitimer(signal.ITIMER_PROF, time_limit)
            try:
                fn(path)
            except Qcow2Error as e:
                res.rejections[name] = type(e).__name__
            except _Timeout:
                _finding(res, "hang", name, f"more than {time_limit} s of CPU", traceback.format_exc())
            except MemoryError:
                _finding(res, "memory", name, "MemoryError under the address-space cap",
                         traceback.format_exc())
            except Exception as e:  # exactly what we look for
                _finding(res, "crash", name, f"{type(e).__name__}: {e}", traceback.format_exc())
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
            res.probe_cpu[name] = time.process_time() - t0
            res.cpu = max(res.cpu, res.probe_cpu[name])
            peak = _peak_since(baseline)
            res.peak = max(res.peak, peak)
            if peak > memory_limit and not res.finding:
                _finding(res, "memory", name, f"resident peak grew by {peak} bytes", None)
        if res.outcome == "ok" and res.rejections:
            res.outcome = "rejected"
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return res


def _finding(res: Result, kind: str, probe: str, error: str, detail: str | None) -> None:
    if res.finding:
        return  # keep the first finding
    res.outcome, res.probe, res.error = kind, probe, error
    res.detail = "".join(detail.splitlines(keepends=True)[-12:]) if detail else None


# --- the campaign ------------------------------------------------------------------------------

@dataclass
class Campaign:
    seed: int
    results: list[Result]
    probes: list[str]
    skipped: dict[str, str]
    workdir: str

    @property
    def findings(self) -> list[Result]:
        return [r for r in self.results if r.finding]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("ok", "rejected", *FINDING_KINDS), 0)
        for r in self.results:
            out[r.outcome] += 1
        return out


class _Pool:
    """A process pool that can be rebuilt after a worker dies or hangs."""

    def __init__(self, jobs: int, memory_limit: int) -> None:
        self.jobs, self.memory_limit = jobs, memory_limit
        self.ex = self._new()

    def _new(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("fork"),
                                      initializer=_worker_init, initargs=(self.memory_limit,))

    def reset(self) -> None:
        procs = list((getattr(self.ex, "_processes", None) or {}).values())
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill()
        self.ex.shutdown(wait=False, cancel_futures=True)
        self.ex = self._new()


def iterate(mutants: Iterable[Mutant], *, jobs: int = 1, time_limit: float = TIME_LIMIT,
            memory_limit: int = MEMORY_LIMIT, probes: list[str] | None = None) -> Iterator[Result]:
    """Probe every mutant, yielding results in order (for a progress bar).

    ``mutants`` is consumed lazily, so a campaign of any size holds only a window of images
    in memory.
    """
    if probes is None:
        probes = available_probes()[0]
    pool = _Pool(max(1, jobs), memory_limit)
    source = iter(mutants)
    retry: collections.deque[Mutant] = collections.deque()  # requeued after a pool reset
    pending: collections.deque[tuple[Mutant, cf.Future[Result]]] = collections.deque()
    window = max(1, jobs) * 2

    def requeue() -> None:
        retry.extendleft(reversed([m for m, _ in pending]))
        pending.clear()
        pool.reset()

    try:
        while True:
            while len(pending) < window:
                m = retry.popleft() if retry else next(source, None)
                if m is None:
                    break
                try:
                    fut = pool.ex.submit(run_one, m, probes, time_limit, memory_limit)
                except cf.process.BrokenProcessPool:
                    # A worker died after the last result was collected; the pending future
                    # that ran on it reports the crash below.
                    retry.appendleft(m)
                    if pending:
                        break
                    pool.reset()
                    continue
                pending.append((m, fut))
            if not pending:
                return
            m, fut = pending.popleft()
            try:
                yield fut.result(timeout=BACKSTOP)
            except cf.TimeoutError:
                yield Result(m.name, "hang", None, f"no answer in {BACKSTOP} s (wall clock)")
                requeue()
            except cf.process.BrokenProcessPool as e:
                yield Result(m.name, "crash", None, f"worker died: {e}")
                requeue()
    finally:
        pool.ex.shutdown(wait=True, cancel_futures=True)


def campaign(n: int, *, seed: int = 0, jobs: int = 1, workdir: str | None = None,
             time_limit: float = TIME_LIMIT, memory_limit: int = MEMORY_LIMIT,
             progress: Callable[[Result], None] | None = None) -> Campaign:
    """Build the bases, generate ``n`` mutants with ``seed`` and probe them all."""
    wd = workdir or tempfile.mkdtemp(prefix="qcow2lab-fuzz-")
    bases = build_bases(wd)
    mutants = iter_corpus(bases, n, seed)
    probes, skipped = available_probes()
    results = []
    for r in iterate(mutants, jobs=jobs, time_limit=time_limit, memory_limit=memory_limit, probes=probes):
        results.append(r)
        if progress:
            progress(r)
    return Campaign(seed, results, probes, skipped, wd)
