"""``qcow2lab info``: what ``qemu-img info`` prints, byte for byte, read through the schemas.

    qcow2lab info [-f FMT] [--output=human|json] [--backing-chain] [-U] IMAGE

The data comes from spec/info.py; this module opens the images (following the backing chain
as qemu-img.c collect_image_info_list does), takes QEMU's locks, and renders the result the
way qemu-img does: JSON with QEMU's own writer (qobject/json-writer.c) and the human text of
block/qapi.c (bdrv_image_info_dump). Exit status 0 on success, 1 on any error, as qemu-img.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, BinaryIO

from spec import info as si
from spec import limits as lim
from spec.errors import FormatError, RequestError, UnsupportedFeature
from spec.image import open_image
from spec.locking import ImageLock

Info = dict[str, Any]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print what qemu-img info prints, read through the schemas")
    p.add_argument("-f", "--format", dest="fmt", choices=["qcow2", "raw"],
                   help="image format (default: probe, as qemu-img does)")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("--backing-chain", action="store_true", help="follow and print the backing chain")
    p.add_argument("-U", "--force-share", action="store_true",
                   help="take no locks (qemu-img info -U): works while another process writes")
    p.add_argument("image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = info_output(args.image, output=args.output, chain=args.backing_chain, fmt=args.fmt,
                      force_share=args.force_share)
    sys.stdout.flush()
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0


def image_info(path: str) -> Info:
    """The ``qemu-img info --output=json`` dict of one image (no backing chain).

    Strings are what a JSON reader gets from qemu-img's output: bytes that are not valid UTF-8
    already replaced as QEMU's writer replaces them. Key order is qemu-img's.
    """
    infos = collect_image_info_list(path, chain=False, force_share=True)
    result: Info = json.loads(to_json(infos[0]))
    return result


def info_output(path: str, *, output: str = "human", chain: bool = False, fmt: str | None = None,
                force_share: bool = False) -> bytes:
    """Exactly the bytes ``qemu-img info`` writes to stdout for the same arguments."""
    infos = collect_image_info_list(path, chain=chain, fmt=fmt, force_share=force_share)
    if output == "json":
        # img_info: a list with --backing-chain, the bare object without it.
        text = to_json(infos if chain else infos[0]) + "\n"
        return text.encode("ascii")
    if output != "human":
        raise RequestError(f"--output must be human or json, not {output!r}")
    # dump_human_image_info_list: one block per image, a blank line between blocks.
    return b"\n".join(human(i) for i in infos)


# --- Opening the chain (qemu-img.c, collect_image_info_list) --------------------------------

QCOW2_MAGIC = lim.QCOW_MAGIC
# Magics of formats QEMU would probe as something other than qcow2 or raw. We refuse them rather
# than misreport them as raw (block/*.c probe functions; VDI's signature sits at byte 64).
OTHER_FORMATS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"LUKS\xba\xbe", "luks"), (0, b"KDMV", "vmdk"), (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"), (0, b"conectix", "vpc"), (0, b"vhdxfile", "vhdx"),
    (0, b"QED\0", "qed"), (0, b"WithoutFreeSpace", "parallels"), (0, b"WithouFreSpacExt", "parallels"),
    (64, b"\x7f\x10\xda\xbe", "vdi"), (0, b"Bochs Virtual HD Image", "bochs"),
)


def probe_format(head: bytes, path: str) -> str:
    """The format QEMU's probing picks (block.c, bdrv_probe_all) among those we read.

    qcow2_probe claims a file with the qcow2 magic and version >= 2; the same magic with
    version 1 is the old qcow format. Without any recognised magic, raw wins.
    """
    if head[:4] == QCOW2_MAGIC:
        if int.from_bytes(head[4:8], "big") >= 2:
            return "qcow2"
        raise UnsupportedFeature("qcow", f"{path}: qcow (version 1) images are not supported")
    for offset, magic, name in OTHER_FORMATS:
        if head[offset:offset + len(magic)] == magic:
            raise UnsupportedFeature(name, f"{path}: {name} images are not supported")
    return "raw"


def _lock(f: BinaryIO, path: str, force_share: bool) -> ImageLock:
    """qemu-img info opens without I/O: it holds no permission but shares neither write nor
    resize, so a running writer makes it fail; -U takes no lock at all (spec/locking.py)."""
    lock = ImageLock(f, path=path)
    lock.acquire(write=False, force_share=force_share, no_io=True)
    return lock


def file_name(path: str) -> str:
    """The file name QEMU opens and prints for ``path``.

    A "proto:" prefix selects a protocol driver (block.c, bdrv_find_protocol); only "file:" is
    the host file system, and QEMU drops it. A plain name that would itself look like a
    protocol is then printed with "./" in front, as qemu-img does ("file:a:b" -> "./a:b").
    Other protocols (nbd:, json:, ...) are not supported here.
    """
    if not si.path_has_protocol(path):
        return path
    proto, rest = path.split(":", 1)
    if proto != "file":
        raise UnsupportedFeature(f"protocol {proto}", f"{path}: protocol {proto!r} is not supported")
    return "./" + rest if si.path_has_protocol(rest) else rest


def one_image_info(path: str, fmt: str | None, *, force_share: bool = False) -> Info:
    """Open ``path`` as qemu-img info does (BDRV_O_NO_BACKING | BDRV_O_NO_IO) and describe it."""
    path = file_name(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except (OSError, ValueError) as e:
        raise FormatError(f"could not open: {e}", path) from None
    with f:
        try:
            st = os.fstat(f.fileno())
            head = os.pread(f.fileno(), 512, 0)
        except OSError as e:
            raise FormatError(f"could not read: {e}", path) from None
        lock = _lock(f, path, force_share)
        try:
            if fmt is None:
                fmt = probe_format(head, path)
            if fmt == "raw":
                return si.raw_info(path, st.st_size, si.allocated_size(st))
            if fmt != "qcow2":
                raise UnsupportedFeature(fmt, f"{path}: image format {fmt!r} is not supported")
            with open_image(path) as img:
                return si.qcow2_info(img, path, si.allocated_size(st))
        finally:
            lock.release()


def collect_image_info_list(path: str, *, chain: bool, fmt: str | None = None,
                            force_share: bool = False) -> list[Info]:
    """The images qemu-img info describes: the top one, and with ``chain`` its backing chain.

    Each backing file is the previous image's full-backing-filename, opened with its
    backing-filename-format (or probed when the image names none). A file name seen before
    means a loop (qemu-img compares the names as strings); we also stop at QEMU's backing
    depth limit, since names like "a/../a/../x" never repeat.
    """
    seen: set[str] = set()
    out: list[Info] = []
    name: str | None = path
    while name is not None:
        if name in seen:
            raise FormatError(f"backing file {name!r} creates an infinite loop", "backing_file")
        if len(out) > lim.QCOW2_MAX_BACKING_DEPTH:
            raise FormatError("backing chain too deep", "backing_file")
        seen.add(name)
        info = one_image_info(name, fmt, force_share=force_share)
        out.append(info)
        name, fmt = None, None
        if chain:
            name = info.get("full-backing-filename")
            fmt = info.get("backing-filename-format")
    return out


# --- JSON, as qobject/json-writer.c writes it (pretty) -------------------------------------

def to_json(obj: Any) -> str:
    """QEMU's pretty JSON: 4-space indent, ", " never used inside lines, "key": value, empty
    containers as an opening and a closing line, and strings escaped by ``json_string``."""
    parts: list[str] = []
    _json(obj, 0, parts)
    return "".join(parts)


def _json(obj: Any, depth: int, out: list[str]) -> None:
    if isinstance(obj, bool):
        out.append("true" if obj else "false")
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, str):
        out.append(json_string(obj))
    elif obj is None:
        out.append("null")
    elif isinstance(obj, dict | list):
        is_dict = isinstance(obj, dict)
        out.append("{" if is_dict else "[")
        items: list[tuple[str | None, Any]] = (
            list(obj.items()) if isinstance(obj, dict) else [(None, v) for v in obj])
        inner = "\n" + " " * (4 * (depth + 1))
        for n, (key, value) in enumerate(items):
            out.append(("," if n else "") + inner)
            if key is not None:
                out.append(json_string(key) + ": ")
            _json(value, depth + 1, out)
        out.append("\n" + " " * (4 * depth) + ("}" if is_dict else "]"))
    else:
        raise TypeError(f"cannot write {type(obj).__name__} as JSON")


_JSON_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r",
                 0x09: "\\t"}


def json_string(s: str) -> str:
    """A JSON string literal as quoted_str writes it (qobject/json-writer.c).

    The C string's bytes are decoded as modified UTF-8 (util/unicode.c, mod_utf8_codepoint):
    an invalid sequence, a surrogate, a noncharacter or an overlong form becomes U+FFFD, and
    "\\xC0\\x80" is U+0000. Control characters and everything from U+007F up are written as
    upper-case \\uXXXX escapes (surrogate pairs beyond the BMP), so the output is pure ASCII.
    """
    data = s.encode("utf-8", "surrogateescape").split(b"\0", 1)[0]
    out = ['"']
    i = 0
    while i < len(data):
        cp, i = _mod_utf8_codepoint(data, i)
        if cp in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[cp])
            continue
        if cp < 0:
            cp = 0xFFFD
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(chr(cp))
    out.append('"')
    return "".join(out)


_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _mod_utf8_codepoint(data: bytes, i: int) -> tuple[int, int]:
    """One sequence at ``data[i]``: (code point or -1, index after it), as mod_utf8_codepoint.

    The lead byte gives the sequence length (up to 6, counting its leading one bits); a missing
    continuation byte ends the sequence early, and the bytes read so far are consumed.
    """
    lead = data[i]
    i += 1
    if lead < 0x80:
        return lead, i
    if lead >= 0xFE or not lead & 0x40:
        return -1, i
    length = 0
    mask = 0x80
    while lead & mask:
        length += 1
        mask >>= 1
    cp = lead & (mask - 1)
    for _ in range(1, length):
        if i >= len(data) or data[i] & 0xC0 != 0x80:
            return -1, i
        cp = (cp << 6) | (data[i] & 0x3F)
        i += 1
    if (cp > 0x10FFFF or 0xFDD0 <= cp <= 0xFDEF or cp & 0xFFFE == 0xFFFE or 0xD800 <= cp <= 0xDFFF
            or (cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2))):
        return -1, i
    return cp, i


# --- Human output, as block/qapi.c prints it -------------------------------------------------

def size_to_str(value: int) -> str:
    """util/cutils.c size_to_str: three significant digits and a binary unit.

    The unit is chosen from floor(log2(value * 1024 / 1000)) / 10, so the number shown is
    always below 1000 (a value just under 1000 KiB is shown as "0.977 MiB").
    """
    value &= si.U64
    _, exp = math.frexp(float(value) / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)  # C division truncates toward zero: frexp(0) gives exp 0
    suffix = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")[i]
    return f"{float(value) / (1 << (i * 10)):.3g} {suffix}B"


def _c_int(value: int) -> int:
    """C's (int) cast of a 64-bit value: keep the low 32 bits, signed."""
    value &= si.U32
    return value - (1 << 32) if value >> 31 else value


def _pad(s: str, width: int, left: bool) -> str:
    """printf %-Ns / %Ns: padding counts bytes, not characters."""
    gap = " " * max(0, width - len(s.encode("utf-8", "surrogateescape")))
    return s + gap if left else gap + s


SNAPSHOT_HEADER = (_pad("ID", 10, True) + _pad("TAG", 17, True) + _pad("VM SIZE", 8, False)
                   + _pad("DATE", 20, False) + _pad("VM CLOCK", 13, False) + _pad("ICOUNT", 11, False))
"""bdrv_snapshot_dump(NULL): the column titles of the snapshot list."""


def snapshot_line(sn: Info) -> str:
    """bdrv_snapshot_dump: one snapshot row. The date is in local time (GLib's
    g_date_time_new_from_unix_local), as is Python's time.localtime under the same TZ."""
    vm_clock = (sn["vm-clock-sec"] * 1_000_000_000 + sn["vm-clock-nsec"]) & si.U64
    secs = vm_clock // 1_000_000_000
    hours, minutes, seconds = _c_int(secs // 3600), _c_int(secs // 60 % 60), _c_int(secs % 60)
    clock = f"{hours:02d}:{minutes:02d}:{seconds:02d}.{_c_int(vm_clock // 1_000_000 % 1000):03d}"
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    icount = str(sn["icount"]) if "icount" in sn else ""
    return (_pad(sn["id"], 9, True) + " " + _pad(sn["name"], 16, True) + " "
            + _pad(size_to_str(sn["vm-state-size"]), 8, False) + _pad(date, 20, False)
            + _pad(clock, 13, False) + _pad(icount, 11, False))


def _dump_value(value: Any, indent: int, out: list[str]) -> None:
    """dump_qobject: scalars inline, dicts and lists on the following lines, one level deeper."""
    if isinstance(value, dict):
        for key, v in value.items():
            composite = isinstance(v, dict | list)
            # Dashes in key names become spaces in the human output.
            out.append(" " * (4 * indent) + key.replace("-", " ") + (":\n" if composite else ": "))
            _dump_value(v, indent + 1, out)
            if not composite:
                out.append("\n")
    elif isinstance(value, list):
        for n, v in enumerate(value):
            composite = isinstance(v, dict | list)
            out.append(" " * (4 * indent) + f"[{n}]:" + ("\n" if composite else " "))
            _dump_value(v, indent + 1, out)
            if not composite:
                out.append("\n")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    else:
        out.append(str(value))


def human(info: Info) -> bytes:
    """bdrv_image_info_dump: the human-readable block for one image, as bytes (names from the
    image are printed as the raw bytes they are, like QEMU's %s)."""
    actual = info.get("actual-size")
    lines = [
        f"image: {info['filename']}\n",
        f"file format: {info['format']}\n",
        f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)\n",
        f"disk size: {'unavailable' if actual is None else size_to_str(actual)}\n",
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes\n")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}\n")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no\n")
    if "backing-filename" in info:
        backing = info["backing-filename"]
        full = info.get("full-backing-filename")
        if full is None:
            lines.append(f"backing file: {backing} (cannot determine actual path)\n")
        elif full != backing:
            lines.append(f"backing file: {backing} (actual path: {full})\n")
        else:
            lines.append(f"backing file: {backing}\n")
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}\n")
    if "snapshots" in info:
        lines.append("Snapshot list:\n" + SNAPSHOT_HEADER + "\n")
        lines.extend(snapshot_line(sn) + "\n" for sn in info["snapshots"])
    if "format-specific" in info:
        lines.append("Format specific information:\n")
        _dump_value(info["format-specific"]["data"], 1, lines)
    return "".join(lines).encode("utf-8", "surrogateescape")
