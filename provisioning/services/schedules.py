"""Schedules: django-celery-beat periodic tasks that rebuild a guest or take its snapshots."""

from __future__ import annotations

import json
import logging
import uuid as uuidlib

from celery.schedules import ParseException
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from provisioning import queue
from provisioning.models import Guest, RebuildSchedule, ScheduleRun
from provisioning.services import audit, provision, snapshots, transitions

log = logging.getLogger(__name__)
TASK = queue.SCHEDULED_REBUILD


class ScheduleError(ValueError):
    """A schedule that cannot be made, with a message for the form."""


def _crontab(expression: str) -> CrontabSchedule:
    parts = expression.split()
    if len(parts) != 5:
        raise ScheduleError("A cron expression has five fields: minute hour day month weekday.")
    minute, hour, day, month, weekday = parts
    fields = {
        "minute": minute,
        "hour": hour,
        "day_of_month": day,
        "month_of_year": month,
        "day_of_week": weekday,
    }
    for name, value in fields.items():
        # Checked before the row is looked up: PostgreSQL refuses a value past the column.
        longest = CrontabSchedule._meta.get_field(name).max_length or 0
        if len(value) > longest:
            raise ScheduleError(f"Bad cron expression: its {name} field is over {longest} long.")
    schedule, _ = CrontabSchedule.objects.get_or_create(
        minute=minute, hour=hour, day_of_month=day, month_of_year=month, day_of_week=weekday
    )
    try:
        schedule.schedule  # noqa: B018 - parsing it raises on a bad field
    except (ValueError, ParseException) as exc:  # celery raises both for bad fields
        raise ScheduleError(f"Bad cron expression: {exc}") from exc
    return schedule


def schedule_create(
    *,
    guest: Guest,
    by: User | None,
    every_minutes: int | None = None,
    cron: str = "",
    latest: bool = True,
    enabled: bool = True,
    keep_data_disk: bool = True,
    action: str = RebuildSchedule.Action.REBUILD,
    keep: int | None = None,
) -> RebuildSchedule:
    """A new schedule for the guest, every N minutes or by a cron expression: a rebuild, or a
    snapshot keeping the newest `keep` of this schedule's."""
    if action not in RebuildSchedule.Action.values:
        raise ScheduleError("A schedule rebuilds the guest or takes a snapshot of it.")
    snapshot = action == RebuildSchedule.Action.SNAPSHOT
    if snapshot:
        limit = snapshots.per_guest_limit(guest.owner)
        if keep is None or not 1 <= keep < limit:
            raise ScheduleError(
                f"Keep 1 to {limit - 1} snapshots: each new one is taken before the oldest "
                f"goes, and the guest may hold {limit}."
            )
    elif guest.template is None:
        raise ScheduleError(f"{guest.name} was not made from a template, so it cannot be rebuilt.")
    if bool(every_minutes) == bool(cron.strip()):
        raise ScheduleError("Give either an interval in minutes or a cron expression.")
    with transaction.atomic():
        task = PeriodicTask(task=TASK, enabled=enabled)
        if every_minutes:
            if not 1 <= every_minutes <= 527040:
                raise ScheduleError("The interval must be between 1 minute and a year.")
            task.interval, _ = IntervalSchedule.objects.get_or_create(
                every=every_minutes, period=IntervalSchedule.MINUTES
            )
            what = f"every {every_minutes} min"
        else:
            task.crontab = _crontab(cron.strip())
            what = f"cron {cron.strip()}"
        # Task names are unique: a placeholder until the schedule's own id can name it (a count
        # of the guest's schedules repeats once one of them is removed).
        label = "Snapshot" if snapshot else "Rebuild"
        task.name = f"{label} {guest.uuid} {uuidlib.uuid4()}"
        task.save()
        schedule = RebuildSchedule.objects.create(
            guest=guest,
            periodic_task=task,
            source=RebuildSchedule.Source.LATEST if latest else RebuildSchedule.Source.PINNED,
            keep_data_disk=keep_data_disk,
            action=action,
            keep=keep or 0,
            created_by=by,
        )
        task.name = f"{label} {guest.name} ({guest.uuid}) #{schedule.pk}: {what}"
        task.kwargs = json.dumps({"schedule_id": schedule.pk})
        task.save(update_fields=["name", "kwargs"])
        audit.record(
            "schedule.create",
            schedule,
            by=by,
            changes={
                "guest": (None, str(guest.uuid)),
                "when": (None, what),
                "source": (None, schedule.source),
                "enabled": (None, enabled),
                "keep_data_disk": (None, keep_data_disk),
                "action": (None, action),
                "keep": (None, schedule.keep),
            },
        )
    return schedule


def schedule_set_enabled(*, schedule: RebuildSchedule, enabled: bool) -> None:
    """Turn a schedule on or off."""
    task = schedule.periodic_task
    before = task.enabled
    with transaction.atomic():
        task.enabled = enabled
        task.save(update_fields=["enabled"])
        if before != enabled:
            audit.record(
                "schedule.enable" if enabled else "schedule.disable",
                schedule,
                changes={"enabled": (before, enabled)},
            )


def schedule_delete(*, schedule: RebuildSchedule) -> None:
    """Remove a schedule and its periodic task."""
    with transaction.atomic():
        audit.record("schedule.delete", schedule, detail=schedule.periodic_task.name)
        schedule.periodic_task.delete()


def schedule_fire(schedule_id: int) -> ScheduleRun | None:
    """One firing: start the rebuild, or record why it was skipped."""
    with audit.acting(audit.Channel.SCHEDULE):
        return _schedule_fire(schedule_id)


def _schedule_fire(schedule_id: int) -> ScheduleRun | None:
    schedule = (
        RebuildSchedule.objects.select_related("guest__template", "guest__host", "periodic_task")
        .filter(pk=schedule_id)
        .first()
    )
    if schedule is None:
        return None
    if not schedule.periodic_task.enabled:
        return None  # disabled between beat's send and this run
    if schedule.guest.state == Guest.State.UNDEFINED:
        # The guest was deleted: stop firing rather than record failures forever.
        schedule_set_enabled(schedule=schedule, enabled=False)
        return ScheduleRun.objects.create(
            schedule=schedule,
            outcome=ScheduleRun.Outcome.FAILED,
            message=f"{schedule.guest.name} was deleted; the schedule is now disabled",
        )
    if schedule.action == RebuildSchedule.Action.SNAPSHOT:
        return _fire_snapshot(schedule)
    latest = schedule.source == RebuildSchedule.Source.LATEST
    try:
        request = provision.rebuild_submit(
            guest=schedule.guest, by=None, latest=latest, keep_data_disk=schedule.keep_data_disk
        )
    except transitions.GuestBusy as exc:
        return ScheduleRun.objects.create(
            schedule=schedule, outcome=ScheduleRun.Outcome.SKIPPED, message=str(exc)
        )
    except provision.SubmitError as exc:
        return ScheduleRun.objects.create(
            schedule=schedule, outcome=ScheduleRun.Outcome.FAILED, message=str(exc)
        )
    job = request.jobs.order_by("-created").first()
    return ScheduleRun.objects.create(schedule=schedule, outcome=ScheduleRun.Outcome.FIRED, job=job)


def _fire_snapshot(schedule: RebuildSchedule) -> ScheduleRun:
    guest = schedule.guest
    name = f"{snapshots.scheduled_prefix(schedule.pk)}{timezone.now():%Y%m%d-%H%M%S-%f}"
    try:
        job = snapshots.snapshot_take(
            guest=guest,
            by=None,
            name=name,
            description=f"taken by schedule #{schedule.pk}",
            keep=schedule.keep,
            schedule=schedule.pk,
        )
    except transitions.GuestBusy as exc:
        return ScheduleRun.objects.create(
            schedule=schedule, outcome=ScheduleRun.Outcome.SKIPPED, message=str(exc)
        )
    except snapshots.SnapshotRefused as exc:
        return ScheduleRun.objects.create(
            schedule=schedule, outcome=ScheduleRun.Outcome.FAILED, message=str(exc)
        )
    return ScheduleRun.objects.create(schedule=schedule, outcome=ScheduleRun.Outcome.FIRED, job=job)
