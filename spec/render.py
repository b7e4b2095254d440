"""Render docs/spec.md from the schemas, the structure registry and the rules catalogue.

The byte and bit ranges in the document are computed here by walking the construct
schemas (``layout``), never typed in: tests/spec/test_spec_offsets.py holds those computed ranges
against a table typed from qcow2.rst, which is what keeps the code and the spec together.

Byte ranges: a field starts where the previous fixed-size field ended; a field whose size
depends on the data is "variable", and so is the start of every field after it. Conditional
fields (``c.If``) are laid out as present, the way qcow2.rst draws them. Bit ranges: a
BitStruct lists fields from the most significant bit down, and qcow2.rst numbers bit 0 as the
least significant bit of the big-endian word, so the first field of a 64-bit entry ends at 63.

Output is deterministic (no dates, no paths, no dict-order accidents): the committed
docs/spec.md must equal ``render_markdown()`` byte for byte.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import construct as c

from spec import entries, features, limits
from spec.geometry import Geometry
from spec.header import EXTENSION_NAMES
from spec.registry import STRUCTURES, Structure, Unit
from spec.rules import RULES
from spec.tables import refcount_block

# --- Layout: computed ranges -----------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One field of a rendered structure.

    ``start``/``end`` are inclusive. For bytes, ``start`` is the first byte; ``None`` means it
    depends on earlier variable-size fields. ``end`` is ``None`` when the field's own size varies.
    For bits, ``start`` is the lowest bit number and ``end`` the highest (LSB = bit 0).
    """

    path: str
    """Dotted field path, e.g. ``v3.header_length`` or ``extra_data.disk_size``."""
    top: str
    """The top-level field this row belongs to."""
    start: int | None
    end: int | None
    doc: str
    condition: str | None
    """Why the field may be absent (rendered ``c.If`` condition), or None."""
    nested: bool = False
    """True for a field whose children follow as their own rows."""
    note: str | None = None
    """Extra rendered fact, e.g. which value of which field selects a c.Switch layout."""

    @property
    def span(self) -> tuple[int | None, int | None]:
        return (self.start, self.end)


class LayoutError(Exception):
    """A schema uses a construct the renderer does not know how to lay out.

    Raised only at render time on the project's own schemas (a programming error, never
    caused by an input file), so it does not belong to spec.errors.
    """


def _expr_text(expr: Any) -> str | None:
    """Readable form of a construct ``this`` expression (``this._.x >= 8`` becomes ``x >= 8``);
    None for a lambda, whose source cannot be shown (the field's doc says what it does)."""
    if not isinstance(expr, c.ExprMixin):
        return None
    text = re.sub(r"this((?:\['\w+'\])+)",
                  lambda m: ".".join(n for n in re.findall(r"'(\w+)'", m.group(1)) if n != "_"), repr(expr))
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    return text


def _condition_text(cond: Any) -> str:
    """The rendered condition of a c.If: its expression, or "conditional" for a lambda."""
    return _expr_text(cond) or "conditional"


def _switch_note(sw: c.Switch) -> str:
    """Say which field selects the layout and where each case is documented."""
    key = _expr_text(sw.keyfunc)
    cases = []
    for k, case in sw.cases.items():
        label = f"0x{k:08x}" if isinstance(k, int) else str(k)
        cases.append(f"{label}: {_schema_title(case)}")
    default = "raw bytes" if sw.default is c.GreedyBytes else _schema_title(sw.default)
    chooser = f"`{key}`" if key else "a computed key"
    return f"Layout chosen by {chooser}: " + "; ".join(cases) + f"; any other value: {default}."


def _schema_title(schema: c.Construct) -> str:
    """The registry title documenting ``schema`` (or an array of it), else its construct type."""
    from spec.registry import STRUCTURES  # the registry imports the schemas, not this module

    titles = {id(s.schema): s.title for s in STRUCTURES}
    if id(schema) in titles:
        return titles[id(schema)]
    if isinstance(schema, c.Struct):
        for sc in schema.subcons:
            inner, _, _ = _unwrap(sc)
            if isinstance(inner, c.GreedyRange) and id(inner.subcon) in titles:
                return f"array of {titles[id(inner.subcon)]}"
    return type(schema).__name__


def _unwrap(sc: c.Construct) -> tuple[c.Construct, str, str | None]:
    """Strip naming, docs, Const and If wrappers: (inner construct, docs, condition)."""
    docs = ""
    cond: str | None = None
    while True:
        if isinstance(sc, c.Renamed):
            docs = docs or (sc.docs or "")
            sc = sc.subcon
        elif isinstance(sc, c.Const):
            sc = sc.subcon
        elif isinstance(sc, c.IfThenElse) and sc.elsesubcon is c.Pass:
            cond = _condition_text(sc.condfunc)
            sc = sc.thensubcon
        else:
            return sc, " ".join(docs.split()), cond


def _static_size(sc: c.Construct) -> int | None:
    """Size without a context (bytes, or bits inside a BitStruct); None when it depends on data."""
    try:
        size = sc.sizeof()
    except (c.SizeofError, KeyError, AttributeError, TypeError):
        return None
    return int(size)


def _struct_of(sc: c.Construct) -> c.Struct | None:
    """The Struct whose fields should be expanded in place, if ``sc`` is (a fixed-size window on) one."""
    if isinstance(sc, c.Struct):
        return sc
    if isinstance(sc, c.FixedSized) and isinstance(sc.subcon, c.Struct):
        return sc.subcon
    return None


def _bitstruct_of(schema: c.Construct) -> c.Struct | None:
    """The bit-level Struct inside ``c.BitStruct(...)`` (a Transformed over bytes2bits), or None."""
    if isinstance(schema, c.Transformed) and schema.decodefunc is c.bytes2bits \
            and isinstance(schema.subcon, c.Struct):
        return schema.subcon
    return None


def _byte_rows(struct: c.Struct, base: int | None, prefix: str,
               top: str | None) -> tuple[list[Row], int | None]:
    # A nested field's row carries only its own condition: the enclosing group's row (and, in
    # a part view, the group line above the table) already says when the whole group exists.
    rows: list[Row] = []
    cur = base
    for sc in struct.subcons:
        if not sc.name:
            raise LayoutError(f"unnamed field in {prefix or 'schema'}: {sc!r}")
        inner, doc, own_cond = _unwrap(sc)
        path = prefix + sc.name
        row_top = top or sc.name
        nested = _struct_of(inner)
        body = inner.subcon if isinstance(inner, c.FixedSized) else inner
        note = _switch_note(body) if isinstance(body, c.Switch) else None
        if isinstance(inner, c.FixedSized):
            length = inner.length if isinstance(inner.length, int) else None
        else:
            length = _static_size(inner)
        if nested is not None:
            children, child_end = _byte_rows(nested, cur, path + ".", row_top)
            if length is None and cur is not None and child_end is not None \
                    and not isinstance(inner, c.FixedSized):
                length = child_end - cur
            end = cur + length - 1 if cur is not None and length is not None else None
            rows.append(Row(path, row_top, cur, end, doc, own_cond, nested=True))
            rows.extend(children)
        else:
            end = cur + length - 1 if cur is not None and length is not None else None
            rows.append(Row(path, row_top, cur, end, doc, own_cond, note=note))
        cur = cur + length if cur is not None and length is not None else None
    return rows, cur


def _bit_rows(struct: c.Struct) -> list[Row]:
    widths: list[int] = []
    for sc in struct.subcons:
        w = _static_size(sc)
        if w is None or not sc.name:
            raise LayoutError(f"bit field without a fixed width or name: {sc!r}")
        widths.append(w)
    hi = sum(widths) - 1
    rows = []
    for sc, w in zip(struct.subcons, widths, strict=True):
        _, doc, cond = _unwrap(sc)
        rows.append(Row(sc.name, sc.name, hi - w + 1, hi, doc, cond))
        hi -= w
    return rows


def unit_of(schema: c.Construct) -> Unit:
    """"bits" for a BitStruct, "bytes" for a Struct."""
    return "bits" if _bitstruct_of(schema) is not None else "bytes"


def layout(schema: c.Construct) -> list[Row]:
    """Every field of ``schema`` with its computed byte or bit range, in schema order."""
    bits = _bitstruct_of(schema)
    if bits is not None:
        return _bit_rows(bits)
    if isinstance(schema, c.Struct):
        return _byte_rows(schema, 0, "", None)[0]
    raise LayoutError(f"not a Struct or BitStruct: {schema!r}")


def structure_rows(s: Structure) -> list[Row]:
    """The rows of one registry entry, restricted to its ``part``."""
    rows = layout(s.schema)
    if s.part is None:
        return rows
    if s.part == "":
        nested_tops = {r.top for r in rows if r.nested and r.path == r.top}
        return [r for r in rows if r.top not in nested_tops]
    return [r for r in rows if r.top == s.part and r.path != s.part]


def ranges(schema: c.Construct) -> dict[str, tuple[int | None, int | None]]:
    """Field path -> (start, end) as computed from the schema; what the offsets test compares."""
    return {r.path: r.span for r in layout(schema)}


# --- Refcount blocks: layout measured by building one -----------------------------------------


@dataclass(frozen=True)
class RefcountLayout:
    refcount_order: int
    refcount_bits: int
    per_64k_cluster: int
    max_refcount: int
    entry_positions: tuple[tuple[tuple[int, int], ...], ...]
    """For entries 0 and 1: the (byte, bit) pairs they occupy, bit 0 = least significant."""
    big_endian: bool
    """True when a refcount of 1 lands in an entry's last byte (only meaningful for >= 16 bits)."""


def _bits_set(data: bytes) -> tuple[tuple[int, int], ...]:
    return tuple((i, b) for i, byte in enumerate(data) for b in range(8) if byte >> b & 1)


def refcount_layouts() -> list[RefcountLayout]:
    """Where refcount entries 0 and 1 sit in a block, for every refcount_order.

    Measured by building a block through spec.tables.refcount_block with one entry set to all
    ones, so the sub-byte packing (LSB first) is read off the schema, not restated.
    """
    out = []
    for order in range(limits.MAX_REFCOUNT_ORDER + 1):
        small = Geometry(cluster_bits=limits.MIN_CLUSTER_BITS, refcount_order=order)
        schema = refcount_block(small)
        n = small.refcount_block_entries
        top = (1 << small.refcount_bits) - 1
        positions = []
        for idx in (0, 1):
            values = [0] * n
            values[idx] = top
            positions.append(_bits_set(schema.build(values)))
        one = [0] * n
        one[0] = 1
        set_one = _bits_set(schema.build(one))
        first_entry_bytes = sorted({byte for byte, _ in positions[0]})
        out.append(RefcountLayout(
            refcount_order=order,
            refcount_bits=small.refcount_bits,
            per_64k_cluster=Geometry(cluster_bits=16, refcount_order=order).refcount_block_entries,
            max_refcount=top,
            entry_positions=tuple(positions),
            big_endian=bool(set_one) and set_one[0][0] == first_entry_bytes[-1],
        ))
    return out


def _describe_positions(pos: Sequence[tuple[int, int]]) -> str:
    nbytes = sorted({b for b, _ in pos})
    if len(pos) == 8 * len(nbytes):
        return f"byte {nbytes[0]}" if len(nbytes) == 1 else f"bytes {nbytes[0]}-{nbytes[-1]}"
    bits = sorted(bit for _, bit in pos)
    span = f"bit {bits[0]}" if len(bits) == 1 else f"bits {bits[0]}-{bits[-1]}"
    return f"byte {nbytes[0]}, {span}"


# --- Limits: values imported, notes read from the docstrings after each constant ---------------


def module_constants(module: ModuleType) -> list[tuple[str, Any, str]]:
    """(name, value, docstring) of each UPPER_CASE module constant, in source order.

    Values come from the imported module, docstrings from the string statement that follows the
    assignment (the attribute-docstring convention), so nothing is stated twice.
    """
    tree = ast.parse(inspect.getsource(module))
    out: list[tuple[str, Any, str]] = []
    body = tree.body
    for i, node in enumerate(body):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target: ast.expr = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        else:
            continue
        if not (isinstance(target, ast.Name) and target.id.isupper()):
            continue
        name = target.id
        doc = ""
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                and isinstance(nxt.value.value, str):
            doc = " ".join(nxt.value.value.split())
        out.append((name, getattr(module, name), doc))
    return out


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v} (0x{v:x})" if v >= 0x10000 else str(v)
    if isinstance(v, bytes):
        return "`" + "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in v) + "`"
    return str(v)


# --- Markdown --------------------------------------------------------------------------------------


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(x) for x in row) + " |" for row in rows]
    return lines


def format_range(row: Row, unit: Unit) -> str:
    """``0-3``, ``104``, ``105+ (variable)`` or ``variable``."""
    if row.start is None:
        return "variable"
    if row.end is None:
        return f"{row.start}+ (variable)"
    if row.start == row.end:
        return str(row.start)
    return f"{row.start}-{row.end}"


def _meaning(row: Row) -> str:
    doc = row.doc or "(undocumented)"
    if row.condition and row.condition != "conditional":
        doc += f" Present if {row.condition}."
    if row.note:
        doc += f" {row.note}"
    return doc


def render_structure(s: Structure) -> list[str]:
    unit = unit_of(s.schema)
    if unit != s.unit:
        raise LayoutError(f"registry says {s.key} is in {s.unit}, schema is in {unit}")
    out = [f"### {s.title}", "", f"{s.document}: \"{s.section}\". {s.description}", ""]
    rows = structure_rows(s)
    if s.part:
        group = next(r for r in layout(s.schema) if r.path == s.part)
        out += [f"`{group.path}`: {group.doc}", ""]
    out += _table(
        ["Bits" if unit == "bits" else "Bytes", "Field", "Meaning"],
        ([format_range(r, unit), f"`{r.path}`", _meaning(r)] for r in rows),
    )
    return [*out, ""]


def render_refcount_blocks() -> list[str]:
    out = [
        "### Refcount block",
        "",
        "qcow2.rst: \"Host cluster management\". A refcount block fills one cluster with "
        "refcount_bits-wide entries, one per host cluster. The positions below are measured by "
        "building a block with spec.tables.refcount_block. Bits number from 0 = least significant "
        "within a byte; entries of 16 bits or more are big-endian integers.",
        "",
    ]
    out += _table(
        ["refcount_order", "refcount_bits", "Refcounts per 64 KiB cluster", "Max refcount",
         "Entry 0", "Entry 1", "Multi-byte order"],
        (
            [rl.refcount_order, rl.refcount_bits, rl.per_64k_cluster, rl.max_refcount,
             _describe_positions(rl.entry_positions[0]), _describe_positions(rl.entry_positions[1]),
             ("big-endian" if rl.big_endian else "little-endian") if rl.refcount_bits > 8 else "-"]
            for rl in refcount_layouts()
        ),
    )
    return [*out, ""]


def render_encryption() -> list[str]:
    """The Encryption section: payload ciphers, key slots and the rules, from spec/encryption.py."""
    from spec import encryption as enc
    from spec import luks as lk

    out = [
        "## Encryption",
        "",
        "From spec/encryption.py (QEMU 7.2: crypto/block-luks.c, crypto/block-qcow.c, crypto/afsplit.c, "
        "crypto/ivgen-*.c, block/qcow2.c). The header's crypt_method selects it: 1 is legacy AES-CBC, "
        "with no other on-disk structure (the key is the passphrase itself), 2 is LUKS1, whose header "
        "and key slots fill the LUKS area above. Guest data is in ordinary clusters in both cases, "
        "encrypted sector by sector; metadata (tables, refcounts, snapshots, bitmaps) is never encrypted.",
        "",
        "### Payload ciphers",
        "",
        "LUKS cipher algorithms and modes (qapi/crypto.json QCryptoCipherAlgorithm and QCryptoCipherMode, "
        "restricted to the LUKS name map). qemu-img 7.2 column: what `qemu-img create -o "
        "encrypt.cipher-alg=...,encrypt.cipher-mode=...` does (computed by "
        "spec.encryption.qemu_create_refusal); qcow2lab column: whether the `cryptography` package can "
        "run it (otherwise UnsupportedFeature names the cipher). Legacy AES is always aes-128-cbc-plain64.",
        "",
    ]
    rows = []
    for alg in enc.CIPHER_KEY_LEN:
        for mode in lk.CIPHER_MODES:
            refusal = enc.qemu_create_refusal(alg, mode)
            gap = enc.qcow2lab_gap(alg, mode)
            ours = "-" if refusal else (f"no: {gap}" if gap else "yes")
            rows.append([f"`{alg}`", mode, enc.CIPHER_KEY_LEN[alg], enc.CIPHER_BLOCK_LEN[alg],
                         refusal or "accepted", ours])
    out += _table(["Cipher", "Mode", "Key bytes", "Block bytes", "qemu-img 7.2", "qcow2lab"], rows)
    out += ["", "IV generators (the IV is as long as the cipher block; ECB has none):", ""]
    out += _table(["ivgen", "IV of sector n"], ([f"`{k}`", v] for k, v in enc.IVGEN_DOCS.items()))
    out += ["", "Hash algorithms (PBKDF2, AF diffusion, ESSIV):", ""]
    lacks = "no: the cryptography package lacks it"
    out += _table(["Hash", "Digest bytes", "qcow2lab"],
                  ([f"`{h}`", n, "yes" if h in enc.SUPPORTED_HASHES else lacks]
                   for h, n in lk.HASH_DIGEST_LEN.items()))
    out += ["", "### Unlocking a key slot", ""]
    out += [f"{i}. {step}" for i, step in enumerate(enc.UNLOCK_STEPS, 1)]
    out += ["", "### Creating a LUKS header", ""]
    out += [f"{i}. {step}" for i, step in enumerate(enc.CREATE_STEPS, 1)]
    out += ["", "### Encryption constants", ""]
    out += _table(["Constant", "Value", "Note"],
                  ([f"`{n}`", _format_value(v), d or "-"] for n, v, d in module_constants(enc)
                   if isinstance(v, int) and not isinstance(v, bool)))
    out += ["", "### Encryption rules", "",
            "What a valid encrypted image obeys and how QEMU treats its data; Error is the spec.errors "
            "class qcow2lab raises when a rule does not hold (- for behaviour).", ""]
    out += _table(["Rule", "Statement", "Error", "Source"],
                  ([f"`{r.id}`", r.statement, r.error, r.source] for r in enc.ENCRYPTION_RULES))
    return [*out, ""]


def render_features() -> list[str]:
    out = ["## Feature bits", "",
           "From spec.features.FEATURES; the name is what QEMU writes into the feature name table.", ""]
    out += _table(
        ["Header field", "Bit", "Mask", "Name", "Meaning"],
        ([f"`{f.type.name.lower()}_features`", f.bit, f"0x{1 << f.bit:x}", f.name, f.meaning]
         for f in features.FEATURES),
    )
    out += ["", "Known-bit masks (spec.features.KNOWN_MASKS):", ""]
    out += _table(["Header field", "Known bits"],
                  ([f"`{t.name.lower()}_features`", f"0x{m:x}"] for t, m in features.KNOWN_MASKS.items()))
    out += ["", "### Compression types", "", "Header byte 104, `compression_type`.", ""]
    out += _table(
        ["Value", "Name"],
        ([int(t), features.COMPRESSION_NAMES.get(t, t.name.lower())] for t in features.CompressionType),
    )
    return [*out, ""]


def bit_runs(mask: int) -> list[tuple[int, int]]:
    """Maximal runs of set bits in ``mask`` as (low, high) pairs, lowest first."""
    if mask < 0:
        raise ValueError("bit_runs needs a non-negative mask")
    runs: list[tuple[int, int]] = []
    bit = 0
    while mask >> bit:
        if mask >> bit & 1:
            low = bit
            while mask >> (bit + 1) & 1:
                bit += 1
            runs.append((low, bit))
        bit += 1
    return runs


def _format_runs(runs: Sequence[tuple[int, int]]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def render_masks() -> list[str]:
    out = ["### QEMU's entry masks", "",
           "The integer masks code decodes entries with (spec/entries.py, QEMU's names from block/qcow2.h "
           "and block/qcow2-bitmap.c); the bits are computed from each value.", ""]
    rows = [[f"`{n}`", f"0x{v:016x}", _format_runs(bit_runs(v))]
            for n, v, _ in module_constants(entries)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    out += _table(["Constant", "Value", "Bits set"], rows)
    return [*out, ""]


def render_extension_types() -> list[str]:
    out = ["### Header extension types", "", "From spec.header.EXTENSION_NAMES.", ""]
    out += _table(["Type", "Extension"], ([f"0x{t:08x}", name] for t, name in EXTENSION_NAMES.items()))
    return [*out, ""]


def render_limits() -> list[str]:
    out = ["## QEMU limits", "",
           "From spec/limits.py: QEMU 7.2's implementation limits (block/qcow2.h unless noted). "
           "An image breaking one is refused at open.", ""]
    out += _table(["Constant", "Value", "Note"],
                  ([f"`{n}`", _format_value(v), d or "-"] for n, v, d in module_constants(limits)))
    return [*out, ""]


def render_rules() -> list[str]:
    rules = RULES
    out = ["## Rules catalogue", "",
           f"The invariants a valid image obeys, from spec.rules.RULES ({len(rules)} rules). Severity is "
           "the qemu-img check counter a violation bumps.", ""]
    out += _table(
        ["Rule", "Severity", "Counted by qemu-img check", "Statement", "Source"],
        ([f"`{r.id}`", _enum_text(r.severity), _counted_text(r), r.statement, r.source] for r in rules),
    )
    return [*out, ""]


def _counted_text(rule: Any) -> str:
    # ``qemu_counts`` is optional in the Rule API; a catalogue without it counts everything.
    return "yes" if getattr(rule, "qemu_counts", True) else "no"


def _enum_text(v: Any) -> str:
    value = getattr(v, "value", v)
    return str(value)


def render_markdown() -> str:
    """The whole reference document, as committed in docs/spec.md."""
    out = [
        "# qcow2 on-disk format reference",
        "",
        "<!-- Generated by `qcow2lab spec` (spec/render.py) from the construct schemas, "
        "spec/registry.py, spec/features.py, spec/limits.py and spec/rules.py. "
        "Do not edit: run `make spec`. -->",
        "",
        "Every byte and bit range below is computed from the schemas the code parses with; "
        "tests/spec/test_spec_offsets.py checks them against qcow2.rst. All integers are big-endian. "
        "Bits are numbered from 0 = least significant bit of the 64-bit entry. Fields shown after "
        "a variable-size field have a variable offset.",
        "",
        "## Structures",
        "",
    ]
    for s in STRUCTURES:
        out += render_structure(s)
        if s.key == "header_extension":
            out += render_extension_types()
        if s.key == "refcount_table_entry":
            out += render_refcount_blocks()
        if s.key == "bitmap_table_entry":
            out += render_masks()
    out += render_encryption()
    out += render_features()
    out += render_limits()
    out += render_rules()
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"
