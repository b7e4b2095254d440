"""Thin wrappers around the installed qemu-img and qemu-io, the project's oracle."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SECRET_ARGS = ["--object", "secret,id=sec0,data=qcow2lab-test"]
"""Key for the LUKS test image; pass with --image-opts style options where qemu needs it."""


PBKDF2_FLAKE = "Unable to get accurate CPU usage"
"""qemu-img 7.2 benchmarks PBKDF2 before it writes a LUKS header (crypto/pbkdf.c) and gives up
when its first sample of the thread's user CPU time reads 0 ms. With the default sha256 that
happened in 16 to 21 of 30 runs on an idle machine here, and CI failed on it with 8 tries.
It is QEMU's calibration, not the image, and a failed try costs milliseconds, so it is
retried up to 200 times."""


def qemu_img(*args: str, check: bool = True,
             cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run qemu-img; a refusal caused only by the PBKDF2 calibration is retried."""
    for _ in range(200):
        r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, cwd=cwd)
        if r.returncode == 0 or PBKDF2_FLAKE not in r.stderr:
            break
    if check and r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
    return r


def qemu_img_json(*args: str) -> Any:
    return json.loads(qemu_img(*args, "--output=json").stdout)


def qemu_io(path: str | Path, *cmds: str, fmt: str = "qcow2", extra: tuple[str, ...] = ()) -> str:
    argv = ["qemu-io", *extra, "-f", fmt]
    for cmd in cmds:
        argv += ["-c", cmd]
    argv.append(str(Path(path).resolve()))
    # QEMU 7.2 resolves a relative external data file name against the working directory,
    # so run beside the image.
    r = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=Path(path).parent)
    if "error" in r.stdout.lower() or "failed" in r.stdout.lower():
        raise RuntimeError(f"qemu-io {cmds}: {r.stdout}")
    return r.stdout


def create(path: str | Path, size: str | int, *, backing: str | None = None,
           backing_fmt: str | None = None, extra: tuple[str, ...] = (), **opts: Any) -> Path:
    """qemu-img create -f qcow2 with ``-o key=value`` for each keyword option.

    Runs in the image's directory, so relative names (backing, data_file) land beside it.
    """
    argv = ["create", "-q", "-f", "qcow2", *extra]
    o = ",".join(f"{k}={_optval(v)}" for k, v in opts.items())
    if o:
        argv += ["-o", o]
    if backing:
        argv += ["-b", backing, "-F", backing_fmt or "qcow2"]
    argv += [str(Path(path).resolve()), str(size)]
    qemu_img(*argv, cwd=Path(path).parent)
    return Path(path)


def _optval(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def raw_content(path: str | Path, *, snapshot: str | None = None, fmt: str = "qcow2",
                extra: tuple[str, ...] = ()) -> bytes:
    """Guest content as qemu-img convert -O raw gives it (optionally of a snapshot, with -l)."""
    fd, name = tempfile.mkstemp(suffix=".raw")  # beside the image may be read-only (corpus)
    os.close(fd)
    out = Path(name)
    argv = ["convert", *extra, "-f", fmt, "-O", "raw"]
    if snapshot is not None:
        argv += ["-l", f"snapshot.name={snapshot}"]
    qemu_img(*argv, str(Path(path).resolve()), str(out.resolve()), cwd=Path(path).parent)
    try:
        return out.read_bytes()
    finally:
        out.unlink()
