"""The one place that changes the status of a provisioning request or a job."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import redis
from django.db import IntegrityError, models, transaction
from django.utils import timezone

from provisioning.channels import guest_channel, job_channel, request_channel
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
    # Persistent-only and import requests have no installer run; transient-only ones are
    # never defined either (createXML starts them).
    Status.PREPARING: frozenset(
        {Status.INSTALLING, Status.DEFINING, Status.STARTING, Status.FAILED, Status.CANCELLED}
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

# The tables end where the models say requests and jobs end.
assert {s for s, moves in REQUEST_MOVES.items() if not moves} == ProvisioningRequest.FINAL
assert {s for s, moves in JOB_MOVES.items() if not moves} == Job.FINAL

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


class News:
    """Messages for live pages, published together (one Redis round trip) after commit."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    def add(self, channel: str, payload: Mapping[str, Any]) -> None:
        # Serialised now, inside the transaction, so a bad payload fails the change, not the commit.
        self.messages.append((channel, json.dumps(payload)))

    def send_on_commit(self) -> None:
        """Publish everything added so far once the current transaction commits."""
        messages, self.messages = self.messages, []
        if messages:
            transaction.on_commit(lambda: _send(messages))


def _send(messages: list[tuple[str, str]]) -> None:
    try:
        pipe = client().pipeline(transaction=False)
        for channel, message in messages:
            pipe.publish(channel, message)
        pipe.execute()
    except redis.RedisError as exc:
        # Pages poll as well; a dead Redis must never undo or fail a committed change.
        logger.warning("could not publish on %s: %s", ", ".join(c for c, _ in messages), exc)


def publish(channel: str, payload: Mapping[str, Any]) -> None:
    """Publish `payload` as JSON once the current transaction commits; Redis errors are logged."""
    news = News()
    news.add(channel, payload)
    news.send_on_commit()


def _atomic() -> contextlib.AbstractContextManager[Any]:
    """A transaction, or none inside the caller's: a savepoint is a round trip of its own.

    Refusals (StaleState, IllegalTransition) are raised before anything is written, so the
    caller's transaction stays usable without one.
    """
    if transaction.get_connection().in_atomic_block:
        return contextlib.nullcontext()
    return transaction.atomic()


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
    news: News | None = None,
    **fields: Any,
) -> None:
    """Move a request from an expected status to `to`, record it and tell live pages.

    With `news`, the message joins the caller's batch (the caller sends it); else it is sent
    after commit on its own.
    """
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
    if target in ProvisioningRequest.FINAL:
        values["completed"] = now
    own = news is None
    news = news or News()
    with _atomic():
        left = _swap(ProvisioningRequest.objects.all(), request_id, wanted, values)
        if left is None:
            actual = ProvisioningRequest.objects.values_list("status", flat=True).get(pk=request_id)
            raise StaleState(f"request #{request_id}", actual=actual, expected=wanted, to=target)
        RequestEvent.objects.create(
            request_id=request_id, from_status=left, to_status=target, note=note
        )
        news.add(
            request_channel(request_id),
            {
                "request": request_id,
                "status": target.value,
                "from": left.value,
                "note": note,
                # Only a failure writes an error, and it writes it in this very move.
                "error": str(fields.get("error", "")),
                "at": _iso(now),
            },
        )
        if own:
            news.send_on_commit()


def job_move(
    job_id: int,
    *,
    expected: JobStatus | Iterable[JobStatus],
    to: JobStatus,
    error: str = "",
    progress: int | None = None,
    guest_uuid: object | None = None,
    news: News | None = None,
) -> None:
    """Move a job from an expected status to `to`, stamping started/completed and logging it.

    `guest_uuid` is the job's guest's (None: looked up); with `news`, the messages join the
    caller's batch.
    """
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
    if target in Job.FINAL:
        values["completed"] = now
    if error:
        values["error"] = error
    if progress is not None:
        values["progress"] = progress
    own = news is None
    news = news or News()
    with _atomic():
        left = _swap(Job.objects.all(), job_id, wanted, values)
        if left is None:
            actual = Job.objects.values_list("status", flat=True).get(pk=job_id)
            raise StaleState(f"job #{job_id}", actual=actual, expected=wanted, to=target)
        message = f"{left.label} → {target.label}" + (f": {error}" if error else "")
        event = JobEvent.objects.create(
            job_id=job_id, kind=JobEvent.Kind.STATE, message=message, progress=progress
        )
        shown = progress if progress is not None else _progress_of(job_id)
        _job_news(
            news,
            job_id,
            guest_uuid,
            _job_payload(job_id, target, shown, event, previous=left),
        )
        if own:
            news.send_on_commit()


def job_log(
    job_id: int,
    message: str | Iterable[str],
    *,
    kind: JobEvent.Kind = JobEvent.Kind.LOG,
    progress: int | None = None,
    status: JobStatus | None = None,
    guest_uuid: object | None = None,
    news: News | None = None,
) -> list[JobEvent]:
    """Append one line (or several at once) to a job's history, moving its progress when given.

    `status` and `guest_uuid`, when the caller knows them, spare a look-up for the live pages'
    message; with `news`, the messages join the caller's batch.
    """
    _check_progress(progress)
    lines = [message] if isinstance(message, str) else list(message)
    if not lines:
        return []
    own = news is None
    news = news or News()
    with _atomic():
        if progress is not None:
            Job.objects.filter(pk=job_id).update(progress=progress)
        if status is None or progress is None:
            status, shown = _status_and_progress(job_id)  # after the update: the new progress
        else:
            shown = progress
        events = JobEvent.objects.bulk_create(
            JobEvent(job_id=job_id, kind=JobEvent.Kind(kind), message=line, progress=progress)
            for line in lines
        )
        for event in events:
            _job_news(news, job_id, guest_uuid, _job_payload(job_id, status, shown, event))
        if own:
            news.send_on_commit()
    return events


def job_open(
    *,
    kind: Job.Kind,
    guest: Guest | None = None,
    request: ProvisioningRequest | None = None,
    created_by: Any = None,
    data: dict[str, Any] | None = None,
    note: str = "",
    progress: int | None = None,
    new_guest: bool = False,
) -> Job:
    """Queue a new job, its history starting with `note`; GuestBusy when the guest has one.

    new_guest: the guest was made in this very transaction, so no other job can hold it.
    """
    fields: dict[str, Any] = {
        "kind": Job.Kind(kind),
        "guest": guest,
        "request": request,
        "created_by": created_by,
        "data": data or {},
    }
    with _atomic():
        job = Job.objects.create(**fields) if new_guest else _create_job(guest, fields)
        if note:
            event = JobEvent.objects.create(
                job=job, kind=JobEvent.Kind.LOG, message=note, progress=progress
            )
            news = News()
            payload = _job_payload(job.pk, job.status, job.progress, event)
            _job_news(news, job.pk, guest.uuid if guest is not None else "", payload)
            news.send_on_commit()
    return job


def _create_job(guest: Guest | None, fields: dict[str, Any]) -> Job:
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


# --- the provisioning engine's moves ---------------------------------------------------------


@dataclass
class JobRef:
    """The job a request's steps report to, as far as they need to know it."""

    id: int
    status: JobStatus
    guest_uuid: object | None


def request_job_ref(request: ProvisioningRequest) -> JobRef | None:
    """The job of a request (its latest provision or rebuild job), or None.

    A request loaded with `job_pk` and `job_status` annotations (the engine's load) needs no
    look-up.
    """
    if hasattr(request, "job_pk"):
        annotated: Any = request
        found = (annotated.job_pk, annotated.job_status) if annotated.job_pk is not None else None
    else:
        found = (
            Job.objects.filter(request_id=request.pk, kind__in=Job.FOR_REQUESTS)
            .order_by("-created")
            .values_list("pk", "status")
            .first()
        )
    if found is None:
        return None
    guest_uuid = request.guest.uuid if request.guest is not None else ""
    return JobRef(found[0], JobStatus(found[1]), guest_uuid)


def request_step(
    request_id: int,
    *,
    expected: Status,
    to: Status,
    note: str,
    job: JobRef | None,
    lines: Sequence[str],
    progress: int | None,
    finish: bool = False,
    **fields: Any,
) -> None:
    """A provisioning step's move, all in one commit: the request's compare-and-swap and history,
    its job's log lines and progress (the job is claimed on the first, and ends with `finish`),
    and the news for live pages in one Redis round trip."""
    news = News()
    with _atomic():
        request_move(request_id, expected=expected, to=to, note=note, news=news, **fields)
        if job is not None:
            _job_report(job, lines, progress=progress, finish=finish, news=news)
        news.send_on_commit()


def job_note(job: JobRef, lines: Sequence[str]) -> None:
    """Log lines of a request's job between moves (the job is claimed if still queued)."""
    news = News()
    with _atomic():
        _job_report(job, lines, progress=None, finish=False, news=news)
        news.send_on_commit()


def _job_report(
    job: JobRef, lines: Sequence[str], *, progress: int | None, finish: bool, news: News
) -> None:
    _check_progress(progress)
    now = timezone.now()
    values: dict[str, Any] = {} if progress is None else {"progress": progress}
    claimed = ended = False
    if job.status == JobStatus.QUEUED:
        # The first report claims the job; a duplicate runner's claim finds it running already.
        claimed = bool(
            Job.objects.filter(pk=job.id, status=JobStatus.QUEUED).update(
                status=JobStatus.RUNNING, started=now, **values
            )
        )
        if claimed:
            values = {}
        job.status = JobStatus.RUNNING
    if finish:
        # Closed elsewhere (failed or cancelled): the request's move stands, the job stays.
        ended = bool(
            Job.objects.filter(pk=job.id, status=JobStatus.RUNNING).update(
                status=JobStatus.SUCCEEDED, completed=now, progress=100
            )
        )
        if ended:
            job.status, progress, values = JobStatus.SUCCEEDED, 100, {}
    if values:
        Job.objects.filter(pk=job.id).update(**values)

    def state(a: JobStatus, b: JobStatus) -> JobEvent:
        message = f"{a.label} → {b.label}"
        return JobEvent(job_id=job.id, kind=JobEvent.Kind.STATE, message=message, progress=progress)

    events = [
        *([state(JobStatus.QUEUED, JobStatus.RUNNING)] if claimed else []),
        *(
            JobEvent(job_id=job.id, kind=JobEvent.Kind.LOG, message=m, progress=progress)
            for m in lines
        ),
        *([state(JobStatus.RUNNING, JobStatus.SUCCEEDED)] if ended else []),
    ]
    for event in JobEvent.objects.bulk_create(events):
        _job_news(news, job.id, job.guest_uuid, _job_payload(job.id, job.status, progress, event))


def _progress_of(job_id: int) -> int:
    return int(Job.objects.values_list("progress", flat=True).get(pk=job_id))


def _status_and_progress(job_id: int) -> tuple[JobStatus, int]:
    status, progress = Job.objects.values_list("status", "progress").get(pk=job_id)
    return JobStatus(status), int(progress)


def _job_news(news: News, job_id: int, guest_uuid: object | None, payload: dict[str, Any]) -> None:
    """A job's news goes to its own channel and to its guest's, where the guest page listens."""
    news.add(job_channel(job_id), payload)
    if guest_uuid == "":
        return  # known to have no guest
    if guest_uuid is None:
        guest_uuid = Job.objects.filter(pk=job_id).values_list("guest__uuid", flat=True).first()
    if guest_uuid is not None:
        news.add(guest_channel(guest_uuid), payload)


def _check_progress(progress: int | None) -> None:
    if progress is not None and not 0 <= progress <= 100:
        raise ValueError(f"progress is a percentage, not {progress}")


def _job_payload(
    job_id: int,
    status: str,
    progress: int | None,
    event: JobEvent,
    *,
    previous: str | None = None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "job": job_id,
        "status": str(status),
        "progress": progress,
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
