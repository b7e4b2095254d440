"""Foreign code runs in a worker process, never in the harness (DESIGN.md; issue 14).

``Worker`` starts ``python -m difftest.adapters.worker`` (worker.py), loads an adapter there
and hands back a ``Remote``: a proxy whose attribute reads and method calls are requests to
the worker. Every request has a wall-clock limit (``Limits.seconds``): the harness waits on
the pipe with poll(), not with SIGALRM, so a loop inside a C extension that ignores signals
is stopped all the same, by SIGKILL to the worker's whole process group. The worker caps its
own address space (RLIMIT_AS, ``Limits.memory`` above its size once the adapter is loaded).

What can go wrong becomes ``AdapterFailed`` with a finding class:

- ``hang``: no answer within the limit (the worker is killed);
- ``crash``: the worker died (a signal such as SIGSEGV, os._exit, sys.exit);
- ``memory``: MemoryError in the worker, or it died saying it was out of memory;
- ``error``: foreign code raised an ordinary exception (the worker lives on).

An exception that is an *answer* comes back as itself: the spec.errors classes (compared by
class, like any target's), NotImplementedError (an adapter saying it does not do something)
and AttributeError (an absent attribute). Descriptors: the worker gets only its pipes and a
stderr file (close_fds), and the harness closes all three whatever happens, so nothing an
adapter opens or leaks can reach the harness; the worker's stderr tail names the crash.

The limits are process-wide, from the environment (``QCOW2LAB_ADAPTER_TIMEOUT`` seconds,
``QCOW2LAB_ADAPTER_MEMORY`` MiB), which ``qcow2lab difftest --adapter-timeout/--adapter-memory``
set, so shard processes and reproducers inherit them.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import spec.errors as errors
from difftest.adapters.worker import HEADER, frame

TIMEOUT = 20.0
"""Default seconds a foreign call (an open, a read of up to 1 MiB, a write) may take."""
MEMORY_MIB = 1024
"""Default address space (MiB) a worker may grow by once its adapter is loaded."""
TIMEOUT_ENV = "QCOW2LAB_ADAPTER_TIMEOUT"
MEMORY_ENV = "QCOW2LAB_ADAPTER_MEMORY"
CLASSES = ("hang", "crash", "memory", "error", "wrong-bytes")
"""The finding classes of a foreign implementation (``wrong-bytes``: it answered, wrongly;
found by the comparison, not here)."""
OUT_OF_MEMORY = ("MemoryError", "Cannot allocate memory", "bad_alloc", "out of memory")
"""What a worker that died for want of memory leaves on stderr (Python, libc, C++)."""


@dataclass(frozen=True)
class Limits:
    seconds: float = TIMEOUT
    memory_mib: int = MEMORY_MIB

    @classmethod
    def from_env(cls) -> Limits:
        return cls(float(os.environ.get(TIMEOUT_ENV, TIMEOUT)), int(os.environ.get(MEMORY_ENV, MEMORY_MIB)))


class AdapterFailed(Exception):
    """Foreign code failed in a way no implementation may: ``finding_class`` is one of
    CLASSES, ``detail`` says what happened; ``str()`` is ``"<class>: <detail>"``."""

    def __init__(self, finding_class: str, detail: str) -> None:
        self.finding_class = finding_class
        self.detail = detail
        super().__init__(f"{finding_class}: {detail}")


class _Unpickler(pickle.Unpickler):
    """Only builtin data comes back (worker.plain); anything else is refused rather than
    imported into the harness."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"worker sent {module}.{name}")


_RAISED: dict[str, type[Exception]] = {
    "NotImplementedError": NotImplementedError, "AttributeError": AttributeError,
    **{n: c for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.Qcow2Error)},
}


def _raise(cls_name: str, message: str, feature: str | None) -> None:
    cls = _RAISED.get(cls_name, errors.CorruptionError)
    if cls is errors.UnsupportedFeature:
        raise errors.UnsupportedFeature(feature or message, message)
    if cls is errors.Qcow2Error:  # never raised directly (spec.errors)
        raise errors.CorruptionError(message)
    raise cls(message)


def _reap(proc: subprocess.Popen[bytes], files: list[Any]) -> None:
    """Kill the worker's process group (whatever the adapter started too), wait for the
    worker and close every descriptor the harness holds for it. Idempotent; also run by the
    garbage collector should a Worker be dropped unclosed."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(5)
    for f in files:
        with contextlib.suppress(Exception):
            f.close()


class Worker:
    """One worker process for one adapter (``spec``: what ``--readers``/``--targets`` name).
    ``name`` is what messages call it. Use as a context manager, or call ``close``."""

    def __init__(self, name: str, limits: Limits | None = None) -> None:
        self.name = name
        self.limits = limits or Limits.from_env()
        self.dead: AdapterFailed | None = None
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker, closed by _reap
        env = dict(os.environ)
        # The worker resolves modules as the harness does (a py: adapter in a test module,
        # a package on the harness's sys.path).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "difftest.adapters.worker", str(self.limits.memory_mib << 20)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, env=env,
            start_new_session=True)  # its own process group: one kill ends everything it started
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._in, False)  # a worker that stops reading must not block us
        os.set_blocking(self._out, False)
        self._finalizer = weakref.finalize(self, _reap, self.proc,
                                           [self.proc.stdin, self.proc.stdout, self._err])

    # -- requests ----------------------------------------------------------------------------
    def request(self, *msg: Any) -> tuple[Any, ...]:
        if self.dead is not None:
            raise AdapterFailed(self.dead.finding_class, f"{self.name} is gone ({self.dead.detail})")
        deadline = time.monotonic() + self.limits.seconds
        try:
            self._send(frame(msg), deadline)
            reply = self._receive(deadline)
        except AdapterFailed as e:
            self.dead = e
            self._finalizer()
            raise
        if reply[0] == "raise":
            _raise(*reply[1:])
        if reply[0] == "fail":
            if reply[1] != "error":  # memory, crash: the worker's state is not to be trusted
                self.dead = AdapterFailed(reply[1], f"{self.name}: {reply[2]}")
                self._finalizer()
            raise AdapterFailed(reply[1], f"{self.name}: {reply[2]}")
        return reply

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        poller = select.poll()  # not select(): harness descriptors may be numbered above 1024
        poller.register(fd, event | select.POLLHUP | select.POLLERR)
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            self._finalizer()
            raise AdapterFailed("hang", f"{self.name} gave no answer within {self.limits.seconds:g} s")

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            self._wait(self._in, select.POLLOUT, deadline)
            try:
                n = os.write(self._in, view)
            except BlockingIOError:
                continue
            except (BrokenPipeError, OSError):
                raise self._died() from None
            view = view[n:]

    def _read(self, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self._wait(self._out, select.POLLIN, deadline)
            try:
                chunk = os.read(self._out, min(n - len(buf), 1 << 20))
            except BlockingIOError:
                continue
            if not chunk:
                raise self._died()
            buf += chunk
        return bytes(buf)

    def _receive(self, deadline: float) -> tuple[Any, ...]:
        n = HEADER.unpack(self._read(HEADER.size, deadline))[0]
        reply = _Unpickler(io.BytesIO(self._read(n, deadline))).load()
        assert isinstance(reply, tuple)
        return reply

    def _died(self) -> AdapterFailed:
        """The worker closed its end: classify why from its exit status and stderr."""
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        tail = self.stderr_tail()  # before the reaping closes the file
        self._finalizer()
        if any(s in tail for s in OUT_OF_MEMORY):
            return AdapterFailed("memory", f"{self.name} ran out of memory ({self.limits.memory_mib} MiB)")
        if code is not None and code < 0:
            how = f"killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        lines = [line for line in tail.splitlines() if line.strip()]
        # "Fatal Python error: Segmentation fault" (faulthandler) says more than the stack.
        last = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
        said = f" ({last.strip()[:160]})" if last else ""
        return AdapterFailed("crash", f"{self.name} died: {how}{said}")

    def stderr_tail(self, n: int = 4096) -> str:
        with contextlib.suppress(ValueError, OSError):
            self._err.seek(0, os.SEEK_END)
            size = self._err.tell()
            self._err.seek(max(0, size - n))
            return self._err.read().decode("utf-8", "replace")
        return ""

    # -- the adapter ---------------------------------------------------------------------------
    def load(self, spec: str) -> Remote:
        """Import ``spec`` in the worker; the adapter object, with its declared
        ``unsupported`` values and ``open_params`` (see worker.load) as attributes."""
        info = self.request("load", spec)[1]
        remote = Remote(self, 0)
        object.__setattr__(remote, "unsupported_values", info["unsupported"])
        object.__setattr__(remote, "open_params", info["open_params"])
        return remote

    def close(self) -> None:
        """Ask the worker to quit, then make sure (kill, reap, close descriptors)."""
        if self.dead is None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self._send(frame(("quit",)), time.monotonic() + 1.0)
                self.proc.wait(1.0)
        self._finalizer()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Remote:
    """An object living in a worker. Attribute reads ask the worker; a callable attribute
    becomes a method whose calls are requests (which callables are methods is remembered).
    Arguments must be builtin data; results are builtin data or further Remotes."""

    def __init__(self, worker: Worker, handle: int) -> None:
        object.__setattr__(self, "_worker", worker)
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_methods", {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        methods: dict[str, Callable[..., Any]] = self._methods
        if name in methods:
            return methods[name]
        reply = self._worker.request("get", self._handle, name)
        if reply[0] == "method":
            def call(*args: Any, **kwargs: Any) -> Any:
                return self._result(self._worker.request("call", self._handle, name, args, kwargs))
            methods[name] = call
            return call
        return self._result(reply)

    def _result(self, reply: tuple[Any, ...]) -> Any:
        return Remote(self._worker, reply[1]) if reply[0] == "obj" else reply[1]

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a remote object's {name} cannot be set from the harness")

    def __enter__(self) -> Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<remote object {self._handle} in {self._worker.name}'s worker>"


_CAPABILITIES: dict[str, tuple[dict[str, list[Any]], list[str] | None]] = {}


def capabilities(spec: str, limits: Limits | None = None) -> tuple[dict[str, list[Any]], list[str] | None]:
    """``spec``'s ``UNSUPPORTED`` declaration and its open() keywords, asked of a worker
    once per process. AdapterFailed when it cannot even be loaded."""
    if spec not in _CAPABILITIES:
        with Worker(spec, limits) as w:
            r = w.load(spec)
            _CAPABILITIES[spec] = (r.unsupported_values, r.open_params)
    return _CAPABILITIES[spec]
