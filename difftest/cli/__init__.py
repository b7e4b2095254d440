"""The ``qcow2lab`` command line. Each verb lives in difftest/cli/<verb>.py and exposes
``register(subparsers)`` and a ``run(args)`` it sets as ``func``; the verbs mirror qemu-img's
names, options and exit codes.

Start-up is part of the product (DESIGN.md, "Performance"): ``qcow2lab info`` should cost
little more than the interpreter. So this module imports no verb at import time, and a
command line that names a verb imports that verb's module alone: its dependencies
(Hypothesis and rich for difftest, the model for map, numpy for check) are loaded only when
it is the verb that runs. Only ``--help`` or a command line without a verb imports every
verb module, to list them. tests/difftest/test_cli_startup.py holds this to account.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from spec.errors import Qcow2Error

# Verb modules in --help order.
COMMANDS = ["info", "check", "map", "spec", "fuzz", "difftest", "conformance", "crash", "bench", "run"]


def chosen_verb(argv: list[str]) -> str | None:
    """The verb ``argv`` names: its first word, since the top-level parser has no options of
    its own besides ``-h``. None when that word is not a verb (``--help``, a typo), which
    argparse then reports with the whole list."""
    return argv[0] if argv and argv[0] in COMMANDS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: with only the verb it names registered, or every verb when
    it names none (or ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog="qcow2lab",
        description="QEMU's qcow2 format as code: schemas, a reference model, an optimized "
        "implementation, and a differential tester against qemu-io.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verb = None if argv is None else chosen_verb(argv)
    for name in [verb] if verb else COMMANDS:
        importlib.import_module(f"difftest.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Qcow2Error as e:
        print(f"qcow2lab: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:  # Ctrl-C: the commands' finally blocks have run; no traceback
        print("qcow2lab: interrupted", file=sys.stderr)
        return 130
