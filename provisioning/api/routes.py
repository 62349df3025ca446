"""The API's operations: each checks access, calls the service the page calls, and answers.

Long work (a new guest, a lifecycle action, a rebuild, a migration) answers 202 with the
request or job to follow, and its `Location`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal
from uuid import UUID

from asgiref.sync import sync_to_async
from django.db import IntegrityError, transaction
from django.db.models import Exists, OuterRef, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from ninja import Header, Path, Query, Router
from ninja.responses import NinjaJSONEncoder

from provisioning import selectors, streams
from provisioning.channels import guest_channel, job_channel, request_channel
from provisioning.models import (
    SNAPSHOT_NAME_MAX,
    Guest,
    GuestTemplate,
    Host,
    IdempotencyKey,
    Job,
    JobEvent,
    ProvisioningRequest,
    RebuildSchedule,
    Snapshot,
    SshKey,
)
from provisioning.services import (
    actions,
    keys,
    migrate,
    placement,
    provision,
    quotas,
    schedules,
    snapshots,
    transitions,
)

from . import schemas as s
from .base import (
    ERRORS,
    Problem,
    api,
    caller,
    check_if_match,
    decode_cursor,
    encode_cursor,
    etag_of,
    if_match,
    require_staff,
)

PREFIX = "/api/v1"
LOG_LINES = 30
Limit = Query(50, ge=1, le=200, description="Items per page (at most 200).")
Cursor = Query(None, max_length=100, pattern=r"^[A-Za-z0-9_-]*$", description="A page's `next`.")
IdPath = Path(..., ge=1, le=2**53)
Filter = Query(None)  # an optional filter of a list, its type from the annotation
ACTION_KINDS = tuple(
    k.value
    for k in Job.Kind
    if k not in (Job.Kind.PROVISION, Job.Kind.REBUILD, Job.Kind.MIGRATE, Job.Kind.DELETE)
    and k not in snapshots.KINDS  # their own operations: they name a snapshot
)
ActionKind = Literal[ACTION_KINDS]  # type: ignore[valid-type]
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _answers(ok: dict[int, Any]) -> dict[Any, Any]:
    return {**ok, frozenset(ERRORS): s.Problem}


def _page(rows: QuerySet[Any], cursor: str | None, limit: int) -> tuple[list[Any], str | None]:
    """One page of rows in id order after the cursor, and the next page's cursor."""
    after = decode_cursor(cursor)
    items = list(rows.filter(pk__gt=after).order_by("pk")[: limit + 1])
    more = len(items) > limit
    items = items[:limit]
    return items, encode_cursor(items[-1].pk) if more and items else None


def _tagged(response: HttpResponse, data: dict[str, Any]) -> dict[str, Any]:
    response["ETag"] = etag_of(data)
    return data


def _accepted(
    request: HttpRequest, data: dict[str, Any], location: str, *, status: int = 202
) -> HttpResponse:
    response = HttpResponse(
        json.dumps(data, cls=NinjaJSONEncoder), status=status, content_type="application/json"
    )
    response["Location"] = location
    return response


def _created(request: HttpRequest, data: dict[str, Any]) -> HttpResponse:
    """201 with the new thing, where it lives (Location) and its ETag."""
    response = _accepted(request, data, data["url"], status=201)
    response["ETag"] = etag_of(data)
    return response


# --- representations ---


def _size(template: GuestTemplate, field: str) -> dict[str, int]:
    low, default, high = template.size_range(field)
    return {"min": low, "default": default, "max": high}


def template_out(t: GuestTemplate) -> dict[str, Any]:
    cloud = t.method == GuestTemplate.Method.CLOUD
    return {
        "id": t.pk,
        "name": t.name,
        "description": t.description,
        "version": t.version,
        "method": t.method,
        "lifecycle": t.lifecycle,
        "libvirt_summary": t.libvirt_summary,
        **{field: _size(t, field) for field in GuestTemplate.SIZES},
        "start_paused": t.start_paused,
        "autostart": t.autostart,
        "autodestroy": t.autodestroy,
        "takes_ssh_keys": cloud,
        "takes_cloud_config": cloud and t.user_cloud_config,
    }


def _guests(user: Any) -> QuerySet[Guest]:
    busy = Job.objects.filter(guest=OuterRef("pk"), status__in=Job.ACTIVE)
    return selectors.guests_of(user).select_related("host", "owner").annotate(busy=Exists(busy))


def guest_out(g: Guest) -> dict[str, Any]:
    busy = getattr(g, "busy", None)
    if busy is None:
        busy = g.jobs.filter(status__in=Job.ACTIVE).exists()
    return {
        "uuid": g.uuid,
        "name": g.name,
        "owner": g.owner.get_username(),
        "host": g.host.name,
        "template": g.template_id,
        "template_version": g.template_version,
        "state": g.state,
        "state_reason": g.state_reason,
        "state_changed": g.state_changed,
        "persistent": g.persistent,
        "autostart": g.autostart,
        "autodestroy": g.autodestroy,
        "vcpus": g.vcpus,
        "memory_mib": g.memory_mib,
        "disk_mib": g.disk_mib,
        "data_disk_mib": g.data_disk_mib,
        "addresses": g.addresses,
        "agent_connected": g.agent_connected,
        "created": g.created,
        "actions": [] if busy else actions.allowed_actions(g),
        "url": f"{PREFIX}/guests/{g.uuid}",
    }


def _requests(user: Any) -> QuerySet[ProvisioningRequest]:
    job = Job.objects.filter(request=OuterRef("pk"), kind__in=Job.FOR_REQUESTS).order_by("-created")
    return (
        selectors.requests_of(user)
        .select_related("host", "guest")
        .annotate(job_id=Subquery(job.values("pk")[:1]))
    )


def request_out(r: ProvisioningRequest) -> dict[str, Any]:
    job_id = getattr(r, "job_id", None)
    if job_id is None and not hasattr(r, "job_id"):
        job = selectors.request_job(r)
        job_id = job.pk if job else None
    return {
        "id": r.pk,
        "kind": r.kind,
        "name": r.name,
        "status": r.status,
        "status_label": r.get_status_display(),
        "error": r.error,
        "template": r.template_id,
        "template_version": r.template_version,
        "guest": r.guest.uuid if r.guest else None,
        "host": r.host.name if r.host else None,
        "vcpus": r.vcpus,
        "memory_mib": r.memory_mib,
        "disk_mib": r.disk_mib,
        "data_disk_mib": r.data_disk_mib,
        "job": job_id,
        "created": r.created,
        "updated": r.updated,
        "completed": r.completed,
        "url": f"{PREFIX}/requests/{r.pk}",
    }


def job_out(j: Job) -> dict[str, Any]:
    lines = list(
        JobEvent.objects.filter(job=j)
        .exclude(kind=JobEvent.Kind.CONSOLE)
        .order_by("-created", "-id")[:LOG_LINES]
    )[::-1]
    return {
        "id": j.pk,
        "kind": j.kind,
        "status": j.status,
        "progress": j.progress,
        "error": j.error,
        "guest": j.guest.uuid if j.guest else None,
        "request": j.request_id,
        "created": j.created,
        "started": j.started,
        "completed": j.completed,
        "log": [
            {"time": e.created, "kind": e.kind, "message": e.message, "progress": e.progress}
            for e in lines
        ],
        "url": f"{PREFIX}/jobs/{j.pk}",
    }


def schedule_out(r: RebuildSchedule) -> dict[str, Any]:
    task = r.periodic_task
    cron = None
    if task.crontab is not None:
        c = task.crontab
        cron = f"{c.minute} {c.hour} {c.day_of_month} {c.month_of_year} {c.day_of_week}"
    return {
        "id": r.pk,
        "guest": r.guest.uuid,
        "every_minutes": task.interval.every if task.interval is not None else None,
        "cron": cron,
        "action": r.action,
        "keep": r.keep or None,
        "source": r.source,
        "keep_data_disk": r.keep_data_disk,
        "enabled": task.enabled,
        "created": r.created,
        "url": f"{PREFIX}/schedules/{r.pk}",
    }


def key_out(k: SshKey) -> dict[str, Any]:
    return {
        "id": k.pk,
        "name": k.name,
        "fingerprint": k.fingerprint,
        "public_key": k.public_key,
        "created": k.created,
        "url": f"{PREFIX}/keys/{k.pk}",
    }


def host_out(h: Host, guests: int) -> dict[str, Any]:
    return {
        "id": h.pk,
        "name": h.name,
        "uri": h.uri,
        "enabled": h.enabled,
        "down": placement.host_is_down(h),
        "last_seen": h.last_seen,
        "domain_type": h.detected_domain_type or h.domain_type,
        "capacity_vcpus": h.capacity_vcpus,
        "capacity_memory_mib": h.capacity_memory_mib,
        "capacity_disk_gib": h.capacity_disk_gib,
        "guests": guests,
    }


# --- look-ups (404 for what the caller may not see) ---


def _guest(request: HttpRequest, uuid: UUID) -> Guest:
    guest = _guests(caller(request).user).filter(uuid=uuid).select_related("template").first()
    if guest is None:
        raise Http404("No such guest.")
    return guest


def _request(request: HttpRequest, pk: int) -> ProvisioningRequest:
    found = _requests(caller(request).user).filter(pk=pk).first()
    if found is None:
        raise Http404("No such request.")
    return found


def _job(request: HttpRequest, pk: int) -> Job:
    user = caller(request).user
    job = Job.objects.select_related("guest", "request").filter(pk=pk).first()
    visible = job is not None and (
        user.is_staff
        or (job.guest is not None and job.guest.owner_id == user.pk)
        or (job.request is not None and job.request.owner_id == user.pk)
    )
    if job is None or not visible:
        raise Http404("No such job.")
    return job


def _schedule(request: HttpRequest, pk: int) -> RebuildSchedule:
    found = (
        RebuildSchedule.objects.filter(guest__in=selectors.guests_of(caller(request).user), pk=pk)
        .select_related("guest", "periodic_task__interval", "periodic_task__crontab")
        .first()
    )
    if found is None:
        raise Http404("No such schedule.")
    return found


def _key(request: HttpRequest, pk: int) -> SshKey:
    found = SshKey.objects.filter(owner=caller(request).user, pk=pk).first()
    if found is None:
        raise Http404("No such key.")
    return found


def _refused(status: int, exc: Exception) -> Problem:
    return Problem(status, str(exc))


def _submit_problem(exc: provision.SubmitError) -> Problem:
    errors = [{"field": k, "message": v} for k, v in exc.errors.items()]
    return Problem(422, "The request cannot be made as asked.", errors=errors)


# --- templates ---

templates = Router(tags=["templates"])


@templates.get("", response=_answers({200: s.TemplatePage}), summary="List templates")
def template_list(
    request: HttpRequest, cursor: str | None = Cursor, limit: int = Limit
) -> dict[str, Any]:
    rows = GuestTemplate.objects.filter(enabled=True).select_related("media")
    items, after = _page(rows, cursor, limit)
    return {"items": [template_out(t) for t in items], "next": after}


@templates.get("/{id}", response=_answers({200: s.TemplateOut}), summary="Read a template")
def template_read(request: HttpRequest, response: HttpResponse, id: int = IdPath) -> Any:
    template = GuestTemplate.objects.filter(enabled=True, pk=id).first()
    if template is None:
        raise Http404("No such template.")
    return _tagged(response, template_out(template))


# --- guests ---

guests = Router(tags=["guests"])


@guests.get("", response=_answers({200: s.GuestPage}), summary="List guests")
def guest_list(
    request: HttpRequest,
    state: Guest.State | None = Filter,
    owner: str | None = Query(None, max_length=150, pattern=r"^[\w.@+-]+$"),
    host: str | None = Query(None, max_length=63, pattern=r"^[A-Za-z0-9._-]+$"),
    q: str | None = Query(None, max_length=100, pattern=r"^[^\x00]*$"),
    cursor: str | None = Cursor,
    limit: int = Limit,
) -> dict[str, Any]:
    """Your guests (every guest for staff), without deleted ones unless `state=undefined`.
    `owner` filters for staff only."""
    user = caller(request).user
    rows = _guests(user)
    rows = rows.filter(state=state) if state else rows.exclude(state=Guest.State.UNDEFINED)
    if q:
        rows = rows.filter(name__icontains=q)
    if owner and user.is_staff:
        rows = rows.filter(owner__username=owner)
    if host:
        rows = rows.filter(host__name=host)
    items, after = _page(rows, cursor, limit)
    return {"items": [guest_out(g) for g in items], "next": after}


@guests.get("/{uuid}", response=_answers({200: s.GuestOut}), summary="Read a guest")
def guest_read(request: HttpRequest, uuid: UUID, response: HttpResponse) -> Any:
    return _tagged(response, guest_out(_guest(request, uuid)))


@guests.get("/{uuid}/stats", response=_answers({200: s.GuestStats}), summary="Usage graphs")
def guest_stats(
    request: HttpRequest, uuid: UUID, range: Literal["hour", "day", "week"] = "hour"
) -> Any:
    """CPU, memory, disk and network use as the listener sampled them: the last hour at full
    resolution (every `step` seconds), the last day in 2-minute and the last week in 15-minute
    averages. Live points come on `GET /guests/{uuid}/events` as `stats` events."""
    return selectors.guest_graphs(_guest(request, uuid), range)


@guests.post(
    "/{uuid}/actions/{kind}",
    response=_answers({202: s.JobOut}),
    summary="Run an action",
    openapi_extra=if_match(),
)
def guest_action(
    request: HttpRequest, uuid: UUID, kind: ActionKind, force: bool = Query(False)
) -> HttpResponse:
    """Start a lifecycle action as a job (`force` only for shutdown: force off after the
    grace period). 409 when the guest's state does not allow it or another job runs.
    `If-Match` with the guest's ETag makes it happen only if the guest did not change."""
    guest = _guest(request, uuid)
    check_if_match(request, guest_out(guest))
    options = {"force": force} if kind == Job.Kind.SHUTDOWN else {}
    try:
        job = actions.guest_action(guest=guest, kind=kind, by=caller(request).user, **options)
    except (actions.ActionRefused, transitions.GuestBusy) as exc:
        raise _refused(409, exc) from exc
    return _accepted(request, job_out(job), f"{PREFIX}/jobs/{job.pk}")


@guests.delete(
    "/{uuid}",
    response=_answers({202: s.JobOut}),
    summary="Delete a guest",
    openapi_extra=if_match(),
)
def guest_delete(request: HttpRequest, uuid: UUID, keep_disk: bool = Query(False)) -> HttpResponse:
    """Destroy and undefine the guest, removing its disks unless `keep_disk`."""
    guest = _guest(request, uuid)
    check_if_match(request, guest_out(guest))
    try:
        job = actions.guest_action(
            guest=guest, kind=Job.Kind.DELETE, by=caller(request).user, keep_disk=keep_disk
        )
    except (actions.ActionRefused, transitions.GuestBusy) as exc:
        raise _refused(409, exc) from exc
    return _accepted(request, job_out(job), f"{PREFIX}/jobs/{job.pk}")


@guests.post("/{uuid}/rebuild", response=_answers({202: s.RequestOut}), summary="Rebuild")
def guest_rebuild(request: HttpRequest, uuid: UUID, body: s.RebuildIn) -> HttpResponse:
    """Rebuild the guest from its template (keeping name, UUID and MAC)."""
    guest = _guest(request, uuid)
    try:
        made = provision.rebuild_submit(
            guest=guest,
            by=caller(request).user,
            latest=body.source == "latest",
            keep_data_disk=body.keep_data_disk,
        )
    except transitions.GuestBusy as exc:
        raise _refused(409, exc) from exc
    except provision.SubmitError as exc:
        raise Problem(409, str(exc)) from exc
    found = _requests(caller(request).user).get(pk=made.pk)
    return _accepted(request, request_out(found), f"{PREFIX}/requests/{made.pk}")


@guests.post("/{uuid}/migrate", response=_answers({202: s.JobOut}), summary="Migrate (staff)")
def guest_migrate(request: HttpRequest, uuid: UUID, body: s.MigrateIn) -> HttpResponse:
    """Staff: move the guest to another host, live when it runs, offline when stopped."""
    require_staff(request)
    guest = _guest(request, uuid)
    dest = None
    if body.dest is not None:
        dest = Host.objects.filter(pk=body.dest).first()
        if dest is None:
            raise Problem(
                422,
                "No such destination host.",
                errors=[{"field": "dest", "message": "Pick a host id from /hosts."}],
            )
    try:
        job = migrate.migration_start(
            guest=guest, by=caller(request).user, dest=dest, bandwidth_mib=body.bandwidth_mib
        )
    except (migrate.MigrationRefused, transitions.GuestBusy) as exc:
        raise _refused(409, exc) from exc
    return _accepted(request, job_out(job), f"{PREFIX}/jobs/{job.pk}")


@guests.get("/{uuid}/schedules", response=_answers({200: s.SchedulePage}), summary="List schedules")
def schedule_list(
    request: HttpRequest, uuid: UUID, cursor: str | None = Cursor, limit: int = Limit
) -> dict[str, Any]:
    guest = _guest(request, uuid)
    rows = RebuildSchedule.objects.filter(guest=guest).select_related(
        "guest", "periodic_task__interval", "periodic_task__crontab"
    )
    items, after = _page(rows, cursor, limit)
    return {"items": [schedule_out(r) for r in items], "next": after}


@guests.post("/{uuid}/schedules", response=_answers({201: s.ScheduleOut}), summary="Add a schedule")
def schedule_create(request: HttpRequest, uuid: UUID, body: s.ScheduleIn) -> Any:
    """Rebuild the guest, or take a snapshot of it keeping the newest `keep` of this schedule's,
    every N minutes or on a cron expression (give one of the two)."""
    guest = _guest(request, uuid)
    try:
        made = schedules.schedule_create(
            guest=guest,
            by=caller(request).user,
            every_minutes=body.every_minutes,
            cron=body.cron,
            latest=body.source == "latest",
            enabled=body.enabled,
            keep_data_disk=body.keep_data_disk,
            action=body.action,
            keep=body.keep,
        )
    except schedules.ScheduleError as exc:
        raise Problem(422, str(exc)) from exc
    return _created(request, schedule_out(_schedule(request, made.pk)))


def snapshot_out(snap: Snapshot) -> dict[str, Any]:
    return {
        "name": snap.name,
        "description": snap.description,
        "taken": snap.taken,
        "state": snap.state,
        "memory": snap.memory,
        "current": snap.current,
        "size_bytes": snap.size_bytes,
    }


def _snapshot(guest: Guest, name: str) -> Snapshot:
    found = guest.snapshots.filter(name=name).first()
    if found is None:
        raise Http404("No such snapshot.")
    return found


@guests.get("/{uuid}/snapshots", response=_answers({200: s.SnapshotList}), summary="Snapshots")
def snapshot_list(request: HttpRequest, uuid: UUID) -> dict[str, Any]:
    """The guest's snapshots, oldest first (at most the owner's quota per guest: no pages)."""
    guest = _guest(request, uuid)
    return {
        "items": [snapshot_out(x) for x in guest.snapshots.all()],
        "limit": snapshots.per_guest_limit(guest.owner),
    }


@guests.post("/{uuid}/snapshots", response=_answers({202: s.JobOut}), summary="Take a snapshot")
def snapshot_take(request: HttpRequest, uuid: UUID, body: s.SnapshotIn) -> HttpResponse:
    """A job that takes an internal snapshot: disks and memory of a running or paused guest,
    disks of a stopped one. 409 past the quota, for an autodestroy guest, a name it has, or
    while another job runs; 422 for a bad name."""
    guest = _guest(request, uuid)
    if body.name and not snapshots.NAME.fullmatch(body.name):
        raise Problem(422, snapshots.BAD_NAME)
    try:
        job = snapshots.snapshot_take(
            guest=guest, by=caller(request).user, name=body.name, description=body.description
        )
    except (snapshots.SnapshotRefused, transitions.GuestBusy) as exc:
        raise _refused(409, exc) from exc
    return _accepted(request, job_out(job), f"{PREFIX}/jobs/{job.pk}")


@guests.post(
    "/{uuid}/snapshots/{path:name}/revert",
    response=_answers({202: s.JobOut}),
    summary="Revert to a snapshot",
)
def snapshot_revert(
    request: HttpRequest, uuid: UUID, name: str = Path(..., max_length=SNAPSHOT_NAME_MAX)
) -> HttpResponse:
    """A job that returns the guest to the snapshot: what it wrote since is lost, and its
    memory now if the snapshot holds memory (it comes back running or paused as it was)."""
    guest = _guest(request, uuid)
    snap = _snapshot(guest, name)
    try:
        job = snapshots.snapshot_revert(guest=guest, name=snap.name, by=caller(request).user)
    except (snapshots.SnapshotRefused, transitions.GuestBusy) as exc:
        raise _refused(409, exc) from exc
    return _accepted(request, job_out(job), f"{PREFIX}/jobs/{job.pk}")


@guests.delete(
    "/{uuid}/snapshots/{path:name}",
    response=_answers({202: s.JobOut}),
    summary="Delete a snapshot",
)
def snapshot_delete(
    request: HttpRequest, uuid: UUID, name: str = Path(..., max_length=SNAPSHOT_NAME_MAX)
) -> HttpResponse:
    """A job that deletes one snapshot (the others and the guest stay as they are)."""
    guest = _guest(request, uuid)
    snap = _snapshot(guest, name)
    try:
        job = snapshots.snapshot_delete(guest=guest, name=snap.name, by=caller(request).user)
    except (snapshots.SnapshotRefused, transitions.GuestBusy) as exc:
        raise _refused(409, exc) from exc
    return _accepted(request, job_out(job), f"{PREFIX}/jobs/{job.pk}")


@guests.get("/{uuid}/events", response=_answers({200: None}), summary="Live guest events (SSE)")
async def guest_events(request: HttpRequest, uuid: UUID) -> StreamingHttpResponse:
    """Server-sent events: `guest` with the guest as GET shows it, now and on every change;
    `stats` with each usage point as it is sampled (as in GET .../stats)."""
    guest = await sync_to_async(_guest)(request, uuid)
    user = caller(request).user

    @streams.in_thread
    def render(_message: bytes | None) -> list[tuple[str, str]]:
        fresh = _guests(user).select_related("template").get(pk=guest.pk)
        return [("guest", json.dumps(guest_out(fresh), cls=NinjaJSONEncoder))]

    return streams.sse_response(streams.sse_stream([guest_channel(guest.uuid)], render))


# --- requests ---

requests = Router(tags=["requests"])


@requests.get("", response=_answers({200: s.RequestPage}), summary="List requests")
def request_list(
    request: HttpRequest,
    status: ProvisioningRequest.Status | None = Filter,
    cursor: str | None = Cursor,
    limit: int = Limit,
) -> dict[str, Any]:
    rows = _requests(caller(request).user)
    if status:
        rows = rows.filter(status=status)
    items, after = _page(rows, cursor, limit)
    return {"items": [request_out(r) for r in items], "next": after}


def _fingerprint(body: s.RequestIn) -> str:
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


@requests.post("", response=_answers({202: s.RequestOut}), summary="Ask for a guest")
def request_create(
    request: HttpRequest,
    body: s.RequestIn,
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="A key of yours: retrying with it answers the first request, never a second.",
    ),
) -> HttpResponse:
    """A new guest from a template; follow the request (or its events) until it runs."""
    user = caller(request).user
    record = None
    if idempotency_key:
        record, replay = _idempotent(user, idempotency_key, _fingerprint(body))
        if replay is not None:
            response = _accepted(request, request_out(replay), f"{PREFIX}/requests/{replay.pk}")
            response["Idempotent-Replayed"] = "true"
            return response
    try:
        made = _request_submit(request, body)
    except BaseException:
        if record is not None:
            record.delete()  # the key did not make anything: a retry may try again
        raise
    if record is not None:
        IdempotencyKey.objects.filter(pk=record.pk).update(request=made)
    found = _requests(user).get(pk=made.pk)
    return _accepted(request, request_out(found), f"{PREFIX}/requests/{made.pk}")


def _idempotent(
    user: Any, key: str, fingerprint: str
) -> tuple[IdempotencyKey | None, ProvisioningRequest | None]:
    """(the key's new row, None) the first time; (None, the request) for a retry."""
    if not IDEMPOTENCY_KEY.match(key):
        raise Problem(422, "Idempotency-Key: use 1-255 printable ASCII characters.")
    try:
        with transaction.atomic():
            made = IdempotencyKey.objects.create(user=user, key=key, fingerprint=fingerprint)
        return made, None
    except IntegrityError:
        pass
    first = IdempotencyKey.objects.filter(user=user, key=key).first()
    if first is None:  # the first try failed and let the key go between the two statements
        raise Problem(
            409,
            "A request with this Idempotency-Key just failed; retry.",
            headers={"Retry-After": "1"},
        )
    if first.fingerprint != fingerprint:
        raise Problem(422, "This Idempotency-Key was used with another body; use a new key for it.")
    if first.request_id is None:
        raise Problem(
            409,
            "A request with this Idempotency-Key is being made; retry in a moment.",
            headers={"Retry-After": "1"},
        )
    return None, _requests(user).get(pk=first.request_id)


def _request_submit(request: HttpRequest, body: s.RequestIn) -> ProvisioningRequest:
    user = caller(request).user
    template = GuestTemplate.objects.filter(enabled=True, pk=body.template).first()
    if template is None:
        raise Problem(
            422,
            "No such template.",
            errors=[{"field": "template", "message": "Pick a template id from /templates."}],
        )
    key_lines: tuple[str, ...] = ()
    if body.ssh_keys:
        if template.method != GuestTemplate.Method.CLOUD:
            raise Problem(
                422,
                "Only cloud images take SSH keys.",
                errors=[{"field": "ssh_keys", "message": "This template takes no keys."}],
            )
        found = {
            k.pk: k.public_key for k in SshKey.objects.filter(owner=user, pk__in=body.ssh_keys)
        }
        missing = sorted(set(body.ssh_keys) - set(found))
        if missing:
            raise Problem(
                422,
                "Some SSH keys are not yours.",
                errors=[{"field": "ssh_keys", "message": f"No key of yours has id {missing[0]}."}],
            )
        key_lines = tuple(found[pk] for pk in dict.fromkeys(body.ssh_keys))
    overrides = provision.Overrides(
        name=body.name,
        vcpus=body.vcpus,
        memory_mib=body.memory_mib,
        disk_mib=body.disk_mib,
        data_disk_mib=body.data_disk_mib,
        start_paused=body.start_paused,
        autostart=body.autostart,
        autodestroy=body.autodestroy,
        ssh_keys=key_lines,
        cloud_config=body.cloud_config,
    )
    try:
        return provision.request_submit(owner=user, template=template, overrides=overrides)
    except provision.SubmitError as exc:
        raise _submit_problem(exc) from exc


@requests.get("/{id}", response=_answers({200: s.RequestOut}), summary="Read a request")
def request_read(request: HttpRequest, response: HttpResponse, id: int = IdPath) -> Any:
    return _tagged(response, request_out(_request(request, id)))


@requests.post("/{id}/cancel", response=_answers({202: s.RequestOut}), summary="Cancel")
def request_cancel(request: HttpRequest, id: int = IdPath) -> HttpResponse:
    """Cancel a request still in progress (409 once it is final); what it made is removed."""
    found = _request(request, id)
    try:
        provision.cancel(found.pk)
    except transitions.TransitionError as exc:
        raise Problem(
            409, f"{found.name} can no longer be cancelled: it is {found.status}."
        ) from exc
    fresh = _request(request, id)
    return _accepted(request, request_out(fresh), f"{PREFIX}/requests/{id}")


@requests.get("/{id}/events", response=_answers({200: None}), summary="Live request (SSE)")
async def request_events(request: HttpRequest, id: int = IdPath) -> StreamingHttpResponse:
    """Server-sent events: `request` with the request as GET shows it, now and on every move
    or log line, then `close` once it is final."""
    found = await sync_to_async(_request)(request, id)
    user = caller(request).user
    job = found.job_id  # type: ignore[attr-defined]
    channels = [request_channel(found.pk)] + ([job_channel(job)] if job else [])
    done = found.is_final

    @streams.in_thread
    def render(_message: bytes | None) -> list[tuple[str, str]]:
        nonlocal done
        fresh = _requests(user).get(pk=found.pk)
        done = fresh.is_final
        return [("request", json.dumps(request_out(fresh), cls=NinjaJSONEncoder))]

    async def final() -> bool:
        return done

    return streams.sse_response(streams.sse_stream(channels, render, final=final))


# --- jobs ---

jobs = Router(tags=["jobs"])


@jobs.get("/{id}", response=_answers({200: s.JobOut}), summary="Read a job")
def job_read(request: HttpRequest, response: HttpResponse, id: int = IdPath) -> Any:
    return _tagged(response, job_out(_job(request, id)))


@jobs.post("/{id}/cancel", response=_answers({202: s.JobOut}), summary="Cancel a job")
def job_cancel(request: HttpRequest, id: int = IdPath) -> HttpResponse:
    """A provision or rebuild job cancels its request; a migration (staff) is aborted and the
    guest stays where it was; other jobs are too short to cancel (409)."""
    job = _job(request, id)
    if job.kind in Job.FOR_REQUESTS and job.request_id is not None:
        try:
            provision.cancel(job.request_id)
        except transitions.TransitionError as exc:
            raise Problem(409, "The job has already ended.") from exc
    elif job.kind == Job.Kind.MIGRATE:
        require_staff(request)
        if not migrate.migration_cancel(job=job):
            raise Problem(409, "The migration has already ended.")
    else:
        raise Problem(409, f"A {job.get_kind_display().lower()} job cannot be cancelled.")
    return _accepted(request, job_out(_job(request, id)), f"{PREFIX}/jobs/{id}")


# --- rebuild schedules ---

schedules_router = Router(tags=["schedules"])


@schedules_router.get("/{id}", response=_answers({200: s.ScheduleOut}), summary="Read")
def schedule_read(request: HttpRequest, response: HttpResponse, id: int = IdPath) -> Any:
    return _tagged(response, schedule_out(_schedule(request, id)))


@schedules_router.patch(
    "/{id}",
    response=_answers({200: s.ScheduleOut}),
    summary="Turn on/off",
    openapi_extra=if_match(),
)
def schedule_update(
    request: HttpRequest, body: s.SchedulePatch, response: HttpResponse, id: int = IdPath
) -> Any:
    """Enable or disable the schedule; `If-Match` with its ETag refuses a stale change (412)."""
    found = _schedule(request, id)
    check_if_match(request, schedule_out(found))
    schedules.schedule_set_enabled(schedule=found, enabled=body.enabled)
    return _tagged(response, schedule_out(_schedule(request, id)))


@schedules_router.delete(
    "/{id}", response=_answers({204: None}), summary="Remove", openapi_extra=if_match()
)
def schedule_remove(request: HttpRequest, id: int = IdPath) -> Any:
    found = _schedule(request, id)
    check_if_match(request, schedule_out(found))
    schedules.schedule_delete(schedule=found)
    return 204, None


# --- quota ---

quota = Router(tags=["quota"])


@quota.get("", response=_answers({200: s.QuotaOut}), summary="Your quota and its use")
def quota_read(request: HttpRequest) -> dict[str, Any]:
    user = caller(request).user
    usage, limits = quotas.usage_of(user), quotas.limits_of(user)
    figures = ("guests", "vcpus", "memory_mib", "disk_mib")
    return {
        "usage": {f: getattr(usage, f) for f in figures},
        "limits": {f: getattr(limits, f) for f in figures},
        "source": limits.source,
    }


# --- SSH keys ---

ssh_keys = Router(tags=["ssh keys"])


@ssh_keys.get("", response=_answers({200: s.SshKeyPage}), summary="List your SSH keys")
def key_list(
    request: HttpRequest, cursor: str | None = Cursor, limit: int = Limit
) -> dict[str, Any]:
    items, after = _page(SshKey.objects.filter(owner=caller(request).user), cursor, limit)
    return {"items": [key_out(k) for k in items], "next": after}


@ssh_keys.post("", response=_answers({201: s.SshKeyOut}), summary="Add an SSH key")
def key_create(request: HttpRequest, body: s.SshKeyIn) -> Any:
    """One authorized_keys line; its comment names it when `name` is empty."""
    try:
        key = keys.ssh_key_add(owner=caller(request).user, name=body.name, text=body.public_key)
    except keys.SshKeyError as exc:
        raise Problem(422, str(exc), errors=[{"field": exc.field, "message": str(exc)}]) from exc
    return _created(request, key_out(key))


@ssh_keys.get("/{id}", response=_answers({200: s.SshKeyOut}), summary="Read an SSH key")
def key_read(request: HttpRequest, response: HttpResponse, id: int = IdPath) -> Any:
    return _tagged(response, key_out(_key(request, id)))


@ssh_keys.patch(
    "/{id}",
    response=_answers({200: s.SshKeyOut}),
    summary="Rename an SSH key",
    openapi_extra=if_match(),
)
def key_update(
    request: HttpRequest, body: s.SshKeyPatch, response: HttpResponse, id: int = IdPath
) -> Any:
    key = _key(request, id)
    check_if_match(request, key_out(key))
    try:
        key = keys.ssh_key_rename(owner=caller(request).user, key_id=key.pk, name=body.name)
    except keys.SshKeyError as exc:
        raise Problem(422, str(exc), errors=[{"field": exc.field, "message": str(exc)}]) from exc
    return _tagged(response, key_out(key))


@ssh_keys.delete(
    "/{id}",
    response=_answers({204: None}),
    summary="Remove an SSH key",
    openapi_extra=if_match(),
)
def key_remove(request: HttpRequest, id: int = IdPath) -> Any:
    """Guests that have the key keep it."""
    key = _key(request, id)
    check_if_match(request, key_out(key))
    keys.ssh_key_remove(owner=caller(request).user, key_id=key.pk)
    return 204, None


# --- hosts (staff) ---

hosts = Router(tags=["hosts (staff)"])


def _hosts() -> QuerySet[Host]:
    from django.db.models import Count, Q

    return Host.objects.annotate(
        guest_count=Count("guests", filter=~Q(guests__state=Guest.State.UNDEFINED))
    )


@hosts.get("", response=_answers({200: s.HostPage}), summary="List hosts (staff)")
def host_list(
    request: HttpRequest, cursor: str | None = Cursor, limit: int = Limit
) -> dict[str, Any]:
    require_staff(request)
    items, after = _page(_hosts(), cursor, limit)
    return {"items": [host_out(h, h.guest_count) for h in items], "next": after}  # type: ignore[attr-defined]


@hosts.get("/{id}", response=_answers({200: s.HostOut}), summary="Read a host (staff)")
def host_read(request: HttpRequest, response: HttpResponse, id: int = IdPath) -> Any:
    require_staff(request)
    host = _hosts().filter(pk=id).first()
    if host is None:
        raise Http404("No such host.")
    return _tagged(response, host_out(host, host.guest_count))  # type: ignore[attr-defined]


api.add_router("/templates", templates)
api.add_router("/guests", guests)
api.add_router("/requests", requests)
api.add_router("/jobs", jobs)
api.add_router("/schedules", schedules_router)
api.add_router("/quota", quota)
api.add_router("/keys", ssh_keys)
api.add_router("/hosts", hosts)
