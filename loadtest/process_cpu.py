"""A server's CPU time as the kernel counts it, read at the same window boundaries as its
counters: the cost of a request in CPU seconds, where throughput alone would hide a server that
buys its rate with more cores.

A server is its process and every process below it: Triton runs a Python-backend model in a
child process (`triton_python_backend_stub`), and leaving that out would flatter it.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: int, proc: Path) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and ')')."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _children(proc: Path) -> dict[int, list[int]]:
    below: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name), proc)
        if fields is not None and len(fields) > 1:
            below.setdefault(int(fields[1]), []).append(int(entry.name))
    return below


def process_tree_cpu_s(pid: int, proc: Path = PROC) -> float | None:
    """User + system CPU seconds of `pid` and its live descendants, all threads; None when
    `pid` is gone or /proc cannot be read (not Linux)."""
    if _stat_fields(pid, proc) is None:
        return None
    below = _children(proc)
    ticks = 0
    waiting = [pid]
    while waiting:
        current = waiting.pop()
        fields = _stat_fields(current, proc)
        if fields is None or len(fields) < 13:
            continue
        # utime and stime: fields 14 and 15 of stat(5), 11 and 12 after the command name.
        ticks += int(fields[11]) + int(fields[12])
        waiting.extend(below.get(current, ()))
    return ticks / CLOCK_TICKS
