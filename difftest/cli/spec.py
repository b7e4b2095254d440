"""``qcow2lab spec``: print the format reference (docs/spec.md) rendered from the schemas.

``qcow2lab spec > docs/spec.md`` (or ``make spec``) regenerates the committed document;
``qcow2lab spec --check docs/spec.md`` exits 1 when that file is stale, for CI and hooks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spec.render import render_markdown


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "spec",
        help="print the qcow2 format reference rendered from the schemas and rules (Markdown)",
        description="Render the qcow2 reference document (docs/spec.md) from the construct "
        "schemas, the structure registry, the feature bits, QEMU's limits and the rules "
        "catalogue. The output is deterministic.",
    )
    p.add_argument(
        "--check", metavar="FILE", type=Path,
        help="do not print; exit 1 if FILE differs from the rendered document (stale docs)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = render_markdown()
    if args.check is not None:
        try:
            current = args.check.read_text(encoding="utf-8")
        except OSError as e:
            print(f"qcow2lab spec: cannot read {args.check}: {e.strerror}", file=sys.stderr)
            return 1
        if current != text:
            print(f"qcow2lab spec: {args.check} is stale; regenerate it with `make spec`",
                  file=sys.stderr)
            return 1
        return 0
    # Bytes, not text: the document is UTF-8 whatever the locale says, so a redirect in a
    # C-locale shell produces the same file as anywhere else.
    sys.stdout.buffer.write(text.encode("utf-8"))
    sys.stdout.flush()
    return 0
