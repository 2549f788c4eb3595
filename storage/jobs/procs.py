"""Is a process still the one we started? PIDs are reused, so a run stores its worker's pid *and* the
process start time, and both must match."""

from __future__ import annotations

import os
from pathlib import Path


def start_time(pid: int) -> float | None:
    """The process's start time in clock ticks since boot (Linux), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None if not _exists(pid) else -1.0
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has finished its work
        return None
    return float(fields[19])


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_alive(pid: int | None, started: float | None) -> bool:
    if not pid:
        return False
    now = start_time(pid)
    if now is None:
        return False
    return started is None or now < 0 or now == started
