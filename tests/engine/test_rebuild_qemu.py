"""A scheduled rebuild on real QEMU: the tiny guest reinstalled from a changed template.

The qemu stack of test_qemu_engine.py (a worker and the listener on qemu:///system, the demo
template) plus a beat process. The tiny guest's installer writes the marker from its kernel command
line to the disk, and the installed guest prints it on its serial console: after the rebuild, the
console proves that the guest booted from a disk the new installer wrote.
"""

from __future__ import annotations

import pytest
from django_celery_beat.models import IntervalSchedule

from provisioning.demo import tinyguest
from provisioning.hypervisor import domxml, operations
from provisioning.models import Job, ProvisioningRequest, ScheduleRun
from provisioning.services import schedules, templates, transitions
from tests.engine.test_qemu_engine import (
    BOOT_DEADLINE,
    INSTALL_DEADLINE,
    QEMU_URI,
    QemuStack,
    info_of,
    provision,
    qemu_stack,  # noqa: F401 - fixture
    wait_for_console,
    wait_for_status,
)
from tests.support.stack import RedisServer, process_env, start_beat, wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]
Status = ProvisioningRequest.Status
MARKER = "rebuilt2"


def test_a_schedule_rebuilds_the_real_guest_from_the_changed_template(
    qemu_stack: QemuStack,  # noqa: F811 - the fixture imported above
    own_redis: RedisServer,
) -> None:
    stack = qemu_stack
    first, guest = provision(stack)
    # The power button works once the guest says READY: the rebuild's shutdown is then graceful.
    wait_for_console(guest, timeout=BOOT_DEADLINE, what="the guest to be READY", ready=True)
    uuid, mac = str(guest.uuid), guest.mac
    assert first.template_version == 1

    template = stack.template
    template.kernel_cmdline = tinyguest.install_cmdline(MARKER)
    template.save()
    templates.template_saved(template=template, changed=True)
    assert template.version == 2

    schedule = schedules.schedule_create(guest=guest, by=None, every_minutes=1)
    task = schedule.periodic_task
    task.interval, _ = IntervalSchedule.objects.get_or_create(
        every=2, period=IntervalSchedule.SECONDS
    )
    task.save()
    env = process_env(redis_url=own_redis.url, LIBVIRT_URI=QEMU_URI, VMPORTAL_DOMAIN_TYPE="qemu")
    stack.procs.append(start_beat(env, name="qemu-beat"))

    def fired() -> ScheduleRun | None:
        return ScheduleRun.objects.filter(schedule=schedule, outcome="fired").first()

    run = wait_until(fired, timeout=30, what=f"the schedule to fire\n{stack.logs()}")
    assert run is not None and run.job is not None
    schedules.schedule_set_enabled(schedule=schedule, enabled=False)  # one rebuild
    request_id = run.job.request_id
    assert request_id is not None
    rebuild = ProvisioningRequest.objects.get(pk=request_id)
    assert rebuild.kind == ProvisioningRequest.Kind.REBUILD and rebuild.template_version == 2

    wait_for_status(rebuild, Status.WAITING, stack, timeout=BOOT_DEADLINE)
    live = domxml.parse_untrusted(operations.get_xml(stack.hv, uuid))
    assert live.findtext("os/cmdline") == tinyguest.install_cmdline(MARKER)
    wait_for_status(rebuild, Status.RUNNING, stack, timeout=INSTALL_DEADLINE + BOOT_DEADLINE)
    report = wait_for_console(
        guest, timeout=BOOT_DEADLINE, what="the rebuilt guest's marker", disk_marker=MARKER
    )
    assert report.install_error is None

    job = Job.objects.get(pk=run.job.pk)
    wait_until(
        lambda: Job.objects.get(pk=job.pk).status in transitions.JOB_FINAL,
        timeout=10,
        what="the rebuild job to end",
    )
    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED, job.error
    log = [e.message for e in job.events.all()]
    assert "Asked the guest to shut down before the rebuild" in log
    assert not any("forced off" in line for line in log)  # it shut down by itself
    guest.refresh_from_db()
    assert (str(guest.uuid), guest.mac, guest.template_version) == (uuid, mac, 2)
    info = info_of(stack, guest)
    assert info.uuid == uuid and info.active and info.persistent
    final = domxml.parse_untrusted(operations.get_xml(stack.hv, uuid, inactive=True))
    assert final.findtext("uuid") == uuid and final.findtext("name") == guest.name
    assert final.find("os/kernel") is None  # the persistent config boots from the disk
    assert ProvisioningRequest.objects.filter(guest=guest).count() == 2
