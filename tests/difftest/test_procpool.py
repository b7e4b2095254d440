"""difftest/core/procpool.py: tasks on forked processes, the pool under the campaign's
shards and the conformance matrix's cells. No task is lost or reported twice, a death is
noticed while others keep talking, and a process that ends early without a word is a death,
not a hang."""

from __future__ import annotations

import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from difftest.core.procpool import PipedEvents, run_forked


def _run(task: Any, count: int, jobs: int, **kw: Any) -> tuple[dict[int, Any], dict[int, str], list[Any]]:
    results: dict[int, Any] = {}
    died: dict[int, str] = {}
    events: list[Any] = []

    def on_result(i: int, v: Any) -> None:
        assert i not in results and i not in died
        results[i] = v

    def on_died(i: int, why: str) -> None:
        assert i not in results and i not in died
        died[i] = why

    run_forked(count, task, jobs, on_result=on_result, on_died=on_died,
               on_event=lambda k, v: events.append((k, v)), **kw)
    return results, died, events


def test_results_deaths_and_events_each_once() -> None:
    def task(i: int, ev: PipedEvents) -> int:
        for _ in range(45):
            ev("step", None)
        ev("example", i)
        if i == 1:
            sys.exit(0)  # ends early and quietly: a death, never a wait for its report
        if i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return i * 10

    results, died, events = _run(task, 5, 2)
    assert results == {0: 0, 3: 30, 4: 40}
    assert died == {1: "exit 0", 2: "signal 9"}
    # A task killed outright may lose what its queue had not sent yet; the others' all came.
    assert {0, 1, 3, 4} <= {v for k, v in events if k == "example"}
    # Steps come in batches of 20, and the finished tasks' remainders are flushed.
    assert sum(v for k, v in events if k == "step") >= 3 * 45


def test_a_task_killed_in_the_middle_of_a_message_is_a_death_and_holds_nothing() -> None:
    """Task 1 dies having written only the start of a message (its length says 1 MiB); the
    others, started before and after it, still report. With one queue shared by every task
    a task killed while holding the queue's write lock blocked all the others for good."""
    def task(i: int, ev: PipedEvents) -> int:
        ev("example", i)
        if i == 1:
            os.write(ev.conn.fileno(), struct.pack("!i", 1 << 20) + b"torn")
            os.kill(os.getpid(), signal.SIGKILL)
        return i

    results, died, events = _run(task, 4, 2)
    assert results == {0: 0, 2: 2, 3: 3} and died == {1: "signal 9"}
    assert {v for k, v in events if k == "example"} == {0, 1, 2, 3}


def test_a_death_is_noticed_while_another_task_keeps_sending(tmp_path: Path) -> None:
    """Task 0 sends events until task 2 has run; task 2 can start only once task 1's death
    frees its slot (jobs=2). A pool that looked for deaths only when the queue was quiet
    would wait for task 0's own 30 s limit."""
    flag = tmp_path / "two-ran"

    def task(i: int, ev: PipedEvents) -> int:
        if i == 1:
            os._exit(5)
        if i == 2:
            flag.touch()
        deadline = time.monotonic() + 30
        while i == 0 and not flag.exists() and time.monotonic() < deadline:
            ev("example", 0)
            time.sleep(0.01)
        return i

    t0 = time.monotonic()
    results, died, _ = _run(task, 3, 2)
    assert results == {0: 0, 2: 2} and died == {1: "exit 5"}
    assert time.monotonic() - t0 < 15


def test_tasks_not_started_under_a_spent_budget_are_not_reported() -> None:
    budget = {"left": 2}

    def may_start() -> bool:
        budget["left"] -= 1
        return budget["left"] >= 0

    results, died, _ = _run(lambda i, ev: i, 10, 1, may_start=may_start)
    assert 1 <= len(results) < 10 and not died and set(results) == set(range(len(results)))


def test_ctrl_c_ends_a_command_with_130_and_no_traceback(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from difftest.cli import conformance, main

    def interrupted(_args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(conformance, "run", interrupted)
    assert main(["conformance", "--readers", "dissect"]) == 130
    assert capsys.readouterr().err == "qcow2lab: interrupted\n"
