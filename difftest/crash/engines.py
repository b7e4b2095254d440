"""The engines a crash campaign drives, with their host I/O visible to spec.hostio's monitor.

The model's host calls all go through spec/qfile.Qcow2File, which reports them already. The
impl's go through impl/hostfile.HostFile; its Image opens files with the class in
``Image.host_file_class``, the hook the impl leaves for this, and ``MonitoredHostFile``
reports each call that can change the file before running it (a flush even under
cache=unsafe, where HostFile skips the fdatasync: the barrier is still in the stream).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

from spec import hostio


def engine_module(name: str) -> ModuleType:
    if name == "model":
        import model
        return model
    if name == "impl":
        import impl
        return impl
    raise ValueError(f"unknown engine {name!r} (model, impl)")


def _monitored_host_file() -> type:
    from impl.hostfile import Buffer, HostFile

    class MonitoredHostFile(HostFile):
        """HostFile reporting every host call to spec.hostio.active before making it."""

        def pread(self, offset: int, n: int, *, meta: bool = False) -> bytes:
            self._report(hostio.READ, offset, n)
            return super().pread(offset, n, meta=meta)

        def pwritev(self, bufs: Sequence[Buffer], offset: int, *, meta: bool = False) -> None:
            if hostio.active is not None and not self.readonly:
                data = b"".join(bytes(b) for b in bufs)
                self._report(hostio.WRITE, offset, len(data), data)
            super().pwritev(bufs, offset, meta=meta)

        def truncate(self, size: int) -> None:
            if not self.readonly:
                self._report(hostio.TRUNCATE, size)
            super().truncate(size)

        def flush(self, *, sync: bool = True) -> None:
            if not self.readonly:
                self._report(hostio.FLUSH)
            super().flush(sync=sync)

        def punch_hole(self, offset: int, n: int) -> None:
            if not self.readonly and n > 0:
                self._report(hostio.FALLOCATE, offset, n, mode=hostio.FALLOC_FL_PUNCH_HOLE
                             | hostio.FALLOC_FL_KEEP_SIZE)
            super().punch_hole(offset, n)

        def zero_range(self, offset: int, n: int) -> bool:
            if not self.readonly:
                self._report(hostio.FALLOCATE, offset, n, mode=hostio.FALLOC_FL_ZERO_RANGE)
            return super().zero_range(offset, n)

        def _report(self, kind: str, offset: int = 0, length: int = 0, data: bytes = b"",
                    mode: int = 0) -> None:
            if hostio.active is None:
                return
            try:
                hostio.report(kind, self.path, offset, length, data, mode)
            except OSError as e:
                # A CorruptionError, as HostFile makes of a failed host call.
                raise hostio.HostIOError(f"host {kind} at {offset} failed: {e}") from None

    return MonitoredHostFile


@contextlib.contextmanager
def monitored(name: str) -> Iterator[ModuleType]:
    """The engine's module, with its host calls reported to spec.hostio.active while the
    block runs (for the model they always are)."""
    module = engine_module(name)
    if name != "impl":
        yield module
        return
    from impl.image import Image
    saved = Image.host_file_class
    Image.host_file_class = _monitored_host_file()
    try:
        yield module
    finally:
        Image.host_file_class = saved


def open_rw(module: ModuleType, path: str) -> Any:
    """Read-write open as the campaign runs it: cache=unsafe, as the lockstep runs every
    engine (the barriers are recorded all the same; spec/hostio.py)."""
    return module.open(path, cache="unsafe")
