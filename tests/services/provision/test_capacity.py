"""Waiting installs hold no worker slot: 200 wait on two slots and a suspend still runs at once."""

from __future__ import annotations

import time

import pytest

from provisioning.models import Guest, GuestTemplate, Host, Job, ProvisioningRequest
from provisioning.services.actions import guest_action
from tests.factories import BIG_QUOTA
from tests.support.engine import (
    domains_named,
    info_of,
    provision_running,
    start_proc,
    submit,
    tidy_libvirt,  # noqa: F401 - fixture, used through pytestmark
)
from tests.support.stack import wait_until

pytestmark = pytest.mark.usefixtures("tidy_libvirt")
Status = ProvisioningRequest.Status
INSTALLS = 200
PREFIX = "cap-"


def test_200_waiting_installs_leave_room_for_a_suspend_within_a_second(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate, capsys
) -> None:
    # A quota far above what the test asks (tidy_libvirt sizes the host), so only slots limit.
    owner = make_user("ann", quota=BIG_QUOTA)
    guest = provision_running(owner, kernel_template, "cap-bystander").guest
    start_proc(stack, "worker", "worker", concurrency=2)
    start_proc(stack, "listener", "listener")

    began = time.monotonic()
    requests = [submit(owner, kernel_template, f"{PREFIX}{i:03d}") for i in range(INSTALLS)]
    ours = ProvisioningRequest.objects.filter(pk__in=[r.pk for r in requests])
    wait_until(
        lambda: not ours.exclude(status__in=[Status.WAITING, Status.FAILED]).exists(),
        timeout=100,
        what=f"{INSTALLS} installs to reach the installer wait",
        every=0.25,
    )
    to_wait = time.monotonic() - began
    failed = list(ours.filter(status=Status.FAILED).values_list("name", "error"))
    assert failed == []
    assert ours.filter(status=Status.WAITING).count() == INSTALLS
    # Every installer is still running: the requests wait on libvirt, not on a worker.
    guests = Guest.objects.filter(pk__in=ours.values("guest_id"))
    assert sum(info_of(g).active for g in guests) == INSTALLS
    assert len(domains_named(f"{PREFIX}000")) == 1

    asked = time.monotonic()
    job = guest_action(guest=guest, kind=Job.Kind.SUSPEND, by=owner)
    wait_until(
        lambda: Job.objects.get(pk=job.pk).status == Job.Status.SUCCEEDED,
        timeout=10,
        what="the suspend job",
        every=0.01,
    )
    took = time.monotonic() - asked
    with capsys.disabled():
        print(
            f"\nCAPACITY: {INSTALLS} waiting in {to_wait:.1f} s; "
            f"suspend done in {took * 1000:.0f} ms"
        )
    assert info_of(guest).state == "paused"
    assert took < 1.0
    assert ours.filter(status=Status.WAITING).count() == INSTALLS  # nothing moved meanwhile
