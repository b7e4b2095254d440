"""``qcow2lab map``: what ``qemu-img map`` prints, computed by the reference model.

    qcow2lab map [--output=human|json] [-s START] [-l LENGTH] IMAGE

The extents come from model.Image.map (model/mapping_report.py: QEMU's block status, the
depth walk of qemu-img.c get_block_status, and entry_mergeable); the text is
dump_map_entry's, byte for byte. As qemu-img, the human output refuses images whose data
has no host offset (compressed clusters): the error goes to stderr and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys

import model
from model import mapping_report as mr


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("map", help="print what qemu-img map prints, from the reference model")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("-s", "--start-offset", type=int, default=0, help="first byte to map")
    p.add_argument("-l", "--max-length", type=int, default=None, help="bytes to map at most")
    p.add_argument("image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with model.open(args.image, readonly=True) as img:
        start = min(max(args.start_offset, 0), img.size)
        length = img.size - start
        if args.max_length is not None:
            length = min(length, max(args.max_length, 0))
        extents = mr.image_map(img, start, length, with_filename=True)
    if args.output == "json":
        sys.stdout.write(mr.format_json(extents))
        return 0
    text, ok = mr.format_human(extents)
    sys.stdout.write(text)
    if not ok:
        sys.stdout.flush()
        print("qemu-img: File contains external, encrypted or compressed clusters.", file=sys.stderr)
        return 1
    return 0
