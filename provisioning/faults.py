"""Fault injection for the crash tests: a process dies at a named checkpoint, once.

Inert unless VMPORTAL_FAULTS names checkpoints (comma-separated) and VMPORTAL_FAULTS_DIR is a
folder where each fired checkpoint leaves a mark, so a restarted worker does not die again.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path


def checkpoint(name: str) -> None:
    """Kill this process with SIGKILL here if the crash tests asked for it."""
    wanted = os.environ.get("VMPORTAL_FAULTS")
    if not wanted or name not in wanted.split(","):
        return
    marks = Path(os.environ.get("VMPORTAL_FAULTS_DIR", "/tmp"))
    mark = marks / f"fired-{name.replace(':', '_')}"
    try:
        mark.touch(exist_ok=False)
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
