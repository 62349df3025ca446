"""A worker killed (SIGKILL) at each step of a snapshot job: afterwards libvirt has the snapshot
once or not at all, the rows say the same, and the guest takes the next job."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from provisioning.hypervisor import snapshots as hvsnapshots
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.models import Guest, GuestTemplate, Job
from provisioning.services import events, snapshots
from tests.services.provision.test_crashes import Rig
from tests.support.engine import (
    provision_running,
    tidy_libvirt,  # noqa: F401 - fixture, used through pytestmark
)
from tests.support.stack import wait_until

pytestmark = [pytest.mark.usefixtures("tidy_libvirt"), pytest.mark.timeout(120)]


@pytest.fixture
def crash(stack, tmp_path) -> Rig:
    return Rig(stack, tmp_path)


def in_libvirt(guest: Guest) -> list[str]:
    hv = get_hypervisor(guest.host.uri)
    return [s.name for s in hvsnapshots.list_snapshots(hv, str(guest.uuid))]


def rows(guest: Guest) -> list[str]:
    return list(guest.snapshots.values_list("name", flat=True))


def recover(guest: Guest, job: Job) -> Job:
    """What reconcile does once the dead worker's job is past its time limit."""
    Job.objects.filter(pk=job.pk).update(started=timezone.now() - timedelta(hours=2))
    events.reconcile_host(guest.host)
    job.refresh_from_db()
    return job


@pytest.mark.parametrize(
    ("checkpoint", "left"),
    [("snapshot:begin", []), ("snapshot:taken", ["cut"]), ("snapshot:recorded", ["cut"])],
)
def test_a_worker_killed_while_taking_one_leaves_one_or_none_and_the_rows_agree(
    stack, make_user, kernel_template: GuestTemplate, crash: Rig, checkpoint: str, left: list[str]
) -> None:
    guest = provision_running(make_user("kit"), kernel_template, "crash-snap").guest
    crash.start("worker", faults=checkpoint)

    job = snapshots.snapshot_take(guest=guest, by=guest.owner, name="cut")
    wait_until(
        lambda: crash.fired(checkpoint), timeout=30, what=f"the worker to die at {checkpoint}"
    )
    assert Job.objects.get(pk=job.pk).status == Job.Status.RUNNING  # nobody ended it

    job = recover(guest, job)

    assert job.status == Job.Status.FAILED and "worker was lost" in job.error
    assert in_libvirt(guest) == left  # never two
    assert rows(guest) == left
    # The guest is free again: the next snapshot goes through a live worker.
    crash.start("worker", key="healthy")
    again = snapshots.snapshot_take(guest=guest, by=guest.owner, name="next")
    wait_until(
        lambda: Job.objects.get(pk=again.pk).status in Job.FINAL, timeout=30, what="the next job"
    )
    assert Job.objects.get(pk=again.pk).status == Job.Status.SUCCEEDED
    assert rows(guest) == [*left, "next"] and in_libvirt(guest) == [*left, "next"]


@pytest.mark.parametrize(
    ("checkpoint", "kind"), [("revert:done", "revert"), ("snapshot-delete:done", "delete")]
)
def test_a_worker_killed_after_a_revert_or_delete_is_reconciled_to_what_libvirt_did(
    stack, make_user, kernel_template: GuestTemplate, crash: Rig, checkpoint: str, kind: str
) -> None:
    guest = provision_running(make_user("kat"), kernel_template, "crash-rev").guest
    hv = get_hypervisor(guest.host.uri)
    hvsnapshots.create_snapshot(hv, str(guest.uuid), "a")
    hvsnapshots.create_snapshot(hv, str(guest.uuid), "b")
    snapshots.sync(hv, guest)
    crash.start("worker", faults=checkpoint)

    ask = snapshots.snapshot_revert if kind == "revert" else snapshots.snapshot_delete
    job = ask(guest=guest, name="a", by=guest.owner)
    wait_until(
        lambda: crash.fired(checkpoint), timeout=30, what=f"the worker to die at {checkpoint}"
    )
    job = recover(guest, job)

    assert job.status == Job.Status.FAILED
    expected = ["a", "b"] if kind == "revert" else ["b"]
    assert in_libvirt(guest) == expected and rows(guest) == expected
    if kind == "revert":
        assert guest.snapshots.get(current=True).name == "a"  # where the guest came back from
