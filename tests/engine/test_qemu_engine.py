"""The provisioning engine end to end on real QEMU, with the tiny guest and real processes.

A Celery worker and the event listener run against this test's database and Redis with
LIBVIRT_URI=qemu:///system. The tiny guest's installer writes a marker to its disk and powers off;
booted from that disk it prints the marker on its serial console, so the console proves that the
second phase runs on what the first one wrote.
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model

from provisioning.demo.tinyguest import ConsoleReport, parse_console
from provisioning.hypervisor import domxml, operations, storage
from provisioning.hypervisor.connection import Hypervisor, get_hypervisor
from provisioning.hypervisor.events import EventListener, LifecycleEvent
from provisioning.hypervisor.types import DomainInfo, GuestState
from provisioning.models import Guest, GuestTemplate, Job, JobEvent, ProvisioningRequest
from provisioning.services.actions import guest_action, save_path
from provisioning.services.consoles import console_log_path
from provisioning.services.demo import DEMO_POOL_NAME, demo_seed
from provisioning.services.hosts import host_ensure_local
from provisioning.services.provision import Overrides, cancel, request_submit
from tests.conftest import point_celery_at
from tests.support.stack import (
    Proc,
    RedisServer,
    process_env,
    start_listener,
    start_worker,
    wait_until,
)
from vmportal import heartbeat

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]

QEMU_URI = "qemu:///system"
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
    """A worker and the listener on qemu:///system, the demo template, and what to clean up."""

    hv: Hypervisor
    template: GuestTemplate
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
    """The `stack` fixture's shape on qemu:///system: worker and listener on the demo template."""
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
    running = QemuStack(hv, template, events, procs)
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
        for proc in procs:
            proc.stop()
        watcher.stop()
        point_celery_at(previous)
        for name in running.names:
            remove_guest_traces(hv, name)


# --- helpers ----------------------------------------------------------------------------------


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


def carries_on(guest: Guest, *, what: str) -> None:
    """Wait for the restored guest's next ALIVE line; it must run on, not boot afresh."""

    def alive() -> str:
        text = console(guest)
        return text if "VMPORTAL-ALIVE" in text else ""

    text = wait_until(alive, timeout=20, what=what, every=0.2)
    # The log was removed before the restore: all of it comes from the restored process.
    assert "VMPORTAL-DISK" not in text and "Linux version" not in text, text


def provision_job(request: ProvisioningRequest) -> Job:
    return Job.objects.get(request=request, kind=Job.Kind.PROVISION)


def submit(stack: QemuStack, *, data_disk_mib: int = 0) -> tuple[ProvisioningRequest, Guest]:
    """Request the demo template's tiny guest under a fresh name."""
    owner, _ = get_user_model().objects.get_or_create(username="ann")
    overrides = Overrides(name=stack.new_name(), data_disk_mib=data_disk_mib)
    request = request_submit(owner=owner, template=stack.template, overrides=overrides)
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


def run_action(stack: QemuStack, guest: Guest, kind: Job.Kind, **options: object) -> Job:
    """Run one lifecycle job through the worker and wait until it is final."""
    guest.refresh_from_db()
    owner = get_user_model().objects.get(username="ann")
    job = guest_action(guest=guest, kind=kind, by=owner, **options)

    def final() -> bool:
        job.refresh_from_db()
        return job.status in Job.FINAL

    wait_until(final, timeout=JOB_DEADLINE, what=f"the {kind} job to finish\n{stack.logs()}")
    assert job.status == Job.Status.SUCCEEDED, f"{kind}: {job.error}\n{stack.logs()}"
    assert job.progress == 100
    guest.refresh_from_db()
    return job


def info_of(stack: QemuStack, guest: Guest) -> DomainInfo:
    return operations.get_info(stack.hv, str(guest.uuid))


def seconds(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


# --- the tests --------------------------------------------------------------------------------


def test_it_installs_then_boots_the_guest_from_what_the_installer_wrote(
    qemu_stack: QemuStack,
) -> None:
    stack = qemu_stack
    request, guest = submit(stack)
    uuid = str(guest.uuid)
    wait_for_status(request, Status.WAITING, stack, timeout=30)
    info = info_of(stack, guest)
    # virt-install's way: the installer runs and the final config is defined from the start.
    assert info.active and info.persistent

    stopped = stack.events.expect(uuid, "stopped", "shutdown", timeout=INSTALL_DEADLINE)
    wait_for_status(request, Status.RUNNING, stack, timeout=BOOT_DEADLINE)
    events = list(request.events.all())
    assert [e.to_status for e in events] == ALL_STEPS
    moved_on = next(e for e in events if e.to_status == Status.DEFINING)
    assert moved_on.from_status == Status.WAITING
    latency = seconds(stopped.timestamp, moved_on.created)
    print(f"\ninstaller stopped -> defining: {latency:.3f} s")
    assert -0.5 < latency < 1.5, f"the listener took {latency:.3f} s to move the request on"

    report = wait_for_console(
        guest, timeout=BOOT_DEADLINE, what="the installed guest's READY", ready=True
    )
    assert report.disk_marker == "installed"  # phase 2 booted from the disk phase 1 wrote
    assert report.install_error is None
    total = seconds(request.created, events[-1].created)
    print(f"submitted -> running: {total:.1f} s")

    job = provision_job(request)
    assert job.status == Job.Status.SUCCEEDED and job.progress == 100
    info = info_of(stack, guest)
    assert info.state == GuestState.RUNNING and info.persistent
    for inactive in (False, True):
        root = domxml.parse_untrusted(operations.get_xml(stack.hv, uuid, inactive=inactive))
        assert root.find("os/kernel") is None and root.find("os/initrd") is None
        assert root.find("os/cmdline") is None
    guest.refresh_from_db()
    assert guest.state == Guest.State.RUNNING and guest.persistent

    # The listener tailed the installer's console into the job while it ran.
    lines = list(job.events.filter(kind=JobEvent.Kind.CONSOLE))
    assert lines, "no console lines were recorded while installing"
    assert lines[0].created < moved_on.created
    assert "Linux version" in "".join(line.message for line in lines)


def test_it_runs_lifecycle_jobs_on_the_real_guest(qemu_stack: QemuStack) -> None:
    stack = qemu_stack
    started = time.monotonic()
    request, guest = provision(stack)
    wait_for_console(guest, timeout=BOOT_DEADLINE, what="READY (power button armed)", ready=True)
    print(f"\nprovisioned in {time.monotonic() - started:.1f} s")

    # Graceful shutdown: ACPI, the guest powers itself off, the listener ends the job.
    t = time.monotonic()
    job = run_action(stack, guest, Job.Kind.SHUTDOWN)
    assert "Asked the guest to shut down" in [e.message for e in job.events.all()]
    # The guest itself handled the power button (virtlogd may still be writing the line).
    wait_for_console(guest, timeout=5, what="the guest's POWERDOWN line", powering_off=True)
    assert guest.state == Guest.State.DEFINED and guest.state_reason == "shutdown"
    assert info_of(stack, guest).reason == "shutdown"
    print(f"shutdown: {time.monotonic() - t:.1f} s")

    # Start again: a fresh boot from the same disk shows the marker again.
    t = time.monotonic()
    console_log_path(guest.uuid).unlink()
    run_action(stack, guest, Job.Kind.START)
    assert guest.state == Guest.State.RUNNING
    wait_for_console(
        guest, timeout=BOOT_DEADLINE, what="the marker after a restart", disk_marker="installed"
    )
    print(f"start to marker: {time.monotonic() - t:.1f} s")

    t = time.monotonic()
    run_action(stack, guest, Job.Kind.SUSPEND)
    assert guest.state == Guest.State.PAUSED
    assert info_of(stack, guest).state == GuestState.PAUSED
    run_action(stack, guest, Job.Kind.RESUME)
    assert guest.state == Guest.State.RUNNING
    assert info_of(stack, guest).reason == "unpaused"
    print(f"suspend + resume: {time.monotonic() - t:.1f} s")

    # Save to a portal-chosen file, then restore from it.
    t = time.monotonic()
    run_action(stack, guest, Job.Kind.SAVE)
    assert guest.state == Guest.State.SAVED
    info = info_of(stack, guest)
    assert not info.active and info.reason == "saved" and not info.has_managed_save
    assert Path(save_path(guest)).stat().st_size > 0
    console_log_path(guest.uuid).unlink()
    run_action(stack, guest, Job.Kind.RESTORE)
    assert guest.state == Guest.State.RUNNING
    assert info_of(stack, guest).reason == "restored"
    assert not Path(save_path(guest)).exists()
    carries_on(guest, what="the guest to run on after its restore")
    print(f"save + restore: {time.monotonic() - t:.1f} s")

    # Managed save: libvirt keeps the image; restoring it is a start of the domain.
    t = time.monotonic()
    run_action(stack, guest, Job.Kind.MANAGED_SAVE)
    assert guest.state == Guest.State.SAVED
    info = info_of(stack, guest)
    assert not info.active and info.has_managed_save
    console_log_path(guest.uuid).unlink()
    run_action(stack, guest, Job.Kind.RESTORE)
    info = info_of(stack, guest)
    assert guest.state == Guest.State.RUNNING
    assert info.reason == "restored" and not info.has_managed_save
    carries_on(guest, what="the guest to run on after its managed-save start")
    print(f"managed save + restore: {time.monotonic() - t:.1f} s")

    run_action(stack, guest, Job.Kind.DELETE)
    assert guest.state == Guest.State.UNDEFINED
    assert not info_of(stack, guest).exists
    volumes = [v.name for v in storage.list_volumes(stack.hv, DEMO_POOL_NAME)]
    assert not [v for v in volumes if v.startswith(f"{guest.name}-")]
    assert status_of(request) == Status.RUNNING  # the request's history stays as it was
    print(f"lifecycle total: {time.monotonic() - started:.1f} s")


def test_it_cancels_during_the_install_wait_and_removes_the_installer_and_disk(
    qemu_stack: QemuStack,
) -> None:
    stack = qemu_stack
    request, guest = submit(stack)
    uuid = str(guest.uuid)
    wait_for_status(request, Status.WAITING, stack, timeout=30)
    volume = next(
        v.name
        for v in storage.list_volumes(stack.hv, DEMO_POOL_NAME)
        if v.name.startswith(f"{request.name}-")
    )
    assert info_of(stack, guest).active

    t = time.monotonic()
    cancel(request.pk)
    stack.events.expect(uuid, "stopped", "destroyed", timeout=30)  # killed, not finished
    job = provision_job(request)

    def cleaned_up() -> bool:
        job.refresh_from_db()
        return job.status == Job.Status.CANCELLED

    wait_until(cleaned_up, timeout=30, what=f"the cleanup to finish\n{stack.logs()}")
    print(f"\ncancel to cleaned up: {time.monotonic() - t:.1f} s")
    assert status_of(request) == Status.CANCELLED
    assert [e.to_status for e in request.events.all()] == [*ALL_STEPS[:4], "cancelled"]
    assert not info_of(stack, guest).exists
    assert operations.find_by_name(stack.hv, request.name) is None
    volumes = [v.name for v in storage.list_volumes(stack.hv, DEMO_POOL_NAME)]
    assert volume not in volumes
    guest.refresh_from_db()
    assert guest.state == Guest.State.UNDEFINED
