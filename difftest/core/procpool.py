"""Tasks on forked processes, a fixed number at a time, for the campaign's shards
(campaign.run_shards) and the conformance matrix's cells (conformance/matrix.py).

Each task runs in a process of its own and reports its result and its progress events over
one queue. A process that ends without reporting (killed, or exiting early) is noticed on the
next pass of the loop, after the queue has been drained of what it sent, and is reported as
died with its exit status: no task is lost, none is reported twice, and no process outlives
the pool (an interrupted pool terminates the ones still running).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import signal
from collections.abc import Callable
from typing import Any

POLL_SECONDS = 0.2


class QueuedEvents:
    """A campaign's on_event that sends events to a parent process over ``q``, steps in
    batches of 20 (one queue message per step would cost more than the step); call
    ``flush`` before the last message."""

    def __init__(self, q: Any) -> None:
        self.q = q
        self.pending = 0

    def __call__(self, kind: str, value: Any) -> None:
        if kind == "step":
            self.pending += 1
            if self.pending >= 20:
                self.flush()
        else:
            self.q.put((kind, value))

    def flush(self) -> None:
        if self.pending:
            self.q.put(("step", self.pending))
            self.pending = 0


def exit_text(exitcode: int | None) -> str:
    """A dead process's exit status in words ("exit 3", "signal 9")."""
    if exitcode is not None and exitcode < 0:
        return f"signal {-exitcode}"
    return f"exit {exitcode}"


def run_forked(count: int, task: Callable[[int, QueuedEvents], Any], jobs: int, *,
               on_result: Callable[[int, Any], None],
               on_died: Callable[[int, str], None],
               on_event: Callable[[str, Any], None] | None = None,
               on_start: Callable[[int], None] | None = None,
               may_start: Callable[[], bool] | None = None) -> None:
    """Run ``task(i, events)`` for i in range(count), ``jobs`` at a time, each in a forked
    process (which sees the parent's state as it was when it started). ``on_result(i, value)``
    gets what a task returned, ``on_died(i, why)`` a task whose process ended without
    returning; tasks start in order while ``may_start()`` says so (a time budget), and the
    ones never started are simply not run."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    waiting = list(range(count))
    running: dict[int, Any] = {}  # task -> its process, until it has ended
    unreported: set[int] = set()  # started, neither result nor death reported yet

    def handle(msg: tuple[Any, ...]) -> None:
        if msg[0] == "result":
            _, i, value = msg
            if i in unreported:
                unreported.discard(i)
                on_result(i, value)
        elif on_event:
            on_event(msg[0], msg[1])

    try:
        while waiting or unreported:
            if waiting and may_start is not None and not may_start():
                waiting.clear()  # the budget is spent: wait for the running tasks only
            while waiting and len(running) < jobs:
                i = waiting.pop(0)
                p = ctx.Process(target=_child, args=(task, i, q), daemon=True)
                p.start()
                running[i] = p
                unreported.add(i)
                if on_start:
                    on_start(i)
            with contextlib.suppress(queue.Empty):
                handle(q.get(timeout=POLL_SECONDS))
            ended = [i for i, p in running.items() if not p.is_alive()]
            if not ended:
                continue
            _drain(q, handle)  # what an ended process sent is in the pipe by now
            for i in ended:
                p = running.pop(i)
                p.join()
                if i in unreported:
                    unreported.discard(i)
                    on_died(i, exit_text(p.exitcode))
    finally:
        for p in running.values():  # interrupted: no task outlives the pool
            p.terminate()
            p.join()


def _drain(q: Any, handle: Callable[[tuple[Any, ...]], None]) -> None:
    while True:
        try:
            handle(q.get_nowait())
        except queue.Empty:
            return


def _child(task: Callable[[int, QueuedEvents], Any], i: int, q: Any) -> None:
    # SIGTERM (the pool terminating) unwinds the task through its finally blocks (temporary
    # folders, engines' processes) instead of killing it outright. Ctrl-C reaches every
    # process of the terminal's group: the task unwinds the same way and ends quietly, the
    # parent alone reporting the interruption. (SIGINT is not ignored here: its being ignored
    # would pass on to qemu-io and the readers' workers through exec.)
    signal.signal(signal.SIGTERM, _raise_exit)
    ev = QueuedEvents(q)
    try:
        value = task(i, ev)
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    ev.flush()
    q.put(("result", i, value))


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)
