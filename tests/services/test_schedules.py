"""Scheduled rebuilds: real beat, worker and listener processes on libvirt's test driver.

Beat runs django-celery-beat's DatabaseScheduler through our HeartbeatScheduler. Schedules are made
with `schedule_create` (whose smallest interval is a minute) and then switched to an interval of a
second or two through django-celery-beat's own models, so a test sees several firings quickly.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from provisioning.hypervisor import domxml, operations
from provisioning.models import (
    Guest,
    GuestTemplate,
    Host,
    Job,
    ProvisioningRequest,
    RebuildSchedule,
    ScheduleRun,
)
from provisioning.services import schedules, templates, transitions
from tests.factories import make_guest, make_network
from tests.support.engine import (
    finish_installer,
    hv,
    info_of,
    new_log,
    provision_running,
    start_proc,
    status_of,
    stays,
    tidy_libvirt,  # noqa: F401 - fixture, used through pytestmark
)
from tests.support.stack import Proc, wait_until
from vmportal import heartbeat

pytestmark = [pytest.mark.usefixtures("tidy_libvirt"), pytest.mark.timeout(150)]
Status = ProvisioningRequest.Status
Outcome = ScheduleRun.Outcome
LEADER_KEY = "vmportal:leader:beat"


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def template(kernel_template: GuestTemplate, test_host: Host) -> GuestTemplate:
    """The kernel template with a NIC (so the MAC is in the domain XML), snapshotted at v1."""
    kernel_template.network = make_network(test_host, "default")
    kernel_template.save()
    # What the admin does when a template is first saved.
    return templates.template_saved(template=kernel_template, changed=False)


def every_seconds(schedule: RebuildSchedule, seconds: int) -> None:
    """Make the schedule fire every few seconds (the form's smallest step is a minute)."""
    task = schedule.periodic_task
    task.interval, _ = IntervalSchedule.objects.get_or_create(
        every=seconds, period=IntervalSchedule.SECONDS
    )
    task.save()  # PeriodicTask.save marks the schedule changed; beat reloads it


def make_schedule(
    guest: Guest, owner: AbstractBaseUser, *, seconds: int, **kw: Any
) -> RebuildSchedule:
    """A schedule made by the service, then switched to a seconds interval."""
    schedule = schedules.schedule_create(guest=guest, by=owner, every_minutes=1, **kw)  # type: ignore[arg-type]
    every_seconds(schedule, seconds)
    return schedule


def runs_of(schedule: RebuildSchedule) -> list[ScheduleRun]:
    """The schedule's runs, oldest first."""
    return list(
        ScheduleRun.objects.filter(schedule=schedule).select_related("job").order_by("fired", "id")
    )


def logs(stack: Any) -> str:
    """The tails of this test's process logs, for failure messages."""
    return "\n".join(f"--- {p.name}\n{new_log(p)[-2500:]}" for p in stack.procs.values())


def wait_for_run(
    stack: Any,
    schedule: RebuildSchedule,
    what: str,
    match: Callable[[ScheduleRun], bool],
    *,
    timeout: float = 30,
) -> ScheduleRun:
    """The schedule's first run that matches, waited for."""

    def found() -> ScheduleRun | None:
        return next((r for r in runs_of(schedule) if match(r)), None)

    try:
        run = wait_until(found, timeout=timeout, what=what, every=0.1)
    except AssertionError as exc:
        seen = [(r.outcome, r.message) for r in runs_of(schedule)]
        raise AssertionError(f"{exc}; runs so far: {seen}\n{logs(stack)}") from None
    assert run is not None
    return run


def wait_for_status(
    stack: Any, request: ProvisioningRequest, wanted: str, *, timeout: float = 30
) -> None:
    """Wait until the request reaches wanted (failing with the logs otherwise)."""
    try:
        wait_until(lambda: status_of(request) == wanted, timeout=timeout, what=wanted, every=0.1)
    except AssertionError as exc:
        raise AssertionError(
            f"request #{request.pk} is {request.status} ({request.error}), not {wanted}: {exc}\n"
            f"{logs(stack)}"
        ) from None


def wait_for_job(stack: Any, run: ScheduleRun, *, timeout: float = 15) -> Job:
    """The run's job once it is final (it ends just after its request does)."""
    job_id = run.job_id
    assert job_id is not None, run

    def final() -> Job | None:
        job = Job.objects.get(pk=job_id)
        return job if job.status in Job.FINAL else None

    try:
        job = wait_until(final, timeout=timeout, what="the rebuild job to end", every=0.1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(stack)}") from None
    assert job is not None
    return job


def request_of(run: ScheduleRun) -> ProvisioningRequest:
    """The rebuild request a fired run started."""
    assert run.job is not None and run.job.request_id is not None, run
    return ProvisioningRequest.objects.select_related("guest").get(pk=run.job.request_id)


def identity(guest: Guest) -> tuple[str, str, str]:
    """Name, UUID and MAC as libvirt's persistent config has them."""
    root = domxml.parse_untrusted(operations.get_xml(hv(), str(guest.uuid), inactive=True))
    mac = root.find("devices/interface/mac")
    assert mac is not None, "the guest has no NIC"
    return root.findtext("name") or "", root.findtext("uuid") or "", mac.get("address") or ""


def cmdline_now(guest: Guest) -> str | None:
    """The kernel command line of the running config (the installer's, while it runs)."""
    root = domxml.parse_untrusted(operations.get_xml(hv(), str(guest.uuid)))
    return root.findtext("os/cmdline")


def make_busy(guest: Guest) -> Job:
    """A running shutdown job on the guest (with no deadline, so reconcile leaves it alone)."""
    job = transitions.job_open(kind=Job.Kind.SHUTDOWN, guest=guest)
    transitions.job_move(job.pk, expected=Job.Status.QUEUED, to=Job.Status.RUNNING)
    return Job.objects.get(pk=job.pk)


def sent_by(proc: Proc, task: PeriodicTask) -> int:
    """How many times a beat process sent the periodic task, by its own log."""
    return new_log(proc).count(f"Sending due task {task.name} ")


def fired(run: ScheduleRun) -> bool:
    return run.outcome == Outcome.FIRED


def owner_client(owner: Any) -> Client:
    client = Client()
    client.force_login(owner)
    return client


# --- firing and rebuilding --------------------------------------------------------------------


def test_a_schedule_rebuilds_a_running_guest_keeping_its_name_uuid_and_mac(
    stack: Any, make_user: Any, template: GuestTemplate
) -> None:
    owner = make_user("ann")
    first = provision_running(owner, template, "sched-web")
    guest: Guest = first.guest
    before = identity(guest)
    assert before == (guest.name, str(guest.uuid), guest.mac)
    schedule = make_schedule(guest, owner, seconds=2)
    for kind in ("worker", "listener", "beat"):
        start_proc(stack, kind, f"sched-{kind}")

    run = wait_for_run(stack, schedule, "the schedule to fire", fired)
    schedules.schedule_set_enabled(schedule=schedule, enabled=False)  # one rebuild is enough
    request = request_of(run)
    assert request.kind == ProvisioningRequest.Kind.REBUILD
    assert request.guest_id == guest.pk and request.pk != first.pk
    assert run.job is not None and run.job.kind == Job.Kind.REBUILD

    wait_for_status(stack, request, Status.WAITING)
    # The installer runs under the guest's own name and UUID; the old guest was shut down first.
    assert cmdline_now(guest) == template.kernel_cmdline
    assert info_of(guest).active and info_of(guest).persistent
    finish_installer(request)
    wait_for_status(stack, request, Status.RUNNING)

    job = wait_for_job(stack, run)
    assert job.status == Job.Status.SUCCEEDED and job.progress == 100
    run.refresh_from_db()
    assert run.result == "succeeded"
    assert run.duration is not None and run.duration > 0
    assert [e.to_status for e in request.events.all()] == [
        "admitted",
        "preparing",
        "installing",
        "waiting",
        "defining",
        "starting",
        "running",
    ]
    guest.refresh_from_db()
    assert guest.state == Guest.State.RUNNING
    assert identity(guest) == before
    assert cmdline_now(guest) is None  # booted from its disk, not the installer
    kinds = ProvisioningRequest.objects.filter(guest=guest).order_by("created", "id")
    assert list(kinds.values_list("kind", flat=True)) == ["new", "rebuild"]

    # The guest page lists the run with its result and how long it took.
    page = owner_client(owner).get(reverse("guest-detail", args=[guest.uuid])).content.decode()
    runs_table = page.split('<table class="runs">', 1)[1].split("</table>", 1)[0]
    assert "status-succeeded" in runs_table
    assert re.search(r"<td>\d+ s</td>", runs_table), runs_table


def test_a_busy_guest_is_skipped_and_the_schedule_keeps_firing(
    stack: Any, make_user: Any, template: GuestTemplate
) -> None:
    owner = make_user("ann")
    guest = provision_running(owner, template, "sched-busy").guest
    blocker = make_busy(guest)
    schedule = make_schedule(guest, owner, seconds=1)
    start_proc(stack, "worker", "busy-worker")
    start_proc(stack, "beat", "busy-beat")

    wait_for_run(
        stack,
        schedule,
        "two skipped runs",
        lambda r: sum(x.outcome == Outcome.SKIPPED for x in runs_of(schedule)) >= 2,
    )
    skipped = runs_of(schedule)
    assert all(r.outcome == Outcome.SKIPPED for r in skipped)
    expected = str(transitions.GuestBusy(guest, blocker))
    assert all(r.message == expected for r in skipped), skipped[0].message
    assert f"busy with shut down job #{blocker.pk}" in expected
    assert not ProvisioningRequest.objects.filter(guest=guest, kind="rebuild").exists()

    # Once the guest is free, the next firing rebuilds it.
    transitions.job_move(blocker.pk, expected=Job.Status.RUNNING, to=Job.Status.SUCCEEDED)
    run = wait_for_run(stack, schedule, "a firing after the skips", fired)
    schedules.schedule_set_enabled(schedule=schedule, enabled=False)
    assert run.fired > skipped[-1].fired
    assert request_of(run).kind == ProvisioningRequest.Kind.REBUILD
    wait_for_status(stack, request_of(run), Status.WAITING)


def test_a_disabled_schedule_does_not_fire(
    stack: Any, make_user: Any, template: GuestTemplate
) -> None:
    owner = make_user("ann")
    quiet = provision_running(owner, template, "sched-quiet").guest
    control = provision_running(owner, template, "sched-control").guest
    # Both busy, so a firing records a skipped run and rebuilds nothing.
    make_busy(quiet)
    make_busy(control)
    off = make_schedule(quiet, owner, seconds=1, enabled=False)
    on = make_schedule(control, owner, seconds=1)
    start_proc(stack, "worker", "disabled-worker")
    start_proc(stack, "beat", "disabled-beat")

    # Beat fires the enabled one several times meanwhile; the disabled one never.
    wait_for_run(stack, on, "3 firings", lambda r: len(runs_of(on)) >= 3)
    assert runs_of(off) == []
    off.periodic_task.refresh_from_db()
    assert off.periodic_task.total_run_count == 0 and off.periodic_task.last_run_at is None

    # Swap them: enable the quiet one, disable the other.
    schedules.schedule_set_enabled(schedule=on, enabled=False)
    schedules.schedule_set_enabled(schedule=off, enabled=True)
    wait_for_run(stack, off, "the enabled schedule to fire", lambda r: True)
    # Anything beat sent before it saw the change has been handled by now.
    settled = len(runs_of(on))
    wait_for_run(stack, off, "3 more firings", lambda r: len(runs_of(off)) >= 4)
    assert len(runs_of(on)) == settled
    assert not ProvisioningRequest.objects.filter(kind="rebuild").exists()


def test_two_beats_started_together_fire_once_and_the_other_takes_over(
    stack: Any, make_user: Any, template: GuestTemplate
) -> None:
    owner = make_user("ann")
    guest = provision_running(owner, template, "sched-twobeat").guest
    make_busy(guest)  # every firing is a cheap skipped run
    interval = 2
    schedule = make_schedule(guest, owner, seconds=interval)
    task = schedule.periodic_task
    start_proc(stack, "worker", "twobeat-worker")
    beats = [start_proc(stack, "beat", f"twobeat-{x}") for x in "ab"]
    me = socket.gethostname()

    def leader() -> Proc | None:
        value = heartbeat.client().get(LEADER_KEY)
        return next((b for b in beats if value == f"{me}:{b.pid}".encode()), None)

    acting = wait_until(leader, timeout=20, what="a beat to lead")
    assert acting is not None
    standby = next(b for b in beats if b is not acting)

    def one_beat_fires() -> Callable[[], bool]:
        # One beat fires every `interval` s; two acting beats would fire about twice as often.
        # (The slack of 2 absorbs a run the worker handled late, next to one handled on time.)
        since, start = len(runs_of(schedule)), time.monotonic()
        return lambda: len(runs_of(schedule)) - since <= (time.monotonic() - start) / interval + 2

    wait_for_run(stack, schedule, "the first firing", lambda r: True)
    stays(one_beat_fires(), seconds=6, what="one firing per interval")
    assert len(runs_of(schedule)) >= 3
    assert sent_by(acting, task) >= 3
    assert sent_by(standby, task) == 0
    assert standby.alive()

    # The leader stops: its claim runs out and the standby takes over.
    acting.stop()
    stopped = timezone.now()
    wait_until(lambda: leader() is standby, timeout=30, what="the standby beat to take over")
    wait_for_run(stack, schedule, "a firing by the new leader", lambda r: r.fired > stopped)
    count = len(runs_of(schedule))
    stays(one_beat_fires(), seconds=4, what="one firing per interval after the take-over")
    assert len(runs_of(schedule)) > count
    assert sent_by(standby, task) >= 2


def test_a_failed_rebuild_keeps_the_guest_and_the_schedule_fires_again(
    stack: Any, make_user: Any, template: GuestTemplate
) -> None:
    owner = make_user("ann")
    guest = provision_running(owner, template, "sched-fail").guest
    schedule = make_schedule(guest, owner, seconds=2)
    for kind in ("worker", "listener", "beat"):
        start_proc(stack, kind, f"fail-{kind}")

    first = wait_for_run(stack, schedule, "the first firing", fired)
    request = request_of(first)
    wait_for_status(stack, request, Status.WAITING)
    operations.destroy(hv(), str(guest.uuid))  # the installer is killed, not finished
    wait_for_status(stack, request, Status.FAILED)

    assert request.error == "the installer stopped without finishing (destroyed)"
    job = wait_for_job(stack, first)
    assert job.status == Job.Status.FAILED and job.error == request.error
    first.refresh_from_db()
    job_id = job.pk
    assert first.result == "failed"
    # The guest is still there, stopped, with its final config (not the installer's).
    info = info_of(guest)
    assert info.exists and info.persistent and not info.active
    root = domxml.parse_untrusted(operations.get_xml(hv(), str(guest.uuid), inactive=True))
    assert root.find("os/kernel") is None
    # The job fails with the request; the clean-up that records the guest stopped comes just
    # after, and says so by clearing cleanup_pending.
    wait_until(
        lambda: not ProvisioningRequest.objects.get(pk=request.pk).cleanup_pending,
        timeout=30,
        what="the failed rebuild's clean-up",
    )
    guest.refresh_from_db()
    # Stopped, unless the schedule's next firing (every 2 s) has already begun the next rebuild.
    later = ProvisioningRequest.objects.filter(guest=guest, pk__gt=request.pk)
    assert guest.state == Guest.State.DEFINED or later.exists(), guest.state

    again = wait_for_run(
        stack,
        schedule,
        "a firing after the failure",
        lambda r: fired(r) and r.pk != first.pk,
    )
    schedules.schedule_set_enabled(schedule=schedule, enabled=False)
    assert again.job_id is not None and again.job_id != job_id
    assert request_of(again).pk != request.pk
    wait_for_status(stack, request_of(again), Status.WAITING)

    page = owner_client(owner).get(reverse("guest-detail", args=[guest.uuid])).content.decode()
    assert "status-failed" in page and request.error in page


def test_a_rebuild_uses_the_version_the_guest_has_or_the_latest(
    stack: Any, make_user: Any, template: GuestTemplate
) -> None:
    owner = make_user("ann")
    v1_cmdline = template.kernel_cmdline
    guest = provision_running(owner, template, "sched-version").guest
    assert guest.template_version == 1
    template.kernel_cmdline = f"{v1_cmdline} vmportal.marker=v2"
    template.save()
    templates.template_saved(template=template, changed=True)
    assert template.version == 2

    schedule = make_schedule(guest, owner, seconds=1, latest=False)
    for kind in ("worker", "listener", "beat"):
        start_proc(stack, kind, f"version-{kind}")
    run = wait_for_run(stack, schedule, "the pinned schedule to fire", fired)
    schedules.schedule_set_enabled(schedule=schedule, enabled=False)
    pinned = request_of(run)
    assert pinned.template_version == 1
    wait_for_status(stack, pinned, Status.WAITING)
    assert cmdline_now(guest) == v1_cmdline
    xml = operations.get_xml(hv(), str(guest.uuid))
    assert domxml.read_metadata(xml)["template_version"] == "1"
    finish_installer(pinned)
    wait_for_status(stack, pinned, Status.RUNNING)
    guest.refresh_from_db()
    assert guest.template_version == 1

    client = owner_client(owner)
    page = client.get(reverse("guest-detail", args=[guest.uuid])).content.decode()
    assert "A newer version of" in page and "this guest has v1" in page

    # "Rebuild now" from the latest version.
    wait_until(
        lambda: not Job.objects.filter(guest=guest, status__in=Job.ACTIVE).exists(),
        timeout=10,
        what="the guest to be free",
    )
    response = client.post(reverse("guest-rebuild", args=[guest.uuid]), {"source": "latest"})
    latest = ProvisioningRequest.objects.filter(guest=guest).order_by("-created").first()
    assert latest is not None and latest.pk != pinned.pk
    assert response.status_code == 302
    assert response["Location"] == reverse("request-detail", args=[latest.pk])
    assert latest.kind == ProvisioningRequest.Kind.REBUILD and latest.template_version == 2
    wait_for_status(stack, latest, Status.WAITING)
    assert cmdline_now(guest) == f"{v1_cmdline} vmportal.marker=v2"
    finish_installer(latest)
    wait_for_status(stack, latest, Status.RUNNING)
    guest.refresh_from_db()
    assert guest.template_version == 2
    page = client.get(reverse("guest-detail", args=[guest.uuid])).content.decode()
    assert "A newer version of" not in page


def test_a_pinned_rebuild_of_a_version_that_was_not_kept_is_refused(
    stack: Any, make_user: Any, kernel_template: GuestTemplate
) -> None:
    # No snapshot of v1 exists (the template was made outside the admin, then changed).
    owner = make_user("ann")
    guest = provision_running(owner, kernel_template, "sched-unkept").guest
    kernel_template.kernel_cmdline += " vmportal.marker=v2"
    kernel_template.save()
    templates.template_saved(template=kernel_template, changed=True)
    schedule = schedules.schedule_create(guest=guest, by=owner, every_minutes=1, latest=False)

    run = schedules.schedule_fire(schedule.pk)

    assert run is not None and run.outcome == Outcome.FAILED
    assert "v1 of Tiny (test driver) was not kept" in run.message
    assert not ProvisioningRequest.objects.filter(guest=guest, kind="rebuild").exists()
    assert not Job.objects.filter(guest=guest, status__in=Job.ACTIVE).exists()


# --- the guest page ---------------------------------------------------------------------------


@pytest.fixture
def page_guest(make_user: Any, template: GuestTemplate, test_host: Host) -> Guest:
    """A guest row (no domain needed) owned by ann."""
    return make_guest(owner=make_user("ann"), template=template, host=test_host, name="page-guest")


def messages_on(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_the_owner_adds_toggles_and_removes_schedules_on_the_guest_page(
    page_guest: Guest,
) -> None:
    guest = page_guest
    client = owner_client(guest.owner)
    url = reverse("schedule-create", args=[guest.uuid])

    response = client.post(url, {"every_minutes": "5", "source": "latest"}, follow=True)
    assert "Schedule added." in messages_on(response)
    by_interval = RebuildSchedule.objects.get(guest=guest)
    task = by_interval.periodic_task
    assert task.task == "provisioning.scheduled_rebuild" and task.enabled
    assert task.interval is not None and (task.interval.every, task.interval.period) == (
        5,
        IntervalSchedule.MINUTES,
    )
    assert task.kwargs == f'{{"schedule_id": {by_interval.pk}}}'
    assert by_interval.source == RebuildSchedule.Source.LATEST

    client.post(url, {"cron": "0 3 * * mon-fri", "source": "pinned"})
    by_cron = RebuildSchedule.objects.exclude(pk=by_interval.pk).get(guest=guest)
    crontab = by_cron.periodic_task.crontab
    assert crontab is not None
    assert (crontab.minute, crontab.hour, crontab.day_of_week) == ("0", "3", "mon-fri")
    assert by_cron.source == RebuildSchedule.Source.PINNED

    page = client.get(reverse("guest-detail", args=[guest.uuid])).content.decode()
    table = page.split('<table class="schedules">', 1)[1].split("</table>", 1)[0]
    assert "every 5 min" in table and "cron 0 3 * * mon-fri" in table
    assert "The version the guest has" in table and "The template&#x27;s latest version" in table
    assert table.count("enabled") == 2

    toggle = reverse("schedule-toggle", args=[guest.uuid, by_interval.pk])
    client.post(toggle)
    task.refresh_from_db()
    assert not task.enabled
    page = client.get(reverse("guest-detail", args=[guest.uuid])).content.decode()
    assert ">disabled<" in page and ">Enable</button>" in page
    client.post(toggle)
    task.refresh_from_db()
    assert task.enabled

    response = client.post(
        reverse("schedule-delete", args=[guest.uuid, by_interval.pk]), follow=True
    )
    assert "Schedule removed." in messages_on(response)
    assert not RebuildSchedule.objects.filter(pk=by_interval.pk).exists()
    assert not PeriodicTask.objects.filter(pk=task.pk).exists()
    assert list(RebuildSchedule.objects.filter(guest=guest)) == [by_cron]


def test_a_schedule_like_a_removed_one_can_be_added_again(page_guest: Guest) -> None:
    client = owner_client(page_guest.owner)
    url = reverse("schedule-create", args=[page_guest.uuid])
    for _ in range(2):
        client.post(url, {"every_minutes": "5"})
    first = RebuildSchedule.objects.filter(guest=page_guest).order_by("pk").first()
    assert first is not None
    client.post(reverse("schedule-delete", args=[page_guest.uuid, first.pk]))

    response = client.post(url, {"every_minutes": "5"}, follow=True)

    assert "Schedule added." in messages_on(response)
    assert RebuildSchedule.objects.filter(guest=page_guest).count() == 2


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"cron": "99 3 * * *"}, "Bad cron expression: Invalid end range: 99 > 59."),
        ({"cron": "- * * * *"}, "Bad cron expression: negative numbers not supported"),
        ({"cron": "0 3 * *"}, "A cron expression has five fields"),
        (
            {"cron": "0 3 * * " + "1," * 40 + "1"},
            "Bad cron expression: its day_of_week field is over 64 long.",
        ),
        ({"cron": "0 3 * * *", "every_minutes": "5"}, "Give either an interval"),
        ({}, "Give either an interval"),
        ({"every_minutes": "soon"}, "The interval must be a whole number of minutes."),
        ({"every_minutes": "0"}, "Give either an interval"),
        ({"every_minutes": "600000"}, "The interval must be between 1 minute and a year."),
    ],
)
def test_a_bad_schedule_is_refused_with_a_clear_message(
    page_guest: Guest, form: dict[str, str], message: str
) -> None:
    client = owner_client(page_guest.owner)
    response = client.post(reverse("schedule-create", args=[page_guest.uuid]), form, follow=True)
    assert response.status_code == 200
    shown = messages_on(response)
    assert any(m.startswith(message) for m in shown), shown
    assert (
        not RebuildSchedule.objects.exists()
        and not PeriodicTask.objects.filter(task=schedules.TASK).exists()
    )


def test_the_page_shows_skipped_and_finished_runs(page_guest: Guest) -> None:
    schedule = schedules.schedule_create(guest=page_guest, by=None, every_minutes=30)
    ScheduleRun.objects.create(
        schedule=schedule, outcome=Outcome.SKIPPED, message="page-guest is busy with start job #7"
    )
    job = Job.objects.create(
        kind=Job.Kind.REBUILD,
        guest=page_guest,
        status=Job.Status.SUCCEEDED,
        started=timezone.now() - timedelta(seconds=42),
        completed=timezone.now(),
    )
    ScheduleRun.objects.create(schedule=schedule, outcome=Outcome.FIRED, job=job)
    page = owner_client(page_guest.owner).get(reverse("guest-detail", args=[page_guest.uuid]))
    runs = page.content.decode().split('<table class="runs">', 1)[1].split("</table>", 1)[0]
    assert "status-skipped" in runs and "busy with start job #7" in runs
    assert "status-succeeded" in runs and "<td>42 s</td>" in runs
    assert "every 30 min" in page.content.decode()


def test_another_user_gets_404_for_the_guests_schedules_and_rebuild(
    page_guest: Guest, make_user: Any
) -> None:
    schedule = schedules.schedule_create(guest=page_guest, by=None, every_minutes=30)
    intruder = owner_client(make_user("mallory"))
    uuid = page_guest.uuid
    for url in (
        reverse("schedule-create", args=[uuid]),
        reverse("schedule-toggle", args=[uuid, schedule.pk]),
        reverse("schedule-delete", args=[uuid, schedule.pk]),
        reverse("guest-rebuild", args=[uuid]),
    ):
        assert intruder.post(url, {"every_minutes": "5"}).status_code == 404, url
    assert intruder.get(reverse("guest-detail", args=[uuid])).status_code == 404
    schedule.periodic_task.refresh_from_db()
    assert schedule.periodic_task.enabled
    assert list(RebuildSchedule.objects.all()) == [schedule]
    assert not ProvisioningRequest.objects.exists()


def test_a_schedule_of_another_guest_is_404_even_for_its_own_guests_url(
    page_guest: Guest, make_user: Any, template: GuestTemplate
) -> None:
    theirs = make_guest(
        owner=make_user("bob"),
        host=page_guest.host,
        template=template,
        name="bobs-guest",
        state=Guest.State.RUNNING,
    )
    foreign = schedules.schedule_create(guest=theirs, by=None, every_minutes=30)
    client = owner_client(page_guest.owner)
    # ann's own guest in the URL, bob's schedule id: refused, bob's schedule untouched.
    for name in ("schedule-toggle", "schedule-delete"):
        response = client.post(reverse(name, args=[page_guest.uuid, foreign.pk]))
        assert response.status_code == 404
    foreign.periodic_task.refresh_from_db()
    assert foreign.periodic_task.enabled
