"""``qcow2lab check``: evaluate the rules catalogue (spec.rules) and report as qemu-img check.

    qcow2lab check [-f qcow2] [--output=human|json] [-r leaks|all] IMAGE

The counters and the exit code are qemu-img's (qemu-img.c img_check): 0 clean, 1 check errors
(including an image that cannot be opened), 2 corruptions, 3 leaks only. Human output lists
every violated rule (id, host offset, explanation, spec section), then qemu-img's summary
lines. JSON output is qemu-img's object, field for field, on stdout; the violated rules go to
stderr, as qemu-img prints its ERROR lines there. An image qemu-img refuses (it cannot open it
or its check stops with an error) gets no summary and no JSON, only the violated rules, and
exit 1, as qemu-img prints only an error then.

Repair (``-r leaks|all``) is the shared engine's (spec.check.check(path, repair=...), which
model.check is; its fix pass, spec/check/fix_pass.py, follows block/qcow2.c
qcow2_co_check_locked and block/qcow2-refcount.c qcow2_check_refcounts with BDRV_FIX_LEAKS/
BDRV_FIX_ERRORS). It repairs what qemu-img check -r repairs and keeps counted what QEMU keeps
(reserved bits, unaligned tables, bad subcluster bitmaps, references past the end of the
file...). As qemu-img (qemu-img.c img_check), when something was repaired the human output
first says what ("The following inconsistencies were found and repaired"), then the image is
checked again and that second check is what is reported, with the fix pass's
corruptions-fixed / leaks-fixed; the exit code is the second check's. What the engine does
not repair QEMU's way (a refcount block so far past the end of the file that QEMU would grow
it beyond 128 MiB, a damaged snapshot table or bitmaps that -r all would rewrite) is refused
before anything is written: "qcow2lab: cannot repair ...", exit 1.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import TextIO

from difftest.cli.info import to_json
from spec.errors import Qcow2Error, UnsupportedFeature
from spec.info import qdict
from spec.interface import CheckResult
from spec.rules import RULES_BY_ID, Finding
from spec.rules.check import check, verdict


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="check an image against the rules catalogue (as qemu-img check)")
    p.add_argument("-f", "--format", dest="fmt", choices=["qcow2"], default="qcow2",
                   help="image format (only qcow2)")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("-r", dest="repair", choices=["leaks", "all"],
                   help="repair the image in place, as qemu-img check -r: 'leaks' frees leaked "
                        "clusters (refcounts too high; also COPIED flags once no error remains), "
                        "'all' also fixes refcounts that are too low (rebuilding the refcount "
                        "structure when a refcount block is missing, unaligned, shared or past the "
                        "end of the file), COPIED flags and misaligned preallocated zero clusters. "
                        "Damage QEMU never repairs (reserved bits, unaligned tables, bad subcluster "
                        "bitmaps...) stays counted. The image is then checked again and that result "
                        "is reported. What the engine cannot repair as QEMU does is refused without "
                        "writing (exit 1)")
    p.add_argument("image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.repair is not None:
        # Imported here: a plain check needs the rules catalogue alone, and should start as
        # fast as qemu-img's.
        from spec.check import check as check_and_repair

        try:
            result = check_and_repair(args.image, repair=args.repair)
        except UnsupportedFeature as e:
            print(f"qcow2lab: cannot repair {args.image}: {e}", file=sys.stderr)
            return 1
        except Qcow2Error as e:
            # Opening failed (as qemu-img check -r cannot open it) or the image is locked.
            print(f"qcow2lab: {args.image}: {e}", file=sys.stderr)
            return 1
        if args.output == "human" and verdict(result) != "refused" and (
                result.corruptions_fixed or result.leaks_fixed):
            print_repaired(result, sys.stdout)
        printed = False
    else:
        # The findings are printed as the walk meets them and none is kept: a wrecked image
        # has hundreds of thousands (README, "Bounded check"). They go where qemu-img puts
        # its ERROR lines: stdout for human output, stderr beside JSON.
        with FindingPrinter(sys.stderr if args.output == "json" else sys.stdout) as printer:
            result = check(args.image, sink=printer, keep=0)
        printed = True
    out = sys.stderr if args.output == "json" else sys.stdout
    if verdict(result) == "refused":
        # qemu-img prints no report when it cannot open the image or its check stops with an
        # error (qemu-img.c img_check): only the reasons, and exit 1. JSON stdout stays empty.
        if not printed:
            print_findings(result.findings, out)
        return 1
    if not printed:
        _print_reported(args.image, result, out)
    if args.output == "json":
        print(json_text(result))
    else:
        print_summary(result, sys.stdout)
    return result.exit_code


def _print_reported(image: str, result: CheckResult, out: TextIO) -> None:
    """The findings of the check a repair reports. It keeps a bounded number of them; when
    it left some out, the file (which the repair has finished with) is walked again
    read-only to print them all as they are met."""
    if not result.findings_omitted:
        print_findings(result.findings, out)
        return
    with FindingPrinter(out) as printer:
        check(image, sink=printer, keep=0)


# ImageCheck's members in QAPI schema order (qapi/block-core.json): QEMU inserts them into its
# QDict in this order, and the QDict's hash order is the order qemu-img prints them in.
IMAGE_CHECK_MEMBERS = ("filename", "format", "check-errors", "image-end-offset", "corruptions", "leaks",
                       "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
                       "fragmented-clusters", "compressed-clusters")


def json_text(result: CheckResult) -> str:
    """qemu-img check --output=json, byte for byte (key order and layout included)."""
    fields = result.to_json()
    return to_json(qdict((k, fields.get(k)) for k in IMAGE_CHECK_MEMBERS))


def describe(f: Finding) -> str:
    head, tail = _rule_text(f.rule)
    where = f"{f.offset:#x}" if f.offset is not None else "-"
    times = f" (x{f.count})" if f.count != 1 else ""
    return f"{head}{where}: {f.message}{times}{tail}"


@functools.cache
def _rule_text(rule_id: str) -> tuple[str, str]:
    """What ``describe`` prints before and after a finding of ``rule_id`` (made once per rule:
    a wrecked image prints hundreds of thousands of findings)."""
    rule = RULES_BY_ID[rule_id]
    tag = rule.severity.value if rule.qemu_counts else "spec"
    return f"{tag.upper()} {rule_id} at ", f"\n    {rule.statement} [{rule.source}]"


def print_findings(findings: list[Finding], out: TextIO) -> None:
    for f in findings:
        print(describe(f), file=out)


class FindingPrinter:
    """A finding sink that prints each finding as ``print_findings`` would, written in
    chunks: stderr is line-buffered, and a write per line would cost more than the check."""

    CHUNK = 4096

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lines: list[str] = []

    def __call__(self, fs: list[Finding]) -> None:
        self.lines.extend(map(describe, fs))
        if len(self.lines) >= self.CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            self.out.write("\n".join(self.lines) + "\n")
            self.lines.clear()
        self.out.flush()

    def __enter__(self) -> FindingPrinter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def print_repaired(r: CheckResult, out: TextIO) -> None:
    """What qemu-img check -r prints before it checks the repaired image again."""
    print("The following inconsistencies were found and repaired:\n\n"
          f"    {r.leaks_fixed} leaked clusters\n"
          f"    {r.corruptions_fixed} corruptions\n\n"
          "Double checking the fixed image now...", file=out)


def print_summary(r: CheckResult, out: TextIO) -> None:
    """The summary lines qemu-img check prints (qemu-img.c dump_human_image_check)."""
    if not (r.corruptions or r.leaks or r.check_errors):
        print("No errors were found on the image.", file=out)
    if r.corruptions:
        print(f"\n{r.corruptions} errors were found on the image.\n"
              "Data may be corrupted, or further writes to the image may corrupt it.", file=out)
    if r.leaks:
        print(f"\n{r.leaks} leaked clusters were found on the image.\n"
              "This means waste of disk space, but no harm to data.", file=out)
    if r.check_errors:
        print(f"\n{r.check_errors} internal errors have occurred during the check.", file=out)
    total, alloc = r.total_clusters or 0, r.allocated_clusters or 0
    if total and alloc:
        frag, comp = r.fragmented_clusters or 0, r.compressed_clusters or 0
        print(f"{alloc}/{total} = {alloc * 100 / total:.2f}% allocated, "
              f"{frag * 100 / alloc:.2f}% fragmented, "
              f"{comp * 100 / alloc:.2f}% compressed clusters", file=out)
    if r.image_end_offset:
        print(f"Image end offset: {r.image_end_offset}", file=out)
