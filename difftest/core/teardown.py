"""End-of-run checks on the files every target wrote (called by Lockstep.finish).

0. ``check_live`` (core/lockstep.py): the files as a crash at the end would leave them,
   caches unflushed, have no corruptions (QEMU's write ordering).
1. Snapshot lists agree (id, name) and the whole-image ``map`` agrees, qemu included.
2. Each target is closed; each file passes ``qemu-img check`` with no errors, no corruptions
   and no leaks. A leak is excused only when QEMU's own file leaks too (the run then records
   "qemu-leaks": QEMU itself leaks in that sequence, e.g. refcount blocks left behind by a
   shrink, qcow2_co_truncate keeps them; see ``Lockstep.notes``).
3. Each file obeys spec.rules (same leak excuse).
   Read-only adapters (``Lockstep.readers``) then read every file like the first target,
   each in a worker process (``_reader``).
4. Cross-reads: ``qemu-img compare`` reads each target's file against the first one's, and
   each in-process target opens every other target's file and reads the touched ranges.
   Where QEMU's own corruption (2.) leaves QEMU unable to read its own file, the compare is
   noted ("qemu-unreadable") and the in-process readers must fail alike on every file.
5. Layout: a target that claims QEMU's layout (``Target.lays_out_like_qemu``: the impl
   always, since it gets the same open options as qemu-io; the model under QEMU's default
   cache options only) has written the same file as every qemu target, byte for byte, and the
   same external data file. Content problems are reported by 1-4 first, as the clearer finding.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
from collections.abc import Sequence
from typing import Any, Protocol

from difftest.adapters import isolation
from difftest.adapters.isolation import AdapterFailed
from difftest.core import qemuio
from difftest.core.config import Config, unsupported_by
from difftest.core.divergence import Divergence
from difftest.core.oracle import qemu_cannot_read, qemu_check, qemu_compare
from difftest.core.targets import Target, data_path
from spec.errors import Qcow2Error, UnsupportedFeature
from spec.header import QCOW2_EXT_MAGIC_CRYPTO_HEADER
from spec.image import open_image
from spec.rules import evaluate
from spec.rules.evaluate import run as evaluate_image


class Run(Protocol):
    """What the teardown needs of a lockstep run (core/lockstep.py, ``Lockstep``): declared
    here so that the run can call the teardown without the two importing each other."""

    targets: list[Target]
    log: list[tuple[str, dict[str, Any]]]
    touched: list[tuple[int, int]]
    notes: list[str]
    readers: list[str]
    size: int
    cfg: Config

    def snapshot_names(self) -> dict[str, list[tuple[str, str]]]: ...
    def compare_map(self, off: int = 0, n: int | None = None) -> bool: ...
    def check_live(self) -> bool: ...
    def close_targets(self) -> None: ...


LEAK_RULE = "REFCOUNT-NO-LEAK"
CROSS_READ_MAX = 32 << 20


def _merged(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    spans = sorted((max(0, a), min(size, a + n)) for a, n in ranges if a < size and n > 0)
    out: list[list[int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b - a) for a, b in out]


def finish(ls: Run) -> None:
    first = ls.targets[0].name
    # What a crash at the end of the sequence would leave, before anything is flushed.
    ls.check_live()
    # Without a snapshot operation there is nothing to list (and qemu's list costs a
    # qemu-img process); the files' snapshot tables are still checked by check and rules.
    if any(name.startswith("snapshot_") for name, _ in ls.log):
        names = ls.snapshot_names()
        for snaps in names.values():
            if snaps != names[first]:
                raise Divergence("snapshots", "finish", f"snapshot lists differ: {names}")
    ls.compare_map()
    ls.close_targets()
    have_qemu = qemuio.available()
    qemu_leaks = False
    checks: dict[str, dict[str, Any]] = {}
    if have_qemu:
        for t in ls.targets:
            checks[t.name] = qemu_check(str(t.path))
        qemu_leaks = any(checks[t.name].get("leaks", 0) for t in ls.targets if t.name.startswith("qemu"))
        if qemu_leaks:
            ls.notes.append("qemu-leaks: QEMU's own image leaks clusters after this sequence")
        # QEMU 7.2 itself can corrupt an image (qcow2_alloc_bytes keeps packing compressed
        # data into a host cluster that was freed and reused, see model/__init__.py). When
        # every qemu target's file has exactly the same check errors and corruptions as a
        # target's, that target agrees with the oracle: noted, not a divergence.
        qemu_bad = {(checks[t.name].get("check-errors", 0), checks[t.name].get("corruptions", 0))
                    for t in ls.targets if t.name.startswith("qemu")}
        if not qemu_bad and _packed_without_oracle(ls):
            # No qemu target to compare with, but a target reproduced that packing, which
            # QEMU's own image would carry too: the targets must then fail check alike.
            bad = {(res.get("check-errors", 0), res.get("corruptions", 0)) for res in checks.values()}
            if len(bad) == 1 and bad != {(0, 0)}:
                qemu_bad = bad
                ls.notes.append("qemu-corrupt: the targets reproduced QEMU 7.2 packing compressed "
                                f"data into a live cluster, and fail check alike: {bad}")
        elif len(qemu_bad) == 1 and qemu_bad != {(0, 0)}:
            ls.notes.append(f"qemu-corrupt: QEMU's own image fails check after this sequence: {qemu_bad}")
        for name, res in checks.items():
            if len(qemu_bad) == 1 and qemu_bad != {(0, 0)} and \
                    (res.get("check-errors", 0), res.get("corruptions", 0)) in qemu_bad:
                continue
            if res.get("check-errors") or res.get("corruptions"):
                raise Divergence("check", "finish", f"qemu-img check of {name}'s file: {res}")
            if res.get("leaks") and not qemu_leaks:
                raise Divergence("check", "finish", f"qemu-img check of {name}'s file leaks: {res}")
    _rules(ls, qemu_leaks)
    skip: set[str] = set()
    if have_qemu:
        for t in ls.targets[1:]:
            r = qemu_compare(str(ls.targets[0].path), str(t.path))
            if r.returncode == 0:
                continue
            if r.returncode == 4 and qemu_cannot_read([str(q.path) for q in ls.targets
                                                       if q.name.startswith("qemu")]):
                # The same corruption (see above) can make a compressed cluster undecodable
                # in QEMU's own file; the in-process cross-reads below still compare what
                # each reader makes of each file, failures included.
                ls.notes.append("qemu-unreadable: qemu-img cannot read QEMU's own image after this sequence")
                continue
            if t.name.startswith("qemu") and _packed(ls):
                # As during the run (Lockstep._unless_oracle_corrupt): QEMU damaged its own
                # image by packing compressed data into a live cluster, and its later writes
                # (pieces that run in parallel) decide what the damage became; the oracle is
                # gone, so its file's content and layout are not compared (deep campaign,
                # seed 50074). The in-process targets are still held to each other.
                ls.notes.append(f"qemu-corrupt-live: {t.name}'s content differs after QEMU packed "
                                "compressed data into a live cluster")
                skip.add(t.name)
                continue
            raise Divergence("crossread", "finish", f"qemu-img compare {first} {t.name}: exit "
                             f"{r.returncode} {r.stdout.strip()} {r.stderr.strip()}")
    _cross_read(ls, skip)
    for spec in ls.readers:
        _reader(ls, spec)
    if have_qemu:
        _same_layout(ls, skip)


SNAPSHOT_DATE = (16, 8)
"""date_sec and date_nsec within an entry: the wall clock at creation, which no two
processes share, so the layout comparison ignores it."""


def snapshot_dates(path: str) -> list[tuple[int, int]]:
    """(host offset, length) of the creation time of every entry in ``path``'s snapshot
    table; [] when the file cannot be parsed (the other checks report that)."""
    try:
        with open_image(path) as img:
            return [(off + SNAPSHOT_DATE[0], SNAPSHOT_DATE[1]) for off in img.snapshot_offsets]
    except Qcow2Error:
        return []


def name_in_header(path: str, name: str, cluster_size: int) -> list[tuple[int, int]]:
    """(offset, length) of ``name`` (the target's own data file name) in the header cluster."""
    with open(path, "rb") as f:
        at = f.read(cluster_size).find(name.encode())
    return [] if at < 0 else [(at, len(name))]


def _blank(buf: bytearray, pos: int, ignore: Sequence[tuple[int, int]]) -> bytearray:
    """``buf`` (the file's bytes from ``pos``) with the ``ignore``d ranges zeroed."""
    for off, n in ignore:
        lo, hi = max(off - pos, 0), min(off + n - pos, len(buf))
        if lo < hi:
            buf[lo:hi] = bytes(hi - lo)
    return buf


def first_difference(a: str, b: str, ignore: Sequence[tuple[int, int]] = (),
                     chunk: int = 1 << 20) -> int | None:
    """The first byte offset where files ``a`` and ``b`` differ outside the ``ignore``d
    (offset, length) ranges (a shorter file differs at its end), or None."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x = _blank(bytearray(fa.read(chunk)), pos, ignore)
            y = _blank(bytearray(fb.read(chunk)), pos, ignore)
            if x != y:
                return pos + next((i for i in range(min(len(x), len(y))) if x[i] != y[i]),
                                  min(len(x), len(y)))
            if not x:
                return None
            pos += len(x)


PLAIN_STRUCTURES = ("the header cluster", "the L1 table", "the refcount table", "the snapshot table")
"""Structures whose bytes a layout divergence may show on an encrypted image: everything
else may be ciphertext of guest data or the LUKS key material, which stay out of logs."""


def _what_is(path: str, off: int) -> str:
    """Which structure of ``path`` holds host offset ``off`` (for the divergence message)."""
    try:
        with open_image(path) as img:
            h = img.header
            c = img.cluster_size
            spans = [("the header cluster", 0, c),
                     ("the L1 table", int(h.l1_table_offset), 8 * int(h.l1_size)),
                     ("the refcount table", int(h.refcount_table_offset),
                      int(h.refcount_table_clusters) * c),
                     ("the snapshot table", int(h.snapshots_offset), c if h.nb_snapshots else 0)]
            luks = img.extension(QCOW2_EXT_MAGIC_CRYPTO_HEADER)
            if luks is not None:
                spans.append(("the LUKS header", int(luks.data.offset), int(luks.data.length)))
    except Qcow2Error:
        return f"cluster {off}"
    for what, start, n in spans:
        if start <= off < start + n:
            return f"{what} (+{off - start})"
    return f"host cluster {off // c} (+{off % c}): an L2 table, refcount block or data"


def _same_layout(ls: Run, excluded: set[str] | frozenset[str] = frozenset()) -> None:
    qemu = [t for t in ls.targets if not t.in_process and t.lays_out_like_qemu(ls.cfg)
            and t.name not in excluded]
    for t in ls.targets:
        if not t.in_process or not t.lays_out_like_qemu(ls.cfg):
            continue
        for q in qemu:
            # What legitimately differs: snapshot creation times, and each target's own
            # data file name (same length, see targets.data_path).
            ignore = snapshot_dates(str(t.path)) + snapshot_dates(str(q.path))
            files = [(str(t.path), str(q.path), ignore)]
            if ls.cfg.data_file:
                c = ls.cfg.cluster_size
                ignore += name_in_header(str(t.path), str(data_path(t.dir)), c) + \
                    name_in_header(str(q.path), str(data_path(q.dir)), c)
                files.append((str(data_path(t.dir)), str(data_path(q.dir)), []))
            for mine, theirs, skip in files:
                at = first_difference(mine, theirs, skip)
                if at is None:
                    continue
                with open(mine, "rb") as fa, open(theirs, "rb") as fb:
                    fa.seek(at)
                    fb.seek(at)
                    x, y = fa.read(16), fb.read(16)
                    sizes = (fa.seek(0, 2), fb.seek(0, 2))
                if mine.endswith(".qcow2") and _stale_slices_of_freed_tables(ls, (mine, theirs), skip):
                    ls.notes.append(f"qemu-stale-l2-slice: {q.name} wrote back a slice of a freed "
                                    "L2 table into the free cluster")
                    continue
                where = _what_is(theirs, at) if mine.endswith(".qcow2") else "the data file"
                shown = f"{x.hex()} vs {y.hex()}"
                if ls.cfg.encrypt != "none" and not where.startswith(PLAIN_STRUCTURES):
                    # An encrypted file's data clusters are ciphertext and its LUKS area
                    # holds the key material: neither goes into a log or a reproducer.
                    shown = "bytes not shown (ciphertext or key material)"
                raise Divergence("layout", "finish",
                                 f"{t.name}'s file differs from {q.name}'s at host offset {at}, in "
                                 f"{where}: {shown} (file sizes {sizes[0]} and {sizes[1]})")
            # Counted by the campaign summary, so a run shows how many files were compared.
            ls.notes.append(f"layout-identical: {t.name} = {q.name}")


def _stale_slices_of_freed_tables(ls: Run, files: tuple[str, str], ignore: Sequence[tuple[int, int]]) -> bool:
    """The files differ only inside clusters nothing references in either (free, or leaked
    by a failed operation), and never in the first 512 bytes of such a cluster: what QEMU
    leaves when it frees an L2 table cached in slices smaller than a cluster. update_refcount
    then drops only the cached slice at the cluster's own offset (qcow2_cache_is_table_offset
    compares offsets exactly, block/qcow2-cache.c) and writes another dirty slice of that
    table back at a later eviction (deep seed 120092: a snapshot delete's -1 pass, refused
    half-way by overlap-check=all, so the freed table's refcount never reached the file and
    it stays leaked). The engines drop every slice of a freed table, so none can land on
    the cluster's next owner."""
    cs = ls.cfg.cluster_size
    if ls.cfg.l2_cache_entry_size == cs:
        return False
    try:
        tallies = []
        for f in files:
            with open_image(f) as img:
                tally = evaluate_image(img).tally
            if tally is None:
                return False
            tallies.append(tally.counts)
        with open(files[0], "rb") as fa, open(files[1], "rb") as fb:
            if fa.seek(0, 2) != fb.seek(0, 2):
                return False
            fa.seek(0)
            fb.seek(0)
            found, pos = False, 0
            while True:
                x = _blank(bytearray(fa.read(cs)), pos, ignore)
                y = _blank(bytearray(fb.read(cs)), pos, ignore)
                if not x:
                    return found
                if x != y:
                    c = pos // cs
                    if x[:512] != y[:512] or any(c < len(n) and n[c] for n in tallies):
                        return False
                    found = True
                pos += cs
    except Qcow2Error:
        return False


def _read_outcome(img: Any, pos: int, k: int) -> tuple[str, Any]:
    """("ok", bytes) or ("err", the spec.errors class name)."""
    try:
        return "ok", bytes(img.read(pos, k))
    except Qcow2Error as e:
        return "err", type(e).__name__


def _rules(ls: Run, qemu_leaks: bool) -> None:
    found: dict[str, list[Any]] = {}
    for t in ls.targets:
        try:
            with open_image(str(t.path)) as img:
                findings = evaluate(img)
        except Qcow2Error as e:
            raise Divergence("rules", "finish", f"spec.image cannot open {t.name}'s file: "
                             f"{type(e).__name__}: {e}") from e
        found[t.name] = [f for f in findings if not (qemu_leaks and f.rule == LEAK_RULE)]
    # As for qemu-img check in finish(): the same broken rules, at the same places, as every
    # qemu target's own file is agreement with the oracle (QEMU 7.2's own corruption).
    qemu_found = {_places(found[t.name]) for t in ls.targets if t.name.startswith("qemu")}
    if not qemu_found and _packed_without_oracle(ls):
        qemu_found = {_places(bad) for bad in found.values()}
    for t in ls.targets:
        bad = found[t.name]
        if bad and len(qemu_found) == 1 and _places(bad) in qemu_found:
            ls.notes.append(f"qemu-corrupt: {t.name}'s file breaks the same rules as QEMU's")
            continue
        if bad:
            shown = "; ".join(f"{f.rule}@{f.offset}: {f.message}" for f in bad[:5])
            raise Divergence("rules", "finish", f"{t.name}'s file breaks {len(bad)} rule(s): {shown}")


def _places(findings: list[Any]) -> tuple[tuple[str, int | None], ...]:
    """The broken rules and where, in a comparable form."""
    return tuple(sorted((f.rule, f.offset) for f in findings))


def _packed(ls: Run) -> bool:
    """An in-process target reproduced QEMU 7.2 packing compressed data into a live cluster
    (spec.interface.Introspectable): QEMU's own image was damaged then."""
    return any(t.introspection.packed_into_live_cluster() for t in ls.targets if t.in_process)


def _packed_without_oracle(ls: Run) -> bool:
    """No qemu target runs, and an in-process target reproduced QEMU 7.2 packing compressed
    data into a live cluster (spec.interface.Introspectable): QEMU's own file would be
    damaged the same way, so targets that fail check alike agree with it."""
    return not any(t.name.startswith("qemu") for t in ls.targets) and _packed(ls)


def _plan(ls: Run) -> list[tuple[int, int]]:
    ranges = _merged([*ls.touched, (0, 65536), (max(0, ls.size - 65536), 65536)], ls.size)
    budget = CROSS_READ_MAX
    plan: list[tuple[int, int]] = []
    for a, n in ranges:
        n = min(n, budget)
        if n <= 0:
            break
        plan.append((a, n))
        budget -= n
    return plan


def _scrub(ls: Run, text: str) -> str:
    """``text`` with the run's temporary paths replaced by target names, so one finding reads
    the same in every run (findings are grouped and named by their messages)."""
    for t in ls.targets:
        text = text.replace(str(t.path), f"<{t.name}'s file>").replace(str(t.dir), f"<{t.name}'s dir>")
    return re.sub(re.escape(tempfile.gettempdir()) + r"/[^\s'\",)]*", "<tmp>", text)


def _reader_finding(ls: Run, cls: str, text: str) -> Divergence:
    return Divergence("reader", "finish", f"{cls}: {_scrub(ls, text)}", finding_class=cls)


def _reader(ls: Run, spec: str) -> None:
    """A read-only adapter reads every target's file; it must read what the first target
    reads from that same file. It runs in a worker process (difftest/adapters/isolation.py),
    one per reader per example, so a hang, a crash, runaway memory or leaked descriptors
    end with the worker and become findings of that class; an exception is an ``error``,
    other bytes ``wrong-bytes``. A configuration the reader declares unsupported
    (``UNSUPPORTED``), or that it refuses at open with UnsupportedFeature or
    NotImplementedError, is noted ``unsupported:`` and not read: a reader does not narrow
    what the writers are tested on."""
    try:
        declared, _params = isolation.capabilities(spec)
    except AdapterFailed as e:
        raise _reader_finding(ls, e.finding_class, f"{spec} cannot open any file, loading it "
                              f"failed: {e.detail}") from None
    why = unsupported_by(ls.cfg, declared, spec)
    if why:
        ls.notes.append(f"unsupported: {spec}: {why}")
        return
    ref_t = ls.targets[0]
    with isolation.Worker(spec) as worker:
        try:
            reader = worker.load(spec)
        except AdapterFailed as e:
            raise _reader_finding(ls, e.finding_class, f"{spec} cannot open any file, loading it "
                              f"failed: {e.detail}") from None
        for t in ls.targets:
            ref = ref_t.open_readonly(t.path)
            try:
                if not _read_with(ls, spec, reader, t, ref, ref_t.name):
                    return
            finally:
                ref.close()


def _read_with(ls: Run, spec: str, reader: Any, t: Target, ref: Any, ref_name: str) -> bool:
    """``reader`` reads ``t``'s file against ``ref``; False when it refused the
    configuration at open (noted as unsupported)."""
    try:
        img = reader.open(str(t.path), readonly=True)
    except (UnsupportedFeature, NotImplementedError) as e:
        ls.notes.append(f"unsupported: {spec}: {_scrub(ls, f'{type(e).__name__}: {e}')}")
        return False
    except AdapterFailed as e:
        raise _reader_finding(ls, e.finding_class,
                              f"{spec} cannot open {t.name}'s file: {e.detail}") from None
    except Qcow2Error as e:
        raise _reader_finding(ls, "error", f"{spec} cannot open {t.name}'s file: "
                              f"{type(e).__name__}: {e}") from None
    try:
        if int(img.size) != int(ref.size):
            raise _reader_finding(ls, "wrong-bytes", f"{spec} reads size {img.size} from {t.name}'s "
                                  f"file, {ref_name} {ref.size}")
        for a, n in _plan(ls):
            for pos in range(a, a + n, 1 << 20):
                k = min(1 << 20, a + n - pos)
                want = bytes(ref.read(pos, k))
                try:
                    got = bytes(img.read(pos, k))
                except AdapterFailed as e:
                    raise _reader_finding(ls, e.finding_class, f"{spec} reading [{pos}, {pos + k}) of "
                                          f"{t.name}'s file: {e.detail}") from None
                except (Qcow2Error, NotImplementedError, AttributeError) as e:
                    raise _reader_finding(ls, "error", f"{spec} reading [{pos}, {pos + k}) of {t.name}'s "
                                          f"file: {type(e).__name__}: {e}") from None
                if got != want:
                    i = next((j for j in range(min(len(got), k)) if got[j] != want[j]), len(got))
                    short = f" (a short read: {len(got)} of {k} bytes)" if len(got) < k else ""
                    raise _reader_finding(ls, "wrong-bytes", f"{spec} reads {t.name}'s file differently "
                                          f"from {ref_name} at guest offset {pos + i}: "
                                          f"{got[i:i + 8].hex() or '-'} vs {want[i:i + 8].hex()}{short}")
    finally:
        with contextlib.suppress(Exception):  # a dead worker is already a finding
            img.close()
    return True


def _cross_read(ls: Run, skip: set[str] | frozenset[str] = frozenset()) -> None:
    """Each in-process target reads every other target's file (but those in ``skip``) and
    gets its own content."""
    plan = _plan(ls)
    for reader in ls.targets:
        if not reader.in_process:
            continue
        try:
            own = reader.open_readonly(reader.path)
        except Qcow2Error as e:
            raise Divergence("crossread", "finish", f"{reader.name} cannot reopen its own file: "
                             f"{type(e).__name__}: {e}") from e
        try:
            for other in ls.targets:
                if other is reader or other.name in skip:
                    continue
                try:
                    img = reader.open_readonly(other.path)
                except Qcow2Error as e:
                    raise Divergence("crossread", "finish", f"{reader.name} cannot open {other.name}'s "
                                     f"file: {type(e).__name__}: {e}") from e
                try:
                    if img.size != own.size:
                        raise Divergence("crossread", "finish", f"{reader.name} reads size {img.size} "
                                         f"from {other.name}'s file, {own.size} from its own")
                    for a, n in plan:
                        for pos in range(a, a + n, 1 << 20):
                            k = min(1 << 20, a + n - pos)
                            # A range the reader cannot read in its own file must fail alike
                            # in the other's (QEMU's own corruption can make it unreadable).
                            ok1, mine = _read_outcome(own, pos, k)
                            ok2, theirs = _read_outcome(img, pos, k)
                            if (ok1, ok2) != ("ok", "ok"):
                                if (ok1, mine) != (ok2, theirs):
                                    raise Divergence("crossread", "finish", f"{reader.name} reading "
                                                     f"[{pos}, {pos + k}): own file {ok1} "
                                                     f"{mine if ok1 == 'err' else ''}, {other.name}'s "
                                                     f"{ok2} {theirs if ok2 == 'err' else ''}")
                                continue
                            if mine != theirs:
                                i = next(j for j in range(k) if mine[j] != theirs[j])
                                raise Divergence("crossread", "finish",
                                                 f"{reader.name} reads {other.name}'s file differently "
                                                 f"from its own at guest offset {pos + i}")
                finally:
                    img.close()
        finally:
            own.close()
