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

import atexit
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
    """Kill a worker's process group, wait for it and close every descriptor the harness
    holds for it. Idempotent; also run by the garbage collector and at exit."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(5)
    for f in files:
        with contextlib.suppress(Exception):
            f.close()


class _Channel:
    """One worker process (worker.py) and the harness's three descriptors for it (two
    pipes and a stderr file), with the framed, deadline-bound request/reply."""

    def __init__(self, name: str, limits: Limits) -> None:
        self.name = name
        self.limits = limits
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the worker, closed by _reap
        env = dict(os.environ)
        # The worker resolves modules as the harness does (a py: adapter in a test module,
        # a package on the harness's sys.path).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "difftest.adapters.worker", str(limits.memory_mib << 20)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env,
            start_new_session=True)  # its own process group: one kill ends everything it started
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._in, False)  # a worker that stops reading must not block us
        os.set_blocking(self._out, False)
        self.info: dict[str, Any] = {}
        self.busy = False
        """A session is running on this worker (Worker.load to its end)."""
        self.kill = weakref.finalize(self, _reap, self.proc, [self.proc.stdin, self.proc.stdout, self.err])

    def exchange(self, msg: tuple[Any, ...], seconds: float) -> tuple[Any, ...]:
        deadline = time.monotonic() + seconds
        self.send(msg, deadline)
        return self.receive(deadline)

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        poller = select.poll()  # not select(): harness descriptors may be numbered above 1024
        poller.register(fd, event | select.POLLHUP | select.POLLERR)
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise AdapterFailed("hang", f"{self.name} gave no answer within {self.limits.seconds:g} s")

    def send(self, msg: tuple[Any, ...], deadline: float) -> None:
        view = memoryview(frame(msg))
        while view:
            self._wait(self._in, select.POLLOUT, deadline)
            try:
                n = os.write(self._in, view)
            except BlockingIOError:
                continue
            except OSError:
                raise self.died() from None
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
                raise self.died()
            buf += chunk
        return bytes(buf)

    def receive(self, deadline: float) -> tuple[Any, ...]:
        n = HEADER.unpack(self._read(HEADER.size, deadline))[0]
        try:
            reply = _Unpickler(io.BytesIO(self._read(n, deadline))).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise AdapterFailed("crash", f"{self.name} sent a garbled reply ({e})") from None
        assert isinstance(reply, tuple)
        return reply

    def died(self, code: int | None = None, since: int = 0) -> AdapterFailed:
        """Why the process serving us ended (``code``: its exit code when the worker
        reported it; else this worker's own), from the code and its stderr."""
        if code is None:
            try:
                code = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                code = None
        tail = self.stderr_tail(since)
        if any(s in tail for s in OUT_OF_MEMORY):
            return AdapterFailed("memory", f"{self.name} ran out of memory ({self.limits.memory_mib} MiB)")
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else \
            f"exited with status {code}"
        lines = [line for line in tail.splitlines() if line.strip()]
        # "Fatal Python error: Segmentation fault" (faulthandler) says more than the stack.
        last = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
        said = f" ({last.strip()[:160]})" if last else ""
        return AdapterFailed("crash", f"{self.name} died: {how}{said}")

    def stderr_size(self) -> int:
        with contextlib.suppress(ValueError, OSError):
            return self.err.seek(0, os.SEEK_END)
        return 0

    def stderr_tail(self, since: int = 0, n: int = 4096) -> str:
        with contextlib.suppress(ValueError, OSError):
            size = self.err.seek(0, os.SEEK_END)
            self.err.seek(max(since, size - n))
            return self.err.read().decode("utf-8", "replace")
        return ""


_LOADED: dict[tuple[int, str, Limits], list[_Channel]] = {}
"""Workers with an adapter loaded, by (harness process, adapter, limits): a shard process
forked from the campaign's parent starts its own rather than share the parent's pipes. A
worker serves one session at a time (it waits for it, and the session reads the same
pipe), so overlapping sessions of one adapter get a worker each; one idle worker per key
is kept when a session ends."""


def _loaded(spec: str, name: str, limits: Limits, *, idle: bool = True) -> _Channel:
    """A worker that has imported ``spec`` and, with ``idle``, serves no session now;
    started (and the import run, under the limits) when there is none."""
    key = (os.getpid(), spec, limits)
    pool = _LOADED.setdefault(key, [])
    pool[:] = [ch for ch in pool if ch.kill.alive and ch.proc.poll() is None]
    for ch in pool:
        if not (idle and ch.busy):
            return ch
    ch = _Channel(name, limits)
    try:
        reply = ch.exchange(("load", spec), limits.seconds)
        if reply[0] == "raise":
            _raise(*reply[1:])
        if reply[0] == "fail":
            raise AdapterFailed(reply[1], f"{name}: {reply[2]}")
    except BaseException:
        ch.kill()
        raise
    ch.info = reply[1]
    pool.append(ch)
    return ch


def _discard(ch: _Channel) -> None:
    for pool in _LOADED.values():
        if ch in pool:
            pool.remove(ch)
    ch.kill()


def _release(ch: _Channel) -> None:
    """A session of ``ch`` ended cleanly: ``ch`` is free, or ended if another is."""
    ch.busy = False
    for pool in _LOADED.values():
        if ch in pool and any(o is not ch and not o.busy for o in pool):
            _discard(ch)


@atexit.register
def _end_all() -> None:
    for pool in list(_LOADED.values()):
        for ch in list(pool):
            ch.kill()


def _end_session(ch: _Channel | None, child: int | None) -> None:
    """Kill a session that did not end cleanly, and its worker with it: the stream between
    them may hold half a reply (garbage-collector path of an unclosed Worker too)."""
    if child is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child, signal.SIGKILL)
    if ch is not None:
        _discard(ch)


class Worker:
    """One session of one adapter: a process forked, for this session alone, from a worker
    that has imported the adapter once (worker.py, ``_session``); so every example starts
    from the adapter's freshly imported state, and whatever it opens, leaks or breaks ends
    with the session. ``name`` is what messages call it. Use as a context manager, or call
    ``close``; ``load`` starts the session."""

    def __init__(self, name: str, limits: Limits | None = None) -> None:
        self.name = name
        self.limits = limits or Limits.from_env()
        self.dead: AdapterFailed | None = None
        self.channel: _Channel | None = None
        self.child: int | None = None
        self._since = 0
        self._finalizer: weakref.finalize | None = None

    def load(self, spec: str) -> Remote:
        """Start a session of ``spec``: the adapter object, with its declared
        ``unsupported_values`` and ``open_params`` (see worker.load) as attributes."""
        ch = _loaded(spec, self.name, self.limits)
        self._since = ch.stderr_size()
        try:
            reply = ch.exchange(("session",), self.limits.seconds)
        except AdapterFailed:
            _discard(ch)
            raise
        ch.busy = True
        self.channel, self.child = ch, int(reply[1])
        self._finalizer = weakref.finalize(self, _end_session, ch, self.child)
        remote = Remote(self, 0)
        object.__setattr__(remote, "unsupported_values", ch.info["unsupported"])
        object.__setattr__(remote, "open_params", ch.info["open_params"])
        return remote

    def request(self, *msg: Any) -> tuple[Any, ...]:
        if self.dead is not None:
            raise AdapterFailed(self.dead.finding_class, f"{self.name} is gone ({self.dead.detail})")
        assert self.channel is not None
        try:
            reply = self.channel.exchange(msg, self.limits.seconds)
        except AdapterFailed as e:
            self._abort(e)
            raise
        if reply[0] == "ended":  # the session's process died; its worker says how
            self._ended(failed := self.channel.died(int(reply[1]), self._since))
            raise failed
        if reply[0] == "raise":
            _raise(*reply[1:])
        if reply[0] == "fail":
            failed = AdapterFailed(reply[1], f"{self.name}: {reply[2]}")
            if reply[1] != "error":  # memory, crash: the session's state is not to be trusted
                self._abort(failed)
            raise failed
        return reply

    def _abort(self, e: AdapterFailed) -> None:
        """The session is not to be trusted: kill it, and its worker (the stream between
        them may be out of step)."""
        self.dead = e
        if self._finalizer is not None:
            self._finalizer()

    def _ended(self, e: AdapterFailed) -> None:
        """The session's process is gone and its worker has reaped it and said so (the
        stream is in step): the worker serves the next session; the reaped id is not
        killed, it may belong to another process by now."""
        self.dead = e
        if self._finalizer is not None:
            self._finalizer.detach()
        if self.channel is not None:
            _release(self.channel)

    def close(self) -> None:
        """End the session: ``("end",)`` and the worker's ``("ended", 0)``; anything else
        (no answer, another status) kills the session and its worker."""
        if self.dead is None and self.channel is not None and self._finalizer is not None \
                and self._finalizer.alive:
            try:
                reply = self.channel.exchange(("end",), min(self.limits.seconds, 5.0))
                if reply[0] == "ended":
                    self._ended(AdapterFailed("crash", "the session is closed"))
                    return
            except AdapterFailed:
                pass
        self._abort(self.dead or AdapterFailed("crash", "the session is closed"))

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


def capabilities(spec: str, limits: Limits | None = None) -> tuple[dict[str, list[Any]], list[str] | None]:
    """``spec``'s ``UNSUPPORTED`` declaration and its open() keywords, as its worker found
    them when it loaded it. AdapterFailed when it cannot even be loaded."""
    info = _loaded(spec, spec, limits or Limits.from_env(), idle=False).info
    return info["unsupported"], info["open_params"]
