"""The worker process that runs one foreign implementation (the child side of isolation.py).

    python -m difftest.adapters.worker MEMORY_BYTES

It answers requests from the harness over its stdin and stdout, one at a time: each frame is an
8-byte big-endian length and a pickle. The first thing it does is move the protocol off
descriptors 0 and 1, so that an adapter that prints (or reads stdin) cannot corrupt it: stray
output goes to stderr, which the harness keeps for the crash message.

Requests (tuples): ``("load", spec)`` (the adapter is imported once, here), then per
session (one example) ``("session",)``, which forks the process that serves it (see
``_session``): ``("get", handle, name)``, ``("call", handle, name, args, kwargs)``,
``("drop", handle)``, and ``("end",)``. ``("quit",)`` ends the worker. Replies: ``("ok", value)`` for plain
data (bytes, numbers, strings, lists, dicts), ``("obj", handle)`` for any other object (kept
here, named by number), ``("method",)`` for a callable attribute, ``("raise", class name,
message, feature)`` for an exception the harness re-raises as itself (spec.errors classes,
NotImplementedError, AttributeError) and ``("fail", finding class, message)`` for anything
else foreign code raised: ``memory`` for MemoryError, ``crash`` for SystemExit, ``error``
otherwise. Nothing but plain data leaves this process, so the harness never unpickles (and so
never imports) a foreign class.

The memory limit is RLIMIT_AS: the address space the worker has once the adapter is loaded
plus MEMORY_BYTES (as difftest/corpus/fuzz.py caps its probes), so an allocation beyond it
fails with MemoryError here instead of growing the machine's memory.
"""

from __future__ import annotations

import contextlib
import faulthandler
import numbers
import os
import pickle
import resource
import signal
import struct
import sys
import traceback
from typing import Any, BinaryIO

from spec.errors import Qcow2Error, UnsupportedFeature

HEADER = struct.Struct(">Q")
LOAD_SLACK = 512 << 20
"""Address space allowed for loading the adapter, on top of MEMORY_BYTES: imports of C
libraries map a lot of address space they never touch."""
RAISED = ("NotImplementedError", "AttributeError")
"""Exceptions that are answers, not findings: the harness re-raises them (an adapter says it
does not do something; an attribute is absent)."""


def read_frame(f: BinaryIO) -> Any:
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    n = HEADER.unpack(head)[0]
    data = bytearray()
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return pickle.loads(bytes(data))


def frame(msg: Any) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as builtin data, or the sentinel ``_OBJECT`` when it is an object to keep."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and callable(value.item) and hasattr(value, "dtype"):  # numpy scalar
        return plain(value.item(), depth)
    if depth < 8 and isinstance(value, (list, tuple)):
        items = [plain(v, depth + 1) for v in value]
        return _OBJECT if any(i is _OBJECT for i in items) else items
    if depth < 8 and isinstance(value, dict):
        out = {plain(k, depth + 1): plain(v, depth + 1) for k, v in value.items()}
        return _OBJECT if _OBJECT in out or any(v is _OBJECT for v in out.values()) else out
    return _OBJECT


_OBJECT = object()


def load(spec: str) -> tuple[Any, dict[str, list[Any]], list[str] | None]:
    """The adapter object, its ``UNSUPPORTED`` declaration (on the object, else on its
    module) and the keyword names its ``open`` takes (None: ``**kw`` or unknown)."""
    import inspect

    from difftest.adapters import load as load_spec
    obj = load_spec(spec)
    unsupported = getattr(obj, "UNSUPPORTED", None)
    if unsupported is None:
        mod = sys.modules.get(getattr(obj, "__module__", "") or "")
        unsupported = getattr(mod, "UNSUPPORTED", None) if mod is not None else None
    declared = {str(k): sorted(v, key=repr) for k, v in dict(unsupported or {}).items()}
    params: list[str] | None = None
    try:
        sig = inspect.signature(obj.open).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in sig.values()):
            params = list(sig)
    except (TypeError, ValueError, AttributeError):
        pass
    return obj, declared, params


class Server:
    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.objects: dict[int, Any] = {}
        self.next = 1

    def keep(self, obj: Any) -> tuple[str, int]:
        self.objects[self.next] = obj
        self.next += 1
        return ("obj", self.next - 1)

    def answer(self, value: Any) -> tuple[Any, ...]:
        p = plain(value)
        return self.keep(value) if p is _OBJECT else ("ok", p)

    def handle(self, req: tuple[Any, ...]) -> tuple[Any, ...]:
        op = req[0]
        if op == "load":
            obj, declared, params = load(req[1])
            self.objects[0] = obj
            _limit_memory(self.memory)  # from here on, growth is the adapter's
            return ("ok", {"unsupported": declared, "open_params": params})
        if op == "drop":
            self.objects.pop(req[1], None)
            return ("ok", None)
        target = self.objects[req[1]]
        if op == "get":
            value = getattr(target, req[2])
            return ("method",) if callable(value) and not isinstance(value, type) else self.answer(value)
        if op == "call":
            return self.answer(getattr(target, req[2])(*req[3], **req[4]))
        raise ValueError(f"unknown request {op!r}")


def _vsize() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _limit_memory(extra: int) -> None:
    if extra > 0:
        resource.setrlimit(resource.RLIMIT_AS, (_vsize() + extra, resource.RLIM_INFINITY))


def _failure(e: BaseException) -> tuple[Any, ...]:
    name = type(e).__name__
    if isinstance(e, Qcow2Error) or (name in RAISED and type(e).__module__ == "builtins"):
        feature = e.feature if isinstance(e, UnsupportedFeature) else None
        cls = name if name in RAISED else type(e).__name__
        # A Qcow2Error subclass the harness does not know travels as its nearest spec class.
        for base in type(e).__mro__:
            if base.__module__ == "spec.errors":
                cls = base.__name__
                break
        return ("raise", cls, str(e), feature)
    if isinstance(e, MemoryError):
        return ("fail", "memory", "MemoryError")
    if isinstance(e, SystemExit):
        return ("fail", "crash", f"called sys.exit({e.code!r})")
    where = traceback.extract_tb(e.__traceback__)[-1:]
    at = f" at {os.path.basename(where[0].filename)}:{where[0].lineno}" if where else ""
    return ("fail", "error", f"{name}: {e}{at}")


def main() -> int:
    memory = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    # The protocol gets private descriptors; 0 becomes /dev/null and 1 a copy of stderr.
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    faulthandler.enable()  # a segfault leaves its Python stack on stderr
    _limit_memory(memory + LOAD_SLACK)
    server = Server(memory)
    while True:
        req = read_frame(proto_in)
        if req is None or req[0] == "quit":
            return 0
        if req[0] == "session":
            proto_out.write(frame(("ended", _session(server, proto_in, proto_out))))
            continue
        proto_out.write(_serve_one(server, req))


def _serve_one(server: Server, req: tuple[Any, ...]) -> bytes:
    try:
        return frame(server.handle(req))
    except BaseException as e:  # foreign code: every outcome is reported, none kills the loop
        return frame(_failure(e))


def _session(server: Server, proto_in: BinaryIO, proto_out: Any) -> int:
    """Fork the process that serves one session (one example) from the loaded adapter and
    wait for it. Every session starts from the same state, this process's, which has run
    the adapter's import and nothing else: whatever a session opens, leaks, breaks or
    allocates dies with it. The child has its own process group (the harness kills it by
    that, while this process has not yet reaped it, so the id cannot have been reused) and
    its own memory cap. It reads and answers requests until ``("end",)``; this process
    writes nothing meanwhile, then ``("ended", exit code)`` (negative: a signal)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setpgid(0, 0)
            _limit_memory(server.memory)
            while True:
                req = read_frame(proto_in)
                if req is None or req[0] == "end":
                    break
                proto_out.write(_serve_one(server, req))
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    proto_out.write(frame(("ok", pid)))
    status = os.waitpid(pid, 0)[1]
    # What the session started and left running (a qemu-io an adapter opened, say) is in
    # its group; the id cannot be reused while the group has members, so this is safe.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
