"""The lifecycle guide's flags the test driver lacks, on real QEMU: START_PAUSED, AUTODESTROY.

Transient-only requests of the tiny guest's installed disk (imported), through the worker and
the listener as processes. An autodestroy guest is destroyed by libvirt when the worker whose
connection started it dies; the portal records why.
"""

# ruff: noqa: F811 - the tests take the fixture imported below as an argument

from __future__ import annotations

import signal

import pytest

from provisioning.hypervisor.types import GuestState
from provisioning.models import Guest, GuestTemplate, Job, StoragePool
from provisioning.services import events
from provisioning.services.actions import ActionRefused, allowed_actions, guest_action
from provisioning.services.demo import DEMO_POOL_NAME, demo_disk
from provisioning.services.provision import Overrides, request_submit
from tests.factories import make_template
from tests.support.qemu_engine import (
    BOOT_DEADLINE,
    INSTALL_DEADLINE,
    JOB_DEADLINE,
    QemuStack,
    Status,
    console,
    info_of,
    qemu_stack,  # noqa: F401 - fixture
    wait_for_status,
)
from tests.support.stack import wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(240)]


def transient_template(stack: QemuStack) -> GuestTemplate:
    pool = StoragePool.objects.get(name=DEMO_POOL_NAME)
    return make_template(
        name="Tiny Linux, transient",
        method=GuestTemplate.Method.IMPORT,
        lifecycle=GuestTemplate.Lifecycle.TRANSIENT,
        base_volume=demo_disk(host=pool.host, log=lambda _line: None),
        pool=pool,
        disk_mib_min=16,
        disk_mib_default=64,
    )


def ask(stack: QemuStack, template: GuestTemplate, **options: bool) -> tuple[Guest, object]:
    overrides = Overrides(name=stack.new_name(), **options)
    request = request_submit(owner=stack.owner, template=template, overrides=overrides)
    wait_for_status(request, Status.RUNNING, stack, timeout=INSTALL_DEADLINE + BOOT_DEADLINE)
    assert request.guest is not None
    request.guest.refresh_from_db()
    return request.guest, request


def test_start_paused_starts_a_transient_guest_with_its_cpus_never_run(
    qemu_stack: QemuStack,
) -> None:
    guest, request = ask(qemu_stack, transient_template(qemu_stack), start_paused=True)
    info = info_of(qemu_stack, guest)
    assert info.state == GuestState.PAUSED and not info.persistent
    assert guest.state == Guest.State.PAUSED
    last = request.events.order_by("id").last()  # type: ignore[attr-defined]
    assert last.note == "Started paused (transient)"
    # VIR_DOMAIN_START_PAUSED: not one instruction ran, so the serial console is silent.
    assert "VMPORTAL" not in console(guest)
    job = guest_action(guest=guest, kind=Job.Kind.RESUME, by=qemu_stack.owner)
    wait_until(lambda: "VMPORTAL-READY" in console(guest), timeout=BOOT_DEADLINE, what="the boot")
    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED


def test_an_autodestroy_guest_dies_with_the_workers_connection_and_the_page_says_why(
    qemu_stack: QemuStack,
) -> None:
    guest, request = ask(qemu_stack, transient_template(qemu_stack), autodestroy=True)
    assert guest.autodestroy and not info_of(qemu_stack, guest).persistent
    last = request.events.order_by("id").last()  # type: ignore[attr-defined]
    assert last.note == "Started (transient, autodestroy)"
    assert not {Job.Kind.SAVE, Job.Kind.MANAGED_SAVE} & set(allowed_actions(guest))
    with pytest.raises(ActionRefused, match="autodestroyed"):
        guest_action(guest=guest, kind=Job.Kind.SAVE, by=qemu_stack.owner)
    worker = next(p for p in qemu_stack.procs if p.name == "qemu-worker")
    worker.signal_group(signal.SIGKILL)  # its libvirt connection closes with it
    worker.popen.wait(10)
    wait_until(
        lambda: not info_of(qemu_stack, guest).exists,
        timeout=JOB_DEADLINE,
        what="libvirt to destroy the autodestroy guest",
    )

    def recorded() -> bool:
        guest.refresh_from_db()
        return guest.state == Guest.State.UNDEFINED

    wait_until(recorded, timeout=JOB_DEADLINE, what="the listener to record it")
    assert guest.state_reason == events.AUTODESTROYED
