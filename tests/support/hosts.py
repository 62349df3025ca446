"""A second libvirt host for this test process (scripts/second-libvirtd.sh), for migration tests.

Host B is a libvirtd in a mount namespace of its own, beside this process's own daemon (host A,
tests/support/isolation.py), with its own host UUID and state. Its folder lives in the process's
folder and is kept between runs, so libvirt's QEMU capability cache makes its next start quick.
Use the session fixture by importing it into a test module:

    from tests.support.hosts import second_libvirtd  # noqa: F401
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.isolation import FOLDER, SCRIPT, run_script
from tests.support.libvirt import console_dir

__all__ = ["SCRIPT", "SecondHost", "second_host", "second_libvirtd"]

DEFAULT_NAME = "vmportal-hostb"
HOST_B_DIR = FOLDER / "hostb"
# A unix socket path is at most 107 bytes: <dir>/sock/libvirt-sock must fit.
_SOCKET_TAIL = len("/sock/libvirt-sock")
_MAX_SOCKET = 107


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
        run_script("stop", str(self.dir))
        self._stopped = True


def second_host(tmp_dir: Path, name: str = DEFAULT_NAME) -> SecondHost:
    """Start (or find running) a second libvirtd keeping its state in tmp_dir."""
    tmp_dir = Path(tmp_dir).resolve()
    if len(str(tmp_dir)) + _SOCKET_TAIL > _MAX_SOCKET:
        raise ValueError(f"{tmp_dir} is too long for the daemon's socket path")
    # Its guests' serial consoles are its own, as on a host of its own: the folder the portal
    # names in the domain XML is a private copy (tmp_dir/private/...) inside its namespace.
    uri = run_script("start", name, str(tmp_dir), private=(console_dir(),))
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
    """Host B for the session, in this process's folder; stopped afterwards (its folder stays)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    run_script("stop", str(HOST_B_DIR))  # a daemon an earlier run left behind
    # What that run defined (guests, pools, networks) goes; the capability cache stays.
    for left in ("etc/qemu", "etc/storage", "lib-qemu"):
        shutil.rmtree(HOST_B_DIR / left, ignore_errors=True)
    try:
        host = second_host(HOST_B_DIR)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        run_script("stop", str(HOST_B_DIR))
        pytest.fail(f"second libvirtd did not start: {exc}")
    try:
        yield host
    finally:
        host.stop()
