"""Each test process gets machine resources of its own: a libvirtd, a Redis and a database.

Loaded as a pytest plugin (`-p tests.support.isolation` in pyproject's addopts) so that it runs
before Django reads its settings: the environment set here at import is what the settings, and
every process a test starts, see. With pytest-xdist each worker (gw0, gw1, ...) is a process
of its own; without it the one process is "main". The xdist controller runs no tests and
starts nothing.

- libvirt: a libvirtd in a mount namespace of its own (scripts/second-libvirtd.sh), so the
  test driver's state (`test+unix:///default?socket=...`) and the QEMU guests
  (`qemu+unix:///system?socket=...`) are this process's alone. Its folder is kept between
  runs (libvirt's QEMU capability cache makes the next start quick) and locked while in use; a
  second run at the same time takes a fresh folder.
- Redis: a redis-server on a free port (pub/sub channels are global to a server, not per
  database number).
- The database: pytest-django names the test database per xdist worker; the SQLite file is
  per process too.
- Files the hypervisor writes and the portal reads (serial console logs, saved memory) live in
  the process's folder, which both sides of the mount namespace see.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "second-libvirtd.sh"
BASE = Path(os.environ.get("VMPORTAL_TEST_BASE", "/var/tmp/vmportal-test"))
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
START_TIMEOUT = 180.0
# A unix socket path is at most 107 bytes: <dir>/sock/libvirt-sock must fit.
_MAX_DIR = 80


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lock(folder: Path) -> IO[str] | None:
    """An exclusive lock on the folder (held while the file stays open), or None if taken."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = (folder / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def _claim_folder() -> tuple[Path, IO[str], bool]:
    """This process's folder, locked, and whether it is a spare to remove at the end.

    The worker's usual folder when free; else a spare (another run uses the usual one).
    Spares left by runs that died are removed here, once nobody holds them.
    """
    BASE.mkdir(parents=True, exist_ok=True)
    for spare in BASE.glob(f"{WORKER}-*"):
        held = _lock(spare)
        if held is not None:
            with contextlib.suppress(Exception):
                run_script("purge", str(spare / "host"), timeout=120)
            shutil.rmtree(spare, ignore_errors=True)
            held.close()
    usual = BASE / WORKER
    lock = _lock(usual)
    if lock is not None:
        return usual, lock, False
    spare = Path(tempfile.mkdtemp(prefix=f"{WORKER}-", dir=BASE))
    lock = _lock(spare)
    assert lock is not None
    return spare, lock, True


def run_script(*args: str, timeout: float = START_TIMEOUT, private: tuple[Path, ...] = ()) -> str:
    """Run scripts/second-libvirtd.sh; its output (a RuntimeError naming its error if it fails).

    private: folders the daemon gets a copy of its own of (SECOND_LIBVIRTD_PRIVATE).
    """
    env = {**os.environ, "SECOND_LIBVIRTD_PRIVATE": ":".join(map(str, private))}
    proc = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{SCRIPT.name} {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout.strip()


FOLDER, _LOCK, _SPARE = _claim_folder()
if len(str(FOLDER)) > _MAX_DIR:
    raise RuntimeError(f"{FOLDER} is too long for a libvirt socket path")
SOCKET = FOLDER / "host" / "sock" / "libvirt-sock"
QEMU_URI = f"qemu+unix:///system?socket={SOCKET}"
TEST_URI = f"test+unix:///default?socket={SOCKET}"
REDIS_PORT = _free_port()

os.environ.update(
    VMPORTAL_TEST_FOLDER=str(FOLDER),
    VMPORTAL_TEST_QEMU_URI=QEMU_URI,
    VMPORTAL_TEST_URI=TEST_URI,
    LIBVIRT_URI=QEMU_URI,
    REDIS_URL=f"redis://127.0.0.1:{REDIS_PORT}/0",
    # Named after the folder, which no other run holds at the same time.
    VMPORTAL_TEST_DB=(
        f"test_vmportal_{FOLDER.name.replace('-', '_')}"
        if os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://"))
        else str(ROOT / "var" / f"test-{FOLDER.name}.sqlite3")
    ),
    VMPORTAL_CONSOLE_LOG_DIR=str(FOLDER / "consoles"),
    VMPORTAL_SAVE_DIR=str(FOLDER / "save"),
)


class _Resources:
    """What this process started: its libvirtd and its Redis."""

    def __init__(self) -> None:
        self.redis: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for sub in ("consoles", "save"):
            (FOLDER / sub).mkdir(parents=True, exist_ok=True)
            # QEMU runs as libvirt-qemu and writes the memory of saved guests here.
            (FOLDER / sub).chmod(0o777)
        self._start_redis()
        self._start_libvirtd()

    def _start_redis(self) -> None:
        data = FOLDER / "redis"
        data.mkdir(exist_ok=True)
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(REDIS_PORT)]
        argv += ["--dir", str(data), "--save", "", "--appendonly", "no"]
        argv += ["--logfile", str(data / "redis.log")]
        # Not on pytest's output: a Redis that outlived its run would hold a pipe open.
        self.redis = subprocess.Popen(
            argv,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"this test process's Redis did not start on port {REDIS_PORT}")

    def _start_libvirtd(self) -> None:
        host = FOLDER / "host"
        run_script("stop", str(host))  # a daemon an earlier run left behind
        # What that run defined (guests, pools, networks) goes; the capability cache stays.
        for left in ("etc/qemu", "etc/storage", "lib-qemu"):
            shutil.rmtree(host / left, ignore_errors=True)
        run_script("start", f"vmportal-{WORKER}", str(host))

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            run_script("purge" if _SPARE else "stop", str(FOLDER / "host"), timeout=120)
        if self.redis is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.redis.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.redis.wait(10)
        if _SPARE:
            shutil.rmtree(FOLDER, ignore_errors=True)


_resources = _Resources()


def _runs_tests(config: Any) -> bool:
    """False in the xdist controller, which only hands tests to the workers."""
    if hasattr(config, "workerinput"):
        return True
    return not (config.getoption("numprocesses", None) or config.getoption("dist", "no") != "no")


def pytest_configure(config: Any) -> None:
    if _runs_tests(config) and not config.getoption("collectonly", False):
        _resources.start()


def pytest_unconfigure(config: Any) -> None:
    if _runs_tests(config) and not config.getoption("collectonly", False):
        _resources.stop()
