"""The one place that changes the status of a provisioning request or a job."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import redis
from django.db import IntegrityError, models, transaction
from django.utils import timezone

from provisioning.models import Guest, Job, JobEvent, ProvisioningRequest, RequestEvent
from vmportal.heartbeat import client

logger = logging.getLogger(__name__)

Status = ProvisioningRequest.Status
JobStatus = Job.Status
S = TypeVar("S", bound=models.TextChoices)

# Every move a request may make. A status with no moves out is final.
REQUEST_MOVES: Mapping[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.ADMITTED, Status.FAILED, Status.CANCELLED}),
    Status.ADMITTED: frozenset({Status.PREPARING, Status.FAILED, Status.CANCELLED}),
    # Persistent-only, transient-only and import requests have no installer run.
    Status.PREPARING: frozenset(
        {Status.INSTALLING, Status.DEFINING, Status.FAILED, Status.CANCELLED}
    ),
    Status.INSTALLING: frozenset({Status.WAITING, Status.FAILED, Status.CANCELLED}),
    Status.WAITING: frozenset({Status.DEFINING, Status.FAILED, Status.CANCELLED}),
    Status.DEFINING: frozenset({Status.STARTING, Status.FAILED, Status.CANCELLED}),
    Status.STARTING: frozenset({Status.RUNNING, Status.FAILED, Status.CANCELLED}),
    Status.RUNNING: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}

# Every move a job may make.
JOB_MOVES: Mapping[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}

REQUEST_FINAL: frozenset[Status] = frozenset(s for s, moves in REQUEST_MOVES.items() if not moves)
JOB_FINAL: frozenset[JobStatus] = frozenset(s for s, moves in JOB_MOVES.items() if not moves)

# Columns the move itself owns; callers may not set them through **fields.
_OWNED_FIELDS = frozenset({"id", "pk", "status", "updated", "completed", "started"})


class TransitionError(Exception):
    """Base class for refused status changes."""


class IllegalTransition(TransitionError):
    """The move is not in the table of allowed moves."""


class StaleState(TransitionError):
    """The row was not in an expected status: another worker or a race moved it on."""

    def __init__(self, what: str, *, actual: str, expected: Iterable[str], to: str) -> None:
        self.actual = actual
        self.expected = tuple(expected)
        self.to = to
        wanted = " or ".join(self.expected)
        super().__init__(f"{what} is {actual}, not {wanted}; cannot move it to {to}")

    @property
    def already_there(self) -> bool:
        """True when the row already has the status the move aimed for."""
        return self.actual == self.to


class GuestBusy(TransitionError):
    """The guest already has a queued or running job."""

    def __init__(self, guest: Guest, job: Job) -> None:
        self.guest = guest
        self.job = job
        kind = job.get_kind_display().lower()
        super().__init__(f"{guest} is busy with {kind} job #{job.pk}; try again when it finishes")


def can_move(status: str, to: str) -> bool:
    """Whether the table lets a request move from `status` to `to`."""
    return Status(to) in REQUEST_MOVES[Status(status)]


def is_final(status: str) -> bool:
    """Whether a request in `status` can move no further."""
    return not REQUEST_MOVES[Status(status)]


def is_cancellable(status: str) -> bool:
    """Whether a request in `status` may still be cancelled."""
    return can_move(status, Status.CANCELLED)


def job_can_move(status: str, to: str) -> bool:
    """Whether the table lets a job move from `status` to `to`."""
    return JobStatus(to) in JOB_MOVES[JobStatus(status)]


def job_is_final(status: str) -> bool:
    """Whether a job in `status` can move no further."""
    return not JOB_MOVES[JobStatus(status)]


def job_is_cancellable(status: str) -> bool:
    """Whether a job in `status` may still be cancelled."""
    return job_can_move(status, JobStatus.CANCELLED)


def request_channel(request_id: int) -> str:
    """The Redis pub/sub channel that live pages of one request listen on."""
    return f"vmportal:request:{request_id}"


def job_channel(job_id: int) -> str:
    """The Redis pub/sub channel that live pages of one job listen on."""
    return f"vmportal:job:{job_id}"


def publish(channel: str, payload: Mapping[str, Any]) -> None:
    """Publish `payload` as JSON once the current transaction commits; Redis errors are logged."""
    # Serialise now, inside the transaction, so a bad payload fails the change, not the commit.
    message = json.dumps(payload)

    def send() -> None:
        try:
            client().publish(channel, message)
        except redis.RedisError as exc:
            # Pages poll as well; a dead Redis must never undo or fail a committed change.
            logger.warning("could not publish on %s: %s", channel, exc)

    transaction.on_commit(send)


def _statuses(choices: type[S], given: str | Iterable[str]) -> tuple[S, ...]:
    """Normalise one status or several into a tuple of choices, refusing unknown values."""
    # A status is a str, and a str is iterable: take it as one status, not as its letters.
    values = [given] if isinstance(given, str) else list(given)
    if not values:
        raise ValueError("expected needs at least one status")
    return tuple(dict.fromkeys(choices(v) for v in values))


def _swap(
    queryset: models.QuerySet[Any], pk: int, expected: tuple[S, ...], values: dict[str, Any]
) -> S | None:
    """Compare-and-swap the row's status; the status it was in, or None when it was in none."""
    # One conditional UPDATE per candidate, so the history knows which status the row left;
    # with a single expected status (the usual call) this is exactly one statement.
    for status in expected:
        if queryset.filter(pk=pk, status=status).update(**values) == 1:
            return status
    return None


def request_move(
    request_id: int,
    *,
    expected: Status | Iterable[Status],
    to: Status,
    note: str = "",
    **fields: Any,
) -> ProvisioningRequest:
    """Move a request from an expected status to `to`, record it and tell live pages."""
    wanted = _statuses(Status, expected)
    target = Status(to)
    refused = [s for s in wanted if target not in REQUEST_MOVES[s]]
    if refused:
        raise IllegalTransition(
            f"request #{request_id} may not move from {' or '.join(refused)} to {target}"
        )
    clash = _OWNED_FIELDS & fields.keys()
    if clash:
        raise TypeError(f"request_move sets {', '.join(sorted(clash))} itself")

    now = timezone.now()
    values: dict[str, Any] = {"status": target, "updated": now, **fields}
    if target in REQUEST_FINAL:
        values["completed"] = now
    with transaction.atomic():
        left = _swap(ProvisioningRequest.objects.all(), request_id, wanted, values)
        if left is None:
            actual = ProvisioningRequest.objects.values_list("status", flat=True).get(pk=request_id)
            raise StaleState(f"request #{request_id}", actual=actual, expected=wanted, to=target)
        RequestEvent.objects.create(
            request_id=request_id, from_status=left, to_status=target, note=note
        )
        row = ProvisioningRequest.objects.get(pk=request_id)
        publish(
            request_channel(request_id),
            {
                "request": request_id,
                "status": target.value,
                "from": left.value,
                "note": note,
                "error": row.error,
                "at": _iso(now),
            },
        )
    return row


def job_move(
    job_id: int,
    *,
    expected: JobStatus | Iterable[JobStatus],
    to: JobStatus,
    error: str = "",
    progress: int | None = None,
) -> Job:
    """Move a job from an expected status to `to`, stamping started/completed and logging it."""
    wanted = _statuses(JobStatus, expected)
    target = JobStatus(to)
    refused = [s for s in wanted if target not in JOB_MOVES[s]]
    if refused:
        raise IllegalTransition(
            f"job #{job_id} may not move from {' or '.join(refused)} to {target}"
        )
    if target == JobStatus.SUCCEEDED and progress is None:
        progress = 100
    _check_progress(progress)

    now = timezone.now()
    values: dict[str, Any] = {"status": target}
    if target == JobStatus.RUNNING:
        values["started"] = now
    if target in JOB_FINAL:
        values["completed"] = now
    if error:
        values["error"] = error
    if progress is not None:
        values["progress"] = progress
    with transaction.atomic():
        left = _swap(Job.objects.all(), job_id, wanted, values)
        if left is None:
            actual = Job.objects.values_list("status", flat=True).get(pk=job_id)
            raise StaleState(f"job #{job_id}", actual=actual, expected=wanted, to=target)
        message = f"{left.label} → {target.label}" + (f": {error}" if error else "")
        event = JobEvent.objects.create(
            job_id=job_id, kind=JobEvent.Kind.STATE, message=message, progress=progress
        )
        job = Job.objects.select_related("guest").get(pk=job_id)
        _publish_job(job, _job_payload(job, event, previous=left))
    return job


def job_log(
    job_id: int,
    message: str,
    *,
    kind: JobEvent.Kind = JobEvent.Kind.LOG,
    progress: int | None = None,
) -> JobEvent:
    """Append a line to a job's history, moving its progress when given, and tell live pages."""
    _check_progress(progress)
    with transaction.atomic():
        if progress is not None:
            Job.objects.filter(pk=job_id).update(progress=progress)
        job = Job.objects.select_related("guest").get(pk=job_id)
        event = JobEvent.objects.create(
            job=job, kind=JobEvent.Kind(kind), message=message, progress=progress
        )
        _publish_job(job, _job_payload(job, event))
    return event


def job_open(
    *,
    kind: Job.Kind,
    guest: Guest | None = None,
    request: ProvisioningRequest | None = None,
    created_by: Any = None,
    data: dict[str, Any] | None = None,
) -> Job:
    """Queue a new job; GuestBusy when the guest already has an active one."""
    fields: dict[str, Any] = {
        "kind": Job.Kind(kind),
        "guest": guest,
        "request": request,
        "created_by": created_by,
        "data": data or {},
    }
    try:
        # A savepoint, so the caller's own transaction survives a refused job.
        with transaction.atomic():
            return Job.objects.create(**fields)
    except IntegrityError:
        if guest is None:
            raise
        blocker = Job.objects.filter(guest=guest, status__in=Job.ACTIVE).first()
        if blocker is not None:
            raise GuestBusy(guest, blocker) from None
    # The blocking job ended between the clash and the look-up: the guest is free now.
    with transaction.atomic():
        return Job.objects.create(**fields)


def _publish_job(job: Job, payload: Mapping[str, Any]) -> None:
    """A job's news goes to its own channel and to its guest's, where the guest page listens."""
    publish(job_channel(job.pk), payload)
    if job.guest_id is not None:
        # Callers load the guest with the job (one query); look it up only when they did not.
        loaded = Job.guest.is_cached(job)
        uuid = (
            job.guest.uuid
            if loaded and job.guest is not None
            else Guest.objects.values_list("uuid", flat=True).get(pk=job.guest_id)
        )
        publish(f"vmportal:guest:{uuid}", payload)


def _check_progress(progress: int | None) -> None:
    if progress is not None and not 0 <= progress <= 100:
        raise ValueError(f"progress is a percentage, not {progress}")


def _job_payload(job: Job, event: JobEvent, *, previous: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "job": job.pk,
        "status": job.status,
        "progress": job.progress,
        "event": event.pk,
        "kind": event.kind,
        "message": event.message,
        "at": _iso(event.created),
    }
    if previous is not None:
        payload["from"] = str(previous)
    return payload


def _iso(moment: datetime) -> str:
    return moment.isoformat()
