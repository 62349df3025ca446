"""Provisioning requests end to end: real workers, Redis and libvirt's test driver."""

from __future__ import annotations

from datetime import timedelta
from functools import partial
from typing import Any

import pytest
import redis
from django.contrib.auth.models import Group
from django.db import transaction
from django.utils import timezone

from provisioning import faults, queue
from provisioning.hypervisor import operations, storage
from provisioning.models import (
    Guest,
    GuestTemplate,
    Host,
    Job,
    JobEvent,
    ProvisioningRequest,
    Quota,
    RequestEvent,
)
from provisioning.services import events, provision, transitions
from provisioning.services.provision import CRASH_POINTS, SubmitError, steps
from provisioning.services.provision.steps import PROGRESS
from tests.factories import make_guest, make_pool
from tests.support.engine import (
    INSTALL_PATH,
    NO_INSTALL_PATH,
    TRANSIENT_PATH,
    Subscriber,
    advance_until,
    domains_named,
    finish_installer,
    hv,
    import_template,
    in_threads,
    info_of,
    make_base_volume,
    moves,
    new_log,
    provision_running,
    start_proc,
    status_of,
    stays,
    submit,
    tasks_done,
    tidy_libvirt,  # noqa: F401 - fixture, used through pytestmark
    volumes_of,
)
from tests.support.libvirt import TEST_POOL
from tests.support.stack import wait_until

pytestmark = pytest.mark.usefixtures("tidy_libvirt")
Status = ProvisioningRequest.Status


def path_of(statuses: list[str]) -> list[tuple[str, str]]:
    """The (from, to) moves of a request that went through `statuses` from pending."""
    return list(zip(["pending", *statuses[:-1]], statuses, strict=True))


def job_of(request: ProvisioningRequest) -> Job:
    return Job.objects.get(request=request, kind=Job.Kind.PROVISION)


def wait_status(request: ProvisioningRequest, status: str, timeout: float = 30) -> None:
    wait_until(lambda: status_of(request) == status, timeout=timeout, what=f"{request} {status}")


def wait_job(request: ProvisioningRequest, status: str) -> Job:
    """The request's job once it reached `status` (it closes just after the request moves)."""
    wait_until(lambda: job_of(request).status == status, timeout=10, what=f"job {status}")
    return job_of(request)


def assert_nothing_left(request: ProvisioningRequest) -> None:
    """No domain, no volume, and a guest row that says undefined."""
    guest = request.guest
    assert guest is not None
    # The failure is committed first and its clean-up follows it: wait for that to finish. A new
    # guest's row says undefined all through its install, so the clean-up's own marks are what
    # libvirt no longer holds (its last act deletes the disks).
    wait_until(
        lambda: (
            Guest.objects.get(pk=guest.pk).state == Guest.State.UNDEFINED
            and not info_of(guest).exists
            and volumes_of(guest) == []
        ),
        timeout=15,
        what=f"{guest.name}'s clean-up",
    )
    guest.refresh_from_db()
    assert not info_of(guest).exists
    assert domains_named(guest.name) == []
    assert volumes_of(guest) == []
    assert guest.state == Guest.State.UNDEFINED


@pytest.fixture
def base_volume(test_host: Host) -> Any:
    name = make_base_volume()
    yield name
    storage.delete_volume(hv(), TEST_POOL, name)


# --- the paths ---------------------------------------------------------------------------------


def test_it_takes_a_kernel_install_from_pending_to_running_and_tells_subscribers_in_order(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    start_proc(stack, "worker", "worker")
    start_proc(stack, "listener", "listener")
    subscriber = Subscriber(stack.redis.url, "vmportal:request:*")
    try:
        request = submit(make_user("ann"), kernel_template, "eng-full1")
        wait_status(request, Status.WAITING)
        assert job_of(request).status == Job.Status.RUNNING
        wait_until(  # the job's progress is logged just after the request moves
            lambda: job_of(request).progress == PROGRESS[Status.WAITING],
            timeout=5,
            what="the job at the installer wait's progress",
        )
        info = info_of(request.guest)
        assert info.active and info.persistent  # the final config is there from the first second
        finish_installer(request)
        wait_status(request, Status.RUNNING)
        channel = transitions.request_channel(request.pk)
        wait_until(
            lambda: len(subscriber.on(channel)) == len(INSTALL_PATH),
            timeout=10,
            what="a message per move",
        )
    finally:
        subscriber.close()

    published = subscriber.on(channel)
    assert [(m["from"], m["status"]) for m in published] == path_of(INSTALL_PATH)
    assert all(m["request"] == request.pk for m in published)
    assert moves(request) == path_of(INSTALL_PATH)
    assert request.completed is not None and request.error == ""

    job = wait_job(request, Job.Status.SUCCEEDED)
    assert job.progress == 100
    assert job.started is not None and job.completed is not None
    assert job.created <= job.started <= job.completed
    history = list(job.events.all())
    assert [e.message for e in history if e.kind == JobEvent.Kind.STATE] == [
        "Queued → Running",
        "Running → Succeeded",
    ]
    assert history[0].progress == 0 and history[0].message.startswith("Requested")
    progress = [e.progress for e in history if e.progress is not None]
    assert progress == sorted(progress) and progress[-1] == 100
    assert {PROGRESS[Status(s)] for s in INSTALL_PATH} <= set(progress)

    guest = request.guest
    guest.refresh_from_db()
    assert guest.state == Guest.State.RUNNING and guest.persistent
    assert "<kernel>" not in operations.get_xml(hv(), str(guest.uuid))
    assert volumes_of(guest) == [f"eng-full1-{guest.uuid.hex[:8]}.qcow2"]


def test_a_persistent_import_is_cloned_defined_and_started_without_an_installer(
    stack, make_user, test_host: Host, base_volume: str
) -> None:
    template = import_template(test_host, lifecycle="persistent", base_volume=base_volume)
    start_proc(stack, "worker", "worker")
    request = submit(make_user("ann"), template, "eng-persist1")
    wait_status(request, Status.RUNNING)
    info = info_of(request.guest)
    assert info.active and info.persistent and not info.autostart
    assert moves(request) == path_of(NO_INSTALL_PATH)
    assert volumes_of(request.guest) == [f"eng-persist1-{request.guest.uuid.hex[:8]}.qcow2"]
    assert storage.get_volume(hv(), TEST_POOL, base_volume).name == base_volume  # the base stays
    request.guest.refresh_from_db()
    assert request.guest.persistent and request.guest.state == Guest.State.RUNNING
    assert wait_job(request, Job.Status.SUCCEEDED).progress == 100


def test_a_transient_guest_runs_without_a_persistent_config(
    stack, make_user, test_host: Host, base_volume: str
) -> None:
    template = import_template(test_host, lifecycle="transient", base_volume=base_volume)
    start_proc(stack, "worker", "worker")
    request = submit(make_user("ann"), template, "eng-trans1")
    wait_status(request, Status.RUNNING)
    info = info_of(request.guest)
    assert info.state == "running" and not info.persistent
    assert moves(request) == path_of(TRANSIENT_PATH)
    # Its history says what happened in libvirt terms: started, never defined.
    notes = [f"{e.get_to_status_display()} {e.note}" for e in request.events.all()]
    assert notes[-1] == "Running Started (transient)", notes
    assert not any("defin" in n.lower() for n in notes), notes
    request.guest.refresh_from_db()
    assert request.guest.state == Guest.State.RUNNING and not request.guest.persistent


def test_the_autostart_option_turns_libvirt_autostart_on(
    stack, make_user, test_host: Host, base_volume: str
) -> None:
    template = import_template(test_host, lifecycle="persistent", base_volume=base_volume)
    start_proc(stack, "worker", "worker")
    request = submit(make_user("ann"), template, "eng-auto1", autostart=True)
    wait_status(request, Status.RUNNING)
    assert info_of(request.guest).autostart
    request.guest.refresh_from_db()
    assert request.guest.autostart


def test_start_paused_leaves_the_guest_paused_at_the_end(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    start_proc(stack, "worker", "worker")
    start_proc(stack, "listener", "listener")
    request = submit(make_user("ann"), kernel_template, "eng-paused1", start_paused=True)
    wait_status(request, Status.WAITING)
    assert info_of(request.guest).state == "running"  # only the final start is paused
    finish_installer(request)
    wait_status(request, Status.RUNNING)
    assert info_of(request.guest).state == "paused"
    request.guest.refresh_from_db()
    assert request.guest.state == Guest.State.PAUSED
    assert wait_job(request, Job.Status.SUCCEEDED).progress == 100


# --- refused and failed requests ---------------------------------------------------------------


def counts() -> tuple[int, int, int]:
    return (Guest.objects.count(), ProvisioningRequest.objects.count(), Job.objects.count())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param({"vcpus": 99}, "vcpus", id="too-many-vcpus"),
        pytest.param({"memory_mib": 64}, "memory_mib", id="too-little-memory"),
        pytest.param({"disk_mib": 10**7}, "disk_mib", id="too-much-disk"),
        pytest.param({"name": "-bad name"}, "name", id="bad-name"),
        pytest.param({"name": "x" * 64}, "name", id="long-name"),
        pytest.param({"autodestroy": True}, "autodestroy", id="autodestroy-persistent"),
    ],
)
def test_bad_overrides_are_refused_naming_the_field_and_make_nothing(
    stack, make_user, kernel_template: GuestTemplate, overrides: dict[str, Any], field: str
) -> None:
    owner = make_user("ann")
    before = counts()
    wanted = {"name": "eng-bad1", **overrides}
    with pytest.raises(SubmitError) as refused:
        submit(owner, kernel_template, **wanted)
    assert field in refused.value.errors
    assert refused.value.errors[field]
    assert counts() == before
    assert domains_named(wanted["name"]) == []


def test_a_name_in_use_is_refused_and_makes_nothing(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    owner = make_user("ann")
    first = submit(owner, kernel_template, "eng-dup1")  # pending: its name is taken already
    make_guest(owner=owner, host=test_host, name="eng-dup2", state="defined")
    before = counts()
    for name in ("eng-dup1", "eng-dup2"):
        with pytest.raises(SubmitError) as refused:
            submit(owner, kernel_template, name)
        assert refused.value.errors == {"name": f"A guest named {name} exists already."}
    assert counts() == before
    assert domains_named("eng-dup1") == [] and domains_named("eng-dup2") == []
    # A cancelled request, and a guest that is gone, free their names.
    provision.cancel(first.pk)
    Guest.objects.filter(name="eng-dup2").update(state=Guest.State.UNDEFINED)
    assert submit(owner, kernel_template, "eng-dup1").status == Status.PENDING
    assert submit(owner, kernel_template, "eng-dup2").status == Status.PENDING


def test_a_template_whose_pool_is_missing_fails_clearly_and_leaves_nothing(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    missing = make_pool(test_host, "eng-no-such-pool", path="/nowhere")
    GuestTemplate.objects.filter(pk=kernel_template.pk).update(pool=missing)
    kernel_template.refresh_from_db()
    start_proc(stack, "worker", "worker")
    request = submit(make_user("ann"), kernel_template, "eng-nopool1")
    wait_status(request, Status.FAILED)
    assert request.error == "storage pool eng-no-such-pool is missing on local"
    assert moves(request) == path_of(["admitted", "preparing", "failed"])
    assert wait_job(request, Job.Status.FAILED).error == request.error
    assert_nothing_left(request)


def test_a_destroyed_installer_fails_the_request_and_is_removed_never_started(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    start_proc(stack, "worker", "worker")
    start_proc(stack, "listener", "listener")
    request = submit(make_user("ann"), kernel_template, "eng-destroyed1")
    wait_status(request, Status.WAITING)
    assert volumes_of(request.guest) != []
    operations.destroy(hv(), str(request.guest.uuid))
    wait_status(request, Status.FAILED)
    assert "destroyed" in request.error
    assert request.error == "the installer stopped without finishing (destroyed)"
    assert moves(request) == path_of(["admitted", "preparing", "installing", "waiting", "failed"])
    assert wait_job(request, Job.Status.FAILED).error == request.error
    assert_nothing_left(request)


def test_an_install_past_its_deadline_fails_at_reconcile_and_is_removed(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    request = submit(make_user("ann"), kernel_template, "eng-late1")
    provision.advance(request.pk)
    assert status_of(request) == Status.WAITING
    assert request.deadline is not None and request.deadline > timezone.now()
    events.reconcile_host(test_host)
    assert status_of(request) == Status.WAITING  # still inside its deadline: left alone
    ProvisioningRequest.objects.filter(pk=request.pk).update(
        deadline=timezone.now() - timedelta(seconds=1)
    )
    events.reconcile_host(test_host)
    assert status_of(request) == Status.FAILED
    assert request.error == "the installer did not finish before the deadline"
    assert job_of(request).status == Job.Status.FAILED
    assert_nothing_left(request)


def test_a_missed_installer_stop_is_caught_by_the_periodic_reconcile(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    worker = start_proc(stack, "worker", "worker")  # no listener: the stop event is never seen
    request = submit(make_user("ann"), kernel_template, "eng-missed1")
    wait_status(request, Status.WAITING)
    # Let the step finish first: its own last look at the installer would catch the stop.
    wait_until(lambda: tasks_done(worker, "advance_request") == 1, timeout=10, what="the step")
    finish_installer(request)
    assert not info_of(request.guest).active
    stays(lambda: status_of(request) == Status.WAITING, seconds=1, what="unnoticed stop")
    stack.env["VMPORTAL_RECONCILE_EVERY"] = "1"
    beat = start_proc(stack, "beat", "beat")
    wait_status(request, Status.RUNNING)
    assert moves(request) == path_of(INSTALL_PATH)
    assert "Sending due task reconcile (provisioning.reconcile)" in new_log(beat)
    assert tasks_done(worker, "reconcile_host") >= 1
    assert info_of(request.guest).state == "running"


# --- cancelling ------------------------------------------------------------------------------


def drive_to(monkeypatch: pytest.MonkeyPatch, request: ProvisioningRequest, status: str) -> None:
    """Take the request to `status` in this process, each step's libvirt work done."""
    if status == Status.PENDING:
        return
    stop: dict[str, str] = {
        Status.ADMITTED: "admitted:begin",
        Status.PREPARING: "preparing:done",  # the volume exists, the move has not happened
        Status.INSTALLING: "installing:defined",  # the installer runs, final config defined
    }
    if status in stop:
        assert advance_until(monkeypatch, request.pk, stop[status]) == status
        return
    provision.advance(request.pk)
    assert status_of(request) == Status.WAITING
    if status == Status.WAITING:
        return
    finish_installer(request)
    provision.request_domain_stopped(request.pk)
    assert status_of(request) == Status.DEFINING
    checkpoint = "defining:done" if status == Status.DEFINING else "starting:done"
    assert advance_until(monkeypatch, request.pk, checkpoint) == status


# What libvirt holds in each state: (domain exists, domain active, volume exists).
MADE = {
    Status.PENDING: (False, False, False),
    Status.ADMITTED: (False, False, False),
    Status.PREPARING: (False, False, True),
    Status.INSTALLING: (True, True, True),
    Status.WAITING: (True, True, True),
    Status.DEFINING: (True, False, True),
    Status.STARTING: (True, True, True),
}


@pytest.mark.parametrize("status", list(MADE))
def test_a_request_can_be_cancelled_in_every_unfinished_state_and_leaves_nothing(
    stack,
    make_user,
    test_host: Host,
    kernel_template: GuestTemplate,
    monkeypatch: pytest.MonkeyPatch,
    status: str,
) -> None:
    request = submit(make_user("ann"), kernel_template, f"eng-cancel-{status}")
    drive_to(monkeypatch, request, status)
    assert status_of(request) == status
    info = info_of(request.guest)
    assert (info.exists, info.active, volumes_of(request.guest) != []) == MADE[Status(status)]

    provision.cancel(request.pk)
    assert status_of(request) == Status.CANCELLED
    # The cleanup (and any advance still queued) runs on a worker of the host's queue.
    start_proc(stack, "worker", "worker")
    wait_until(
        lambda: job_of(request).status == Job.Status.CANCELLED, timeout=30, what="the cleanup"
    )
    assert status_of(request) == Status.CANCELLED
    assert moves(request)[-1] == (status, "cancelled")
    assert request.completed is not None
    assert_nothing_left(request)


def test_cancelling_a_finished_request_is_refused_and_changes_nothing(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    owner = make_user("ann")
    running = provision_running(owner, kernel_template, "eng-done1")
    with pytest.raises(transitions.StaleState, match="is running, not pending"):
        provision.cancel(running.pk)
    assert status_of(running) == Status.RUNNING
    assert info_of(running.guest).state == "running"
    assert moves(running)[-1] == ("starting", "running")

    gone = submit(owner, kernel_template, "eng-done2")
    provision.cancel(gone.pk)
    with pytest.raises(transitions.StaleState, match="is cancelled"):
        provision.cancel(gone.pk)
    assert RequestEvent.objects.filter(request=gone, to_status="cancelled").count() == 1


# --- duplicate delivery and many workers -------------------------------------------------------


def test_the_same_step_delivered_twice_at_once_makes_one_guest_and_one_history(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    owner = make_user("ann")
    requests = [submit(owner, kernel_template, f"eng-twice{i}") for i in range(3)]
    for request in requests:
        assert in_threads(2, partial(provision.advance, request.pk)) == []
        assert status_of(request) == Status.WAITING
        finish_installer(request)
        assert in_threads(2, partial(provision.request_domain_stopped, request.pk)) == []
        assert in_threads(2, partial(provision.advance, request.pk)) == []

    for request in requests:
        assert status_of(request) == Status.RUNNING, request.error
        assert moves(request) == path_of(INSTALL_PATH)
        assert len(domains_named(request.name)) == 1
        assert len(volumes_of(request.guest)) == 1
        job = job_of(request)
        assert job.status == Job.Status.SUCCEEDED
        assert job.events.filter(message="Running → Succeeded").count() == 1
        assert job.events.filter(message="Queued → Running").count() == 1


def test_a_late_duplicate_of_the_install_step_installs_nothing_once_the_request_moved_on(
    make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    # The duplicate-delivery flake, made deterministic: a second run loaded the request while it
    # was installing, and reaches libvirt only after the first run moved it on and the installer
    # powered off. Seeing no active domain, it used to create the installer again, leaving the
    # request waiting for an installer nobody would stop.
    request = submit(make_user("ann"), kernel_template, "eng-late")
    late = steps._load(request.pk)  # loaded now, while pending: run on below as if installing
    provision.advance(request.pk)
    assert status_of(request) == Status.WAITING
    finish_installer(request)
    assert not info_of(request.guest).active
    assert late is not None
    late.request.status = Status.INSTALLING
    with pytest.raises(transitions.StaleState) as stale:
        steps.STEPS[Status.INSTALLING](late)
    assert stale.value.actual == Status.WAITING
    assert not info_of(request.guest).active  # no second installer
    provision.request_domain_stopped(request.pk)
    provision.advance(request.pk)
    assert status_of(request) == Status.RUNNING
    assert moves(request) == path_of(INSTALL_PATH)


def test_a_duplicate_install_step_reaching_libvirt_after_the_installer_finished_boots_none(
    make_user, test_host: Host, kernel_template: GuestTemplate, monkeypatch
) -> None:
    # The rest of that flake's window (seen once in 21 runs of the test below): the second run
    # passes its check while the request still installs; the first run then creates the
    # installer and moves the request on, and the installer powers off, all before the second
    # run's createXML. Finding the guest stopped, it booted the installer again, and the request
    # waited for that one while it installed a second time.
    request = submit(make_user("ann"), kernel_template, "eng-again")
    assert advance_until(monkeypatch, request.pk, "installing:begin") == Status.INSTALLING
    late = steps._load(request.pk)
    assert late is not None and late.request.status == Status.INSTALLING
    real_check = steps._still_in

    def check_then_the_first_run_finishes(run: steps.Run, status: Status) -> None:
        real_check(run, status)
        if run is late:
            provision.advance(request.pk)  # the first run: installer created, request waiting
            assert status_of(request) == Status.WAITING
            finish_installer(request)

    monkeypatch.setattr(steps, "_still_in", check_then_the_first_run_finishes)
    with pytest.raises(transitions.StaleState):
        steps.STEPS[Status.INSTALLING](late)
    monkeypatch.undo()
    assert not info_of(request.guest).active  # no second installer
    provision.request_domain_stopped(request.pk)  # the power-off, as the listener hears it
    provision.advance(request.pk)
    request.refresh_from_db()
    assert request.status == Status.RUNNING, request.error
    assert moves(request) == path_of(INSTALL_PATH)
    assert len(domains_named(request.name)) == 1


def test_two_workers_with_every_task_sent_twice_finish_each_request_once(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    # As in production, reconcile is the net under the listener: with four worker children and
    # the listener writing one SQLite file, an event's write can lose a lock race (seen in CI).
    stack.env.update(VMPORTAL_RECONCILE_EVERY="1")
    workers = [start_proc(stack, "worker", f"worker-{x}", concurrency=2) for x in "ab"]
    start_proc(stack, "listener", "listener")
    start_proc(stack, "beat", "beat")
    owner = make_user("ann")
    requests = [submit(owner, kernel_template, f"eng-many{i}") for i in range(8)]
    for request in requests:  # a redelivered message
        queue.send(queue.ADVANCE_REQUEST, request.pk, queue=test_host.queue)
    for request in requests:
        wait_status(request, Status.WAITING)
        finish_installer(request)
    for request in requests:
        wait_status(request, Status.RUNNING)

    for request in requests:
        assert moves(request) == path_of(INSTALL_PATH)
        assert len(domains_named(request.name)) == 1
        assert len(volumes_of(request.guest)) == 1
        assert info_of(request.guest).state == "running"
        job = wait_job(request, Job.Status.SUCCEEDED)
        assert job.events.filter(message="Running → Succeeded").count() == 1
    # Both took a share (the log line follows the task's last move by a moment).
    wait_until(
        lambda: all(tasks_done(w, "advance_request") >= 1 for w in workers),
        timeout=10,
        what="both workers to have run steps",
    )


# --- quotas ------------------------------------------------------------------------------------


def test_a_user_quota_of_two_fails_the_third_request_at_admission(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    owner = make_user("ann", quota={"max_guests": 2})
    start_proc(stack, "worker", "worker")
    first = [submit(owner, kernel_template, f"eng-quota{i}") for i in range(2)]
    for request in first:
        wait_status(request, Status.WAITING)
    third = submit(owner, kernel_template, "eng-quota2")
    wait_status(third, Status.FAILED)
    assert third.error == "quota exceeded: guests would be 3, your quota allows 2"
    assert moves(third) == [("pending", "failed")]
    assert wait_job(third, Job.Status.FAILED).error == third.error
    assert_nothing_left(third)
    assert all(status_of(r) == Status.WAITING for r in first)


def test_a_group_quota_counts_its_members_together(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    lab = Group.objects.create(name="lab")
    Quota.objects.create(group=lab, max_guests=2)
    bob, carol, dave = make_user("bob"), make_user("carol"), make_user("dave")
    bob.groups.add(lab)
    carol.groups.add(lab)
    for owner, name in ((bob, "eng-g-bob1"), (carol, "eng-g-carol1"), (dave, "eng-g-dave1")):
        request = submit(owner, kernel_template, name)
        provision.advance(request.pk)
        assert status_of(request) == Status.WAITING, request.error
    over = submit(carol, kernel_template, "eng-g-carol2")
    provision.advance(over.pk)
    assert status_of(over) == Status.FAILED
    assert over.error == "quota exceeded: guests would be 3, group lab's quota allows 2"
    assert_nothing_left(over)
    outside = submit(dave, kernel_template, "eng-g-dave2")  # dave is not in the group
    provision.advance(outside.pk)
    assert status_of(outside) == Status.WAITING


def test_concurrent_admissions_never_exceed_the_quota(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    owner = make_user("ann", quota={"max_guests": 3})
    for x in "ab":
        start_proc(stack, "worker", f"worker-{x}", concurrency=2)
    with transaction.atomic():  # every advance is queued at once, at commit
        requests = [submit(owner, kernel_template, f"eng-race{i}") for i in range(6)]
    ours = ProvisioningRequest.objects.filter(pk__in=[r.pk for r in requests])
    wait_until(
        lambda: not ours.exclude(status__in=(Status.WAITING, Status.FAILED)).exists(),
        timeout=30,
        what="every request admitted or refused",
    )
    for request in requests:
        request.refresh_from_db()
    admitted = [r for r in requests if r.status == Status.WAITING]
    refused = [r for r in requests if r.status == Status.FAILED]
    assert len(admitted) == 3 and len(refused) == 3
    for request in refused:
        assert request.error.startswith("quota exceeded: guests would be 4")
        assert moves(request) == [("pending", "failed")]


# --- routing ---------------------------------------------------------------------------------


def test_a_worker_for_another_host_never_runs_this_hosts_steps(
    stack, make_user, test_host: Host, kernel_template: GuestTemplate
) -> None:
    other = start_proc(stack, "worker", "worker-other", queues=("hv.other",))
    request = submit(make_user("ann"), kernel_template, "eng-route1")
    broker = redis.Redis.from_url(stack.redis.url)
    # The message sits in this host's queue while the other host's worker idles.
    wait_until(lambda: broker.llen(test_host.queue) == 1, timeout=5, what="a queued step")
    stays(
        lambda: status_of(request) == Status.PENDING and broker.llen(test_host.queue) == 1,
        seconds=2,
        what="the step untouched",
    )
    local = start_proc(stack, "worker", "worker-local", queues=("hv.local",))
    start_proc(stack, "listener", "listener")
    wait_status(request, Status.WAITING)
    finish_installer(request)
    wait_status(request, Status.RUNNING)
    wait_until(lambda: tasks_done(local, "advance_request") >= 1, timeout=10, what="local work")
    assert "provisioning.advance_request[" not in new_log(other)


def test_an_install_passes_every_crash_point_the_fault_tests_kill_at(
    monkeypatch: pytest.MonkeyPatch, make_user, kernel_template: GuestTemplate
) -> None:
    passed: list[str] = []
    monkeypatch.setattr(faults, "checkpoint", passed.append)
    provision_running(make_user("kit"), kernel_template, "eng-points")
    assert set(passed) == set(CRASH_POINTS)
    assert len(CRASH_POINTS) == len(set(CRASH_POINTS))
