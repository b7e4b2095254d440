"""Targets: the implementations stepped in lockstep.

A target owns one directory, makes its own starting image there with its own ``create``
and opens it as a spec.interface.Image. Three kinds:

- ``ModuleTarget``: a package exporting spec.interface's ``create``/``open`` (model, impl).
- ``IsolatedTarget``: the same for a foreign ``py:`` module, run in a worker process
  (difftest/adapters/isolation.py).
- ``QemuTarget``: ``qemu-img create`` plus one persistent ``qemu-io`` (difftest/core/qemuio.py).
- ``CommandTarget``: an external program that speaks qemu-io's command language on stdin
  (the adapter interface, form (b); see difftest/adapters/__init__.py). Its image is made
  with qemu-img create; metadata queries (map, info, snapshots) go to qemu-img.

The backing chain is common to all targets: built once per example by ``build_backing``
(qemu-img and qemu-io when present) and copied into each target's directory, so every
target's top image names a backing file by the same relative name.

An encrypted top image is common too: ``cached_base`` has qemu-img create it once and every
target starts from a copy instead of its own create, since a LUKS master key is random and
two images made apart could never be compared byte for byte. Every open then gets the keys
(``Config.key_options`` in process, ``qemuio.Secrets`` for qemu-io and qemu-img), and a
target that refuses the configuration's feature by name at open (spec.errors
UnsupportedFeature, such as "encryption") sits the example out (core/lockstep.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import os
import random
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from difftest.adapters.isolation import AdapterFailed, Worker, capabilities
from difftest.core import qemuio
from difftest.core.config import (
    BACKING_KEY_SECRET,
    KEY_SECRET,
    LUKS_ITER_TIME,
    Config,
    edge_points,
    restrict,
)
from difftest.core.introspect import EngineIntrospection, Introspection, introspection_of
from spec.errors import Qcow2Error, RequestError

TOP = "top.qcow2"
DATA = "top.data"


class Target(Protocol):
    name: str
    in_process: bool
    dir: Path
    image: Any
    introspection: Introspection
    """What the harness may ask beyond the Image interface (core/introspect.py); set
    whenever ``image`` is opened."""

    def setup(self, cfg: Config, backing: tuple[str, str] | None, base: Path | None = None) -> None:
        """Make the starting image (its own create, or a copy of ``base`` when given: the
        shared encrypted image, see cached_base) and open it."""
        ...
    def supports(self, cfg: Config) -> bool:
        """Whether the harness can run this target under ``cfg`` at all (it can give it the
        keys of an encrypted image); a False target sits the example out."""
        ...
    def lays_out_like_qemu(self, cfg: Config) -> bool:
        """Whether this target's file must equal qemu-io's byte for byte under ``cfg``."""
        ...
    def reopen(self) -> None: ...
    def close(self) -> None: ...
    def release(self) -> None:
        """End what outlives ``close`` (a foreign target's worker process); the run is over."""
        ...
    def open_readonly(self, path: Path) -> Any: ...

    @property
    def path(self) -> Path: ...
    @property
    def foreign(self) -> bool:
        """An adapter (``py:`` other than model and impl, ``cmd:``): it may refuse a
        configuration at open (UnsupportedFeature, NotImplementedError) and sit it out."""
        ...


def data_path(where: Path) -> Path:
    """The external data file of the target whose directory is ``where``: absolute, since
    QEMU opens a relative data_file name relative to its working directory, not to the
    image (qcow2_open -> bdrv_open_child on the bare name), unlike a backing file name, and
    the teardown runs one qemu-img over two targets' files. Its length does not depend on
    the target's name, so every target's header has the same layout and only the name's
    bytes differ (teardown.py blanks them when it compares files)."""
    tag = hashlib.sha256(where.name.encode()).hexdigest()[:16]
    out = where.resolve().parent / "data-files" / f"{tag}.data"
    out.parent.mkdir(exist_ok=True)
    return out


def _create_args(cfg: Config, backing: tuple[str, str] | None, where: Path) -> dict[str, Any]:
    kw: dict[str, Any] = dict(cfg.create_options())
    if backing is not None:
        kw["backing_file"], kw["backing_fmt"] = backing
    if cfg.data_file:
        kw["data_file"] = str(data_path(where))
        kw["data_file_raw"] = cfg.data_file_raw
    return kw


def secrets_of(cfg: Config) -> qemuio.Secrets | None:
    """The keys of ``cfg``'s image chain in QEMU's terms (None: nothing is encrypted)."""
    if not cfg.encrypted:
        return None
    depth = {"qcow2": 1, "qcow2x2": 2}.get(cfg.backing, 0) if cfg.encrypt_backing else 0
    return qemuio.Secrets(KEY_SECRET if cfg.encrypt != "none" else None,
                          BACKING_KEY_SECRET if cfg.encrypt_backing else None, depth)


def qemu_img_create(path: Path, cfg: Config, backing: tuple[str, str] | None,
                    data_file: str = DATA) -> list[str]:
    """The qemu-img create argv for ``cfg`` (also used by the shell reproducer). An
    encrypted image gets its ``--object secret`` and ``-o encrypt.*``; qemu-img may refuse
    a LUKS create spuriously (run it with qemuio.run_qemu_img)."""
    o = [f"compat={'0.10' if cfg.version == 2 else '1.1'}", f"cluster_size={cfg.cluster_size}"]
    if cfg.version == 3:
        o += [f"refcount_bits={cfg.refcount_bits}",
              f"extended_l2={'on' if cfg.extended_l2 else 'off'}",
              f"compression_type={cfg.compression_type}",
              f"lazy_refcounts={'on' if cfg.lazy_refcounts else 'off'}"]
    if cfg.data_file:
        o += [f"data_file={data_file}", f"data_file_raw={'on' if cfg.data_file_raw else 'off'}"]
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if cfg.encrypt != "none":
        argv += ["--object", f"secret,id=sec0,data={KEY_SECRET}"]
        o += [f"{k.replace('encrypt_', 'encrypt.', 1).replace('_', '-')}={v}"
              for k, v in cfg.encrypt_create_options().items()]
    argv += ["-o", ",".join(o)]
    if backing is not None:
        argv += ["-b", backing[0], "-F", backing[1]]
    return [*argv, path.name, str(cfg.size)]


def _run(argv: list[str], cwd: Path) -> None:
    r = qemuio.run_qemu_img(argv, cwd) if argv[0] == "qemu-img" else \
        subprocess.run(argv, cwd=str(cwd), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(qemuio.redact(f"{shlex.join(argv)} failed: {r.stdout}{r.stderr}"))


class ModuleTarget:
    """An in-process target: a module (or object) with the interface's create() and open().
    ``open_options`` go to every read-write open; the model and the impl get
    ``cache="unsafe"``, the cache mode the qemu target runs qemu-io in (see qemuio.py), so a
    flush costs no fsync on either side. External adapters get none (their open() need not
    take options)."""

    in_process = True

    def __init__(self, name: str, module: ModuleType | Any, root: Path,
                 open_options: dict[str, Any] | None = None,
                 config_options: Callable[[Config], dict[str, Any]] | None = None,
                 layout: Callable[[Config], bool] | None = None,
                 sits_out: Callable[[Config], bool] | None = None) -> None:
        self.name = name
        self.sits_out = sits_out
        """The configurations this target cannot run as QEMU does (it sits those out)."""
        self.module = module
        self.dir = root / name
        self.image: Any = None
        self.introspection = Introspection()
        self.base_options = open_options or {}
        self.open_options = dict(self.base_options)
        self.config_options = config_options
        """Which of a configuration's open options this target takes (Config.open_options
        for the impl, only the pure cache-size knobs for the model); None: none."""
        self.layout = layout
        """When this target's file must equal qemu-io's byte for byte; None: never (a
        foreign adapter lays out its file as it likes)."""
        self.keys: dict[str, Any] = {}
        """The keys of the configuration's encrypted images (Config.key_options), given to
        every open, the read-only ones too."""

    @property
    def path(self) -> Path:
        return self.dir / TOP

    def setup(self, cfg: Config, backing: tuple[str, str] | None, base: Path | None = None) -> None:
        self.keys = cfg.key_options()
        self.open_options = {**self.base_options, **self.keys}
        if self.config_options is not None:
            self.open_options.update(self.config_options(cfg))
        if base is not None:
            _copy_sparse(base, self.path)
        else:
            self.module.create(str(self.path), cfg.size, **_create_args(cfg, backing, self.dir))
        # For every qemu-img run on this file (core/oracle.py); None forgets a stale entry.
        qemuio.remember(self.path, secrets_of(cfg))
        self._open()

    def supports(self, cfg: Config) -> bool:
        """An encrypted configuration needs an open() that takes the keys as keywords
        (spec.interface: ``**options``); a foreign module without them sits it out. One
        that takes them and cannot decrypt refuses by name at open (Lockstep)."""
        if self.sits_out is not None and self.sits_out(cfg):
            return False
        keys = cfg.key_options()
        if not keys:
            return True
        try:
            params = inspect.signature(self.module.open).parameters
        except (TypeError, ValueError):
            return True
        return any(p.kind is p.VAR_KEYWORD for p in params.values()) or set(keys) <= set(params)

    def lays_out_like_qemu(self, cfg: Config) -> bool:
        return self.layout is not None and self.layout(cfg)

    def _open(self) -> None:
        self.image = self.module.open(str(self.path), **self.open_options)
        self.introspection = introspection_of(self.image)

    def reopen(self) -> None:
        # QEMU's image keeps the damage of a packing into a live cluster across the reopen
        # (a snapshot operation's, in_separate_process): so does what the harness knows of it
        # (deep seed 100035: the packing before a snapshot, the failed write after it).
        packed = self.introspection.packed_into_live_cluster()
        self.image.close()
        self._open()
        if packed and isinstance(self.introspection, EngineIntrospection):
            self.introspection.packed = True

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
            self.image = None

    def open_readonly(self, path: Path) -> Any:
        return self.module.open(str(path), readonly=True, **self.keys)

    def release(self) -> None:
        pass

    @property
    def foreign(self) -> bool:
        return False


class IsolatedTarget(ModuleTarget):
    """A foreign ``py:`` target: its module lives in a worker process
    (difftest/adapters/isolation.py), started at set-up and ended by ``release`` when the
    run is over, so a hang, a crash, runaway memory or leaked descriptors end with the
    worker (AdapterFailed, a finding with its class) and never reach the harness. The image
    is a proxy: the harness compares it through the Image interface alone."""

    def __init__(self, name: str, spec: str, root: Path) -> None:
        super().__init__(name, None, root)
        self.spec = spec
        self.worker: Worker | None = None

    def _start(self) -> None:
        if self.worker is None:
            self.worker = Worker(self.name)
            self.module = self.worker.load(self.spec)

    def setup(self, cfg: Config, backing: tuple[str, str] | None, base: Path | None = None) -> None:
        self._start()
        super().setup(cfg, backing, base)

    def supports(self, cfg: Config) -> bool:
        keys = cfg.key_options()
        if not keys:
            return True
        params = capabilities(self.spec)[1]
        return params is None or set(keys) <= set(params)

    def _open(self) -> None:
        self.image = self.module.open(str(self.path), **self.open_options)
        self.introspection = Introspection()

    def release(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.image = None

    @property
    def foreign(self) -> bool:
        return True


def narrowed(overrides: dict[str, Any], targets: list[str]) -> dict[str, Any]:
    """``overrides`` with every value a ``py:`` target declares unsupported (its
    ``UNSUPPORTED``, see difftest/adapters/__init__.py) excluded: the campaign does not draw
    a configuration one of its writers cannot run. Readers do not narrow it (they sit such a
    configuration out, core/teardown.py). A target that cannot even be loaded is left to
    fail at set-up, where it is a finding."""
    out = dict(overrides)
    for spec in targets:
        if not is_isolated(spec):
            continue
        try:
            declared = capabilities(spec)[0]
        except AdapterFailed:
            continue
        for name, values in declared.items():
            if name not in {f.name for f in dataclasses.fields(Config)}:
                raise ValueError(f"{spec}: UNSUPPORTED names {name!r}, not a configuration field")
            restrict(out, name, set(values), f"{spec} declares it unsupported")
    return out


def is_isolated(spec: str) -> bool:
    """Whether target ``spec`` runs in a worker: every ``py:`` target but the project's own
    engines (whose speed and introspection the harness relies on)."""
    if not spec.startswith("py:"):
        return False
    return spec[3:].partition(":")[0] not in ("model", "impl")


class QemuTarget:
    in_process = False

    def __init__(self, name: str, root: Path, command: list[str] | None = None) -> None:
        self.name = name
        self.dir = root / name
        self.command = command
        self.image: Any = None
        self.introspection = Introspection()
        self.secrets: qemuio.Secrets | None = None

    @property
    def path(self) -> Path:
        return self.dir / TOP

    def setup(self, cfg: Config, backing: tuple[str, str] | None, base: Path | None = None) -> None:
        if base is not None:
            _copy_sparse(base, self.path)
        else:
            _run(qemu_img_create(self.path, cfg, backing, str(data_path(self.dir))), self.dir)
        self.secrets = secrets_of(cfg)
        qemuio.remember(self.path, self.secrets)
        # A command adapter speaks qemu-io's language but need not take QEMU's options.
        self.image = qemuio.QemuImage(self.path, command=self.command, size=cfg.size,
                                      cluster_size=cfg.cluster_size,
                                      options="" if self.command else cfg.qemu_open_options(),
                                      secrets=self.secrets)
        self.introspection = introspection_of(self.image)  # reopen keeps the same QemuImage

    def supports(self, cfg: Config) -> bool:
        # A command adapter is started as it is and has no way to take the keys.
        return self.command is None or not cfg.encrypted

    def lays_out_like_qemu(self, cfg: Config) -> bool:
        return self.command is None

    def reopen(self) -> None:
        self.image.reopen()

    def close(self) -> None:
        if self.image is not None:
            self.image.close()
            self.image = None

    def open_readonly(self, path: Path) -> Any:
        return qemuio.QemuImage(path, readonly=True, command=self.command, secrets=self.secrets)

    def release(self) -> None:
        pass  # close() has ended the process

    @property
    def foreign(self) -> bool:
        return self.command is not None


def in_separate_process(t: Target, fn: Callable[[Target], Any]) -> Any:
    """Run ``fn`` (a snapshot operation) as the qemu side runs it: QemuImage closes its
    image inside qemu-io, runs ``qemu-img snapshot`` (a fresh process, fresh
    BlockDriverState) and reopens. Every open starts with empty in-memory allocation state
    (BDRVQcow2State.free_byte_offset of qcow2_alloc_bytes, free_cluster_index; the dirty bit
    is cleared on close), and qcow2_snapshot_create/goto/delete do NOT reset that state
    themselves (block/qcow2-snapshot.c; free_byte_offset is only assigned in
    qcow2_alloc_bytes, block/qcow2-refcount.c). So an in-process target gets the same
    close/open around the operation, else its compressed-cluster packing continues where
    QEMU's restarts."""
    if not t.in_process:
        return fn(t)
    t.reopen()
    try:
        result = fn(t)
    except BaseException:
        # The operation's error is the outcome, as qemu-img's is on the qemu side; the
        # reopen after it may fail too (a flagged image refuses a read-write open) and
        # must not take its place.
        with contextlib.suppress(Qcow2Error):
            t.reopen()
        raise
    t.reopen()
    return result


# -- the shared backing chain ---------------------------------------------------------------

BACKING_PATTERNS = (0xB1, 0xC2)


FULL_PATTERN_MAX = 32 << 20
"""Backing layers up to this size carry the pattern everywhere; larger ones (up to 1 GiB,
where an L1 boundary lies inside the image) carry it around every edge point, since writing
and copying the whole layer took seconds per example and most offsets are drawn near those
points (difftest/core/machine.py, ``offsets``)."""


def pattern_spans(cfg: Config, size: int, also: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """(offset, length) pieces of [0, size) that get the backing pattern, sector-aligned."""
    if size <= FULL_PATTERN_MAX:
        return [(0, size)]
    # A drawn request starts at most a sector below an edge point and is at most 4 clusters
    # long (difftest/core/machine.py, offsets and lengths); the margins are generous on purpose.
    below, above = max(cfg.cluster_size, 64 << 10), 4 * cfg.cluster_size + (64 << 10)
    spans: list[tuple[int, int]] = []
    for p in sorted({*edge_points(cfg, cfg.size), *also}):
        lo, hi = max(0, (p - below) // 512 * 512), min(size, -(-(p + above) // 512) * 512)
        if lo >= hi:
            continue
        if spans and lo <= spans[-1][0] + spans[-1][1]:
            start = spans[-1][0]
            spans[-1] = (start, max(hi, start + spans[-1][1]) - start)
        else:
            spans.append((lo, hi - lo))
    return spans


def backing_plan(cfg: Config) -> list[tuple[str, str, int, list[str]]]:
    """(file name, format, size, qemu-io commands) from the bottom of the chain up.

    The content is deterministic: a pattern over each layer (around the edge points in a
    large one, see FULL_PATTERN_MAX), a zeroed piece and an unwritten hole, placed at
    cluster-unaligned offsets so reads cross every kind of edge.
    """
    if cfg.backing == "none":
        return []
    size = cfg.backing_bytes
    c = cfg.cluster_size
    hole = (size // 3) // 512 * 512
    base_cmds = [f"write -q -P {BACKING_PATTERNS[0]:#x} {off} {n}"
                 for off, n in pattern_spans(cfg, size, also=(hole,))]
    zeroed = min(size - 512, c + 512)
    base_cmds.append(f"write -q -z {zeroed} {min(512 * 3, size - zeroed)}")
    base_cmds.append(f"discard -q {hole} {min(c * 2, size - hole)}")
    if cfg.backing == "raw":
        return [("base.raw", "raw", size, base_cmds)]
    layers = [("base.qcow2", "qcow2", size, base_cmds)]
    if cfg.backing == "qcow2x2":
        mid = (size // 2) // 512 * 512
        layers.append(("mid.qcow2", "qcow2", size,
                       [f"write -q -P {BACKING_PATTERNS[1]:#x} {mid} {min(c + 1024, size - mid)}",
                        f"write -q -z 0 {min(1024, size)}"]))
    return layers


def backing_layer_argv(cfg: Config, name: str, size: int, below: tuple[str, str] | None,
                       cmds: list[str], depth: int) -> tuple[list[str], list[str]]:
    """The qemu-img create and qemu-io argv of qcow2 backing layer ``name``, ``depth``
    qcow2 layers above the bottom (also used by the shell reproducer). With
    ``encrypt_backing`` every qcow2 layer is LUKS with BACKING_KEY_SECRET (QEMU's default
    cipher), and qemu-io needs the keys of the layer and of those below it."""
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    o = f"cluster_size={cfg.cluster_size}"
    io = ["qemu-io", "-t", "unsafe"]
    for cmd in cmds:
        io += ["-c", cmd]
    if cfg.encrypt_backing:
        keys = qemuio.Secrets(BACKING_KEY_SECRET, BACKING_KEY_SECRET, depth)
        create += keys.objects()[:2]
        o += f",encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time={LUKS_ITER_TIME}"
        io += [*keys.objects(), "--image-opts", keys.image_opts(name)]
    else:
        io += ["-f", "qcow2", name]
    create += ["-o", o]
    if below is not None:
        create += ["-b", below[0], "-F", below[1]]
    return [*create, name, str(size)], io


def build_backing(cfg: Config, where: Path) -> tuple[str, str] | None:
    """Write the backing chain into ``where`` with qemu-img/qemu-io; return (name, fmt) of
    the layer the top image points to."""
    plan = backing_plan(cfg)
    below: tuple[str, str] | None = None
    for depth, (name, fmt, size, cmds) in enumerate(plan):
        if fmt == "raw":
            _write_raw(where / name, size, cmds)
        else:
            create, io = backing_layer_argv(cfg, name, size, below, cmds, depth)
            _run(create, where)
            _run(io, where)
        below = (name, fmt)
    return below


def cached_backing(cfg: Config, cache: Path) -> tuple[Path, tuple[str, str] | None]:
    """The directory holding ``cfg``'s backing chain, built once per distinct chain in
    ``cache`` (Hypothesis replays a configuration many times while it shrinks, and the
    qemu-img/qemu-io runs were the largest set-up cost), and the (name, fmt) the top image
    points to. Targets still get copies (copy_backing)."""
    plan = backing_plan(cfg)
    key = hashlib.sha256(repr((cfg.cluster_size, cfg.encrypt_backing, plan)).encode()).hexdigest()[:16]
    where = cache / key
    if not where.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        build_backing(cfg, tmp)
        tmp.rename(where)  # complete or absent, never half-built
    return where, ((plan[-1][0], plan[-1][1]) if plan else None)


def build_base(cfg: Config, where: Path, backing: tuple[str, str] | None) -> Path:
    """qemu-img creates ``cfg``'s top image in ``where`` (``-u``: the backing chain need
    not be there; with the size given, the header is the same); return its path."""
    argv = qemu_img_create(Path(TOP), cfg, backing)
    if backing is not None:
        argv.insert(argv.index("-b"), "-u")
    _run(argv, where)
    return where / TOP


_BASE_CACHE: list[tempfile.TemporaryDirectory[str]] = []


def _process_cache() -> Path:
    """A directory for this process's shared base images, removed at exit: a Lockstep made
    without a cache (a reproducer, the deletion pass of core/minimize.py) replays one
    configuration many times, and a LUKS create costs seconds."""
    if not _BASE_CACHE:
        _BASE_CACHE.append(tempfile.TemporaryDirectory(prefix="difftest-bases-"))
    return Path(_BASE_CACHE[0].name)


def cached_base(cfg: Config, cache: Path | None, backing: tuple[str, str] | None) -> Path:
    """The shared starting image of an encrypted configuration, built once per distinct
    qemu-img create command line in ``cache`` (or in a per-process cache): a LUKS create
    costs QEMU's PBKDF2 benchmark, about 2.5 s here, retries aside. Every target copies it,
    so all examples of one configuration share its master key, as all targets do."""
    cache = cache if cache is not None else _process_cache()
    key = hashlib.sha256(repr(qemu_img_create(Path(TOP), cfg, backing)).encode()).hexdigest()[:16]
    where = cache / f"base-{key}"
    if not where.exists():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        build_base(cfg, tmp, backing)
        try:
            tmp.rename(where)  # complete or absent, never half-built
        except OSError:  # another process of a shared cache was first: keep its image
            shutil.rmtree(tmp, ignore_errors=True)
    return where / TOP


def _write_raw(path: Path, size: int, cmds: list[str]) -> None:
    """The raw base: the same commands as the qcow2 base, applied in Python to a sparse file
    (a discard on a raw file reads back as zeros, as qemu's raw driver punches a hole)."""
    chunk = 1 << 20
    with path.open("wb") as f:
        f.truncate(size)
        for cmd in cmds:
            words = cmd.split()
            off, n = int(words[-2]), int(words[-1])
            byte = int(words[words.index("-P") + 1], 0) if "-P" in words else 0
            for at in range(off, off + n, chunk):
                f.seek(at)
                f.write(bytes([byte]) * min(chunk, off + n - at))


def copy_backing(cfg: Config, src: Path, dst: Path) -> None:
    """Each target gets its own copy, so a target that wrongly writes to its backing file
    cannot change what the others read."""
    for name, _fmt, _size, _cmds in backing_plan(cfg):
        _copy_sparse(src / name, dst / name)


SPARSE_BLOCK = 4096


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` with a hole wherever a 4 KiB block is all zeros. Only the content
    decides: which ranges of the source SEEK_DATA calls data depends on the page cache when
    QEMU zeroed them with FALLOC_FL_ZERO_RANGE (unwritten extents), and the holes of a
    backing file change what block status says (metadata preallocation detection), so every
    copy of one file must have the same holes."""
    zero = bytes(SPARSE_BLOCK)
    with src.open("rb") as fin, dst.open("wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fin.fileno(), pos, os.SEEK_HOLE)
            while pos < end:
                chunk = os.pread(fin.fileno(), min(1 << 20, end - pos), pos)
                view = memoryview(chunk)
                run = -1  # start of the current run of non-zero blocks
                for i in range(0, len(chunk) + SPARSE_BLOCK, SPARSE_BLOCK):
                    block = view[i:i + SPARSE_BLOCK]
                    if block and block != zero[:len(block)]:
                        run = i if run < 0 else run
                    elif run >= 0:
                        os.pwrite(fout.fileno(), view[run:i], pos + run)
                        run = -1
                pos += len(chunk)
def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- target names -----------------------------------------------------------------------------

def module_available(name: str) -> bool:
    try:
        mod = importlib.import_module(name)
    except Exception:
        return False
    return callable(getattr(mod, "create", None)) and callable(getattr(mod, "open", None))


def make_target(spec: str, root: Path) -> Target:
    """``model``, ``impl``, ``qemu``, ``qemu2`` (a second independent qemu; likewise
    ``model2``), ``cmd:NAME=ARGV`` (a command adapter) or ``py:package.module`` (any module
    exporting create/open; ``py:package.module:NAME`` takes the object NAME in it)."""
    base = spec.rstrip("0123456789")
    if base == "model":
        # "model2" is a second, independent instance of the model (for self-checks). The
        # model has no cache: it takes the cache-size knobs (and ignores them) but not
        # overlap_check, as it implements no mode but "cached" (model/image.py,
        # _validate_options), and its file equals QEMU's only under QEMU's default cache
        # options (Config.cache_defaults). It sits "all" out: that mode refuses, on a valid
        # image, the write-back of an L2 table a new snapshot shares (inactive L2), which
        # QEMU meets when its cache writes the table back and a cacheless engine never does.
        # "none" and "constant" check less than "cached", which a valid image never tells.
        return ModuleTarget(spec, importlib.import_module(base), root, {"cache": "unsafe"},
                            config_options=Config.cache_size_options,
                            layout=lambda cfg: cfg.cache_defaults,
                            sits_out=lambda cfg: cfg.overlap_check == "all")
    if base == "impl":
        # The impl gets every drawn option, as qemu-io does, so its file must equal QEMU's.
        return ModuleTarget(spec, importlib.import_module(base), root, {"cache": "unsafe"},
                            config_options=Config.open_options, layout=lambda cfg: True)
    if spec.startswith("qemu"):
        if not qemuio.available():
            raise RequestError("qemu-io/qemu-img are not installed")
        return QemuTarget(spec, root)
    if spec.startswith("cmd:"):
        name, _, argv = spec[4:].partition("=")
        return QemuTarget(name or "cmd", root, command=shlex.split(argv))
    if is_isolated(spec):
        modname, _, attr = spec[3:].partition(":")
        return IsolatedTarget(attr or modname.rsplit(".", 1)[-1], spec, root)
    if spec.startswith("py:"):  # py:model, py:impl: the project's own, in process
        modname, _, attr = spec[3:].partition(":")
        mod = importlib.import_module(modname)
        obj = getattr(mod, attr) if attr else mod
        return ModuleTarget(attr or modname.rsplit(".", 1)[-1], obj, root)
    raise RequestError(f"unknown target {spec!r}")


def default_targets() -> list[str]:
    out = [t for t in ("model", "impl") if module_available(t)]
    if qemuio.available():
        out.append("qemu")
        if len(out) == 1:
            out.append("qemu2")
    return out


__all__ = ["Qcow2Error", "Target", "build_backing", "copy_backing", "default_targets", "make_target"]
