"""The error classes shared by model/, impl/ and difftest/ (DESIGN.md, "Errors").

Who is at fault decides the class, as in h11: the file (FormatError, CorruptionError),
the library (UnsupportedFeature) or the caller (RequestError). Tests compare classes,
never message text.
"""

from __future__ import annotations


class Qcow2Error(Exception):
    """Root of every error this project raises. Never raised directly."""


class FormatError(Qcow2Error):
    """The image is malformed at open: a header, extension or table breaks the format.

    ``path`` is the construct field path (``header.l1_size``) or the structure name,
    so a user can find the offending bytes without reading a traceback.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class UnsupportedFeature(Qcow2Error):
    """A valid image uses something this library does not implement. Names the feature."""

    def __init__(self, feature: str, message: str | None = None) -> None:
        self.feature = feature
        super().__init__(message or f"unsupported feature: {feature}")


class CorruptionError(Qcow2Error):
    """An inconsistency found during I/O; the image is then flagged corrupt (as QEMU does)."""


class RequestError(Qcow2Error):
    """The caller's mistake: out-of-range request, write to a read-only image, bad option."""


class WrongKey(RequestError):
    """An encrypted image's passphrase unlocks no key slot (QEMU: "Invalid password, cannot
    unlock any keyslot"). A RequestError because the key is the caller's input; LUKS1 cannot
    tell a wrong passphrase from damaged key material, so both end here (spec/encryption.py)."""


def check_node_dropped(signalled: str | None) -> None:
    """A piece of a request after a free signalled a corruption (the engine's ``signalled``):
    QEMU dropped the node there (bs->drv NULL), so the block layer's next piece, or its
    zero-status query or zero-data fallback, fails with ENOMEDIUM (block/io.c). Both engines
    ask this between pieces."""
    if signalled is not None:
        raise CorruptionError(f"{signalled}; the node was dropped")
