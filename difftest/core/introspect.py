"""What the lockstep harness can learn about a target beyond spec.interface.Image.

Every target carries one ``Introspection``, chosen by ``introspection_of`` when its image is
opened, and the harness asks it instead of probing the image for optional methods. Each capability answers
None (or False) when the target does not have it, and the harness then falls back to the
Image interface: ``read`` instead of ``matches``, ``map`` instead of the top-layer runs.

- ``EngineIntrospection``: an engine image satisfying spec.interface.Introspectable (the
  model; the impl when it does): its corrupt flag, its packing note and its own block status.
- ``QemuIntrospection``: a qemu-io process (core/qemuio.py, QemuImage, also when a ``py:``
  adapter returns one): qemu-io's ``read -P``, ``alloc`` and ``map`` commands, which answer
  without a qemu-img process.
- ``Introspection`` itself: a foreign image (``py:`` adapters), compared through the
  interface alone.
"""

from __future__ import annotations

from typing import Any

from difftest.core.qemuio import QemuImage
from spec.interface import BDRV_BLOCK_ALLOCATED, Introspectable

Runs = list[tuple[int, int, bool]]
"""(start, length, allocated in the top layer) pieces, in guest order."""


class Introspection:
    """No capabilities: every question is answered through the Image interface."""

    def corrupt(self) -> bool:
        """Whether the target flagged its image corrupt and stopped serving requests."""
        return False

    def packed_into_live_cluster(self) -> bool:
        """Whether the target reproduced QEMU 7.2's packing of compressed data into a cluster
        something else owns (spec.interface.Introspectable)."""
        return False

    def matches(self, offset: int, expected: bytes) -> bool | None:
        """Whether the target reads ``expected`` at ``offset``, checked without transferring
        the bytes back; None when it cannot tell that more cheaply than ``read``."""
        return None

    def allocated_bytes(self, offset: int, n: int) -> int | None:
        """How many bytes of [offset, offset+n) the top layer allocates; None: unknown."""
        return None

    def top_layer_runs(self, offset: int, n: int) -> Runs | None:
        """Top-layer allocation covering [offset, offset+n) (runs may reach beyond it);
        None: derive it from ``map``."""
        return None


class EngineIntrospection(Introspection):
    def __init__(self, image: Introspectable, *, packed: bool = False) -> None:
        self.image = image
        self.packed = packed
        """The packing happened before a reopen (Target.reopen): QEMU's image stays damaged."""

    def corrupt(self) -> bool:
        return self.image.broken

    def packed_into_live_cluster(self) -> bool:
        return self.packed or self.image.packed_into_live_cluster

    def top_layer_runs(self, offset: int, n: int) -> Runs:
        """The image's own block status, piece by piece: what qemu-io's ``map`` reports
        (bdrv_is_allocated on the top node, qemu-io-cmds.c map_is_allocated), without the
        whole-chain walk of map()."""
        out: Runs = []
        end = offset + n
        while offset < end:
            st = self.image.layer_status(offset, end - offset)
            if st.length <= 0:
                break
            out.append((offset, st.length, bool(st.flags & BDRV_BLOCK_ALLOCATED)))
            offset += st.length
        return out


class QemuIntrospection(Introspection):
    def __init__(self, image: QemuImage) -> None:
        self.image = image

    def corrupt(self) -> bool:
        return self.image.dropped

    def matches(self, offset: int, expected: bytes) -> bool:
        return self.image.matches(offset, expected)

    def allocated_bytes(self, offset: int, n: int) -> int:
        return self.image.allocated_bytes(offset, n)

    def top_layer_runs(self, offset: int, n: int) -> Runs:
        return self.image.present_runs()  # one qemu-io command for the whole image


def introspection_of(image: Any) -> Introspection:
    """What ``image`` can be asked: the one place that decides, when a target opens it."""
    if isinstance(image, QemuImage):
        return QemuIntrospection(image)
    if isinstance(image, Introspectable):
        return EngineIntrospection(image)
    return Introspection()
