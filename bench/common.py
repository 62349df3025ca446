"""Small shared pieces: statistics, process memory, deadlines."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "var" / "bench"


def p95(samples: Sequence[float]) -> float:
    """The 95th percentile by nearest rank (the largest sample when there are fewer than 20)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def median(samples: Sequence[float]) -> float:
    """The median; a ValueError for no samples."""
    if not samples:
        raise ValueError("no samples")
    return float(statistics.median(samples))


def wait_for(predicate: Callable[[], T], *, timeout: float, what: str, every: float = 0.02) -> T:
    """Poll predicate until it returns something truthy; a RuntimeError naming `what` if late."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def process_tree(pids: Iterable[int]) -> list[int]:
    """The given processes and all their descendants."""
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo += _children(pid)
    return seen


def rss_kb(pids: Iterable[int]) -> int:
    """Resident memory (VmRSS, KiB) of the processes and their descendants together."""
    total = 0
    for pid in process_tree(pids):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def load_average() -> tuple[float, float, float]:
    """The machine's 1, 5 and 15 minute load averages (other work skews the figures)."""
    return os.getloadavg()
