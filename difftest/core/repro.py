"""The two reproducers of a divergence.

- ``repro.sh``: the qemu side as a shell script of qemu-img/qemu-io commands (run it in an
  empty directory; it rebuilds the backing chain, creates the image, replays the operations
  and prints what qemu reads and reports at the end).
- ``test_repro.py``: a pytest test whose body replays the same operations through
  ``Lockstep`` on the same targets and readers; it fails with the same ``Divergence`` until fixed.

A reader finding's repro.sh ends by running the reader (difftest/core/readcheck.py) on the
image qemu-io wrote, against what ``qemu-img convert`` reads, and exits with its status: it
fails while the reader's bug is there. Each finding has its own folder, named by its
signature (difftest/core/signature.py).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from difftest.core.config import Config
from difftest.core.divergence import Divergence
from difftest.core.qemuio import PBKDF2_FLAKE, PBKDF2_RETRIES
from difftest.core.signature import normalise, operation_identity, reader_of, signature
from difftest.core.targets import TOP, backing_layer_argv, backing_plan, qemu_img_create, secrets_of


def _io_line(name: str, kw: dict[str, Any]) -> str | None:
    off, n = kw.get("off"), kw.get("n")
    if name == "write":
        return f"write -q -P {kw['byte']:#x} {off} {n}"
    if name == "write_random":
        return f"write -q -s rand-{kw['seed']}-{n}.bin {off} {n}"
    if name == "write_zeroes":
        return f"write -q -z{' -u' if kw['unmap'] else ''} {off} {n}"
    if name == "discard":
        return f"discard -q {off} {n}"
    if name == "write_compressed":
        if kw.get("seed") is not None:
            return f"write -q -c -s rand-{kw['seed']}-{n}.bin {off} {n}"
        return f"write -q -c -P {kw['byte']:#x} {off} {n}"
    if name == "read":
        return f"read -v {off} {n}"
    if name == "flush":
        return "flush"
    if name == "resize":
        return f"truncate {kw['new_size']}"
    return None


def _until_finish(log: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """The guest operations: what ``finish`` logs itself (its map comparison) is left out."""
    out = []
    for entry in log:
        if entry[0] == "finish":
            break
        out.append(entry)
    return out


RETRY_FUNCTION = f"""\
# qemu-img's PBKDF2 benchmark (LUKS key slots) fails spuriously on a busy machine; retry that.
retry_pbkdf2() {{
    n=0
    until out=$("$@" 2>&1); do
        case $out in
            *"{PBKDF2_FLAKE}"*) n=$((n + 1)); [ $n -lt {PBKDF2_RETRIES} ] || {{ echo "$out"; return 1; }} ;;
            *) echo "$out"; return 1 ;;
        esac
    done
}}"""
"""A shell function repro.sh runs every LUKS ``qemu-img create`` through (the retry of
qemuio.run_qemu_img, in sh)."""


def _img_image(cfg: Config) -> list[str]:
    """How a qemu-img command of the script names the top image: ``-f qcow2 top.qcow2``, or
    its secret objects and ``--image-opts`` with the keys when it is encrypted."""
    keys = secrets_of(cfg)
    if keys is None:
        return ["-f", "qcow2", TOP]
    return [*keys.objects(), "--image-opts", keys.image_opts(TOP)]


def _driver_image(cfg: Config, plain: list[str]) -> list[str]:
    """How a qemu-io or ``qemu-img snapshot`` command of the script names the top image: with
    the image's driver options (cache sizes, overlap-check) and keys by ``--image-opts``, as
    the harness passes them (qemuio.QemuIo, QemuImage._img(driver=True)), else ``plain``."""
    keys = secrets_of(cfg)
    opts = ",".join(o for o in (cfg.qemu_open_options(), keys.open_options() if keys else "") if o)
    if not opts:
        return plain
    return [*(keys.objects() if keys else []), "--image-opts", f"driver=qcow2,file.filename={TOP},{opts}"]


def _create_line(argv: list[str], encrypted: bool) -> str:
    return f"retry_pbkdf2 {shlex.join(argv)} || exit 1" if encrypted else shlex.join(argv)


def shell_script(cfg: Config, log: list[tuple[str, dict[str, Any]]], d: Divergence | None = None,
                 readers: list[str] | tuple[str, ...] = ()) -> str:
    """The qemu side of the reproducer; for a reader finding, the reader's check after it
    (``readers``: the campaign's readers, the one the finding names is run)."""
    lines = ["#!/bin/sh", "# qcow2lab difftest reproducer, qemu side. Run in an empty directory.",
             f"# config: {cfg!r}"]
    if d is not None:
        lines += [f"# divergence: {line}" for line in normalise(str(d)).splitlines()]
    if cfg.encrypted:
        lines.append(RETRY_FUNCTION)
    lines += ["set -x"]
    below: tuple[str, str] | None = None
    for depth, (name, fmt, size, cmds) in enumerate(backing_plan(cfg)):
        if fmt == "raw":
            lines.append(f"truncate -s {size} {name}")
            io = ["qemu-io", "-f", "raw"]
            for c in cmds:
                io += ["-c", c]
            lines.append(shlex.join([*io, name]))
        else:
            create, io = backing_layer_argv(cfg, name, size, below, cmds, depth)
            lines += [_create_line(create, cfg.encrypt_backing), shlex.join(io)]
        below = (name, fmt)
    lines.append(_create_line(qemu_img_create(Path(TOP), cfg, below), cfg.encrypt != "none"))
    seeds = sorted({(kw["seed"], kw["n"]) for _, kw in log if kw.get("seed") is not None})
    for seed, n in seeds:
        lines.append(f"python3 -c 'import random; open(\"rand-{seed}-{n}.bin\", \"wb\")"
                     f".write(random.Random({seed}).randbytes({n}))'")
    segment: list[str] = []

    def flush_segment() -> None:
        if segment:
            argv = ["qemu-io", "-t", "unsafe"]
            for c in segment:
                argv += ["-c", c]
            lines.append(shlex.join([*argv, *_driver_image(cfg, ["-f", "qcow2", TOP])]))
            segment.clear()

    # The virtual size is tracked so that a resize runs as the harness runs it: qemu-io's
    # ``truncate`` in the same process (a separate ``qemu-img resize`` would restart QEMU's
    # in-memory allocation state, e.g. the compressed-cluster packing offset), and a shrink
    # without shrink=True is refused before reaching qemu, as QemuImage.resize does.
    size = -(-cfg.size // 512) * 512  # qemu-img create rounds up to a sector
    snapshot_sizes: dict[str, list[int]] = {}  # QEMU picks the first snapshot of a name
    for name, kw in _until_finish(log):
        line = _io_line(name, kw)
        if name == "resize" and not kw["shrink"] and kw["new_size"] < size:
            lines.append(f"# resize to {kw['new_size']} refused: shrinking needs --shrink")
            continue
        if name == "resize":
            size = kw["new_size"]
        elif name == "snapshot_create":
            snapshot_sizes.setdefault(kw["name"], []).append(size)
        elif name == "snapshot_apply":
            size = (snapshot_sizes.get(kw["name"]) or [size])[0]
        elif name == "snapshot_delete" and snapshot_sizes.get(kw["name"]):
            snapshot_sizes[kw["name"]].pop(0)
        if line is not None:
            segment.append(line)
        elif name.startswith("snapshot_"):
            flush_segment()
            flag = {"snapshot_create": "-c", "snapshot_apply": "-a", "snapshot_delete": "-d"}[name]
            # qemu-img snapshot has no -f: the image's options (or nothing) name the format.
            lines.append(shlex.join(["qemu-img", "snapshot", flag, kw["name"], *_driver_image(cfg, [TOP])]))
        elif name == "reopen":
            flush_segment()
        elif name == "compare_map":
            flush_segment()
            lines.append(shlex.join(["qemu-img", "map", "--output=json", *_img_image(cfg)]))
    flush_segment()
    lines += [shlex.join(["qemu-img", "map", "--output=json", *_img_image(cfg)]),
              shlex.join(["qemu-img", "snapshot", "-l", *_driver_image(cfg, [TOP])]),
              shlex.join(["qemu-img", "check", *_img_image(cfg)])]
    if d is not None and d.kind == "reader" and readers:
        lines += _reader_lines(cfg, log, reader_of(d, readers) or readers[0], size)
    return "\n".join(lines) + "\n"


READER_TIMEOUT = 60
"""Seconds repro.sh gives the reader before ``timeout`` kills it (a hang exits 137)."""
PROJECT = Path(__file__).resolve().parents[2]
"""The checkout the reproducer came from: repro.sh runs the reader with it on PYTHONPATH,
with the interpreter that ran the campaign (the adapters and the project live there)."""


def read_ranges(cfg: Config, log: list[tuple[str, dict[str, Any]]], size: int) -> list[tuple[int, int]]:
    """The guest ranges the teardown has a reader read: every request's whole clusters, and
    the first and last 64 KiB (as teardown._plan, from the log alone)."""
    c = cfg.cluster_size
    spans = [(0, 65536), (max(0, size - 65536), 65536)]
    for _, kw in _until_finish(log):
        if isinstance(kw.get("off"), int) and isinstance(kw.get("n"), int):
            lo = kw["off"] - kw["off"] % c
            spans.append((lo, -(-(kw["off"] + max(kw["n"], 1)) // c) * c - lo))
    out: list[list[int]] = []
    for a, b in sorted((a, min(a + n, size)) for a, n in spans if a < size):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b - a) for a, b in out]


def _reader_lines(cfg: Config, log: list[tuple[str, dict[str, Any]]], reader: str, size: int) -> list[str]:
    from difftest.adapters.isolation import Limits

    ranges = [f"{a}:{n}" for a, n in read_ranges(cfg, log, size)]
    # The memory limit the harness's worker runs foreign code under (a memory finding shows
    # as MemoryError or a kill only below it).
    memory_kib = Limits.from_env().memory_mib * 1024
    return ["# The reader's side: what QEMU reads, then the reader over the same guest ranges;",
            "# the script's exit status is the reader check's (non-zero while the bug is there).",
            shlex.join(["qemu-img", "convert", "-O", "raw", *_img_image(cfg), "expected.raw"]),
            f"(ulimit -v {memory_kib}; "
            f'PYTHONPATH={shlex.quote(os.pathsep.join([str(PROJECT), *reader_paths([reader])]))}'
            '${PYTHONPATH:+:$PYTHONPATH} '
            + shlex.join(["timeout", "-s", "KILL", str(READER_TIMEOUT), sys.executable, "-m",
                          "difftest.core.readcheck", reader, TOP, "expected.raw", *ranges]) + ")"]


def reader_paths(specs: list[str] | tuple[str, ...]) -> list[str]:
    """The directories a reproducer puts on the path so that its ``py:`` readers (and
    targets) import wherever it runs: where each one's top-level module is found now (the
    campaign found it, e.g. in its current directory), unless that is the project or the
    interpreter's own (both are on the path anyway)."""
    from difftest.adapters import cwd_on_path

    cwd_on_path()
    out: list[str] = []
    for r in specs:
        if not r.startswith("py:"):
            continue
        try:
            spec = importlib.util.find_spec(r[3:].partition(":")[0].split(".")[0])
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            where = Path(next(iter(spec.submodule_search_locations))).parent.resolve()
        elif spec is not None and spec.origin and spec.has_location:
            where = Path(spec.origin).parent.resolve()
        else:
            continue
        interpreter = (Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve())
        if where != PROJECT and not any(where.is_relative_to(p) for p in interpreter) \
                and str(where) not in out:
            out.append(str(where))
    return out


def pytest_body(cfg: Config, log: list[tuple[str, dict[str, Any]]], targets: list[str],
                d: Divergence | None = None, readers: list[str] | tuple[str, ...] = ()) -> str:
    lines = ['"""qcow2lab difftest reproducer (generated)."""', "",
             "from pathlib import Path", "",
             "from difftest.core.config import Config",
             "from difftest.core.lockstep import Lockstep", ""]
    paths = reader_paths([*targets, *readers])
    if paths:
        # The py: targets' and readers' own directories: the adapter worker inherits sys.path.
        lines[2:2] = ["import sys"]
        lines += [f"sys.path += [p for p in {paths!r} if p not in sys.path]", ""]
    lines += ["", "def test_repro(tmp_path: Path) -> None:"]
    if d is not None:
        lines += [f"    # divergence: {line}" for line in normalise(str(d)).splitlines()]
    if cfg.encrypted:
        lines.append(f"    # encrypted: every target opens with {cfg.key_options()!r} (Config.key_options)")
    # The readers read every file in ls.finish(): without them a reader finding cannot show.
    lines.append(f"    ls = Lockstep(tmp_path, {cfg!r}, {targets!r}, {list(readers)!r})" if readers
                 else f"    ls = Lockstep(tmp_path, {cfg!r}, {targets!r})")
    lines.append("    try:")
    for name, kw in _until_finish(log):
        args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        lines.append(f"        ls.{name}({args})")
    lines.append("        ls.finish()")
    lines.append("    finally:")
    lines.append("        ls.close()")
    return "\n".join(lines) + "\n"


def write_reproducers(where: Path, cfg: Config, log: list[tuple[str, dict[str, Any]]],
                      targets: list[str], d: Divergence | None = None,
                      readers: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Write repro.sh and test_repro.py into ``where`` (overwriting the previous pair: the
    last divergence Hypothesis replays is the shrunk one)."""
    where.mkdir(parents=True, exist_ok=True)
    sh = where / "repro.sh"
    sh.write_text(shell_script(cfg, log, d, readers))
    sh.chmod(0o755)
    py = where / "test_repro.py"
    py.write_text(pytest_body(cfg, log, targets, d, readers))
    return sh, py


def origin(d: Divergence) -> str:
    """A divergence's kind and operation name (what the deletion pass keeps fixed for a
    lockstep divergence; reader findings add their class, see signature.operation_identity)."""
    return f"{d.kind}-{d.op.split('(')[0]}"


Case = tuple[Config, list[tuple[str, dict[str, Any]]], bool]


class ReproStore:
    """Keeps, per finding signature (difftest/core/signature.py), the smallest reproducer
    seen, in ``root/<signature>``.

    While Hypothesis shrinks one failure it may run into others (and larger instances of
    the first, on other configurations), so "the last one written" is not the shrunk one;
    the smallest per signature is. ``prune`` removes the folders of the configurations the
    shrinker passed through, once the campaign knows which findings it reports.
    """

    def __init__(self, root: Path, readers: list[str] | tuple[str, ...] = ()) -> None:
        self.root = root
        self.readers = tuple(readers)
        self.best: dict[str, int] = {}
        self.cases: dict[str, Case] = {}
        """Per signature, the configuration and operations of the smallest reproducer, and
        whether it failed in the teardown (difftest/core/minimize.py replays them)."""

    def key(self, cfg: Config, d: Divergence, log: list[tuple[str, dict[str, Any]]] | None = None) -> str:
        return signature(d, cfg, self.readers, log)

    def record(self, cfg: Config, log: list[tuple[str, dict[str, Any]]], targets: list[str],
               d: Divergence) -> None:
        key = self.key(cfg, d, log)
        d.signature = key  # type: ignore[attr-defined]  # the campaign reports by it
        steps = len(_until_finish(log))  # the reproducer's operations
        if key in self.best and self.best[key] < steps:
            return
        self.best[key] = steps
        self.cases[key] = (cfg, _until_finish(log), any(name == "finish" for name, _ in log))
        write_reproducers(self.root / key, cfg, log, targets, d, self.readers)

    def signature_of(self, d: Divergence) -> str | None:
        """The signature ``record`` gave ``d`` (or an equal divergence), None when unseen."""
        key = getattr(d, "signature", None)
        if isinstance(key, str) and key in self.best:
            return key
        same = [k for k in self.best if k.split("--")[0] == operation_identity(d, self.readers)]
        return min(same, key=lambda k: self.best[k]) if same else None

    def lookup(self, d: Divergence) -> tuple[Path | None, int]:
        key = self.signature_of(d)
        if key is None:
            return None, 0
        return self.root / key, self.best[key]

    def prune(self, keep: set[str]) -> None:
        """Remove the reproducers of every signature but ``keep`` (those of configurations
        the shrinker left behind)."""
        import shutil

        for key in list(self.best):
            if key not in keep:
                shutil.rmtree(self.root / key, ignore_errors=True)
                del self.best[key]
                self.cases.pop(key, None)
