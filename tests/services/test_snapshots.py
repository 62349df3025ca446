"""Snapshots as jobs on guests of libvirt's test driver: take, revert, delete, the refusals, and
the rows following libvirt (after each job, and reconcile adopting and forgetting)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User

from provisioning.hypervisor import operations
from provisioning.hypervisor import snapshots as hvsnapshots
from provisioning.hypervisor.connection import get_hypervisor
from provisioning.hypervisor.types import GuestState
from provisioning.models import AuditEvent, Guest, GuestTemplate, Job, Quota, Snapshot
from provisioning.services import actions, events, migrate, snapshots, transitions
from tests.factories import make_host
from tests.support.engine import (
    provision_running,
    tidy_libvirt,  # noqa: F401 - fixture, used through pytestmark
)

pytestmark = pytest.mark.usefixtures("tidy_libvirt")
K = Job.Kind


@pytest.fixture
def owner(make_user) -> User:
    return make_user("ann")


@pytest.fixture
def guest(stack, owner: User, kernel_template: GuestTemplate) -> Guest:
    """A running persistent guest on the test driver (provisioned in this process)."""
    request = provision_running(owner, kernel_template, "snap1")
    assert request.guest is not None
    return request.guest


def run(job: Job) -> Job:
    """Run the queued job here, as a worker would; the finished job."""
    actions.run_job(job.pk)
    job.refresh_from_db()
    return job


def names(guest: Guest) -> list[str]:
    return list(guest.snapshots.values_list("name", flat=True))


def in_libvirt(guest: Guest) -> list[str]:
    return [
        s.name for s in hvsnapshots.list_snapshots(get_hypervisor(guest.host.uri), str(guest.uuid))
    ]


def test_a_running_guests_snapshot_holds_its_memory_and_the_row_mirrors_libvirt(guest) -> None:
    job = run(
        snapshots.snapshot_take(guest=guest, by=guest.owner, name="before", description="a  note")
    )

    assert job.status == Job.Status.SUCCEEDED, job.error
    snap = guest.snapshots.get()
    assert (snap.name, snap.description, snap.state, snap.memory, snap.current) == (
        "before",
        "a note",
        "running",
        True,
        True,
    )
    assert in_libvirt(guest) == ["before"]
    assert AuditEvent.objects.filter(action="snapshot.take", result="ok").exists()


def test_a_stopped_guests_snapshot_holds_its_disks_only(guest) -> None:
    operations.destroy(get_hypervisor(guest.host.uri), str(guest.uuid))
    events.reconcile_host(guest.host)
    guest.refresh_from_db()
    assert guest.state == Guest.State.DEFINED

    run(snapshots.snapshot_take(guest=guest, by=guest.owner, name="cold"))

    snap = guest.snapshots.get()
    assert (snap.state, snap.memory) == ("shutoff", False)


def test_reverting_brings_the_guest_back_as_it_was_when_taken(guest) -> None:
    hv = get_hypervisor(guest.host.uri)
    run(snapshots.snapshot_take(guest=guest, by=guest.owner, name="up"))
    operations.destroy(hv, str(guest.uuid))
    events.reconcile_host(guest.host)
    guest.refresh_from_db()
    assert guest.state == Guest.State.DEFINED

    job = run(snapshots.snapshot_revert(guest=guest, name="up", by=guest.owner))

    guest.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED, job.error
    assert guest.state == Guest.State.RUNNING
    assert operations.get_info(hv, str(guest.uuid)).state is GuestState.RUNNING
    assert guest.snapshots.get(name="up").current


def test_deleting_one_keeps_the_others(guest) -> None:
    for name in ("one", "two"):
        run(snapshots.snapshot_take(guest=guest, by=guest.owner, name=name))

    job = run(snapshots.snapshot_delete(guest=guest, name="one", by=guest.owner))

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert names(guest) == ["two"] and in_libvirt(guest) == ["two"]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("has space", "1 to 50 letters"),
        ("-dash-first", "starting with a letter or digit"),
        ("x" * 51, "1 to 50 letters"),
    ],
)
def test_a_bad_name_is_refused_before_any_job(guest, name: str, why: str) -> None:
    with pytest.raises(snapshots.SnapshotRefused, match=why):
        snapshots.snapshot_take(guest=guest, by=guest.owner, name=name)
    assert not guest.jobs.filter(kind=K.SNAPSHOT).exists()


def test_a_name_it_has_is_refused_and_so_is_a_name_it_does_not_have(guest) -> None:
    run(snapshots.snapshot_take(guest=guest, by=guest.owner, name="same"))

    with pytest.raises(snapshots.SnapshotRefused, match="named same already"):
        snapshots.snapshot_take(guest=guest, by=guest.owner, name="same")
    with pytest.raises(snapshots.SnapshotRefused, match="no snapshot named other"):
        snapshots.snapshot_revert(guest=guest, name="other", by=guest.owner)


def test_past_the_quota_a_new_snapshot_is_refused_with_the_limit_named(guest, owner) -> None:
    Quota.objects.create(user=owner, max_snapshots_per_guest=2)
    for name in ("a", "b"):
        run(snapshots.snapshot_take(guest=guest, by=owner, name=name))

    with pytest.raises(snapshots.SnapshotRefused, match=r"holds 2 snapshots.*per guest \(2\)"):
        snapshots.snapshot_take(guest=guest, by=owner, name="c")
    assert AuditEvent.objects.filter(action="snapshot.take", result="refused").exists()
    assert in_libvirt(guest) == ["a", "b"]


def test_an_autodestroy_guest_is_refused_and_says_why(guest) -> None:
    Guest.objects.filter(pk=guest.pk).update(autodestroy=True)
    guest.refresh_from_db()

    with pytest.raises(snapshots.SnapshotRefused, match="autodestroyed"):
        snapshots.snapshot_take(guest=guest, by=guest.owner)


def test_disks_that_cannot_hold_snapshots_fail_the_job_with_the_reason() -> None:
    from lxml import etree

    root = etree.fromstring(
        "<domain type='kvm'><devices>"
        "<disk type='volume' device='disk'><driver name='qemu' type='raw'/>"
        "<source pool='p' volume='v'/><target dev='vda'/></disk>"
        "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda'/>"
        "<readonly/></disk></devices></domain>"
    )
    reason = hvsnapshots.cannot_snapshot(etree.tostring(root, encoding="unicode"))
    root.find("devices/disk/driver").set("type", "qcow2")
    fine = hvsnapshots.cannot_snapshot(etree.tostring(root, encoding="unicode"))

    assert reason == "its disk vda is raw, and only qcow2 disks hold snapshots"
    assert fine is None  # the read-only CD-ROM needs none


def test_a_second_job_while_one_runs_is_refused_busy(guest) -> None:
    snapshots.snapshot_take(guest=guest, by=guest.owner, name="first")

    with pytest.raises(transitions.GuestBusy):
        snapshots.snapshot_take(guest=guest, by=guest.owner, name="second")


def test_migration_refuses_a_guest_with_snapshots_and_says_why(guest) -> None:
    make_host("other", uri=guest.host.uri.replace("default", "other"))
    run(snapshots.snapshot_take(guest=guest, by=guest.owner, name="keep"))

    with pytest.raises(migrate.MigrationRefused, match="1 internal snapshot, which libvirt"):
        migrate.migration_start(guest=guest, by=guest.owner, dest=None)


def test_delete_takes_the_snapshots_with_the_guest(guest) -> None:
    run(snapshots.snapshot_take(guest=guest, by=guest.owner, name="gone-too"))

    job = run(actions.guest_action(guest=guest, kind=K.DELETE, by=guest.owner))

    assert job.status == Job.Status.SUCCEEDED, job.error
    assert not Snapshot.objects.filter(guest=guest).exists()


def test_a_rebuild_takes_the_snapshots_with_the_old_disks(guest) -> None:
    from provisioning.models import ProvisioningRequest
    from provisioning.services import provision
    from tests.support.engine import finish_installer, status_of

    run(snapshots.snapshot_take(guest=guest, by=guest.owner, name="old-disk"))

    request = provision.rebuild_submit(guest=guest, by=guest.owner, latest=True)
    # The steps here, as a worker would run them: the guest shuts down (at once on the test
    # driver), the disks are made anew, the installer runs and powers off, phase 2 boots.
    for _ in range(10):
        provision.advance(request.pk)
        status = status_of(request)
        if status == ProvisioningRequest.Status.WAITING:
            finish_installer(request)
            provision.request_domain_stopped(request.pk)
        elif status in ProvisioningRequest.FINAL:
            break

    assert status_of(request) == ProvisioningRequest.Status.RUNNING, request.error
    assert names(guest) == [] and in_libvirt(guest) == []


def test_reconcile_adopts_a_snapshot_made_with_virsh_and_forgets_one_deleted_there(
    guest, settings
) -> None:
    settings.SNAPSHOT_RECONCILE_SECONDS = 1
    hv = get_hypervisor(guest.host.uri)
    run(snapshots.snapshot_take(guest=guest, by=guest.owner, name="portal"))
    hvsnapshots.create_snapshot(hv, str(guest.uuid), "outside")
    hvsnapshots.delete_snapshot(hv, str(guest.uuid), "portal")
    snapshots.client().delete(f"vmportal:snapshot-reconcile:{guest.host.pk}")

    events.reconcile_host(guest.host)

    assert names(guest) == ["outside"]
    adopted = guest.snapshots.get()
    assert adopted.size_bytes is None  # not one the portal took
    assert AuditEvent.objects.filter(action="snapshot.reconcile").exists()


def test_the_full_look_is_throttled_but_a_guest_with_a_recent_job_is_looked_at(
    guest, settings
) -> None:
    settings.SNAPSHOT_RECONCILE_SECONDS = 3600
    hv = get_hypervisor(guest.host.uri)
    events.reconcile_host(guest.host)  # the hour's full look
    hvsnapshots.create_snapshot(hv, str(guest.uuid), "quiet")
    events.reconcile_host(guest.host)
    assert names(guest) == []  # not looked at again within the hour

    job = snapshots.snapshot_take(guest=guest, by=guest.owner, name="loud")
    # The worker died after libvirt took it: the job stays running, nothing recorded it.
    transitions.job_move(job.pk, expected=Job.Status.QUEUED, to=Job.Status.RUNNING)
    hvsnapshots.create_snapshot(hv, str(guest.uuid), "loud")
    Job.objects.filter(pk=job.pk).update(status=Job.Status.FAILED)
    Job.objects.filter(pk=job.pk).update(completed=job.created)

    events.reconcile_host(guest.host)

    # That guest is looked at whole: what its dead job took, and what was made meanwhile.
    assert sorted(names(guest)) == ["loud", "quiet"]


# --- scheduled snapshots ---------------------------------------------------------------------


def fire(schedule_id: int) -> Job | None:
    """One firing of the schedule, its job run here; the job (None when nothing started)."""
    from provisioning.services import schedules

    made = schedules.schedule_fire(schedule_id)
    if made is None or made.job is None:
        return None
    return run(made.job)


def test_a_snapshot_schedule_keeps_the_newest_and_never_touches_other_snapshots(guest) -> None:
    from provisioning.services import schedules

    run(snapshots.snapshot_take(guest=guest, by=guest.owner, name="mine"))
    schedule = schedules.schedule_create(
        guest=guest, by=guest.owner, every_minutes=60, action="snapshot", keep=2
    )
    taken = []
    for _ in range(3):
        job = fire(schedule.pk)
        assert job is not None and job.status == Job.Status.SUCCEEDED, job and job.error
        taken.append(job.data["name"])

    theirs = sorted(n for n in names(guest) if n.startswith(f"auto-{schedule.pk}-"))
    assert theirs == taken[1:]  # the oldest went once the third was taken
    assert "mine" in names(guest)
    assert sorted(in_libvirt(guest)) == sorted(names(guest))
    run_rows = list(schedule.runs.values_list("outcome", flat=True))
    assert run_rows.count("fired") == 3


def test_a_scheduled_snapshot_that_cannot_be_taken_deletes_nothing(guest, owner) -> None:
    from provisioning.services import schedules

    Quota.objects.create(user=owner, max_snapshots_per_guest=3)
    schedule = schedules.schedule_create(
        guest=guest, by=owner, every_minutes=60, action="snapshot", keep=2
    )
    for _ in range(2):
        fire(schedule.pk)
    run(snapshots.snapshot_take(guest=guest, by=owner, name="fills-the-quota"))
    before = sorted(names(guest))

    assert fire(schedule.pk) is None  # refused: the quota is full, so the oldest stays
    assert sorted(names(guest)) == before
    last = schedule.runs.order_by("-fired").first()
    assert last.outcome == "failed" and "as many as your quota allows" in last.message


def test_a_snapshot_schedule_must_keep_fewer_than_the_quota(guest) -> None:
    from provisioning.services import schedules

    with pytest.raises(schedules.ScheduleError, match="Keep 1 to 4 snapshots"):
        schedules.schedule_create(
            guest=guest, by=guest.owner, every_minutes=60, action="snapshot", keep=5
        )
    with pytest.raises(schedules.ScheduleError, match="Keep 1 to 4"):
        schedules.schedule_create(guest=guest, by=guest.owner, every_minutes=60, action="snapshot")


LONG = "nightly-before-the-kernel-upgrade-of-the-whole-fleet-2026"  # 57 characters
ODD = "before upgrade/v2"  # what virsh takes and the portal would not


def test_reconcile_adopts_names_the_portal_would_not_give_once_and_keeps_them(
    guest, settings
) -> None:
    settings.SNAPSHOT_RECONCILE_SECONDS = 1
    hv = get_hypervisor(guest.host.uri)
    for name in (LONG, LONG + "-b", ODD):  # the first two share their first fifty characters
        hvsnapshots.create_snapshot(hv, str(guest.uuid), name)

    assert snapshots.sync(hv, guest) == (3, 0)
    assert sorted(names(guest)) == sorted([LONG, LONG + "-b", ODD])
    assert snapshots.sync(hv, guest) == (0, 0)  # the same rows on the next look: no churn
    assert sorted(names(guest)) == sorted(in_libvirt(guest))


def test_a_snapshot_named_outside_the_portal_is_reverted_and_deleted_from_the_page_and_api(
    guest, client
) -> None:
    from urllib.parse import quote

    from django.urls import reverse

    from tests.api.conftest import call, make_token

    hv = get_hypervisor(guest.host.uri)
    for name in (LONG, ODD):
        hvsnapshots.create_snapshot(hv, str(guest.uuid), name)
    snapshots.sync(hv, guest)
    client.force_login(guest.owner)

    page = client.get(f"/guests/{guest.uuid}/")
    assert page.status_code == 200
    revert = reverse("snapshot-revert", args=[guest.uuid, ODD])
    assert revert.encode() in page.content
    answer = client.post(revert, {"confirm": ODD})
    assert answer.status_code == 302
    job = guest.jobs.get(kind=K.REVERT)
    assert job.data == {"name": ODD}
    assert run(job).status == Job.Status.SUCCEEDED, job.error

    token = make_token(guest.owner, name="odd names")
    listed = call("GET", f"/api/v1/guests/{guest.uuid}/snapshots", token=token).json()
    assert sorted(i["name"] for i in listed["items"]) == sorted([LONG, ODD])
    answer = call("DELETE", f"/api/v1/guests/{guest.uuid}/snapshots/{quote(ODD)}", token=token)
    assert answer.status_code == 202, answer.content
    assert run(guest.jobs.get(kind=K.SNAPSHOT_DELETE)).status == Job.Status.SUCCEEDED
    assert in_libvirt(guest) == [LONG] and names(guest) == [LONG]
