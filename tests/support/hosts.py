"""A second libvirt host on this machine (scripts/second-libvirtd.sh), for migration tests.

Use the session fixture by importing it into a test module:

    from tests.support.hosts import second_libvirtd  # noqa: F401
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "second-libvirtd.sh"
DEFAULT_NAME = "vmportal-hostb"
# libvirtd's first start probes QEMU's capabilities (about 10 s here); later starts are quick.
START_TIMEOUT = 120.0
# A unix socket path is at most 107 bytes; <dir>/sock/libvirt-sock must fit.
_MAX_DIR_LENGTH = 80


@dataclass
class SecondHost:
    """A running second libvirtd: its URI, host name and state folder."""

    uri: str
    name: str
    dir: Path
    _stopped: bool = field(default=False, repr=False)

    def stop(self) -> None:
        """Destroy its guests and stop its daemons (its folder stays). Idempotent."""
        if self._stopped:
            return
        _run_script("stop", str(self.dir))
        self._stopped = True


def _run_script(*args: str, timeout: float = START_TIMEOUT) -> str:
    proc = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{SCRIPT.name} {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout.strip()


def second_host(tmp_dir: Path, name: str = DEFAULT_NAME) -> SecondHost:
    """Start (or find running) a second libvirtd keeping its state in tmp_dir."""
    tmp_dir = Path(tmp_dir).resolve()
    if len(str(tmp_dir)) > _MAX_DIR_LENGTH:
        raise ValueError(f"{tmp_dir} is too long for the daemon's socket path")
    uri = _run_script("start", name, str(tmp_dir))
    return SecondHost(uri=uri, name=name, dir=tmp_dir)


def unavailable_reason() -> str | None:
    """Why a second libvirtd cannot run here, or None."""
    if os.geteuid() != 0:
        return "a second libvirtd needs root (mount namespaces)"
    for tool in ("unshare", "libvirtd", "virtlogd", "virsh"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.fixture(scope="session")
def second_libvirtd() -> Iterator[SecondHost]:
    """A second libvirt host for the session, stopped and removed afterwards."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    # Short and outside pytest's deep temp tree: the socket path has a length limit.
    folder = Path(tempfile.mkdtemp(prefix="vmportal-hostb-", dir="/tmp"))
    try:
        host = second_host(folder)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        _run_script("purge", str(folder))
        pytest.fail(f"second libvirtd did not start: {exc}")
    try:
        yield host
    finally:
        host.stop()
        shutil.rmtree(folder, ignore_errors=True)
