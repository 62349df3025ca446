"""Real processes for tests: Redis servers, the web server, Celery worker and beat, the listener."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import redis
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
# Each test process (xdist worker) logs its processes apart: the tests read these logs.
LOGS = ARTIFACTS / "logs" / os.environ.get("PYTEST_XDIST_WORKER", "main")
VENV_BIN = Path(sys.executable).parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], T], *, timeout: float, what: str, every: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy, or fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last error
            last_error = exc
        else:
            if value:
                return value
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what} (last error: {last_error})"
    )


def test_database_url() -> str:
    """A DATABASE_URL for other processes that points at the database this test run uses."""
    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    if connection.vendor == "postgresql":
        auth = s["USER"] or "postgres"
        if s["PASSWORD"]:
            auth += f":{s['PASSWORD']}"
        return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    raise RuntimeError(f"no URL form for database vendor {connection.vendor}")


class Proc:
    """A child process with its output in test-artifacts/logs/<name>.log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOGS / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        stop_all([self], timeout)

    def _wait_stopped(self, timeout: float) -> None:
        """Wait for the asked process to end; SIGKILL it after `timeout`."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.popen.wait(5)
        self._log.close()


def stop_all(procs: Iterable[Proc], timeout: float = 15.0) -> None:
    """Stop the processes side by side: each is asked (SIGTERM) at once, then waited for, so a
    test's teardown takes as long as its slowest process's shutdown, not the sum of them all."""
    procs = list(procs)
    for proc in procs:
        if proc.alive():
            proc.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc._wait_stopped(max(0.1, deadline - time.monotonic()))


class RedisServer:
    """A Redis of the test's own on a free port, which the test may stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="vmportal-redis-")
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir]
        argv += ["--save", "", "--appendonly", "no"]
        self.proc = Proc(f"redis-{self.port}", argv, dict(os.environ))
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_until(client.ping, timeout=10, what=f"redis on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


def process_env(*, redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=test_database_url(),
        REDIS_URL=redis_url,
        DJANGO_SETTINGS_MODULE="vmportal.settings",
        PYTHONUNBUFFERED="1",
        # Django's system checks run once per test run (tests/vmportal/test_settings.py); a
        # Celery worker repeats them as it starts, nearly a second of CPU per worker otherwise.
        CELERY_SKIP_CHECKS="1",
    )
    env.update(extra)
    return env


def start_web(env: dict[str, str], *, name: str = "web") -> tuple[Proc, str]:
    port = free_port()
    argv = [str(VENV_BIN / "uvicorn"), "vmportal.asgi:application", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--no-access-log"]
    proc = Proc(name, argv, env)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if not proc.alive():
            raise AssertionError(f"web server exited:\n{proc.log_text()[-3000:]}")
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    wait_until(up, timeout=30, what="the web server")
    return proc, base


def start_worker(
    env: dict[str, str],
    *,
    queues: Iterable[str] = ("default", "hv.local"),
    name: str = "worker",
    concurrency: int = 2,
    respawn: bool = False,
) -> Proc:
    """A Celery worker; with respawn, under scripts/respawn.sh as the Procfile runs it."""
    argv = [str(ROOT / "scripts" / "respawn.sh")] if respawn else []
    argv += [str(VENV_BIN / "celery"), "-A", "vmportal", "worker", "--loglevel", "INFO"]
    argv += ["--concurrency", str(concurrency), "--queues", ",".join(queues)]
    argv += ["--hostname", f"{name}-{os.getpid()}@%h", "--without-mingle", "--without-gossip"]
    return Proc(name, argv, env)


def start_beat(env: dict[str, str], *, name: str = "beat") -> Proc:
    argv = [str(VENV_BIN / "celery"), "-A", "vmportal", "beat", "--loglevel", "INFO", "--pidfile="]
    argv += ["--schedule", str(Path(tempfile.mkdtemp(prefix="vmportal-beat-")) / "schedule")]
    return Proc(name, argv, env)


def listener_argv(*hosts: str) -> list[str]:
    """`manage.py run_listener` for these hosts (all without), skipping the system checks as
    the workers do (process_env)."""
    argv = [sys.executable, "manage.py", "run_listener", "--skip-checks"]
    for host in hosts:
        argv += ["--host", host]
    return argv


def start_listener(env: dict[str, str], *, name: str = "listener") -> Proc:
    return Proc(name, listener_argv(), env)


class Stack:
    """The portal's processes running against this test's database and Redis."""

    def __init__(self, redis_server: RedisServer, libvirt_uri: str) -> None:
        self.redis = redis_server
        self.env = process_env(redis_url=redis_server.url, LIBVIRT_URI=libvirt_uri)
        self.procs: dict[str, Proc] = {}
        self.base_url = ""

    def start(self, *parts: str) -> Stack:
        for part in parts:
            if part == "web":
                self.procs["web"], self.base_url = start_web(self.env)
            elif part == "worker":
                self.procs["worker"] = start_worker(self.env)
            elif part == "beat":
                self.procs["beat"] = start_beat(self.env)
            elif part == "listener":
                self.procs["listener"] = start_listener(self.env)
            else:
                raise ValueError(part)
        return self

    def stop(self) -> None:
        stop_all(self.procs.values())


def point_celery_at(url: str) -> None:
    """Send this process's tasks to the broker at url (the app caches its connections)."""
    from kombu import pools

    from vmportal.celery import app

    app.conf.broker_url = url
    # The app's pools are kombu's process-wide ones, kept per broker URL. Closing one but leaving
    # it registered made a later test whose Redis got the same port (or the suite's own Redis,
    # pointed at again) fail with "Acquire on closed pool": close them all and forget them.
    pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
