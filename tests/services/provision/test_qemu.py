"""The provisioning engine end to end on real QEMU, with the tiny guest and real processes.

A Celery worker and the event listener run against this test's database and Redis with
LIBVIRT_URI set to this process's QEMU driver (tests/support/qemu_engine.py). The tiny guest's
installer writes a marker to its disk and powers off; booted from that disk it prints the marker
on its serial console, so the console proves that the second phase runs on what the first one
wrote.
"""

# ruff: noqa: F811 - the tests take the fixture imported below as an argument

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest

from provisioning.hypervisor import domxml, operations, storage
from provisioning.hypervisor.types import GuestState
from provisioning.models import Guest, Job, JobEvent
from provisioning.services.actions import guest_action, save_path
from provisioning.services.consoles import console_log_path
from provisioning.services.demo import DEMO_POOL_NAME
from provisioning.services.provision import cancel
from tests.support.qemu_engine import (
    ALL_STEPS,
    BOOT_DEADLINE,
    INSTALL_DEADLINE,
    JOB_DEADLINE,
    QemuStack,
    Status,
    console,
    info_of,
    provision,
    provision_job,
    qemu_stack,  # noqa: F401 - fixture
    status_of,
    submit,
    wait_for_console,
    wait_for_status,
)
from tests.support.stack import wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]


def carries_on(guest: Guest, *, what: str) -> None:
    """Wait for the restored guest's next ALIVE line; it must run on, not boot afresh."""

    def alive() -> str:
        text = console(guest)
        return text if "VMPORTAL-ALIVE" in text else ""

    text = wait_until(alive, timeout=20, what=what, every=0.2)
    # The log was removed before the restore: all of it comes from the restored process.
    assert "VMPORTAL-DISK" not in text and "Linux version" not in text, text


def run_action(stack: QemuStack, guest: Guest, kind: Job.Kind, **options: object) -> Job:
    """Run one lifecycle job through the worker and wait until it is final."""
    guest.refresh_from_db()
    job = guest_action(guest=guest, kind=kind, by=stack.owner, **options)

    def final() -> bool:
        job.refresh_from_db()
        return job.status in Job.FINAL

    wait_until(final, timeout=JOB_DEADLINE, what=f"the {kind} job to finish\n{stack.logs()}")
    assert job.status == Job.Status.SUCCEEDED, f"{kind}: {job.error}\n{stack.logs()}"
    assert job.progress == 100
    guest.refresh_from_db()
    return job


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
    assert any(e.message.startswith("Asked the guest to shut down") for e in job.events.all())
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
