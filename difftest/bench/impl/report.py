"""How ``qcow2lab bench impl`` prints its rows: one line per row as it finishes, a table at
the end, or JSON (with the date, nproc and the disk, as the README table wants them)."""

from __future__ import annotations

import datetime
import os
import subprocess
from typing import Any

from rich.table import Table

from difftest.bench.impl.common import RowResult


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def line(r: RowResult) -> str:
    mark = "[green]PASS[/green]" if r.passed else "[red]MISS[/red]"
    return (f"{mark} {r.row}: {r.ours_label} {_fmt(r.ours)} / {r.peer_label} {_fmt(r.peer)} {r.unit}"
            f" -> {r.ratio:.2f} (target {r.target}) {r.note}")


def machine() -> dict[str, Any]:
    try:
        disk = subprocess.run(["df", "--output=source,fstype", "."], capture_output=True, text=True,
                              check=True).stdout.split("\n")[1].strip()
    except (OSError, subprocess.CalledProcessError, IndexError):
        disk = "?"
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(), "disk": disk,
            "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}  # the machine is shared


def as_json(results: list[RowResult]) -> dict[str, Any]:
    return {"machine": machine(), "rows": [r.as_dict() for r in results]}


def table(results: list[RowResult], rounds: int) -> Table:
    m = machine()
    t = Table(title=f"qcow2lab bench impl: {m['date']}, nproc {m['nproc']}, disk {m['disk']}, "
                    f"load {m['load']} (at the end), medians of {rounds} rounds")
    for col in ("row", "ours", "peer", "unit", "ratio", "target", "verdict", "counted I/O / notes"):
        t.add_column(col, overflow="fold")
    for r in results:
        counts = ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in r.counts.items()
                           if not isinstance(v, dict))
        t.add_row(r.row, f"{r.ours_label}: {_fmt(r.ours)}", f"{r.peer_label}: {_fmt(r.peer)}", r.unit,
                  f"{r.ratio:.2f}", r.target, "PASS" if r.passed else "MISS",
                  "; ".join(x for x in (r.note, counts) if x))
    return t
