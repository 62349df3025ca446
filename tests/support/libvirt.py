"""This test process's libvirt: its URIs, and its daemon stopped and started by the fault tests.

The daemon is started by tests/support/isolation.py before any test runs; every test and every
process a test starts talks to it, never to the machine's own libvirtd.
"""

from __future__ import annotations

import os
from pathlib import Path

# QEMU_URI: this process's QEMU driver. TEST_URI: libvirt's test driver inside the same daemon,
# its state shared by a test and the processes it starts.
from tests.support.isolation import FOLDER, QEMU_URI, TEST_URI, run_script

__all__ = ["QEMU_URI", "TEST_POOL", "TEST_URI", "console_dir", "start_libvirtd", "stop_libvirtd"]
# The test driver's own storage pool.
TEST_POOL = "default-pool"
HOST_DIR = FOLDER / "host"


def stop_libvirtd() -> None:
    """Stop the daemon only, as a restart on a real host would: QEMU guests keep running."""
    run_script("daemon-stop", str(HOST_DIR))


def start_libvirtd() -> None:
    """Start the daemon again after stop_libvirtd (no-op while it runs); returns once it answers."""
    run_script("daemon-start", str(HOST_DIR))


def libvirtd_pid() -> int | None:
    """The daemon's process id, or None while it is stopped."""
    pidfile = HOST_DIR / "libvirtd.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def console_dir() -> Path:
    """Where the guests of this process's daemon log their serial consoles."""
    return Path(os.environ["VMPORTAL_CONSOLE_LOG_DIR"])
