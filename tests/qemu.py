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


def qemu_img(*args: str, check: bool = True,
             cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=check, cwd=cwd)


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
