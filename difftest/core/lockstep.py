"""The lockstep harness: one operation applied to every target, then cross-checked.

``Lockstep`` is what the Hypothesis state machine (difftest/core/machine.py) drives, and also
what a reproducer calls directly: every public method is one guest operation, is logged in
``log`` as ``(method, kwargs)``, and raises ``Divergence`` when the targets disagree.

After every operation:
- every target succeeded, or every target failed with the same spec.errors class;
- the touched range reads back the same bytes on every target (runs of one byte are
  verified inside qemu-io with ``read -P``, the rest compared byte for byte);
- in-process targets agree on ``map`` (present/zero/data/depth per extent) over the
  touched range; qemu's map costs a qemu-img process, so it is compared by the
  ``compare_map`` operation and in ``finish``.
``finish`` closes everything and checks each target's file (difftest/core/teardown.py).
What the harness may ask a target beyond the Image interface is its ``introspection``
(difftest/core/introspect.py); ``on_close`` hooks see the run's counters once it is over.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from difftest.adapters.isolation import AdapterFailed
from difftest.core import qemuio, teardown
from difftest.core.config import Config
from difftest.core.divergence import Divergence
from difftest.core.oracle import qemu_check
from difftest.core.targets import (
    Target,
    build_backing,
    cached_backing,
    cached_base,
    copy_backing,
    in_separate_process,
    make_target,
    random_bytes,
)
from spec.errors import Qcow2Error, UnsupportedFeature
from spec.features import QCOW2_INCOMPAT_CORRUPT
from spec.image import open_image

VERIFY_MAX = 256 * 1024
"""Touched ranges longer than this are verified at both ends and in the middle only."""
VERIFY_PIECE = 64 * 1024


Outcome = tuple[str, Any]
"""("ok", value) or ("err", exception class name)."""

Result = tuple[bool, Any]
"""(True, value) or (False, the exception raised), from the helper thread."""


class _Helper:
    """A thread that runs the requests of the out-of-process targets (qemu-io, command
    adapters) while the calling thread steps the in-process engines: a qemu-io request is a
    pipe round trip spent asleep in poll(), so the two overlap (on a quiet two-core machine
    qemu-io runs on the other core). Every job is waited for before the lockstep goes on,
    on every path, so no target is ever used by two threads at once; the results are then
    judged in target order, as if the targets had run one after the other."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[Callable[[], list[Result]]] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[list[Result]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="lockstep-helper", daemon=True).start()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                out = job()
            except BaseException as e:  # a job catches its targets' errors itself
                out = [(False, e)]
            self._done.put(out)

    def start(self, job: Callable[[], list[Result]]) -> _Pending:
        self._jobs.put(job)
        return _Pending(self)


class _Pending:
    def __init__(self, helper: _Helper) -> None:
        self.helper = helper
        self.results: list[Result] | None = None

    def wait(self) -> list[Result]:
        """The job's results (waits once; later calls return them again)."""
        if self.results is None:
            self.results = self.helper._done.get()
        return self.results


_HELPERS = threading.local()


def _helper() -> _Helper:
    """This thread's helper, started at its first use and kept: a campaign makes a
    Lockstep per example. A process forked from one that had a helper (a campaign's shard)
    inherits the record but not the thread, so it starts its own."""
    h: _Helper | None = getattr(_HELPERS, "helper", None)
    if h is None or h.pid != os.getpid():
        h = _HELPERS.helper = _Helper()
    return h


def _each_result(targets: list[Target], fn: Callable[[Target], Any],
                 stop: Callable[[Result], bool]) -> Callable[[], list[Result]]:
    """A helper job: ``fn`` on each of ``targets`` in turn, each outcome caught, stopping
    after one that ``stop`` accepts (where the sequential loop it stands for would raise)."""
    def job() -> list[Result]:
        out: list[Result] = []
        for t in targets:
            try:
                r: Result = (True, fn(t))
            except Exception as e:
                r = (False, e)
            out.append(r)
            if stop(r):
                break
        return out
    return job


def _fatal(r: Result) -> bool:
    """Whether _each raises on this outcome rather than noting it: anything but an
    ordinary spec.errors failure (qemu-io dying is one of those, and fatal)."""
    ok, v = r
    return not ok and (not isinstance(v, Qcow2Error) or isinstance(v, qemuio.QemuIoDied))


def normalize_map(extents: list[dict[str, Any]], start: int, end: int, *,
                  host_holes: bool = True) -> list[tuple[int, int, bool, bool, bool, int]]:
    """Extents clipped to [start, end), host offsets dropped, equal neighbours merged.

    qemu-img map merges neighbours only when their host offsets are contiguous; host
    placement is not guest-visible, so it is left out of the comparison.

    ``host_holes=False`` drops the zero flag of data extents. QEMU sets it from the host
    file (bdrv_co_block_status asks the file when qcow2 returns BDRV_BLOCK_RECURSE, i.e.
    when qcow2_detect_metadata_preallocation fires), and on ext4 a range zeroed with
    FALLOC_FL_ZERO_RANGE (handle_alloc_space) is an unwritten extent that SEEK_DATA
    reports as data once the page cache holds pages for it, which readahead of any nearby
    read brings in. Two byte-identical files read differently (the harness reads each
    target's file differently) can thus map differently: host state, not qcow2 semantics.
    """
    out: list[list[Any]] = []
    for e in extents:
        s = max(int(e["start"]), start)
        t = min(int(e["start"]) + int(e["length"]), end)
        if s >= t:
            continue
        zero = bool(e["zero"]) and (host_holes or not e["data"])
        key = (bool(e.get("present", True)), zero, bool(e["data"]), int(e.get("depth", 0)))
        if out and out[-1][1] == s and tuple(out[-1][2:]) == key:
            out[-1][1] = t
        else:
            out.append([s, t, *key])
    return [(a, b - a, p, z, d, dep) for a, b, p, z, d, dep in out]


def foreign_failure(e: AdapterFailed, op: str) -> Divergence:
    """The divergence for foreign code that hung, crashed, ran out of memory or raised
    (difftest/adapters/isolation.py): kind ``crash`` when its worker is gone, ``exception``
    for an ordinary exception, the message led by the finding class."""
    kind = "exception" if e.finding_class == "error" else "crash"
    return Divergence(kind, op, str(e), finding_class=e.finding_class)


def command_failure(t: Target, e: qemuio.QemuIoDied, op: str) -> Divergence:
    """qemu-io or a command adapter (``cmd:``) died or hung; a command adapter's finding
    carries its class, as a worker's does."""
    if getattr(t, "command", None) is None:
        return Divergence("crash", op, f"{t.name}: {e}")
    return Divergence("crash", op, f"{e.finding_class}: {t.name}: {e}", finding_class=e.finding_class)


def _corrupt_bit(path: Path) -> bool:
    """Whether the file's header has the corrupt bit (read without a lock, as qemu-img -U)."""
    try:
        with open_image(path) as img:
            return bool(img.incompatible_features & QCOW2_INCOMPAT_CORRUPT)
    except Qcow2Error:
        return False


class Lockstep:
    def __init__(self, root: Path | str, cfg: Config, targets: list[str],
                 readers: list[str] | tuple[str, ...] = (), backing_cache: Path | None = None,
                 on_close: Iterable[Callable[[Lockstep], None]] = ()) -> None:
        self.root = Path(root)
        self.on_close = list(on_close)
        """Called once each, by the first ``close``, with the run's final ``ops`` and
        ``notes`` (a campaign counts them this way)."""
        self.closed = False
        self.readers = list(readers)
        """Read-only adapters (difftest/adapters) that read every file at ``finish``; they
        take no keys, so they sit out encrypted configurations."""
        self.cfg = cfg
        self.log: list[tuple[str, dict[str, Any]]] = []
        self.touched: list[tuple[int, int]] = []
        self.ops: Counter[str] = Counter()
        self.notes: list[str] = []
        if cfg.encrypted and self.readers:
            self.notes += [f"reader-skipped: {r} takes no keys" for r in self.readers]
            self.readers = []
        self.size = cfg.size
        self.targets: list[Target] = []
        self.oracle_broken = False
        """Set when QEMU's own image turned out corrupt at a disagreement (see
        _unless_oracle_corrupt), or when QEMU dropped the node (_after_corruption); nothing
        is run or compared after that."""
        self._remote: list[Target] = []
        self.root.mkdir(parents=True, exist_ok=True)
        backing_dir = self.root / "backing"
        backing: tuple[str, str] | None = None
        if cfg.backing != "none" and backing_cache is not None:
            backing_dir, backing = cached_backing(cfg, backing_cache)
        elif cfg.backing != "none":
            backing_dir.mkdir(exist_ok=True)
            backing = build_backing(cfg, backing_dir)
        # An encrypted top image is made once and copied (targets.cached_base).
        base = cached_base(cfg, backing_cache, backing) if cfg.encrypt != "none" else None
        for spec in targets:
            t = make_target(spec, self.root)
            if not t.supports(cfg):
                self.notes.append(f"target-skipped: {t.name} cannot take {cfg.short()}")
                t.release()
                continue
            t.dir.mkdir(parents=True, exist_ok=True)
            if backing is not None:
                copy_backing(cfg, backing_dir, t.dir)
            self.targets.append(t)
        # In-process targets first: they give the reference bytes cheaply.
        self.targets.sort(key=lambda t: not t.in_process)
        try:
            for t in list(self.targets):
                try:
                    t.setup(cfg, backing, base)
                except (UnsupportedFeature, NotImplementedError) as e:
                    feature = getattr(e, "feature", None)
                    if not t.foreign and feature not in cfg.features():
                        raise Divergence("setup", "create", f"{t.name}: {type(e).__name__}: {e}") from e
                    # DESIGN.md: a library names what it does not do. A target without, say,
                    # encryption is not compared on such a configuration (counted in the
                    # notes); an adapter (issue 14) may refuse anything this way.
                    t.close()
                    t.release()
                    qemuio.forget(t.path)
                    self.targets.remove(t)
                    self.notes.append(f"target-skipped: {t.name} lacks {feature}" if not t.foreign else
                                      f"unsupported: {t.name}: {type(e).__name__}: {feature or e}")
                except AdapterFailed as e:
                    raise foreign_failure(e, "create") from None
                except qemuio.QemuIoDied as e:
                    raise command_failure(t, e, "create") from e
                except Qcow2Error as e:
                    raise Divergence("setup", "create", f"{t.name}: {type(e).__name__}: {e}") from e
            if not self.targets:
                raise Divergence("setup", "create", f"no target can run {cfg.short()}")
            sizes = {t.name: t.image.size for t in self.targets}
            if len(set(sizes.values())) > 1:
                raise Divergence("size", "create", f"virtual sizes differ: {sizes}")
        except BaseException:
            # No Lockstep to close: end the processes started and drop the keys remembered
            # for the files (qemuio.remember), so no later run on the same path inherits them.
            self.close_targets()
            for t in self.targets:
                t.release()
                qemuio.forget(t.path)
            raise
        self.size = next(iter(sizes.values()))
        self._remote = [t for t in self.targets if not t.in_process] \
            if any(t.in_process for t in self.targets) else []
        """The out-of-process targets whose requests the helper thread runs while the
        in-process ones step (none when nothing runs in process: nothing to overlap)."""

    # -- plumbing -----------------------------------------------------------------------
    def _each(self, op: str, fn: Callable[[Target], Any]) -> list[Outcome]:
        remote = self._remote
        pending = _helper().start(_each_result(remote, fn, _fatal)) if remote else None
        try:
            return self._each_judged(op, fn, pending)
        finally:
            if pending is not None:
                pending.wait()

    def _each_judged(self, op: str, fn: Callable[[Target], Any], pending: _Pending | None) -> list[Outcome]:
        """``fn`` on every target in order, the out-of-process ones' results taken from
        ``pending`` (started before the in-process targets ran)."""
        out: list[Outcome] = []
        remote: Iterator[Result] | None = None
        for t in self.targets:
            try:
                if pending is not None and not t.in_process:
                    # The in-process targets come first (sorted at set-up), so they have run.
                    remote = remote or iter(pending.wait())
                    ok, v = next(remote)
                    if not ok:
                        raise v
                    out.append(("ok", v))
                else:
                    out.append(("ok", fn(t)))
            except qemuio.QemuIoDied as e:
                raise command_failure(t, e, op) from e
            except AdapterFailed as e:
                raise foreign_failure(e, op) from None
            except Qcow2Error as e:
                out.append(("err", type(e).__name__))
            except Exception as e:  # DESIGN.md: only spec.errors may escape
                raise Divergence("exception", op, f"{t.name} raised {type(e).__name__}: {e}") from e
        return out

    def _agree(self, op: str, outcomes: list[Outcome]) -> bool:
        """True when all succeeded, False when all failed alike; Divergence otherwise."""
        kinds = {o[0] if o[0] == "ok" else o[1] for o in outcomes}
        if len(kinds) > 1:
            desc = ", ".join(f"{t.name}={o[0] if o[0] == 'ok' else o[1]}"
                             for t, o in zip(self.targets, outcomes, strict=True))
            raise Divergence("error", op, f"outcomes differ: {desc}")
        return outcomes[0][0] == "ok"

    def _op(self, name: str, kw: dict[str, Any], fn: Callable[[Target], Any],
            touched: tuple[int, int] | None = None) -> bool:
        self.log.append((name, kw))
        self.ops[name] += 1
        if self.oracle_broken:
            # Nothing is compared any more, so nothing is run either: a dropped qemu node
            # cannot even be reopened (see _after_corruption).
            return False
        desc = f"{name}({', '.join(f'{k}={v}' for k, v in kw.items())})"
        outcomes = self._each(desc, fn)
        try:
            ok = self._agree(desc, outcomes)
            if ok and touched is not None:
                touched = self._whole_clusters(*touched)
                self.touched.append(touched)
                self._verify_and_map(touched[0], touched[1], desc)
            elif not ok and outcomes[0][1] == "CorruptionError":
                self._after_corruption(desc)
        except Divergence as d:
            self._unless_oracle_corrupt(d)
            return outcomes[0][0] == "ok"
        return ok

    def _whole_clusters(self, off: int, n: int) -> tuple[int, int]:
        """[off, off+n) widened to whole clusters: a request changes the clusters it
        touches as a whole (copy-on-write fills the rest of a newly allocated cluster, a
        zero or discard can act per cluster), so a COW region read from the wrong place is
        seen at the step that wrote it, not only by a later read."""
        c = self.cfg.cluster_size
        lo = off - off % c
        return lo, -(-(off + max(n, 1)) // c) * c - lo

    def _after_corruption(self, desc: str) -> None:
        """Every target failed ``desc`` with CorruptionError. If that made one flag the
        image corrupt, all must have (and on v3 images the corrupt bit must be in every
        file). QEMU has then dropped the node (qcow2_signal_corruption sets bs->drv = NULL):
        its later requests fail with ENOMEDIUM, and its L2 and refcount caches are never
        written back, so its file keeps only what they had flushed before. A model without
        caches wrote everything through, so from here on neither the files nor the
        behaviour can be compared: the example ends its comparisons, noted
        ``qemu-dropped``."""
        flagged = {t.name: t.introspection.corrupt() for t in self.targets}
        if not any(flagged.values()):
            return
        if not all(flagged.values()):
            raise Divergence("corrupt", desc, f"only some targets flagged the image corrupt: {flagged}")
        if self.cfg.version >= 3:  # a v2 header has no feature bits
            bits = {t.name: _corrupt_bit(t.path) for t in self.targets}
            if not all(bits.values()):
                raise Divergence("corrupt", desc, f"the corrupt bit is missing from some files: {bits}")
        self.oracle_broken = True
        self.notes.append(f"qemu-dropped: every target flagged the image corrupt at {desc.split('(')[0]}")

    def _unless_oracle_corrupt(self, d: Divergence) -> None:
        """Raise ``d``, unless QEMU's own image already fails ``qemu-img check``: QEMU 7.2 can
        corrupt it (compressed data packed into a reused cluster, see teardown.py), and what
        it does next on such an image depends on its internal concurrency (the pieces of one
        write run in parallel), which a sequential target cannot mirror. The oracle being
        gone, the rest of the example is not compared (noted as ``qemu-corrupt-live``)."""
        qemu = [t for t in self.targets if not t.in_process and t.name.startswith("qemu")]
        if d.kind not in ("bytes", "error", "map") or not qemu:
            raise d
        if any(t.introspection.packed_into_live_cluster() for t in self.targets if t.in_process):
            # An in-process target reproduced the packing into a cluster something else owns
            # (spec.interface.Introspectable): QEMU's image was damaged at that step,
            # even if later writes have since hidden it from qemu-img check.
            self.oracle_broken = True
            self.notes.append(f"qemu-corrupt-live: QEMU had packed compressed data into a live cluster "
                              f"before {d.op} diverged")
            return
        for t in qemu:
            try:
                if self.cfg.lazy_refcounts:
                    # A dirty lazy-refcount image keeps its refcount blocks in QEMU's cache
                    # even across a flush (see compare_map), so its live file always "fails"
                    # check; closing writes them and clears the dirty bit. The example ends
                    # here either way, so QEMU's in-memory state need not be kept.
                    t.reopen()
                else:
                    t.image.sync()  # qemu-img reads the file: QEMU's caches must be in it
            except Qcow2Error:
                raise d from None
            res = qemu_check(str(t.path), force_share=True)
            if not (res.get("corruptions") or res.get("check-errors")) or "stderr" in res:
                raise d
        self.oracle_broken = True
        self.notes.append(f"qemu-corrupt-live: QEMU's own image was corrupt when {d.op} diverged")

    def _ref_read(self, off: int, n: int) -> bytes:
        return bytes(self.targets[0].image.read(off, n))

    def _check_bytes(self, off: int, n: int, desc: str) -> bool:
        """True when every target read the same bytes, False when all failed alike."""
        return self._check_bytes_with(off, n, desc, lambda: self._check_bytes_raw(off, n, desc))

    def _check_bytes_with(self, off: int, n: int, desc: str, raw: Callable[[], None]) -> bool:
        """_check_bytes with ``raw`` doing (or standing for) _check_bytes_raw."""
        if self.oracle_broken:
            return False
        try:
            raw()
            return True
        except qemuio.QemuIoDied as e:
            raise Divergence("crash", desc, str(e)) from e
        except Qcow2Error as e:
            # A range that cannot be read (QEMU 7.2's compressed packing can leave a cluster
            # that does not decode, in QEMU's file and in the model's alike) must fail with
            # the same class everywhere.
            outcomes = self._each(desc, lambda t: t.image.read(off, n))
            if any(o[0] == "ok" for o in outcomes) or len({o[1] for o in outcomes}) > 1:
                raise Divergence("error", desc, f"reading back [{off}, {off + n}) raised "
                                 f"{type(e).__name__}: {e}; outcomes "
                                 f"{[o if o[0] == 'err' else 'ok' for o in outcomes]}") from e
            if outcomes[0][1] == "CorruptionError":
                self._after_corruption(desc)
            return False

    def _check_bytes_raw(self, off: int, n: int, desc: str) -> None:
        if n <= 0:
            return
        want = self._ref_read(off, n)
        remote = self._remote
        if not remote:
            for t in self.targets[1:]:
                self._judge_bytes(t, off, n, want, self._same_bytes(t, off, n, want), desc)
            return
        pending = _helper().start(self._bytes_job(off, n, want, None))
        try:
            self._in_process_bytes(off, n, want, desc)
            results = pending.wait()
        finally:
            pending.wait()
        self._remote_bytes(off, n, want, results, desc)

    def _same_bytes(self, t: Target, off: int, n: int, want: bytes) -> bool:
        same = t.introspection.matches(off, want)
        if same is None:
            same = bytes(t.image.read(off, n)) == want
        return same

    def _judge_bytes(self, t: Target, off: int, n: int, want: bytes, same: bool, desc: str) -> None:
        if not same:
            got = bytes(t.image.read(off, n))
            i = next((k for k in range(n) if got[k] != want[k]), n)
            raise Divergence("bytes", desc, f"{self.targets[0].name} and {t.name} differ at guest "
                             f"offset {off + i}: {want[i:i + 16].hex()} vs {got[i:i + 16].hex()}")

    def _in_process_bytes(self, off: int, n: int, want: bytes, desc: str) -> None:
        """The byte check of the in-process targets after the reference (which come before
        every out-of-process one)."""
        for t in self.targets[1:]:
            if t.in_process:
                self._judge_bytes(t, off, n, want, self._same_bytes(t, off, n, want), desc)

    def _bytes_job(self, off: int, n: int, want: bytes,
                   then: Callable[[], list[Result]] | None) -> Callable[[], list[Result]]:
        """A helper job: each out-of-process target's byte check in order, up to the first
        that differs or raises (where _check_bytes_raw stops), then ``then`` when all agreed."""
        remote = self._remote

        def job() -> list[Result]:
            out: list[Result] = []
            for t in remote:
                try:
                    same = self._same_bytes(t, off, n, want)
                except Exception as e:
                    return [*out, (False, e)]
                out.append((True, same))
                if not same:
                    return out
            return out + (then() if then is not None else [])
        return job

    def _remote_bytes(self, off: int, n: int, want: bytes, results: list[Result], desc: str) -> None:
        """Judge the out-of-process targets' byte checks (the first len(remote) results), in
        order, as _check_bytes_raw's loop would have met them."""
        for t, (ok, v) in zip(self._remote, results, strict=False):
            if not ok:
                raise v
            self._judge_bytes(t, off, n, want, v, desc)

    def _verify_and_map(self, off: int, n: int, desc: str) -> None:
        """``verify(off, n)`` then ``_compare_map_in_process(off, n)``, with the
        out-of-process targets' part run by the helper thread meanwhile: their byte check,
        then (when they all read the same) their allocated byte count over the range. The
        in-process targets' byte check and maps run here in the meantime, and everything is
        judged in the sequential order: bytes (in-process targets first), the in-process
        maps, the reference's top-layer allocation (from its map), the others' allocation.
        A failed read takes the sequential path from the start of the map check. The
        allocation count is thus asked of QEMU also when an in-process target has already
        disagreed, or when the reference's allocation turns out mixed (then the whole-image
        map is asked, as before): a read-only question whose answer is not looked at."""
        off = max(0, min(off, self.size))
        n = max(0, min(n, self.size - off))
        remote = self._remote
        if not remote or self.oracle_broken or n <= 0 or n > VERIFY_MAX:
            self.verify(off, n, desc)
            self._compare_map_in_process(off, n, desc)
            return
        ref = self.targets[0]
        try:
            want = self._ref_read(off, n)
        except Qcow2Error:
            self.verify(off, n, desc)  # reads again, and judges the failure
            self._compare_map_in_process(off, n, desc)
            return

        def counts() -> list[Result]:
            # Asked before the reference's allocation is known to be one run (when it is
            # not, the answer is not looked at and the whole-image map is asked as before).
            return _each_result(remote, lambda t: t.introspection.allocated_bytes(off, n),
                                lambda r: not r[0])()

        pending = _helper().start(self._bytes_job(off, n, want, counts))
        inline_err: Exception | None = None
        map_err: Exception | None = None  # raised where the sequential check would meet it
        ref_runs: list[tuple[int, int, bool]] | None = None
        try:
            try:
                self._in_process_bytes(off, n, want, desc)
            except (Divergence, Qcow2Error) as e:
                inline_err = e
            if inline_err is None:
                try:
                    reports = self._maps(off, n, [t for t in self.targets if t.in_process], desc)
                    ref_runs = self._top_alloc(ref, off, n, desc, reports[0] if reports is not None else None)
                except Exception as e:
                    map_err = e
            results = pending.wait()
        finally:
            pending.wait()

        def raw() -> None:
            if inline_err is not None:
                raise inline_err
            self._remote_bytes(off, n, want, results, desc)

        if not self._check_bytes_with(off, n, desc, raw):
            self._compare_map_in_process(off, n, desc)
            return
        # _compare_map_in_process, from the results gathered above.
        if map_err is not None:
            raise map_err
        assert ref_runs is not None
        uniform = len(ref_runs) == 1
        allocs = results[len(remote):]
        for i, t in enumerate(remote):
            count = None
            if uniform:
                ok, count = allocs[i]
                if not ok:
                    if isinstance(count, Qcow2Error):
                        raise Divergence("map", desc, f"{t.name} alloc raised {type(count).__name__}: "
                                         f"{count}") from count
                    raise count
            self._same_top_alloc(t, ref.name, ref_runs, count, off, n, desc)

    def verify(self, off: int, n: int, desc: str = "verify") -> None:
        """Every target reads the same bytes in [off, off+n) (clipped to the image)."""
        off = max(0, min(off, self.size))
        n = max(0, min(n, self.size - off))
        if n <= VERIFY_MAX:
            self._check_bytes(off, n, desc)
            return
        mid = off + (n // 2) // 512 * 512
        for a in (off, mid, off + n - VERIFY_PIECE):
            self._check_bytes(a, VERIFY_PIECE, desc)

    def _maps(self, off: int, n: int, targets: list[Target], desc: str) -> list[list[dict[str, Any]]] | None:
        """Compare the targets' maps of [off, off+n); their reports (None: fewer than two
        targets, or nothing to map)."""
        if len(targets) < 2 or n <= 0:
            return None
        # Instances of one engine write and read their files the same way, so their host
        # holes agree; two engines need not: the impl zeroes COW regions with fallocate
        # (FALLOC_FL_ZERO_RANGE, as QEMU's handle_alloc_space), the model writes zeros, and
        # what SEEK_DATA says of an unwritten extent depends on the page cache (deep seed
        # 512: 2 MiB clusters, a 1-byte write, the data extents' zero flags differed).
        in_process = all(t.in_process for t in targets) and len({type(t.image) for t in targets}) == 1
        raw = []
        for t in targets:
            try:
                raw.append(t.image.map(off, n))
            except Qcow2Error as e:
                raise Divergence("map", desc, f"{t.name}.map raised {type(e).__name__}: {e}") from e
        if all(r == raw[0] for r in raw[1:]):
            # normalize_map is a function of the extents alone: equal reports normalize
            # equally (the usual case, host offsets included, for engines laid out alike).
            return raw
        got = [normalize_map(r, off, off + n, host_holes=in_process) for r in raw]
        for t, m in zip(targets[1:], got[1:], strict=True):
            if m != got[0]:
                raise Divergence("map", desc, f"map of [{off}, {off + n}) differs:\n  {targets[0].name}: "
                                 f"{got[0]}\n  {t.name}: {m}")
        return raw

    def _compare_map_in_process(self, off: int, n: int, desc: str) -> None:
        if self.oracle_broken:
            return
        off = max(0, min(off, self.size))
        n = max(0, min(n, self.size - off))
        if n <= 0:
            return
        raw = self._maps(off, n, [t for t in self.targets if t.in_process], desc)
        # Top-layer allocation is cheap to get from qemu-io, so it is compared after every
        # step; the zero/data flags wait for compare_map. When the reference says the range
        # is wholly allocated or wholly not, the allocated byte count (qemu-io ``alloc``, one
        # line) pins the other target's layout down exactly; only a mixed range needs the
        # whole-image ``map``.
        # In-process targets other than the reference were compared by _maps already (the
        # present flag and depth say the same thing), and so is the reference's top-layer
        # allocation read from the map _maps just got: present at depth 0.
        others = [t for t in self.targets[1:] if not t.in_process]
        if not others:
            return
        ref = self._top_alloc(self.targets[0], off, n, desc, raw[0] if raw is not None else None)
        uniform = len(ref) == 1
        for t in others:
            count = None
            if uniform:
                try:
                    count = t.introspection.allocated_bytes(off, n)
                except Qcow2Error as e:
                    raise Divergence("map", desc, f"{t.name} alloc raised {type(e).__name__}: {e}") from e
            self._same_top_alloc(t, self.targets[0].name, ref, count, off, n, desc)

    def _same_top_alloc(self, t: Target, ref_name: str, ref: list[tuple[int, int, bool]], count: int | None,
                        off: int, n: int, desc: str) -> None:
        """``t``'s top-layer allocation of [off, off+n) is the reference's ``ref``: its
        allocated byte ``count`` settles a uniform range, else its runs are read."""
        if count is not None and len(ref) == 1 and count == (n if ref[0][2] else 0):
            return
        runs = self._top_alloc(t, off, n, desc)
        if runs != ref:
            raise Divergence("map", desc, f"top-layer allocation of [{off}, {off + n}) differs:\n  "
                             f"{ref_name}: {ref}\n  {t.name}: {runs}")

    def _top_alloc(self, t: Target, off: int, n: int, desc: str,
                   report: list[dict[str, Any]] | None = None) -> list[tuple[int, int, bool]]:
        """[(start, length, allocated in the top image)] over [off, off+n), merged; from
        ``report``, the target's map of that range, when the caller has it."""
        try:
            runs = t.introspection.top_layer_runs(off, n) if report is None else None
            if runs is None:
                report = t.image.map(off, n) if report is None else report
                raw = [dict(e, present=bool(e.get("present", True)) and int(e.get("depth", 0)) == 0,
                            zero=False, data=False, depth=0) for e in report]
            else:
                raw = [{"start": a, "length": k, "present": p, "zero": False, "data": False, "depth": 0}
                       for a, k, p in runs]
        except Qcow2Error as e:
            raise Divergence("map", desc, f"{t.name} map raised {type(e).__name__}: {e}") from e
        return [(a, k, p) for a, k, p, _z, _d, _dep in normalize_map(raw, off, off + n)]

    # -- operations (each is one reproducer line) ---------------------------------------------
    def write(self, off: int, n: int, byte: int) -> bool:
        data = bytes([byte]) * n
        return self._op("write", {"off": off, "n": n, "byte": byte},
                        lambda t: t.image.write(off, data), (off, n))

    def write_random(self, off: int, n: int, seed: int) -> bool:
        data = random_bytes(seed, n)
        return self._op("write_random", {"off": off, "n": n, "seed": seed},
                        lambda t: t.image.write(off, data), (off, n))

    def write_zeroes(self, off: int, n: int, unmap: bool = False) -> bool:
        return self._op("write_zeroes", {"off": off, "n": n, "unmap": unmap},
                        lambda t: t.image.write_zeroes(off, n, unmap=unmap), (off, n))

    def discard(self, off: int, n: int) -> bool:
        return self._op("discard", {"off": off, "n": n}, lambda t: t.image.discard(off, n), (off, n))

    def write_compressed(self, off: int, n: int, byte: int | None = None, seed: int | None = None) -> bool:
        data = random_bytes(seed, n) if seed is not None else bytes([byte or 0]) * n
        kw: dict[str, Any] = {"off": off, "n": n}
        kw.update({"seed": seed} if seed is not None else {"byte": byte})
        return self._op("write_compressed", kw, lambda t: t.image.write_compressed(off, data), (off, n))

    def read(self, off: int, n: int) -> bool:
        """Same outcome everywhere, and the same bytes when it succeeds."""
        desc = f"read(off={off}, n={n})"
        self.log.append(("read", {"off": off, "n": n}))
        self.ops["read"] += 1
        if self.oracle_broken:
            return False  # not run, as in _op
        try:
            if off < 0 or n < 0 or off + n > self.size:
                # Out-of-range reads must fail alike.
                return self._agree(desc, self._each(desc, lambda t: t.image.read(off, n)))
            return self._check_bytes(off, n, desc)
        except Divergence as d:
            self._unless_oracle_corrupt(d)
            return False

    def flush(self) -> bool:
        return self._op("flush", {}, lambda t: t.image.flush())

    def resize(self, new_size: int, shrink: bool = True) -> bool:
        ok = self._op("resize", {"new_size": new_size, "shrink": shrink},
                      lambda t: t.image.resize(new_size, shrink=shrink))
        if ok:
            self._sync_size("resize")
            old = self.size
            self.size = new_size = int(self.targets[0].image.size)
            if new_size > old:
                self.touched.append((old, new_size - old))
                self.verify(old, new_size - old, "resize")
        return ok

    def _sync_size(self, desc: str) -> None:
        sizes = {t.name: int(t.image.size) for t in self.targets}
        if len(set(sizes.values())) > 1:
            raise Divergence("size", desc, f"virtual sizes differ: {sizes}")

    def _snapshot_op(self, op: str, name: str, fn: Callable[[Target], Any]) -> bool:
        """A snapshot operation, run in a process of its own on every target. When it fails
        everywhere and QEMU's file then fails ``qemu-img check``, QEMU left its own image
        corrupt: with overlap-check=all on a v2 image (no corrupt bit) qemu-img refuses the
        write-back of an L2 table a snapshot shares, half-way through qcow2_snapshot_goto,
        after the active L1 table went in with the COPIED flags copied at create, which
        the -1 and 0 passes never get to clear (an L2 table with refcount 2 marked COPIED).
        The impl writes that table without the stale flags (impl/snapshot.py, apply: crash
        safety) and so does not copy the damage, and QEMU's later writes to the shared
        table are refused at write-back: nothing after is comparable (``qemu-corrupt``)."""
        ok = self._op(op, {"name": name}, lambda t: in_separate_process(t, fn))
        if ok or self.oracle_broken:
            return ok
        for t in self.targets:
            if t.in_process or not t.name.startswith("qemu"):
                continue
            res = qemu_check(str(t.path), force_share=True)
            if (res.get("corruptions") or res.get("check-errors")) and "stderr" not in res:
                self.oracle_broken = True
                self.notes.append(f"qemu-corrupt: QEMU's failed {op} left its own image corrupt "
                                  f"({res.get('corruptions', 0)} corruptions)")
        return ok

    def snapshot_create(self, name: str) -> bool:
        return self._snapshot_op("snapshot_create", name, lambda u: u.image.snapshot_create(name))

    def snapshot_apply(self, name: str) -> bool:
        ok = self._snapshot_op("snapshot_apply", name, lambda u: u.image.snapshot_apply(name))
        if self.oracle_broken:
            return ok
        # The snapshot's size is restored before its references are taken, so a failed apply
        # (a refcount overflow) can have changed the size too (qcow2_snapshot_goto).
        self._sync_size("snapshot_apply")
        self.size = int(self.targets[0].image.size)
        if ok:
            for a, n in self.touched[-8:]:
                self.verify(a, n, f"snapshot_apply({name!r})")
        return ok

    def snapshot_delete(self, name: str) -> bool:
        return self._snapshot_op("snapshot_delete", name, lambda u: u.image.snapshot_delete(name))

    def reopen(self) -> bool:
        ok = self._op("reopen", {}, lambda t: t.reopen())
        if ok:
            self._sync_size("reopen")
            for a, n in self.touched[-4:]:
                self.verify(a, n, "reopen")
        return ok

    def compare_map(self, off: int = 0, n: int | None = None) -> bool:
        """Every target (qemu included) reports the same map over [off, off+n)."""
        self.log.append(("compare_map", {"off": off, "n": n}))
        self.ops["compare_map"] += 1
        end = self.size if n is None else min(self.size, off + n)
        off = min(off, self.size)
        desc = f"compare_map(off={off}, n={n})"
        if self.oracle_broken:
            return True
        if self.cfg.lazy_refcounts and not all(t.in_process for t in self.targets):
            # qemu's map is a separate ``qemu-img map -U`` reading the live file. With
            # lazy_refcounts QEMU's flush leaves refcount blocks in its cache
            # (qcow2_write_caches writes them only if qcow2_need_accurate_refcounts), so
            # that process would see stale refcounts, and qcow2_detect_metadata_preallocation
            # (which counts refcounted clusters) would decide differently from an in-process
            # map. Closing writes the caches (qcow2_close -> qcow2_mark_clean), so every
            # target is closed and reopened first, the model too, to keep their in-memory
            # state (free_byte_offset etc.) in step.
            for t in self.targets:
                try:
                    t.reopen()
                except qemuio.QemuIoDied as e:
                    raise Divergence("crash", desc, f"{t.name} reopen: {e}") from e
                except Qcow2Error as e:
                    raise Divergence("error", desc, f"{t.name} reopen raised {type(e).__name__}: {e}") from e
        try:
            self._maps(off, end - off, self.targets, desc)
        except Divergence as d:
            # As after a request (_op): unless QEMU's own image is corrupt by then (deep seed
            # 100080: a snapshot apply refused under overlap-check=all left a v2 image, which
            # keeps no corrupt bit, with an L2 table a snapshot shares marked writable).
            self._unless_oracle_corrupt(d)
            return False
        return True

    def check_live(self) -> bool:
        """The file every in-process target has written so far, its caches unflushed, passes
        ``qemu-img check -U`` without corruptions: what a crash at this instant would leave.
        QEMU's write ordering guarantees it at every instant (a refcount block is written
        before an L2 entry that points at a new cluster, qcow2_alloc_cluster_link_l2 ->
        qcow2_cache_set_dependency; an L2 entry is cleared before the refcount drops,
        update_refcount), so leaks are allowed and corruptions are not. It is how the
        lockstep sees write ordering at all: the final files are equal either way. Not
        with lazy_refcounts, whose on-disk refcounts are stale by design (the dirty bit
        says so); and excused when QEMU's own live file fails alike (noted)."""
        self.log.append(("check_live", {}))
        self.ops["check_live"] += 1
        if self.oracle_broken or self.cfg.lazy_refcounts:
            return True
        for t in self.targets:
            if not t.in_process:
                continue
            res = qemu_check(str(t.path), force_share=True)
            if not (res.get("corruptions") or res.get("check-errors")):
                continue
            if self._qemu_corrupt_too():
                self.notes.append("qemu-corrupt-live: QEMU's own image fails check at check_live")
                continue
            raise Divergence("live", "check_live()", f"{t.name}'s file as a crash now would leave it "
                             f"fails qemu-img check: {res}")
        return True

    def _qemu_corrupt_too(self) -> bool:
        """Whether QEMU 7.2 has corrupted its own image (see _unless_oracle_corrupt): an
        in-process target reproduced its packing into a live cluster, or every qemu
        target's file, its caches flushed (QEMU's corruption sits in them until then),
        fails qemu-img check with corruptions."""
        if any(t.introspection.packed_into_live_cluster() for t in self.targets if t.in_process):
            return True
        qemu = [q for q in self.targets if not q.in_process and q.name.startswith("qemu")]
        for q in qemu:
            try:
                q.image.flush()
            except Qcow2Error:
                return False
        return bool(qemu) and all(qemu_check(str(q.path), force_share=True).get("corruptions") for q in qemu)

    def snapshot_names(self) -> dict[str, list[tuple[str, str]]]:
        return {t.name: [(str(s.get("id")), str(s.get("name"))) for s in t.image.snapshots()]
                for t in self.targets}

    # -- teardown -------------------------------------------------------------------------------
    def finish(self) -> None:
        """Close every target and check the files they wrote (difftest/core/teardown.py).
        The run stays open for ``close``: the checks add notes."""
        self.log.append(("finish", {}))
        if self.oracle_broken:
            self.close_targets()
            return
        try:
            teardown.finish(self)
        except Divergence:
            raise
        except qemuio.QemuIoDied as e:
            raise Divergence("crash", "finish", str(e)) from e
        except AdapterFailed as e:
            raise foreign_failure(e, "finish") from None
        except Exception as e:  # DESIGN.md: only spec.errors may escape, and not even those here
            raise Divergence("exception", "finish", f"{type(e).__name__}: {e}") from e

    def close_targets(self) -> None:
        for t in self.targets:
            try:
                t.close()
            except AdapterFailed:
                pass  # its worker is gone: that was the finding already
            except Exception as e:  # closing is also an operation; report, don't mask
                self.notes.append(f"{t.name}.close raised {type(e).__name__}: {e}")

    def close(self) -> None:
        """End the run: close every target, then (the first time only) call ``on_close``."""
        self.close_targets()
        for t in self.targets:
            t.release()  # a foreign target's worker process (targets.IsolatedTarget)
            qemuio.forget(t.path)  # the keys remembered at set-up (targets.secrets_of)
        if not self.closed:
            self.closed = True
            for hook in self.on_close:
                hook(self)

    def __enter__(self) -> Lockstep:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cleanup(self) -> None:
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)
