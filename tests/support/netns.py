"""A libvirtd whose guests' networks exist only in a network namespace of its own.

scripts/second-libvirtd.sh with SECOND_LIBVIRTD_NETNS=1 starts it; its guests' bridges and
DHCP servers live in that namespace, and `NetnsHost.run` runs a client (ssh) in there too, so
nothing a test sends to a guest leaves it. One per test process (under its own folder).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.isolation import FOLDER, SCRIPT

NETNS_DIR = FOLDER / "debnet"


@dataclass(frozen=True)
class NetnsHost:
    """A libvirtd whose guests' networks exist only in its own network namespace."""

    uri: str
    dir: Path

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run argv inside the daemon's network namespace."""
        return subprocess.run(
            [str(SCRIPT), "netns-exec", str(self.dir), "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _script(*args: str, netns: bool = False) -> str:
    env = {**os.environ, "SECOND_LIBVIRTD_PRIVATE": "", "SECOND_LIBVIRTD_NETNS": "1" * netns}
    proc = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=180, check=False, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _forget_state(folder: Path) -> None:
    # What an earlier run defined goes; libvirt's QEMU capability cache stays.
    for left in ("etc/qemu", "etc/storage", "lib-qemu"):
        shutil.rmtree(folder / left, ignore_errors=True)


@pytest.fixture(scope="session")
def netns_host() -> Iterator[NetnsHost]:
    if os.geteuid() != 0:
        pytest.skip("a libvirtd in a network namespace needs root")
    _script("stop", str(NETNS_DIR))
    _forget_state(NETNS_DIR)
    uri = _script("start", "vmportal-debnet", str(NETNS_DIR), netns=True)
    try:
        yield NetnsHost(uri=uri, dir=NETNS_DIR)
    finally:
        _script("stop", str(NETNS_DIR))
        _forget_state(NETNS_DIR)
