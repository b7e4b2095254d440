"""What makes two findings the same finding: a stable signature.

A campaign meets one bug many times (every shard, every shrink step, every configuration
that happens to exercise it), and the messages differ between meetings: offsets, sizes,
temporary paths. Grouping by message split one libqcow bug into hundreds of blocks
(issue 14), and naming reproducer folders by ``kind-op`` alone made every reader finding
share one folder. The signature is what stays the same:

- the finding's kind, and for a reader finding its class (hang, crash, memory, error,
  wrong-bytes) and the reader;
- the operation kind (``write_zeroes``, ``finish``; for a reader: open, size or read);
- the feature set of the configuration (``features``): version, cluster size, refcount
  width, extended L2, compression, lazy refcounts, backing kind and size (a backing file the
  operations grew the image past counts as shorter), data file, encryption. Cache and open
  options and the virtual size are left out: they change how an engine gets there, not what
  the image is.

It is also a folder name, so it holds no "/" and no temporary path.
"""

from __future__ import annotations

import re
import tempfile
from typing import Any

from difftest.core.config import Config, _human
from difftest.core.divergence import Divergence

READER_CLASSES = ("hang", "crash", "memory", "error", "wrong-bytes")
"""The classes of a reader finding (``Divergence("reader", "finish", "<class>: ...")``)."""

_TMP = re.compile(rf"({re.escape(tempfile.gettempdir())}|(/[\w.+-]+)*/(difftest|pytest)-[\w.+-]*)"
                  r"(/[\w.+-]+)*")
"""An absolute path in the temporary directory or through a directory the harness or pytest
made (``difftest-*``, ``pytest-of-*``): not the project's own ``difftest/`` sources."""
_ADDRESS = re.compile(r"(?<= at )0x[0-9a-f]{6,}")
"""Object addresses in reprs (``<object at 0x7f...>``) differ in every process."""


def normalise(message: str) -> str:
    """``message`` with temporary paths and object addresses replaced by placeholders."""
    return _ADDRESS.sub("0x…", _TMP.sub("<tmp>", message))


def finding_class(d: Divergence) -> str | None:
    """The class of a reader finding, None for any other divergence.

    Taken from ``d.finding_class`` when the teardown sets it, else from the message's
    ``"<class>: "`` prefix, else guessed from the older message forms (a size or byte
    mismatch is wrong-bytes, the SIGALRM deadline a hang, anything else an error)."""
    if d.kind != "reader":
        return None
    given = getattr(d, "finding_class", None)
    if isinstance(given, str) and given:
        return given
    body = reader_message(d)
    head, sep, _ = body.partition(": ")
    if sep and head in READER_CLASSES:
        return head
    if "differently from" in body or " reads size " in body or "WrongBytes" in body:
        return "wrong-bytes"
    if "ReaderHung" in body or "no answer within" in body:
        return "hang"
    if "MemoryError" in body:
        return "memory"
    return "error"


def reader_message(d: Divergence) -> str:
    """The message of ``d`` without the ``[kind] op: `` that Divergence puts in front."""
    return str(d).split(": ", 1)[1] if str(d).startswith("[") else str(d)


def unsupported(d: Divergence) -> bool:
    """Whether a reader finding is in fact the reader saying "I do not do this" (before the
    teardown learnt to record that as an ``unsupported:`` note instead)."""
    return d.kind == "reader" and ("UnsupportedFeature" in str(d) or "NotImplementedError" in str(d))


def reader_of(d: Divergence, readers: list[str] | tuple[str, ...]) -> str | None:
    """Which of ``readers`` a reader finding is about: the one its message names (the
    longest name wins, so ``py:a.b`` is not taken for ``py:a``)."""
    named = [r for r in readers if r in str(d)]
    return max(named, key=len) if named else None


def reader_operation(d: Divergence) -> str:
    """What the reader was doing: open, size or read."""
    body = reader_message(d)
    if "cannot open" in body or " at open" in body:
        return "open"
    if " reads size " in body:
        return "size"
    return "read"


PLAIN_CLUSTERS = "c64K"
"""The cluster-size feature of a finding simplified to the default (minimize.SIMPLER)."""


Log = list[tuple[str, dict[str, Any]]]


def grown_past_backing(cfg: Config, log: Log) -> bool:
    """Whether a resize of ``log`` made the image larger than its backing file: the reader
    then meets what a backing file shorter than the image gives (named so in ``features``)."""
    return cfg.backing != "none" and any(name == "resize" and kw.get("new_size", 0) > cfg.backing_bytes
                                         for name, kw in log)


def features(cfg: Config, log: Log | None = None) -> str:
    """The image features of the configuration and of what ``log`` made of it, as part of a
    folder name."""
    parts = [f"v{cfg.version}", f"c{_human(cfg.cluster_size)}"]
    if cfg.refcount_bits != 16:
        parts.append(f"rc{cfg.refcount_bits}")
    if cfg.extended_l2:
        parts.append("extl2")
    if cfg.compression_type != "zlib":
        parts.append(cfg.compression_type)
    if cfg.lazy_refcounts:
        parts.append("lazy")
    if cfg.backing != "none":
        # Kind and size apart, the size only when it is not the image's: a finding that does
        # not need a short backing file is simplified to "same", and must still cover a
        # meeting on a short one (covers).
        parts.append(cfg.backing)
        if cfg.backing_size == "shorter" or (log and grown_past_backing(cfg, log)):
            parts.append("shorter-backing")
        elif cfg.backing_size != "same":
            parts.append(f"{cfg.backing_size}-backing")
    if cfg.data_file:
        parts.append("datafile-raw" if cfg.data_file_raw else "datafile")
    if cfg.encrypt != "none":
        parts.append(cfg.encrypt)
    if cfg.encrypt_backing:
        parts.append("luks-backing")
    return ",".join(parts)


def short_name(reader: str) -> str:
    """A reader's name in a folder name: ``dissect``, ``libqcow``, or the last part of a
    ``py:`` module's name and the object's (``py:tests.difftest.planted_reader:reader`` ->
    planted_reader.reader): two readers of one module get two folders."""
    if reader.startswith("py:"):
        module, _, name = reader[3:].partition(":")
        reader = module.split(".")[-1] + (f".{name}" if name else "")
    return re.sub(r"[^\w.+-]+", "_", reader).strip("_")


def signature(d: Divergence, cfg: Config, readers: list[str] | tuple[str, ...] = (),
              log: Log | None = None) -> str:
    """The stable name of the finding ``d`` made on ``cfg`` by the operations of ``log``;
    see the module docstring."""
    op = d.op.split("(")[0]
    if d.kind == "reader":
        who = reader_of(d, readers)
        head = f"reader-{finding_class(d)}-{reader_operation(d)}" + (f"-{short_name(who)}" if who else "")
    else:
        head = f"{d.kind}-{op}"
    return f"{head}--{features(cfg, log)}"


def operation_identity(d: Divergence, readers: list[str] | tuple[str, ...] = ()) -> str:
    """The signature without the feature set: what the deletion pass (minimize.py) keeps
    fixed while it drops operations on one configuration."""
    return signature(d, Config(), readers).split("--")[0]


def covers(known: str, key: str) -> bool:
    """Whether the finding ``known`` (a signature) accounts for a meeting whose signature
    is ``key``: the same finding on a configuration with the features it needs and more
    (the deletion pass drops the features a finding does not need, minimize.simplify)."""
    head, _, feats = known.partition("--")
    head2, _, feats2 = key.partition("--")
    # 64 KiB is the cluster size a finding that needs no particular one is simplified to:
    # it stands for any (the other features are absent when plain).
    return head == head2 and set(feats.split(",")) - {PLAIN_CLUSTERS} <= set(feats2.split(","))
