"""Settings come from the environment, with embedded defaults that work on a fresh machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.libvirt import TEST_URI
from tests.support.stack import ROOT

# The default vmportal/settings.py documents (README) when LIBVIRT_URI is unset; these tests only
# read it, they never connect to it.
EMBEDDED_LIBVIRT_URI = "qemu:///system"
READ = (
    "import json, django; django.setup(); from django.conf import settings as s; "
    "db = s.DATABASES['default']; "
    "print(json.dumps({'db': db['ENGINE'], 'db_name': str(db['NAME']),"
    " 'redis': s.REDIS_URL, 'libvirt': s.LIBVIRT_URI, 'debug': s.DEBUG, 'hosts': s.ALLOWED_HOSTS,"
    " 'key': s.SECRET_KEY, 'var': str(s.VAR_DIR)}))"
)
SETTING_NAMES = (
    "DATABASE_URL",
    "REDIS_URL",
    "LIBVIRT_URI",
    "SECRET_KEY",
    "DEBUG",
    "ALLOWED_HOSTS",
    "VMPORTAL_PRODUCTION",
    "VMPORTAL_VAR_DIR",
    "DJANGO_ALLOW_ASYNC_UNSAFE",
)


def run_python(code: str, var_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    clean.update(DJANGO_SETTINGS_MODULE="vmportal.settings", VMPORTAL_VAR_DIR=str(var_dir), **env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def read_settings(var_dir: Path, **env: str) -> dict:
    done = run_python(READ, var_dir, **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_it_defaults_to_embedded_services(tmp_path: Path) -> None:
    s = read_settings(tmp_path)
    assert s["db"] == "vmportal.sqlite"  # Django's SQLite backend, writers queued on a file lock
    assert s["db_name"] == str(tmp_path / "vmportal.sqlite3")
    assert s["redis"] == "redis://127.0.0.1:6379/0"
    assert s["libvirt"] == EMBEDDED_LIBVIRT_URI
    assert s["debug"] is False
    assert "127.0.0.1" in s["hosts"]


def test_it_generates_a_secret_key_once_and_keeps_it(tmp_path: Path) -> None:
    first = read_settings(tmp_path)["key"]
    second = read_settings(tmp_path)["key"]
    assert len(first) >= 40
    assert first == second
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_it_reads_the_environment(tmp_path: Path) -> None:
    s = read_settings(
        tmp_path,
        DATABASE_URL="postgres://portal:pw@db.example:5433/portal",
        REDIS_URL="redis://cache:6380/2",
        LIBVIRT_URI=TEST_URI,
        DEBUG="true",
        ALLOWED_HOSTS="portal.example,localhost",
        SECRET_KEY="x" * 50,
    )
    assert s["db"] == "django.db.backends.postgresql"
    assert s["db_name"] == "portal"
    assert s["redis"] == "redis://cache:6380/2"
    assert s["libvirt"] == TEST_URI
    assert s["debug"] is True
    assert s["hosts"] == ["portal.example", "localhost"]
    assert s["key"] == "x" * 50


def test_production_mode_refuses_to_start_without_a_secret_key(tmp_path: Path) -> None:
    done = run_python(READ, tmp_path, VMPORTAL_PRODUCTION="true")
    assert done.returncode != 0
    assert "SECRET_KEY must be set" in done.stderr


def test_an_unwritable_var_dir_is_named_in_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = run_python(READ, blocker / "var")
    assert done.returncode != 0
    assert f"var directory {blocker / 'var'} is not writable" in done.stderr


def test_the_deploy_check_is_clean_in_production_mode(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if k not in SETTING_NAMES},
            "VMPORTAL_VAR_DIR": str(tmp_path),
            "VMPORTAL_PRODUCTION": "true",
            "SECRET_KEY": "k" * 30 + "Zq8#f!L2@pR5vX1^wY9&bN4*mC7",
            "ALLOWED_HOSTS": "portal.example",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


@pytest.mark.parametrize("bad", ["redis://127.0.0.1:1/0"])
def test_a_dead_redis_is_named_by_the_health_check(tmp_path: Path, bad: str) -> None:
    code = (
        "import django; django.setup(); from provisioning import health; "
        "r = health.check_redis(); print(r.ok, r.reason)"
    )
    done = run_python(code, tmp_path, REDIS_URL=bad)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("False redis unreachable at redis://127.0.0.1:1/0")
