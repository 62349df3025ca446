"""The provisioning engine on this test process's QEMU driver, with the tiny guest.

A Celery worker and the event listener run against the test's database and Redis with
LIBVIRT_URI set to this process's own libvirtd (tests/support/libvirt.py's QEMU_URI); the demo
template installs the tiny guest into the demo pool, whose folder every daemon on the machine
shares, so a test removes only what its own guests made. Use the fixture by importing it:

    from tests.support.qemu_engine import qemu_stack  # noqa: F401
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import AbstractUser

from provisioning.demo.tinyguest import ConsoleReport, parse_console
from provisioning.hypervisor import operations, storage
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.hypervisor.events import EventListener, LifecycleEvent
from provisioning.hypervisor.types import DomainInfo
from provisioning.models import Guest, GuestTemplate, Job, ProvisioningRequest
from provisioning.services.consoles import console_log_path
from provisioning.services.demo import DEMO_POOL_NAME, demo_seed
from provisioning.services.hosts import host_ensure_local
from provisioning.services.provision import Overrides, request_submit
from tests import factories
from tests.support.libvirt import QEMU_URI
from tests.support.stack import (
    Proc,
    RedisServer,
    point_celery_at,
    process_env,
    start_listener,
    start_worker,
    stop_all,
    wait_until,
)
from vmportal import heartbeat

PREFIX = "vmportal-qe-"
Status = ProvisioningRequest.Status
# Install ~6-13 s and a boot from disk a few seconds under TCG; generous for a loaded machine.
INSTALL_DEADLINE = 90.0
BOOT_DEADLINE = 60.0
JOB_DEADLINE = 60.0
ALL_STEPS = ["admitted", "preparing", "installing", "waiting", "defining", "starting", "running"]


class Events:
    """libvirt lifecycle events seen by this test's own listener, awaited with a deadline."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[LifecycleEvent] = queue.Queue()

    def __call__(self, event: LifecycleEvent) -> None:
        self.inbox.put(event)

    def expect(self, uuid: str, event: str, detail: str, timeout: float) -> LifecycleEvent:
        """The next event for uuid with this event and detail; others are skipped."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self.inbox.get(timeout=left)
            except queue.Empty:
                break
            if got.uuid == uuid and got.event == event and got.detail == detail:
                return got
        raise AssertionError(f"no {event}/{detail} event for {uuid} within {timeout} s")


@dataclass
class QemuStack:
    """A worker and the listener on the QEMU driver, the demo template, its owner, and cleanup."""

    hv: Hypervisor
    template: GuestTemplate
    owner: AbstractUser
    events: Events
    procs: list[Proc]
    names: list[str] = field(default_factory=list)

    def new_name(self) -> str:
        """A fresh guest name this stack removes from libvirt afterwards."""
        name = f"{PREFIX}{secrets.token_hex(3)}"
        self.names.append(name)
        return name

    def logs(self) -> str:
        """The tails of the processes' logs, for failure messages."""
        return "\n".join(f"--- {p.name}\n{p.log_text()[-3000:]}" for p in self.procs)


def remove_guest_traces(hv: Hypervisor, name: str) -> None:
    """Destroy and undefine the domain called name; remove its volumes, save and log files."""
    uuids = {str(u) for u in Guest.objects.filter(name=name).values_list("uuid", flat=True)}
    info = operations.find_by_name(hv, name)
    if info is not None:
        uuids.add(info.uuid)
        operations.destroy(hv, info.uuid)
        operations.undefine(hv, info.uuid)
    # The name is this test's own (a random suffix): its volumes are called after it.
    for volume in storage.list_volumes(hv, DEMO_POOL_NAME):
        if volume.name.startswith(f"{name}-"):
            storage.delete_volume(hv, DEMO_POOL_NAME, volume.name)
    files = [Path(django_settings.CONSOLE_LOG_DIR) / f"{name}.log"]
    for uuid in uuids:
        files += [console_log_path(uuid), Path(django_settings.SAVE_DIR) / f"{uuid}.save"]
    for path in files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def listener_connected() -> bool:
    """True once the listener process reports a live libvirt subscription."""
    return any(i.get("connected") for i in heartbeat.alive("listener").values())


@pytest.fixture
def qemu_stack(transactional_db: None, own_redis: RedisServer, settings) -> Iterator[QemuStack]:
    """The `stack` fixture's shape on the QEMU driver: worker and listener on the demo template."""
    from vmportal.celery import app

    settings.REDIS_URL = own_redis.url
    settings.LIBVIRT_URI = QEMU_URI
    # Skip the KVM probe boot: KVM guests hang on these machines (FIELD-NOTES).
    settings.VMPORTAL_DOMAIN_TYPE = "qemu"
    previous = app.conf.broker_url
    point_celery_at(own_redis.url)
    hv = get_hypervisor(QEMU_URI)
    template = demo_seed(host=host_ensure_local(), log=lambda _line: None)
    env = process_env(redis_url=own_redis.url, LIBVIRT_URI=QEMU_URI, VMPORTAL_DOMAIN_TYPE="qemu")
    events = Events()
    watcher = EventListener(QEMU_URI, events)
    procs: list[Proc] = []
    running = QemuStack(hv, template, factories.make_user("ann"), events, procs)
    try:
        watcher.start()
        procs.append(start_worker(env, name="qemu-worker"))
        procs.append(start_listener(env, name="qemu-listener"))
        assert watcher.wait_connected(10), "the test's own event listener did not connect"
        # The installer's stop must not fall between the listener's start and its subscription.
        wait_until(
            lambda: listener_connected() or not all(p.alive() for p in procs),
            timeout=30,
            what="the listener to subscribe to libvirt",
        )
        assert all(p.alive() for p in procs), f"a process exited:\n{running.logs()}"
        yield running
    finally:
        stop_all(procs)
        watcher.stop()
        point_celery_at(previous)
        for name in running.names:
            remove_guest_traces(hv, name)


# --- requests and what the guest shows -------------------------------------------------------


def status_of(request: ProvisioningRequest) -> str:
    request.refresh_from_db()
    return request.status


def wait_for_status(
    request: ProvisioningRequest, wanted: str, stack: QemuStack, *, timeout: float
) -> None:
    """Wait until the request reaches wanted; fail early (with the logs) if it ends elsewhere."""

    def there() -> bool:
        status = status_of(request)
        if status != wanted and status in ProvisioningRequest.FINAL:
            raise AssertionError(
                f"request ended {status} ({request.error}), not {wanted}\n{stack.logs()}"
            )
        return status == wanted

    deadline = time.monotonic() + timeout
    while not there():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"request still {request.status} after {timeout} s\n{stack.logs()}"
            )
        time.sleep(0.05)


def console(guest: Guest) -> str:
    try:
        return console_log_path(guest.uuid).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for_console(guest: Guest, *, timeout: float, what: str, **wanted: object) -> ConsoleReport:
    """Wait until the guest's console reports every field in wanted."""

    def report() -> ConsoleReport | None:
        got = parse_console(console(guest))
        return got if all(getattr(got, k) == v for k, v in wanted.items()) else None

    got = wait_until(report, timeout=timeout, what=what, every=0.2)
    assert got is not None
    return got


def provision_job(request: ProvisioningRequest) -> Job:
    return Job.objects.get(request=request, kind=Job.Kind.PROVISION)


def submit(stack: QemuStack, *, data_disk_mib: int = 0) -> tuple[ProvisioningRequest, Guest]:
    """Request the demo template's tiny guest under a fresh name."""
    overrides = Overrides(name=stack.new_name(), data_disk_mib=data_disk_mib)
    request = request_submit(owner=stack.owner, template=stack.template, overrides=overrides)
    assert request.guest is not None
    return request, request.guest


def provision(stack: QemuStack, *, data_disk_mib: int = 0) -> tuple[ProvisioningRequest, Guest]:
    """A request for the tiny guest, run to a booted phase 2 showing the installer's marker."""
    request, guest = submit(stack, data_disk_mib=data_disk_mib)
    wait_for_status(request, Status.RUNNING, stack, timeout=INSTALL_DEADLINE + BOOT_DEADLINE)
    wait_for_console(
        guest, timeout=BOOT_DEADLINE, what="the installed guest to boot", disk_marker="installed"
    )
    guest.refresh_from_db()
    return request, guest


def info_of(stack: QemuStack, guest: Guest) -> DomainInfo:
    return operations.get_info(stack.hv, str(guest.uuid))
