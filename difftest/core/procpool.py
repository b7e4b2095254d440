"""Tasks on forked processes, a fixed number at a time, for the campaign's shards
(campaign.run_shards) and the conformance matrix's cells (conformance/matrix.py).

Each task runs in a process of its own and reports its result and its progress events over
a pipe of its own, which only that process writes: a task killed in the middle of a message
(SIGKILL, the OOM killer) leaves a torn message in its own pipe and nothing held. (One
multiprocessing queue for all of them shared a write lock, which a killed task could die
holding: every other task then blocked on it forever, and so did the pool.) A process that
ends without reporting (killed, or exiting early) is noticed once it has ended and its pipe
has been drained of what it sent, and is reported as died with its exit status: no task is
lost, none is reported twice, and no process outlives the pool (an interrupted pool
terminates the ones still running).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

POLL_SECONDS = 0.2


class PipedEvents:
    """A campaign's on_event that sends events to the parent process over ``conn``, steps
    in batches of 20 (one message per step would cost more than the step); call ``flush``
    before the last message."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pending = 0

    def __call__(self, kind: str, value: Any) -> None:
        if kind == "step":
            self.pending += 1
            if self.pending >= 20:
                self.flush()
        else:
            self.conn.send((kind, value))

    def flush(self) -> None:
        if self.pending:
            self.conn.send(("step", self.pending))
            self.pending = 0


def exit_text(exitcode: int | None) -> str:
    """A dead process's exit status in words ("exit 3", "signal 9")."""
    if exitcode is not None and exitcode < 0:
        return f"signal {-exitcode}"
    return f"exit {exitcode}"


def run_forked(count: int, task: Callable[[int, PipedEvents], Any], jobs: int, *,
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
    waiting = list(range(count))
    running: dict[int, tuple[Any, Connection]] = {}  # task -> its process and pipe, until it has ended
    reported: set[int] = set()

    def receive(i: int, conn: Connection) -> bool:
        """Handle what task i has sent so far; False once its pipe is at its end (the
        process has closed it, or died, perhaps in the middle of a message)."""
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "result":
                    if i not in reported:
                        reported.add(i)
                        on_result(i, msg[1])
                elif on_event:
                    on_event(msg[0], msg[1])
        except (EOFError, OSError):
            return False
        return True

    try:
        while waiting or running:
            if waiting and may_start is not None and not may_start():
                waiting.clear()  # the budget is spent: wait for the running tasks only
            while waiting and len(running) < jobs:
                i = waiting.pop(0)
                theirs_r, theirs_w = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_child, args=(task, i, theirs_w), daemon=True)
                p.start()
                # Only the child writes its pipe: a copy here would keep a torn message's
                # read waiting for bytes no one will write, and would pass to later children.
                theirs_w.close()
                running[i] = (p, theirs_r)
                if on_start:
                    on_start(i)
            wait([c for _, c in running.values()] + [p.sentinel for p, _ in running.values()],
                 timeout=POLL_SECONDS)
            for i, (p, conn) in list(running.items()):
                if receive(i, conn) and p.is_alive():
                    continue
                p.join()
                receive(i, conn)  # what it sent before it ended is all in the pipe by now
                conn.close()
                del running[i]
                if i not in reported:
                    reported.add(i)
                    on_died(i, exit_text(p.exitcode))
    finally:
        for p, conn in running.values():  # interrupted: no task outlives the pool
            p.terminate()
            p.join()
            conn.close()


def _child(task: Callable[[int, PipedEvents], Any], i: int, conn: Connection) -> None:
    # SIGTERM (the pool terminating) unwinds the task through its finally blocks (temporary
    # folders, engines' processes) instead of killing it outright. Ctrl-C reaches every
    # process of the terminal's group: the task unwinds the same way and ends quietly, the
    # parent alone reporting the interruption. (SIGINT is not ignored here: its being ignored
    # would pass on to qemu-io and the readers' workers through exec.)
    signal.signal(signal.SIGTERM, _raise_exit)
    ev = PipedEvents(conn)
    try:
        value = task(i, ev)
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None
    ev.flush()
    conn.send(("result", value))
    conn.close()


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)
