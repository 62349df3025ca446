"""Lifecycle actions as jobs through a real worker, on guests of libvirt's test driver."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from django.contrib.auth.models import User
from django.utils import timezone

from provisioning.models import Guest, GuestTemplate, Host, Job
from provisioning.services import events, transitions
from provisioning.services.actions import ActionRefused, allowed_actions, guest_action, save_path
from tests.factories import make_guest
from tests.support.engine import (
    domains_named,
    info_of,
    provision_running,
    start_proc,
    tidy_libvirt,  # noqa: F401 - fixture, used through pytestmark
    volume_name,
    volumes_of,
)
from tests.support.stack import wait_until

pytestmark = pytest.mark.usefixtures("tidy_libvirt")
K = Job.Kind


@pytest.fixture
def owner(make_user) -> User:
    return make_user("ann")


@pytest.fixture
def guest(stack, owner: User, kernel_template: GuestTemplate) -> Guest:
    """A running persistent guest on the test driver (provisioned in this process)."""
    request = provision_running(owner, kernel_template, "eng-act1")
    assert request.guest is not None
    return request.guest


@pytest.fixture
def worker(stack, settings, tmp_path: Path) -> Any:
    """A worker for the host's queue, saving guests' memory under this test's folder."""
    settings.SAVE_DIR = tmp_path
    stack.env["VMPORTAL_SAVE_DIR"] = str(tmp_path)
    return start_proc(stack, "worker", "worker")


def act(guest: Guest, kind: str, **options: Any) -> Job:
    """Run an action through the worker; the finished job."""
    guest.refresh_from_db()
    job = guest_action(guest=guest, kind=kind, by=guest.owner, **options)
    wait_until(
        lambda: Job.objects.get(pk=job.pk).status in Job.FINAL,
        timeout=30,
        what=f"{kind} job to finish",
    )
    job.refresh_from_db()
    guest.refresh_from_db()
    return job


def assert_succeeded(job: Job) -> None:
    assert job.status == Job.Status.SUCCEEDED, job.error
    assert job.progress == 100 and job.started is not None and job.completed is not None
    assert [e.message for e in job.events.filter(kind="state")] == [
        "Queued → Running",
        "Running → Succeeded",
    ]


# --- each action -------------------------------------------------------------------------------


def test_force_off_stops_a_running_guest_at_once(guest: Guest, worker: Any) -> None:
    assert_succeeded(act(guest, K.FORCE_OFF))
    info = info_of(guest)
    assert info.state == "defined" and info.reason == "destroyed" and info.persistent
    assert guest.state == Guest.State.DEFINED


def test_start_boots_a_stopped_guest(guest: Guest, worker: Any) -> None:
    assert_succeeded(act(guest, K.FORCE_OFF))
    assert_succeeded(act(guest, K.START))
    assert info_of(guest).state == "running"
    assert guest.state == Guest.State.RUNNING


def test_a_graceful_shutdown_succeeds_and_leaves_the_guest_defined(
    guest: Guest, worker: Any
) -> None:
    # The test driver applies on_poweroff at once, so the job ends within its own run.
    job = act(guest, K.SHUTDOWN)
    assert_succeeded(job)
    info = info_of(guest)
    assert info.state == "defined" and info.reason == "shutdown" and info.persistent
    assert guest.state == Guest.State.DEFINED


def test_reboot_keeps_the_guest_running(guest: Guest, worker: Any) -> None:
    assert_succeeded(act(guest, K.REBOOT))
    assert info_of(guest).state == "running"
    assert guest.state == Guest.State.RUNNING


def test_suspend_pauses_and_resume_runs_again(guest: Guest, worker: Any) -> None:
    assert_succeeded(act(guest, K.SUSPEND))
    assert info_of(guest).state == "paused"
    assert guest.state == Guest.State.PAUSED
    assert_succeeded(act(guest, K.RESUME))
    assert info_of(guest).state == "running"
    assert guest.state == Guest.State.RUNNING


def test_save_writes_the_memory_to_a_file_and_restore_reads_it_back(
    guest: Guest, worker: Any
) -> None:
    assert_succeeded(act(guest, K.SAVE))
    assert info_of(guest).state == "saved"
    assert guest.state == Guest.State.SAVED
    assert Path(save_path(guest)).exists()
    assert_succeeded(act(guest, K.RESTORE))
    assert info_of(guest).state == "running"
    assert guest.state == Guest.State.RUNNING
    assert not Path(save_path(guest)).exists()  # the portal's file is gone once used


def test_managed_save_keeps_the_state_in_libvirt_and_restore_starts_from_it(
    guest: Guest, worker: Any
) -> None:
    assert_succeeded(act(guest, K.MANAGED_SAVE))
    info = info_of(guest)
    assert info.state == "saved" and info.has_managed_save
    assert guest.state == Guest.State.SAVED
    assert K.RESTORE in allowed_actions(guest) and K.START not in allowed_actions(guest)
    assert_succeeded(act(guest, K.RESTORE))  # a start, which libvirt restores from the image
    info = info_of(guest)
    assert info.state == "running" and not info.has_managed_save
    assert guest.state == Guest.State.RUNNING


def test_autostart_turns_on_and_off(guest: Guest, worker: Any) -> None:
    assert_succeeded(act(guest, K.AUTOSTART_ON))
    assert info_of(guest).autostart and guest.autostart
    assert K.AUTOSTART_OFF in allowed_actions(guest)
    assert_succeeded(act(guest, K.AUTOSTART_OFF))
    assert not info_of(guest).autostart and not guest.autostart
    assert K.AUTOSTART_ON in allowed_actions(guest)


def test_delete_removes_the_domain_and_its_volume(guest: Guest, worker: Any) -> None:
    assert volumes_of(guest) == [volume_name(guest)]
    assert_succeeded(act(guest, K.DELETE))
    assert not info_of(guest).exists and domains_named(guest.name) == []
    assert volumes_of(guest) == []
    assert guest.state == Guest.State.UNDEFINED
    assert allowed_actions(guest) == []


def test_delete_with_keep_disk_leaves_the_volume(guest: Guest, worker: Any) -> None:
    assert_succeeded(act(guest, K.DELETE, keep_disk=True))
    assert not info_of(guest).exists
    assert volumes_of(guest) == [volume_name(guest)]  # tidied up by the fixture afterwards
    assert guest.state == Guest.State.UNDEFINED


# --- what is offered and what is refused -------------------------------------------------------

# (state, persistent, autostart): actions that must be offered, and ones that must not.
OFFERED = [
    (
        ("running", True, False),
        {K.SHUTDOWN, K.FORCE_OFF, K.REBOOT, K.SUSPEND, K.SAVE, K.MANAGED_SAVE, K.DELETE}
        | {K.AUTOSTART_ON},
        {K.START, K.RESUME, K.RESTORE, K.AUTOSTART_OFF},
    ),
    (
        ("paused", True, True),
        {K.RESUME, K.FORCE_OFF, K.SAVE, K.MANAGED_SAVE, K.DELETE, K.AUTOSTART_OFF},
        {K.START, K.SUSPEND, K.REBOOT, K.SHUTDOWN, K.RESTORE, K.AUTOSTART_ON},
    ),
    (
        ("defined", True, False),
        {K.START, K.DELETE, K.AUTOSTART_ON},
        {K.SHUTDOWN, K.FORCE_OFF, K.REBOOT, K.SUSPEND, K.RESUME, K.SAVE, K.RESTORE}
        | {K.MANAGED_SAVE, K.AUTOSTART_OFF},
    ),
    (
        ("saved", True, False),
        {K.RESTORE, K.DELETE, K.AUTOSTART_ON},
        {K.START, K.SHUTDOWN, K.SUSPEND, K.RESUME, K.SAVE, K.MANAGED_SAVE, K.REBOOT},
    ),
    (
        ("running", False, False),  # transient: no autostart, no managed save
        {K.SHUTDOWN, K.FORCE_OFF, K.SUSPEND, K.SAVE},
        {K.AUTOSTART_ON, K.AUTOSTART_OFF, K.MANAGED_SAVE, K.START},
    ),
]


@pytest.mark.parametrize(("facts", "offered", "refused"), OFFERED)
def test_allowed_actions_follow_the_guests_state(
    owner: User,
    test_host: Host,
    facts: tuple[str, bool, bool],
    offered: set[str],
    refused: set[str],
) -> None:
    state, persistent, autostart = facts
    guest = make_guest(
        owner=owner,
        host=test_host,
        name="eng-offer1",
        state=state,
        persistent=persistent,
        autostart=autostart,
    )
    allowed = set(allowed_actions(guest))
    assert offered <= allowed
    assert not refused & allowed
    assert allowed_actions(guest) == [k.value for k in K if k in allowed]  # a stable order


def test_an_undefined_guest_offers_nothing(owner: User, test_host: Host) -> None:
    guest = make_guest(owner=owner, host=test_host, name="eng-gone1", state=Guest.State.UNDEFINED)
    assert allowed_actions(guest) == []
    with pytest.raises(ActionRefused, match="not possible while eng-gone1 is undefined"):
        guest_action(guest=guest, kind=K.START, by=owner)


def test_an_action_that_does_not_fit_the_state_is_refused_without_a_job(
    stack, guest: Guest, test_host: Host
) -> None:
    broker = redis.Redis.from_url(stack.redis.url)
    queued = broker.llen(test_host.queue)
    jobs = Job.objects.count()
    with pytest.raises(ActionRefused, match="Resume is not possible while eng-act1 is running"):
        guest_action(guest=guest, kind=K.RESUME, by=guest.owner)
    with pytest.raises(ActionRefused, match="Start is not possible while eng-act1 is running"):
        guest_action(guest=guest, kind=K.START, by=guest.owner)
    assert Job.objects.count() == jobs
    assert broker.llen(test_host.queue) == queued
    assert info_of(guest).state == "running"


def test_a_second_action_while_one_is_active_is_refused_as_busy(
    stack, guest: Guest, test_host: Host
) -> None:
    first = guest_action(guest=guest, kind=K.SUSPEND, by=guest.owner)  # no worker yet: queued
    with pytest.raises(transitions.GuestBusy) as busy:
        guest_action(guest=guest, kind=K.REBOOT, by=guest.owner)
    assert str(busy.value) == (
        f"eng-act1 is busy with suspend job #{first.pk}; try again when it finishes"
    )
    assert busy.value.job.pk == first.pk
    assert list(Job.objects.filter(guest=guest, status__in=Job.ACTIVE)) == [first]
    start_proc(stack, "worker", "worker")
    wait_until(
        lambda: Job.objects.get(pk=first.pk).status == Job.Status.SUCCEEDED,
        timeout=30,
        what="the first job",
    )
    assert info_of(guest).state == "paused"
    guest.refresh_from_db()
    assert_succeeded(act(guest, K.RESUME))  # free again once it finished


# --- shutdown deadlines ----------------------------------------------------------------------


def overdue_shutdown(guest: Guest, **options: Any) -> Job:
    """A shutdown job whose guest ignored the request past its deadline (no worker runs it)."""
    job = guest_action(guest=guest, kind=K.SHUTDOWN, by=guest.owner, **options)
    transitions.job_move(job.pk, expected=Job.Status.QUEUED, to=Job.Status.RUNNING)
    Job.objects.filter(pk=job.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    return job


def test_a_shutdown_past_its_deadline_with_force_is_forced_off(
    stack, guest: Guest, test_host: Host
) -> None:
    job = overdue_shutdown(guest, force=True)
    events.reconcile_host(test_host)
    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED
    assert job.events.filter(message="Graceful shutdown timed out; forced off").exists()
    info = info_of(guest)
    assert info.state == "defined" and info.reason == "destroyed"
    guest.refresh_from_db()
    assert guest.state == Guest.State.DEFINED


def test_a_shutdown_past_its_deadline_without_force_fails_and_leaves_the_guest(
    stack, guest: Guest, test_host: Host
) -> None:
    job = overdue_shutdown(guest)
    events.reconcile_host(test_host)
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert job.error == "the guest did not shut down before the deadline"
    assert info_of(guest).state == "running"
    guest.refresh_from_db()
    assert guest.state == Guest.State.RUNNING


def test_a_shutdown_within_its_deadline_is_left_running(
    stack, guest: Guest, test_host: Host
) -> None:
    job = overdue_shutdown(guest, force=True)
    Job.objects.filter(pk=job.pk).update(deadline=timezone.now() + timedelta(minutes=5))
    events.reconcile_host(test_host)
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING
    assert info_of(guest).state == "running"
