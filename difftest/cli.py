"""The ``qcow2lab`` command line. Each verb lives in difftest/commands/<verb>.py and exposes
``register(subparsers)``; the verbs mirror qemu-img's names, options and exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from spec.errors import Qcow2Error

# Verb modules in --help order.
COMMANDS = ["info", "check", "map", "spec", "fuzz", "difftest", "bench", "run"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcow2lab",
        description="QEMU's qcow2 format as code: schemas, a reference model, an optimized "
        "implementation, and a differential tester against qemu-io.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"difftest.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Qcow2Error as e:
        print(f"qcow2lab: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
