"""Many hosts: a second real libvirtd, and per-host workers and listeners, for the services' tests.

Host a is this test process's own libvirtd, host b a second one (tests/support/hosts.py) with its
own host UUID. Each answers both ``qemu+unix:///system?socket=...`` and, with separate state,
``test+unix:///default?socket=...``. Both see /var/lib/libvirt/images and /var/lib/libvirt/boot,
so a pool at the same folder on both is shared storage (shared with every other test process
too: cleanup removes only what the test's own guests made). Each logs its guests' serial
consoles to console_log_path(uuid) in its own view of the file system: a's is this process's
folder, b's a private copy of it under b's folder (QemuHosts.console_path).

The fixtures are used by importing them, with the fixtures they ask for, into a test module:

    from tests.support.hosts import second_libvirtd  # noqa: F401
    from tests.support.multihost import host_stack, published, qemu_hosts  # noqa: F401
"""

from __future__ import annotations

import contextlib
import io
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.utils import timezone
from lxml import html

from provisioning.hypervisor import operations, storage
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.models import Guest, GuestTemplate, Host, Job, ProvisioningRequest
from provisioning.services.consoles import console_log_path
from provisioning.services.demo import DEMO_POOL_NAME, DEMO_POOL_PATH, demo_seed
from provisioning.services.provision import Overrides, request_submit
from provisioning.services.provision.spec import data_volume, system_volume
from tests.support.hosts import SecondHost
from tests.support.libvirt import QEMU_URI
from tests.support.stack import (
    LOGS,
    Proc,
    RedisServer,
    listener_argv,
    point_celery_at,
    process_env,
    start_web,
    start_worker,
    stop_all,
    wait_until,
)

# The names of the guests these tests provision (other test processes use the shared pool too).
GUEST_PREFIX = "vmportal-hm-"
# Under TCG the installer runs 10-30 s and the installed guest boots in a few.
INSTALL_TIMEOUT = 150.0
BOOT_TIMEOUT = 90.0
JOB_TIMEOUT = 60.0
MIGRATION_TIMEOUT = 120.0
ALIVE_RE = re.compile(r"VMPORTAL-ALIVE (\d+(?:\.\d+)?)")


def new_guest_name() -> str:
    """A guest name no other run uses."""
    return f"{GUEST_PREFIX}{secrets.token_hex(3)}"


def driver_uri_of(second: SecondHost) -> str:
    """The second daemon's test driver (its own state, not host a's)."""
    return second.uri.replace("qemu+unix:///system", "test+unix:///default", 1)


def badge_of(page: str, guest: Guest) -> str:
    """The dashboard's state badge of the guest's row (its data-state)."""
    root = html.fromstring(page)
    found = list(root.iterfind(f".//tr[@id='guest-{guest.uuid}']//*[@data-state]"))
    assert found, f"no row for {guest.name}"
    return str(found[0].get("data-state"))


def mark_down(host: Host) -> None:
    """Make the host look as if its listener had been silent for minutes."""
    Host.objects.filter(pk=host.pk).update(last_seen=timezone.now() - timedelta(minutes=5))
    host.refresh_from_db()


# --- tasks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One task message this process published."""

    id: str
    name: str
    queue: str
    args: str


class Published:
    """Every task message this process publishes (Celery's after_task_publish), in order."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def __call__(
        self,
        sender: str | None = None,
        headers: dict[str, Any] | None = None,
        routing_key: str = "",
        **_: Any,
    ) -> None:
        headers = headers or {}
        self.sent.append(
            Sent(str(headers.get("id")), str(sender), routing_key, str(headers.get("argsrepr")))
        )

    def to(self, queue: str) -> list[Sent]:
        """The messages sent to this queue."""
        return [s for s in self.sent if s.queue == queue]


@pytest.fixture
def published() -> Iterator[Published]:
    from celery.signals import after_task_publish

    recorder = Published()
    after_task_publish.connect(recorder, weak=False)
    try:
        yield recorder
    finally:
        after_task_publish.disconnect(recorder)


# --- processes ------------------------------------------------------------------------------


@dataclass
class LoggedProc:
    """A process and the part of its log file written since it started (files are appended)."""

    proc: Proc
    offset: int

    def text(self) -> str:
        with self.proc.log_path.open("rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def received(self, task_id: str) -> bool:
        """Whether this worker took the task with this id off its queue."""
        return f"[{task_id}] received" in self.text()


def _log_offset(name: str) -> int:
    path = LOGS / f"{name}.log"
    return path.stat().st_size if path.exists() else 0


@dataclass
class HostStack:
    """Workers per host queue and listeners per host, on this test's database and Redis."""

    redis: RedisServer
    env: dict[str, str]
    procs: dict[str, LoggedProc] = field(default_factory=dict)

    def worker(self, host: Host, *, concurrency: int = 2) -> LoggedProc:
        """A worker serving only the host's queue (hv.<name>), named after the host."""
        name = f"hosts-worker-{host.name}"
        offset = _log_offset(name)
        proc = start_worker(self.env, queues=(host.queue,), name=name, concurrency=concurrency)
        started = self.procs[name] = LoggedProc(proc, offset)
        wait_until(
            lambda: " ready." in started.text() or not proc.alive(),
            timeout=60,
            what=f"the worker for {host.queue}",
            every=0.1,
        )
        assert proc.alive(), started.text()[-3000:]
        return started

    def listener(self, *hosts: Host) -> LoggedProc:
        """`run_listener --host NAME ...` for these hosts only."""
        name = "hosts-listener-" + "-".join(h.name for h in hosts)
        argv = listener_argv(*(h.name for h in hosts))
        offset = _log_offset(name)
        started = self.procs[name] = LoggedProc(Proc(name, argv, self.env), offset)
        return started

    def web(self) -> str:
        """The web server (uvicorn); its base URL."""
        name = "hosts-web"
        offset = _log_offset(name)
        proc, base = start_web(self.env, name=name)
        self.procs[name] = LoggedProc(proc, offset)
        return base

    def stop(self, started: LoggedProc) -> None:
        started.proc.stop()

    def stop_everything(self) -> None:
        """Stop every process this stack started, side by side (stack.stop_all)."""
        stop_all(started.proc for started in self.procs.values())

    def logs(self) -> str:
        """The tails of every process's log since it started, for failure messages."""
        return "\n".join(f"--- {n}\n{p.text()[-2500:]}" for n, p in self.procs.items())


@pytest.fixture
def host_stack(
    transactional_db: None, own_redis: RedisServer, settings: Any
) -> Iterator[HostStack]:
    """Nothing started yet: start workers and listeners per host with .worker() / .listener()."""
    from vmportal.celery import app

    settings.REDIS_URL = own_redis.url
    settings.LIBVIRT_URI = QEMU_URI
    # KVM guests hang on these machines (FIELD-NOTES): skip the probe boot, emulate.
    settings.VMPORTAL_DOMAIN_TYPE = "qemu"
    previous = app.conf.broker_url
    point_celery_at(own_redis.url)
    env = process_env(redis_url=own_redis.url, LIBVIRT_URI=QEMU_URI, VMPORTAL_DOMAIN_TYPE="qemu")
    running = HostStack(own_redis, env)
    try:
        yield running
    finally:
        running.stop_everything()
        point_celery_at(previous)


def listening(host: Host) -> bool:
    """True once a listener for the host has reported it connected (it stamps last_seen)."""
    host.refresh_from_db()
    return host.last_seen is not None and timezone.now() - host.last_seen < timedelta(seconds=10)


def wait_listening(*hosts: Host) -> None:
    """Wait until a listener has reported each host connected."""
    for host in hosts:
        wait_until(partial(listening, host), timeout=30, what=f"a listener for {host}")


# --- two real QEMU hosts --------------------------------------------------------------------


@dataclass
class QemuHosts:
    """Host a (this process's libvirtd) and host b (the second one), sharing the demo pool."""

    a: Host
    b: Host
    hv_a: Hypervisor
    hv_b: Hypervisor
    second: SecondHost
    template: GuestTemplate

    def console_path(self, host: Host, uuid: object) -> Path:
        """Where host's virtlogd writes the guest's serial console.

        Host a writes to console_log_path(uuid), the path the domain XML names; host b has a
        private copy of that folder in its namespace (as a host of its own has its own disk), kept
        under its own folder.
        """
        path = console_log_path(uuid)
        if host.pk == self.a.pk:
            return path
        return Path(f"{self.second.dir}/private{path}")

    def console(self, host: Host, uuid: object) -> str:
        try:
            return self.console_path(host, uuid).read_text(errors="replace")
        except FileNotFoundError:
            return ""


def uptimes(console: str) -> list[float]:
    """Every uptime the guest printed, in order."""
    return [float(u) for u in ALIVE_RE.findall(console)]


def alive_after(hosts: QemuHosts, host: Host, guest: Guest, uptime: float) -> float:
    """Wait for the guest on host to print an uptime later than the given one; return it."""

    def later() -> float | None:
        return next((u for u in uptimes(hosts.console(host, guest.uuid)) if u > uptime), None)

    found = wait_until(
        later,
        timeout=BOOT_TIMEOUT,
        what=f"VMPORTAL-ALIVE after {uptime} from {guest.name} on {host}",
        every=0.2,
    )
    assert found is not None
    return found


def provision_on_a(hosts: QemuHosts, host_stack: HostStack, owner: User) -> Guest:
    """The demo template's tiny guest, installed and booted on host a, printing ALIVE."""
    request = request_submit(
        owner=owner, template=hosts.template, overrides=Overrides(name=new_guest_name())
    )

    def running() -> bool:
        request.refresh_from_db()
        assert request.status != ProvisioningRequest.Status.FAILED, request.error
        return request.status == ProvisioningRequest.Status.RUNNING

    wait_until(
        running, timeout=INSTALL_TIMEOUT, what=f"{request.name} running\n{host_stack.logs()}"
    )
    assert request.guest_id is not None
    guest = Guest.objects.get(pk=request.guest_id)
    assert guest.host == hosts.a
    alive_after(hosts, hosts.a, guest, -1.0)
    return guest


def finished(job: Job, timeout: float = JOB_TIMEOUT) -> Job:
    """Wait for the job to end; the job as it ended."""

    def done() -> bool:
        job.refresh_from_db()
        return job.status not in Job.ACTIVE

    wait_until(done, timeout=timeout, what=f"{job} to end", every=0.1)
    return job


def register(name: str, uri: str) -> Host:
    """register_host with room to spare: placement turns only on what a test sets itself."""
    call_command(
        "register_host",
        name,
        uri,
        "--vcpus",
        "64",
        "--memory-mib",
        "65536",
        "--pool",
        DEMO_POOL_NAME,
        "--pool-path",
        str(DEMO_POOL_PATH),
        stdout=io.StringIO(),
    )
    host = Host.objects.get(name=name)
    # Migrations go to tcp://127.0.0.1: both daemons listen on this machine.
    Host.objects.filter(pk=host.pk).update(migration_address="127.0.0.1")
    host.refresh_from_db()
    return host


def remove_guests_on(hvs: list[Hypervisor], pool: str, *, shared_storage: bool) -> None:
    """Destroy and undefine this test's guests (its database's rows) on each daemon; delete their
    disks from the pool, their console logs and saved memory. Nothing of anyone else's."""
    # A pool on shared storage is one folder, in which the first daemon made every disk.
    disk_keepers = hvs[:1] if shared_storage else hvs
    for guest in Guest.objects.all():
        uuid = str(guest.uuid)
        for hv in hvs:
            operations.destroy(hv, uuid)
            operations.undefine(hv, uuid)
        for hv in disk_keepers:
            for volume in (system_volume(guest), data_volume(guest)):
                storage.delete_volume(hv, pool, volume)
        for path in (console_log_path(uuid), Path(django_settings.SAVE_DIR) / f"{uuid}.save"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def remove_guests(hosts: QemuHosts) -> None:
    """Remove this test's guests from both QEMU daemons and the shared demo pool."""
    for guest in Guest.objects.all():  # b's console logs, in its private folder
        with contextlib.suppress(FileNotFoundError):
            hosts.console_path(hosts.b, guest.uuid).unlink()
    remove_guests_on([hosts.hv_a, hosts.hv_b], DEMO_POOL_NAME, shared_storage=True)


@pytest.fixture
def qemu_hosts(host_stack: HostStack, second_libvirtd: SecondHost) -> Iterator[QemuHosts]:
    """Hosts a and b registered with the demo pool, the demo template pinned to a."""
    hv_a = get_hypervisor(QEMU_URI)
    try:
        hv_a.version()
    except Exception as exc:  # noqa: BLE001 - any failure means there is no host a here
        pytest.skip(f"{QEMU_URI} unreachable: {exc}")
    a = register("a", QEMU_URI)
    b = register("b", second_libvirtd.uri)
    template = demo_seed(host=a, log=lambda _line: None)
    GuestTemplate.objects.filter(pk=template.pk).update(host=a)
    template.refresh_from_db()
    made = QemuHosts(a, b, hv_a, get_hypervisor(b.uri), second_libvirtd, template)
    try:
        yield made
    finally:
        remove_guests(made)
