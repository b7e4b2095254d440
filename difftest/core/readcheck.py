"""``python -m difftest.core.readcheck READER IMAGE EXPECTED [OFF:LEN ...]``: the reader
half of a reproducer (repro.sh, difftest/core/repro.py).

Opens IMAGE with the read-only adapter READER (``dissect``, ``libqcow`` or
``py:MODULE[:NAME]``, difftest/adapters) and compares what it reads over the given guest
ranges (all of it when none are given) with EXPECTED, the raw guest content QEMU reads
(``qemu-img convert -O raw``). Exit status: 0 when the reader reads what QEMU reads, 1 with
a ``<class>: message`` line on stderr when it does not (wrong-bytes) or raises (error;
memory for MemoryError under the ``ulimit -v`` repro.sh sets), 2
when it declares the image unsupported. A hang is bounded by the ``timeout`` that repro.sh
puts in front, a crash by the process dying; both exit non-zero too.
"""

from __future__ import annotations

import os
import sys

from difftest.adapters import load

CHUNK = 1 << 20


def _ranges(args: list[str], size: int) -> list[tuple[int, int]]:
    if not args:
        return [(0, size)]
    out = []
    for a in args:
        off, _, n = a.partition(":")
        lo, hi = int(off), min(int(off) + int(n), size)
        if lo < hi:
            out.append((lo, hi - lo))
    return out


def check(reader: str, image: str, expected: str, ranges: list[str]) -> tuple[int, str]:
    """(exit status, message) of reading ``image`` with ``reader`` against ``expected``."""
    from spec.errors import UnsupportedFeature

    size = os.path.getsize(expected)
    try:
        img = load(reader).open(image, readonly=True)
    except (UnsupportedFeature, NotImplementedError) as e:
        return 2, f"unsupported: {reader} at open: {type(e).__name__}: {e}"
    except MemoryError:
        return 1, f"memory: {reader} at open: MemoryError"
    except Exception as e:  # foreign code: any exception is the finding
        return 1, f"error: {reader} cannot open {image}: {type(e).__name__}: {e}"
    try:
        if int(img.size) != size:
            return 1, f"wrong-bytes: {reader} reads size {img.size}, QEMU {size}"
        with open(expected, "rb") as want_f:
            for a, n in _ranges(ranges, size):
                for pos in range(a, a + n, CHUNK):
                    k = min(CHUNK, a + n - pos)
                    want_f.seek(pos)
                    want = want_f.read(k)
                    try:
                        got = bytes(img.read(pos, k))
                    except MemoryError:
                        return 1, f"memory: {reader} reading [{pos}, {pos + k}): MemoryError"
                    except Exception as e:
                        return 1, f"error: {reader} reading [{pos}, {pos + k}): {type(e).__name__}: {e}"
                    if got != want:
                        i = next((j for j in range(min(len(got), k)) if got[j] != want[j]), len(got))
                        return 1, (f"wrong-bytes: {reader} reads guest offset {pos + i} as "
                                   f"{got[i:i + 8].hex()}, QEMU {want[i:i + 8].hex()}")
    finally:
        img.close()
    return 0, f"{reader} reads what QEMU reads"


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    status, msg = check(argv[0], argv[1], argv[2], argv[3:])
    print(msg, file=sys.stderr if status else sys.stdout)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
