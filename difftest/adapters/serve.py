"""Serve a spec.interface package over qemu-io's command language (adapter form (b)).

    python -m difftest.adapters.serve MODULE [-r] IMAGE

MODULE is anything ``py:`` accepts without the prefix (``model``, ``impl``,
``package.module:NAME``). This is both a usable adapter (``cmd:model-io=python -m
difftest.adapters.serve model``) and the reference for writing one in another language:
it implements exactly the subset of qemu-io that difftest/core/qemuio.py sends, with qemu-io's
output formats (qemu-io-cmds.c: read_f, write_f, discard_f, map_f, truncate_f).
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
from typing import Any, TextIO

from spec.errors import Qcow2Error, RequestError, UnsupportedFeature

PROMPT = "qemu-io> "


def _errno_text(e: Qcow2Error) -> str:
    if isinstance(e, UnsupportedFeature):
        return os.strerror(errno.ENOTSUP)
    if isinstance(e, RequestError):
        return os.strerror(errno.EIO)
    return os.strerror(errno.EIO)


def _hexdump(off: int, data: bytes) -> str:
    lines = []
    for i in range(0, len(data), 16):
        chunk = data[i:i + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off + i:08x}:  {' '.join(f'{b:02x}' for b in chunk)}  {text}")
    return "\n".join(lines) + ("\n" if lines else "")


class Server:
    def __init__(self, module: Any, path: str, readonly: bool, out: TextIO) -> None:
        self.module = module
        self.out = out
        self.img: Any = None
        self._open(path, readonly)

    def _open(self, path: str, readonly: bool) -> None:
        try:
            self.img = self.module.open(path, readonly=readonly)
        except Qcow2Error as e:
            self.out.write(f"qemu-io: can't open device {path}: {e}\n")

    def _data(self, opts: dict[str, str], n: int) -> bytes:
        if "-s" in opts:
            with open(opts["-s"], "rb") as f:
                data = f.read(n)
            return (data * (n // max(1, len(data)) + 1))[:n] if data else bytes(n)
        return bytes([int(opts.get("-P", "0xcd"), 0)]) * n

    def handle(self, line: str) -> bool:
        words = shlex.split(line)
        if not words:
            return True
        cmd, args = words[0], words[1:]
        flags: set[str] = set()
        opts: dict[str, str] = {}
        rest: list[str] = []
        it = iter(args)
        for a in it:
            if a in ("-P", "-s", "-t", "-o", "-l"):
                opts[a] = next(it, "")
            elif a.startswith("-") and len(a) > 1 and not a[1:].isdigit():
                flags.update(f"-{ch}" for ch in a[1:])
            else:
                rest.append(a)
        if cmd == "quit":
            return False
        try:
            self._dispatch(cmd, flags, opts, rest)
        except Qcow2Error as e:
            self.out.write(f"{cmd} failed: {_errno_text(e)}\n")
        except (ValueError, IndexError):
            self.out.write(f"{cmd} failed: {os.strerror(errno.EINVAL)}\n")
        return True

    def _dispatch(self, cmd: str, flags: set[str], opts: dict[str, str], rest: list[str]) -> None:
        if cmd == "open":
            self._open(rest[0], "-r" in flags)
            return
        if self.img is None:
            self.out.write("no file open, try 'help open'\n")
            return
        img = self.img
        if cmd == "read":
            off, n = int(rest[0]), int(rest[1])
            data = img.read(off, n)
            if "-P" in opts and data != bytes([int(opts["-P"], 0)]) * n:
                self.out.write(f"Pattern verification failed at offset {off}, {n} bytes\n")
            if "-v" in flags:
                self.out.write(_hexdump(off, data))
            if "-q" not in flags:
                self.out.write(f"read {n}/{n} bytes at offset {off}\n")
        elif cmd == "write":
            off, n = int(rest[0]), int(rest[1])
            if "-z" in flags:
                img.write_zeroes(off, n, unmap="-u" in flags)
            elif "-c" in flags:
                img.write_compressed(off, self._data(opts, n))
            else:
                img.write(off, self._data(opts, n))
        elif cmd == "discard":
            img.discard(int(rest[0]), int(rest[1]))
        elif cmd == "flush":
            img.flush()
        elif cmd == "truncate":
            img.resize(int(rest[0]), shrink=True)
        elif cmd == "close":
            img.close()
            self.img = None
        elif cmd == "map":
            for e in img.map(0, img.size):
                top = bool(e.get("present", True)) and int(e.get("depth", 0)) == 0
                self.out.write(f"{e['length']} ({e['length']:#x}) bytes {'    ' if top else 'not '}allocated "
                               f"at offset {e['start']} ({e['start']:#x})\n")
        elif cmd == "length":
            self.out.write(f"{img.size}\n")
        else:
            self.out.write(f'command "{cmd}" not found\n')


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m difftest.adapters.serve MODULE [-r] IMAGE", file=sys.stderr)
        return 2
    from difftest.adapters import load
    module = load("py:" + args[0])
    readonly = "-r" in args[1:-1]
    server = Server(module, args[-1], readonly, sys.stdout)
    while True:
        sys.stdout.write(PROMPT)
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or not server.handle(line.strip()):
            break
    if server.img is not None:
        server.img.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
