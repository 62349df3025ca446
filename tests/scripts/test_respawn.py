"""scripts/respawn.sh, which the Procfile runs worker, beat and listener under."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from tests.support.stack import ROOT, wait_until

RESPAWN = str(ROOT / "scripts" / "respawn.sh")


def start(command: str, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [RESPAWN, "bash", "-c", command],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )


def runs(tmp_path: Path) -> int:
    log = tmp_path / "runs"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_command_that_fails_is_started_again_until_told_to_stop(tmp_path: Path) -> None:
    proc = start("echo run >> runs; exit 3", tmp_path)
    try:
        wait_until(lambda: runs(tmp_path) >= 2, timeout=10, what="a second run")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert "bash exited with status 3; starting it again in 1s" in err
    assert proc.returncode == 143  # stopped by SIGTERM, whether it was running or waiting


def test_a_clean_exit_is_not_restarted(tmp_path: Path) -> None:
    proc = start("echo run >> runs; exit 0", tmp_path)
    assert proc.wait(timeout=10) == 0
    assert runs(tmp_path) == 1


def test_sigterm_reaches_the_running_command_and_ends_both(tmp_path: Path) -> None:
    command = (
        "trap 'echo term >> runs; exit 143' TERM; echo run >> runs; while :; do sleep 0.1; done"
    )
    proc = start(command, tmp_path)
    wait_until(lambda: runs(tmp_path) == 1, timeout=10, what="the command to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    assert (tmp_path / "runs").read_text().splitlines() == ["run", "term"]
