"""Readers asked for internal snapshots: ``py:difftest.conformance.snapshots:READER``.

The teardown hands a reader the top image and compares the active layer only. This wrapper
is a reader too: it opens the image with READER (``dissect``, ``libqcow`` or a ``py:`` spec)
for the teardown's comparison, and at open also reads every internal snapshot the file
holds through READER's ``open(path, readonly=True, snapshot=NAME)``, against the reference
model's reading of the same snapshot. A reader whose ``open`` takes no ``snapshot`` (or
refuses it with UnsupportedFeature or NotImplementedError) does not do snapshots: that is
raised as UnsupportedFeature, recorded as *unsupported*. A snapshot read differently is
raised as ``SnapshotWrongBytes``, whose message starts with the finding class.
"""

from __future__ import annotations

import inspect
from typing import Any

import model
from difftest.adapters import load
from spec.errors import UnsupportedFeature

READ_MAX = 8 << 20
"""Guest bytes of each snapshot compared (from its start)."""
CHUNK = 1 << 20


class SnapshotWrongBytes(Exception):
    """A reader read a snapshot differently from the model (a wrong-bytes finding)."""


def _takes_snapshot(reader: Any) -> bool:
    try:
        params = inspect.signature(reader.open).parameters
    except (TypeError, ValueError):
        return True  # cannot tell (a C function): ask it
    return "snapshot" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class SnapshotReader:
    def __init__(self, inner: str) -> None:
        self.inner = inner

    @property
    def UNSUPPORTED(self) -> dict[str, Any]:
        """The wrapped reader's declaration (difftest/adapters): what it cannot read, the
        wrapper cannot either."""
        obj = load(self.inner)
        found = getattr(obj, "UNSUPPORTED", None) or \
            getattr(inspect.getmodule(type(obj)), "UNSUPPORTED", None)
        return dict(found or {})

    def open(self, path: str, readonly: bool = True) -> Any:
        reader = load(self.inner)
        with model.open(path, readonly=True) as ref:
            names = [s["name"] for s in ref.snapshots()]
        if names and not _takes_snapshot(reader):
            raise UnsupportedFeature(f"internal snapshots ({self.inner}: open() takes no snapshot=)")
        for name in names:
            _compare(reader, self.inner, path, name)
        return reader.open(path, readonly=True)


def _compare(reader: Any, spec: str, path: str, name: str) -> None:
    try:
        img = reader.open(path, readonly=True, snapshot=name)
    except NotImplementedError as e:
        raise UnsupportedFeature(f"internal snapshots ({spec}: {e})") from e
    try:
        with model.open(path, readonly=True, snapshot=name) as ref:
            if int(img.size) != int(ref.size):
                raise SnapshotWrongBytes(f"wrong-bytes: {spec} reads size {img.size} of snapshot "
                                         f"{name!r}, the model {ref.size}")
            for pos in range(0, min(int(ref.size), READ_MAX), CHUNK):
                k = min(CHUNK, int(ref.size) - pos)
                got, want = bytes(img.read(pos, k)), bytes(ref.read(pos, k))
                if got != want:
                    i = next((j for j in range(min(len(got), k)) if got[j] != want[j]), len(got))
                    raise SnapshotWrongBytes(f"wrong-bytes: {spec} reads snapshot {name!r} differently "
                                             f"from the model at guest offset {pos + i}")
    finally:
        img.close()


def __getattr__(name: str) -> SnapshotReader:
    """``py:difftest.conformance.snapshots:READER`` names the wrapper around READER."""
    # Only reader names: any other attribute (UNSUPPORTED, __path__, ...) asked of the
    # module must not turn into a wrapper.
    if name in ("dissect", "libqcow") or name.startswith("py:"):
        return SnapshotReader(name)
    raise AttributeError(name)


def wrap(reader: str) -> str:
    """The reader spec that reads ``reader``'s snapshots too."""
    return f"py:difftest.conformance.snapshots:{reader}"
