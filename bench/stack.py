"""The portal's real processes for the benchmarks: own database, own Redis, the machine's libvirtd.

Order matters: `prepare_environment` picks the database and Redis port and sets the environment
before Django is imported; `migrate` and `seed` fill the database; `Stack.start` spawns uvicorn,
the Celery worker and beat, and the event listener as `make run` would.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from typing import Any

from bench.common import BENCH_DIR, ROOT, wait_for

QEMU_URI = "qemu:///system"
TEST_URI = "test+unix:///default"
TEST_POOL = "default-pool"
LOCAL_HOST = "local"  # the host of LIBVIRT_URI, as `make run` names it
TEST_HOST = "bench-test"
LIST_HOST = "bench-list"  # disabled: only rows for the list page, never reconciled
PASSWORD = "bench-correct-horse-battery"
KERNEL = "/var/lib/libvirt/boot/vmportal/tiny-vmlinuz"
INITRD = "/var/lib/libvirt/boot/vmportal/tiny-initrd.img"
BIG = 10_000_000  # quotas and capacities the benchmarks must never hit
PROCESS_NAMES = ("bench-web", "bench-worker", "bench-listener", "bench-beat")


def raise_open_files() -> int:
    """Lift this process's (and its children's) open-files limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _fresh_postgres(url: str) -> str:
    """A fresh `<name>_bench` database on the server of url (the named database is not touched)."""
    import psycopg

    parts = urllib.parse.urlsplit(url)
    name = parts.path.lstrip("/") or "vmportal"
    bench_name = f"{name}_bench"
    admin = parts._replace(path="/postgres").geturl().replace("postgres://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{bench_name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{bench_name}"')
    return parts._replace(path=f"/{bench_name}").geturl()


def database_url() -> str:
    """A fresh database: `<name>_bench` beside a PostgreSQL DATABASE_URL, else var/bench SQLite."""
    given = os.environ.get("DATABASE_URL", "")
    if given.startswith(("postgres://", "postgresql://")):
        return _fresh_postgres(given)
    if given:
        raise SystemExit("bench: DATABASE_URL must be PostgreSQL (or unset for SQLite)")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / "bench.sqlite3"
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return f"sqlite:///{path}"


def prepare_environment(*, database: str, redis_url: str) -> dict[str, str]:
    """Point this process at the bench database and Redis; the environment for the children."""
    os.environ.update(
        DATABASE_URL=database,
        REDIS_URL=redis_url,
        LIBVIRT_URI=QEMU_URI,
        DJANGO_SETTINGS_MODULE="vmportal.settings",
        PYTHONUNBUFFERED="1",
    )
    env = dict(os.environ)
    # Playwright's sync API runs an event loop in this thread; the ORM calls around it are sync.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    return env


def migrate(env: dict[str, str]) -> None:
    """Migrate the bench database, as `make run` does."""
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env, check=True
    )


@dataclass
class Seed:
    """What the benchmarks use: users, hosts and templates."""

    user: Any  # the requester (large quota)
    watcher: Any  # owns the guest the browser watches
    staff: Any  # reads the 10,000-guest list
    local: Any  # Host on qemu:///system
    test: Any  # Host on the test driver
    listing: Any  # Host with only rows (disabled)
    demo: Any  # the tiny guest's two-phase install on QEMU
    kernel: Any  # kernel install on the test driver (waits for its installer)
    persistent: Any  # define + start on the test driver


def seed(*, domain_type: str, log: Any = print) -> Seed:
    """Create users, hosts and templates; the local host gets the known domain type."""
    from django.contrib.auth import get_user_model

    from provisioning.models import GuestTemplate, Host, Media, Quota, StoragePool
    from provisioning.services.demo import demo_seed

    users = get_user_model()
    user = users.objects.create_user("bench", password=PASSWORD)
    Quota.objects.create(
        user=user, max_guests=BIG, max_vcpus=BIG, max_memory_mib=BIG, max_disk_mib=BIG
    )
    watcher = users.objects.create_user("bench-watcher", password=PASSWORD)
    staff = users.objects.create_user("bench-admin", password=PASSWORD, is_staff=True)
    capacity = {"capacity_vcpus": BIG, "capacity_memory_mib": BIG, "capacity_disk_gib": BIG}
    local = Host.objects.create(
        name=LOCAL_HOST, uri=QEMU_URI, detected_domain_type=domain_type, **capacity
    )
    test = Host.objects.create(name=TEST_HOST, uri=TEST_URI, **capacity)
    listing = Host.objects.create(
        name=LIST_HOST, uri="test+unix:///bench-list", enabled=False, **capacity
    )
    demo = demo_seed(host=local, log=log)
    # Pinned, so placement can never send the QEMU install to the test driver.
    GuestTemplate.objects.filter(pk=demo.pk).update(host=local)
    demo.refresh_from_db()
    pool = StoragePool.objects.create(host=test, name=TEST_POOL, path=f"/{TEST_POOL}")
    media = Media.objects.create(
        name="bench tiny", kind=Media.Kind.KERNEL, kernel_path=KERNEL, initrd_path=INITRD
    )
    common: dict[str, Any] = {
        "method": GuestTemplate.Method.KERNEL,
        "media": media,
        "pool": pool,
        "host": test,
        "kernel_cmdline": "console=ttyS0 vmportal.install=1",
        "memory_mib_default": 256,
        "disk_mib_min": 64,
        "disk_mib_default": 64,
        "install_timeout_minutes": 120,
    }
    kernel = GuestTemplate.objects.create(
        name="Bench install (test driver)", lifecycle=GuestTemplate.Lifecycle.INSTALL, **common
    )
    persistent = GuestTemplate.objects.create(
        name="Bench define+start (test driver)",
        lifecycle=GuestTemplate.Lifecycle.PERSISTENT,
        **common,
    )
    return Seed(user, watcher, staff, local, test, listing, demo, kernel, persistent)


class Stack:
    """uvicorn, a Celery worker (concurrency 2, as the Procfile) and beat, and the listener."""

    def __init__(self, env: dict[str, str], hosts: list[str]) -> None:
        self.env = env
        self.hosts = hosts
        self.procs: dict[str, Any] = {}
        self.base_url = ""

    def start(self) -> Stack:
        from tests.support import stack

        for name in PROCESS_NAMES:
            (stack.LOGS / f"{name}.log").unlink(missing_ok=True)
        queues = ["default", *(f"hv.{h}" for h in self.hosts)]
        self.procs["worker"] = stack.start_worker(self.env, queues=queues, name="bench-worker")
        self.procs["listener"] = stack.start_listener(self.env, name="bench-listener")
        self.procs["beat"] = stack.start_beat(self.env, name="bench-beat")
        self.procs["web"], self.base_url = stack.start_web(self.env, name="bench-web")
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        from vmportal import heartbeat

        def ready() -> bool:
            for name, proc in self.procs.items():
                if not proc.alive():
                    raise RuntimeError(f"{name} exited:\n{proc.log_text()[-3000:]}")
            listening = heartbeat.alive("listener")
            connected = {i.split("@")[0] for i, v in listening.items() if v.get("connected")}
            return bool(heartbeat.alive("worker")) and set(self.hosts) <= connected

        wait_for(ready, timeout=60, what="the worker and the listener", every=0.1)

    def pids(self, *names: str) -> list[int]:
        """The process ids of the named parts (their children are found from these)."""
        return [self.procs[n].pid for n in names]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
